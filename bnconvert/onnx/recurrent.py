"""Recurrent layers as ONNX `LSTM`, `GRU` and `RNN` nodes.

Keras keeps an LSTM's four gates as `i, f, c, o` blocks of its kernels
`(input, 4 units)`; ONNX wants `W[dir, 4 hidden, input]` in the order
`i, o, f, c`, so the blocks are reordered and transposed once, on the
weights. GRU gates are `z, r, h` on both sides; Keras's `reset_after=True`
(two bias rows) is ONNX's `linear_before_reset=1`. ONNX runs time first:
the input is transposed to `[steps, batch, features]` and back.

Keras skips a masked step: its states carry over. So each row's kept
steps are moved first, in order (a `TopK` of distinct keys and a gather),
the ONNX node runs over them with `sequence_lens` their count, and the
outputs go back to their steps; a masked step repeats the output before it
(in the order the layer ran), zeros before any kept step or with
`zero_output_for_mask` (which Bidirectional sets when it returns sequences).
Any mask is followed this way, left padding and holes included.

Bidirectional runs its two layers as two ONNX nodes, the backward one in
ONNX's `reverse` direction, which already aligns its outputs with the input
steps (the order Keras flips them back to).
"""

import numpy as np

from bnconvert.onnx.activations import name_of
from bnconvert.onnx.attention import arguments
from bnconvert.onnx.graph import BOOL
from bnconvert.onnx.graph import Uncovered
from bnconvert.onnx.layers import weights

INT32 = 6
INT64 = 7
_GATES = {"LSTM": 4, "GRU": 3, "SimpleRNN": 1}
_ONNX_OP = {"LSTM": "LSTM", "GRU": "GRU", "SimpleRNN": "RNN"}
_ACTIVATIONS = {"tanh": "Tanh", "sigmoid": "Sigmoid", "relu": "Relu", "softsign": "Softsign",
                "softplus": "Softplus"}


def _kind(layer):
    """`LSTM`, `GRU` or `SimpleRNN`: the kind of the layer's cell (None for other cells)."""
    name = type(getattr(layer, "cell", None)).__name__.replace("Cell", "")
    return name if name in _GATES else None


class _Step:
    """One cell of a `StackedRNNCells`, standing for a layer in `run_direction`."""

    def __init__(self, cell, layer):
        self.cell = cell
        self.name = layer.name
        self.zero_output_for_mask = getattr(layer, "zero_output_for_mask", False)


def _cells(layer):
    """The layer's cells: several for an RNN of `StackedRNNCells`, else its one layer."""
    if type(getattr(layer, "cell", None)).__name__ == "StackedRNNCells":
        return [_Step(cell, layer) for cell in layer.cell.cells]
    return [layer]


def _refuse(layer, base, why):
    raise Uncovered([(base, type(layer).__name__, why)])


def _activation(g, layer, function, base):
    """`(ONNX name, alpha, beta)` of a Keras activation inside a recurrent cell."""
    name = name_of(function)
    if name == "hard_sigmoid":
        alpha, beta = g.hard_sigmoid
        return "HardSigmoid", float(alpha), float(beta)
    if name == "linear":
        return "Affine", 1.0, 0.0
    if name in _ACTIVATIONS:
        return _ACTIVATIONS[name], None, None
    _refuse(layer, base, f"activation {name or function!r} in the cell")


def _reorder(array, kind, units):
    """Keras's gate blocks (last axis) in ONNX's order."""
    if kind != "LSTM":
        return array
    i, f, c, o = (array[..., k * units:(k + 1) * units] for k in range(4))
    return np.concatenate([i, o, f, c], axis=-1)


def _node_weights(g, layer, kind, base):
    """`(W, R, B, attributes)` of one direction, shaped `[1, ...]`."""
    cell = layer.cell
    units = int(cell.units)
    w = _reorder(weights(cell.kernel), kind, units).T[None]
    r = _reorder(weights(cell.recurrent_kernel), kind, units).T[None]
    gates = _GATES[kind] * units
    bias = weights(cell.bias) if getattr(cell, "use_bias", True) and cell.bias is not None \
        else np.zeros(gates)
    bias = bias.reshape(-1, gates)
    input_bias = _reorder(bias[0], kind, units)
    recurrent_bias = _reorder(bias[1], kind, units) if len(bias) > 1 else np.zeros(gates)
    b = np.concatenate([input_bias, recurrent_bias])[None]
    if kind == "LSTM":
        functions = [cell.recurrent_activation, cell.activation, cell.activation]
    elif kind == "GRU":
        functions = [cell.recurrent_activation, cell.activation]
    else:
        functions = [cell.activation]
    acts = [_activation(g, layer, f, base) for f in functions]
    attrs = {"hidden_size": units, "activations": [a[0] for a in acts]}
    # Only the functions that take an alpha and beta consume them, in order.
    if any(a[1] is not None for a in acts):
        attrs["activation_alpha"] = [a[1] for a in acts if a[1] is not None]
        attrs["activation_beta"] = [a[2] for a in acts if a[1] is not None]
    if kind == "GRU":
        attrs["linear_before_reset"] = int(bool(getattr(cell, "reset_after", False)))
    names = [g.constant(a, f"{base}/{n}") for a, n in ((w, "W"), (r, "R"), (b, "B"))]
    return names, attrs


