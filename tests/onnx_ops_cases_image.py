"""Conformance cases of the image-warp, colour, filter and einops emitters.

Merged into `onnx_ops_cases` (`KERAS`, `STATIC`, `TF`, `MIN_OPSET`); the
same conventions hold: `fn(y)` for a 4-D `y` of large values of both signs,
float32 outputs, `STATIC` for ops that need a known spatial size (7x5).
Warps use transforms whose sample points fall inside, on and outside the
image border, so each fill mode's edge handling is exercised.
"""

import keras
import numpy as np

ops = keras.ops
F = "float32"


def _tf():
    import tensorflow as tf

    return tf


def _rgb(y):
    """Colours in [0, 1] with some channels equal (hue ties) and some grey pixels."""
    y = ops.round(ops.sigmoid(y[..., :3] / 80.0) * 8.0) / 8.0
    return ops.concatenate([y[:, :, :2], ops.repeat(y[:, :, 2:3, :1], 3, axis=-1)], axis=2)


def _chw(y):
    return ops.transpose(y, (0, 3, 1, 2))


_KERNEL = np.array([0.5, -1.0, 2.0, 0.25], F)

_IDENTITY = np.array([1, 0, 0, 0, 1, 0, 0, 0], F)
# Rotation with scale and shift: corners map outside the 7x5 image.
_ROTATE = np.array([0.9, -0.3, 1.2, 0.25, 1.1, -1.5, 0.0, 0.0], F)
_STRETCH = np.array([1.3, 0.2, -2.7, -0.1, 1.6, -3.1, 0.0, 0.0], F)
_PROJECTIVE = np.array([1.1, 0.3, -4.0, -0.2, 0.9, 2.5, 0.02, -0.03], F)
# Several image widths away: reflect and wrap fold coordinates more than once.
_FAR = np.array([2.7, 0.4, -9.3, 0.3, 3.1, -8.2, 0.0, 0.0], F)
_START = np.array([[0.0, 0.0], [4.0, 0.0], [4.0, 6.0], [0.0, 6.0]], F)
_END = np.array([[0.5, 0.3], [4.2, -0.4], [3.6, 6.5], [-0.3, 5.8]], F)
_COORDINATES = np.stack([np.linspace(-3.3, 9.7, 12), np.linspace(6.6, -2.4, 12)]).reshape(
    2, 3, 4).astype(F)
_COORDINATES[:, 0, :2] = [[2.5, -0.5], [1.5, 3.5]]  # halves: round to even (tf.round)
# Keras's mirror reads index `size` for coordinates in [size - 1, size + 1), which
# TensorFlow refuses: those are kept out.
_MIRRORED = np.array([[-5.5, -2.25, 0.3, 2.7, 8.1, 9.2, 12.4], [-3.5, -0.2, 1.1, 3.4, 6.3, 7.5,
                                                                   8.6]], F)
_COORDINATES_3D = np.stack([np.linspace(-1.2, 7.1, 10), np.linspace(5.6, -1.1, 10),
                            np.linspace(0.4, 6.3, 10)]).astype(F)

