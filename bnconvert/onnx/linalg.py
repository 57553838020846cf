"""`keras.ops.linalg` factorizations and solvers as unrolled ONNX graphs.

ONNX has no Cholesky, LU, QR or triangular solve, so each is written out
over the matrix size, which must be known when exporting and at most
`MAX_SIZE` (the graph grows with it). Each step works on whole rows or
columns of the batched matrix `(..., m, n)`, so a factorization costs
O(n) nodes (about 10-20 per column) and O(n^3) arithmetic, as LAPACK's.

The algorithms are TensorFlow's (Eigen's on CPU), so the answers agree to
float32 rounding, and where TensorFlow has a convention we follow it:

- `cholesky` reads the lower triangle only; a pivot that is not positive
  (Eigen's test) makes the whole factor NaN (where Keras raises from its
  `check_numerics`), and `logdet`, which TensorFlow computes from the
  Cholesky factor, NaN (as TensorFlow's, not the log of `det`);
- `solve_triangular` reads only the triangle it is told;
- `lu_factor`, `solve` and `inv` use partial pivoting that picks the first
  largest magnitude (ArgMax), skip the division for an all-zero column as
  Eigen does, and return the pivots Keras returns (the inverse of
  TensorFlow's row permutation);
- `qr` uses Householder reflections with Eigen's sign (`R[k, k]` has the
  sign opposite to the column's leading entry, and a column whose tail is
  already zero is left alone), so Q and R match, not only their product.
"""

import numpy as np

from bnconvert.onnx.graph import BOOL
from bnconvert.onnx.graph import Uncovered
from bnconvert.onnx.graph import Value
from bnconvert.onnx.math import cast
from bnconvert.onnx.math import constant
from bnconvert.onnx.math import dtype_of
from bnconvert.onnx.math import onnx_dtype
from bnconvert.onnx.math import out_dtype

# Largest matrix side the unrolled graphs are written for.
MAX_SIZE = 32


class Matrices:
    """Node helpers for batched matrices `(..., m, n)` of one float dtype."""

    def __init__(self, g, call, what, dtype=None):
        self.g, self.base, self.what = g, call.base, what
        self.call = call
        self.dtype = np.dtype(dtype or out_dtype(call))

    def tensor(self, v):
        """A Value or constant as `(name, shape)` in the Keras layout and the compute dtype."""
        if isinstance(v, Value):
            v = self.g.keras(v)
            name = cast(self.g, v, dtype_of(self.call, v), str(self.dtype),
                        f"{self.base}/cast").name
            return name, tuple(v.shape)
        array = constant(v).astype(self.dtype)
        return self.g.constant(array, f"{self.base}/operand", self.dtype), array.shape

    def operand(self, v):
        """A matrix operand `(..., m, n)` of known size: `(name, shape)`."""
        name, shape = self.tensor(v)
        if len(shape) < 2 or any(d is None for d in shape[-2:]):
            raise Uncovered([(self.base, self.what, "a matrix whose size is unknown at export")])
        if max(shape[-2:]) > MAX_SIZE:
            raise Uncovered([(self.base, self.what, f"{shape[-2]}x{shape[-1]} matrices (the "
                              f"unrolled graph is written up to {MAX_SIZE})")])
        return name, shape

    def node(self, op_type, *inputs, **attrs):
        return self.g.node(op_type, list(inputs), self.base, **attrs)

    def scalar(self, value):
        return self.g.scalar(value, self.dtype)

    def const(self, array, dtype=None):
        dtype = np.dtype(dtype or self.dtype)
        return self.g.constant(np.asarray(array, dtype), f"{self.base}/const", dtype)

    def take(self, x, axis, start, stop):
        """`x[..., start:stop]` on axis -2 (rows) or -1 (columns)."""
        g = self.g
        return self.node("Slice", x, g.ints([start]), g.ints([stop]), g.ints([axis]))

    def entry(self, x, i, j):
        """`x[..., i:i+1, j:j+1]`."""
        return self.take(self.take(x, -2, i, i + 1), -1, j, j + 1)

    def transpose(self, x, rank):
        return self.node("Transpose", x, perm=list(range(rank - 2)) + [rank - 1, rank - 2])

    def concat(self, parts, axis):
        return parts[0] if len(parts) == 1 else self.node("Concat", *parts, axis=axis)

    def where(self, condition, a, b):
        return self.node("Where", condition, a, b)

    def nan_unless(self, ok, x):
        """`x`, or NaN where the bool `ok` (broadcast) is false."""
        return self.where(ok, x, self.scalar(np.nan))

    def output(self, name, index=0):
        return self.call.out(name, index=index)

    def square(self, v):
        """A square matrix operand: `(name, n, rank)`."""
        name, shape = self.operand(v)
        if shape[-1] != shape[-2]:
            raise Uncovered([(self.base, self.what, f"a {shape[-2]}x{shape[-1]} matrix "
                                                    "(it must be square)")])
        return name, shape[-1], len(shape)

    def reduce_sum(self, x, axis, keepdims=True):
        return self.g.reduce("ReduceSum", x, [axis], keepdims, self.base)

    def mask(self, rows, cols, keep):
        """A bool constant `keep(i, j)` over an `rows x cols` grid."""
        i, j = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        return self.const(keep(i, j), bool)

    def keep(self, mask, x):
        """`x` where the bool `mask` holds, 0 elsewhere (NaN and inf included)."""
        return self.where(mask, x, self.scalar(0.0))


