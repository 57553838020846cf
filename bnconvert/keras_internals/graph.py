"""Both flavours: rewriting a layer in place, and the nodes of a Functional graph."""

import dataclasses
import inspect


# -- rewriting a layer in place, both flavours -----------------------------

# What ties a layer object to the graphs it was called in and to its place in
# the model; everything else about it comes from its replacement.
_PLACE_ATTRIBUTES = frozenset({
    "_inbound_nodes", "_outbound_nodes", "_parent_path", "_path",  # Keras 3
    "_inbound_nodes_value", "_outbound_nodes_value",  # tf-keras
    "_saved_model_inputs_spec", "_saved_model_arg_spec",  # both
})


def become(layer, new):
    """Turns the object `layer` into `new`, keeping its place in every graph.

    Graph nodes, parent layers' attributes and lists, and symbolic tensors'
    histories all hold the layer object itself; giving that object the new
    layer's class and state (its config, build state and variables) rewrites
    the layer without touching anything that refers to it: the model's own
    class and config, raw ops, custom layers and nested models stay as they
    are. Only the attributes that record where the layer was called are kept.
    `new` must not be used afterwards.
    """
    state = dict(vars(new))
    state.update({k: v for k, v in vars(layer).items() if k in _PLACE_ATTRIBUTES})
    vars(layer).clear()
    vars(layer).update(state)
    object.__setattr__(layer, "__class__", type(new))
    # A graph replays each call with the keyword arguments recorded for it
    # (Keras 3 records `mask=None` for a BN); drop those the new call lacks.
    parameters = inspect.signature(type(new).call).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        for node in getattr(layer, "_inbound_nodes", None) or ():
            arguments = getattr(node, "arguments", None)
            kwargs = arguments.kwargs if arguments is not None else getattr(
                node, "call_kwargs", None
            )
            if isinstance(kwargs, dict):
                for key in [k for k in kwargs if k not in parameters]:
                    del kwargs[key]


# -- graph nodes, both flavours --------------------------------------------


@dataclasses.dataclass(frozen=True)
class GraphNode:
    """One call of a layer in a Functional graph.

    Attributes:
        layer: The layer (or Keras 3 operation) called.
        is_input: Whether the node is an InputLayer's.
        input_tensors: The symbolic tensors passed in.
        kwargs: The keyword arguments of the call (`training`, ...).
        args: The positional arguments of the call, tensors in place.
        outputs: The symbolic tensors the call produced, flat.
    """

    layer: object
    is_input: bool
    input_tensors: tuple
    kwargs: dict
    args: tuple = ()
    outputs: tuple = ()


def graph_nodes(model):
    """The nodes of a Functional model, inputs first (`_nodes_by_depth`)."""
    # A Keras 3 Sequential keeps its graph in a Functional it builds.
    by_depth = getattr(model, "_nodes_by_depth", None)
    if by_depth is None:
        by_depth = model._functional._nodes_by_depth
    return [_graph_node(node) for depth in sorted(by_depth, reverse=True)
            for node in by_depth[depth]]


def producing_node(tensor):
    """The `GraphNode` of the call that produced a symbolic tensor, or None without history.

    A Keras mask (`_keras_mask`) is computed by ops its layer's
    `compute_mask` called; their nodes are not in the model's graph unless
    a layer takes the mask as an argument.
    """
    history = getattr(tensor, "_keras_history", None)
    if history is None or history[0] is None:
        return None
    layer, node_index, _ = history
    return _graph_node(layer._inbound_nodes[node_index])


def _graph_node(node):
    # Keras 3 names the called object `operation`, tf-keras `layer`.
    layer = getattr(node, "operation", None)
    if layer is None:
        layer = getattr(node, "layer", None)
    arguments = getattr(node, "arguments", None)
    kwargs = arguments.kwargs if arguments is not None else getattr(node, "call_kwargs", {})
    args = arguments.args if arguments is not None else getattr(node, "call_args", ())
    # tf-keras's `input_tensors` is the first argument only (a string
    # for `tf.einsum`, a number for `0 * x`); `keras_inputs` is all of them.
    tensors = node.input_tensors if node.is_input else getattr(
        node, "keras_inputs", node.input_tensors)
    return GraphNode(layer, bool(node.is_input), tuple(_flat(tensors)), dict(kwargs or {}),
                     tuple(args or ()), tuple(_flat(node.outputs)))


def _flat(tensors):
    if isinstance(tensors, (list, tuple)):
        return [t for item in tensors for t in _flat(item)]
    if isinstance(tensors, dict):
        return [t for item in tensors.values() for t in _flat(item)]
    return [tensors]


def producer_of(tensor):
    """`(layer, node_is_input)` for the call that produced a symbolic tensor."""
    layer, node_index, _ = tensor._keras_history
    node = layer._inbound_nodes[node_index]
    return layer, bool(node.is_input)


def producing_layer(tensor):
    """The layer whose call produced a symbolic tensor (`_keras_history`)."""
    return tensor._keras_history[0]


def is_consumed(operation):
    """Whether another op or layer of a graph takes one of `operation`'s outputs."""
    return bool(operation._outbound_nodes)
