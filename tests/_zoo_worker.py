"""Fresh-process checks of one converted zoo model (run by test_zoo_wild.py).

    python tests/_zoo_worker.py SPEC.json

SPEC holds: `model` (the converted file), `flavour` ("keras" or "tf_keras"),
`imports` (modules a user would import before loading), `inputs` (.npy
files, one per model input), `outputs` (.npz to write), `result` (.json to
write).

Two independent parts, each recorded in the result even when the other fails:

1. reload: `load_model` as a user would, then record the class, every
   normalization layer under the model (nested and attribute-held ones
   included) and the inference outputs on the given inputs.
2. train: split the CPU into 2 logical devices (before anything else touches
   TensorFlow), load the model inside `MirroredStrategy.scope()`, compile
   with MSE on the flattened, concatenated outputs and fit 2 steps (global
   batch 4) on random data; record each step's loss.

The worker reports facts; the test asserts.
"""

import json
import os
import sys
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import tensorflow as tf  # noqa: E402

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration()] * 2
)

# Graph optimization off: a quarter of a big model's 2-step fit (tracing
# dominates the rest), and nothing these steps check depends on it.
tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})

import importlib  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _one_line(exc):
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0][:400] if text else type(exc).__name__


def main(spec_path):
    with open(spec_path) as f:
        spec = json.load(f)
    result = {"seconds": {}}
    seconds = result["seconds"]
    start = time.perf_counter()
    for module in spec["imports"]:
        importlib.import_module(module)
    import bnconvert

    if spec["flavour"] == "tf_keras":
        import tf_keras as K

        sync_class = bnconvert.TFKerasSyncBatchNormalization
    else:
        import keras as K

        sync_class = bnconvert.SyncBatchNormalization
    tree = __import__("keras").tree
    seconds["imports"] = round(time.perf_counter() - start, 2)
    inputs = [np.load(p) for p in spec["inputs"]]
    feed = inputs[0] if len(inputs) == 1 else inputs

    # 1. reload as a user would.
    start = time.perf_counter()
    try:
        model = K.models.load_model(spec["model"], compile=False)
        import zoo_models  # the same walk the test process uses

        norm = zoo_models.batchnorm_layers(model)
        plain = [l for l in norm if not isinstance(l, sync_class)]
        result["reload"] = {
            "class": type(model).__name__,
            "module": type(model).__module__,
            "n_sync": sum(isinstance(l, sync_class) for l in norm),
            "n_plain": len(plain),
            "plain_examples": [f"{l.name} ({type(l).__name__})" for l in plain[:5]],
        }
        outputs = [np.asarray(o) for o in tree.flatten(model(feed, training=False))]
        np.savez(spec["outputs"], *outputs)
        result["reload"]["n_outputs"] = len(outputs)
    except Exception as exc:  # recorded for the test to report
        result["reload"] = {"error": _one_line(exc), "trace": traceback.format_exc()[-3000:]}

    seconds["reload"] = round(time.perf_counter() - start, 2)

    # 2. train 2 steps under MirroredStrategy on 2 logical CPUs.
    start = time.perf_counter()
    try:
        strategy = tf.distribute.MirroredStrategy(
            [d.name for d in tf.config.list_logical_devices("CPU")][:2]
        )
        with strategy.scope():
            model = K.models.load_model(spec["model"], compile=False)
            outs = tree.flatten(model.outputs)
            # Names of our own, so that they cannot collide with the model's
            # (MobileNetV3Small has a layer called "flatten").
            flat = [K.layers.Flatten(name=f"zoo_flatten_{i}")(o) for i, o in enumerate(outs)]
            joined = flat[0] if len(flat) == 1 else K.layers.Concatenate(name="zoo_concat")(flat)
            trainer = K.Model(model.inputs, joined)
            kwargs = {} if spec["flavour"] == "tf_keras" else {"jit_compile": False}
            # jit_compile=False: XLA with MirroredStrategy over logical CPU
            # devices fails for every BN, Keras's included (design notes).
            trainer.compile(optimizer=K.optimizers.SGD(1e-3), loss="mse", **kwargs)
        rng = np.random.default_rng(0)
        x = [rng.uniform(0, 1, (8,) + a.shape[1:]).astype("float32") for a in inputs]
        y = rng.normal(0, 1, (8,) + tuple(joined.shape[1:])).astype("float32")
        losses = []
        cb = K.callbacks.LambdaCallback(
            on_train_batch_end=lambda batch, logs: losses.append(float(logs["loss"]))
        )
        seconds["train_load"] = round(time.perf_counter() - start, 2)
        trainer.fit(x[0] if len(x) == 1 else x, y, batch_size=4, epochs=1,
                    verbose=0, callbacks=[cb], shuffle=False)
        result["train"] = {"replicas": strategy.num_replicas_in_sync, "losses": losses}
    except Exception as exc:
        result["train"] = {"error": _one_line(exc), "trace": traceback.format_exc()[-3000:]}
    seconds["train"] = round(time.perf_counter() - start, 2)

    with open(spec["result"], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