def cholesky_factor(M, a, n):
    """Eigen's LLT from `a`'s lower triangle.

    Returns `(factor, pivots, ok)`: the lower factor `(..., n, n)`, the
    pivots `(..., 1, n)` and a bool `(..., 1, 1)`, true where every pivot
    is positive (Eigen gives up at the first that is not).
    """
    columns, pivots = [], []
    for j in range(n):
        column = M.take(a, -1, j, j + 1)
        if j:
            done = M.concat(columns, -1)
            row = M.take(done, -2, j, j + 1)
            column = M.node("Sub", column, M.reduce_sum(M.node("Mul", done, row), -1))
        pivot = M.take(column, -2, j, j + 1)
        pivots.append(pivot)
        scaled = M.node("Div", column, M.node("Sqrt", pivot))
        columns.append(M.keep(M.mask(n, 1, lambda i, _: i >= j), scaled))
    pivots = M.concat(pivots, -1)
    positive = M.node("Cast", M.node("Greater", pivots, M.scalar(0.0)), to=onnx_dtype(M.dtype))
    ok = M.node("Cast", M.g.reduce("ReduceMin", positive, [-1], True, M.base), to=BOOL)
    return M.concat(columns, -1), pivots, ok


def substitute(M, a, b, n, lower, unit=False):
    """`x` with `a @ x = b`, reading one triangle of `a` (`b` is `(..., n, k)`)."""
    done = None
    for i in (range(n) if lower else range(n - 1, -1, -1)):
        rhs = M.take(b, -2, i, i + 1)
        if done is not None:
            lo, hi = (0, i) if lower else (i + 1, n)
            coefficients = M.take(M.take(a, -2, i, i + 1), -1, lo, hi)
            rhs = M.node("Sub", rhs, M.node("MatMul", coefficients, done))
        if not unit:
            rhs = M.node("Div", rhs, M.entry(a, i, i))
        done = rhs if done is None else M.concat([done, rhs] if lower else [rhs, done], -2)
    return done


