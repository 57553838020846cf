"""Small models from the wild, built from their constructors (no downloads).

Every builder returns a freshly built model with random weights; `build()`
also randomizes the moving statistics, gamma and beta of every
BatchNormalization in it (nested layers included) from a NumPy generator
seeded by the model's name, so that folding and synchronization are tested
on layers that are not the identity.

- keras-hub backbones at 64x64 with few stages and filters (configs mirror
  the `init_kwargs` of keras-hub's own `*_backbone_test.py`, made smaller),
  and one task model (`ResNetImageClassifier`).
- One `keras.applications` model of every family that holds BN, at its
  smallest accepted input size, `weights=None`, small `classes`.
- `ConvBN`: a 15-line custom layer that creates its BN in `__init__` and
  builds its conv unguarded in `build()`, in a tiny Functional model.

Importing this module registers `ConvBN` (as `zoo>ConvBN`); a process that
loads a saved `convbn` model must import it first, as a user would import
the module that defines their layer.
"""

import os
import zlib

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

A = keras.applications
H = keras_hub.models


@keras.saving.register_keras_serializable(package="zoo")
class ConvBN(keras.layers.Layer):
    """Conv2D -> BatchNormalization -> ReLU, sublayers made in `__init__`."""

    def __init__(self, filters, kernel_size=3, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.kernel_size = filters, kernel_size
        self.conv = keras.layers.Conv2D(filters, kernel_size, padding="same", use_bias=False)
        self.bn = keras.layers.BatchNormalization()

    def build(self, input_shape):
        self.conv.build(input_shape)  # unguarded, as most user code does
        self.bn.build(self.conv.compute_output_shape(input_shape))

    def call(self, x, training=None):
        return keras.ops.relu(self.bn(self.conv(x), training=training))

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "kernel_size": self.kernel_size}


def _convbn_model():
    inputs = keras.Input((16, 16, 3), name="image")
    y = ConvBN(8, name="block1")(inputs)
    y = ConvBN(8, name="block2")(y)
    y = keras.layers.GlobalAveragePooling2D()(y)
    outputs = keras.layers.Dense(4, name="logits")(y)
    return keras.Model(inputs, outputs, name="convbn_net")


# --- keras-hub -------------------------------------------------------------

def _resnet(pre_activation=False, block_type="bottleneck_block", filters=(64, 32, 32), stem=32):
    # keras-hub requires 64 filters in the first stage (and, for basic
    # blocks, a stem as wide as that stage).
    return H.ResNetBackbone(
        input_conv_filters=[stem],
        input_conv_kernel_sizes=[7],
        stackwise_num_filters=list(filters),
        stackwise_num_blocks=[1, 1, 1],
        stackwise_num_strides=[1, 2, 2],
        block_type=block_type,
        use_pre_activation=pre_activation,
        image_shape=(64, 64, 3),
    )


def _cspnet():
    return H.CSPNetBackbone(
        stem_filters=16,
        stem_kernel_size=3,
        stem_strides=1,
        stackwise_strides=2,
        stackwise_depth=[1, 1, 2],
        stackwise_num_filters=[16, 24, 32],
        image_shape=(64, 64, 3),
        down_growth=True,
        bottle_ratio=(0.5,) + (1.0,),
        block_ratio=(1.0,) + (0.5,),
        expand_ratio=(2.0,) + (1.0,),
        block_type="dark_block",
        stage_type="csp",
        stem_padding="same",
    )


def _mobilenet():
    return H.MobileNetBackbone(
        stackwise_expansion=[[40, 56], [64, 144]],
        stackwise_num_blocks=[2, 2],
        stackwise_num_filters=[[16, 16], [24, 24]],
        stackwise_kernel_size=[[3, 3], [5, 5]],
        stackwise_num_strides=[[2, 1], [2, 1]],
        stackwise_se_ratio=[[None, None], [0.25, 0.25]],
        stackwise_activation=[["relu", "relu"], ["hard_swish", "hard_swish"]],
        stackwise_padding=[[1, 1], [2, 2]],
        output_num_filters=64,
        depthwise_filters=8,
        depthwise_stride=2,
        depthwise_residual=False,
        last_layer_filter=64,
        squeeze_and_excite=0.5,
        image_shape=(64, 64, 3),
        input_num_filters=16,
    )


