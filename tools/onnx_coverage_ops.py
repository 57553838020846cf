"""How much of `keras.ops` the native ONNX exporter covers.

Usage: KERAS_BACKEND=tensorflow python tools/onnx_coverage_ops.py [--list]

The cases are every public function of `keras.ops` (which includes
`keras.ops.nn`, `.numpy`, `.linalg` and `.math`) and of `keras.ops.image`.
Each one is:

- covered: it has an emitter in `bnconvert.onnx.ops.EMITTERS`, and
  tests/test_onnx_ops_conformance.py checks every emitter in onnxruntime
  against Keras (test_every_emitter_has_a_case fails otherwise);
- refused by name (`NO_ONNX_MEANING`): no graph op to translate -- the
  function builds a constant from numbers, inspects a tensor, takes Python
  callables, or works on complex numbers, which ONNX tensors cannot hold.
  These are left out of the percentage;
- uncovered (`UNCOVERED`, with the reason): it has an ONNX meaning and no
  emitter yet. These count against the percentage; an export that meets one
  falls back to tf2onnx with the op named.

Prints the percentage of covered cases among those with an ONNX meaning,
and among all cases.
"""

import argparse
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONSTANT = "builds a constant from Python numbers (no tensor input): already a constant"
_INSPECT = "inspects a tensor or converts it (no graph op)"
_CALLABLE = "takes Python callables (control flow, autodiff, vectorization): no op graph"
_COMPLEX = "complex numbers: ONNX tensors have no complex dtype"
_RANDOM = "random augmentation (draws from a seed): no deterministic inference meaning"
NO_ONNX_MEANING = {
    **dict.fromkeys(["arange", "array", "bartlett", "blackman", "empty", "eye", "full",
                     "geomspace", "hamming", "hanning", "identity", "kaiser", "linspace",
                     "logspace", "ones", "tri", "zeros"], _CONSTANT),
    **dict.fromkeys(["convert_to_numpy", "convert_to_tensor", "dtype", "is_tensor", "ndim",
                     "shape", "size"], _INSPECT),
    # map, vectorized_map, scan and fori_loop are exported (an ONNX Loop around the traced
    # function): those are counted.
    **dict.fromkeys(["associative_scan", "cond", "custom_gradient", "jvp", "switch",
                     "vectorize", "while_loop"], _CALLABLE),
    # fft, rfft, stft and the rest take and return (real, imag) pairs, and real, imag,
    # conj, angle and isreal have a meaning on real tensors: those are counted. eig
    # returns complex64 even for a real matrix.
    **dict.fromkeys(["eig", "polar", "view_as_complex", "view_as_real"], _COMPLEX),
    "image.elastic_transform": _RANDOM,
}
_DATA_SHAPE = "output shape depends on the values (ONNX could, the emitters need static shapes)"
UNCOVERED_REASONS = {
    **dict.fromkeys(["nonzero", "unique", "bincount", "histogram", "ctc_decode"], _DATA_SHAPE),
    "view": "reinterprets the bits as another dtype: no ONNX op",
    "eigh": "TensorFlow's eigenvector signs come out of Eigen's tridiagonal QR iterations, with "
            "no convention a graph can reproduce (Jacobi gives the eigenvalues, not those signs)",
}


def cases():
    """The public function names of `keras.ops` and `keras.ops.image` ("image.<name>")."""
    import inspect

    import keras

    names = {n for n in dir(keras.ops) if not n.startswith("_")
             and callable(getattr(keras.ops, n)) and not inspect.isclass(getattr(keras.ops, n))}
    image = {f"image.{n}" for n in dir(keras.ops.image) if not n.startswith("_")
             and n not in names and callable(getattr(keras.ops.image, n))}
    return sorted(names | image)


def classify():
    """`(covered, refused, uncovered)`: lists of names; the last two with reasons."""
    from bnconvert.onnx import ops

    covered, refused, uncovered = [], [], []
    for name in cases():
        short = name.split(".")[-1]
        if short in ops.EMITTERS:
            covered.append(name)
        elif name in NO_ONNX_MEANING:
            refused.append((name, NO_ONNX_MEANING[name]))
        else:
            uncovered.append((name, UNCOVERED_REASONS.get(name, "not written yet")))
    return covered, refused, uncovered


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="list every case")
    args = parser.parse_args(argv)
    covered, refused, uncovered = classify()
    meaningful = len(covered) + len(uncovered)
    total = meaningful + len(refused)
    if args.list:
        print("covered:", " ".join(covered))
    print(f"\nrefused by name ({len(refused)}, no ONNX meaning):")
    for name, why in refused:
        print(f"  {name}: {why}")
    print(f"\nuncovered ({len(uncovered)}, counted against the percentage):")
    for name, why in uncovered:
        print(f"  {name}: {why}")
    print(f"\nkeras.ops cases: {total}; covered natively and checked: {len(covered)}")
    print(f"coverage of the {meaningful} cases with an ONNX meaning: "
          f"{100.0 * len(covered) / meaningful:.1f}%")
    print(f"coverage of all {total} cases: {100.0 * len(covered) / total:.1f}%")


if __name__ == "__main__":
    main()
