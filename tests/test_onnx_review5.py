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