def _efficientnet():
    return H.EfficientNetBackbone(
        stackwise_width_coefficients=[1.0] * 4,
        stackwise_depth_coefficients=[1.0] * 4,
        stackwise_kernel_sizes=[3, 3, 3, 3],
        stackwise_num_repeats=[1, 1, 1, 2],
        stackwise_input_filters=[16, 16, 24, 32],
        stackwise_output_filters=[16, 24, 32, 48],
        stackwise_expansion_ratios=[1, 4, 4, 4],
        stackwise_squeeze_and_excite_ratios=[0.0, 0.0, 0.25, 0.25],
        stackwise_strides=[1, 2, 2, 2],
        stackwise_block_types=["fused", "fused", "unfused", "unfused"],
        stackwise_force_input_filters=[0] * 4,
        stackwise_nores_option=[False] * 4,
        input_shape=(64, 64, 3),
    )


def _efficientnet_gelu():
    # The same backbone with exact GELU, which tf2onnx cannot convert (Erfc).
    return H.EfficientNetBackbone(
        stackwise_width_coefficients=[1.0] * 3,
        stackwise_depth_coefficients=[1.0] * 3,
        stackwise_kernel_sizes=[3, 3, 3],
        stackwise_num_repeats=[1, 1, 1],
        stackwise_input_filters=[16, 16, 24],
        stackwise_output_filters=[16, 24, 32],
        stackwise_expansion_ratios=[1, 4, 4],
        stackwise_squeeze_and_excite_ratios=[0.0, 0.25, 0.25],
        stackwise_strides=[1, 2, 2],
        stackwise_block_types=["fused", "unfused", "unfused"],
        stackwise_force_input_filters=[0] * 3,
        stackwise_nores_option=[False] * 3,
        activation="gelu",
        input_shape=(64, 64, 3),
    )


def _densenet():
    return H.DenseNetBackbone(
        stackwise_num_repeats=[1, 2, 2], growth_rate=8, image_shape=(64, 64, 3)
    )


def _hgnetv2():
    return H.HGNetV2Backbone(
        depths=[1, 1, 1],
        embedding_size=16,
        hidden_sizes=[32, 48, 64],
        stem_channels=[3, 8, 16],
        hidden_act="relu",
        use_learnable_affine_block=False,
        stackwise_stage_filters=[
            (16, 8, 32, 1, 2, 3),
            (32, 16, 48, 1, 2, 3),
            (48, 16, 64, 1, 2, 3),
        ],
        apply_downsample=[False, True, True],
        use_lightweight_conv_block=[False, False, True],
        image_shape=(64, 64, 3),
    )


def _xception():
    return H.XceptionBackbone(
        stackwise_conv_filters=[[16, 32], [32, 64], [64, 64]],
        stackwise_pooling=[True, True, False],
        image_shape=(64, 64, 3),
    )


def _deeplabv3():
    encoder = _resnet(block_type="basic_block", filters=(64, 64, 64), stem=64)
    return H.DeepLabV3Backbone(
        image_encoder=encoder,
        low_level_feature_key="P2",
        spatial_pyramid_pooling_key="P4",
        dilation_rates=[2, 4],
        upsampling_size=4,
        projection_filters=16,
        image_shape=(64, 64, 3),
    )


def _resnet_classifier():
    return H.ResNetImageClassifier(backbone=_resnet(), num_classes=5)


# --- keras.applications ----------------------------------------------------

def _app(factory, size, **kwargs):
    def build():
        kwargs.setdefault("classes", 10)
        return factory(weights=None, input_shape=(size, size, 3), **kwargs)

    return build


def _regnet_tf_keras():
    import tf_keras

    return tf_keras.applications.RegNetX002(
        weights=None, input_shape=(32, 32, 3), classes=10
    )


def flavour(name):
    """'tf_keras' for models built with tf-keras, else 'keras'."""
    return "tf_keras" if name.startswith("tfk_") else "keras"


def suffix(name):
    """File suffix the model is saved with: .h5 for tf-keras, else .keras."""
    return ".h5" if flavour(name) == "tf_keras" else ".keras"


