"""Bounds and shapes that mix numbers with sizes known only at run time.

A traced call may compute a shape, or the bounds of a slice, from sizes
that are graph values (`sizes.run_time_sizes`). ONNX takes such a shape as
one 1-D int64 tensor; numbers and values are joined into it here.
"""

import numpy as np

from bnconvert.onnx.graph import Value
from bnconvert.onnx.math import cast
from bnconvert.onnx.math import constant
from bnconvert.onnx.math import dtype_of


def shape_tensor(g, call, entries):
    """A 1-D int64 tensor of `entries` (numbers and run-time sizes): an ONNX shape or bounds."""
    parts, numbers = [], []
    for entry in entries:
        if isinstance(entry, Value):
            if numbers:
                parts.append(g.ints(numbers))
                numbers = []
            scalar = cast(g, entry, dtype_of(call, entry), "int64", call.base).name
            parts.append(g.node("Reshape", [scalar, g.ints([1])], call.base))
        else:
            numbers.append(int(constant(entry)))
    if numbers:
        parts.append(g.ints(numbers))
    if len(parts) == 1:
        return parts[0]
    return g.node("Concat", parts, call.base, axis=0)
