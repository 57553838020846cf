"""The first convolution reading a channels-last image as it is (a peephole rewrite).

A convolution over an `NHWC` image of `C` channels is a convolution over
the same bytes seen as one `N x 1 x H x (W C)` channel: a `kh x kw` kernel
with strides `(sh, sw)` becomes a `kh x (kw C)` kernel with strides
`(sh, sw C)`, its left and right pads `C` times wider, each weight
`w[o, c, i, j]` moved to `w'[o, 0, i, j C + c]`. Each output is the same
sum of the same products. The `Transpose` to `NCHW` that the stem
convolution asked for becomes a `Reshape`, which onnxruntime runs as a
copy (or not at all), and the convolution itself ran faster in
onnxruntime: MobileNetV3Large minimalistic's stem took 108 µs against 148
plus 93 for the `Transpose`, ResNet50's about 1.9 ms either way less the
`Transpose`'s 0.15 to 0.2 ms (`benchmarks/ort_kernels.py`).

Scalar elementwise ops between the two (an input `Rescaling`'s shift) run
on the channels-last image, and a zero `Pad` of the image (ResNet's
`ZeroPadding2D`) goes into the convolution's pads. Only for a few
channels (at most `MAX_CHANNELS`): with more, onnxruntime reorders the
input to its blocked layout anyway, folding the `Transpose` into that.
"""

import numpy as np
from onnx import helper as onnx_helper

from bnconvert.onnx.node_index import Index
from bnconvert.onnx.node_index import attribute
from bnconvert.onnx.node_index import drop
from bnconvert.onnx.node_index import placed_at

MAX_CHANNELS = 4
_CHANNELS_FIRST = [0, 3, 1, 2]
_ELEMENTWISE = ("Mul", "Add", "Sub", "Div")


def read_channels_last(g, input_shapes, output_names, shapes):
    """Rewrites each input `Transpose` -> scalar ops -> [zero `Pad`] -> `Conv`, see above.

    Args:
        g: The `Graph`, fully emitted.
        input_shapes: `{graph input name: shape}` (None for unknown sizes).
        output_names: The graph's output names (never rewritten).
        shapes: `{tensor name: stored shape}`; the rewrite adds its tensors.
    """
    index = Index(g, output_names)
    for transpose in [n for n in g.nodes if n.op_type == "Transpose" and not n.domain]:
        shape = input_shapes.get(transpose.input[0])
        if shape is None or len(shape) != 4 or any(d is None for d in shape[1:]) \
                or shape[3] > MAX_CHANNELS \
                or attribute(transpose, "perm", None) != _CHANNELS_FIRST:
            continue
        found = _chain(index, transpose.output[0])
        if found is not None:
            _rewrite(g, index, transpose, shape, *found, shapes)


def _chain(index, name):
    """`(scalar ops, pad or None, conv)` reading `name` alone, or None."""
    ops, pad = [], None
    while index.uses.get(name) == 1 and len(index.consumers.get(name, ())) == 1:
        node = index.consumers[name][0]
        split = index.split(node, _ELEMENTWISE)
        if pad is None and split is not None and split[0] == name \
                and index.arrays[node.input[split[1]]].size == 1 \
                and index.arrays[node.input[split[1]]].ndim <= 4:
            ops.append(node)
        elif pad is None and _zero_pad(index, node, name):
            pad = node
        elif _plain_conv(index, node, name):
            return ops, pad, node
        else:
            return None
        name = node.output[0]
    return None


def _zero_pad(index, node, name):
    """Whether `node` pads `name` (NCHW) with zeros around H and W only."""
    if node.op_type != "Pad" or node.domain or node.input[0] != name or len(node.input) > 3 \
            or attribute(node, "mode", b"constant") != b"constant":
        return False
    pads = index.arrays.get(node.input[1])
    value = index.arrays.get(node.input[2]) if len(node.input) == 3 and node.input[2] else 0
    return pads is not None and value is not None and pads.size == 8 \
        and not np.any(pads[[0, 1, 4, 5]]) and not np.any(pads < 0) and not np.any(value)


def _plain_conv(index, node, name):
    """Whether `node` is a 2-D `Conv` of `name` with constant weights, one group, no dilation."""
    if node.op_type != "Conv" or node.domain or node.input[0] != name \
            or not all(n in index.arrays for n in node.input[1:] if n):
        return False
    return index.arrays[node.input[1]].ndim == 4 and attribute(node, "group", 1) == 1 \
        and attribute(node, "auto_pad", b"NOTSET") == b"NOTSET" \
        and all(d == 1 for d in attribute(node, "dilations", [1, 1]))


def _rewrite(g, index, transpose, shape, ops, pad, conv, shapes):
    _, height, width, channels = shape
    weights = index.arrays[conv.input[1]]
    out, _, kh, kw = weights.shape
    sh, sw = attribute(conv, "strides", [1, 1])
    top, left, bottom, right = attribute(conv, "pads", [0, 0, 0, 0])
    if pad is not None:
        extra = index.arrays[pad.input[1]]
        top, left, bottom, right = top + extra[2], left + extra[3], bottom + extra[6], \
            right + extra[7]
    at = drop(g, [transpose] + ops + ([pad] if pad is not None else []) + [conv])
    data, previous = transpose.input[0], transpose.output[0]
    for op in ops:
        op.input[list(op.input).index(previous)] = data
        previous = op.output[0]
        # The same values in the input's layout: a new name, so no stale shape is kept.
        op.output[0] = data = g.unique(f"{op.output[0]}/channels_last")
        shapes[data] = tuple(shape)
    base = conv.output[0]
    flat = g.unique(f"{base}/one_channel")
    # The scalar ops and the convolution are kept, in their order around the
    # new `Reshape`, where the dropped chain was.
    with placed_at(g, at):
        g.nodes.extend(ops)
        # 0 keeps the batch size, also an empty batch.
        g.node("Reshape", [data, g.ints([0, 1, height, width * channels], "shape")], base,
               output_names=[flat])
        g.nodes.append(conv)
    shapes[flat] = (shape[0], 1, height, width * channels)
    kernel = weights.transpose(0, 2, 3, 1).reshape(out, 1, kh, kw * channels)
    conv.input[0] = flat
    conv.input[1] = g.constant(kernel, f"{conv.input[1]}/one_channel", weights.dtype)
    del conv.attribute[:]
    conv.attribute.extend(onnx_helper.make_attribute(k, v) for k, v in (
        ("kernel_shape", [kh, kw * channels]), ("strides", [sh, sw * channels]),
        ("pads", [int(top), int(left) * channels, int(bottom), int(right) * channels]),
        ("dilations", [1, 1]), ("group", 1)))
