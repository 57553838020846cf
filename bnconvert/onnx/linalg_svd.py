"""Singular values as ONNX, and the `keras.ops.linalg` functions built on them.

ONNX has no SVD. The columns of the matrix (of its transpose if it is
wide) are made orthogonal by one-sided Jacobi rotations (Hestenes):
each round rotates `n/2` disjoint column pairs at once (round-robin
order), `n - 1` rounds make a sweep over every pair, and the sweep count
is fixed from `n` (`sweeps`), chosen so that float32 random and
ill-conditioned matrices up to the size limit converge to rounding
(measured against LAPACK on 200 matrices: singular values within 2e-6 of
the largest at n = 16 from 6 sweeps on, against 3e-2 with 4; 7 are run).
Then `A V = W`, with `V` orthogonal and `W`'s columns `s_i u_i`, so:

- `svd(compute_uv=False)`: the column norms, sorted descending;
- `matrix_rank`, `pinv`, `lstsq`: TensorFlow's and Keras's cut-offs on the
  singular values, and `pinv(A) = V diag(1 / s^2) W^T`, which needs no
  singular vector's sign.

`svd` with `compute_uv=True` is refused: the signs of the singular vectors
(and the basis of a null space) are whatever Eigen's divide-and-conquer
produces, with no convention a graph can follow. A graph costs about 30
nodes a round: ~1,400 at n = 8, 3,600 (svd) to 4,500 (pinv) at n = 16
(`MAX_SIZE`).
"""

import math as pymath

import numpy as np

from bnconvert.onnx.graph import Uncovered
from bnconvert.onnx.graph import Value
from bnconvert.onnx.linalg import Matrices
from bnconvert.onnx.linalg import vector_rhs
from bnconvert.onnx.linalg import vector_out
from bnconvert.onnx.math import dtype_of
from bnconvert.onnx.math import onnx_dtype
from bnconvert.onnx.math import out_dtype


# Largest matrix side: a Jacobi graph at n = 32 has ~10,000 nodes and takes
# onnxruntime 30-50 s to load on 2 cores (n = 16: 3,600-4,500 nodes, 4-6 s).
MAX_SIZE = 16


def _matrix(M, x):
    a, shape = M.operand(x)
    if max(shape[-2:]) > MAX_SIZE:
        raise Uncovered([(M.base, M.what, f"{shape[-2]}x{shape[-1]} matrices (singular values "
                          f"are unrolled Jacobi sweeps, written up to {MAX_SIZE})")])
    return a, shape


def sweeps(n):
    """Jacobi sweeps for `n` columns: one more than measured to converge (4 at n = 4, 6 at 16)."""
    return max(1, pymath.ceil(pymath.log2(n))) + 3


