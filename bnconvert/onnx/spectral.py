"""Fourier transforms as ONNX nodes: `keras.ops` fft, fft2, ifft2, rfft, irfft, stft, istft
and the MelSpectrogram layer.

Keras passes complex values as a `(real, imag)` pair of float tensors, so
none of these needs a complex dtype. Each transform over a static length
`n` is a product with its DFT matrix, built here in float64 and stored in
float32: one `MatMul` per axis transformed. fft, fft2 and ifft2 over an
axis whose length is known only at run time (a text model's sequence,
recorded by `sized_ops`) build that matrix in the graph from the length.
The short-time transforms fold the framing, window and DFT into one
strided `Conv` (stft) or `ConvTranspose` (istft: inverse DFT, synthesis
window and overlap-add).
The windows, the inverse window's normalisation and the cropping follow
Keras's TensorFlow backend (`tf.signal`).
"""

import numpy as np
from onnx import TensorProto
from onnx import numpy_helper

from bnconvert.onnx.graph import Uncovered

FLOAT, DOUBLE = TensorProto.FLOAT, TensorProto.DOUBLE


def _refuse(call, op_type, why):
    raise Uncovered([(call.base, op_type, why)])


def _length(call, op_type, x, axis=-1):
    n = x.shape[axis]
    if n is None:
        _refuse(call, op_type, "an axis of unknown size (the DFT matrix needs its length)")
    return int(n)


def _angles(n_in, n_out, n):
    """2 pi t k / n for t < n_in (rows) and k < n_out (columns), in float64."""
    t = np.arange(n_in)[:, None]
    k = np.arange(n_out)[None, :]
    return 2.0 * np.pi * ((t * k) % n) / n  # reduced mod n: exact angles for large t k


def _matmul(g, call, x, matrix, tag):
    return g.node("MatMul", [x, g.constant(matrix, f"{call.base}/{tag}")], call.base)


def _complex_dft(g, call, real, imag, n, inverse):
    """(real, imag) of the DFT of `real + i imag` along the last axis (length `n`, or None)."""
    if n is None:
        return _run_time_dft(g, call, real, imag, inverse)
    angle = _angles(n, n, n)
    cos, sin = np.cos(angle), np.sin(angle)
    sign = 1.0 if inverse else -1.0
    # [re, im] @ [[C, s S], [-s S, C]]: re' = re C - s im S, im' = s re S + im C.
    matrix = np.block([[cos, sign * sin], [-sign * sin, cos]])
    if inverse:
        matrix = matrix / n
    both = g.node("Concat", [real, imag], call.base, axis=-1)
    out = _matmul(g, call, both, matrix, "dft")
    return g.node("Split", [out, g.ints([n, n], "split")], call.base, outputs=2, axis=-1)


def _run_time_dft(g, call, real, imag, inverse):
    """`_complex_dft` along a last axis whose length n is known only at run time.

    The matrix is built in the graph from n as the static one is in NumPy:
    (t k) mod n exactly in int64, the angle and its cosine and sine in
    float64, then stored in float32. The two halves of the output are
    two products ([re, im] with [C; -s S] and [s S; C]), so no split
    needs n.
    """
    base = call.base
    size = g.node("Gather", [g.node("Shape", [real], base), g.ints([-1])], base, axis=0)
    t = g.node("Range", [_int64_scalar(g, base, 0), g.node(
        "Reshape", [size, g.ints(np.zeros(0))], base), _int64_scalar(g, base, 1)], base)
    products = g.node("Mul", [g.node("Reshape", [t, g.ints([-1, 1])], base),
                              g.node("Reshape", [t, g.ints([1, -1])], base)], base)
    turns = g.node("Div", [g.node("Cast", [g.node("Mod", [products, size], base)], base,
                                  to=DOUBLE), g.node("Cast", [size], base, to=DOUBLE)], base)
    angle = g.node("Mul", [turns, g.scalar(2.0 * np.pi, np.float64)], base)
    cos, sin = (g.node("Cast", [g.node(op, [angle], base)], base, to=FLOAT)
                for op in ("Cos", "Sin"))
    forward_sin = sin if inverse else g.node("Neg", [sin], base)  # s S, s = +1 inverse
    both = g.node("Concat", [real, imag], base, axis=-1)
    out = [g.node("MatMul", [both, g.node("Concat", rows, base, axis=0)], base) for rows in (
        [cos, g.node("Neg", [forward_sin], base)], [forward_sin, cos])]
    if inverse:
        length = g.node("Cast", [size], base, to=FLOAT)
        out = [g.node("Div", [o, length], base) for o in out]
    return out


