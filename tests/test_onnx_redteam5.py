"""Fifth attacker's pass on the native exporter (issue 17): third-party models at other sizes.

Models nobody here wrote (keras.applications, keras-hub, keras-cv, kecam,
keras-unet-collection, qubvel's packages) were exported natively with
`check=False` and unknown sizes where the model allows, then run in
onnxruntime at batches 1 and 5 and at sizes other than the zoo's. Each case
here is what broke, reduced to a small hand-built model, compared with the
Keras model's own outputs at those sizes.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from test_onnx_redteam2 import _matches_at_other_sizes  # noqa: E402
from test_onnx_redteam4 import _matches  # noqa: E402

L = keras.layers
ops = keras.ops


# --- attention whose query is a learned probe repeated to the batch -------------
# SigLIP's attention pooling repeats a (1, 1, D) weight to `ops.shape(x)[0]`: the
# call is traced per sample, where the query is a concrete tensor, not a graph
# value, and the attention emitter read `.rank` of it (the export failed, auto fell
# back to tf2onnx).


class _ProbePooling(L.Layer):
    def __init__(self, attention, **kwargs):
        super().__init__(**kwargs)
        self.attention = attention

    def build(self, shape):
        self.probe = self.add_weight((1, 1, shape[-1]), initializer="glorot_uniform")
        if isinstance(self.attention, L.MultiHeadAttention):
            self.attention.build((None, 1, shape[-1]), shape)

    def call(self, x):
        probes = ops.repeat(self.probe, repeats=ops.shape(x)[0], axis=0)
        if isinstance(self.attention, L.MultiHeadAttention):
            return self.attention(probes, x, x)
        return self.attention([probes, x])


@pytest.mark.parametrize("kind", ["multi_head", "dot"])
def test_attention_to_a_probe_repeated_to_the_batch(kind, tmp_path):
    keras.utils.set_random_seed(3)
    attention = L.MultiHeadAttention(2, 4) if kind == "multi_head" else L.Attention()
    x = keras.Input((None, 6))
    model = keras.Model(x, _ProbePooling(attention)(L.Dense(6)(x)))
    _matches_at_other_sizes(model, tmp_path)


@pytest.mark.slow
def test_siglip_vision_encoder(tmp_path):
    from keras_hub.src.models.siglip.siglip_vision_encoder import SigLIPVisionEncoder

    keras.utils.set_random_seed(5)
    model = SigLIPVisionEncoder(patch_size=8, hidden_dim=16, num_layers=2, num_heads=2,
                                intermediate_dim=32, image_shape=(32, 32, 3))
    _matches_at_other_sizes(model, tmp_path, sizes=((1, None), (5, None)))


# --- repeat along an axis followed by axes of unknown size ----------------------
# keras-cv's YOLOV8Detector upsamples by `ops.repeat(ops.repeat(p5, 2, axis=1), 2,
# axis=2)`: on an image of unknown size the emitter refused ("unknown sizes after
# the axis") and auto fell back to tf2onnx. The sizes after the axis now come from
# the graph's `Shape`.


def _repeats(flavour):
    if flavour == "keras":
        x = keras.Input((None, None, 3))
        y = L.Conv2D(4, 3, strides=2, padding="same")(x)
        y = ops.repeat(ops.repeat(y, 2, axis=1), 3, axis=2)
        return keras.Model(x, [y, ops.repeat(x, 2, axis=0)])
    import tensorflow as tf
    import tf_keras

    x = tf_keras.Input((None, None, 3))
    y = tf_keras.layers.Conv2D(4, 3, strides=2, padding="same")(x)
    y = tf.repeat(tf.repeat(y, 2, axis=1), 3, axis=2)
    return tf_keras.Model(x, y)


@pytest.mark.parametrize("flavour", ["keras", "tf_keras"])
def test_repeat_before_axes_of_unknown_size(flavour, tmp_path):
    _matches(_repeats(flavour), tmp_path)


@pytest.mark.slow
def test_yolov8_detector_of_unknown_image_size(tmp_path):
    import keras_cv

    keras.utils.set_random_seed(8)
    backbone = keras_cv.models.YOLOV8Backbone(
        stackwise_channels=[8, 16, 24, 32], stackwise_depth=[1, 1, 1, 1],
        include_rescaling=False, input_shape=(None, None, 3))
    model = keras_cv.models.YOLOV8Detector(backbone=backbone, num_classes=3,
                                           bounding_box_format="xywh", fpn_depth=1)
    _matches_at_other_sizes(model, tmp_path, sizes=((1, 32), (5, 96)))


# --- a Resizing layer made from an unknown size inside a traced call -------------
# keras-hub DeepLabV3 builds `Resizing(ops.shape(x)[1], ...)` inside its call: traced,
# the layer's height is None and the emitter raised a TypeError ("failed while
# writing the graph"); refused instead, the call is traced again with the sizes as
# graph values, where such a Resizing records a `SizedResize` of them.


class _ResizedBack(L.Layer):
    def __init__(self, interpolation, **kwargs):
        super().__init__(**kwargs)
        self.interpolation = interpolation

    def call(self, x):
        pooled = L.AveragePooling2D(2, padding="same")(x)
        shape = ops.shape(x)
        return L.Resizing(shape[1], shape[2], interpolation=self.interpolation)(pooled)


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
def test_resizing_made_from_an_unknown_size(interpolation, tmp_path):
    x = keras.Input((None, None, 3))
    _matches_at_other_sizes(keras.Model(x, _ResizedBack(interpolation)(x)), tmp_path)


@pytest.mark.slow
def test_deeplabv3_of_unknown_image_size(tmp_path):
    import keras_hub

    H = keras_hub.models
    keras.utils.set_random_seed(6)
    encoder = H.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_filters=[64, 64, 64],
        stackwise_num_blocks=[1, 1, 1], stackwise_num_strides=[1, 2, 2],
        block_type="basic_block", image_shape=(None, None, 3))
    model = H.DeepLabV3Backbone(
        image_encoder=encoder, low_level_feature_key="P2", spatial_pyramid_pooling_key="P4",
        dilation_rates=[2, 4], upsampling_size=4, projection_filters=16,
        image_shape=(None, None, 3))
    _matches_at_other_sizes(model, tmp_path, sizes=((1, 32), (5, 48)))


# --- resizing to a size the graph computes --------------------------------------
# kecam GhostNetV2 resizes its attention map back with `tf.image.resize(nn,
# tf.shape(inputs)[1:-1])`: on images of unknown size the emitter refused ("a size
# computed at run time") and auto fell back to tf2onnx. The Resize now takes the
# size the graph computes (nearest and bilinear, without an aspect-ratio crop or pad).


@pytest.mark.parametrize("method", ["nearest", "bilinear"])
def test_tf_keras_resize_to_a_size_computed_in_the_graph(method, tmp_path):
    import tensorflow as tf
    import tf_keras

    tl = tf_keras.layers
    tf_keras.utils.set_random_seed(2)
    x = tf_keras.Input((None, None, 3))
    small = tl.AveragePooling2D(2, padding="same")(tl.Conv2D(4, 3, padding="same")(x))
    y = tf.image.resize(small, tf.shape(x)[1:-1], method=method)
    _matches(tf_keras.Model(x, tl.Concatenate()([x, y])), tmp_path)


# --- tf.image.extract_patches in tf-keras ---------------------------------------
# keras-unet-collection's TransUNet and Swin-UNet cut their patches with
# `tf.image.extract_patches` (a TFOpLambda): the exporter did not cover it and auto
# failed (tf2onnx wrote a graph onnxruntime cannot load). It is now Keras 3's
# `extract_patches`: a convolution with an identity kernel.


@pytest.mark.parametrize("sizes, strides, rates, padding", [
    (2, 2, 1, "VALID"), (3, 2, 1, "SAME"), (2, 1, 2, "VALID"), ((2, 3), (1, 2), 1, "SAME")])
def test_tf_keras_extract_patches(sizes, strides, rates, padding, tmp_path):
    import tensorflow as tf
    import tf_keras

    def four(v):
        v = v if isinstance(v, tuple) else (v, v)
        return [1, v[0], v[1], 1]

    x = tf_keras.Input((None, None, 3))
    padded = tf_keras.layers.ZeroPadding2D(2)(x)  # TensorFlow gives no patch of a 1x1 image
    y = tf.image.extract_patches(padded, sizes=four(sizes), strides=four(strides),
                                 rates=four(rates), padding=padding)
    _matches(tf_keras.Model(x, y), tmp_path)


# --- tile by counts the graph computes -------------------------------------------
# kecam's ClassToken (CoaT, VOLO) tiles its token to the batch with
# `tf.tile(token, [tf.shape(x)[0], 1, 1])`: the emitter read every count as a number
# in tf-keras, and the layer was uncovered ("arguments not handled"); auto failed.


def test_tf_keras_tile_by_counts_computed_in_the_graph(tmp_path):
    import tensorflow as tf
    import tf_keras

    class Token(tf_keras.layers.Layer):
        def build(self, shape):
            self.token = self.add_weight("token", (1, 1, shape[-1]), initializer="glorot_uniform")

        def call(self, x):
            return tf.concat([tf.tile(self.token, [tf.shape(x)[0], 1, 1]), x], axis=1)

    tf_keras.utils.set_random_seed(4)
    x = tf_keras.Input((None, 4))
    _matches(tf_keras.Model(x, Token()(tf_keras.layers.Dense(4)(x))), tmp_path)


# --- stack of numbers and graph values --------------------------------------------
# `tf.stack([1, tf.shape(x)[1], 1])` (a shape built for `tf.tile` or `tf.reshape`):
# the stack emitter read `.rank` of the numbers and the layer was uncovered.


def test_tf_keras_stack_of_numbers_and_sizes(tmp_path):
    import tensorflow as tf
    import tf_keras

    x = tf_keras.Input((None, 4))
    counts = tf.stack([1, tf.shape(x)[1], 1])
    first = tf_keras.layers.Lambda(lambda t: t[:, :1])(x)
    _matches(tf_keras.Model(x, tf.concat([x, tf.tile(first, counts)], axis=1)), tmp_path)


# --- tf.nn.convolution and tf.nn.bias_add(data_format="NHWC") ---------------------
# kecam NFNets standardize their kernels and convolve with `tf.nn.convolution`, then
# add the bias with `tf.nn.bias_add(..., data_format="NHWC")` (tf-keras's Conv2D):
# neither was covered (bias_add only for data_format=None) and auto fell back.


@pytest.mark.parametrize("strides, padding, dilations", [(1, "SAME", 1), (2, "VALID", 1),
                                                         (1, "SAME", 2)])
def test_tf_keras_convolution_of_a_standardized_kernel(strides, padding, dilations, tmp_path):
    import tensorflow as tf
    import tf_keras

    class StandardizedConv(tf_keras.layers.Layer):
        def build(self, shape):
            self.kernel = self.add_weight("kernel", (3, 3, shape[-1], 5))
            self.bias = self.add_weight("bias", (5,), initializer="random_normal")

        def call(self, x):
            mean, var = tf.nn.moments(self.kernel, axes=[0, 1, 2], keepdims=True)
            kernel = (self.kernel - mean) * tf.math.rsqrt(var + 1e-4)
            y = tf.nn.convolution(x, kernel, strides=strides, padding=padding,
                                  dilations=dilations, data_format="NHWC")
            return tf.nn.bias_add(y, self.bias, data_format="NHWC")

    tf_keras.utils.set_random_seed(9)
    x = tf_keras.Input((None, None, 3))
    padded = tf_keras.layers.ZeroPadding2D(3)(x)  # a 1x1 image has no VALID output
    _matches(tf_keras.Model(x, StandardizedConv()(padded)), tmp_path)


# --- patches of many channels: the identity kernel's size -------------------------
# extract_patches was a convolution with a (cells * channels)^2 identity kernel:
# kecam HaloNet26T's halo blocks (tf.image.extract_patches of 14x14 patches over
# hundreds of channels) took more than 16 GB while exporting. One group per channel
# needs channels * cells^2 elements; Keras's order is a Gather of the channels.


def test_tf_keras_patches_of_many_channels_keep_the_graph_small(tmp_path):
    import tensorflow as tf
    import tf_keras

    tf_keras.utils.set_random_seed(10)
    x = tf_keras.Input((None, None, 3))
    wide = tf_keras.layers.Conv2D(64, 1)(tf_keras.layers.ZeroPadding2D(4)(x))
    y = tf.image.extract_patches(wide, sizes=[1, 8, 8, 1], strides=[1, 4, 4, 1],
                                 rates=[1, 1, 1, 1], padding="SAME")
    _matches(tf_keras.Model(x, y), tmp_path)
    assert os.path.getsize(tmp_path / "m.onnx") < 2 ** 24


# --- TensorFlow 1's resize -------------------------------------------------------
# keras-unet-collection's ResUNet-a resizes its pooled ASPP branch with
# `tf.compat.v1.image.resize(x, size, method="bilinear", align_corners=True)`: not
# covered, auto fell back to tf2onnx. TensorFlow 1 samples at i / scale (ONNX's
# "asymmetric", nearest rounded down) or with the corners aligned ("align_corners").


@pytest.mark.parametrize("method, align, computed", [
    ("bilinear", True, True), ("bilinear", False, True), ("nearest", False, True),
    ("bilinear", True, False), (0, False, False), (1, False, False)])
def test_tf_keras_tensorflow_1_resize(method, align, computed, tmp_path):
    import tensorflow as tf
    import tf_keras

    tf_keras.utils.set_random_seed(11)
    x = tf_keras.Input((None, None, 3))
    small = tf_keras.layers.AveragePooling2D(2, padding="same")(
        tf_keras.layers.Conv2D(4, 3, padding="same")(x))
    size = tf.shape(x)[1:3] if computed else (7, 5)
    y = tf.compat.v1.image.resize(small, size, method=method, align_corners=align)
    _matches(tf_keras.Model(x, y), tmp_path)