def _check_arguments(layer, base, masked):
    if getattr(layer, "stateful", False):
        _refuse(layer, base, "stateful=True")
    if getattr(layer, "time_major", False):
        _refuse(layer, base, "time_major=True")
    if getattr(layer, "unroll", False) and masked:
        _refuse(layer, base, "unroll=True with a mask")
    for step in _cells(layer):
        if _kind(step) is None:
            _refuse(layer, base, f"cell {type(getattr(step, 'cell', None)).__name__}")


def _compacted(g, x, mask, base):
    """`(x, sequence_lens, compaction)`: each row's True steps of `x` moved first, in order.

    `x` is `[T, B, D]`, `mask` `[B, T]`. Keras skips a masked step (its
    states carry over), so the layer over `x` equals ONNX's over the
    compacted steps, `sequence_lens` long. `compaction` is `(keep, seen,
    steps, total)` for `_uncompacted`: `seen[b, t]` counts the True steps up
    to `t` included (step `t`'s output is compacted step `seen - 1`),
    `total[b]` all of them.
    """
    keep = g.node("Cast", [g.node("Cast", [g.keras(mask).name], base, to=BOOL)], base, to=INT64)
    # [1], not a scalar: TopK takes its k so.
    steps = g.node("Gather", [g.node("Shape", [keep], base), g.ints([1])], base, axis=0)
    positions = g.node("Range", [g.scalar(0, np.int64), steps, g.scalar(1, np.int64)], base)
    # Kept steps sort first, each group in step order: the keys are distinct.
    key = g.node("Add", [g.node("Mul", [g.node("Sub", [g.scalar(1, np.int64), keep], base),
                                        steps], base),
                         g.node("Unsqueeze", [positions, g.ints([0])], base)], base)
    order = g.node("TopK", [key, steps], base,
                   outputs=2, axis=1, largest=0, sorted=1)[1]
    x = g.node("Transpose", [x], base, perm=[1, 0, 2])
    x = g.node("GatherElements", [x, _along(g, order, x, base)], base, axis=1)
    total = g.node("ReduceSum", [keep, g.ints([1])], base, keepdims=1)
    lens = g.node("Cast", [g.node("Squeeze", [total, g.ints([1])], base)], base, to=INT32)
    seen = g.node("CumSum", [keep, g.scalar(1, np.int64)], base)
    return g.node("Transpose", [x], base, perm=[1, 0, 2]), lens, (keep, seen, steps, total)


def _along(g, index, x, base):
    """`[B, T]` indices expanded over the feature axis of `[B, T, D]` `x`."""
    return g.node("Expand", [g.node("Unsqueeze", [index, g.ints([2])], base),
                             g.node("Shape", [x], base)], base)


def _uncompacted(g, y, compaction, reverse, zero_masked, base):
    """`[B, T, U]` outputs of the compacted steps back at their steps, masked steps filled.

    A masked step repeats the output of the step before it in the order the
    layer ran (the next kept step for `reverse`), zeros before any kept step
    or with `zero_masked` (`zero_output_for_mask`).
    """
    keep, seen, steps, total = compaction
    one = g.scalar(1, np.int64)
    source = g.node("Sub", [seen, one], base)
    if reverse:  # a masked step takes the next kept step: compacted step `seen`
        source = g.node("Add", [source, g.node("Sub", [one, keep], base)], base)
    filled = g.node("Less", [source, total], base) if reverse else \
        g.node("Greater", [seen, g.scalar(0, np.int64)], base)
    if zero_masked:
        filled = g.node("Cast", [keep], base, to=BOOL)
    last = g.node("Sub", [steps, one], base)
    source = g.node("Min", [g.node("Max", [source, g.scalar(0, np.int64)], base), last], base)
    y = g.node("GatherElements", [y, _along(g, source, y, base)], base, axis=1)
    return g.node("Where", [g.node("Unsqueeze", [filled, g.ints([2])], base), y,
                            g.scalar(0.0)], base)