def _int64_scalar(g, base, value):
    return g.node("Constant", [], base, value=numpy_helper.from_array(np.array(value, np.int64)))


def _pair(g, call, p, op_type):
    real, imag = (g.keras(v) for v in p["x"])
    if real.shape != imag.shape:
        _refuse(call, op_type, "real and imaginary parts of different shapes")
    return real, imag


def _swap_last(g, call, name, rank):
    perm = list(range(rank))
    perm[-2:] = perm[-1], perm[-2]
    return g.node("Transpose", [name], call.base, perm=perm)


def _fft(g, call, p):
    real, imag = _pair(g, call, p, "FFT")
    out = _complex_dft(g, call, real.name, imag.name, real.shape[-1], False)
    return [call.out(out[0]), call.out(out[1], index=1)]


def _fft2_of(inverse, op_type):
    def emit(g, call, p):
        real, imag = _pair(g, call, p, op_type)
        if real.rank < 2:
            _refuse(call, op_type, "a tensor of rank < 2")
        w, h = real.shape[-1], real.shape[-2]
        re, im = _complex_dft(g, call, real.name, imag.name, w, inverse)
        re, im = (_swap_last(g, call, v, real.rank) for v in (re, im))
        re, im = _complex_dft(g, call, re, im, h, inverse)
        re, im = (_swap_last(g, call, v, real.rank) for v in (re, im))
        return [call.out(re), call.out(im, index=1)]
    return emit


def _fit_last(g, call, name, have, want, rank):
    """The last axis cropped or zero-padded from `have` to `want`, as tf.signal does."""
    if have > want:
        return g.node("Slice", [name, g.ints([0]), g.ints([want]), g.ints([rank - 1])],
                      call.base)
    if have < want:
        pads = [0] * (2 * rank)
        pads[2 * rank - 1] = want - have
        return g.node("Pad", [name, g.ints(pads, "pads")], call.base)
    return name


def _half_spectrum(g, call, real, imag, have, bins):
    """`[real, imag]` side by side on the last axis, each fitted from `have` to `bins` bins."""
    parts = [_fit_last(g, call, v.name, have, bins, real.rank) for v in (real, imag)]
    return g.node("Concat", parts, call.base, axis=-1)


def _rfft(g, call, p):
    x = g.keras(p["x"])
    have = _length(call, "RFFT", x)
    n = int(p.get("fft_length") or have)
    bins = n // 2 + 1
    signal = _fit_last(g, call, x.name, have, n, x.rank)
    angle = _angles(n, bins, n)
    matrix = np.concatenate([np.cos(angle), -np.sin(angle)], axis=1)
    out = _matmul(g, call, signal, matrix, "rdft")
    re, im = g.node("Split", [out, g.ints([bins, bins], "split")], call.base, outputs=2, axis=-1)
    return [call.out(re), call.out(im, index=1)]


