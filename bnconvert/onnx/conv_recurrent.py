"""ConvLSTM1D/2D/3D as ONNX convolutions, unrolled over the (static) time steps.

ONNX has no convolutional recurrence. The input convolution of every step
runs as one `Conv` over all steps at once (time folded into the batch);
each step then adds the `same`-padded recurrent convolution of the previous
hidden state and applies the gates in Keras's order `i, f, c, o`. The first
step starts from zero states, as Keras's default, so its recurrent term is
left out. Work is channels-first, time-major: `[steps, batch, channels, ...]`.
"""

import numpy as np

from bnconvert.onnx import activations
from bnconvert.onnx.graph import Uncovered
from bnconvert.onnx.graph import Value
from bnconvert.onnx.graph import as_tuple
from bnconvert.onnx.layers import conv_pads
from bnconvert.onnx.layers import weights

# Unrolling writes a few nodes per step: beyond this, refuse rather than bloat.
MAX_STEPS = 512


def _refuse(call, why):
    raise Uncovered([(call.base, type(call.layer).__name__, why)])


def _out_size(size, kernel, stride, dilation, padding):
    if padding == "same":
        return -(-size // stride)
    return (size - dilation * (kernel - 1) - 1) // stride + 1


def _to_onnx_kernel(kernel, rank):
    """Keras `(*window, in, out)` as ONNX `(out, in, *window)`."""
    return np.transpose(kernel, (rank + 1, rank) + tuple(range(rank)))


def _gate(g, call, value, shape, function, tag):
    out = activations.apply(g, Value(value, shape, tuple(range(len(shape)))), function,
                            f"{call.base}/{tag}")
    return out.name


def _check(call):
    layer = call.layer
    if getattr(layer, "stateful", False):
        _refuse(call, "stateful=True")
    if any(m is not None for m in (call.masks or [])):
        _refuse(call, "a mask (its steps would need a per-row select)")
    if len(call.inputs) > 1 or call.kwargs.get("initial_state") is not None:
        _refuse(call, "an initial state")


def conv_lstm(g, call):
    """A ConvLSTM layer: every output and state as Keras returns them."""
    _check(call)
    layer, cell = call.layer, call.layer.cell
    rank = int(cell.rank)
    x = g.keras(call.inputs[0])
    steps = x.shape[1]
    channels_last = cell.data_format == "channels_last"
    spatial = x.shape[2:2 + rank] if channels_last else x.shape[3:3 + rank]
    channels = x.shape[-1] if channels_last else x.shape[2]
    if steps is None or None in spatial or channels is None:
        _refuse(call, "a time or spatial axis of unknown size (the steps are unrolled)")
    if steps > MAX_STEPS:
        _refuse(call, f"{steps} time steps (unrolled up to {MAX_STEPS})")
    filters = int(cell.filters)
    window = tuple(weights(cell.kernel).shape[:rank])
    strides = as_tuple(cell.strides, rank)
    dilations = as_tuple(cell.dilation_rate, rank)
    # [B, T, (s..., C) or (C, s...)] -> [T, B, C, s...], then time into the batch.
    perm = [1, 0, rank + 2] + list(range(2, rank + 2)) if channels_last \
        else list(range(1, -1, -1)) + list(range(2, rank + 3))
    moved = g.node("Transpose", [x.name], call.base, perm=perm)
    merged = g.node("Reshape", [moved, g.ints([-1, channels] + list(spatial))], call.base)
    probe = Value("", (None, channels) + tuple(spatial), tuple(range(rank + 2)))
    pads, auto = conv_pads(probe, window, strides, dilations, cell.padding)
    inputs = [merged, g.constant(_to_onnx_kernel(weights(cell.kernel), rank),
                                 f"{call.base}/kernel")]
    if getattr(cell, "use_bias", True) and cell.bias is not None:
        inputs.append(g.constant(weights(cell.bias), f"{call.base}/bias"))
    projected = g.node("Conv", inputs, call.base, kernel_shape=list(window),
                       strides=list(strides), dilations=list(dilations), pads=pads,
                       auto_pad=auto)
    out = [_out_size(s, k, st, d, cell.padding)
           for s, k, st, d in zip(spatial, window, strides, dilations)]
    per_step = g.node("Reshape", [projected, g.ints([steps, -1, 4 * filters] + out)], call.base)
    parts = g.node("Split", [per_step, g.ints([1] * steps, "split")], call.base,
                   outputs=steps, axis=0) if steps > 1 else [per_step]
    recurrent = g.constant(_to_onnx_kernel(weights(cell.recurrent_kernel), rank),
                           f"{call.base}/recurrent_kernel")
    rec_window = tuple(weights(cell.recurrent_kernel).shape[:rank])
    rec_pads = [(k - 1) // 2 for k in rec_window] + [k - 1 - (k - 1) // 2 for k in rec_window]
    shape = (None, filters) + tuple(out)
    order = range(steps - 1, -1, -1) if layer.go_backwards else range(steps)
    h = c = None
    outputs = []
    for t in order:
        z = g.node("Squeeze", [parts[t], g.ints([0], "axes")], call.base)
        if h is not None:
            z = g.node("Add", [z, g.node("Conv", [h, recurrent], call.base,
                                         kernel_shape=list(rec_window), pads=rec_pads)],
                       call.base)
        zi, zf, zc, zo = g.node("Split", [z, g.ints([filters] * 4, "split")], call.base,
                                outputs=4, axis=1)
        i = _gate(g, call, zi, shape, cell.recurrent_activation, "i")
        o = _gate(g, call, zo, shape, cell.recurrent_activation, "o")
        candidate = g.node("Mul", [i, _gate(g, call, zc, shape, cell.activation, "c")],
                           call.base)
        if c is None:
            c = candidate
        else:
            f = _gate(g, call, zf, shape, cell.recurrent_activation, "f")
            c = g.node("Add", [g.node("Mul", [f, c], call.base), candidate], call.base)
        h = g.node("Mul", [o, _gate(g, call, c, shape, cell.activation, "h")], call.base)
        outputs.append(h)
    # Channels-first [B, F, o...] back to Keras's layout.
    to_keras = [0] + list(range(2, rank + 2)) + [1] if channels_last else list(range(rank + 2))
    if layer.return_sequences:
        stacked = g.node("Concat", [g.node("Unsqueeze", [o_t, g.ints([1], "axes")], call.base)
                                    for o_t in outputs], call.base, axis=1)
        seq_perm = [0, 1] + [p + 1 for p in to_keras[1:]]
        result = g.node("Transpose", [stacked], call.base, perm=seq_perm)
    else:
        result = g.node("Transpose", [h], call.base, perm=to_keras)
    results = [call.out(result)]
    if getattr(layer, "return_state", False):
        for index, state in ((1, h), (2, c)):
            results.append(call.out(g.node("Transpose", [state], call.base, perm=to_keras),
                                    index=index))
    return results


EMITTERS = {f"ConvLSTM{n}D": conv_lstm for n in (1, 2, 3)}