# name -> (builder, custom-object modules the saved file needs).
# Sizes: keras.applications' smallest accepted inputs (32; InceptionV3 and
# InceptionResNetV2 75; Xception 71). ResNet50V2 keeps ImageNet's 1000-class
# softmax, the case the issue measured (max probability ~0.006).
ZOO = {
    "hub_resnet_v1": (_resnet, ["keras_hub"]),
    "hub_resnet_preact": (lambda: _resnet(pre_activation=True), ["keras_hub"]),
    "hub_cspnet": (_cspnet, ["keras_hub"]),
    "hub_mobilenet": (_mobilenet, ["keras_hub"]),
    "hub_efficientnet": (_efficientnet, ["keras_hub"]),
    "hub_densenet": (_densenet, ["keras_hub"]),
    "hub_hgnetv2": (_hgnetv2, ["keras_hub"]),
    "hub_xception": (_xception, ["keras_hub"]),
    "hub_deeplabv3": (_deeplabv3, ["keras_hub"]),
    "hub_resnet_classifier": (_resnet_classifier, ["keras_hub"]),
    "app_ResNet50": (_app(A.ResNet50, 32), []),
    "app_ResNet50V2": (_app(A.ResNet50V2, 32, classes=1000), []),
    "app_MobileNet": (_app(A.MobileNet, 32, alpha=0.25), []),
    "app_MobileNetV2": (_app(A.MobileNetV2, 32, alpha=0.35), []),
    "app_MobileNetV3Small": (_app(A.MobileNetV3Small, 32, alpha=0.75), []),
    "app_EfficientNetB0": (_app(A.EfficientNetB0, 32), []),
    "app_EfficientNetV2B0": (_app(A.EfficientNetV2B0, 32), []),
    "app_DenseNet121": (_app(A.DenseNet121, 32), []),
    "app_InceptionV3": (_app(A.InceptionV3, 75), []),
    "app_InceptionResNetV2": (_app(A.InceptionResNetV2, 75), []),
    "app_Xception": (_app(A.Xception, 71), []),
    "app_NASNetMobile": (_app(A.NASNetMobile, 32), []),
    # Keras 3 has no RegNet; tf-keras does: this one goes through the
    # tf-keras flavour (saved as .h5).
    "tfk_RegNetX002": (_regnet_tf_keras, []),
    "custom_convbn": (_convbn_model, ["zoo_models"]),
}

# Exported to ONNX only (tests/test_onnx_zoo.py): models whose layers the
# zoo above lacks. EfficientNet with exact GELU, which tf2onnx cannot
# convert; ConvNeXt (LayerNormalization, GELU, a custom LayerScale layer,
# no BN at all).
EXPORT_ONLY = {
    "hub_efficientnet_gelu": (_efficientnet_gelu, ["keras_hub"]),
    "app_ConvNeXtTiny": (_app(A.ConvNeXtTiny, 32), []),
}


def _layer_base(root):
    if "tf_keras" in type(root).__module__:
        import tf_keras

        return tf_keras.layers.Layer, tf_keras.layers.BatchNormalization
    return keras.layers.Layer, keras.layers.BatchNormalization


def walk_layers(root):
    """Every layer under `root` (itself included), found through public attributes.

    Follows `.layers` and every attribute that holds a layer or a list/tuple/
    dict of layers, so BN kept as an attribute of a custom layer is found.
    """
    layer_class, _ = _layer_base(root)
    found, stack, seen = [], [root], set()
    while stack:
        item = stack.pop()
        if isinstance(item, (list, tuple)):
            stack.extend(item)
            continue
        if isinstance(item, dict):
            stack.extend(item.values())
            continue
        if not isinstance(item, layer_class) or id(item) in seen:
            continue
        seen.add(id(item))
        found.append(item)
        stack.extend(getattr(item, "layers", None) or [])
        for key, value in vars(item).items():
            if key.startswith("_") and key not in ("_layers",):
                continue
            stack.append(value)
    return found


def batchnorm_layers(model):
    _, bn_class = _layer_base(model)
    return [l for l in walk_layers(model) if isinstance(l, bn_class)]


def randomize_batchnorm(model, seed):
    """Random moving mean/variance, gamma and beta in every BN (deterministic)."""
    rng = np.random.default_rng(seed)
    layers = sorted(batchnorm_layers(model), key=lambda l: getattr(l, "path", l.name))
    for layer in layers:
        c = layer.moving_mean.shape[0]
        layer.moving_mean.assign(rng.normal(0.0, 0.2, c).astype("float32"))
        layer.moving_variance.assign(rng.uniform(0.5, 2.0, c).astype("float32"))
        if layer.gamma is not None:
            layer.gamma.assign(rng.uniform(0.5, 1.5, c).astype("float32"))
        if layer.beta is not None:
            layer.beta.assign(rng.normal(0.0, 0.2, c).astype("float32"))
    return len(layers)


