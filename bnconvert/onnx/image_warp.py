"""Image warps of `keras.ops.image` as ONNX gathers: affine, perspective, map_coordinates.

Emitters are `emit(g, call, p)` as in `math`. ONNX's `GridSample` needs
opset 16 and treats borders its own way, so the warps sample with `Gather`
/ `GatherND` (opset 13) and reproduce what Keras's TensorFlow backend does:

- `affine_transform` and `perspective_transform` run TensorFlow's
  `ImageProjectiveTransformV3` kernel: each output pixel `(x, y)` reads the
  input at `((a0 x + a1 y + a2) / k, (a3 x + a4 y + a5) / k)` with
  `k = a6 x + a7 y + 1` (the fill value where `k == 0`), mapped into the
  image by the fill mode (TensorFlow's reflect and wrap formulas, then a
  clamp), read with the fill value outside the image, by nearest (rounding
  halves away from zero, as `std::round`) or bilinear interpolation;
- `perspective_transform` takes its transform from the four point pairs,
  solved at export time (ONNX has no linear solver), so the points must be
  constants;
- `map_coordinates` follows Keras's own composition: per axis, integer
  indices and weights (order 0 or 1), fixed up by the fill mode, then one
  gather per corner.

The projective warps read the image size from the tensor when run (any size,
batched or not) and take the transform as a constant or a tensor of the graph;
`map_coordinates` needs its input's whole shape when exporting.
"""

import numpy as np

from bnconvert.onnx.graph import Uncovered
from bnconvert.onnx.graph import Value
from bnconvert.onnx.math import cast
from bnconvert.onnx.math import constant
from bnconvert.onnx.math import dtype_of


class _Ops:
    """Short node builders for the many small nodes of a sampler."""

    def __init__(self, g, base):
        self.g, self.base = g, base

    def __call__(self, op_type, *inputs, **attrs):
        return self.g.node(op_type, list(inputs), self.base, **attrs)

    def f(self, value):
        return self.g.scalar(value)

    def i(self, value):
        return self.g.scalar(value, np.int64)


def _round_half_away(op, v):
    """`std::round`: ONNX `Round` takes halves to even."""
    magnitude = op("Abs", v)
    whole = op("Floor", magnitude)
    up = op("Cast", op("GreaterOrEqual", op("Sub", magnitude, whole), op.f(0.5)), to=1)
    return op("Mul", op("Sign", v), op("Add", whole, up))


def _fill_mode_coordinate(op, c, size, mode):
    """TensorFlow's `MapCoordinate` for one axis; `size` is its float length (a tensor).

    Sizes are tensors, not constants, so that images of any size share one graph
    (and a `Div` by a size stays a division, as TensorFlow computes it).
    """
    last = op("Sub", size, op.f(1.0))
    if mode in ("reflect", "wrap"):
        below, above = op("Less", c, op.f(0.0)), op("Greater", c, last)
        if mode == "reflect":
            period = op("Add", size, size)
            low = op("Add", op("Mul", period, op("Floor", op("Div", op("Neg", c), period))), c)
            low = op("Where", op("Less", low, op("Neg", size)), op("Add", low, period),
                     op("Sub", op("Neg", low), op.f(1.0)))
            high = op("Sub", c, op("Mul", period, op("Floor", op("Div", c, period))))
            high = op("Where", op("GreaterOrEqual", high, size),
                      op("Sub", op("Sub", period, high), op.f(1.0)), high)
        else:
            low = op("Add", c, op("Mul", size, op("Add", op("Floor", op("Div", op("Neg", c),
                                                                        last)), op.f(1.0))))
            high = op("Sub", c, op("Mul", size, op("Floor", op("Div", c, last))))
        # On a length-1 axis (TensorFlow's 0) wrap divides by 0: the infinities
        # clamp to 0 below.
        c = op("Where", below, low, op("Where", above, high, c))
    if mode == "constant":
        return c
    return op("Min", op("Max", c, op.f(0.0)), last)


