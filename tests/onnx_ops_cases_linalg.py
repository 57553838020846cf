"""`keras.ops.linalg` conformance cases (merged into `onnx_ops_cases`).

Matrices are cut from the case input `y` (`(batch, 7, 5, 6)`, values of a
few hundred of both signs) and scaled to order one: `_general` is a plain
5x5 matrix (partial pivoting has real work to do), `_spd` a
well-conditioned symmetric positive-definite one, `_dominant` a full
matrix with a boosted diagonal for the triangular solvers (which must read
only their own triangle). `logdet:not_positive_definite` checks that the
NaN TensorFlow gives off positive-definite matrices is reproduced. The
`TF` forms reshape to a static matrix size, since tf-keras cases run on a
dynamic image size.
"""

import keras
import numpy as np

ops = keras.ops
F = "float32"


def _f(y):
    return ops.cast(y, F)


def _general(y, n=5):
    return y[:, 0, :n, :n] / 100.0


def _dominant(y, n=5):
    return y[:, 1, :n, :n] / 100.0 + 4.0 * np.eye(n, dtype=F)


def _spd(y, n=5):
    a = _general(y, n)
    return ops.matmul(a, ops.transpose(a, (0, 2, 1))) + float(n) * np.eye(n, dtype=F)


def _rhs(y, k=3):
    return y[:, 2, :5, :k] / 100.0


KERAS = {
    "cholesky": lambda y: ops.cholesky(_spd(y)),
    "cholesky:upper": lambda y: ops.cholesky(_spd(y), upper=True),
    "cholesky_inverse": lambda y: ops.cholesky_inverse(_dominant(y)),
    "cholesky_inverse:upper": lambda y: ops.cholesky_inverse(_dominant(y), upper=True),
    "logdet": lambda y: ops.logdet(_spd(y)),
    "logdet:not_positive_definite": lambda y: ops.logdet(ops.concatenate(
        [_spd(y), _spd(y) - 6.0 * np.eye(5, dtype=F), _general(y)], axis=0)),
    "solve_triangular": lambda y: ops.solve_triangular(_dominant(y), _rhs(y)),
    "solve_triangular:lower_vector": lambda y: ops.solve_triangular(
        _dominant(y), _rhs(y)[..., 0], lower=True),
    "solve": lambda y: ops.solve(_general(y), _rhs(y)),
    "solve:vector": lambda y: ops.solve(_dominant(y), _rhs(y)[..., 1]),
    "inv": lambda y: ops.inv(_general(y)),
    "inv:batched": lambda y: ops.inv(y[:, :3, :4, :4] / 100.0 + 2.0 * np.eye(4, dtype=F)),
    # Keras's TensorFlow lu_factor takes one matrix (invert_permutation is 1-D only).
    "lu_factor": lambda y: [ops.lu_factor(y[0, 0, :5, :5] / 100.0)[0],
                            _f(ops.lu_factor(y[1, 0, :5, :5] / 100.0)[1])],
    "qr": lambda y: list(ops.qr(_general(y))),
    "qr:complete_tall": lambda y: list(ops.qr(y[:, 0, :5, :3] / 100.0, mode="complete")),
    "qr:wide": lambda y: list(ops.qr(y[:, 0, :3, :5] / 100.0)),
    "svd": lambda y: ops.svd(_general(y), compute_uv=False),
    "svd:wide": lambda y: ops.svd(y[:, 0, :3, :5] / 100.0, compute_uv=False),
    "matrix_rank": lambda y: _f(ops.matrix_rank(ops.concatenate(
        [_general(y), _general(y) * np.array([1, 1, 0, 1, 0], F)], axis=0))),
    "pinv": lambda y: ops.pinv(ops.concatenate(
        [_general(y), _general(y) * np.array([1, 1, 0, 1, 0], F)], axis=0)),
    "pinv:wide": lambda y: ops.pinv(y[:, 0, :3, :5] / 100.0),
    "lstsq": lambda y: ops.lstsq(y[0, 0, :5, :3] / 100.0, y[0, 1, :5, :2] / 100.0),
    "lstsq:wide_vector": lambda y: ops.lstsq(y[1, 0, :3, :4] / 100.0, y[1, 1, :3, 0] / 100.0),
}
STATIC = set(KERAS)


def _square(y, n=5):
    """A static `(batch, n, n)` matrix from a dynamically sized tf-keras tensor."""
    import tensorflow as tf

    return tf.reshape(y[:, 0, :n, :n], (-1, n, n)) / 100.0


def tf_cases():
    import tensorflow as tf

    eye = np.eye(5, dtype=F)
    return {
        "linalg.inv": lambda y: tf.linalg.inv(_square(y)),
        "linalg.cholesky": lambda y: tf.linalg.cholesky(
            tf.matmul(_square(y), _square(y), transpose_b=True) + 5.0 * eye),
        "linalg.solve": lambda y: tf.linalg.solve(_square(y), tf.reverse(_square(y), [1])),
        "linalg.triangular_solve": lambda y: tf.linalg.triangular_solve(
            _square(y) + 4.0 * eye, tf.reverse(_square(y), [2])),
    }
