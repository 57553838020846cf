"""`SyncBatchNormalization` for tf-keras (Keras 2) models.

The same layer as `bnconvert.SyncBatchNormalization`, built on
`tf_keras.layers.BatchNormalization` so that it lives in tf-keras models
(SavedModel directories with Keras metadata, tf-keras H5 files) and passes
their `isinstance` checks. The global statistics come from
`bnconvert.sync_stats`, as for the Keras 3 layer.

Moving variance: which variance?
--------------------------------
tf-keras `BatchNormalization` has two training paths that disagree. Its fused
kernel, which it picks by itself for 4D inputs with `axis` 1 or 3 and 5D
inputs with `axis` 1 or 4 (no renorm, no adjustment, float16/bfloat16/float32
compute), folds the *unbiased* batch variance (divided by `N - 1`) into
`moving_variance`; every other path folds the *biased* one (divided by `N`).
Both normalize with the biased variance.

This layer follows the layer it replaces: it updates `moving_variance` with
the unbiased variance of the global batch exactly when tf-keras
`BatchNormalization` with the same arguments would take its fused path
(`layer.fused` after `build()`, decided by tf-keras itself), and with the
biased variance otherwise. tf-keras's own synchronized BN
(`synchronized=True`, `experimental.SyncBatchNormalization`) never fuses;
the converter passes `fused=False` for such layers, so they keep the biased
convention and the non-fused inference kernel. Converting a model to synchronized statistics then
changes where the statistics come from and nothing else: after training on
the same global batches, the moving statistics are those the original
tf-keras model would have had on one device. `N` counts the examples (and
positions) of the global batch, not of one replica. (Keras 3, including
`bnconvert.SyncBatchNormalization`, always uses the biased variance.)
"""


import tensorflow as tf
import tf_keras

from bnconvert import bn_math
from bnconvert import layer_args
from bnconvert import moving_stats
from bnconvert import sync_stats

_FUSED_DATA_FORMATS = {
    (4, 1): "NCHW",
    (4, 3): "NHWC",
    (5, 1): "NCDHW",
    (5, 4): "NDHWC",
}