def lu_factor_graph(M, a, n):
    """Eigen's partial-pivoting LU.

    Returns `(lu, perm)`: the packed factors and the int64 `(..., n, 1)`
    rows of `a` they factor (`a[perm] = L @ U`).
    """
    index = M.const(np.arange(n).reshape(n, 1), np.int64)
    perm = M.node("Expand", index, M.node("Shape", M.take(a, -1, 0, 1)))
    shape = M.node("Shape", a)
    for k in range(n - 1):
        column = M.node("Abs", M.take(a, -1, k, k + 1))
        candidates = M.where(M.mask(n, 1, lambda i, _: i >= k), column, M.scalar(-1.0))
        # ArgMax takes the first of equal magnitudes, as Eigen's maxCoeff.
        p = M.node("ArgMax", candidates, axis=-2, keepdims=1)
        k_ = M.g.scalar(k, np.int64)
        swap = M.where(M.node("Equal", index, k_), p,
                       M.where(M.node("Equal", index, p), k_, index))
        a = M.node("GatherElements", a, M.node("Expand", swap, shape), axis=-2)
        perm = M.node("GatherElements", perm, swap, axis=-2)
        pivot = M.entry(a, k, k)
        # An all-zero column is not divided (Eigen), so it stays zero.
        safe = M.where(M.node("Equal", pivot, M.scalar(0.0)), M.scalar(1.0), pivot)
        multipliers = M.keep(M.mask(n, 1, lambda i, _: i > k),
                             M.node("Div", M.take(a, -1, k, k + 1), safe))
        row = M.keep(M.mask(1, n, lambda _, j: j > k), M.take(a, -2, k, k + 1))
        a = M.node("Sub", a, M.node("Mul", multipliers, row))
        a = M.where(M.mask(n, n, lambda i, j: (i > k) & (j == k)), multipliers, a)
    return a, perm


def lu_solve(M, a, n, b=None):
    """`a^-1 @ b` (or `a^-1` without `b`) through the LU factors, as Eigen's solve."""
    lu, perm = lu_factor_graph(M, a, n)
    columns = M.const(np.arange(n).reshape(1, n), np.int64)
    rows = M.node("Cast", M.node("Equal", perm, columns), to=onnx_dtype(M.dtype))
    b = rows if b is None else M.node("MatMul", rows, b)
    return substitute(M, lu, substitute(M, lu, b, n, lower=True, unit=True), n, lower=False)


def householder_qr(M, a, m, n, rank):
    """Eigen's HouseholderQR: `(q (..., m, m), r (..., m, n))`."""
    if m < 2:
        raise Uncovered([(M.base, M.what, "a matrix of one row")])
    q, r = None, a
    for k in range(min(m - 1, n)):
        column = M.keep(M.mask(m, 1, lambda i, _: i >= k), M.take(r, -1, k, k + 1))
        lead = M.take(column, -2, k, k + 1)
        tail = M.keep(M.mask(m, 1, lambda i, _: i > k), column)
        tail_sq = M.reduce_sum(M.node("Mul", tail, tail), -2)
        norm = M.node("Sqrt", M.node("Add", M.node("Mul", lead, lead), tail_sq))
        beta = M.where(M.node("Less", lead, M.scalar(0.0)), norm, M.node("Neg", norm))
        v = M.node("Sub", column, M.node("Mul", beta, M.const(np.eye(m, 1, -k))))
        # Eigen leaves a column alone when its tail is below the smallest normal number.
        skip = M.node("LessOrEqual", tail_sq, M.scalar(np.finfo(M.dtype).tiny))
        vtv = M.where(skip, M.scalar(1.0), M.reduce_sum(M.node("Mul", v, v), -2))
        scale = M.where(skip, M.scalar(0.0), M.node("Div", M.scalar(2.0), vtv))
        r = M.node("Sub", r, M.node("Mul", v, M.node("Mul", scale, M.reduce_sum(
            M.node("Mul", v, r), -2))))
        vt = M.transpose(M.node("Mul", v, scale), rank)
        if q is None:
            q = M.node("Sub", M.const(np.eye(m)), M.node("Mul", v, vt))
        else:
            q = M.node("Sub", q, M.node("Mul", M.node("MatMul", q, v), vt))
    return q, M.keep(M.mask(m, n, lambda i, j: j >= i), r)


def vector_rhs(M, a_rank, b):
    """Keras solves for a vector `b` (one rank below `a`) as a one-column matrix."""
    name, shape = M.tensor(b)
    if len(shape) == a_rank - 1:
        return M.node("Unsqueeze", name, M.g.ints([-1], "axes")), True
    return name, False


def vector_out(M, x, vector):
    return M.node("Squeeze", x, M.g.ints([-1], "axes")) if vector else x