KERAS = {
    "rgb_to_hsv": lambda y: ops.image.rgb_to_hsv(_rgb(y)),
    "rgb_to_hsv:raw": lambda y: ops.image.rgb_to_hsv(y[..., 1:4]),
    "rgb_to_hsv:channels_first": lambda y: ops.image.rgb_to_hsv(
        _chw(_rgb(y)), data_format="channels_first"),
    "rgb_to_hsv:unbatched_channels_first": lambda y: ops.image.rgb_to_hsv(
        ops.transpose(_rgb(y)[1], (2, 0, 1)), data_format="channels_first"),
    "hsv_to_rgb:unbatched": lambda y: ops.image.hsv_to_rgb(y[2, :, :, 2:5] / 100.0),
    "hsv_to_rgb": lambda y: ops.image.hsv_to_rgb(ops.sigmoid(y[..., 3:] / 50.0) * 1.2 - 0.1),
    "hsv_to_rgb:channels_first": lambda y: ops.image.hsv_to_rgb(
        _chw(y[..., :3] / 100.0), data_format="channels_first"),
    "correlate": lambda y: ops.correlate(ops.reshape(y[0], (-1,)), _KERNEL),
    "correlate:same": lambda y: ops.correlate(ops.reshape(y[1], (-1,)), _KERNEL, mode="same"),
    "correlate:full": lambda y: ops.correlate(y[2, 3, 1] / 10.0, y[0, 0, 2] / 10.0, mode="full"),
    "correlate:same_even": lambda y: ops.correlate(y[0, 1, 1, :4], y[1, 2, 3], mode="same"),
    "ssim": lambda y: ops.image.ssim(y, ops.flip(y, 1) * 0.5 + 3.0, max_val=255.0,
                                     filter_size=3),
    "ssim:channels_first": lambda y: ops.image.ssim(
        _chw(y), _chw(ops.flip(y, 2)), filter_size=5, filter_sigma=0.8, k1=0.02,
        data_format="channels_first"),
    "ssim:unbatched": lambda y: ops.image.ssim(y[0], y[1], max_val=100.0, filter_size=3) + 0 * y,
    "scale_and_translate": lambda y: ops.image.scale_and_translate(
        y, (None, 9, 4, 6), [1.3, 0.7], [0.5, -0.25], (1, 2), "bilinear"),
    "scale_and_translate:cubic": lambda y: ops.image.scale_and_translate(
        y, (None, 5, 11, 6), [0.6, 2.1], [-0.4, 1.0], (1, 2), "bicubic", antialias=False),
    "scale_and_translate:lanczos3": lambda y: ops.image.scale_and_translate(
        y, (None, 12, 3, 6), np.array([1.7, 0.5]), np.array([0.0, 0.3]), (1, 2), "lanczos3"),
    "scale_and_translate:lanczos5_channels_first": lambda y: ops.image.scale_and_translate(
        _chw(y), (None, 6, 4, 8), [0.9, 1.6], [0.2, -1.0], (2, 3), "lanczos5"),
    "rearrange": lambda y: ops.rearrange(y[0, :6], "(h h1) w c -> h (w c h1)", h1=2),
    "rearrange:permute": lambda y: ops.rearrange(y[0], "h w c -> c h w"),
    "rearrange:merge": lambda y: ops.rearrange(y[1, :6], "h (w) (c1 c) -> (c w) h c1", c1=2, c=3),
    "affine_transform": lambda y: ops.image.affine_transform(y, _ROTATE),
    "affine_transform:nearest_reflect": lambda y: ops.image.affine_transform(
        y, _STRETCH, interpolation="nearest", fill_mode="reflect"),
    "affine_transform:wrap_projective": lambda y: ops.image.affine_transform(
        y, _PROJECTIVE, fill_mode="wrap"),
    "affine_transform:nearest_fill": lambda y: ops.image.affine_transform(
        _chw(y), _STRETCH[None], interpolation="nearest", fill_mode="nearest",
        data_format="channels_first"),
    "affine_transform:reflect_far": lambda y: ops.image.affine_transform(
        y, _FAR, fill_mode="reflect"),
    "affine_transform:wrap_far_nearest": lambda y: ops.image.affine_transform(
        y, _FAR, interpolation="nearest", fill_mode="wrap"),
    "affine_transform:per_image": lambda y: ops.image.affine_transform(
        y, ops.pad(ops.mean(y, axis=(1, 2)) / 500.0, [[0, 0], [0, 2]]) + _IDENTITY,
        fill_value=-7.5),
    "affine_transform:unbatched_channels_first": lambda y: ops.image.affine_transform(
        _chw(y)[1], _ROTATE, fill_mode="reflect", data_format="channels_first"),
    # A single row: TensorFlow maps every coordinate on it to row 0.
    "affine_transform:one_row_wrap": lambda y: ops.image.affine_transform(
        y[:, :1], _FAR, fill_mode="wrap"),
    "affine_transform:one_row_reflect": lambda y: ops.image.affine_transform(
        y[:, 2:3], _STRETCH, interpolation="nearest", fill_mode="reflect"),
    # Unbatched (H, W, C) whose height is the model's batch: known only when run.
    "affine_transform:unbatched_dynamic": lambda y: ops.image.affine_transform(
        ops.reshape(y[:, 1:4], (-1, 15, 6)), _PROJECTIVE, interpolation="nearest",
        fill_mode="wrap"),
    "perspective_transform:unbatched": lambda y: ops.image.perspective_transform(
        y[2], _START[None], _END[None], interpolation="nearest"),
    "perspective_transform": lambda y: ops.image.perspective_transform(y, _START, _END),
    "perspective_transform:nearest": lambda y: ops.image.perspective_transform(
        _chw(y), _START, _END, interpolation="nearest", fill_value=3.0,
        data_format="channels_first"),
    "map_coordinates": lambda y: ops.image.map_coordinates(
        y[0, :, :, 0], _COORDINATES, 1, fill_value=2.5),
    "map_coordinates:nearest_order0": lambda y: ops.image.map_coordinates(
        y[1, :, :, 2], _COORDINATES, 0, fill_mode="nearest"),
    "map_coordinates:reflect": lambda y: ops.image.map_coordinates(
        y[0, :, :, 3], _COORDINATES, 1, fill_mode="reflect"),
    "map_coordinates:mirror": lambda y: ops.image.map_coordinates(
        y[2, :, :, 1], _MIRRORED, 1, fill_mode="mirror"),
    "map_coordinates:wrap_order0": lambda y: ops.image.map_coordinates(
        y[0, :, :, 4], _COORDINATES, 0, fill_mode="wrap"),
    "map_coordinates:graph_coordinates": lambda y: ops.image.map_coordinates(
        y[0, :, :, 1], ops.stack([y[0, 0, :, 0], y[1, 0, :, 0]]) / 50.0, 1, fill_mode="wrap"),
    "map_coordinates:3d": lambda y: ops.image.map_coordinates(
        y[0], _COORDINATES_3D, 1, fill_value=-1.0),
}
# The warps run on images of any size: two of them on the static 7x5 one too.
STATIC = {*(k for k in KERAS if k.startswith("map_coord")), "affine_transform",
          "perspective_transform",
          "correlate", "correlate:same", "correlate:full", "correlate:same_even", "rearrange",
          "rearrange:permute", "rearrange:merge", "scale_and_translate",
          "scale_and_translate:cubic", "scale_and_translate:lanczos3",
          "scale_and_translate:lanczos5_channels_first"}
MIN_OPSET = {}
TF = {
    "rgb_to_hsv": lambda y: _tf().image.rgb_to_hsv(y[..., :3]),
    "hsv_to_rgb": lambda y: _tf().image.hsv_to_rgb(images=y[..., 3:] / 100.0),
    "ssim": lambda y: _tf().image.ssim(y, _tf().reverse(y, [1]) * 0.5 + 3.0, 255.0,
                                       filter_size=3),
    "ssim:keyword": lambda y: _tf().image.ssim(img1=y / 100.0, img2=y[:, :, ::-1] / 80.0,
                                               max_val=2.0, filter_size=2, filter_sigma=0.7),
}
