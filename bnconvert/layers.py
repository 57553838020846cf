"""`SyncBatchNormalization`: batch normalization with cross-replica statistics."""

import warnings

import keras
import tensorflow as tf
from keras import constraints
from keras import initializers
from keras import ops
from keras import regularizers

from bnconvert import bn_math
from bnconvert import layer_args
from bnconvert import moving_stats
from bnconvert import sync_stats

@keras.saving.register_keras_serializable(package="bnconvert")
class SyncBatchNormalization(keras.layers.BatchNormalization):
    """Batch normalization whose batch statistics span all replicas.

    Under a `tf.distribute` strategy with several replicas (for example
    `MirroredStrategy` or `MultiWorkerMirroredStrategy`), a training step
    normalizes with the mean and variance of the *global* batch: every example
    on every replica, each replica weighted by how many examples it holds, so
    uneven and empty per-replica batches are handled exactly. The statistics
    travel in one all-reduce per call: a `[replicas, 4C]` table at few
    replicas, above that `2C + 1` float64 sums around a reference every
    replica holds, whatever the replica count. Both stay accurate when a
    channel's mean is large compared to its spread (see
    `bnconvert.sync_stats`). `sync_group_size` restricts the statistics to
    groups of consecutive replicas.

    Without a strategy, with a single replica, or in inference, the layer
    computes exactly what `keras.layers.BatchNormalization` computes with the
    same weights. It is a subclass of it, so `isinstance` checks keep working.

    In training the output is
    `gamma * (x - mean(batch)) / sqrt(var(batch) + epsilon) + beta`, and the
    moving statistics follow
    `moving_stat = moving_stat * momentum + batch_stat * (1 - momentum)`,
    with the biased (divide by N) batch variance, as Keras does. In inference
    `mean` and `var` are the moving statistics.

    Example:

    ```python
    strategy = tf.distribute.MirroredStrategy()
    with strategy.scope():
        model = keras.Sequential([
            keras.layers.Dense(16),
            bnconvert.SyncBatchNormalization(),
        ])
    ```

    Args:
        axis: Integer or list of integers: the axis or axes that hold the
            features to normalize; statistics are taken over all others. Use
            `axis=1` after a `channels_first` convolution. Negative values
            count from the end. Defaults to `-1`.
        momentum: Float in [0, 1], the weight of the old value in the moving
            average of the statistics. Defaults to `0.99`.
        epsilon: Positive float added to the variance before the square root.
            Defaults to `0.001`.
        center: If `True`, learn an offset `beta` added after normalizing.
        scale: If `True`, learn a factor `gamma` applied after normalizing.
            Turn it off when the next layer is linear (or a ReLU), since that
            layer can absorb the scale.
        beta_initializer: Initializer for `beta`.
        gamma_initializer: Initializer for `gamma`.
        moving_mean_initializer: Initializer for the moving mean.
        moving_variance_initializer: Initializer for the moving variance.
        beta_regularizer: Optional regularizer for `beta`.
        gamma_regularizer: Optional regularizer for `gamma`.
        beta_constraint: Optional constraint for `beta`.
        gamma_constraint: Optional constraint for `gamma`.
        renorm: If `True`, use Batch Renormalization (Ioffe, 2017): training
            outputs are corrected by `(r, d)` towards the moving statistics.
            Adds the weights `moving_stddev`, `renorm_mean` and
            `renorm_stddev`; inference is unchanged.
        renorm_clipping: Optional dict with any of the keys `"rmax"`, `"rmin"`
            and `"dmax"`, bounding the renorm correction: the normalized value
            becomes `normalized * r + d` with `r` clipped to `[rmin, rmax]`
            and `d` to `[-dmax, dmax]`. A missing key means no bound
            (`rmax=inf`, `rmin=0`, `dmax=inf`).
        renorm_momentum: Float in [0, 1], the momentum of the moving
            statistics that renorm corrects towards. It shapes training: too
            small adds noise, too large gives stale corrections. `momentum`
            still drives the statistics used in inference.
        trainable: If `False`, the layer is frozen: its weights do not train
            and, as with Keras's BatchNormalization, it normalizes with its
            moving statistics even when called with `training=True`.
        adjustment: Optional callable taking the dynamic shape of the input
            (an int32 tensor) and returning a pair `(scale, bias)`
            broadcastable to the input, applied to the normalized value before
            `gamma` and `beta`, in training only. For example
            `lambda shape: (tf.random.uniform(shape[-1:], 0.93, 1.07),
            tf.random.uniform(shape[-1:], -0.1, 0.1))`. A callable is not
            serializable: it is left out of `get_config()`, with a warning.
        sync_group_size: Optional positive int `k`: synchronize the
            statistics within groups of `k` consecutive replicas (replicas
            `0..k-1`, `k..2k-1`, ...) instead of all of them; the number of
            replicas must then be a multiple of `k` (checked when the layer
            runs). `None` or `0` (the default): all replicas.
        name: Optional name of the layer.
        **kwargs: Other base layer keyword arguments, such as `dtype`.

    Call arguments:
        inputs: Input tensor of any rank.
        training: Python boolean. `True` normalizes with the statistics of
            the current (global) batch and updates the moving statistics;
            `False` normalizes with the moving statistics.
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
        # Configs written by keras.layers.BatchNormalization carry this key;
        # this layer is synchronized by definition.
        kwargs.pop("synchronized", None)
        # Keras's legacy H5 loader drops a list-valued `axis` from configs;
        # get_config() keeps a copy under `axes` so such files reload right.
        axes = kwargs.pop("axes", None)
        if axes is not None:
            axis = axes
        checked = layer_args.check_constructor_args(
            axis=axis, momentum=momentum, epsilon=epsilon, center=center,
            scale=scale, renorm=renorm, renorm_clipping=renorm_clipping,
            renorm_momentum=renorm_momentum, trainable=trainable,
            adjustment=adjustment, sync_group_size=sync_group_size,
        )
        axis, momentum, epsilon = checked["axis"], checked["momentum"], checked["epsilon"]
        renorm_momentum = checked["renorm_momentum"]
        renorm_clipping = checked["renorm_clipping"]
        super().__init__(
            axis=-1,
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
            synchronized=False,
            trainable=trainable,
            name=name,
            **kwargs,
        )
        self.axis = axis
        self.synchronized = True
        self.renorm_clipping = renorm_clipping
        self.adjustment = adjustment
        self.sync_group_size = checked["sync_group_size"]
        self._axes = None
        self._memory = None

    def _resolve_axes(self, rank):
        axes = [self.axis] if isinstance(self.axis, int) else list(self.axis)
        resolved = []
        for a in axes:
            if not -rank <= a < rank:
                raise ValueError(
                    f"Axis {a} is out of range for an input of rank {rank}. "
                    f"Received: axis={self.axis}"
                )
            resolved.append(a % rank)
        if len(set(resolved)) != len(resolved):
            raise ValueError(
                f"Argument `axis` names the same axis twice for an input of rank "
                f"{rank}. Received: axis={self.axis}"
            )
        return sorted(resolved)

    def build(self, input_shape):
        rank = len(input_shape)
        self._axes = self._resolve_axes(rank)
        dims = [input_shape[a] for a in self._axes]
        if any(d is None for d in dims):
            raise ValueError(
                "The normalized axes must have a known size. "
                f"Received: input_shape={tuple(input_shape)}, axis={self.axis}"
            )
        shape = tuple(dims)
        self._reduction_axes = [a for a in range(rank) if a not in self._axes]
        self._param_broadcast = [1] * rank
        for a, d in zip(self._axes, dims):
            self._param_broadcast[a] = d

        def add(name, initializer, trainable, regularizer=None, constraint=None):
            return self.add_weight(
                shape=shape,
                name=name,
                initializer=initializer,
                regularizer=regularizer,
                constraint=constraint,
                trainable=trainable,
                autocast=False,
            )

        if self.scale:
            self.gamma = add(
                "gamma", self.gamma_initializer, True,
                self.gamma_regularizer, self.gamma_constraint,
            )
        if self.center:
            self.beta = add(
                "beta", self.beta_initializer, True,
                self.beta_regularizer, self.beta_constraint,
            )
        self.moving_mean = add("moving_mean", self.moving_mean_initializer, False)
        self.moving_variance = add(
            "moving_variance", self.moving_variance_initializer, False
        )
        if self.renorm:
            # Renorm tracks standard deviations; they start at the square
            # root of the variance initializer, as in Keras.
            variance_init = initializers.get(
                initializers.serialize(self.moving_variance_initializer)
            )
            mean_init = initializers.get(
                initializers.serialize(self.moving_mean_initializer)
            )

            def stddev_init(shape, dtype=None):
                return ops.sqrt(variance_init(shape, dtype=dtype))

            self.moving_stddev = add("moving_stddev", stddev_init, False)
            self.renorm_mean = add("renorm_mean", mean_init, False)
            self.renorm_stddev = add("renorm_stddev", stddev_init, False)
        channels = 1
        for d in dims:
            channels *= d
        self._memory = bn_math.MeanMemory(channels, self.sync_group_size)
        self.input_spec = keras.layers.InputSpec(
            ndim=rank, axes={a: d for a, d in zip(self._axes, dims)}
        )
        self.built = True

    def compute_output_shape(self, input_shape):
        self._resolve_axes(len(input_shape))
        return input_shape

    def _param(self, weight, dtype):
        if weight is None:
            return None
        return tf.reshape(tf.cast(weight, dtype), self._param_broadcast)

    def call(self, inputs, training=None, mask=None):
        # Statistics of float16/bfloat16 inputs overflow; they are computed in
        # float32 (float64 inputs keep float64).
        compute_dtype = tf.float64 if inputs.dtype == tf.float64 else tf.float32
        x = tf.cast(inputs, compute_dtype)
        if not (training and self.trainable):
            return tf.cast(self._inference(x), self.compute_dtype)

        weights = bn_math.mask_weights(mask, x)
        if weights is None and sync_stats.replica_context() is None:
            # Nothing to synchronize: Keras BN's own computation, so that
            # training matches it closely and costs the same.
            mean, variance = tf.nn.moments(x, self._reduction_axes, keepdims=True)
            moments = sync_stats.GlobalMoments(
                shift=None, correction=-mean, mean=mean, variance=variance, count=None
            )
        else:
            moments = bn_math.batch_moments(
                x, self._reduction_axes, weights,
                group_size=self.sync_group_size, memory=self._memory,
                fallback_reference=self.moving_mean,
            )

        gamma = self._param(self.gamma, compute_dtype)
        beta = self._param(self.beta, compute_dtype)
        gamma, beta = bn_math.training_scale_offset(
            self, self._param, tf.shape(inputs), moments.mean, moments.variance, gamma, beta
        )
        if moments.count is None:
            moving_stats.keras3_update(self, moments.mean, moments.variance)
        else:
            moving_stats.keras3_update(self, *bn_math.moving_targets(moments))
        outputs = bn_math.normalize(x, moments, gamma, beta, self.epsilon)
        return tf.cast(outputs, self.compute_dtype)

    def _inference(self, x):
        mean = tf.cast(self.moving_mean, x.dtype)
        variance = tf.cast(self.moving_variance, x.dtype)
        gamma = None if self.gamma is None else tf.cast(self.gamma, x.dtype)
        beta = None if self.beta is None else tf.cast(self.beta, x.dtype)
        if isinstance(self.axis, int):
            # The very call keras.layers.BatchNormalization makes, so that
            # inference is bit-for-bit the same.
            return ops.batch_normalization(
                x, mean, variance, axis=self.axis, offset=beta, scale=gamma,
                epsilon=self.epsilon,
            )
        reshape = lambda t: None if t is None else tf.reshape(t, self._param_broadcast)
        return tf.nn.batch_normalization(
            x, reshape(mean), reshape(variance), reshape(beta), reshape(gamma),
            self.epsilon,
        )

    def get_config(self):
        config = super().get_config()
        config.pop("synchronized", None)
        config["axis"] = self.axis
        if isinstance(self.axis, list) and len(self.axis) > 1:
            config["axes"] = list(self.axis)
        config["renorm_clipping"] = self.renorm_clipping
        if self.sync_group_size is not None:
            # Only when set: a default config stays that of the layer
            # replaced, so that `to-inference` rules need not know the key.
            config["sync_group_size"] = self.sync_group_size
        if self.adjustment is not None:
            warnings.warn(
                f"Layer '{self.name}': the `adjustment` callable cannot be "
                "serialized and is left out of the config; a layer rebuilt "
                "from it has no adjustment.",
                stacklevel=2,
            )
        return config
