"""Edge values of the special-function, ordering and CTC emitters.

The conformance matrix (tests/test_onnx_ops_conformance.py) checks these
ops on ordinary values; here each runs in onnxruntime on the inputs where
an approximation or an unrolled loop would break -- erfinv next to +-1,
i0 where exp overflows, nextafter at zeros, subnormals, infinities and
NaN, gcd on the dtype's slowest Fibonacci pairs and its minimum -- against
Keras and an independent float64 reference (SciPy, NumPy, or all CTC
alignments enumerated).
"""

import itertools

import keras
import numpy as np
import onnxruntime as ort
import pytest
from scipy import special as sp

from bnconvert import flavour as flavour_lib
from bnconvert.onnx import walk
from bnconvert.onnx.graph import Uncovered

ops = keras.ops
F32 = np.float32


def _onnx(model, *inputs, opset=17):
    names = [f"in{i}" for i in range(len(model.inputs))]
    proto = walk.emit(model, flavour_lib.flavour_of(model), names, ["out"], opset)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, dict(zip(names, inputs)))[0]


def _unary(fn, x, opset=17):
    inp = keras.Input(batch_shape=x.shape, dtype=str(x.dtype))
    model = keras.Model(inp, fn(inp))
    return _onnx(model, x, opset=opset), np.asarray(model(x))


def _same_bits(got, want):
    """Equal as float32 bit patterns (zeros' signs included), NaN where NaN."""
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32)), (got, want)