def seed_of(name):
    return zlib.crc32(name.encode())


def build(name):
    """The model `name` of ZOO, with weights and BN statistics seeded by its name."""
    builder, _ = {**ZOO, **EXPORT_ONLY}[name]
    keras.utils.set_random_seed(seed_of(name) % 2**31)  # seeds TF and NumPy too
    model = builder()
    randomize_batchnorm(model, seed_of(name))
    return model


def sample_inputs(model, name, batch=2, size=64):
    """A seeded float32 batch for every model input (None dimensions -> `size`)."""
    rng = np.random.default_rng(seed_of(name) + 1)
    arrays = []
    for tensor in model.inputs:
        shape = [batch] + [size if d is None else d for d in tensor.shape[1:]]
        arrays.append(rng.uniform(0.0, 1.0, shape).astype("float32"))
    return arrays


# --- issue 17: models people train now (exported to ONNX only) -------------

def _segformer():
    encoder = H.MiTBackbone(
        layerwise_depths=[1, 1], num_layers=2, layerwise_num_heads=[1, 2],
        layerwise_sr_ratios=[4, 2], max_drop_path_rate=0.0, layerwise_patch_sizes=[7, 3],
        layerwise_strides=[4, 2], hidden_dims=[16, 32], image_shape=(64, 64, 3),
    )
    return H.SegFormerBackbone(image_encoder=encoder, projection_filters=16)


def _mobilenetv5():
    # The batch-norm variant (the default is RMS norm), with one attention stage.
    return H.MobileNetV5Backbone(
        stackwise_block_types=[["er"], ["uir", "mqa"]],
        stackwise_num_blocks=[1, 2],
        stackwise_num_filters=[[16], [24, 24]],
        stackwise_strides=[[2], [2, 1]],
        stackwise_act_layers=[["relu"], ["gelu", "gelu"]],
        stackwise_exp_ratios=[[2.0], [2.0, 2.0]],
        stackwise_se_ratios=[[0.0], [0.0, 0.0]],
        stackwise_dw_kernel_sizes=[[0], [3, 0]],
        stackwise_dw_start_kernel_sizes=[[0], [3, 0]],
        stackwise_dw_end_kernel_sizes=[[0], [0, 0]],
        stackwise_exp_kernel_sizes=[[3], [0, 0]],
        stackwise_pw_kernel_sizes=[[1], [0, 0]],
        stackwise_num_heads=[[0], [0, 2]],
        stackwise_key_dims=[[0], [0, 8]],
        stackwise_value_dims=[[0], [0, 8]],
        stackwise_kv_strides=[[0], [0, 2]],
        stackwise_use_cpe=[[False], [False, False]],
        stem_size=8, num_features=64, use_msfa=False, norm_layer="batch_norm",
        image_shape=(64, 64, 3),
    )


def _dfine():
    hgnetv2 = H.HGNetV2Backbone(
        stem_channels=[3, 8, 8],
        stackwise_stage_filters=[[8, 8, 16, 1, 2, 3], [16, 8, 32, 1, 2, 3],
                                 [32, 16, 48, 1, 2, 3]],
        apply_downsample=[False, True, True], use_lightweight_conv_block=[False, False, True],
        depths=[1, 1, 1], hidden_sizes=[16, 32, 48], embedding_size=8,
        use_learnable_affine_block=False, hidden_act="relu", image_shape=(64, 64, 3),
        out_features=["stage2", "stage3"],
    )
    model = H.DFineBackbone(
        backbone=hgnetv2, decoder_in_channels=[16, 16], encoder_hidden_dim=16,
        num_denoising=0, num_labels=4, hidden_dim=16, learn_initial_query=False,
        num_queries=8, anchor_image_size=(64, 64), feat_strides=[8, 16],
        num_feature_levels=2, encoder_in_channels=[32, 48], encode_proj_layers=[1],
        num_attention_heads=2, encoder_ffn_dim=32, num_encoder_layers=1,
        hidden_expansion=0.5, depth_multiplier=0.5, eval_idx=-1, num_decoder_layers=1,
        decoder_attention_heads=2, decoder_ffn_dim=32, decoder_n_points=[2, 2],
        lqe_hidden_dim=8, num_lqe_layers=2, out_features=["stage2", "stage3"],
        image_shape=(64, 64, 3), seed=0,
    )
    # D-FINE picks its queries by top-k over the encoder's class scores. With
    # its initial kernels (std 0.01) and randomized BN shifts, the features are
    # nearly the same at every position: the scores tie to 1e-6 and any two
    # correct engines pick different queries. Kernels at the fan-in scale
    # (seeded) separate the scores by ~1e-3, far above float32 rounding.
    rng = np.random.default_rng(396)
    for v in model.weights:
        if v.path.endswith("kernel") and len(v.shape) >= 2:
            fan_in = int(np.prod(v.shape[:-1]))
            v.assign(rng.normal(0.0, fan_in ** -0.5, v.shape).astype("float32"))
    return model


