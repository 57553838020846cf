"""What the image-warp and filter emitters refuse: named, never a wrong graph.

The numbers of what they do translate are checked against Keras in
tests/test_onnx_ops_conformance.py (cases in tests/onnx_ops_cases_image.py).
"""

import keras
import numpy as np
import pytest

from bnconvert import flavour as flavour_lib
from bnconvert.onnx import walk
from bnconvert.onnx.graph import Uncovered

ops = keras.ops
_POINTS = np.array([[0.0, 0.0], [4.0, 0.0], [4.0, 6.0], [0.0, 6.0]], "float32")


def _emit(model):
    return walk.emit(model, flavour_lib.flavour_of(model), ["input"], ["out"], 13)


@pytest.mark.parametrize("fn, match", [
    (lambda y: ops.image.affine_transform(y, np.eye(3).reshape(-1)[:8], fill_mode="mirror"),
     "fill_mode='mirror'"),
    (lambda y: ops.image.perspective_transform(y, _POINTS, y[0, 0, :4, :2] / 100.0 + _POINTS),
     "points computed in the graph"),
    (lambda y: ops.image.scale_and_translate(
        y, (None, 9, 4, 6), y[0, 0, 0, :2], [0.0, 0.0], (1, 2), "linear"),
     "a scale computed in the graph"),
    (lambda y: ops.image.map_coordinates(y, np.zeros((4, 3), "float32"), 1),
     "inputs of unknown shape"),
    # Keras's symbolic call accepts it; its TensorFlow backend does not.
    (lambda y: ops.image.affine_transform(y, np.eye(3).reshape(-1)[:8],
                                          interpolation="bicubic"), "interpolation='bicubic'"),
])
def test_refused_by_name(fn, match):
    x = keras.Input((7, 5, 6))
    model = keras.Model(x, fn(x))
    with pytest.raises(Uncovered, match=match):
        _emit(model)


def test_identical_images_have_ssim_one():
    """SSIM of an image with itself is 1 in the exported graph (a reference outside Keras)."""
    import onnxruntime as ort

    x = keras.Input((8, 6, 3))
    model = keras.Model(x, ops.image.ssim(x, x * 1.0, max_val=255.0, filter_size=5))
    proto = _emit(model)
    data = np.random.default_rng(0).uniform(0, 255, (2, 8, 6, 3)).astype("float32")
    (got,) = ort.InferenceSession(proto.SerializeToString(),
                                  providers=["CPUExecutionProvider"]).run(None, {"input": data})
    np.testing.assert_allclose(got, np.ones(2), atol=1e-5)
