"""`keras.ops.ctc_loss` as ONNX: the CTC forward recursion, unrolled in time.

The emitter is `emit(g, call, p)` as in `math`. For logits `(batch, T, C)`
with a known number of steps `T` and classes `C`, labels `(batch, L)` and
per-sample lengths, the loss is `-log p(labels | logits)` as TensorFlow's
`ctc_loss` computes it with `blank_index = mask_index`:

- log-probabilities `log_softmax(logits)`; the labels extended to
  `z = (blank, l1, blank, l2, ..., blank)` of length `S = 2L + 1`, and the
  log-probability of each `z[s]` at each step (`GatherElements`);
- `alpha_0 = (e_0[0], e_0[1], -inf, ...)`, then for each step `t < T`
  `alpha_t[s] = logsumexp(alpha[s], alpha[s-1], alpha[s-2] if z[s] is a
  label other than z[s-2]) + e_t[s]`, left unchanged once `t` reaches the
  sample's output length;
- the loss `-logsumexp(alpha[2 len], alpha[2 len - 1])` -- and, as in
  TensorFlow, the other states' `alpha` weighted by 1e-307, which decides
  the (large, finite) loss of a label no path can produce.

Impossible states are `-inf` (also in a float16 graph); the log-sum-exp
subtracts 0 rather than a maximum of `-inf`, so they never make a NaN.
"""

import numpy as np

from bnconvert.onnx.graph import Uncovered
from bnconvert.onnx.graph import Value
from bnconvert.onnx.math import onnx_dtype
from bnconvert.onnx.math import out_dtype

NEG = float("-inf")
LOG_FLOOR = float(np.float32(np.log(1e-307)))
INT64 = onnx_dtype("int64")


def _tensor(g, call, value, what):
    """An operand in the Keras layout, as a `Value` (constants become initializers)."""
    if isinstance(value, Value):
        return g.keras(value)
    array = np.asarray(value.numpy() if hasattr(value, "numpy") else value)
    return Value(g.constant(array, f"{call.base}/{what}", array.dtype), array.shape,
                 tuple(range(array.ndim)))


def _int64(g, value, base):
    return g.node("Cast", [value.name], base, to=INT64)


def _shift(g, name, by, size, base):
    """`name[:, s - by]` along the last axis (of known `size`), `NEG` where s < by."""
    head = g.node("Slice", [name, g.ints([0]), g.ints([size - by]), g.ints([1])], base)
    return g.node("Pad", [head, g.ints([0, by, 0, 0], "pads"), g.scalar(NEG)], base)


def _logsumexp(g, names, base):
    top = g.node("Max", names, base)
    # All -inf: subtract 0 instead, so that the sum is 0 and its log -inf, not NaN.
    # (Below float16's range rather than IsInf, which onnxruntime lacks for float16.)
    top = g.node("Where", [g.node("Less", [top, g.scalar(-65000.0)], base), g.scalar(0.0), top],
                 base)
    total = g.node("Sum", [g.node("Exp", [g.node("Sub", [n, top], base)], base) for n in names],
                   base)
    return g.node("Add", [top, g.node("Log", [total], base)], base)


def _extended(g, labels, blank, base):
    """`(blank, l1, blank, ..., lL, blank)` for int64 labels `(batch, L)`."""
    blanks = g.node("Add", [g.node("Mul", [labels, g.scalar(0, np.int64)], base),
                            g.scalar(blank, np.int64)], base)
    pairs = g.node("Concat", [g.node("Unsqueeze", [n, g.ints([2], "axes")], base)
                              for n in (blanks, labels)], base, axis=2)
    flat = g.node("Reshape", [pairs, g.ints([0, -1])], base)
    first = g.node("Slice", [blanks, g.ints([0]), g.ints([1]), g.ints([1])], base)
    return g.node("Concat", [flat, first], base, axis=1)


