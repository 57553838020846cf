"""Writes examples/small_resnet.keras: a small ResNet-style model with BN layers.

The model is tiny (about 20k parameters, some 160 KB on disk) but has
what a conversion has to get right: BatchNormalization after convolutions,
in residual branches and on a projection shortcut, with moving statistics
and affine parameters that are not their initial values, so that a
conversion that loses a weight changes the outputs.

Run from the repository root:

    python examples/make_small_model.py [OUTPUT]
"""

import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402


def _residual_block(x, filters, stride, name):
    shortcut = x
    y = keras.layers.Conv2D(
        filters, 3, strides=stride, padding="same", use_bias=False,
        name=f"{name}_conv1",
    )(x)
    y = keras.layers.BatchNormalization(name=f"{name}_bn1")(y)
    y = keras.layers.ReLU(name=f"{name}_relu1")(y)
    y = keras.layers.Conv2D(
        filters, 3, padding="same", use_bias=False, name=f"{name}_conv2"
    )(y)
    y = keras.layers.BatchNormalization(name=f"{name}_bn2")(y)
    if stride != 1 or shortcut.shape[-1] != filters:
        shortcut = keras.layers.Conv2D(
            filters, 1, strides=stride, use_bias=False, name=f"{name}_proj"
        )(shortcut)
        shortcut = keras.layers.BatchNormalization(name=f"{name}_proj_bn")(shortcut)
    y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def build_small_resnet(input_shape=(32, 32, 3), num_classes=10):
    """Returns an uncompiled small ResNet-style `keras.Model`.

    Stem (Conv-BN-ReLU), one identity block at 16 channels, one downsampling
    block with a projection shortcut at 32 channels, global average pooling
    and a Dense classifier: 6 BatchNormalization layers.
    """
    inputs = keras.Input(input_shape, name="image")
    x = keras.layers.Conv2D(16, 3, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    x = _residual_block(x, 16, 1, "block1")
    x = _residual_block(x, 32, 2, "block2")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="small_resnet")


def randomize_batchnorm(model, seed=0):
    """Gives every BN layer moving statistics and gamma/beta away from init."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0.0, 0.5, n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, n).astype("float32"))
            layer.gamma.assign(rng.uniform(0.8, 1.2, n).astype("float32"))
            layer.beta.assign(rng.normal(0.0, 0.1, n).astype("float32"))


def main(argv):
    out = pathlib.Path(argv[1]) if len(argv) > 1 else (
        pathlib.Path(__file__).parent / "small_resnet.keras"
    )
    keras.utils.set_random_seed(0)
    model = build_small_resnet()
    randomize_batchnorm(model)
    model.save(out)
    print(f"Wrote {out} ({out.stat().st_size / 1024:.0f} KB, "
          f"{model.count_params()} parameters)")


if __name__ == "__main__":
    main(sys.argv)
