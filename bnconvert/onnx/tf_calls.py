"""Direct TensorFlow calls on symbolic tensors, recorded as the `keras.ops` that compute them.

On the TensorFlow backend some keras-hub layers call TensorFlow itself
("work around dynamic shape bug"): `tf.gather(..., batch_dims=3)` in
DeBERTa-v3's disentangled attention, `tf.linalg.band_part` for the
sliding-window masks of Qwen3 and Gemma. TensorFlow refuses the symbolic
tensors of a traced call. Within `tf_calls_through_ops(keras)`, such a call
given a symbolic tensor is recorded as the `keras.ops` functions that give
the same numbers (`ops.take` / `ops.take_along_axis`; a `where` over
`arange` rows and columns); a call on concrete tensors, and any form
without an exact equivalent here (`tf.gather` with `batch_dims` over more
than one index axis), is TensorFlow's own, which refuses symbolic tensors
as before.
"""

import contextlib

import numpy as np


@contextlib.contextmanager
def tf_calls_through_ops(keras):
    """Within: `tf.gather` and `tf.linalg.band_part` of symbolic tensors record `keras.ops`."""
    import tensorflow as tf

    ops = keras.ops

    def symbolic(*values):
        return any(keras.backend.is_keras_tensor(v) for v in keras.tree.flatten(values))

    gather, band_part = tf.gather, tf.linalg.band_part

    def gather_through_ops(params, indices, validate_indices=None, axis=None, batch_dims=0,
                           name=None):
        routed = _gathered(ops, params, indices, axis, batch_dims) \
            if symbolic(params, indices) else None
        if routed is None:
            return gather(params, indices, validate_indices, axis, batch_dims, name)
        return routed

    def band_part_through_ops(input, num_lower, num_upper, name=None):  # noqa: A002 - TF's name
        if not symbolic(input, num_lower, num_upper):
            return band_part(input, num_lower, num_upper, name)
        return _band_part(ops, input, num_lower, num_upper)

    tf.gather, tf.linalg.band_part = gather_through_ops, band_part_through_ops
    try:
        yield
    finally:
        tf.gather, tf.linalg.band_part = gather, band_part


def _gathered(ops, params, indices, axis, batch_dims):
    """`tf.gather(params, indices, axis=axis, batch_dims=batch_dims)` in `keras.ops`, or None.

    With `batch_dims` b, TensorFlow gathers along `axis` (b by default)
    separately for each index of the first b axes, which both tensors
    share: for one index axis after them (`indices` of rank b + 1) and
    `axis` the last of `params`, that is `take_along_axis`.
    """
    rank, index_rank = len(params.shape), len(getattr(indices, "shape", np.shape(indices)))
    batch = batch_dims + index_rank if batch_dims < 0 else batch_dims
    axis = batch if axis is None else axis + rank if axis < 0 else axis
    if batch == 0:
        return ops.take(params, indices, axis=axis)
    if index_rank == batch + 1 and axis == batch == rank - 1:
        return ops.take_along_axis(params, indices, axis=axis)
    return None


def _band_part(ops, x, lower, upper):
    """`x` where row i and column j keep `i - j <= lower` and `j - i <= upper` (< 0: all); else 0.

    `lower` and `upper` may be numbers or symbolic scalars.
    """
    shape = ops.shape(x)
    rows = ops.expand_dims(ops.arange(shape[-2], dtype="int32"), 1)
    below = rows - ops.expand_dims(ops.arange(shape[-1], dtype="int32"), 0)
    keep = ops.logical_and(_within(ops, below, lower), _within(ops, -below, upper))
    if x.dtype == "bool":  # onnxruntime's Where takes no bool values
        return ops.logical_and(keep, x)
    return ops.where(keep, x, ops.zeros_like(x))


def _within(ops, distance, bound):
    if isinstance(bound, int):
        return distance <= bound if bound >= 0 else ops.ones_like(distance, dtype="bool")
    bound = ops.cast(bound, "int32")
    return ops.logical_or(ops.less(bound, 0), ops.less_equal(distance, bound))