def _rounds(n):
    """Round-robin pairings of `n` (even) columns: each pair exactly once per sweep."""
    labels, out = list(range(n)), []
    for _ in range(n - 1):
        out.append((labels[:n // 2], labels[n // 2:][::-1]))
        labels = [labels[0], labels[-1]] + labels[1:-1]
    return out


def jacobi(M, a, n, with_v):
    """Orthogonalizes the `n` columns of `a` (`(..., m, n)`, m >= n).

    Returns `(w, v, order)`: `w = a @ v` with orthogonal columns, `v` (or
    None), and `order`, the original column each of their columns came
    from. An odd `n` gets a zero column, which no rotation touches.
    """
    g = M.g
    if n % 2:
        zero = M.node("Mul", M.take(a, -1, 0, 1), M.scalar(0.0))
        a, n = M.node("Concat", a, zero, axis=-1), n + 1
    v = M.const(np.eye(n)) if with_v else None
    order = list(range(n))
    for _ in range(sweeps(n)):
        for left, right in _rounds(n):
            where = {label: i for i, label in enumerate(order)}
            pick = [g.ints([where[k] for k in side], "columns") for side in (left, right)]
            xp, xq = (M.node("Gather", a, i, axis=-1) for i in pick)
            alpha, beta, gamma = (M.reduce_sum(M.node("Mul", s, t), -2)
                                  for s, t in ((xp, xp), (xq, xq), (xp, xq)))
            # tan of the angle that zeroes gamma (Rutishauser); none where gamma is 0.
            still = M.node("Equal", gamma, M.scalar(0.0))
            zeta = M.node("Div", M.node("Sub", beta, alpha), M.node(
                "Mul", M.scalar(2.0), M.where(still, M.scalar(1.0), gamma)))
            sign = M.where(M.node("Less", zeta, M.scalar(0.0)), M.scalar(-1.0), M.scalar(1.0))
            root = M.node("Sqrt", M.node("Add", M.scalar(1.0), M.node("Mul", zeta, zeta)))
            t = M.node("Div", sign, M.node("Add", M.node("Abs", zeta), root))
            t = M.where(still, M.scalar(0.0), t)
            c = M.node("Reciprocal", M.node("Sqrt", M.node("Add", M.scalar(1.0),
                                                            M.node("Mul", t, t))))
            s = M.node("Mul", c, t)
            a = _rotate(M, xp, xq, c, s)
            if with_v:
                v = _rotate(M, *(M.node("Gather", v, i, axis=-1) for i in pick), c, s)
            order = list(left) + list(right)
    return a, v, order


def _rotate(M, xp, xq, c, s):
    p = M.node("Sub", M.node("Mul", c, xp), M.node("Mul", s, xq))
    q = M.node("Add", M.node("Mul", s, xp), M.node("Mul", c, xq))
    return M.node("Concat", p, q, axis=-1)


def _oriented(M, a, shape):
    """`a`, or its transpose when wide, as `(name, m, n, transposed)` with m >= n."""
    m, n = shape[-2:]
    if m >= n:
        return a, m, n, False
    return M.transpose(a, len(shape)), n, m, True


def _norms(M, w):
    """Column norms `(..., 1, n)`."""
    return M.node("Sqrt", M.reduce_sum(M.node("Mul", w, w), -2))


def singular_values(M, a, shape):
    """The singular values `(..., 1, n)` (padded to even n, unsorted)."""
    a, _, n, _ = _oriented(M, a, shape)
    w, _, _ = jacobi(M, a, n, with_v=False)
    return _norms(M, w)


def pseudo_inverse(M, a, shape, kept):
    """`pinv(a)` `(..., n, m)` keeping the singular values where `kept(s, s_max)` holds."""
    a, m, n, transposed = _oriented(M, a, shape)
    w, v, _ = jacobi(M, a, n, with_v=True)
    s = _norms(M, w)
    keep = kept(s, M.g.reduce("ReduceMax", s, [-1], True, M.base))
    squares = M.node("Mul", s, s)
    scale = M.keep(keep, M.node("Div", M.scalar(1.0), M.where(keep, squares, M.scalar(1.0))))
    rank = len(shape)
    if transposed:  # a = B^T with B V = W: pinv(a) = W diag(1/s^2) V^T
        out = M.node("MatMul", M.node("Mul", w, scale), M.transpose(v, rank))
        return M.take(out, -1, 0, n) if n % 2 else out
    out = M.node("MatMul", M.node("Mul", v, scale), M.transpose(w, rank))
    return M.take(out, -2, 0, n) if n % 2 else out


def svd(g, call, p):
    M = Matrices(g, call, "SVD")
    if p.get("compute_uv", True):
        raise Uncovered([(call.base, "SVD", "compute_uv=True (the singular vectors' signs "
                                            "follow Eigen's algorithm, no convention)")])
    a, shape = _matrix(M, p["x"])
    s = singular_values(M, a, shape)
    k = min(shape[-2:])
    top, _ = M.node("TopK", s, g.ints([k], "k"), axis=-1, largest=1, sorted=1, outputs=2)
    # A reduction over the axis of size 1 drops it at any opset.
    return [M.output(g.reduce("ReduceMax", top, [-2], False, M.base))]


def matrix_rank(g, call, p):
    """TensorFlow's: singular values above `tol`, by default `eps * max(m, n) * s_max`."""
    x = p["x"]
    M = Matrices(g, call, "MatrixRank", dtype_of(call, x) if isinstance(x, Value) else None)
    a, shape = _matrix(M, p["x"])
    s = singular_values(M, a, shape)
    tol = _number(M, p, "tol")
    if tol is None:
        factor = float(np.finfo(M.dtype).eps) * max(shape[-2:])
        tol = M.node("Mul", M.scalar(factor), g.reduce("ReduceMax", s, [-1], True, M.base))
    else:
        tol = M.scalar(tol)
    above = M.node("Cast", M.node("Greater", s, tol), to=onnx_dtype("int64"))
    rank = g.reduce("ReduceSum", above, [-2, -1], False, M.base)
    return [M.output(M.node("Cast", rank, to=onnx_dtype(out_dtype(call))))]


def _number(M, p, key):
    """A cut-off argument as a Python float (None when unset); a tensor is refused."""
    value = p.get(key)
    if isinstance(value, Value):
        raise Uncovered([(M.base, M.what, f"a tensor {key}")])
    return None if value is None else float(value)


def _above(M, op_type, rcond):
    """`kept(s, s_max)` for `pseudo_inverse`: `s <op_type> rcond * s_max`."""
    cut = M.scalar(rcond)
    return lambda s, top: M.node(op_type, s, M.node("Mul", cut, top))


def pinv(g, call, p):
    """TensorFlow's: singular values up to `rcond * s_max` dropped (default `10 max(m, n) eps`)."""
    M = Matrices(g, call, "Pinv")
    a, shape = _matrix(M, p["x"])
    rcond = _number(M, p, "rcond")
    if rcond is None:
        rcond = 10.0 * max(shape[-2:]) * float(np.finfo(M.dtype).eps)
    return [M.output(pseudo_inverse(M, a, shape, _above(M, "Greater", rcond)))]


def lstsq(g, call, p):
    """Keras's: singular values below `rcond * s_max` (default `eps * max(m, n)`) dropped."""
    M = Matrices(g, call, "Lstsq")
    a, shape = _matrix(M, p["a"])
    rcond, eps = _number(M, p, "rcond"), float(np.finfo(M.dtype).eps)
    rcond = eps * max(shape) if rcond is None else (eps if rcond < 0 else rcond)
    inverse = pseudo_inverse(M, a, shape, _above(M, "GreaterOrEqual", rcond))
    b, vector = vector_rhs(M, len(shape), p["b"])
    return [M.output(vector_out(M, M.node("MatMul", inverse, b), vector))]


EMITTERS = {"svd": svd, "matrix_rank": matrix_rank, "pinv": pinv, "lstsq": lstsq}