def run_direction(g, layer, x, base, mask=None, initial=(), reverse=False, aligned=False):
    """One recurrent layer over `x` (`[T, B, D]` name); returns `(sequence, states)`.

    `sequence` is `[B, T, units]` in Keras's order (reversed steps for
    `go_backwards`, unless `aligned`), `states` the final `[B, units]` states.
    A `mask` is followed by running the layer over each row's kept steps only.
    """
    kind = _kind(layer)
    (w, r, b), attrs = _node_weights(g, layer, kind, base)
    lens, compaction = "", None
    if mask is not None:
        x, lens, compaction = _compacted(g, x, mask, base)
    initial = [g.node("Unsqueeze", [g.keras(v).name, g.ints([0])], base) for v in initial]
    inputs = [x, w, r, b, lens] + initial
    while inputs and inputs[-1] == "":
        inputs.pop()
    outputs = 3 if kind == "LSTM" else 2
    names = g.node(_ONNX_OP[kind], inputs, base, outputs=outputs,
                   direction="reverse" if reverse else "forward", **attrs)
    y = g.node("Squeeze", [names[0], g.ints([1])], base)  # [T, B, U]
    y = g.node("Transpose", [y], base, perm=[1, 0, 2])
    states = [g.node("Squeeze", [n, g.ints([0])], base) for n in names[1:]]
    if compaction is not None:
        y = _uncompacted(g, y, compaction, reverse, getattr(layer, "zero_output_for_mask", False),
                         base)
    if reverse and not aligned:
        y = g.node("Slice", [y, g.ints([-1]), g.ints([-(2 ** 62)]), g.ints([1]), g.ints([-1])],
                   base)
    return y, states


def _inputs(call):
    args = arguments(call)
    initial = args.get("initial_state") or []
    initial = list(initial) if isinstance(initial, (list, tuple)) else [initial]
    x = args["sequences"] if "sequences" in args else args["inputs"]
    if isinstance(x, (list, tuple)):  # tf-keras packs the initial states with the input
        x, initial = x[0], list(x[1:]) + initial
    mask = args.get("mask")
    return x, call.implicit_mask(x) if mask is None else mask, initial


def recurrent(g, call):
    """LSTM, GRU, SimpleRNN, and RNN of such cells (stacked too)."""
    layer = call.layer
    x, mask, initial = _inputs(call)
    _check_arguments(layer, call.base, mask is not None)
    steps = _cells(layer)
    if len(steps) > 1 and initial:
        _refuse(layer, call.base, "initial_state with stacked cells")
    time_first = g.node("Transpose", [g.keras(x).name], call.base, perm=[1, 0, 2])
    states, reverse = [], bool(layer.go_backwards)
    for i, step in enumerate(steps):
        # Each stacked cell reads the one before it in the order that one ran:
        # with `go_backwards` every cell runs reversed over the steps in input
        # order (where the mask applies), and only the last output is flipped.
        base = call.base if len(steps) == 1 else f"{call.base}/cell{i}"
        y, step_states = run_direction(g, step, time_first, base, mask, initial, reverse,
                                       aligned=i < len(steps) - 1)
        states += step_states
        time_first = g.node("Transpose", [y], base, perm=[1, 0, 2])
    out = y if layer.return_sequences else step_states[0]
    results = [out] + (states if layer.return_state else [])
    return [call.out(n, index=i) for i, n in enumerate(results)]


def bidirectional(g, call):
    """Bidirectional over LSTM/GRU/SimpleRNN layers, every merge mode."""
    layer = call.layer
    x, mask, initial = _inputs(call)
    forward, backward = layer.forward_layer, layer.backward_layer
    for inner in (forward, backward):
        _check_arguments(inner, call.base, mask is not None)
    if initial:
        _refuse(layer, call.base, "initial_state")
    time_first = g.node("Transpose", [g.keras(x).name], call.base, perm=[1, 0, 2])
    ys, states = [], []
    for inner, suffix in ((forward, "forward"), (backward, "backward")):
        y, s = run_direction(g, inner, time_first, f"{call.base}/{suffix}", mask,
                                  reverse=bool(inner.go_backwards), aligned=True)
        ys.append(y if layer.return_sequences else s[0])
        states.append(s)
    mode = layer.merge_mode
    if mode == "concat":
        merged = [g.node("Concat", ys, call.base, axis=-1)]
    elif mode == "sum":
        merged = [g.node("Add", ys, call.base)]
    elif mode == "mul":
        merged = [g.node("Mul", ys, call.base)]
    elif mode == "ave":
        merged = [g.node("Mul", [g.node("Add", ys, call.base), g.scalar(0.5)], call.base)]
    elif mode is None:
        merged = list(ys)
    else:
        _refuse(layer, call.base, f"merge_mode={mode!r}")
    results = merged + ([n for s in states for n in s] if layer.return_state else [])
    return [call.out(n, index=i) for i, n in enumerate(results)]


EMITTERS = {
    "LSTM": recurrent, "GRU": recurrent, "SimpleRNN": recurrent, "RNN": recurrent,
    "Bidirectional": bidirectional,
}
