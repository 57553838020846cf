"""Integer data through ops onnxruntime lacks a kernel for, and integer products.

onnxruntime (1.31) has no CPU kernel for an int16 `Max` or `Pad`, a uint32
`CumSum`, a uint16 `ArgMax` or `TopK`, an int16 nearest `Resize` or a
uint32 `Einsum`: each graph below did not load (with `check=False` it was
written anyway). `kernel_gaps` runs them on wider integer casts. Keras 3's
TensorFlow backend multiplies integers in float32 (`matmul`, `einsum`,
`dot`, `inner`, `vdot`), so an int32 product that overflows is its float
product cast back, not the wrapped exact one. Every export is compared with
Keras exactly, at batch sizes other than the gate's, with values near the
dtype's range.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from bnconvert.onnx import kernel_gaps  # noqa: E402
from test_onnx_redteam2 import _session  # noqa: E402
from test_onnx_redteam2 import _traced  # noqa: E402

ops = keras.ops

GAPS = {
    "maximum_int16": (lambda x: ops.maximum(x, ops.cast(3, x.dtype)), "int16"),
    "minimum_uint16": (lambda x: ops.minimum(x, x[:, ::-1]), "uint16"),
    "pad_int16": (lambda x: ops.pad(x, [[0, 0], [1, 2]], constant_values=5), "int16"),
    "cumsum_uint32": (lambda x: ops.cumsum(x, axis=1), "uint32"),
    "argmax_uint16": (lambda x: ops.argmax(x, axis=1), "uint16"),
    "argmin_int16": (lambda x: ops.argmin(x, axis=1), "int16"),
    "argmax_uint32": (lambda x: ops.argmax(x, axis=1), "uint32"),
    "top_k_uint16": (lambda x: ops.top_k(x, 2)[0], "uint16"),
    "einsum_uint32": (lambda x: ops.einsum("bi,bj->bij", x % 3000, x % 3000), "uint32"),
    "resize_int16": (lambda x: ops.image.resize(ops.reshape(x, (-1, 2, 3, 1)), (4, 6),
                                                interpolation="nearest"), "int16"),
    # ONNX itself has no int16 `CumSum` or `ReduceMax`, nor a bool `TopK`.
    "cumsum_int16": (lambda x: ops.cumsum(x, axis=1), "int16"),
    "cumsum_int8": (lambda x: ops.cumsum(x, axis=1), "int8"),
    "max_int16": (lambda x: ops.max(x, axis=1), "int16"),
    "min_uint16": (lambda x: ops.min(x, axis=1), "uint16"),
    "clip_int16": (lambda x: ops.clip(x, -5, 100), "int16"),
    "relu_int16": (lambda x: ops.relu(x), "int16"),
    "where_int16": (lambda x: ops.where(x > 0, x, x[:, ::-1]), "int16"),
    "sort_bool": (lambda x: ops.sort(x, axis=1), "bool"),
}


def _integers(dtype, batch, rng, low=None, high=None):
    if dtype == "bool":
        return rng.integers(0, 2, (batch, 6)).astype(bool)
    info = np.iinfo(dtype)
    low = info.min if low is None else low
    high = info.max if high is None else high
    return rng.integers(low, high, (batch, 6), endpoint=True).astype(dtype)


def _equal_to_keras(model, tmp_path, feeds_of):
    session = _session(model, tmp_path)
    name = session.get_inputs()[0].name
    rng = np.random.default_rng(11)
    for batch in (1, 5):
        x = feeds_of(batch, rng)
        want = np.asarray(model(x))
        got = session.run(None, {name: x})[0]
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("case", GAPS)
def test_integer_ops_without_kernels_run_widened(case, tmp_path):
    function, dtype = GAPS[case]
    model = _traced(function, shape=(6,), dtype=dtype)
    _equal_to_keras(model, tmp_path, lambda batch, rng: _integers(dtype, batch, rng))


def test_float_graphs_are_not_typed_by_the_pass(monkeypatch, tmp_path):
    # The pass must cost nothing where no op lacks a kernel for a type the graph holds.
    def refuse(*args, **kwargs):
        raise AssertionError("type inference ran on a float graph")

    monkeypatch.setattr(kernel_gaps.onnx.shape_inference, "infer_shapes", refuse)
    model = _traced(lambda x: ops.argmax(ops.maximum(x, 0.5), axis=1), shape=(6,))
    _equal_to_keras(model, tmp_path, lambda batch, rng: rng.normal(size=(batch, 6)).astype(
        "float32"))


PRODUCTS = {
    # An outer product has one term per entry: float32's rounding of it is
    # Keras's, and an overflow is float32's cast (the integer minimum here).
    "einsum_outer": lambda x: ops.einsum("bi,bj->bij", x, x),
    "matmul_outer": lambda x: ops.matmul(x[:, :, None], x[:, None, :]),
    "dot_outer": lambda x: ops.dot(x[:, :, None], x[:1, :]),
}


@pytest.mark.parametrize("case", PRODUCTS)
def test_integer_products_are_computed_as_keras_computes_them(case, tmp_path):
    # (int32 only: TensorFlow's cast of an overflowing float to int16 wraps or
    # saturates depending on its kernel's vector path, which no graph can follow.)
    model = _traced(PRODUCTS[case], shape=(6,), dtype="int32")
    _equal_to_keras(model, tmp_path, lambda batch, rng: _integers("int32", batch, rng))


def test_int8_matmul_stays_exact_int32(tmp_path):
    model = _traced(lambda x: ops.matmul(x, ops.transpose(x)), shape=(6,), dtype="int8")
    _equal_to_keras(model, tmp_path, lambda batch, rng: _integers("int8", batch, rng))