def _projective_sample(g, call, p, transform, fill_mode, what):
    """`ImageProjectiveTransformV3` of `p["images"]` by `transform` (name, `(T, 8)` float)."""
    x = p["images"]
    interpolation = p.get("interpolation", "bilinear")
    if interpolation not in ("nearest", "bilinear"):
        raise Uncovered([(call.base, what, f"interpolation={interpolation!r}")])
    channels_last = (p.get("data_format") or "channels_last") == "channels_last"
    # Sampled as (N, H*W, C): the Keras axes held physically as (N,) H, W, C.
    perm = {(4, True): (0, 1, 2, 3), (4, False): (0, 2, 3, 1), (3, True): (0, 1, 2),
            (3, False): (1, 2, 0)}.get((x.rank, channels_last))
    if perm is None:
        raise Uncovered([(call.base, what, "images not of rank 3 or 4")])
    op = _Ops(g, call.base)
    x = g.layout(x, perm)
    shape = op("Shape", x.name)
    height, width = (op("Slice", shape, g.ints([i]), g.ints([i + 1])) for i in (-3, -2))
    pixels = op("Mul", height, width)
    flat = op("Reshape", x.name, op("Concat", g.ints([0 if x.rank == 4 else 1, -1]),
                                    op("Slice", shape, g.ints([-1]), g.ints([x.rank])), axis=0))
    # Output pixel i is at row i // W, column i % W.
    scalar = g.ints([0], "axes")
    index = op("Range", op("Squeeze", g.ints([0]), scalar), op("Squeeze", pixels, scalar),
               op("Squeeze", g.ints([1]), scalar))
    out_x, out_y = (op("Unsqueeze", op("Cast", v, to=1), scalar)
                    for v in (op("Mod", index, width), op("Div", index, width)))
    h, w = op("Cast", height, to=1), op("Cast", width, to=1)
    a = op("Split", transform, g.ints([1] * 8, "split"), axis=1, outputs=8)

    def line(i, j, k):
        return op("Add", op("Add", op("Mul", a[i], out_x), op("Mul", a[j], out_y)), k)

    projection = line(6, 7, op.f(1.0))
    in_x = _fill_mode_coordinate(op, op("Div", line(0, 1, a[2]), projection), w, fill_mode)
    in_y = _fill_mode_coordinate(op, op("Div", line(3, 4, a[5]), projection), h, fill_mode)
    fill = op.f(float(p.get("fill_value", 0.0)))
    images = op("Concat", op("Slice", op("Shape", flat), g.ints([0]), g.ints([1])), pixels,
                axis=0)

    def read(row, column):
        """Pixels at float (row, column), the fill value outside the image."""
        valid = op("And", op("And", op("GreaterOrEqual", row, op.f(0.0)), op("Less", row, h)),
                   op("And", op("GreaterOrEqual", column, op.f(0.0)), op("Less", column, w)))
        index = [op("Cast", op("Min", op("Max", v, op.f(0.0)), op("Sub", size, op.f(1.0))),
                    to=7) for v, size in ((row, h), (column, w))]
        index = op("Add", op("Mul", index[0], width), index[1])
        index = op("Unsqueeze", op("Expand", index, images), g.ints([2], "axes"))
        values = op("GatherND", flat, index, batch_dims=1)
        return op("Where", op("Unsqueeze", valid, g.ints([2], "axes")), values, fill)

    def weight(v):
        return op("Unsqueeze", v, g.ints([2], "axes"))

    if interpolation == "nearest":
        out = read(_round_half_away(op, in_y), _round_half_away(op, in_x))
    else:
        x0, y0 = op("Floor", in_x), op("Floor", in_y)
        x1, y1 = op("Add", x0, op.f(1.0)), op("Add", y0, op.f(1.0))

        def along_x(row):
            return op("Add", op("Mul", weight(op("Sub", x1, in_x)), read(row, x0)),
                      op("Mul", weight(op("Sub", in_x, x0)), read(row, x1)))

        out = op("Add", op("Mul", weight(op("Sub", y1, in_y)), along_x(y0)),
                 op("Mul", weight(op("Sub", in_y, y0)), along_x(y1)))
    out = op("Where", weight(op("Equal", projection, op.f(0.0))), fill, out)
    return [call.out(op("Reshape", out, shape), perm)]


def affine_transform(g, call, p):
    mode = p.get("fill_mode", "constant")
    if mode not in ("constant", "nearest", "wrap", "reflect"):
        raise Uncovered([(call.base, "AffineTransform", f"fill_mode={mode!r} (Keras's "
                                                        "TensorFlow backend has none)")])
    transform = p["transform"]
    if isinstance(transform, Value):
        name = cast(g, g.keras(transform), dtype_of(call, transform), "float32", call.base).name
        name = g.node("Reshape", [name, g.ints([-1, 8])], call.base)
    else:
        name = g.constant(constant(transform).reshape(-1, 8), f"{call.base}/transform")
    return _projective_sample(g, call, p, name, mode, "AffineTransform")


def homography(start, end):
    """Keras's 8 transform coefficients mapping `end` points onto `start` points."""
    start, end = (np.asarray(v, np.float64).reshape(-1, 4, 2) for v in (start, end))
    rows = []
    for i in range(4):
        (sx, sy), (ex, ey) = start[:, i].T, end[:, i].T
        one, zero = np.ones_like(ex), np.zeros_like(ex)
        rows.append(np.stack([ex, ey, one, zero, zero, zero, -sx * ex, -sx * ey], -1))
        rows.append(np.stack([zero, zero, zero, ex, ey, one, -sy * ex, -sy * ey], -1))
    target = start.reshape(-1, 8)[..., None]
    return np.linalg.solve(np.stack(rows, 1), target)[..., 0].astype(np.float32)