def ctc_loss(g, call, p):
    output = _tensor(g, call, p["output"], "output")
    target = _tensor(g, call, p["target"], "target")
    if output.rank != 3 or target.rank != 2 or None in output.shape[1:] + target.shape[1:]:
        raise Uncovered([(call.base, "CTCLoss", "logits (batch, steps, classes) and labels "
                          "(batch, length) of known steps, classes and length")])
    if out_dtype(call) != "float32":
        raise Uncovered([(call.base, "CTCLoss", f"a {out_dtype(call)} result")])
    steps, classes = output.shape[1:]
    size = 2 * target.shape[1] + 1
    blank = int(p.get("mask_index") or 0) % classes
    base = call.base
    logp = g.node("LogSoftmax", [output.name], base, axis=-1)
    z = _extended(g, _int64(g, target, base), blank, base)
    index = g.node("Expand", [g.node("Unsqueeze", [z, g.ints([1], "axes")], base),
                              g.ints([1, steps, 1])], base)
    emissions = g.node("GatherElements", [logp, index], base, axis=2)
    before = g.node("Slice", [z, g.ints([0]), g.ints([size - 2]), g.ints([1])], base)
    before = g.node("Pad", [before, g.ints([0, 2, 0, 0], "pads"), g.scalar(-1, np.int64)], base)
    skip = g.node("And", [g.node("Not", [g.node("Equal", [z, before], base)], base),
                          g.node("Not", [g.node("Equal", [z, g.scalar(blank, np.int64)], base)],
                                 base)], base)
    lengths = _int64(g, _tensor(g, call, p["output_length"], "output_length"), base)
    lengths = g.node("Unsqueeze", [lengths, g.ints([1], "axes")], base)

    def step(t):
        return g.node("Squeeze", [g.node("Slice", [emissions, g.ints([t]), g.ints([t + 1]),
                                                   g.ints([1])], base), g.ints([1], "axes")],
                      base)

    start = np.full(size, NEG, np.float32)
    start[:2] = 0.0
    alpha = g.node("Add", [step(0), g.constant(start, f"{base}/start")], base)
    for t in range(1, steps):
        skipped = g.node("Where", [skip, _shift(g, alpha, 2, size, base), g.scalar(NEG)], base)
        new = g.node("Add", [_logsumexp(g, [alpha, _shift(g, alpha, 1, size, base), skipped],
                                        base), step(t)], base)
        running = g.node("Less", [g.scalar(t, np.int64), lengths], base)
        alpha = g.node("Where", [running, new, alpha], base)
    label_lengths = _int64(g, _tensor(g, call, p["target_length"], "target_length"), base)
    end = g.node("Unsqueeze", [g.node("Mul", [label_lengths, g.scalar(2, np.int64)], base),
                               g.ints([1], "axes")], base)
    # Final states weigh 1, the others TensorFlow's floor 1e-307 (no effect
    # unless no path reaches a final state).
    states = g.constant(np.arange(size, dtype=np.int64), f"{base}/states", np.int64)
    gap = g.node("Sub", [end, states], base)
    final = g.node("And", [g.node("GreaterOrEqual", [gap, g.scalar(0, np.int64)], base),
                           g.node("LessOrEqual", [gap, g.node("Min", [end, g.scalar(
                               1, np.int64)], base)], base)], base)
    weighted = g.node("Add", [alpha, g.node("Where", [final, g.scalar(0.0), g.scalar(LOG_FLOOR)],
                                            base)], base)
    top = g.reduce("ReduceMax", weighted, [1], True, base)
    total = g.reduce("ReduceSum", g.node("Exp", [g.node("Sub", [weighted, top], base)], base),
                     [1], False, base)
    top = g.node("Squeeze", [top, g.ints([1], "axes")], base)
    loss = g.node("Neg", [g.node("Add", [top, g.node("Log", [total], base)], base)], base)
    return [call.out(loss)]


EMITTERS = {"ctc_loss": ctc_loss}
