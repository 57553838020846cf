"""The same model shapes, files and reference numbers in Keras 3 and tf-keras.

`tests/test_flavours.py` runs one table of conversion and CLI cases over
both flavours; this module is the only place that knows which Keras a case
runs in. `Flavour("keras3")` and `Flavour("tf_keras")` offer the same
builders (every model gets random gamma, beta and moving statistics, so a
wrong carry shows), the flavour's own file formats and loader, and the
helpers that read layers, weights and outputs. Nothing here calls
bnconvert: the numbers the tests compare with come from the flavour's
Keras and from NumPy.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import tensorflow as tf
import tf_keras

import bnconvert

FLAVOURS = ("keras3", "tf_keras")

# What `convert_model` documents (README, "Verification"): a swap reproduces
# the outputs within 1e-6 absolute; folding within 1e-5 of the largest output.
SWAP_ATOL = 1e-6
FOLD_RTOL = 1e-5


def short_name(variable):
    """`"model/bn/gamma:0"` (tf-keras) or `"gamma"` (Keras 3) -> `"gamma"`."""
    return variable.name.split("/")[-1].split(":")[0]


class Flavour:
    """One Keras flavour's classes, model builders, files and helpers.

    Args:
        name: `"keras3"` or `"tf_keras"`.

    Attributes:
        k: The flavour's Keras module (`keras` or `tf_keras`).
        BN: Its `BatchNormalization`.
        SYNC: bnconvert's synchronized layer for it.
        formats: The file formats the flavour saves (for the CLI cases).
        MyBN: A registered BN subclass of this flavour (no rule names it).
    """

    def __init__(self, name):
        self.name = name
        self.k = keras if name == "keras3" else tf_keras
        self.BN = self.k.layers.BatchNormalization
        self.SYNC = (
            bnconvert.SyncBatchNormalization if name == "keras3"
            else bnconvert.TFKerasSyncBatchNormalization
        )
        self.formats = ("keras", "h5") if name == "keras3" else ("savedmodel", "h5")
        self.MyBN = _MY_BN[name]

    def __repr__(self):
        return self.name

    # -- model shapes ---------------------------------------------------------

    def _dense_bn(self, units, name, **bn_kwargs):
        L = self.k.layers
        return [L.Dense(units, name=f"{name}_dense"), self.BN(name=name, **bn_kwargs)]

    def sequential(self):
        """Input -> Dense -> BN -> ReLU -> Dense -> BN(center=False)."""
        L = self.k.layers
        model = self.k.Sequential(
            [self.k.Input((8,)), *self._dense_bn(6, "bn1"), L.ReLU(name="relu"),
             *self._dense_bn(4, "bn2", center=False)],
            name="seq",
        )
        return randomize(model)

    def sequential_no_input(self):
        """A Sequential without an Input layer, built by calling it."""
        L = self.k.layers
        model = self.k.Sequential([L.Dense(4, name="dense"), self.BN(name="bn")], name="seq_call")
        model(np.zeros((2, 8), "float32"))
        return randomize(model)

    def nested(self):
        """A Functional model holding a Sequential with its own BN."""
        L = self.k.layers
        inner = self.k.Sequential(
            [self.k.Input((6,)), *self._dense_bn(5, "inner_bn")], name="inner"
        )
        inp = self.k.Input((8,), name="x")
        h = self.BN(name="outer_bn")(L.Dense(6, name="outer_dense")(inp))
        return randomize(self.k.Model(inp, inner(L.ReLU()(h)), name="nested"))

    def shared(self):
        """One BN layer called at two sites, outputs added."""
        L = self.k.layers
        shared = self.BN(name="shared_bn")
        a, b = self.k.Input((8,), name="a"), self.k.Input((8,), name="b")
        out = L.Add()([shared(a), shared(L.Dense(8, name="dense_b")(b))])
        return randomize(self.k.Model([a, b], out, name="shared"))

    def multi_io(self):
        """Two inputs, two outputs, three BN layers."""
        L = self.k.layers
        a, b = self.k.Input((8,), name="a"), self.k.Input((3,), name="b")
        x = self.BN(name="bn_a")(L.Dense(4, name="dense_a")(a))
        y = self.BN(name="bn_b")(L.Dense(4, name="dense_b")(b))
        merged = L.Concatenate()([x, y])
        out = self.BN(name="bn_out")(L.ReLU()(y))
        return randomize(self.k.Model([a, b], [merged, out], name="multi_io"))

    def frozen(self):
        """A frozen BN (`trainable=False`) beside a trainable one."""
        L = self.k.layers
        inp = self.k.Input((8,))
        x = self.BN(name="frozen_bn", trainable=False)(L.Dense(8, name="d1")(inp))
        x = self.BN(name="live_bn", momentum=0.7, epsilon=0.02)(L.Dense(8, name="d2")(x))
        return randomize(self.k.Model(inp, x, name="frozen"))

    def renorm(self):
        """BN with batch renormalization (7 weights)."""
        L = self.k.layers
        inp = self.k.Input((8,))
        x = self.BN(name="renorm_bn", renorm=True, renorm_clipping={"rmax": 3.0})(
            L.Dense(8, name="dense")(inp)
        )
        return randomize(self.k.Model(inp, x, name="renorm"))

    def axis1(self):
        """Conv2D then BN over axis 1 (not the conv's channels: never folded)."""
        L = self.k.layers
        inp = self.k.Input((6, 6, 3))
        x = L.Conv2D(4, 3, name="conv")(inp)  # (None, 4, 4, 4)
        x = self.BN(axis=1, name="bn_axis1")(x)
        x = self.BN(name="bn_last")(L.Conv2D(2, 1, name="conv2")(x))
        return randomize(self.k.Model(inp, x, name="axis1"))

    def synchronized(self):
        """`BatchNormalization(synchronized=True)` after a Dense."""
        L = self.k.layers
        inp = self.k.Input((8,))
        x = self.BN(name="sync_bn", synchronized=True)(L.Dense(8, name="dense")(inp))
        return randomize(self.k.Model(inp, x, name="synchronized"))

    def with_subclass(self):
        """A plain BN and a BN subclass of the user's (`MyBN`), each after a Dense."""
        L = self.k.layers
        inp = self.k.Input((8,))
        x = self.BN(name="plain")(L.Dense(8, name="d1")(inp))
        x = self.MyBN(name="mine")(L.Dense(8, name="d2")(x))
        return randomize(self.k.Model(inp, x, name="sub"))

    def synced(self):
        """bnconvert's synchronized layer after Conv2D, after a ReLU and after Dense.

        Two of the three can be folded at inference (after the Conv2D and the
        Dense); the one after the ReLU cannot.
        """
        L = self.k.layers
        inp = self.k.Input((6, 6, 3), name="image")
        x = self.SYNC(name="sbn1")(L.Conv2D(4, 3, name="conv")(inp))
        x = self.SYNC(name="sbn2")(L.ReLU(name="relu")(x))
        x = L.GlobalAveragePooling2D(name="pool")(x)
        x = self.SYNC(name="sbn3")(L.Dense(3, name="logits")(x))
        return randomize(self.k.Model(inp, x, name="synced"))

    # -- files ----------------------------------------------------------------

    def save(self, model, directory, fmt, stem=None):
        """Saves `model` in `fmt` with the flavour's own `save`; returns the path."""
        stem = stem or model.name
        path = directory / (stem if fmt == "savedmodel" else f"{stem}.{fmt}")
        if fmt == "savedmodel":
            model.save(str(path), save_format="tf")
        else:
            model.save(str(path))
        return path

    def load(self, path):
        """Loads a model file with the flavour's own loader (not bnconvert's)."""
        if self.name == "keras3":
            return keras.saving.load_model(path, compile=False)
        return tf_keras.models.load_model(str(path), compile=False)

    def sync_output_name(self, path, fmt):
        """Where `bnconvert to-sync PATH` writes by default (README, "Command line").

        Keras 3 writes `.keras` only: both `m.keras` and `m.h5` give
        `m.sync.keras`. tf-keras keeps the input's format: `m` -> `m.sync`
        (a SavedModel directory), `m.h5` -> `m.sync.h5`.
        """
        stem = path.name if fmt == "savedmodel" else path.stem
        if self.name == "keras3":
            return path.with_name(f"{stem}.sync.keras")
        return path.with_name(f"{stem}.sync" + ("" if fmt == "savedmodel" else ".h5"))

    def keras_out_name(self, directory, fmt):
        """A `--keras-out` path in the flavour's format `fmt`."""
        if self.name == "keras3":
            return directory / "plain.keras"
        return directory / ("plain" if fmt == "savedmodel" else "plain.h5")

    def written_format(self, path):
        """The format of a model bnconvert wrote, judged by the file itself."""
        if path.is_dir():
            assert (path / "saved_model.pb").is_file() and (path / "keras_metadata.pb").is_file()
            return "savedmodel"
        head = path.read_bytes()[:8]
        if head.startswith(b"PK"):
            return "keras"
        assert head == b"\x89HDF\r\n\x1a\n", head
        return "h5"

    # -- reading models -------------------------------------------------------

    def all_layers(self, model):
        """Every layer below `model`, nested models included, each once (no InputLayer)."""
        found, seen = [], set()

        def walk(m):
            for layer in m.layers:
                if id(layer) in seen or isinstance(layer, self.k.layers.InputLayer):
                    continue
                seen.add(id(layer))
                found.append(layer)
                if isinstance(layer, self.k.Model):
                    walk(layer)

        walk(model)
        return found

    def layer(self, model, name):
        """The layer called `name` anywhere below `model`."""
        (found,) = [l for l in self.all_layers(model) if l.name == name]
        return found

    def holder_kind(self, model, name):
        """`"Sequential"` or `"Functional"`: the kind of model directly holding layer `name`."""
        holders = [model] + [l for l in self.all_layers(model) if isinstance(l, self.k.Model)]
        (holder,) = [m for m in holders if any(l.name == name for l in m.layers)]
        return "Sequential" if isinstance(holder, self.k.Sequential) else "Functional"

    def classes(self, model):
        """Layer name -> class, for every layer below `model`."""
        return {l.name: type(l) for l in self.all_layers(model)}

    def bn_layers(self, model):
        """Every layer of the BN family below `model` (SyncBN included)."""
        return [l for l in self.all_layers(model) if isinstance(l, self.BN)]

    def weights(self, layer):
        """Short weight name -> NumPy copy, for one layer."""
        return {short_name(v): np.array(v.numpy(), copy=True) for v in layer.weights}

    def all_weights(self, model):
        """`(layer name, short weight name)` -> NumPy copy, for every layer."""
        return {
            (l.name, name): value
            for l in self.all_layers(model)
            if not isinstance(l, self.k.Model)
            for name, value in self.weights(l).items()
        }

    def inputs_for(self, model, n=5, seed=42):
        """Standard-normal float32 inputs shaped like `model`'s (one array or a list)."""
        rng = np.random.default_rng(seed)
        arrays = [
            rng.normal(size=(n,) + tuple(t.shape[1:])).astype("float32")
            for t in model.inputs
        ]
        return arrays[0] if len(arrays) == 1 else arrays

    def outputs(self, model, x):
        """`model(x, training=False)` as a list of float64 NumPy arrays."""
        return [
            np.asarray(o, dtype=np.float64)
            for o in tf.nest.flatten(model(x, training=False))
        ]


def randomize(model, seed=0):
    """Random gamma, beta, moving statistics and kernels (variances positive)."""
    rng = np.random.default_rng(seed)
    for v in model.weights:
        name, shape = short_name(v), tuple(v.shape)
        if name in ("moving_variance", "moving_stddev", "renorm_stddev"):
            value = rng.uniform(0.3, 3.0, shape)
        elif name in ("gamma",):
            value = rng.uniform(0.5, 2.0, shape)
        else:
            value = rng.normal(0.0, 1.0, shape)
        v.assign(value.astype(v.dtype.name if hasattr(v.dtype, "name") else v.dtype))
    return model


def _my_bn(k):
    @k.saving.register_keras_serializable(package="flavour_tests")
    class MyBN(k.layers.BatchNormalization):
        """A user's BatchNormalization subclass, registered as `flavour_tests>MyBN`."""

    return MyBN


_MY_BN = {"keras3": _my_bn(keras), "tf_keras": _my_bn(tf_keras)}


# -- a fresh process ----------------------------------------------------------------

_RELOAD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf
    import bnconvert  # all a user needs to reload a converted model
    flavour, converted_path, original_path, x_path, y_path = sys.argv[1:6]
    if flavour == "keras3":
        import keras
        load = lambda p: keras.saving.load_model(p, compile=False)
        Model = keras.Model
    else:
        import tf_keras
        load = lambda p: tf_keras.models.load_model(p, compile=False)
        Model = tf_keras.Model
    x = np.load(x_path)
    converted, original = load(converted_path), load(original_path)
    run = lambda m: np.asarray(tf.nest.flatten(m(x, training=False))[0])
    np.save(y_path, np.stack([run(converted), run(original)]))
    classes = {}
    def walk(m):
        for layer in m.layers:
            classes[layer.name] = type(layer).__module__ + "." + type(layer).__name__
            if isinstance(layer, Model):
                walk(layer)
    walk(converted)
    print(json.dumps(classes))
    """
)


def reload_in_fresh_process(flavour, converted, original, x, tmp_path):
    """Loads both files in a new Python process that only imports bnconvert.

    Returns:
        `(converted outputs, original outputs, {layer name: "module.Class"})`.
    """
    np.save(tmp_path / "x.npy", x)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")
    done = subprocess.run(
        [sys.executable, "-c", _RELOAD, flavour.name, str(converted), str(original),
         str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    y, y_original = np.load(tmp_path / "y.npy")
    return y, y_original, json.loads(done.stdout.strip().splitlines()[-1])
