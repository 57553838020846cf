"""`keras.ops` special functions and integer number theory as ONNX.

Emitters are `emit(g, call, p)` as in `math`. Each one computes what
Keras's TensorFlow backend computes, in float32, from plain ONNX ops:

- `erfinv(x)` is TensorFlow's `ndtri((x + 1) / 2) / sqrt(2)`, including the
  float32 rounding of `(x + 1) / 2` that makes it `inf` at 0.99999994 and
  0 at 1e-30. `ndtri(b)` is `c * R(c**2)` (c = b - 1/2) in the centre and,
  for `q = min(b, 1 - b) <= exp(-2)`, `+-T(1 / sqrt(-2 log q))`; `R` and `T`
  are Chebyshev series fitted to float64 values (tools/fit_special.py).
- `i0(x)` is `exp(|x|) * i0e(x)`, as TensorFlow's `bessel_i0` (so it is
  `inf` beyond |x| ~ 88.7 where `exp` overflows), `i0e` a Chebyshev series
  in `|x| / 4 - 1` up to 8 and, above, `S(16 / |x| - 1) / sqrt(|x|)`.
- `nextafter(x1, x2)` is TensorFlow's float64 `nextafter` cast back to
  float32: one float64 step from a float32 value rounds back to it, so the
  result is `x1` -- or `x2` where they are equal, a zero signed towards
  `x2` where `x1` is zero, NaN where either is. TensorFlow's CPU kernels
  read float32 subnormals as zero (the flush-to-zero mode it runs in); so
  does the graph. Float64 results (a true float64 step) are refused.
- `gcd` and `lcm` run Euclid's algorithm unrolled for as many steps as the
  dtype's worst case (consecutive Fibonacci numbers) needs, on the absolute
  values as TensorFlow does (so, as there, |int_min| stays int_min).
"""

import math as pymath

import numpy as np

from bnconvert.onnx.graph import Uncovered
from bnconvert.onnx.math import aligned
from bnconvert.onnx.math import cast
from bnconvert.onnx.math import dtype_of
from bnconvert.onnx.math import onnx_dtype
from bnconvert.onnx.math import out_dtype

# Chebyshev coefficients printed by tools/fit_special.py (see there for the intervals).
NDTRI_CENTER = (
    2.73759411104055, 0.253718284595105, 0.025578018924084393, 0.0032173720979537424,
    0.00044973297377164063, 6.686412408859558e-05, 1.0351019856922987e-05,
    1.6487456841557134e-06, 2.682380052755752e-07, 4.4359236999802284e-08,
    7.431542798972088e-09, 1.2571958012783062e-09, 2.0852680332290706e-10)
NDTRI_TAIL = (
    2.768359426433936, -2.074781469651399, 0.5148653407613177, -0.13537273259007787,
    0.03605220333961562, -0.009638331810610551, 0.002580329395054176, -0.000691202879018693,
    0.00018520975070990264, -4.963571938587652e-05, 1.3303598507707903e-05,
    -3.565923700432627e-06, 9.558382048635572e-07, -2.5613638032773167e-07,
    6.833287691243584e-08, -1.709000718719267e-08)
I0E_SMALL = (
    0.338397637204738, -0.30468267234319835, 0.1716209015222087, -0.09490109704804761,
    0.04930528423967071, -0.023737414805899443, 0.01054646039459499, -0.004324309995050586,
    0.0016394756169414175, -0.0005763755745386538, 0.00018850288509589838,
    -5.7541950100645955e-05, 1.6448448069119503e-05, -4.416738346937643e-06,
    1.1173874626657934e-06, -2.670789000119563e-07, 6.046699555389541e-08,
    -1.298298212066606e-08, 2.5630658932959537e-09)
I0E_LARGE = (
    0.40224520550705467, 0.0033691164782559957, 6.88975834673311e-05, 2.891370517044134e-06,
    2.0489186851047058e-07, 2.266673142760833e-08, 3.3962168022316774e-09,
    4.936749509187877e-10, 1.1171441549606697e-11, -2.9704960713416995e-11)
_EXP_NEG_TWO = pymath.exp(-2.0)
C_MAX = 0.5 - _EXP_NEG_TWO
U_LO, U_HI = 1.0 / pymath.sqrt(2.0 * 26.0 * pymath.log(2.0)), 0.5
_FLOAT32_TINY = float(np.finfo(np.float32).tiny)


class _Ops:
    """Short node builders for one emitter (all float32 scalars shared)."""

    def __init__(self, g, base):
        self.g, self.base = g, base

    def __call__(self, op_type, *inputs, **attrs):
        names = [self.g.scalar(v) if isinstance(v, (int, float)) else v for v in inputs]
        return self.g.node(op_type, names, self.base, **attrs)

    def chebyshev(self, t, coefficients):
        """sum_k c_k T_k(t), by Clenshaw's recurrence."""
        two_t = self("Add", t, t)
        b1, b2 = self.g.scalar(coefficients[-1]), self.g.scalar(0.0)
        for c in reversed(coefficients[1:-1]):
            b1, b2 = self("Add", self("Sub", self("Mul", two_t, b1), b2), c), b1
        return self("Add", self("Sub", self("Mul", t, b1), b2), coefficients[0])

    def affine(self, x, lo, hi):
        """`x` mapped from [lo, hi] onto [-1, 1]."""
        return self("Sub", self("Mul", x, 2.0 / (hi - lo)), (hi + lo) / (hi - lo))


def _float64(call):
    """Whether Keras computes `call` in float64 (the graph's float32 `out_dtype` hides it)."""
    return bool(call.dtypes) and str(call.dtypes[0]) == "float64"