def test_the_series_are_what_tools_fit_special_prints():
    import importlib.util
    import pathlib

    from bnconvert.onnx import special

    path = pathlib.Path(__file__).parents[1] / "tools" / "fit_special.py"
    spec = importlib.util.spec_from_file_location("fit_special", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for name, (f, degree) in tool.FITS.items():
        coefficients, error = tool.fit(f, degree)
        assert error < 1e-8, name  # well below float32's rounding
        np.testing.assert_allclose(getattr(special, name), coefficients, rtol=1e-9, atol=1e-15)


def test_erfinv_next_to_plus_minus_one_and_special_values():
    ulp = F32(2.0 ** -24)
    near = np.concatenate([1 - ulp * np.arange(1, 4000, 7, dtype=F32),
                           -1 + ulp * np.arange(1, 8000, 13, dtype=F32) / 2])
    special = np.array([0.0, -0.0, 1e-30, -1e-8, 0.5, -0.86, 1.0, -1.0, 1.5, -2.0, np.nan], F32)
    x = np.concatenate([near, special, np.linspace(-0.999, 0.999, 801, dtype=F32)])
    got, want = _unary(ops.erfinv, x, opset=13)
    finite = np.isfinite(want)
    np.testing.assert_array_equal(got[~finite], want[~finite])  # +-inf at +-1, NaN beyond
    np.testing.assert_allclose(got[finite], want[finite], rtol=3e-6, atol=1e-37)
    # TensorFlow rounds (x + 1) / 2 in float32; away from the ends that costs
    # nothing and both agree with the float64 inverse.
    middle = np.abs(x) < 0.99
    np.testing.assert_allclose(got[middle], sp.erfinv(x[middle].astype(np.float64)),
                               rtol=2e-6, atol=1e-7)


def test_i0_over_a_wide_range_and_where_exp_overflows():
    x = np.concatenate([np.linspace(-95.0, 95.0, 3801, dtype=F32),
                        np.array([0.0, 1e-20, 7.999, 8.0, 8.001, 88.0, 88.7, 89.0], F32)])
    got, want = _unary(ops.i0, x)
    reference = sp.i0(x.astype(np.float64))
    finite = np.isfinite(want)
    assert not finite.all()  # exp(|x|) overflows past ~88.7, in TensorFlow as here
    np.testing.assert_array_equal(got[~finite], want[~finite])
    np.testing.assert_allclose(got[finite], reference[finite], rtol=2e-6)
    np.testing.assert_allclose(got[finite], want[finite], rtol=2e-6)


def test_nextafter_bitwise_at_zeros_subnormals_infinities_and_nan():
    tiny, sub, big = np.finfo(F32).tiny, F32(1e-45), np.finfo(F32).max
    pairs = [(0, 1), (0, -1), (-0.0, 1), (-0.0, -0.0), (0, -0.0), (1, 2), (1, 0), (2, 3),
             (2, 1), (0.5, 0.5), (sub, 1), (sub, 0), (-sub, -1), (sub, sub), (0, sub),
             (tiny, 0), (tiny, 1), (big, np.inf), (-big, -np.inf), (np.inf, 0), (-np.inf, 0),
             (np.inf, np.inf), (np.nan, 1), (1, np.nan), (3e-39, -3e-39), (-7.5, 1e30)]
    a, b = (np.array(column, F32) for column in zip(*pairs))
    x1 = keras.Input(batch_shape=a.shape)
    x2 = keras.Input(batch_shape=b.shape)
    model = keras.Model([x1, x2], ops.nextafter(x1, x2))
    got, want = _onnx(model, a, b), np.asarray(model([a, b]))
    _same_bits(got, want)
    # NumPy's float64 step cast back, for the normal numbers TensorFlow does not flush.
    normal = (np.abs(a) >= tiny) | (a == 0) & (np.abs(b) >= tiny)
    numpy = np.nextafter(a.astype(np.float64), b.astype(np.float64))
    with np.errstate(over="ignore"):
        _same_bits(got[normal & (a != 0)], numpy[normal & (a != 0)].astype(F32))


def _fibonacci(n):
    a, b = 1, 1
    for _ in range(n):
        a, b = b, a + b
    return a


@pytest.mark.parametrize("dtype,fib", [("int32", 45), ("int64", 91), ("int8", 10)])
def test_gcd_and_lcm_on_the_slowest_pairs_and_the_extremes(dtype, fib):
    info = np.iinfo(dtype)
    pairs = [(_fibonacci(fib), _fibonacci(fib - 1)), (-_fibonacci(fib), _fibonacci(fib - 1)),
             (0, 0), (0, -5), (-12, 18), (12, -18), (info.max, info.max - 1),
             (info.min, info.min), (info.min, 2), (7, 0), (-9, -6)]
    a, b = (np.array(column, dtype) for column in zip(*pairs))
    x1 = keras.Input(batch_shape=a.shape, dtype=dtype)
    x2 = keras.Input(batch_shape=b.shape, dtype=dtype)
    for op, reference in ((ops.gcd, np.gcd), (ops.lcm, np.lcm)):
        model = keras.Model([x1, x2], op(x1, x2))
        got, want = _onnx(model, a, b), np.asarray(model([a, b]))
        np.testing.assert_array_equal(got, want)
        ok = (a != info.min) & (b != info.min)
        with np.errstate(over="ignore"):
            np.testing.assert_array_equal(got[ok], reference(a, b)[ok])


@pytest.mark.parametrize("side", ["left", "right"])
def test_searchsorted_with_the_sequence_as_a_second_input(side):
    sequence = np.array([-3.0, -1.0, -1.0, 0.0, 2.5, 7.0], F32)
    values = np.array([-5, -3, -2, -1, 0, 0.5, 2.5, 7, 8, np.nan], F32)
    seq = keras.Input(batch_shape=sequence.shape)
    val = keras.Input(batch_shape=values.shape)
    model = keras.Model([seq, val], ops.searchsorted(seq, val, side=side))
    got = _onnx(model, sequence, values, opset=13)
    np.testing.assert_array_equal(got, np.asarray(model([sequence, values])))
    # NumPy sorts NaN last for both sides; TensorFlow's lower bound puts it first.
    np.testing.assert_array_equal(got[:-1], np.searchsorted(sequence, values[:-1], side))


@pytest.mark.parametrize("axis,kth", [(-1, 0), (-1, 2), (0, 1), (None, 3), (-1, 5)])
def test_argpartition_is_what_keras_tensorflow_returns_with_ties(axis, kth):
    x = np.random.default_rng(5).integers(-3, 4, size=(6, 4)).astype(F32)
    got, want = _unary(lambda t: ops.argpartition(t, kth, axis=axis), x)
    np.testing.assert_array_equal(got, want)


def _ctc_by_enumeration(logits, labels, label_lengths, logit_lengths, blank=0):
    """-log of the summed probability of every path that collapses to the label."""
    out = []
    for z, target, n, steps in zip(logits, labels, label_lengths, logit_lengths):
        p = np.exp(z[:steps] - z[:steps].max(-1, keepdims=True)).astype(np.float64)
        p /= p.sum(-1, keepdims=True)
        total = 0.0
        for path in itertools.product(range(z.shape[-1]), repeat=steps):
            collapsed = [c for i, c in enumerate(path) if c != blank
                         and (i == 0 or path[i - 1] != c)]
            if collapsed == list(target[:n]):
                total += np.prod(p[np.arange(steps), path])
        with np.errstate(divide="ignore"):
            out.append(-np.log(total))
    return np.array(out)


@pytest.mark.parametrize("mask_index", [0, 2])
def test_ctc_loss_against_every_alignment(mask_index):
    rng = np.random.default_rng(7)
    logits = (rng.normal(size=(5, 5, 4)) * 2).astype(F32)
    # The last label needs 4 steps (1, blank, 1, 3) and has 3: no alignment.
    labels = np.array([[1, 1, 3], [3, 1, 0], [1, 3, 1], [3, 0, 0], [1, 1, 3]], np.int32)
    label_lengths = np.array([3, 2, 2, 1, 3], np.int32)
    logit_lengths = np.array([5, 4, 5, 3, 3], np.int32)
    inputs = [keras.Input(batch_shape=a.shape, dtype=str(a.dtype))
              for a in (labels, logits, label_lengths, logit_lengths)]
    model = keras.Model(inputs, ops.ctc_loss(*inputs, mask_index=mask_index))
    feeds = (labels, logits, label_lengths, logit_lengths)
    got = _onnx(model, *feeds, opset=13)
    # TensorFlow's floor makes the impossible one finite (about 700); so does the graph.
    np.testing.assert_allclose(got, np.asarray(model(list(feeds))), rtol=1e-5)
    want = _ctc_by_enumeration(logits, labels, label_lengths, logit_lengths, mask_index)
    assert np.isinf(want[-1]) and 650 < got[-1] < 800
    np.testing.assert_allclose(got[:-1], want[:-1], rtol=1e-5)


def test_what_the_emitters_refuse():
    x = keras.Input(batch_shape=(2, 3), dtype="float64")
    for fn, why in ((lambda t: ops.nextafter(t, t + 1.0), "float64 step"),
                    (ops.erfinv, "float32 only")):
        with pytest.raises(Uncovered, match=why):
            model = keras.Model(x, fn(x))
            walk.emit(model, flavour_lib.flavour_of(model), ["x"], ["y"], 17)
    y = keras.Input(batch_shape=(2, 9))
    # TensorFlow scatters a (kth + 1, n) mask into the (2, n) input: it fails, so does the export.
    model = keras.Model(y, ops.argpartition(y, 4))
    with pytest.raises(Uncovered, match="TensorFlow backend fails"):
        walk.emit(model, flavour_lib.flavour_of(model), ["x"], ["y"], 17)
    # Keras 3.15 records a 2-D channels-last adaptive pool as rank 5: ops built on that are not
    # exported (inside a layer's call the op is; see onnx_ops_cases_special).
    z = keras.Input((7, 5, 6))
    model = keras.Model(z, ops.adaptive_average_pool(z, (3, 2)) * 2.0)
    with pytest.raises(Uncovered, match="built later ops on it"):
        walk.emit(model, flavour_lib.flavour_of(model), ["x"], ["y"], 17)
