"""`keras.ops` losses and metrics as ONNX: cross-entropies, PSNR, in_top_k.

Emitters are `emit(g, call, p)` as in `math`, written as Keras's TensorFlow
backend computes them: probabilities are clipped to `[1e-7, 1 - 1e-7]`
before the logarithm, categorical outputs are renormalized to sum to 1,
and the from-logits forms use the stable `max(x, 0) - x z + log1p(exp(-|x|))`
and log-softmax.
"""

import numpy as np

from bnconvert.onnx.graph import Uncovered
from bnconvert.onnx.graph import Value
from bnconvert.onnx.math import aligned
from bnconvert.onnx.math import cast
from bnconvert.onnx.math import dtype_of
from bnconvert.onnx.math import onnx_dtype
from bnconvert.onnx.math import out_dtype

EPSILON = 1e-7


def _clipped_log(g, name, base):
    return g.node("Log", [g.node("Clip", [name, g.scalar(EPSILON), g.scalar(1.0 - EPSILON)],
                                 base)], base)


def binary_crossentropy(g, call, p):
    (t, x), ref = aligned(g, call, [p["target"], p["output"]], out_dtype(call))
    base = call.base
    if p.get("from_logits"):
        relu = g.node("Relu", [x], base)
        soft = g.node("Log", [g.node("Add", [g.node("Exp", [g.node("Neg", [g.node(
            "Abs", [x], base)], base)], base), g.scalar(1.0)], base)], base)
        name = g.node("Add", [g.node("Sub", [relu, g.node("Mul", [x, t], base)], base), soft],
                      base)
        return [call.out(name, ref.perm)]
    clipped = g.node("Clip", [x, g.scalar(EPSILON), g.scalar(1.0 - EPSILON)], base)
    log_p = g.node("Log", [clipped], base)
    log_q = g.node("Log", [g.node("Sub", [g.scalar(1.0), clipped], base)], base)
    rest = g.node("Sub", [g.scalar(1.0), t], base)
    total = g.node("Add", [g.node("Mul", [t, log_p], base), g.node("Mul", [rest, log_q], base)],
                   base)
    return [call.out(g.node("Neg", [total], base), ref.perm)]


def _log_probabilities(g, call, x, axis, from_logits):
    """log p along Keras `axis` of the aligned `x` (a `Value`)."""
    a = x.physical(axis)
    if from_logits:
        return g.node("LogSoftmax", [x.name], call.base, axis=a)
    total = g.reduce("ReduceSum", x.name, [a], True, call.base)
    return _clipped_log(g, g.node("Div", [x.name, total], call.base), call.base)


def _kept(x, axis):
    kept = [k for k in x.perm if k != axis]
    return [sorted(kept).index(k) for k in kept]


def categorical_crossentropy(g, call, p):
    (t, x), ref = aligned(g, call, [p["target"], p["output"]], out_dtype(call))
    axis = int(p.get("axis", -1)) % ref.rank
    x = Value(x, ref.shape, ref.perm)
    log_p = _log_probabilities(g, call, x, axis, p.get("from_logits"))
    total = g.reduce("ReduceSum", g.node("Mul", [t, log_p], call.base), [x.physical(axis)],
                     False, call.base)
    return [call.out(g.node("Neg", [total], call.base), _kept(x, axis))]


def sparse_categorical_crossentropy(g, call, p):
    output = g.keras(p["output"])
    if int(p.get("axis", -1)) % output.rank != output.rank - 1:
        raise Uncovered([(call.base, "SparseCategoricalCrossentropy", "axis other than -1")])
    target = g.keras(p["target"])
    labels = cast(g, target, dtype_of(call, p["target"]), "int64", f"{call.base}/cast").name
    if target.rank == output.rank:
        labels = g.node("Squeeze", [labels, g.ints([-1], "axes")], call.base)
    if not p.get("from_logits"):
        output = Value(_clipped_log(g, output.name, call.base), output.shape, output.perm)
    log_p = g.node("LogSoftmax", [output.name], call.base, axis=-1)
    picked = g.node("GatherElements", [log_p, g.node("Unsqueeze", [labels, g.ints(
        [-1], "axes")], call.base)], call.base, axis=output.rank - 1)
    name = g.node("Neg", [g.node("Squeeze", [picked, g.ints([-1], "axes")], call.base)],
                  call.base)
    return [call.out(name)]


def psnr(g, call, p):
    (a, b), ref = aligned(g, call, [p["x1"], p["x2"]], out_dtype(call))
    d = g.node("Sub", [a, b], call.base)
    mse = g.reduce("ReduceMean", g.node("Mul", [d, d], call.base), list(range(ref.rank)), False,
                   call.base)
    ten_log10_mse = g.node("Mul", [g.node("Log", [mse], call.base),
                                   g.scalar(10.0 / np.log(10.0))], call.base)
    peak = 20.0 * np.log10(float(np.asarray(p["max_val"])))
    return [call.out(g.node("Sub", [g.scalar(peak), ten_log10_mse], call.base), ())]


def in_top_k(g, call, p):
    """Whether each target's score reaches the k-th largest (ties count as in)."""
    scores = g.keras(p["predictions"])
    k = int(p["k"])
    targets = g.keras(p["targets"])
    labels = cast(g, targets, dtype_of(call, p["targets"]), "int64", f"{call.base}/cast").name
    picked = g.node("GatherElements", [scores.name, g.node("Unsqueeze", [labels, g.ints(
        [-1], "axes")], call.base)], call.base, axis=1)
    top, _ = g.node("TopK", [scores.name, g.ints([k], "k")], call.base, outputs=2, axis=1)
    kth = g.node("Slice", [top, g.ints([k - 1], "starts"), g.ints([k], "ends"),
                           g.ints([1], "axes")], call.base)
    name = g.node("GreaterOrEqual", [picked, kth], call.base)
    name = g.node("Squeeze", [name, g.ints([1], "axes")], call.base)
    return [call.out(g.node("Cast", [name], call.base, to=onnx_dtype(out_dtype(call))))]


EMITTERS = {
    "binary_crossentropy": binary_crossentropy,
    "categorical_crossentropy": categorical_crossentropy,
    "sparse_categorical_crossentropy": sparse_categorical_crossentropy,
    "psnr": psnr, "in_top_k": in_top_k,
}
