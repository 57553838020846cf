"""Step parity on sklearn's digits: shared by the training tests and their worker.

A reference trajectory is trained on ONE device with the flavour's plain
`BatchNormalization` on each global batch. Every step of the layer under test
then starts from the reference's weights before that step, and its result is
compared with the reference's weights after it: a whole float32 trajectory
through ReLU would separate at the first pre-activation within rounding of 0,
whatever the implementation, so steps are compared one by one.

The loss is the SUM of the examples' cross-entropies, everywhere: Keras
does not rescale a summed loss under a strategy, and summing the replicas'
gradients gives the gradient of the global sum whatever the split, so
uneven shards have the same exact reference.

The data: `steps_per_epoch - 1` full global batches and one of
`global_batch - 1` examples per epoch, so every epoch ends unevenly.
"""

import numpy as np
import tensorflow as tf

GLOBAL_BATCH = 32
STEPS_PER_EPOCH = 4
LEARNING_RATE = 0.01


def flavour_lib(flavour):
    """The Keras module of `flavour` ("keras3" or "tf_keras")."""
    if flavour == "tf_keras":
        import tf_keras

        return tf_keras
    import keras

    return keras


def sync_bn_class(flavour):
    import bnconvert

    if flavour == "tf_keras":
        return bnconvert.compat.SyncBatchNormalization
    return bnconvert.SyncBatchNormalization


def digits_batches(steps, global_batch=GLOBAL_BATCH, steps_per_epoch=STEPS_PER_EPOCH,
                   dtype="float32"):
    """`steps` global batches `(x, y)` of digits, each epoch ending unevenly."""
    from sklearn.datasets import load_digits

    data = load_digits()
    n = steps_per_epoch * global_batch - 1
    x = (data.images[:n] / 16.0).astype(dtype)[..., None]
    y = data.target[:n].astype("int32")
    starts = [i * global_batch for i in range(steps_per_epoch)]
    epoch = [(x[s:s + global_batch], y[s:s + global_batch]) for s in starts]
    return [epoch[i % steps_per_epoch] for i in range(steps)]


def build_model(flavour, norm, seed=0, dtype="float32"):
    """A small CNN: two 3x3 convolutions, each followed by `norm` and ReLU.

    Weights are drawn from `seed` in layer order (normalization: gamma near 1,
    beta and moving mean near 0, moving variance near 1), so two models built
    with the same seed start identical whatever `norm` is.
    """
    lib = flavour_lib(flavour)
    layers = lib.layers
    inputs = lib.Input((8, 8, 1), dtype=dtype)
    h = inputs
    for i, stride in enumerate((1, 2)):
        h = layers.Conv2D(8, 3, strides=stride, padding="same", use_bias=False,
                          dtype=dtype, name=f"conv{i}")(h)
        h = norm(momentum=0.9, dtype=dtype, name=f"bn{i}")(h)
        h = layers.ReLU(dtype=dtype)(h)
    h = layers.GlobalAveragePooling2D(dtype=dtype)(h)
    model = lib.Model(inputs, layers.Dense(10, dtype=dtype, name="head")(h))
    rs = np.random.RandomState(seed)
    values = []
    for w in model.weights:
        name = w.name.split("/")[-1].split(":")[0]
        shape = tuple(w.shape)
        if name == "gamma":
            value = 1.0 + 0.2 * rs.randn(*shape)
        elif name == "moving_variance":
            value = 1.0 + rs.rand(*shape)
        else:
            value = 0.3 * rs.randn(*shape)
        values.append(value.astype(dtype))
    model.set_weights(values)
    return model


def summed_cross_entropy(y, logits):
    return tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
        tf.cast(y, tf.int32), logits))


def compile_for_fit(flavour, model):
    lib = flavour_lib(flavour)
    model.compile(
        optimizer=lib.optimizers.SGD(LEARNING_RATE),
        loss=lib.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                      reduction="sum"),
    )
    return model


def reference_steps(flavour, batches, dtype="float32"):
    """Single-device plain BN: weights before and after each step."""
    lib = flavour_lib(flavour)
    model = build_model(flavour, lib.layers.BatchNormalization, dtype=dtype)
    step = custom_loop_step(flavour, model, None)
    before, after = [], []
    for x, y in batches:
        before.append(model.get_weights())
        step(x, y)
        after.append(model.get_weights())
    return before, after


