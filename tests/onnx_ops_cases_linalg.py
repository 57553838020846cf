"""`keras.ops.linalg` conformance cases (merged into `onnx_ops_cases`).

Matrices are cut from the case input `y` (`(batch, 7, 5, 6)`, values of a
few hundred of both signs) and scaled to order one: `_general` is a plain
matrix (partial pivoting has real work to do; 4x4 for the Jacobi-based
ops, whose graphs are larger), `_spd` a well-conditioned symmetric
positive-definite one, `_dominant` a full matrix with a boosted diagonal
for the triangular solvers (which must read only their own triangle).
`logdet` also gets matrices that are not positive-definite (TensorFlow's
NaN must be reproduced), `matrix_rank` and `pinv` rank-deficient ones
(zeroed columns). The `TF` forms reshape to a static matrix size, since
tf-keras cases run on a dynamic image size.
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


# Variants of one op share a case (a model with several outputs): each case
# costs an onnxruntime session per opset and layout.
KERAS = {
    "cholesky": lambda y: [ops.cholesky(_spd(y)), ops.cholesky(_spd(y), upper=True)],
    "cholesky_inverse": lambda y: [ops.cholesky_inverse(_dominant(y)),
                                   ops.cholesky_inverse(_dominant(y), upper=True)],
    "logdet": lambda y: ops.logdet(ops.concatenate(
        [_spd(y), _spd(y) - 6.0 * np.eye(5, dtype=F), _general(y)], axis=0)),
    "solve_triangular": lambda y: [
        ops.solve_triangular(_dominant(y), _rhs(y)),
        ops.solve_triangular(_dominant(y), _rhs(y)[..., 0], lower=True)],
    "solve": lambda y: [ops.solve(_general(y), _rhs(y)),
                        ops.solve(_dominant(y), _rhs(y)[..., 1])],
    "inv": lambda y: [ops.inv(_general(y)),
                      ops.inv(y[:, :3, :4, :4] / 100.0 + 2.0 * np.eye(4, dtype=F))],
    # Keras's TensorFlow lu_factor takes one matrix (invert_permutation is 1-D only).
    "lu_factor": lambda y: [ops.lu_factor(y[0, 0, :5, :5] / 100.0)[0],
                            _f(ops.lu_factor(y[1, 0, :5, :5] / 100.0)[1])],
    "qr": lambda y: [*ops.qr(_general(y)), *ops.qr(y[:, 0, :5, :3] / 100.0, mode="complete"),
                     *ops.qr(y[:, 0, :3, :5] / 100.0)],
    "svd": lambda y: [ops.svd(_general(y, 4), compute_uv=False),
                      ops.svd(y[:, 0, :3, :5] / 100.0, compute_uv=False)],
    "matrix_rank": lambda y: _f(ops.matrix_rank(ops.concatenate(
        [_general(y, 4), _general(y, 4) * np.array([1, 0, 1, 0], F)], axis=0))),
    "pinv": lambda y: [ops.pinv(ops.concatenate(
        [_general(y, 4), _general(y, 4) * np.array([1, 1, 0, 1], F)], axis=0)),
        ops.pinv(y[:, 0, :3, :4] / 100.0)],
    "lstsq": lambda y: [ops.lstsq(y[0, 0, :5, :3] / 100.0, y[0, 1, :5, :2] / 100.0),
                        ops.lstsq(y[1, 0, :3, :4] / 100.0, y[1, 1, :3, 0] / 100.0)],
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
        "linalg.qr": lambda y: list(tf.linalg.qr(_square(y))) + list(tf.linalg.qr(
            tf.reshape(y[:, 0, :5, :3], (-1, 5, 3)), full_matrices=True)),
        "linalg.det": lambda y: tf.linalg.det(_square(y)),
        "linalg.lu": lambda y: [tf.linalg.lu(_square(y))[0],
                                tf.cast(tf.linalg.lu(_square(y))[1], tf.float32)],
        "linalg.svd": lambda y: tf.linalg.svd(_square(y, 3), compute_uv=False),
        "linalg.logdet": lambda y: tf.linalg.logdet(
            tf.matmul(_square(y), _square(y), transpose_b=True) + 5.0 * eye),
        "linalg.triangular_solve": lambda y: tf.linalg.triangular_solve(
            _square(y) + 4.0 * eye, tf.reverse(_square(y), [2])),
    }
