"""What lets the walk open layers that do not run on symbolic tensors as written.

The walk opens an unknown layer by calling its `call` on symbolic tensors
(`walk._Walker.trace`). Third-party layers often run fine on concrete
tensors yet not symbolically, for reasons that have nothing to do with
what they compute:

- a layer's own `compute_output_spec` refuses arguments Keras passes it
  (`training`), so its parent's call fails when it calls it. While the
  model is exported, such an override falls back to Keras's generic
  `Layer.compute_output_spec`, which runs the layer's `call` on
  placeholders of the same shapes;
- a layer's `compute_output_shape` declares another structure than its
  call returns (keras-hub's ESM rotary layer: one output for two), so its
  parent unpacks the wrong one. A third-party layer's spec is that of its
  call run on placeholders (`keras.Operation`'s), the declared one only
  where the call does not run there;
- keras-hub calls TensorFlow directly on its TensorFlow-only paths
  (`tf.gather`, `tf.linalg.band_part`): those are recorded as `keras.ops`
  (`tf_calls`); Keras records fft/fft2/ifft2 only over axes of static size
  and `repeat` only by a number: those record ops of `sized_ops`;
- Keras utilities that call backend functions directly (bounding-box
  format conversion) are routed through `keras.ops`
  (`keras_internals.backend_calls_through_ops`);
- a layer returns tensors computed from shapes only (anchors, spatial
  shapes): concrete tensors, not symbolic ones. `split_outputs` keeps them
  apart; the walk writes them as initializers;
- `x[None]` (a new axis, as NumPy reads it) is refused by Keras's symbolic
  indexing, which takes `x[None, ...]`; the key is passed in that form.
  `keras.ops.ndim` of a symbolic tensor gives a symbolic scalar, which
  Python code cannot branch on; a symbolic tensor's rank is always known,
  so it gives that number, and `==` (which Keras leaves to Python's
  identity, False) compares elementwise (`_indexing_and_ranks`). A variable on the left
  of an operator (`self.weight * x`, T5's norm) computes with
  the backend, which refuses a symbolic right operand; there it records
  the `keras.ops` function instead (`_variables_as_operands`);
- a sublayer returns None among its outputs (`(outputs, None)` when its
  attention scores are not asked for), which Keras refuses in a symbolic
  call (`keras_internals.none_outputs_dropped`).
"""

import contextlib
import inspect
import sys

import numpy as np
import onnx.numpy_helper

from bnconvert import keras_internals as internals
from bnconvert.onnx import sized_ops
from bnconvert.onnx import tf_calls
from bnconvert.onnx.graph import Uncovered
from bnconvert import walk as model_walk

# Layers of these packages are mapped by class name, and keep their own
# output specs (a refusal there is a real one); any other class is traced.
KNOWN_PACKAGES = ("keras.", "tf_keras.", "bnconvert.")
# Packages whose `==` on tensors means identity (keras_hub's code means elementwise).
_LIBRARIES = {"keras", "tf_keras", "tensorflow", "bnconvert", "optree", "tree"}


@contextlib.contextmanager
def lenient(model, flavour):
    """Within: `model`'s layers run symbolically where only their spec or a utility refused."""
    base = getattr(flavour.keras.layers.Layer, "compute_output_spec", None)
    if base is None:  # tf-keras: no symbolic specs to fall back from
        yield
        return
    shadowed, shape = [], flavour.keras.layers.Layer.compute_output_shape
    try:
        for _, layer in model_walk.iter_layers(model, flavour):
            if "compute_output_spec" in vars(layer) \
                    or type(layer).__module__.startswith(KNOWN_PACKAGES):
                continue
            if getattr(type(layer), "compute_output_spec", base) is not base:
                spec = _falling_back(layer, base)
            elif getattr(type(layer), "compute_output_shape", shape) is not shape:
                spec = _call_first(layer, flavour.keras.Operation.compute_output_spec, base)
            else:
                continue
            internals.shadow_method(layer, "compute_output_spec", spec)
            shadowed.append(layer)
        with internals.backend_calls_through_ops(), internals.none_outputs_dropped(), \
                _indexing_and_ranks(flavour.keras), _variables_as_operands(flavour.keras), \
                tf_calls.tf_calls_through_ops(flavour.keras), \
                sized_ops.ops_of_any_size(flavour.keras):
            yield
    finally:
        for layer in shadowed:
            internals.unshadow_method(layer, "compute_output_spec")


@contextlib.contextmanager
def _indexing_and_ranks(keras):
    tensor, ndim = keras.KerasTensor, keras.ops.ndim
    own = tensor.__getitem__

    def getitem(self, key):
        return own(self, (None, Ellipsis) if key is None else key)

    def equal(self, other):
        # Keras's own code compares tensors by identity (`t in inputs`); a layer's
        # code means elementwise.
        module = sys._getframe(1).f_globals.get("__name__", "")
        if module.split(".")[0] in _LIBRARIES:
            return other is self
        return keras.ops.equal(self, other)

    tensor.__getitem__ = getitem
    # A symbolic tensor has no `==` of its own: `x == -1` was Python's identity,
    # False, and written into the graph as a constant.
    own_eq = vars(tensor).get("__eq__")
    tensor.__eq__ = equal
    keras.ops.ndim = lambda x: len(x.shape) if is_symbolic(keras, x) else ndim(x)
    try:
        yield
    finally:
        tensor.__getitem__ = own
        if own_eq is None:
            del tensor.__eq__
        else:
            tensor.__eq__ = own_eq
        keras.ops.ndim = ndim


