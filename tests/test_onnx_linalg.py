"""The unrolled `keras.ops.linalg` emitters at their size limits, and what they refuse.

The conformance matrix (tests/test_onnx_ops_conformance.py) checks every
linalg emitter against Keras on 3x3 to 5x5 matrices; here the largest
sizes each emitter accepts are checked against NumPy in float64 (LAPACK's
Householder QR has Eigen's signs, so Q and R are compared as they are),
and sizes or arguments it does not handle must be refused by name.
"""

import keras
import numpy as np
import onnxruntime as ort
import pytest

from bnconvert import flavour as flavour_lib
from bnconvert.onnx import linalg
from bnconvert.onnx import linalg_svd
from bnconvert.onnx import walk
from bnconvert.onnx.graph import Uncovered

ops = keras.ops


def _run(fn, x, outputs=1):
    inp = keras.Input(x.shape[1:])
    model = keras.Model(inp, fn(inp))
    names = [f"out{i}" for i in range(outputs)]
    proto = walk.emit(model, flavour_lib.flavour_of(model), ["input"], names, 17)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x}), len(proto.graph.node)


def _matrices(n, m=None, batch=2, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, m or n, n)).astype("float32")


def test_factorizations_at_the_size_limit_match_numpy():
    n = linalg.MAX_SIZE
    x = _matrices(n)
    wide = x.astype(np.float64)
    (q, r), nodes = _run(lambda a: list(ops.qr(a)), x, outputs=2)
    want_q, want_r = np.linalg.qr(wide)
    np.testing.assert_allclose(q, want_q, atol=5e-5)
    np.testing.assert_allclose(r, want_r, atol=5e-5 * np.abs(want_r).max())
    assert nodes < 40 * n, nodes
    eye = np.eye(n, dtype="float32")
    spd = np.einsum("bij,bkj->bik", wide, wide) + n * eye
    (chol, solved), nodes = _run(lambda a: [
        ops.cholesky(ops.matmul(a, ops.transpose(a, (0, 2, 1))) + n * eye),
        ops.solve(a + 8.0 * eye, a)], x, outputs=2)
    np.testing.assert_allclose(chol, np.linalg.cholesky(spd), atol=1e-5 * np.sqrt(n))
    np.testing.assert_allclose(solved, np.linalg.solve(wide + 8.0 * eye, wide), atol=1e-4)


@pytest.mark.slow
def test_singular_values_at_the_size_limit_match_numpy():
    """The fixed Jacobi sweep count is enough at the largest size accepted (~10 s)."""
    n = linalg_svd.MAX_SIZE
    # Singular values spread over five decades.
    x = (_matrices(n) * np.logspace(0, -5, n, dtype="float32")).astype("float32")
    (s, pinv), _ = _run(lambda a: [ops.svd(a, compute_uv=False),
                                   ops.pinv(a[:, :, : n // 4])], x, outputs=2)
    want = np.linalg.svd(x.astype(np.float64), compute_uv=False)
    gap = np.abs(s - want) / want[:, :1]
    assert gap.max() < 3e-6, gap.max()
    np.testing.assert_allclose(pinv, np.linalg.pinv(x[:, :, : n // 4].astype(np.float64)),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fn, shape, match", [
    (ops.inv, (33, 33), "33x33 matrices"),
    (lambda a: ops.svd(a, compute_uv=False), (17, 3), "17x3 matrices"),
    (lambda a: ops.svd(a)[1], (4, 4), "compute_uv=True"),
    (lambda a: ops.lu_factor(a)[0], (4, 4), "a batch of matrices"),
    (ops.matrix_rank, (None, 4), "size is unknown"),
])
def test_refused_by_name(fn, shape, match):
    inp = keras.Input(shape)
    model = keras.Model(inp, fn(inp))
    with pytest.raises(Uncovered, match=match):
        walk.emit(model, flavour_lib.flavour_of(model), ["input"], ["out"], 17)