def perspective_transform(g, call, p):
    points = [p["start_points"], p["end_points"]]
    if any(isinstance(v, Value) for v in points):
        raise Uncovered([(call.base, "PerspectiveTransform",
                          "points computed in the graph (ONNX has no linear solver)")])
    try:
        coefficients = homography(*(constant(v) for v in points))
    except np.linalg.LinAlgError:
        raise Uncovered([(call.base, "PerspectiveTransform", "degenerate points")]) from None
    name = g.constant(coefficients, f"{call.base}/transform")
    return _projective_sample(g, call, p, name, "constant", "PerspectiveTransform")


def _fixed_index(op, index, size, mode):
    """Keras's `process_coordinates` on int64 indices: `(index, valid or None)`."""
    top = op.i(size - 1)
    if mode == "constant":
        valid = op("And", op("GreaterOrEqual", index, op.i(0)), op("Less", index, op.i(size)))
        return op("Min", op("Max", index, op.i(0)), top), valid
    if mode == "nearest":
        return op("Min", op("Max", index, op.i(0)), top), None
    if mode == "wrap":
        return op("Mod", index, op.i(size)), None
    folded = op("Mod", op("Abs", index), op.i(2 * size))
    over = op("GreaterOrEqual", folded, op.i(size))
    index = op("Where", over, op("Sub", op.i(2 * size), folded), folded)
    if mode == "reflect":
        index = op("Where", over, op("Sub", index, op.i(1)), index)
    return index, None


def _chain(op, op_type, names):
    """`names[0] op names[1] op ...` left to right, Nones left out (None for none)."""
    out = None
    for name in names:
        if name is not None:
            out = name if out is None else op(op_type, out, name)
    return out


def map_coordinates(g, call, p):
    x, coordinates = g.keras(p["inputs"]), p["coordinates"]
    order, mode = int(p["order"]), p.get("fill_mode", "constant")
    if None in x.shape or order not in (0, 1) or dtype_of(call, p["inputs"]) != "float32":
        raise Uncovered([(call.base, "MapCoordinates", "inputs of unknown shape, non-float "
                                                       "inputs, or order > 1")])
    if mode not in ("constant", "nearest", "wrap", "mirror", "reflect"):
        raise Uncovered([(call.base, "MapCoordinates", f"fill_mode={mode!r}")])
    op = _Ops(g, call.base)
    if isinstance(coordinates, Value):
        integer = not dtype_of(call, coordinates).startswith(("float", "bfloat"))
        coords = g.keras(coordinates).name
    else:
        array = constant(coordinates)
        integer = array.dtype.kind in "iu"
        coords = g.constant(array, f"{call.base}/coordinates",
                            np.int64 if integer else np.float32)
    if integer and order == 1:
        raise Uncovered([(call.base, "MapCoordinates", "integer coordinates with order 1")])
    per_axis = []
    for axis, size in enumerate(x.shape):
        c = op("Squeeze", op("Gather", coords, g.ints([axis]), axis=0), g.ints([0], "axes"))
        if integer:
            nodes = [(op("Cast", c, to=7), None)]
        elif order == 0:
            nodes = [(op("Cast", op("Round", c), to=7), None)]
        else:
            lower = op("Floor", c)
            upper_weight = op("Sub", c, lower)
            index = op("Cast", lower, to=7)
            nodes = [(index, op("Sub", op.f(1.0), upper_weight)),
                     (op("Add", index, op.i(1)), upper_weight)]
        per_axis.append([_fixed_index(op, i, size, mode) + (w,) for i, w in nodes])
    flat = op("Reshape", x.name, g.ints([-1]))
    strides = np.cumprod((1,) + x.shape[:0:-1])[::-1]
    fill = op.f(float(p.get("fill_value", 0.0)))
    total = None
    for corner in np.ndindex(*[len(a) for a in per_axis]):
        items = [per_axis[axis][k] for axis, k in enumerate(corner)]
        index = _chain(op, "Add", [i if stride == 1 else op("Mul", i, op.i(int(stride)))
                                   for (i, _, _), stride in zip(items, strides)])
        value = op("Gather", flat, index, axis=0)
        valid = _chain(op, "And", [v for _, v, _ in items])
        if valid is not None:
            value = op("Where", valid, value, fill)
        weight = _chain(op, "Mul", [w for _, _, w in items])
        if weight is not None:
            value = op("Mul", weight, value)
        total = _chain(op, "Add", [total, value])
    return [call.out(total)]


EMITTERS = {"affine_transform": affine_transform, "perspective_transform": perspective_transform,
            "map_coordinates": map_coordinates}