def cholesky(g, call, p):
    M = Matrices(g, call, "Cholesky")
    a, n, rank = M.square(p["x"])
    factor, _, ok = cholesky_factor(M, a, n)
    factor = M.nan_unless(ok, factor)
    return [M.output(M.transpose(factor, rank) if p.get("upper") else factor)]


def logdet(g, call, p):
    """TensorFlow's: `2 * sum(log(diag(cholesky(x))))`, NaN off positive-definite matrices."""
    M = Matrices(g, call, "Logdet")
    a, n, _ = M.square(p["x"])
    _, pivots, ok = cholesky_factor(M, a, n)
    logs = M.reduce_sum(M.node("Log", M.node("Sqrt", pivots)), -1)
    total = M.nan_unless(ok, M.node("Mul", logs, M.scalar(2.0)))
    return [M.output(M.g.reduce("ReduceSum", total, [-2, -1], False, M.base))]


def cholesky_inverse(g, call, p):
    """`(L L^T)^-1` from the factor `L` (or `(U^T U)^-1` from `U`), as Keras's TF backend."""
    M = Matrices(g, call, "CholeskyInverse")
    a, n, rank = M.square(p["x"])
    upper = bool(p.get("upper"))
    inverse = substitute(M, a, M.const(np.eye(n)), n, lower=not upper)
    transposed = M.transpose(inverse, rank)
    pair = (inverse, transposed) if upper else (transposed, inverse)
    return [M.output(M.node("MatMul", *pair))]


def solve_triangular(g, call, p):
    M = Matrices(g, call, "SolveTriangular")
    a, n, rank = M.square(p["a"])
    b, vector = vector_rhs(M, rank, p["b"])
    x = substitute(M, a, b, n, lower=bool(p.get("lower")))
    return [M.output(vector_out(M, x, vector))]


def solve(g, call, p):
    M = Matrices(g, call, "Solve")
    a, n, rank = M.square(p["a"])
    b, vector = vector_rhs(M, rank, p["b"])
    return [M.output(vector_out(M, lu_solve(M, a, n, b), vector))]


def inv(g, call, p):
    M = Matrices(g, call, "Inv")
    a, n, _ = M.square(p["x"])
    return [M.output(lu_solve(M, a, n))]


def lu_factor(g, call, p):
    """`(lu, pivots)`: Keras's pivots are the inverse of TensorFlow's row permutation.

    `p["rows"]` (set for `tf.linalg.lu`) gives TensorFlow's permutation as it is.
    """
    M = Matrices(g, call, "LuFactor")
    a, n, rank = M.square(p["x"])
    if rank > 2 and not p.get("rows"):
        raise Uncovered([(call.base, "LuFactor", "a batch of matrices (Keras's TensorFlow "
                                                 "lu_factor fails on one)")])
    lu, perm = lu_factor_graph(M, a, n)
    if p.get("rows"):
        pivots = M.g.reduce("ReduceSum", perm, [-1], False, M.base)
    else:
        rows = M.const(np.arange(n).reshape(n, 1), np.int64)
        hits = M.node("Equal", perm, M.const(np.arange(n).reshape(1, n), np.int64))
        pivots = M.g.reduce("ReduceSum", M.where(hits, rows, M.g.scalar(0, np.int64)), [-2],
                            False, M.base)
    return [M.output(lu), M.output(M.node("Cast", pivots, to=onnx_dtype(out_dtype(call, 1))), 1)]


def qr(g, call, p):
    M = Matrices(g, call, "Qr")
    a, shape = M.operand(p["x"])
    m, n = shape[-2:]
    q, r = householder_qr(M, a, m, n, len(shape))
    if p.get("mode", "reduced") == "reduced":
        k = min(m, n)
        q, r = M.take(q, -1, 0, k), M.take(r, -2, 0, k)
    elif p["mode"] != "complete":
        raise Uncovered([(call.base, "Qr", f"mode={p['mode']!r}")])
    return [M.output(q), M.output(r, 1)]


EMITTERS = {
    "cholesky": cholesky, "cholesky_inverse": cholesky_inverse, "logdet": logdet,
    "solve_triangular": solve_triangular, "solve": solve, "inv": inv, "lu_factor": lu_factor,
    "qr": qr,
}