def custom_loop_step(flavour, model, strategy, split=None):
    """A `(x, y) -> None` training step: `strategy.run` around a GradientTape.

    Args:
        strategy: a `tf.distribute` strategy whose scope built `model`, or
            `None` for one device.
        split: optional `(global_batch_size) -> list of shard sizes`, one
            per local replica; by default equal shards, the last ones
            smaller.
    """
    lib = flavour_lib(flavour)
    scope = strategy.scope() if strategy is not None else _NoScope()
    with scope:
        optimizer = lib.optimizers.SGD(LEARNING_RATE)
        if hasattr(optimizer, "build"):
            optimizer.build(model.trainable_variables)

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            loss = summed_cross_entropy(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    @tf.function
    def run(x, y):
        if strategy is None:
            replica_step(x, y)
        else:
            strategy.run(replica_step, args=(x, y))

    def step(x, y):
        if strategy is None:
            return run(x, y)
        sizes = (split or _even_split)(len(x), strategy.num_replicas_in_sync)
        bounds = np.cumsum([0] + list(sizes))

        def shard(arr):
            def fn(ctx):
                r = ctx.replica_id_in_sync_group
                return tf.constant(arr[bounds[r]:bounds[r + 1]])
            return strategy.experimental_distribute_values_from_function(fn)

        return run(shard(x), shard(y))

    return step


def _even_split(n, replicas):
    per = -(-n // replicas)
    return [min(per, max(0, n - r * per)) for r in range(replicas)]


class _NoScope:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def fit_steps(flavour, strategy, batches, before):
    """SyncBN under `strategy` with `model.fit`, one epoch over `batches`;
    before each step a callback sets the reference's weights."""
    lib = flavour_lib(flavour)
    with strategy.scope():
        model = compile_for_fit(flavour, build_model(flavour, sync_bn_class(flavour)))
    after = []

    class FromReference(lib.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            model.set_weights(before[batch])

        def on_train_batch_end(self, batch, logs=None):
            after.append(model.get_weights())

    model.fit(_exact_batches(batches), epochs=1, shuffle=False, verbose=0,
              callbacks=[FromReference()])
    return after


def _exact_batches(batches):
    """A dataset yielding `batches` as they are (`batch()` would merge the
    short ones). One slicing map rather than a concatenation of one dataset
    per batch: distributing that chain over 16 replicas took minutes."""
    x = tf.constant(np.concatenate([b[0] for b in batches]))
    y = tf.constant(np.concatenate([b[1] for b in batches]))
    sizes = [len(b[0]) for b in batches]
    starts = np.cumsum([0] + sizes[:-1])
    bounds = tf.data.Dataset.from_tensor_slices(
        (starts.astype("int64"), np.array(sizes, "int64")))
    return bounds.map(lambda s, n: (x[s:s + n], y[s:s + n]))


def loop_steps(flavour, strategy, batches, before=None, split=None, norm=None,
               dtype="float32"):
    """The layer under `strategy` in a custom loop: weights after each step.

    Each step starts from `before[step]`; with `before=None` the steps
    follow each other as one trajectory from the seed's weights.
    """
    with strategy.scope():
        model = build_model(flavour, norm or sync_bn_class(flavour), dtype=dtype)
    step = custom_loop_step(flavour, model, strategy, split)
    after = []
    for i, (x, y) in enumerate(batches):
        if before is not None:
            model.set_weights(before[i])
        step(x, y)
        after.append(model.get_weights())
    return after


def worst_step_error(after, reference_after):
    """Largest |ours - reference| over steps and weights, each weight judged
    against max(1, its largest magnitude)."""
    worst = 0.0
    for ours, ref in zip(after, reference_after, strict=True):
        for a, b in zip(ours, ref, strict=True):
            scale = max(1.0, float(np.abs(b).max()))
            worst = max(worst, float(np.abs(a - b).max()) / scale)
    return worst


def smallest_update(before, after):
    """The smallest largest-change of a weight in one step (shows that every
    weight, moving statistics included, moves on every step)."""
    return min(float(np.abs(a - b).max())
               for bs, as_ in zip(before, after) for b, a in zip(bs, as_))
