"""A `Dense` after a global pooling as a 1x1 convolution (a peephole rewrite).

`GlobalAveragePool` -> `Flatten` -> `Gemm` (a classifier head: ResNet's,
EfficientNet's, NASNet's) becomes `GlobalAveragePool` -> 1x1 `Conv` ->
`Flatten`: the same products summed per output. onnxruntime runs the
convolution in its blocked layout straight from the pooled tensor, without
first reordering it back to `NCHW`, and ran it faster than the `Gemm`
(ResNet50's 2048 -> 1000 head: 670 against 990 µs at load average 4;
MobileNetV3's 1x1 head convolutions against the same as `Gemm`: 750
against 840 µs; `benchmarks/ort_kernels.py`).
"""

import numpy as np

from bnconvert.onnx.node_index import Index
from bnconvert.onnx.node_index import attribute
from bnconvert.onnx.node_index import drop
from bnconvert.onnx.node_index import placed_at

_POOLS = ("GlobalAveragePool", "GlobalMaxPool")


def dense_as_convolution(g, output_names, shapes):
    """Rewrites each pooled `Flatten` -> `Gemm` of constant weights, see above.

    Args:
        g: The `Graph`, fully emitted.
        output_names: The graph's output names (never rewritten).
        shapes: `{tensor name: stored shape}`: the pooled tensor's input
            must be known to be 4-D (two spatial axes).

    The `Flatten` stays if anything else reads it.
    """
    index = Index(g, output_names)
    for gemm in [n for n in g.nodes if n.op_type == "Gemm" and not n.domain]:
        flatten = index.producer.get(gemm.input[0])
        if flatten is None or flatten.op_type != "Flatten" or flatten.domain \
                or attribute(flatten, "axis", 1) != 1:
            continue
        pool = index.producer.get(flatten.input[0])
        if pool is None or pool.op_type not in _POOLS or pool.domain \
                or len(shapes.get(pool.input[0]) or ()) != 4:
            continue
        weights = _weights(index, gemm)
        if weights is not None:
            _rewrite(g, flatten, gemm, *weights)


def _weights(index, gemm):
    """`(kernel (M, K, 1, 1), bias (M,) or None)` of a plain `Gemm`, or None."""
    if attribute(gemm, "transA", 0) or attribute(gemm, "alpha", 1.0) != 1.0 \
            or attribute(gemm, "beta", 1.0) != 1.0 or gemm.input[1] not in index.arrays:
        return None
    matrix = index.arrays[gemm.input[1]]
    if matrix.ndim != 2:
        return None
    if not attribute(gemm, "transB", 0):
        matrix = matrix.T
    bias = None
    if len(gemm.input) > 2 and gemm.input[2]:
        bias = index.arrays.get(gemm.input[2])
        # A bias broadcast over the batch: (M,), (1, M) or one value.
        if bias is None or bias.size not in (1, matrix.shape[0]) \
                or (bias.ndim == 2 and bias.shape[0] != 1) or bias.ndim > 2:
            return None
        bias = np.broadcast_to(bias.reshape(-1), (matrix.shape[0],))
    return matrix.reshape(matrix.shape + (1, 1)), bias


def _rewrite(g, flatten, gemm, kernel, bias):
    base = gemm.output[0]
    inputs = [flatten.input[0], g.constant(kernel, f"{gemm.input[1]}/1x1", kernel.dtype)]
    if bias is not None:
        inputs.append(g.constant(bias, f"{gemm.input[2]}/1x1", bias.dtype))
    with placed_at(g, drop(g, [gemm])):
        pixel = g.node("Conv", inputs, base, kernel_shape=[1, 1])
        g.node("Flatten", [pixel], base, output_names=[base], axis=1)
