"""`keras.ops` adaptive pooling and `conv_transpose` as ONNX.

Emitters are `emit(g, call, p)` as in `math`. Keras 3.15's symbolic form
of these ops is wrong (a 2-D adaptive pool's output has rank 5;
`ConvTranspose.call` hands the backend its arguments in the wrong order),
so a Functional graph holds them only inside a layer's `call`, which the
exporter traces. The emitters therefore trust the op's attributes, not its
recorded output shape where that is wrong. A bare op is refused where later
ops of the graph were built on its wrong shape; as a model output its values
are exported right (the ONNX output declares the shape Keras declares).

Adaptive pooling is written as Keras's TensorFlow backend computes it, one
spatial axis at a time: with `small = ceil(in / out)`, pools of windows
`small` and `small + 1` (stride 1, no padding) are concatenated and the
output bins gathered from them; bin `i` spans `floor(i * in / out)` to
`ceil((i + 1) * in / out)` (in float32, as there) and takes the larger
window only where its span has exactly that size.
"""

import dataclasses
import math as pymath

import numpy as np

from bnconvert import keras_internals as internals
from bnconvert.onnx import layers
from bnconvert.onnx.graph import Uncovered
from bnconvert.onnx.graph import Value
from bnconvert.onnx.graph import as_tuple
from bnconvert.onnx.nn import _as_layer
from bnconvert.onnx.nn import _kernel


def _bins(size, out):
    """Indices into `concat(small pools, big pools)` for each output bin."""
    small = pymath.ceil(size / out)
    f32 = np.float32
    i = np.arange(out, dtype=f32)
    starts = np.floor(i * f32(size) / f32(out)).astype(np.int64)
    ends = np.ceil((i + f32(1)) * f32(size) / f32(out)).astype(np.int64)
    ends, starts = np.minimum(ends, size), np.minimum(starts, size - 1)
    big = (ends - starts) == small + 1
    small_len = max(1, size - small + 1)
    return small, np.where(big, starts + small_len, starts), bool(big.any())


def _adaptive(op_type):
    def emit(g, call, p):
        data_format = p.get("data_format") or "channels_last"
        x = layers.layout_for(g, p["inputs"], data_format)
        spatial = [x.shape[a] for a in x.perm[2:]]
        n = len(spatial)
        sizes = as_tuple(p["output_size"], n)
        if None in spatial:
            raise Uncovered([(call.base, op_type, "a spatial size unknown when exporting")])
        name = x.name
        for axis, (size, out) in enumerate(zip(spatial, sizes)):
            small, index, any_big = _bins(size, int(out))
            pools = []
            for window in (small, small + 1) if any_big else (small,):
                kernel = [1] * n
                kernel[axis] = window
                pools.append(g.node(op_type, [name], call.base, kernel_shape=kernel))
            joined = g.node("Concat", pools, call.base, axis=2 + axis) if len(pools) > 1 \
                else pools[0]
            name = g.node("Gather", [joined, g.ints(index, "bins")], call.base, axis=2 + axis)
        shape = list(x.shape)
        for a, out in zip(x.perm[2:], sizes):
            shape[a] = int(out)
        if tuple(shape) != tuple(call.shapes[0]) and internals.is_consumed(call.layer):
            raise Uncovered([(call.base, op_type, f"Keras recorded shape {call.shapes[0]} "
                              f"(not {tuple(shape)}) and built later ops on it; call it inside "
                              "a layer's call")])
        return [Value(name, tuple(shape), x.perm)]
    return emit


def conv_transpose(g, call, p):
    kernel = _kernel(call, p)
    layer = _as_layer(call, p, kernel=kernel, output_padding=p.get("output_padding"))
    return layers.conv_transpose(g, dataclasses.replace(call, layer=layer, inputs=[p["inputs"]]))


EMITTERS = {"adaptive_average_pool": _adaptive("AveragePool"),
            "adaptive_max_pool": _adaptive("MaxPool"), "conv_transpose": conv_transpose}
