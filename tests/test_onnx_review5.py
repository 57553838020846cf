"""Review of issue 17's kernel gaps, float16 lowering and related fixes: wrong graphs found.

Each case is a small Keras 3 model the native exporter wrote wrong with
`check=False`, run in onnxruntime at batch sizes other than the gate's and
compared with Keras exactly (integers) or at the gate's tolerance.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from test_onnx_redteam2 import _session  # noqa: E402
from test_onnx_redteam2 import _traced  # noqa: E402

ops = keras.ops

# --- int64 sums ------------------------------------------------------------------
# onnxruntime's integer `ReduceSum` adds in float64: an int64 sum lost its low
# bits past 2**53 (off by 149 at 1e17) and saturated at the int64 maximum where
# Keras wraps. `ops.trace` sums its int64 diagonal the same way.

INT64_SUMS = {
    "sum": (lambda x: ops.sum(x, axis=1), (4,)),
    "sum_keepdims": (lambda x: ops.sum(x, axis=1, keepdims=True), (None,)),
    "trace": (lambda x: ops.trace(x, axis1=1, axis2=2), (3, 3)),
}


@pytest.mark.parametrize("name", list(INT64_SUMS))
def test_int64_sums_are_exact_and_wrap(name, tmp_path):
    function, shape = INT64_SUMS[name]
    model = _traced(function, shape, "int64")
    session = _session(model, tmp_path)
    rng = np.random.default_rng(7)
    big = 2 ** 62
    for batch, size in ((1, 3), (5, 17)):
        dims = (batch,) + tuple(size if d is None else d for d in shape)
        feed = rng.integers(-big, big, dims, dtype=np.int64)
        feed.flat[0] = np.iinfo(np.int64).max  # the sums of row 0 wrap
        feed.flat[1] = np.iinfo(np.int64).max
        got = session.run(None, {session.get_inputs()[0].name: feed})[0]
        np.testing.assert_array_equal(got, np.asarray(model(feed)))


# --- segment_max / min of float16 data -------------------------------------------------
# An empty segment holds the lowest (highest) value of the data's Keras dtype:
# float16 data (float32 in the graph) got float32's, -3.4e38 for Keras's -65504.

@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("op", ["segment_max", "segment_min"])
def test_empty_segments_of_narrow_floats(op, dtype, tmp_path):
    ids = np.array([0, 0, 2, 3])
    model = _traced(lambda x: ops.cast(getattr(ops, op)(ops.cast(ops.transpose(x), dtype), ids,
                                                         num_segments=5), "float32"), (4,))
    session = _session(model, tmp_path)
    for batch in (1, 5):
        feed = np.random.default_rng(8).uniform(-3, 3, (batch, 4)).astype(np.float32)
        got = session.run(None, {session.get_inputs()[0].name: feed})[0]
        want = np.asarray(model(feed))
        np.testing.assert_array_equal(got[[1, 4]], want[[1, 4]])  # the empty segments
        # (the graph computes in float32: Keras's rounding to `dtype` apart)
        rtol = 2e-3 if dtype == "float16" else 8e-3
        np.testing.assert_allclose(got, want, rtol=rtol)


# --- integer vdot ----------------------------------------------------------------
# Keras multiplies integers of `vdot` in float32, as of matmul and einsum; the
# graph flattened the operands first, after which their dtype was unknown, and
# multiplied them exactly (8e8 where Keras's float32 gives a multiple of 64).

@pytest.mark.parametrize("dtype", ["int32", "int64"])
def test_integer_vdot_is_computed_in_float32(dtype, tmp_path):
    model = _traced(lambda x: ops.vdot(x, ops.flip(x, 0)), (3,), dtype)
    session = _session(model, tmp_path)
    rng = np.random.default_rng(9)
    for batch in (1, 5):
        feed = rng.integers(-2 ** 14, 2 ** 14, (batch, 3)).astype(dtype)
        got = session.run(None, {session.get_inputs()[0].name: feed})[0]
        np.testing.assert_array_equal(got, np.asarray(model(feed)))
