"""How many of Keras 3's `keras.layers` the native ONNX exporter covers.

Every class name in `dir(keras.layers)` counts once (aliases such as
`AvgPool2D` too). A name is *native* when some model of the two test tables
(`tests/test_onnx_native.py`, `tests/test_onnx_layers_conformance.py`,
Keras 3 cases only) holds a layer of that class, and every such model
exports natively at opset 17 and matches Keras in onnxruntime here, now.
Every other name is listed with the reason it is refused, or as "no
passing case". Run (about two minutes on 2 cores):

    KERAS_BACKEND=tensorflow python tools/onnx_coverage_layers.py

Two percentages are printed: over all names, and over the names that have an
ONNX meaning (strings, hashing, FFT and other frameworks' functions left out).
"""

import inspect
import os
import pathlib
import sys
import warnings

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import keras  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

from bnconvert import check_batch  # noqa: E402
from bnconvert import flavour as flavour_lib  # noqa: E402
from bnconvert.onnx import walk  # noqa: E402

OPSET = 17
# Names without an ONNX meaning: refused by name, left out of the second figure.
NO_ONNX_MEANING = {
    "Hashing": "hashes values (FarmHash/SipHash): no ONNX op",
    "HashedCrossing": "hashes crossed features: no ONNX op",
    "StringLookup": "string inputs",
    "TextVectorization": "string inputs",
    "FlaxLayer": "a JAX/Flax function",
    "JaxLayer": "a JAX function",
    "TorchModuleWrapper": "a PyTorch module",
    "TFSMLayer": "a TensorFlow SavedModel's function (no Keras graph to walk)",
}
REFUSED = {
    **NO_ONNX_MEANING,
    "LSTMCell": "one step of a recurrence: exported inside RNN/LSTM, not alone",
    "GRUCell": "one step of a recurrence: exported inside RNN/GRU, not alone",
    "SimpleRNNCell": "one step of a recurrence: exported inside RNN/SimpleRNN, not alone",
    "Equalization": "identity at inference, but Keras 3.15's symbolic call returns its input "
                    "tensor, so no Functional graph can hold it (a cycle)",
    "ContrastLimitedAdaptiveHistogramEqualization": "tile-wise histogram equalization (applied "
                                                    "at inference too): not written",
    "Wrapper": "an abstract base class",
}
# Subclassed layers are opened by tracing; a custom layer case stands for `Layer`.
TRACED_BASE = "Layer"


def layer_names():
    return sorted(n for n in dir(keras.layers)
                  if inspect.isclass(getattr(keras.layers, n))
                  and issubclass(getattr(keras.layers, n), keras.layers.Layer))


def _classes(model):
    """Class names of the layers a model's export goes through.

    The model's own layers (nested models and Pipelines opened), the layers
    wrappers and RNNs hold, and `Layer` for a subclass that is traced. The
    sublayers of a layer exported whole (RandAugment's own augmentations,
    identities at inference) are not counted: they are not exported.
    """
    found = set()
    for layer in getattr(model, "layers", []):
        found.add(type(layer).__name__)
        if not type(layer).__module__.startswith("keras."):
            found.add(TRACED_BASE)
        if isinstance(layer, keras.Model) or type(layer).__name__ == "Pipeline":
            found |= _classes(layer)
        for attr in ("layer", "forward_layer", "backward_layer", "cell"):
            inner = getattr(layer, attr, None)
            if isinstance(inner, keras.layers.Layer):
                found.add(type(inner).__name__)
                found |= {type(c).__name__ for c in getattr(inner, "cells", [])}
    return found


def _run(model, arrays):
    names = [f"in{i}" for i in range(len(model.inputs))]
    outs = [f"out{i}" for i in range(len(model.outputs))]
    proto = walk.emit(model, flavour_lib.flavour_of(model), names, outs, OPSET)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, dict(zip(names, arrays)))


def _matches(got, want, rtol, atol=None):
    if len(got) != len(want):
        return False
    for g, w in zip(got, want):
        w = np.asarray(w, np.float64)
        scale = max(1.0, float(np.abs(w).max(initial=0.0)))
        if g.shape != w.shape or not np.allclose(g, w, rtol=rtol,
                                                 atol=atol if atol else rtol * scale):
            return False
    return True


def cases():
    """`(id, model, arrays, rtol, atol)` of every Keras 3 case of both tables."""
    import test_onnx_layers_conformance as conformance
    import test_onnx_native as native

    for c in conformance.CASES:
        if "keras" not in c.flavours:
            continue
        model = c.build(keras)
        conformance.randomize(model)
        yield c.id, model, conformance.inputs_for(model, c), c.rtol, None
    for c in native.CASES:
        if c.flavour != "keras" or c.channels_first:
            continue
        model, x = native.build_case(c)
        yield c.id, model, [x], c.rtol, c.atol


def measure():
    passed, failed = {}, {}
    for case_id, model, arrays, rtol, atol in cases():
        try:
            ok = _matches(_run(model, arrays), check_batch.run(model, arrays), rtol, atol)
            why = "does not match Keras"
        except Exception as e:  # noqa: BLE001 - report, do not stop
            ok, why = False, str(e).splitlines()[0][:120]
        for name in _classes(model):
            (passed if ok else failed).setdefault(name, []).append(case_id if ok else
                                                                   f"{case_id}: {why}")
    return passed, failed


def main():
    warnings.filterwarnings("ignore")
    passed, failed = measure()
    names = layer_names()
    native, refused = [], []
    for name in names:
        cls = getattr(keras.layers, name).__name__
        if cls in passed and cls not in failed:
            native.append(name)
        elif name in REFUSED or cls in REFUSED:
            refused.append((name, REFUSED.get(name, REFUSED.get(cls))))
        elif cls in failed:
            refused.append((name, "FAILS: " + failed[cls][0]))
        else:
            refused.append((name, "no passing case"))
    meaningful = [n for n in names if n not in NO_ONNX_MEANING]
    native_meaningful = [n for n in native if n in meaningful]
    print(f"keras {keras.__version__}: {len(names)} layer names in keras.layers")
    print(f"native and matching: {len(native)}/{len(names)} = "
          f"{100.0 * len(native) / len(names):.1f}%")
    print(f"  of those with an ONNX meaning: {len(native_meaningful)}/{len(meaningful)} = "
          f"{100.0 * len(native_meaningful) / len(meaningful):.1f}%")
    print("\nrefused or not covered:")
    for name, why in refused:
        print(f"  {name:46s} {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
