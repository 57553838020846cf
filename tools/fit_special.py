"""Fits the Chebyshev series `bnconvert/onnx/special.py` evaluates.

Usage: python tools/fit_special.py   (needs scipy; prints the coefficients)

Each series approximates a smooth function on [-1, 1] (after a change of
variable) to well below float32's rounding, from scipy's float64 values:

- `NDTRI_CENTER`: ndtri(b) / c for c = b - 1/2 in [-c_max, c_max],
  c_max = 1/2 - exp(-2), as a function of t = 2 c^2 / c_max^2 - 1;
- `NDTRI_TAIL`: -ndtri(b) for b in [2**-26, exp(-2)], as a function of
  u = 1 / sqrt(-2 log b), mapped linearly onto [-1, 1];
- `I0E_SMALL`: exp(-x) I0(x) for x in [0, 8], of t = x / 4 - 1;
- `I0E_LARGE`: sqrt(x) exp(-x) I0(x) for x >= 8, of t = 16 / x - 1.
"""

import os
import sys

import numpy as np
from numpy.polynomial import chebyshev
from scipy import special

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bnconvert.onnx.special import C_MAX, U_HI, U_LO  # noqa: E402


def fit(f, degree):
    """`(coefficients, max relative error on [-1, 1])` of `f`'s Chebyshev interpolant."""
    coefficients = chebyshev.chebinterpolate(f, degree)
    t = np.linspace(-0.9999, 1.0, 20001)
    error = np.max(np.abs(chebyshev.chebval(t, coefficients) / f(t) - 1.0))
    return coefficients, error


def _center(t):
    c = np.sqrt((t + 1.0) / 2.0) * C_MAX
    c = np.where(c == 0.0, 1e-300, c)
    return special.ndtri(0.5 + c) / c


def _tail(t):
    u = U_LO + (t + 1.0) / 2.0 * (U_HI - U_LO)
    return -special.ndtri(np.exp(-0.5 / u ** 2))


def _i0e_large(t):
    x = 16.0 / np.maximum(t + 1.0, 1e-300)
    return np.sqrt(x) * special.i0e(x)


FITS = {
    "NDTRI_CENTER": (_center, 12), "NDTRI_TAIL": (_tail, 15),
    "I0E_SMALL": (lambda t: special.i0e(4.0 * (t + 1.0)), 18), "I0E_LARGE": (_i0e_large, 9),
}

if __name__ == "__main__":
    for name, (f, degree) in FITS.items():
        coefficients, error = fit(f, degree)
        print(f"# max relative error {error:.1e}")
        print(f"{name} = ({', '.join(repr(float(c)) for c in coefficients)})")
