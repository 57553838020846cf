"""Keras 3: layer tracking, safe mode, call context, backend dispatch, variable creation."""

import contextlib
import inspect
import threading

from bnconvert.keras_internals._errors import _missing


def keras3_functional_class():
    """The class of `keras.Model(inputs, outputs)` models (not exported)."""
    try:
        from keras.src.models.functional import Functional
    except ImportError as e:  # pragma: no cover - pinned by a test
        raise _missing("keras.src.models.functional.Functional", e) from e
    return Functional


def direct_sublayers(layer, layer_class):
    """`layer`'s direct sublayers in Keras 3's tracking order (`_layers`)."""
    return [c for c in getattr(layer, "_layers", []) if isinstance(c, layer_class)]


def replace_tracked_sublayer(parent, old, new):
    """Puts `new` in `old`'s place in Keras 3's list of `parent`'s sublayers."""
    parent._tracker.replace_tracked_value("layers", old, new)


# Attributes through which Keras 3 tracks sublayers; an attribute walk that
# swaps a sublayer must leave them to `replace_tracked_sublayer`.
TRACKING_ATTRIBUTES = ("_layers", "_tracker")


def keras3_safe_mode_scope(safe_mode):
    """Keras 3's scope that `Lambda.from_config` and the loaders consult.

    Raises:
        InternalsError: The scope is gone; nothing is deserialized without it.
    """
    try:
        from keras.src.saving.serialization_lib import SafeModeScope
    except ImportError as e:
        raise _missing("Keras SafeModeScope (safe mode for Lambda layers)", e) from e
    return SafeModeScope(safe_mode)


def has_symbolic_inputs(model):
    """Whether a model was built on symbolic inputs (`keras.Input` tensors).

    Keras 3 models keep them in `_inputs_struct` (its `inputs` property
    raises for a subclassed model); tf-keras's `inputs` is public.
    """
    if hasattr(type(model), "_inputs_struct") or hasattr(model, "_inputs_struct"):
        return getattr(model, "_inputs_struct", None) is not None and bool(model.inputs)
    return bool(getattr(model, "inputs", None))


def call_context_args(operation):
    """The call-context arguments (`training`, ...) a Keras 3 layer's call takes.

    A Functional model's call passes its own `training` to exactly these
    layers (`_call_context_args`); operations have none.
    """
    return getattr(operation, "_call_context_args", ())


@contextlib.contextmanager
def inference_call_context(model):
    """The call context a Keras 3 `model(x, training=False)` opens for its layers.

    Layers called in it see `training=False` from their caller, as inside
    the model's own call, even those not given the argument explicitly
    (a custom layer's sublayers). The context is Keras's global
    `current_call_ctx` (a `CallContext` whose entry layer is `model`).
    """
    try:
        from keras.src.backend.common import global_state
        from keras.src.layers.layer import CallContext
    except ImportError as e:  # pragma: no cover - pinned by a test
        raise _missing("Keras's layer CallContext", e) from e
    if global_state.get_global_attribute("current_call_ctx") is not None:
        raise RuntimeError("inference_call_context must not be opened inside a layer call")
    context = CallContext(entry_layer=model)
    context.set_value("training", False)
    global_state.set_global_attribute("current_call_ctx", context)
    try:
        yield
    finally:
        global_state.set_global_attribute("current_call_ctx", None)


def shadow_method(obj, name, function):
    """Sets an instance attribute past Keras's attribute tracking.

    Keras tracks every attribute set on a layer; a temporary method override
    is not state, so it is set with `object.__setattr__` and removed with
    `unshadow_method`.
    """
    object.__setattr__(obj, name, function)


def unshadow_method(obj, name):
    object.__delattr__(obj, name)


@contextlib.contextmanager
def backend_calls_through_ops():
    """Keras utilities that call backend functions directly dispatch through `keras.ops` meanwhile.

    `keras.utils.bounding_boxes` and the preprocessing layers call the
    backend's own functions through a `DynamicBackend`
    (`keras.src.utils.backend_utils`), which raise on symbolic tensors; the
    same functions of `keras.ops` record them as graph nodes, and on concrete
    tensors compute the same thing.

    Raises:
        InternalsError: `DynamicBackend` is gone.
    """
    try:
        from keras.src.utils.backend_utils import DynamicBackend
    except ImportError as e:  # pragma: no cover - pinned by a test
        raise _missing("keras.src.utils.backend_utils.DynamicBackend", e) from e
    import keras

    namespaces = {"numpy": keras.ops, "nn": keras.ops, "math": keras.ops, "core": keras.ops,
                  "image": keras.ops.image, "linalg": keras.ops.linalg}
    original = DynamicBackend.__getattr__

    def through_ops(self, name):
        own = original(self, name)
        if inspect.ismodule(own) and name in namespaces:
            return _OpsFirst(namespaces[name], own)
        if callable(own) and hasattr(keras.ops, name):
            return getattr(keras.ops, name)
        return own

    DynamicBackend.__getattr__ = through_ops
    try:
        yield
    finally:
        DynamicBackend.__getattr__ = original