@tf_keras.saving.register_keras_serializable(package="bnconvert")
class SyncBatchNormalization(tf_keras.layers.BatchNormalization):
    """Batch normalization over the global batch, for tf-keras models.

    Under a `tf.distribute` strategy with several replicas, a training step
    normalizes with the mean and variance of the *global* batch: every
    example on every replica, each replica weighted by how many examples it
    holds (uneven and empty per-replica batches are exact). The statistics
    travel as in the Keras 3 layer (`bnconvert.sync_stats`: one all-reduce
    per call, a row table at few replicas, `2C + 1` float64 centered sums
    above, accurate when a channel's mean is large compared to its spread). Gradients are those of single-device
    batch normalization on the global batch. Under TF1-style graph
    execution the moving-statistic assignments are registered with
    `add_update` (two updates, as tf-keras BN), so `fit` runs them.

    Without a strategy, with one replica, or in inference, the layer computes
    what `tf_keras.layers.BatchNormalization` computes; in inference it runs
    the very same kernel, so outputs are bit-for-bit equal. It subclasses
    that layer and holds the same weights, in the same order and shapes.

    In training the output is
    `gamma * (x - mean(batch)) / sqrt(var(batch) + epsilon) + beta` and
    `moving_stat = moving_stat * momentum + batch_stat * (1 - momentum)`.
    The batch variance folded into `moving_variance` is the one tf-keras
    `BatchNormalization` would fold in (see the module docstring): unbiased
    where tf-keras uses its fused kernel (4D inputs with `axis` 1 or 3, 5D
    with `axis` 1 or 4), biased elsewhere. A step whose global batch is empty
    leaves the moving statistics unchanged.

    Example:

    ```python
    import tf_keras
    from bnconvert.compat import SyncBatchNormalization

    strategy = tf.distribute.MirroredStrategy()
    with strategy.scope():
        model = tf_keras.Sequential([
            tf_keras.layers.Dense(16),
            SyncBatchNormalization(),
        ])
    ```

    Args:
        axis: Integer or list of integers: the axis or axes that hold the
            features to normalize; statistics are taken over all others.
            Negative values count from the end. Defaults to `-1`.
        momentum: Float in [0, 1], the weight of the old value in the moving
            averages. Defaults to `0.99`.
        epsilon: Positive float added to the variance before the square root.
            Defaults to `0.001`.
        center: If `True`, learn an offset `beta` added after normalizing.
        scale: If `True`, learn a factor `gamma` applied after normalizing.
        beta_initializer: Initializer for `beta`.
        gamma_initializer: Initializer for `gamma`.
        moving_mean_initializer: Initializer for the moving mean.
        moving_variance_initializer: Initializer for the moving variance.
        beta_regularizer: Optional regularizer for `beta`.
        gamma_regularizer: Optional regularizer for `gamma`.
        beta_constraint: Optional constraint for `beta`.
        gamma_constraint: Optional constraint for `gamma`.
        renorm: If `True`, use Batch Renormalization: training outputs are
            corrected by `(r, d)` towards the moving statistics. Adds the
            weights `moving_stddev`, `renorm_mean` and `renorm_stddev`;
            inference is unchanged.
        renorm_clipping: Optional dict with any of the keys `"rmax"`,
            `"rmin"` and `"dmax"`, bounding the renorm correction `r` to
            `[rmin, rmax]` and `d` to `[-dmax, dmax]`. A missing key means no
            bound.
        renorm_momentum: Float in [0, 1], the momentum of the statistics that
            renorm corrects towards; `momentum` still drives the statistics
            used in inference.
        trainable: If `False`, the layer is frozen and, as with tf-keras
            `BatchNormalization`, normalizes with its moving statistics even
            when called with `training=True`.
        adjustment: Optional callable taking the dynamic input shape and
            returning `(scale, bias)`, applied to the normalized value before
            `gamma` and `beta`, in training only. Not serializable: left out
            of `get_config()`.
        sync_group_size: Optional positive int `k`: synchronize within
            groups of `k` consecutive replicas; the replica count must be a
            multiple of `k`. `None` or `0` (the default): all replicas.
        name: Optional name of the layer.
        **kwargs: Other base layer keyword arguments, such as `dtype`.
            `synchronized` is accepted and ignored (this layer always
            synchronizes); `virtual_batch_size` is not supported. `fused`
            (None, True or False) means what it means to tf-keras
            `BatchNormalization`: which inference kernel runs and hence, here,
            which moving-variance convention applies. `fused=False` mirrors a
            tf-keras BN that does not fuse, such as `synchronized=True`
            layers; the converter sets it for those, so that inference stays
            bit-for-bit that of the layer replaced.

    Call arguments:
        inputs: Input tensor of any rank.
        training: Python boolean. `True` normalizes with the statistics of
            the current (global) batch and updates the moving statistics;
            `False` uses the moving statistics.
        mask: Optional boolean tensor of the input's shape without the last
            axis; masked-out positions do not count towards the statistics.

    Input shape:
        Arbitrary. The normalized axes must have a known size.

    Output shape:
        Same shape as the input.
    """

    def __init__(
        self,
        axis=-1,
        momentum=0.99,
        epsilon=0.001,
        center=True,
        scale=True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        renorm=False,
        renorm_clipping=None,
        renorm_momentum=0.99,
        trainable=True,
        adjustment=None,
        sync_group_size=None,
        name=None,
        **kwargs,
    ):
        kwargs.pop("synchronized", None)
        fused = kwargs.pop("fused", None)
        if fused not in (None, True, False):
            raise ValueError(
                f"Argument `fused` must be None, True or False. Received: fused={fused!r}"
            )
        virtual_batch_size = kwargs.pop("virtual_batch_size", None)
        if virtual_batch_size is not None:
            raise ValueError(
                "SyncBatchNormalization normalizes over the global batch and "
                "does not support ghost batches; remove `virtual_batch_size`. "
                f"Received: virtual_batch_size={virtual_batch_size!r}"
            )
        checked = layer_args.check_constructor_args(
            axis=axis, momentum=momentum, epsilon=epsilon, center=center,
            scale=scale, renorm=renorm, renorm_clipping=renorm_clipping,
            renorm_momentum=renorm_momentum, trainable=trainable,
            adjustment=adjustment, sync_group_size=sync_group_size,
        )
        axis, momentum, epsilon = checked["axis"], checked["momentum"], checked["epsilon"]
        renorm_momentum = checked["renorm_momentum"]
        renorm_clipping = checked["renorm_clipping"]
        # `synchronized=False`: tf-keras would otherwise turn off its fused
        # path, and `self.fused` must keep saying whether tf-keras BN with
        # these arguments takes it (it decides the moving-variance convention).
        super().__init__(
            axis=axis,
            momentum=momentum,
            epsilon=epsilon,
            center=center,
            scale=scale,
            beta_initializer=beta_initializer,
            gamma_initializer=gamma_initializer,
            moving_mean_initializer=moving_mean_initializer,
            moving_variance_initializer=moving_variance_initializer,
            beta_regularizer=beta_regularizer,
            gamma_regularizer=gamma_regularizer,
            beta_constraint=beta_constraint,
            gamma_constraint=gamma_constraint,
            renorm=renorm,
            renorm_clipping=renorm_clipping,
            renorm_momentum=renorm_momentum,
            trainable=trainable,
            adjustment=adjustment,
            name=name,
            synchronized=False,
            fused=fused,
            **kwargs,
        )
        self._fused_argument = fused
        self.synchronized = True
        # tf-keras sets these only when renorm is on; the config keeps them.
        self.renorm_clipping = renorm_clipping
        self.renorm_momentum = renorm_momentum
        self.sync_group_size = checked["sync_group_size"]
        self._memory = None

    def build(self, input_shape):
        # tf-keras validates `axis` (to a sorted list of non-negative ints),
        # creates the weights exactly as BatchNormalization does and decides
        # `self.fused`.
        super().build(input_shape)
        rank = len(input_shape)
        self._reduction_axes = [a for a in range(rank) if a not in self.axis]
        self._param_broadcast = [1] * rank
        for a in self.axis:
            self._param_broadcast[a] = int(input_shape[a])
        channels = 1
        for a in self.axis:
            channels *= int(input_shape[a])
        self._memory = bn_math.MeanMemory(channels, self.sync_group_size)

    # tf-keras runs a subclassed layer's `call` through AutoGraph, which
    # would wrap every TensorFlow call of the exchange at each trace, once
    # per replica; the code branches on Python values only (a tensor
    # `training` takes the explicit `tf.cond` below), so it runs as written,
    # as tf-keras's own layers do.
    @tf.autograph.experimental.do_not_convert
    def call(self, inputs, training=None, mask=None):
        inputs = tf.cast(inputs, self.compute_dtype)
        if training is None:
            training = tf_keras.backend.learning_phase()
        if not self.trainable:
            training = False
        if tf.is_tensor(training) and tf.get_static_value(training) is None:
            # The moving statistics are updated after the cond, from values
            # it returns (a count of 0 in inference leaves them as they are):
            # in TF1-style graphs, updates must be ops of the outer graph
            # that `add_update` hands to `fit`.
            outputs, mean, variance, populated = tf.cond(
                tf.cast(training, tf.bool),
                lambda: self._training_call(inputs, mask),
                lambda: self._inference_values(inputs),
            )
            self._update_moving_statistics(mean, variance, populated)
            return outputs
        if tf.is_tensor(training):
            training = tf.get_static_value(training)
        if training:
            outputs, mean, variance, populated = self._training_call(inputs, mask)
            self._update_moving_statistics(mean, variance, populated)
            return outputs
        return self._inference_call(inputs)

    def _inference_values(self, inputs):
        """Inference output, and statistics that leave the moving ones unchanged."""
        dtype = tf.float64 if inputs.dtype == tf.float64 else tf.float32
        zeros = tf.zeros(self._param_broadcast, dtype)
        return self._inference_call(inputs), zeros, zeros, tf.zeros_like(zeros, tf.bool)

    def _param(self, weight, dtype):
        if weight is None:
            return None
        return tf.reshape(tf.cast(weight, dtype), self._param_broadcast)

    def _inference_call(self, inputs):
        """The kernel tf-keras BatchNormalization runs in inference."""
        if self.fused:
            data_format = _FUSED_DATA_FORMATS[(inputs.shape.rank, self.axis[0])]
            shape = self.moving_mean.shape
            dtype = self.moving_mean.dtype
            gamma = self.gamma if self.scale else tf.ones(shape, dtype)
            beta = self.beta if self.center else tf.zeros(shape, dtype)
            outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
                inputs,
                gamma,
                beta,
                mean=self.moving_mean,
                variance=self.moving_variance,
                epsilon=self.epsilon,
                is_training=False,
                data_format=data_format,
            )
            return outputs
        x = inputs
        if x.dtype in (tf.float16, tf.bfloat16):
            x = tf.cast(x, tf.float32)
        outputs = tf.nn.batch_normalization(
            x,
            self._param(self.moving_mean, x.dtype),
            self._param(self.moving_variance, x.dtype),
            self._param(self.beta, x.dtype),
            self._param(self.gamma, x.dtype),
            self.epsilon,
        )
        return tf.cast(outputs, inputs.dtype)

    def _training_call(self, inputs, mask):
        # Statistics of 16-bit inputs overflow: they are taken in float32.
        dtype = tf.float64 if inputs.dtype == tf.float64 else tf.float32
        x = tf.cast(inputs, dtype)
        weights = bn_math.mask_weights(mask, x)
        moments = bn_math.batch_moments(
            x, self._reduction_axes, weights, group_size=self.sync_group_size,
            memory=self._memory, fallback_reference=self.moving_mean,
        )
        mean, variance = moments.mean, moments.variance
        gamma, beta = self._param(self.gamma, dtype), self._param(self.beta, dtype)
        gamma, beta = bn_math.training_scale_offset(
            self, self._param, tf.shape(inputs), mean, variance, gamma, beta
        )
        outputs = bn_math.normalize(x, moments, gamma, beta, self.epsilon)
        # See the module docstring: tf-keras's fused kernel folds in the
        # unbiased variance (and 0 for a single value); renorm never fuses.
        target_mean, target_variance, populated = bn_math.moving_targets(
            moments, unbiased=self.fused and not self.renorm
        )
        populated = tf.broadcast_to(populated, tf.shape(mean))
        return tf.cast(outputs, inputs.dtype), target_mean, target_variance, populated

    def _update_moving_statistics(self, mean, variance, populated):
        updates = moving_stats.tf_keras_updates(self, mean, variance, populated)
        if not tf.executing_eagerly():
            # TF1-style graphs (tf.Graph, and `tf.compat.v1.wrap_function`,
            # where tf-keras gives the layer its v1 base): assignments run
            # only when fetched, and tf-keras's `fit` fetches `layer.updates`
            # (two, as for tf-keras's BatchNormalization). A v2 layer's
            # `add_update` ignores ops: in `tf.function` they run anyway.
            for ops in updates:
                self.add_update(tf.group(*ops) if len(ops) > 1 else ops[0])

    def get_config(self):
        config = super().get_config()
        config.pop("synchronized", None)
        config["renorm"] = self.renorm
        config["renorm_clipping"] = (
            None if self.renorm_clipping is None else dict(self.renorm_clipping)
        )
        config["renorm_momentum"] = self.renorm_momentum
        if self.sync_group_size is not None:
            # Only when set: a default config stays that of the layer
            # replaced, so that `to-inference` rules need not know the key.
            config["sync_group_size"] = self.sync_group_size
        if self._fused_argument is not None:
            # Unlike tf-keras BN, kept: it picks the inference kernel.
            config["fused"] = self._fused_argument
        return config

