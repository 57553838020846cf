"""`keras.ops.image.rgb_to_hsv` / `hsv_to_rgb` as ONNX: TensorFlow's formulas.

Emitters are `emit(g, call, p)` as in `math`. The three channels are split
along the channel axis in the value's own layout, combined elementwise in
the order TensorFlow's colour-space kernel computes them (so the numbers
agree to the last bit on ordinary inputs), and joined back.
"""

from bnconvert.onnx.graph import Uncovered


def _channels(g, call, p, what):
    """`(x, physical channel axis, [c0, c1, c2])` of the op's images."""
    x = p["images"]
    if x.rank not in (3, 4):
        raise Uncovered([(call.base, what, "images not of rank 3 or 4")])
    # channels_first: (C, H, W) unbatched, (N, C, H, W) batched.
    axis = -1 if (p.get("data_format") or "channels_last") == "channels_last" else x.rank - 3
    if x.shape[axis] != 3:
        raise Uncovered([(call.base, what, "images without 3 channels")])
    physical = x.physical(axis)
    parts = g.node("Split", [x.name, g.ints([1, 1, 1], "split")], call.base, outputs=3,
                   axis=physical)
    return x, physical, parts


def _emitter(g, call):
    def op(op_type, *inputs):
        return g.node(op_type, list(inputs), call.base)
    return op


def rgb_to_hsv(g, call, p):
    """Hue in [0, 1) from the channel holding the maximum; saturation 0 where V <= 0."""
    x, axis, (r, gr, b) = _channels(g, call, p, "RGBToHSV")
    op = _emitter(g, call)
    zero = g.scalar(0.0)
    v = op("Max", r, gr, b)
    spread = op("Sub", v, op("Min", r, gr, b))
    s = op("Where", op("Greater", v, zero), op("Div", spread, v), zero)
    norm = op("Mul", op("Reciprocal", spread), g.scalar(1.0 / 6.0))
    hue_r = op("Mul", norm, op("Sub", gr, b))
    hue_g = op("Add", op("Mul", norm, op("Sub", b, r)), g.scalar(2.0 / 6.0))
    hue_b = op("Add", op("Mul", norm, op("Sub", r, gr)), g.scalar(4.0 / 6.0))
    h = op("Where", op("Equal", r, v), hue_r, op("Where", op("Equal", gr, v), hue_g, hue_b))
    h = op("Where", op("Greater", spread, zero), h, zero)
    h = op("Where", op("Less", h, zero), op("Add", h, g.scalar(1.0)), h)
    return [call.out(g.node("Concat", [h, s, v], call.base, axis=axis), x.perm)]


def hsv_to_rgb(g, call, p):
    """Each channel as `(1 - S + S * ramp(6 H)) * V`, the ramps clipped to [0, 1]."""
    x, axis, (h, s, v) = _channels(g, call, p, "HSVToRGB")
    op = _emitter(g, call)
    zero, one, two = g.scalar(0.0), g.scalar(1.0), g.scalar(2.0)
    dh = op("Mul", h, g.scalar(6.0))

    def ramp(centre, rising):
        distance = op("Abs", op("Sub", dh, g.scalar(centre)))
        value = op("Sub", distance, one) if rising else op("Add", op("Neg", distance), two)
        return op("Min", op("Max", value, zero), one)

    one_s = op("Add", op("Neg", s), one)
    channels = [op("Mul", op("Add", one_s, op("Mul", s, ramp(centre, rising))), v)
                for centre, rising in ((3.0, True), (2.0, False), (4.0, False))]
    return [call.out(g.node("Concat", channels, call.base, axis=axis), x.perm)]


EMITTERS = {"rgb_to_hsv": rgb_to_hsv, "hsv_to_rgb": hsv_to_rgb}
