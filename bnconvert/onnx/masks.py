"""The Keras masks a layer's inputs carry, as values of the ONNX graph.

A layer that reads masks (a recurrent layer, attention, masked pooling or
softmax) gets the mask of each input from the walk (`Call.masks`). Keras
computes a mask in the layer that makes it (`compute_mask`: Embedding's
`mask_zero`, Masking), outside the model's graph:

- Keras 3 records that computation as ops on symbolic tensors: the ops are
  emitted, once, when a layer first reads the mask;
- tf-keras keeps only the mask's value: it is computed here from the layer
  that made it (Embedding, Masking), through the layers that pass masks on
  unchanged (a recurrent layer returning sequences, any layer without its
  own `compute_mask`).

A mask neither way reaches stays "unknown", and the layer reading it refuses.
"""

import numpy as np

from bnconvert import keras_internals as internals
from bnconvert.onnx.graph import FLOAT
from bnconvert.onnx.graph import Value

UNKNOWN = "unknown"
_DEPTH = 8


def carried(walker, tensor, env, base):
    """The `Value` of `tensor`'s Keras mask, None without one, or `UNKNOWN`."""
    mask = getattr(tensor, "_keras_mask", None)
    if mask is None:
        return None
    if id(mask) in env:
        return env[id(mask)]
    g = walker.g
    mark, seen, known = g.checkpoint(), len(walker.uncovered), set(env)
    if internals.producing_node(mask) is not None:  # Keras 3: ops on symbolic tensors
        walker.emit_producers(mask, env, f"{base}/mask/", depth=_DEPTH)
    if id(mask) not in env and len(walker.uncovered) == seen:  # tf-keras: a value only
        value = _remade(walker, tensor, env, f"{base}/mask", _DEPTH)
        if value is not None:
            env[id(mask)] = value
    if len(walker.uncovered) > seen or not isinstance(env.get(id(mask)), Value):
        g.rollback(mark)
        del walker.uncovered[seen:]
        for key in set(env) - known:
            del env[key]
    return env.get(id(mask), UNKNOWN)


def _remade(walker, tensor, env, base, depth):
    """The `[B, T]` bool mask of a tf-keras tensor, recomputed from its producer, or None."""
    node = internals.producing_node(tensor)
    if node is None or node.is_input or not node.input_tensors or depth == 0:
        return None
    layer, source = node.layer, node.input_tensors[0]
    if id(source) not in env:
        return None
    g, kind = walker.g, type(layer).__name__
    x = g.keras(env[id(source)])
    if kind == "Embedding" and getattr(layer, "mask_zero", False):
        name = g.node("Not", [g.node("Equal", [g.node("Cast", [x.name], base, to=7),
                                                g.scalar(0, np.int64)], base)], base)
        return Value(name, x.shape, tuple(range(x.rank)))
    if kind == "Masking":
        value = g.scalar(float(layer.mask_value))
        differs = g.node("Not", [g.node("Equal", [x.name, value], base)], base)
        kept = g.reduce("ReduceMax", g.node("Cast", [differs], base, to=FLOAT), [x.rank - 1],
                        False, base)
        return Value(g.node("Greater", [kept, g.scalar(0.5)], base), x.shape[:-1],
                     tuple(range(x.rank - 1)))
    passes = getattr(layer, "return_sequences", None) is True or (
        getattr(layer, "supports_masking", False)
        and type(layer).compute_mask is walker.flavour.Layer.compute_mask)
    if not passes:
        return None
    inner = getattr(source, "_keras_mask", None)
    if inner is not None and id(inner) in env:
        return env[id(inner)]
    value = _remade(walker, source, env, base, depth - 1)
    if value is not None and inner is not None:
        env[id(inner)] = value
    return value