def _yolov8():
    import keras_cv

    backbone = keras_cv.models.YOLOV8Backbone(
        stackwise_channels=[8, 16, 24, 32], stackwise_depth=[1, 1, 1, 1],
        include_rescaling=False, input_shape=(64, 64, 3),
    )
    return keras_cv.models.YOLOV8Detector(
        backbone=backbone, num_classes=3, bounding_box_format="xywh", fpn_depth=1
    )


def _cspdarknet():
    import keras_cv

    return keras_cv.models.CSPDarkNetBackbone(
        stackwise_channels=[8, 16, 24, 32], stackwise_depth=[1, 1, 1, 1],
        include_rescaling=False, input_shape=(64, 64, 3),
    )


def _mobilenetv3_cv():
    import keras_cv

    return keras_cv.models.MobileNetV3Backbone(
        stackwise_expansion=[1, 4, 6], stackwise_filters=[8, 16, 16],
        stackwise_kernel_size=[3, 3, 5], stackwise_stride=[2, 2, 1],
        stackwise_se_ratio=[0.25, None, 0.25], stackwise_activation=["relu", "relu", "hard_swish"],
        include_rescaling=False, input_shape=(64, 64, 3),
    )


def _mixed(policy, factory, **kwargs):
    """A keras.applications model built under a mixed-precision policy."""
    def build():
        old = keras.config.dtype_policy()
        keras.config.set_dtype_policy(policy)
        try:
            return factory(weights=None, input_shape=(32, 32, 3), classes=10,
                           classifier_activation=None, **kwargs)
        finally:
            keras.config.set_dtype_policy(old)

    return build


# Exported natively and matched (tests/test_onnx_zoo.py). The kecam model
# is tf-keras and needs `keras_cv_attention_models` imported before
# TensorFlow: it is built in a fresh process (`build_kecam`).
ONNX_WILD = {
    "hub_segformer": _segformer,
    "hub_mobilenetv5_bn": _mobilenetv5,
    "hub_dfine": _dfine,
    "cv_yolov8_detector": _yolov8,
    "cv_cspdarknet": _cspdarknet,
    "cv_mobilenetv3": _mobilenetv3_cv,
    "mixed_float16_MobileNetV3Small": _mixed("mixed_float16", A.MobileNetV3Small,
                                             minimalistic=False),
    "mixed_bfloat16_ResNet50": _mixed("mixed_bfloat16", A.ResNet50),
}
KECAM = "kecam_fasternet_gelu"


def build_wild(name):
    """The model `name` of ONNX_WILD, seeded and with BN statistics randomized."""
    keras.utils.set_random_seed(seed_of(name) % 2**31)
    model = ONNX_WILD[name]()
    randomize_batchnorm(model, seed_of(name))
    return model


def build_kecam(path):
    """Saves kecam FasterNetT0 (exact GELU, `tf.split`) as .h5 at `path`.

    Only in a fresh process that imported `keras_cv_attention_models` before
    this module (kecam switches TensorFlow to tf-keras).
    """
    import keras_cv_attention_models  # noqa: F401 - sets TF_USE_LEGACY_KERAS
    from keras_cv_attention_models import fasternet

    import tensorflow as tf

    tf.keras.utils.set_random_seed(seed_of(KECAM) % 2**31)
    model = fasternet.FasterNetT0(
        input_shape=(32, 32, 3), num_classes=10, pretrained=None, num_blocks=[1, 1, 1, 1],
        embed_dim=16, output_conv_filter=64, classifier_activation=None,
    )
    randomize_batchnorm(model, seed_of(KECAM))
    model.save(path)
