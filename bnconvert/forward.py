"""The one forward runner: every forward pass bnconvert makes goes through `run`.

A Keras 3 Functional model called eagerly keeps every intermediate tensor
until its call returns (its graph runner maps every symbolic tensor to its
value): 4.3 GB for EfficientNetV2L on two 480x480 images, three times the
model. Running it as one TensorFlow graph frees each tensor after its last
use, but tracing a graph of 1,000 layers takes most of a minute.

`run` instead executes the graph itself, eagerly and node by node in
Keras's order (`_nodes_by_depth`), each layer called as the model's own
call would call it (`training=False` given to the layers that take it,
inside one shared call context), and drops each computed tensor as soon as
the last node that reads it has run (reference counts). Its outputs are
those of `model(x, training=False)` to the bit; it holds at most the
tensors alive at one time.

What it does not walk is run as before: tf-keras models (whose own eager
call frees tensors as it goes), Sequential models (each layer's output
replaces the last), subclassed models and Functional subclasses with their
own `call`, and mixed-precision models (whose call opens an autocast
scope) are called whole, eagerly, or as one graph when that eager call
would hold more than `EAGER_LIMIT` bytes (`eager_bytes`). A nested model
inside a walked graph is called whole, by its own call.
"""

import keras
import numpy as np

from bnconvert import keras_internals as internals

# A Keras 3 model called whole whose eager call would hold more runs as a graph.
EAGER_LIMIT = 1 << 30
# The batch size given to an unknown batch dimension, and the size of other
# unknown dimensions (see `bnconvert.check_batch`).
SAMPLE_BATCH = 2
UNKNOWN_DIM = 32


def run(model, arrays):
    """`model`'s outputs (inference mode) on flat `arrays`, as a flat list of NumPy arrays.

    Args:
        model: A built model of either flavour.
        arrays: Flat list of input arrays in `model.inputs` order.
    """
    if walkable(model):
        outputs = _walk(model, arrays)
    else:
        inputs = _structured(model, arrays)
        if eager_bytes(model, arrays) > EAGER_LIMIT:
            import tensorflow as tf

            outputs = tf.function(lambda x: model(x, training=False), autograph=False)(inputs)
        else:
            outputs = model(inputs, training=False)
    return [np.asarray(o) for o in keras.tree.flatten(outputs)]


def walkable(model):
    """Whether `run` executes `model` node by node (see the module docstring)."""
    functional = internals.keras3_functional_class()
    return (
        isinstance(model, functional)
        and type(model).call is functional.call
        and internals.has_symbolic_inputs(model)
        and model.compute_dtype == model.variable_dtype
    )


def _walk(model, arrays):
    """The graph of a walkable model run eagerly, each tensor freed after its last use."""
    nodes = [n for n in internals.graph_nodes(model) if not n.is_input]
    computed = {}
    for symbolic, array in zip(model.inputs, arrays):
        computed[id(symbolic)] = keras.ops.convert_to_tensor(array, dtype=symbolic.dtype)
    # How many more reads each tensor awaits; the outputs are read at the end.
    readers = {}
    for node in nodes:
        for tensor in node.input_tensors:
            readers[id(tensor)] = readers.get(id(tensor), 0) + 1
    for tensor in model.outputs:
        readers[id(tensor)] = readers.get(id(tensor), 0) + 1

    def fill(x):
        return computed.get(id(x)) if isinstance(x, keras.KerasTensor) else x

    with internals.inference_call_context(model):
        for node in nodes:
            # Keras skips a node it cannot compute (not fed by these inputs).
            if any(id(t) not in computed for t in node.input_tensors):
                continue
            args, kwargs = keras.tree.map_structure(fill, (list(node.args), dict(node.kwargs)))
            _window_fits(node.layer, args)
            if "training" in internals.call_context_args(node.layer):
                kwargs["training"] = False
            outputs = keras.tree.flatten(node.layer(*args, **kwargs))
            del args, kwargs
            for symbolic, value in zip(node.outputs, outputs):
                computed[id(symbolic)] = value
            for tensor in node.input_tensors:
                readers[id(tensor)] -= 1
                if not readers[id(tensor)]:
                    computed.pop(id(tensor), None)
    return [computed[id(t)] for t in model.outputs]


_MAX_POOLS = (keras.layers.MaxPooling1D, keras.layers.MaxPooling2D, keras.layers.MaxPooling3D)


def _window_fits(layer, args):
    """Refuses a "valid" max pooling whose window is larger than its input.

    TensorFlow's CPU `MaxPool` does not raise there: it dies of a floating
    point exception (SIGFPE) or aborts, taking the process with it
    (InceptionV3 built for any image size, run on the check batch's 32x32).

    Raises:
        ValueError: The window does not fit: the check batch names the model
            and the shapes it tried (`check_batch.reference`).
    """
    if not isinstance(layer, _MAX_POOLS) or layer.padding != "valid" or not args:
        return
    shape = tuple(getattr(args[0], "shape", ()))
    rank = len(layer.pool_size)
    if len(shape) != rank + 2:
        return
    spatial = shape[2:] if layer.data_format == "channels_first" else shape[1:-1]
    if any(int(d) < k for d, k in zip(spatial, layer.pool_size)):
        raise ValueError(
            f"layer '{layer.name}' gets an input of spatial size {tuple(int(d) for d in spatial)}, "
            f"smaller than its window {tuple(layer.pool_size)}")


def eager_bytes(model, arrays):
    """The bytes a Keras 3 Functional model's own eager call on `arrays` holds at once.

    Every tensor of its graph (nested Functional models counted whole),
    unknown dimensions sized as the check batch's; 0 for models that free
    their tensors as they go (tf-keras) or have no graph (subclassed).
    """
    if not isinstance(model, keras.Model) or not internals.has_symbolic_inputs(model):
        return 0
    batch = int(arrays[0].shape[0]) if arrays and np.ndim(arrays[0]) else SAMPLE_BATCH
    total = 0
    for node in internals.graph_nodes(model):
        if node.is_input:
            continue
        if isinstance(node.layer, keras.Model):
            total += eager_bytes(node.layer, arrays)
        for tensor in node.outputs:
            shape = getattr(tensor, "shape", None)
            if shape is None:
                continue
            dims = [(batch if i == 0 else UNKNOWN_DIM) if d is None else int(d)
                    for i, d in enumerate(shape)]
            total += int(np.prod(dims, dtype=np.int64)) * _itemsize(tensor)
    return total


def _itemsize(tensor):
    try:
        return np.dtype(keras.backend.standardize_dtype(tensor.dtype)).itemsize
    except TypeError:
        return 4


def _structured(model, arrays):
    """`arrays` in the structure of `model`'s inputs (a Sequential has no `input` until called)."""
    try:
        return keras.tree.pack_sequence_as(model.input, list(arrays))
    except (AttributeError, ValueError, TypeError):
        return arrays[0] if len(arrays) == 1 else list(arrays)
