"""`keras.ops` Fourier-transform and complex-part cases of the conformance matrix (see onnx_ops_cases).

The (real, imag) pairs come from the test's 4-D tensor `y` of large values;
the short-time transforms see it flattened into one long signal per example.
"""

import keras

ops = keras.ops


def _signal(y):
    return ops.reshape(y, (-1, 7 * 5 * 6)) / 40.0


def _spectrum(y):
    """A (real, imag) stft of the signal: the input of istft."""
    return ops.stft(_signal(y), 16, 4, 16)


KERAS = {
    "fft": lambda y: ops.fft((y, y * 0.5 - 3.0)),
    "fft2": lambda y: ops.fft2((y, -y)),
    "ifft2": lambda y: ops.ifft2((y, y * 0.25)),
    "rfft": lambda y: ops.rfft(y),
    "rfft:padded": lambda y: ops.rfft(y, fft_length=9),
    "rfft:cropped": lambda y: ops.rfft(y, fft_length=4),
    "irfft": lambda y: ops.irfft((y, y * 0.5)),
    "irfft:odd": lambda y: ops.irfft((y, -y), fft_length=9),
    "stft": lambda y: ops.stft(_signal(y), 16, 8, 32),
    "stft:hamming_uncentered": lambda y: ops.stft(_signal(y), 20, 6, 24, window="hamming",
                                                  center=False),
    "stft:no_window": lambda y: ops.stft(_signal(y), 16, 5, 16, window=None),
    "istft": lambda y: ops.istft(_spectrum(y), 16, 4, 16),
    "istft:length": lambda y: ops.istft(_spectrum(y), 16, 4, 16, length=150),
    "istft:uncentered": lambda y: ops.istft(_spectrum(y), 16, 4, 16, center=False),
    # The complex-number functions on real tensors.
    "real": lambda y: ops.real(y), "conj": lambda y: ops.conj(y) * 2.0,
    "conjugate": lambda y: ops.conjugate(-y), "imag": lambda y: ops.imag(y) + 1.0,
    "angle": lambda y: ops.angle(y), "isreal": lambda y: ops.cast(ops.isreal(y), "float32"),
}
STATIC = {"fft2", "ifft2", "stft", "stft:hamming_uncentered", "stft:no_window", "istft", "istft:length",
          "istft:uncentered"}
TF = {}
