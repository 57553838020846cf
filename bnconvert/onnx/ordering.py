"""`keras.ops.searchsorted` and `argpartition` as ONNX.

Emitters are `emit(g, call, p)` as in `math`.

- `searchsorted(sequence, values, side)` with a 1-D sequence of known
  length `n` (a constant or a tensor of the graph): the insertion index of
  a value is how many entries lie below it (`side="left"`: `entry < v`) or
  not above it (`"right"`: `not v < entry`, so that a NaN value goes last
  as in TensorFlow), a comparison against all `n` entries summed over them.
  It equals the binary search for a sorted sequence, as Keras requires;
  values keep their layout.
- `argpartition(x, kth, axis)` is what Keras's TensorFlow backend computes,
  which is deterministic: on `x` cast to int32 with the axis moved last,
  the `kth + 1` smallest entries' indices (`TopK` of `-x`), then the
  largest `n - kth - 1` indices of `x` after zeroing the entries that a
  `one_hot` of the first indices, summed over axis 0, marks -- a mask of
  shape `x.shape[1:-1] + (kth + 1, n)` scattered from the origin of `x`
  (for a 1-D `x`, the first indices themselves; for a matrix, the first
  `kth + 1` rows at the columns any row chose). TensorFlow refuses the
  mask where it does not fit in `x`; so does the export, for known sizes.
"""

import numpy as np

from bnconvert.onnx.graph import Uncovered
from bnconvert.onnx.graph import Value
from bnconvert.onnx.math import cast
from bnconvert.onnx.math import common_dtype
from bnconvert.onnx.math import constant
from bnconvert.onnx.math import dtype_of
from bnconvert.onnx.math import onnx_dtype
from bnconvert.onnx.math import out_dtype


def searchsorted(g, call, p):
    sequence, values = p["sorted_sequence"], p["values"]
    if not isinstance(values, Value):
        raise Uncovered([(call.base, "SearchSorted", "constant values")])
    side = str(p.get("side", "left"))
    if side not in ("left", "right"):
        raise Uncovered([(call.base, "SearchSorted", f"side={side!r}")])
    dtype = common_dtype(call, [sequence, values])
    if isinstance(sequence, Value):
        if sequence.rank != 1 or sequence.shape[0] is None:
            raise Uncovered([(call.base, "SearchSorted", "a sequence not 1-D of known length")])
        entries = cast(g, sequence, dtype_of(call, sequence), dtype, call.base).name
    else:
        array = constant(sequence)
        if array.ndim != 1:
            raise Uncovered([(call.base, "SearchSorted", "a sequence that is not 1-D")])
        entries = g.constant(array, f"{call.base}/sequence", np.dtype(dtype))
    v = cast(g, values, dtype_of(call, values), dtype, call.base)
    column = g.node("Unsqueeze", [v.name, g.ints([v.rank], "axes")], call.base)
    if side == "left":
        below = g.node("Less", [entries, column], call.base)
    else:
        below = g.node("Not", [g.node("Less", [column, entries], call.base)], call.base)
    counts = g.node("Cast", [below], call.base, to=onnx_dtype("int64"))
    index = g.reduce("ReduceSum", counts, [v.rank], False, call.base)
    result = g.node("Cast", [index], call.base, to=onnx_dtype(out_dtype(call)))
    return [call.out(result, v.perm)]


def _swap_last(g, name, rank, axis, base):
    if axis == rank - 1:
        return name
    perm = list(range(rank))
    perm[axis], perm[-1] = perm[-1], perm[axis]
    return g.node("Transpose", [name], base, perm=perm)


def _top_k(g, name, k, largest, base):
    _, index = g.node("TopK", [name, g.ints([k], "k")], base, outputs=2, axis=-1,
                      largest=int(largest), sorted=1)
    return index


def argpartition(g, call, p):
    x = g.keras(p["x"])
    kth = p["kth"]
    if isinstance(kth, Value) or np.ndim(constant(kth)):
        raise Uncovered([(call.base, "Argpartition", "kth not a number")])
    name = g.node("Cast", [x.name], call.base, to=onnx_dtype("int32"))
    shape, axis = list(x.shape), p.get("axis", -1)
    if axis is None:
        if None in shape:
            raise Uncovered([(call.base, "Argpartition", "axis=None on an unknown size")])
        name = g.node("Reshape", [name, g.ints([-1])], call.base)
        shape, axis = [int(np.prod(shape))], 0
    axis = int(axis) % len(shape)
    rank = len(shape)
    name = _swap_last(g, name, rank, axis, call.base)
    shape[axis], shape[-1] = shape[-1], shape[axis]
    n = shape[-1]
    if n is None:
        raise Uncovered([(call.base, "Argpartition", "an axis of unknown size")])
    k = min(max(int(constant(kth)), 0), n - 1)
    mask_shape = (shape[:-1] + [k + 1, n])[1:]
    if any(m is not None and s is not None and m > s for m, s in zip(mask_shape, shape)):
        raise Uncovered([(call.base, "Argpartition", f"Keras's TensorFlow backend fails here "
                                                     f"(its mask {mask_shape} exceeds {shape})")])
    negated = g.node("Neg", [name], call.base)
    bottom = _top_k(g, negated, k + 1, True, call.base)
    parts = [bottom]
    if n - k - 1 > 0:
        hot = g.node("OneHot", [bottom, g.ints([n], "depth"),
                                g.constant(np.array([0.0, 1.0], np.float32),
                                           f"{call.base}/values")], call.base, axis=-1)
        mask = g.reduce("ReduceSum", hot, [0], False, call.base)
        gap = g.node("Sub", [g.node("Shape", [name], call.base),
                             g.node("Shape", [mask], call.base)], call.base)
        pads = g.node("Concat", [g.ints([0] * rank, "pads"), gap], call.base, axis=0)
        mask = g.node("Pad", [mask, pads], call.base)
        chosen = g.node("Greater", [mask, g.scalar(0.0)], call.base)
        rest = g.node("Where", [chosen, g.scalar(0, np.int32), name], call.base)
        parts.append(_top_k(g, rest, n - k - 1, True, call.base))
    out = g.node("Concat", parts, call.base, axis=-1) if len(parts) > 1 else parts[0]
    out = _swap_last(g, out, rank, axis, call.base)
    return [call.out(g.node("Cast", [out], call.base, to=onnx_dtype(out_dtype(call))))]


EMITTERS = {"searchsorted": searchsorted, "argpartition": argpartition}
