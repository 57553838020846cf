"""Strided 1x1 convolutions reading a subsampled tensor (a peephole rewrite).

A 1x1 convolution with strides `(s, t)` and no padding reads only the
pixels `x[..., s i, t j]`: it is the same convolution, with unit strides,
of `x` subsampled, which an `AveragePool` of a 1x1 window and strides
`(s, t)` gives exactly (the mean of one value is that value; onnxruntime's
blocked `MaxPool` starts from the largest finite negative number, and so
would turn -inf into it). onnxruntime runs
a strided pointwise convolution one output row at a time, but a
unit-stride one over all its pixels at once: ResNet50's strided 1x1
convolutions ran 15 to 20% faster unstrided (stage 5's two, 393 and
1586 µs, in 332 and 1368 µs on a subsampled tensor; the pooling itself
22 µs; `benchmarks/ort_kernels.py`).

When nothing else reads the full tensor (each ResNet stage's first block
reads the last block's output only subsampled), the subsampling moves
up through the pointwise ops that made it: elementwise ops, and 1x1
convolutions without strides or padding, which then compute a quarter of
the pixels they did (ResNet50's last 1x1 convolution of each of its first
three stages). Any other convolution computes only the subsampled pixels
itself, its strides multiplied (the 3x3 one before: a quarter of its
work). The subsampling stops there, or at a tensor something else reads,
which is pooled. All of it is exact: the same sums of the same products
(ResNet50's outputs in onnxruntime are the same bits as before), and
ResNet50 ran in 0.90 to 0.91 of the time (`benchmarks/export.py`).

Only where the strided convolutions have, together, at least twice as many
output channels as they read: the pooling is a pass over the input that a
convolution with fewer outputs gains less than (ResNet50's `conv3_block1_1`
alone: 291 µs strided, 243 µs plus 84 µs of pooling unstrided).
"""

import collections

from onnx import helper as onnx_helper

from bnconvert.onnx.node_index import Index
from bnconvert.onnx.node_index import attribute
from bnconvert.onnx.node_index import placed_at
from bnconvert.onnx.node_index import position

_UNARY = ("Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu",
          "Softplus", "Abs", "Neg", "Exp", "Erf", "Identity", "Clip", "BatchNormalization")
_BINARY = ("Add", "Sub", "Mul", "Div")


def subsample_first(g, output_names, shapes):
    """Rewrites the strided 1x1 convolutions of each tensor, see above.

    Args:
        g: The `Graph`, fully emitted.
        output_names: The graph's output names (never rewritten).
        shapes: `{tensor name: stored shape}`: an elementwise op's inputs
            must be known to be 4-D for the subsampling to move above it;
            the rewrite adds its tensors.
    """
    index = Index(g, output_names)
    readers = collections.defaultdict(list)
    for node in g.nodes:
        if _pointwise_conv(index, node, strided=True):
            readers[node.input[0]].append(node)
    for name, convs in readers.items():
        strides = {tuple(attribute(c, "strides", [1, 1])) for c in convs}
        if len(strides) != 1 or name in output_names or index.uses.get(name) != len(convs) \
                or len(index.consumers.get(name, ())) != len(convs):
            continue
        kernels = [index.arrays[c.input[1]] for c in convs]
        inputs = kernels[0].shape[1] * attribute(convs[0], "group", 1)
        if sum(k.shape[0] for k in kernels) < 2 * inputs:
            continue
        (stride,) = strides
        small = _subsampled(g, index, name, list(stride), shapes, convs[0])
        for conv in convs:
            conv.input[0] = small
            _set(conv, "strides", [1, 1])


def _pointwise_conv(index, node, strided=None):
    """Whether `node` is a 2-D float32 1x1 `Conv` of constant weights, no padding,
    strided (`strided`) or not (False), or either (None)."""
    if node.op_type != "Conv" or node.domain or len(node.input) < 2 \
            or node.input[1] not in index.arrays:
        return False
    kernel = index.arrays[node.input[1]]
    strides = attribute(node, "strides", [1, 1])
    # float32 only: onnxruntime's float16 kernels are not the ones measured.
    # `SAME_UPPER`/`SAME_LOWER` pad a 1x1 window by nothing, whatever the strides.
    return kernel.ndim == 4 and kernel.shape[2:] == (1, 1) and kernel.dtype.name == "float32" \
        and not any(attribute(node, "pads", [0, 0, 0, 0])) \
        and strided in (None, any(s != 1 for s in strides))