_OPERATORS = {"add": "add", "sub": "subtract", "mul": "multiply", "truediv": "true_divide",
              "matmul": "matmul", "pow": "power"}


@contextlib.contextmanager
def _variables_as_operands(keras):
    variable, own = keras.Variable, {}
    for short, function in _OPERATORS.items():
        for name, reflected in ((f"__{short}__", False), (f"__r{short}__", True)):
            own[name] = getattr(variable, name)
            setattr(variable, name, _operator(keras, own[name], getattr(keras.ops, function),
                                              reflected))
    try:
        yield
    finally:
        for name, method in own.items():
            setattr(variable, name, method)


def _operator(keras, own, function, reflected):
    def method(self, other):
        if not is_symbolic(keras, other):
            return own(self, other)
        return function(other, self.value) if reflected else function(self.value, other)
    return method


def _falling_back(layer, base):
    own = type(layer).compute_output_spec

    def compute_output_spec(*args, **kwargs):
        try:
            return own(layer, *args, **kwargs)
        except Exception:  # noqa: BLE001 - any refusal: Keras's own spec decides
            return base(layer, *args, **kwargs)

    return compute_output_spec


def _call_first(layer, traced, declared):
    """The spec of what `layer`'s call returns, else the one its `compute_output_shape` declares.

    A declared shape may disagree with the call (keras-hub's ESM rotary
    layer declares one output and returns two), and the caller then unpacks
    the wrong structure; Keras's generic spec runs the call itself.
    """
    def compute_output_spec(*args, **kwargs):
        try:
            return traced(layer, *args, **kwargs)
        except Exception:  # noqa: BLE001 - a call that does not run: the declared spec
            return declared(layer, *args, **kwargs)

    return compute_output_spec


def accepted_kwargs(layer, kwargs):
    """`kwargs` without Keras's implicit arguments (`training`, `mask`) its `call` does not take.

    Keras passes them to `call` only where its signature has them; a graph
    node may record them for any layer.
    """
    parameters = inspect.signature(layer.call).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in parameters or k not in ("training", "mask")}


def split_outputs(keras, result):
    """`(symbolic, flat)`: the symbolic tensors of a call's result, and all its outputs.

    `flat` holds every output in order, symbolic tensors and concrete
    ones (computed from static shapes, not from the inputs); None entries
    are dropped, as Keras drops them from a node's outputs.
    """
    import tensorflow as tf

    flat = [t for t in tf.nest.flatten(result) if t is not None]
    return [t for t in flat if is_symbolic(keras, t)], flat


def is_symbolic(keras, value):
    """Whether `value` is a symbolic Keras tensor (tf-keras raises on arrays and numbers)."""
    try:
        return bool(keras.backend.is_keras_tensor(value))
    except (ValueError, TypeError):
        return False


def as_array(tensor):
    """A concrete output as the array of an initializer (float64 as float32)."""
    array = np.asarray(tensor.numpy() if hasattr(tensor, "numpy") else tensor)
    return array.astype(np.float32) if array.dtype == np.float64 else array


def constant(g, array, base):
    """A concrete output in the graph: an initializer, or a `Constant` node for a scalar."""
    if array.ndim:
        return g.constant(array, base, array.dtype)
    # `Graph.constant` writes at least one dimension.
    return g.node("Constant", [], base, value=onnx.numpy_helper.from_array(array, base))


def first_traced(walker, attempts, furthest):
    """The outputs of the first of `attempts` that opens the layer in `walker`'s graph.

    Each attempt emits into the graph and returns `(outputs, suspect)`; a
    refusal, or a layer it left uncovered inside, rolls the graph back for
    the next. A suspect trace (`fixes_sizes`) is tried again as `furthest`
    (sizes as graph values), and kept only if that fails. When all fail,
    the reason given is `furthest`'s, the attempt that gets furthest into
    the call, if it ran.
    """
    mark, seen = walker.g.checkpoint(), len(walker.uncovered)
    reason, suspected = None, None
    for attempt in attempts:
        if suspected is not None and attempt is not furthest:
            continue
        try:
            outs, suspect = attempt()
            if len(walker.uncovered) == seen or len(attempts) == 1:
                if not suspect or attempt is attempts[-1]:
                    return outs
                suspected = attempt
            else:
                raise Uncovered(walker.uncovered[seen:])
        except Uncovered as e:
            if len(attempts) == 1:
                raise
            reason = e if attempt is furthest else reason or e
        walker.g.rollback(mark)
        del walker.uncovered[seen:]
    if suspected is not None:
        return suspected()[0]
    raise reason


def fixes_sizes(traced, recorded):
    """Whether `traced` output shapes fix a size that the `recorded` ones leave unknown.

    A call traced with unknown sizes as None may slice a table by such a
    size (`table[:None]`, all of it) and so bake one length into the graph,
    where Keras's own trace of the model keeps it open.
    """
    if recorded is None or len(traced) != len(recorded):
        return False
    return any(len(t) == len(r) and any(a is not None and b is None for a, b in zip(t, r))
               for t, r in zip(traced, (tuple(x.shape) for x in recorded)))