def _inverse_real_dft(n, bins):
    """[2 bins, n]: a signal of length `n` from (real, imag) of its first `bins` bins.

    Bins 1 .. n/2 stand for their mirror images too (counted twice); the
    imaginary parts of DC and, for even `n`, Nyquist do not contribute.
    """
    weight = np.full(bins, 2.0)
    weight[0] = 1.0
    if n % 2 == 0 and bins > n // 2:
        weight[n // 2] = 1.0
    angle = _angles(n, bins, n).T  # [bins, n]
    cos = weight[:, None] * np.cos(angle) / n
    sin = -weight[:, None] * np.sin(angle) / n
    sin[0] = 0.0
    if n % 2 == 0 and bins > n // 2:
        sin[n // 2] = 0.0
    return np.concatenate([cos, sin], axis=0)


def _irfft(g, call, p):
    real, imag = _pair(g, call, p, "IRFFT")
    have = _length(call, "IRFFT", real)
    n = int(p.get("fft_length") or 2 * (have - 1))
    if n < 1:
        _refuse(call, "IRFFT", "an output length below 1")
    bins = n // 2 + 1
    both = _half_spectrum(g, call, real, imag, have, bins)
    return [call.out(_matmul(g, call, both, _inverse_real_dft(n, bins), "irdft"))]


def _window(call, op_type, window, length):
    """The analysis window of `length` samples, as Keras's TensorFlow backend builds it."""
    if window is None:
        return None
    if isinstance(window, str):
        # tf.signal's periodic windows: a_0 - a_1 cos(2 pi k / N).
        a0 = {"hann": 0.5, "hamming": 0.54}.get(window)
        if a0 is None:
            _refuse(call, op_type, f"window={window!r}")
        k = np.arange(length)
        return a0 - (1.0 - a0) * np.cos(2.0 * np.pi * k / length)
    if hasattr(window, "name") and hasattr(window, "perm"):
        _refuse(call, op_type, "a window computed in the graph (pass a constant)")
    window = np.asarray(window, np.float64)
    if window.shape != (length,):
        _refuse(call, op_type, f"a window of shape {window.shape}, not ({length},)")
    return window


def _framed_window(call, op_type, p):
    """(fft_length, stride, the window padded to fft_length or None)."""
    n, length = int(p["fft_length"]), int(p["sequence_length"])
    stride = int(p["sequence_stride"])
    if n < length or stride < 1:
        _refuse(call, op_type, "fft_length < sequence_length or a stride below 1")
    window = _window(call, op_type, p.get("window", "hann"), length)
    if window is not None:
        left = (n - length) // 2
        window = np.pad(window, (left, n - length - left))
    return n, stride, window


def _inner(call, op_type, dims):
    """The static sizes between the batch and the transformed axes."""
    if None in dims:
        _refuse(call, op_type, "an inner axis of unknown size")
    return [int(d) for d in dims]


def _flat_signal(g, call, x):
    """`x` of shape [..., T] as [prod(...), 1, T] for a 1-D convolution."""
    return g.node("Reshape", [x.name, g.ints([-1, 1, x.shape[-1]])], call.base)


def _short_time(g, call, x, p):
    """(real, imag) names of the stft of `x` ([..., T]), each [..., frames, bins]."""
    if x.rank < 2:
        _refuse(call, "STFT", "a tensor of rank < 2")
    n, stride, window = _framed_window(call, "STFT", p)
    length = _length(call, "STFT", x)
    signal = _flat_signal(g, call, x)
    if p.get("center", True):
        if n // 2 >= length:
            _refuse(call, "STFT", "a reflect padding as long as the signal")
        signal = g.node("Pad", [signal, g.ints([0, 0, n // 2, 0, 0, n // 2], "pads")],
                        call.base, mode="reflect")
        length += 2 * (n // 2)
    if length < n:
        _refuse(call, "STFT", "a signal shorter than one frame")
    bins = n // 2 + 1
    angle = _angles(n, bins, n)
    kernel = np.concatenate([np.cos(angle), -np.sin(angle)], axis=1)  # [n, 2 bins]
    if window is not None:
        kernel = kernel * window[:, None]
    weight = g.constant(kernel.T[:, None, :], f"{call.base}/stft_kernel")
    frames = g.node("Conv", [signal, weight], call.base, kernel_shape=[n], strides=[stride])
    frames = g.node("Transpose", [frames], call.base, perm=[0, 2, 1])  # [B, F, 2 bins]
    count = (length - n) // stride + 1
    shape = [-1] + _inner(call, "STFT", x.shape[1:-1]) + [count, 2 * bins]
    frames = g.node("Reshape", [frames, g.ints(shape)], call.base)
    return g.node("Split", [frames, g.ints([bins, bins], "split")], call.base, outputs=2,
                  axis=-1)


def _stft(g, call, p):
    re, im = _short_time(g, call, g.keras(p["x"]), p)
    return [call.out(re), call.out(im, index=1)]


def mel_spectrogram(g, call):
    """MelSpectrogram: |stft| ** mag_exp on the layer's own mel matrix, optionally in dB."""
    layer = call.layer
    x = g.keras(call.inputs[0])
    p = {"fft_length": layer.fft_length, "sequence_length": layer.sequence_length,
         "sequence_stride": layer.sequence_stride, "window": layer.window, "center": True}
    re, im = _short_time(g, call, x, p)
    power = g.node("Add", [g.node("Mul", [re, re], call.base), g.node("Mul", [im, im], call.base)],
                   call.base)
    spec = g.node("Sqrt", [power], call.base)
    if float(layer.mag_exp) != 1.0:
        spec = g.node("Pow", [spec, g.scalar(layer.mag_exp)], call.base)
    bins = layer.fft_length // 2 + 1
    # Keras's own matrix, computed once here as Keras computes it per call.
    matrix = np.asarray(layer.linear_to_mel_weight_matrix(
        num_mel_bins=layer.num_mel_bins, num_spectrogram_bins=bins,
        sampling_rate=layer.sampling_rate, lower_edge_hertz=layer.min_freq,
        upper_edge_hertz=layer.max_freq), np.float32)
    mel = _matmul(g, call, spec, matrix, "mel")
    if layer.power_to_db:
        floor = float(layer.min_power)
        ten_log10 = 10.0 / np.log(10.0)
        db = g.node("Mul", [g.node("Log", [g.node("Max", [mel, g.scalar(floor)], call.base)],
                                   call.base), g.scalar(ten_log10)], call.base)
        ref = 10.0 * np.log10(max(abs(float(layer.ref_power)), floor))
        db = g.node("Sub", [db, g.scalar(ref)], call.base)
        # The floor is top_db below the largest value of the whole batch, as in Keras.
        peak = g.node("ReduceMax", [db], call.base, keepdims=0)
        mel = g.node("Max", [db, g.node("Sub", [peak, g.scalar(layer.top_db)], call.base)],
                     call.base)
    perm = list(range(x.rank + 1))
    perm[-2:] = perm[-1], perm[-2]
    return [call.out(g.node("Transpose", [mel], call.base, perm=perm))]


def _synthesis_window(window, stride):
    """tf.signal.inverse_stft_window_fn: the window over the overlapping squares' sum."""
    n = window.shape[0]
    overlaps = -(-n // stride)
    squares = np.pad(window ** 2, (0, overlaps * stride - n)).reshape(overlaps, stride)
    denominator = np.tile(squares.sum(axis=0), overlaps)[:n]
    with np.errstate(divide="ignore", invalid="ignore"):
        return window / denominator


def _istft(g, call, p):
    real, imag = _pair(g, call, p, "ISTFT")
    n, stride, window = _framed_window(call, "ISTFT", p)
    if real.rank < 2:
        _refuse(call, "ISTFT", "a tensor of rank < 2")
    frames, have = _length(call, "ISTFT", real, -2), _length(call, "ISTFT", real)
    bins = n // 2 + 1
    both = _half_spectrum(g, call, real, imag, have, bins)  # [..., F, 2 bins]
    both = g.node("Reshape", [both, g.ints([-1, frames, 2 * bins])], call.base)
    both = g.node("Transpose", [both], call.base, perm=[0, 2, 1])  # [B, 2 bins, F]
    kernel = _inverse_real_dft(n, bins)  # [2 bins, n]
    if window is not None:
        kernel = kernel * _synthesis_window(window, stride)[None, :]
    weight = g.constant(kernel[:, None, :], f"{call.base}/istft_kernel")
    signal = g.node("ConvTranspose", [both, weight], call.base, kernel_shape=[n],
                    strides=[stride])  # overlap-add: [B, 1, (F - 1) stride + n]
    total = (frames - 1) * stride + n
    start = n // 2 if p.get("center", True) else 0
    if p.get("length") is not None:
        end = start + int(p["length"])
    else:
        end = total - n // 2 if p.get("center", True) else total
    signal = g.node("Slice", [signal, g.ints([start]), g.ints([max(end, start)]), g.ints([2])],
                    call.base)
    out_shape = [-1] + _inner(call, "ISTFT", real.shape[1:-2]) + [max(min(end, total) - start, 0)]
    return [call.out(g.node("Reshape", [signal, g.ints(out_shape)], call.base))]


EMITTERS = {
    "fft": _fft,
    "fft2": _fft2_of(False, "FFT2"),
    "ifft2": _fft2_of(True, "IFFT2"),
    "rfft": _rfft,
    "irfft": _irfft,
    "stft": _stft,
    "istft": _istft,
}
LAYER_EMITTERS = {"MelSpectrogram": mel_spectrogram}
