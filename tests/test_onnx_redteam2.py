"""Second attacker's pass on the native exporter (issue 17): wrong graphs the gate misses.

Each case is a small hand-written Keras 3 model that the native exporter wrote
wrong with `check=False` (the gate, at batch 2 and unknown sizes 32, may catch
it or not), reduced to what broke. Every export is run in onnxruntime at sizes
other than the gate's (batches 1 and 5, unknown sizes 1, 3 and 17, values up
to 1e3 of either sign) and compared with the Keras model's own outputs.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import pytest  # noqa: E402

from bnconvert import export_onnx  # noqa: E402
from test_onnx_redteam import _keras  # noqa: E402

L = keras.layers
ops = keras.ops
ATOL, RTOL = 1e-5, 1e-4
SIZES = ((1, 3), (5, 17), (2, 1))  # (batch, unknown size)


def _feeds(model, batch, size, scale, rng):
    feeds = []
    for t in model.inputs:
        shape = (batch,) + tuple(size if d is None else d for d in t.shape[1:])
        feeds.append((rng.uniform(-1, 1, shape) * scale).astype(str(t.dtype)))
    return feeds


def _matches_at_other_sizes(model, tmp_path, sizes=SIZES, **kwargs):
    """Exports `model` natively, unchecked; onnxruntime matches Keras at `sizes`."""
    path = tmp_path / "m.onnx"
    assert export_onnx(model, path, exporter="native", check=False, **kwargs).exporter == "native"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(4)
    for batch, size in sizes:
        for scale in (3.0, 1e3):
            feeds = _feeds(model, batch, size, scale, rng)
            got = session.run(None, dict(zip([i.name for i in session.get_inputs()], feeds)))
            want = _keras(model, feeds)
            assert len(got) == len(want)
            for g, w in zip(got, want):
                assert g.shape == w.shape, (batch, size)
                rms = float(np.sqrt(np.mean(np.square(w)))) if w.size else 0.0
                np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=RTOL,
                                           atol=ATOL * max(1.0, rms))


def _traced(function, shape=(None, 4)):
    """A model of one custom layer whose `call` is `function`."""
    class Custom(L.Layer):
        def call(self, x):
            return function(x)

    x = keras.Input(shape)
    return keras.Model(x, Custom()(x))


# --- ops.take ----------------------------------------------------------------
# A scalar index (a number, or a size computed in the graph, held there as [1])
# kept its axis; a Gather of a Range with negative entries was read by
# onnxruntime's Gather-to-Slice rewrite as slice bounds and came out empty.

TAKES = {
    "negative_number": lambda x: ops.take(x, -1, axis=1),
    "last_by_size": lambda x: ops.take(x, ops.shape(x)[1] - 1, axis=1),
    "reversed_range": lambda x: ops.take(x, ops.arange(ops.shape(x)[1] - 1, -1, -1), axis=1),
    "negative_range": lambda x: ops.take(x, ops.arange(-ops.shape(x)[1], 0), axis=1),
}


@pytest.mark.parametrize("name", list(TAKES))
def test_take_of_scalars_and_ranges(name, tmp_path):
    _matches_at_other_sizes(_traced(TAKES[name]), tmp_path)