def _float32(g, call, p, name, key="x"):
    """The operand as float32, the dtype every series here is evaluated in."""
    if _float64(call):
        raise Uncovered([(call.base, name, "a float64 result (float32 only)")])
    x = p[key]
    return cast(g, x, dtype_of(call, x), "float32", f"{call.base}/cast")


def erfinv(g, call, p):
    x = _float32(g, call, p, "Erfinv")
    o = _Ops(g, call.base)
    b = o("Add", o("Mul", x.name, 0.5), 0.5)
    c = o("Sub", b, 0.5)
    centre = o("Mul", c, o.chebyshev(o.affine(o("Mul", c, c), 0.0, C_MAX * C_MAX),
                                     NDTRI_CENTER))
    upper = o("Greater", b, 0.5)
    q = o("Where", upper, o("Sub", 1.0, b), b)
    u = o("Reciprocal", o("Sqrt", o("Mul", o("Log", q), -2.0)))
    tail = o.chebyshev(o.affine(u, U_LO, U_HI), NDTRI_TAIL)
    tail = o("Where", upper, tail, o("Neg", tail))
    in_centre = o("And", o("Greater", b, _EXP_NEG_TWO), o("LessOrEqual", b, 1.0 - _EXP_NEG_TWO))
    y = o("Mul", o("Where", in_centre, centre, tail), pymath.sqrt(0.5))
    y = o("Where", o("Equal", b, 1.0), float("inf"), y)
    return [call.out(o("Where", o("Equal", b, 0.0), float("-inf"), y), x.perm)]


def i0(g, call, p):
    x = _float32(g, call, p, "I0")
    o = _Ops(g, call.base)
    y = o("Abs", x.name)
    small = o.chebyshev(o("Sub", o("Mul", y, 0.25), 1.0), I0E_SMALL)
    large = o("Div", o.chebyshev(o("Sub", o("Div", 16.0, y), 1.0), I0E_LARGE), o("Sqrt", y))
    scaled = o("Where", o("LessOrEqual", y, 8.0), small, large)
    return [call.out(o("Mul", o("Exp", y), scaled), x.perm)]


def nextafter(g, call, p):
    if _float64(call):
        raise Uncovered([(call.base, "Nextafter", "a float64 result: a true "
                          "float64 step needs the bits (no ONNX bitcast)")])
    (a, b), ref = aligned(g, call, [p["x1"], p["x2"]], "float32")
    o = _Ops(g, call.base)

    def flushed(v):
        return o("Where", o("Less", o("Abs", v), _FLOAT32_TINY), o("Mul", v, 0.0), v)

    # A zero result (x1 is zero after flushing) takes x2's sign; 1 / x2 has it
    # also for -0. It is set by a product: onnxruntime's `Where` drops -0.
    negative = o("Less", o("Reciprocal", b), 0.0)
    a, b = flushed(a), flushed(b)
    y = o("Where", o("Equal", a, b), b, a)
    y = o("Where", o("Or", o("IsNaN", a), o("IsNaN", b)), float("nan"), y)
    flip = o("Cast", o("And", o("Equal", y, 0.0), negative), to=onnx_dtype("float32"))
    return [call.out(o("Mul", y, o("Sub", 1.0, o("Mul", flip, 2.0))), ref.perm)]


def _integers(call, name):
    dtype = out_dtype(call)
    if not np.issubdtype(np.dtype(dtype), np.integer):
        raise Uncovered([(call.base, name, f"dtype {dtype} (integers only)")])
    return dtype


def _steps(dtype):
    """Euclid's steps for operands up to the dtype's magnitude, plus margin.

    The slowest pair below N is two consecutive Fibonacci numbers below N.
    """
    limit, a, b, n = 2 ** (8 * np.dtype(dtype).itemsize), 1, 1, 0
    while b <= limit:
        a, b, n = b, a + b, n + 1
    return n + 2


def _gcd(g, a, b, dtype, base):
    zero, one = g.scalar(0, np.dtype(dtype)), g.scalar(1, np.dtype(dtype))
    for _ in range(_steps(dtype)):
        nonzero = g.node("Not", [g.node("Equal", [b, zero], base)], base)
        safe = g.node("Where", [nonzero, b, one], base)
        a, b = (g.node("Where", [nonzero, b, a], base),
                g.node("Where", [nonzero, g.node("Mod", [a, safe], base, fmod=0), zero], base))
    return a


def _magnitudes(g, call, p, dtype):
    (a, b), ref = aligned(g, call, [p["x1"], p["x2"]], dtype)
    if not dtype.startswith("uint"):
        a, b = (g.node("Abs", [v], call.base) for v in (a, b))
    return a, b, ref


def gcd(g, call, p):
    dtype = _integers(call, "Gcd")
    a, b, ref = _magnitudes(g, call, p, dtype)
    return [call.out(_gcd(g, a, b, dtype, call.base), ref.perm)]


def lcm(g, call, p):
    dtype = _integers(call, "Lcm")
    a, b, ref = _magnitudes(g, call, p, dtype)
    zero, one = g.scalar(0, np.dtype(dtype)), g.scalar(1, np.dtype(dtype))
    divisor = _gcd(g, a, b, dtype, call.base)
    none = g.node("Equal", [divisor, zero], call.base)
    safe = g.node("Where", [none, one, divisor], call.base)
    product = g.node("Mul", [a, g.node("Div", [b, safe], call.base)], call.base)
    return [call.out(g.node("Where", [none, zero, product], call.base), ref.perm)]


EMITTERS = {"erfinv": erfinv, "i0": i0, "nextafter": nextafter, "gcd": gcd, "lcm": lcm}