@contextlib.contextmanager
def none_outputs_dropped():
    """Meanwhile, a layer called on symbolic tensors may return None among its outputs.

    Keras records a symbolic call as a `Node` (`keras.src.ops.node`) and
    refuses one whose outputs hold anything but tensors, though the same
    layer runs on concrete tensors (keras-hub's DeiT blocks return
    `(outputs, None)` unless asked for their attention scores). The None
    entries are left out of the node's outputs, as `tracing.split_outputs`
    leaves them out of a traced call's; the call still returns them.

    Raises:
        InternalsError: `Node` is gone.
    """
    try:
        from keras.src.ops.node import Node
        from keras.src import tree
    except ImportError as e:  # pragma: no cover - pinned by a test
        raise _missing("keras.src.ops.node.Node", e) from e
    original = Node.__init__

    def tolerant(self, operation, call_args=None, call_kwargs=None, outputs=None):
        if outputs is not None:
            outputs = [x for x in tree.flatten(outputs) if x is not None]
        original(self, operation, call_args, call_kwargs, outputs)

    Node.__init__ = tolerant
    try:
        yield
    finally:
        Node.__init__ = original


class _OpsFirst:
    """A backend module whose functions `keras.ops` has are taken from `keras.ops`."""

    def __init__(self, ops, own):
        self._ops, self._own = ops, own

    def __getattr__(self, name):
        return getattr(self._ops, name, None) or getattr(self._own, name)


_DEFERRING = threading.Lock()


def keras3_deferred_initializers(defer):
    """Keras 3 float variables made on this thread meanwhile skip their initializer.

    A load draws every weight from its initializer, then overwrites it from
    the file (half of a 480 MB model's load). A variable for which
    `defer(initializer, shape)` is true starts as NaN; on leaving, one never
    `assign`ed and still all NaN gets its initializer's value (Keras's
    initializers fix their seed when made: the draw Keras would have made).
    One thread at a time defers; a nested or concurrent scope does nothing.

    Returns:
        A context manager.

    Raises:
        InternalsError: Keras's variable creation moved.
    """
    try:
        from keras.src.backend.common.variables import Variable as KerasVariable
        from keras.src.backend.tensorflow.core import Variable as TFVariable

        hooks = (TFVariable, "_initialize_with_initializer"), (KerasVariable, "assign")
        create, assign = (getattr(owner, name) for owner, name in hooks)
    except (ImportError, AttributeError) as e:
        raise _missing("Keras 3's TensorFlow variable initialization", e) from e
    return _deferring(hooks, create, assign, defer)


@contextlib.contextmanager
def _deferring(hooks, create, assign, defer):
    import tensorflow as tf

    if not _DEFERRING.acquire(blocking=False):
        yield
        return
    thread, pending = threading.get_ident(), {}

    def deferred(variable, initializer):
        dtype = tf.as_dtype(variable._dtype)
        if (threading.get_ident() != thread or not dtype.is_floating
                or not defer(initializer, tuple(variable._shape))):
            return create(variable, initializer)
        nan, shape = tf.constant(float("nan"), dtype), variable._shape
        variable._initialize(lambda: tf.fill(shape, nan))
        pending[id(variable)] = (variable, initializer)

    def assigned(variable, value):
        pending.pop(id(variable), None)
        return assign(variable, value)

    for (owner, name), function in zip(hooks, (deferred, assigned)):
        setattr(owner, name, function)
    try:
        yield
    finally:
        for (owner, name), function in zip(hooks, (create, assign)):
            setattr(owner, name, function)
        _DEFERRING.release()
    for variable, initializer in pending.values():
        # Set some other way than `assign` if no longer all NaN: kept.
        if bool(tf.reduce_all(tf.math.is_nan(variable.value))):
            variable.assign(initializer(variable.shape, dtype=variable.dtype))


# The object kinds every Keras 3 model's save and load walks.
_SAVING_KINDS = ("Operation", "Layer", "Functional", "Sequential")


def keras3_saving_skipsets():
    """Keras 3's save and load compute each kind's attribute skip set once meanwhile.

    Keras's `.keras` save and load visit every layer's attributes minus a
    skip set made from a fresh reference object per kind (`get_attr_skipset`
    builds a `Layer()` and lists its `dir()`). Keras caches the set under a
    global name it reads but never writes (`saving_attr_skiplist_*`, stored
    as `saving_attr_skipset_*`), so it rebuilds one for every layer and
    operation (178 times per load or save of ResNet50; with this scope
    bnconvert's load + save of it took 1.23 s CPU instead of 1.48, see the
    README's P3 notes). Meanwhile the set Keras's own
    function computes is stored under the name it reads, on this thread
    (Keras's global state is per thread); on leaving, what this scope set
    is taken away again. Only time changes: the sets are Keras's own.

    Returns:
        A context manager.

    Raises:
        InternalsError: Keras's skip-set function or its global state moved.
    """
    try:
        from keras.src.backend.common import global_state
        from keras.src.saving.saving_lib import get_attr_skipset
    except ImportError as e:
        raise _missing("Keras 3's saving attribute skip sets", e) from e
    return _skipsets_cached(global_state, get_attr_skipset)


@contextlib.contextmanager
def _skipsets_cached(global_state, get_attr_skipset):
    added = []
    for kind in _SAVING_KINDS:
        name = f"saving_attr_skiplist_{kind}"
        if global_state.get_global_attribute(name) is None:
            global_state.set_global_attribute(name, get_attr_skipset(kind))
            added.append(name)
    try:
        yield
    finally:
        for name in added:
            global_state.set_global_attribute(name, None)
