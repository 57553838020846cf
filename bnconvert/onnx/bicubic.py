"""TensorFlow's bicubic resize as two products with constant matrices.

`tf.image.resize(..., "bicubic")` (and so Keras's `Resizing`,
`ops.image.resize` and tf-keras's `tf.image.resize` on the TensorFlow
backend) is `ResizeBicubic` with half-pixel centres: output pixel `o` of an
axis samples input position `p = (o + 0.5) * n_in / n_out - 0.5` (in
float32) with Keys' cubic kernel, `a = -0.5`, at the four pixels
`floor(p) - 1 ... floor(p) + 2`; taps outside the image get weight 0 and the
four weights are renormalized to sum to 1. TensorFlow does not evaluate
the kernel at `p - floor(p)` itself but reads it from a table of 1025
entries at `round(1024 * (p - floor(p)))`. onnxruntime's cubic `Resize`
evaluates it exactly, which differs by up to ~5e-4 of the image's range
wherever the fraction is not a multiple of 1/1024 (any factor but a power
of two), and it cannot shrink. Built here from the same table, the
resize along one axis is a constant `(n_out, n_in)` matrix: the image is
`Wh @ x @ Ww^T`, for any factor up or down, when its size is known.
"""

import numpy as np

_TABLE = 1024
_A = -0.5


def _kernel_table():
    """Keys' kernel at `t / 1024` (near taps) and `1 + t / 1024` (far taps), t = 0..1024."""
    t = (np.arange(_TABLE + 1) / _TABLE).astype(np.float32).astype(np.float64)
    near = ((_A + 2) * t - (_A + 3)) * t * t + 1
    far_t = (t.astype(np.float32) + np.float32(1.0)).astype(np.float64)
    far = ((_A * far_t - 5 * _A) * far_t + 8 * _A) * far_t - 4 * _A
    return near.astype(np.float32), far.astype(np.float32)


def weights(n_in, n_out):
    """The `(n_out, n_in)` float32 matrix of TensorFlow's bicubic resize along one axis."""
    near, far = _kernel_table()
    scale = np.float32(n_in) / np.float32(n_out)
    matrix = np.zeros((n_out, n_in), np.float32)
    for o in range(n_out):
        position = (np.float32(o) + np.float32(0.5)) * scale - np.float32(0.5)
        first = int(np.floor(position))
        offset = int(np.rint(np.float32(position - np.float32(first)) * np.float32(_TABLE)))
        taps = (first - 1, first, first + 1, first + 2)
        kernel = (far[offset], near[offset], near[_TABLE - offset], far[_TABLE - offset])
        w = np.array([k if 0 <= i < n_in else 0.0 for i, k in zip(taps, kernel)], np.float32)
        total = np.float32(w.sum(dtype=np.float32))
        if abs(total) >= 1000 * np.finfo(np.float32).tiny:
            w = w * (np.float32(1.0) / total)
        for i, k in zip(taps, w):
            if 0 <= i < n_in:
                matrix[o, i] += k
    return matrix


def resize(g, source, size, target, base):
    """`source` (`[N, C, h, w]`, `size` = `(h, w)`) resized to `target` `(height, width)`."""
    (h, w), (height, width) = size, target
    rows = g.constant(weights(h, height), f"{base}/bicubic_rows", np.float32)
    columns = g.constant(weights(w, width).T.copy(), f"{base}/bicubic_columns", np.float32)
    return g.node("MatMul", [g.node("MatMul", [rows, source], base), columns], base)