# How many ops the subsampling moves up through at most (a bound on the recursion).
_DEPTH = 64


def _subsampled(g, index, name, stride, shapes, reader, depth=0):
    """The name of `name` subsampled by `stride`, for `reader` (placed before it)."""
    producer = index.producer.get(name)
    if _moves(index, name, shapes, depth) and _absorbs(index, producer):
        _set(producer, "strides", [a * b for a, b in zip(
            attribute(producer, "strides", [1, 1]), stride)])
        producer.output[0] = small = g.unique(f"{name}/subsampled")
    elif _moves(index, name, shapes, depth):
        for i, data in enumerate(producer.input):
            if i == 0 or (producer.op_type in _BINARY and data not in index.arrays):
                producer.input[i] = _subsampled(g, index, data, stride, shapes, producer,
                                                depth + 1)
        producer.output[0] = small = g.unique(f"{name}/subsampled")
    else:
        with placed_at(g, position(g, reader)):
            small = g.node("AveragePool", [name], f"{name}/subsampled", kernel_shape=[1, 1],
                           strides=stride)
    shape = shapes.get(name)
    if shape is not None and len(shape) == 4:
        shapes[small] = tuple(shape[:2]) + tuple(
            None if n is None else (n - 1) // s + 1 for n, s in zip(shape[2:], stride))
    return small


def _moves(index, name, shapes, depth):
    """Whether the subsampling of `name` moves above its producer.

    Not above an activation alone (the convolution before it would lose
    the activation onnxruntime fuses into it), nor above an elementwise op
    all of whose inputs would be pooled instead (more pooling, not less).
    """
    producer = index.producer.get(name)
    if producer is None or depth >= _DEPTH or (depth and index.uses.get(name) != 1) \
            or not _movable(index, producer, shapes):
        return False
    if producer.op_type in _UNARY:
        return _moves(index, producer.input[0], shapes, depth + 1)
    if producer.op_type in _BINARY:
        return any(_moves(index, n, shapes, depth + 1) for n in producer.input
                   if n not in index.arrays)
    return True  # a convolution: a quarter of the work, or less


def _absorbs(index, node):
    """Whether `node` is a 2-D convolution, not a 1x1 one, that computes only the
    subsampled pixels given the product of the strides.

    With the same pads, output pixel `i` of strides `t s` is pixel `i s` of
    strides `t`, and the sizes agree: `floor(floor(n / t) / s) = floor(n / (t s))`.
    A 1x1 convolution without strides reads a subsampled input instead
    (onnxruntime runs it over all pixels at once, a strided one row by row),
    and a strided one is pooled after: it is rewritten itself, as the
    reader of its own input.
    """
    if node.op_type != "Conv" or node.domain or _pointwise_conv(index, node) \
            or attribute(node, "auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID"):
        return False
    kernel = attribute(node, "kernel_shape", None)
    if kernel is None and node.input[1] in index.arrays:
        kernel = index.arrays[node.input[1]].shape[2:]
    return kernel is not None and len(kernel) == 2


def _movable(index, node, shapes):
    """Whether each output pixel of `node` depends only on the same pixel of its
    4-D inputs (and on constants that do not vary over the image)."""
    if node.domain or len(node.output) != 1:
        return False
    if node.op_type in _UNARY:
        # A batch norm in training mode takes its statistics over the whole image.
        return all(n in index.arrays for n in node.input[1:] if n) \
            and not attribute(node, "training_mode", 0)
    if node.op_type in _BINARY and len(node.input) == 2:
        # A rank-4 input broadcast over the image (a size of 1) stays one pixel.
        return all(_flat(index.arrays[n]) if n in index.arrays
                   else len(shapes.get(n) or ()) == 4 for n in node.input)
    return _pointwise_conv(index, node, strided=False) or _absorbs(index, node)


def _flat(array):
    """Whether a constant broadcast against a 4-D tensor is the same on every pixel."""
    return array.ndim <= 4 and all(d == 1 for d in array.shape[-2:])


def _set(node, name, value):
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept + [onnx_helper.make_attribute(name, value)])
