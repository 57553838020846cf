"""An ONNX graph under construction, with tensor layouts tracked per value.

Keras image tensors are channels-last (`NHWC`); ONNX convolutions and
pooling want channels-first (`NCHW`). Rather than transposing around every
layer, each `Value` records how its data are laid out: `perm[i]` is the Keras
axis held by physical axis `i` (the identity is the Keras layout). A layer
that needs channels first asks for that layout (`Graph.layout`), which costs
a `Transpose` only the first time a given value is asked for a given
layout; elementwise layers keep whatever layout their inputs have. A plain
CNN therefore pays one layout change after each input and one before each
output, and its whole body runs in `NCHW`.

The graph writes weights as initializers once (`Graph.constant`) and names
every node and tensor uniquely after the Keras layer it comes from.
"""

import contextlib
import dataclasses

import numpy as np
import onnx
from onnx import helper

from bnconvert.onnx import wire

FLOAT = onnx.TensorProto.FLOAT
BOOL = onnx.TensorProto.BOOL
FLOAT16 = onnx.TensorProto.FLOAT16
_FLOATS = {"float16", "bfloat16", "float32", "float64"}
# Inputs of these ops are float32 whatever the graph's precision.
FLOAT32_INPUTS = {"Resize": (1, 2), "Upsample": (1,)}


class Uncovered(Exception):
    """A layer or op the native exporter has no ONNX mapping for.

    Attributes:
        layers: `(name, class name, reason)` triples, one per uncovered layer.
    """

    def __init__(self, layers):
        self.layers = list(layers)
        super().__init__(describe(self.layers))


def describe(layers, limit=4):
    """`layers` (from `Uncovered`) as one short phrase."""
    shown = [f"'{name}' ({cls}{': ' + why if why else ''})" for name, cls, why in layers[:limit]]
    more = len(layers) - limit
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


@dataclasses.dataclass(frozen=True)
class Value:
    """A tensor of the ONNX graph as the Keras model sees it.

    Attributes:
        name: The ONNX tensor name.
        shape: The Keras shape (`None` for unknown dimensions).
        perm: Physical axis `i` holds Keras axis `perm[i]`.
    """

    name: str
    shape: tuple
    perm: tuple

    @property
    def rank(self):
        return len(self.shape)

    def physical(self, keras_axis):
        """The physical position of a Keras axis (negative axes allowed)."""
        return self.perm.index(keras_axis % self.rank)


def tensor_type(dtype, what="a tensor"):
    """The ONNX element type of a Keras dtype; `Uncovered` for strings and the like."""
    name = str(getattr(dtype, "name", dtype))
    if name == "bfloat16":
        return onnx.TensorProto.BFLOAT16
    try:
        return helper.np_dtype_to_tensor_dtype(np.dtype(name))
    except (TypeError, KeyError):
        raise Uncovered([(what, name, "ONNX holds no tensors of this dtype here; "
                          "feed numbers instead")]) from None


def is_float(dtype):
    """Whether a Keras dtype is a floating-point one."""
    return str(getattr(dtype, "name", dtype)) in _FLOATS


def as_tuple(value, n):
    """A Keras size argument (an int or a sequence) as an `n`-tuple."""
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n


def keras_axes(axis, rank):
    """A Keras `axis` argument (int, sequence or None for all) as sorted non-negative axes."""
    if axis is None:
        return list(range(rank))
    axes = list(axis) if isinstance(axis, (list, tuple)) else [axis]
    return sorted(int(a) % rank for a in axes)


def dtype_name(tensor):
    """The dtype name (`"float32"`, `"int32"`, ...) of a Keras 3 or tf-keras tensor."""
    dtype = getattr(tensor, "dtype", None) or "float32"
    return str(getattr(dtype, "name", dtype))


def identity(rank):
    """The Keras layout of a rank-`rank` tensor."""
    return tuple(range(rank))


def channels_first(rank):
    """`(0, rank-1, 1, ..., rank-2)`: Keras channels-last data stored as `NC...`."""
    return (0, rank - 1) + tuple(range(1, rank - 1)) if rank > 2 else identity(rank)


class Graph:
    """Nodes, initializers and layouts of the graph being emitted.

    Args:
        opset: The ONNX opset of the default domain.
    """

    def __init__(self, opset):
        self.opset = opset
        self.nodes = []
        self.initializers = []
        self._names = set()
        self._layouts = {}
        self._scalars = {}
        # `(alpha, beta)` of the hard sigmoid (`Flavour.hard_sigmoid`).
        self.hard_sigmoid = (1.0 / 6.0, 0.5)
        # `trace(function, value, base)`: a Python function applied to a `Value`, traced.
        self.trace = None
        # Outputs of nodes whose float operands are float32 (`float32_data`).
        self.float32_nodes = set()
        # A flattened global pooling's name -> its `Value` before the flattening
        # (`keepdims=True`), which a reshape back to that shape reuses.
        self.unflattened = {}

    def unique(self, base):
        """A tensor or node name not used yet, derived from `base`."""
        name, i = base, 1
        while name in self._names:
            name = f"{base}_{i}"
            i += 1
        self._names.add(name)
        return name

    def reserve(self, name):
        """Claims `name` exactly (graph input and output names)."""
        if name in self._names:
            raise ValueError(f"ONNX tensor name {name!r} is used twice")
        self._names.add(name)
        return name

    def constant(self, array, base, dtype=np.float32):
        """An initializer holding `array`; returns its name."""
        name = self.unique(base)
        # Kept as arrays: `model` writes each into the final proto once. Not
        # `ascontiguousarray`, which makes a 0-d array 1-d: a number times a
        # scalar (a run-time size) was then of shape [1] (`ops.stack` of two
        # such did not load; a scalar output came out of shape (1,)).
        self.initializers.append((name, np.require(np.asarray(array, dtype), requirements="C")))
        return name

    def scalar(self, value, dtype=np.float32):
        """A shared scalar initializer."""
        key = (float(value), np.dtype(dtype).str)
        if key not in self._scalars:
            self._scalars[key] = self.constant(np.array(value, dtype), "const", dtype)
        return self._scalars[key]

    def ints(self, values, base="shape"):
        """An int64 initializer (shapes, axes, pads)."""
        return self.constant(np.asarray(values, np.int64), base, np.int64)

    def node(self, op_type, inputs, base, outputs=1, output_names=None, **attrs):
        """Adds one node; returns the name of its output (a list if several)."""
        names = output_names or [self.unique(base if outputs == 1 else f"{base}_{i}")
                                 for i in range(outputs)]
        self.nodes.append(helper.make_node(
            op_type, list(inputs), names, name=self.unique(f"{base}/{op_type}"),
            **{k: v for k, v in attrs.items() if v is not None},
        ))
        return names[0] if outputs == 1 else names

    def float32_data(self, *names):
        """Marks the nodes giving `names` as computing on the graph's float32 data.

        With `--precision float16` those data become float16, and
        onnxruntime has no float16 kernel for some ops (`Celu`, `IsInf`
        before opset 20, a `ScatterND` with a reduction): to lower a marked
        node of such an op, `graph_passes.to_float16` runs it in float32.
        Only emitters know which float they compute in (an `IsInf` of a
        float64 tensor stays float64): they mark it. Returns the last name.
        """
        self.float32_nodes.update(names)
        return names[-1] if names else None

    @contextlib.contextmanager
    def subgraph(self):
        """Within: nodes go to a new list (the body of a `Loop`), yielded.

        Layout changes cached inside stay inside (a body's tensors are not
        visible after it); the body may use every tensor emitted before.
        """
        nodes, layouts = self.nodes, self._layouts
        self.nodes, self._layouts = [], dict(layouts)
        try:
            yield self.nodes
        finally:
            self.nodes, self._layouts = nodes, layouts

    def checkpoint(self):
        """A mark of what is emitted so far, for `rollback`."""
        return len(self.nodes), len(self.initializers), dict(self._layouts), dict(self._scalars)

    def rollback(self, mark):
        """Forgets the nodes and initializers emitted since `checkpoint` returned `mark`."""
        nodes, initializers, layouts, scalars = mark
        del self.nodes[nodes:]
        del self.initializers[initializers:]
        self._layouts, self._scalars = layouts, scalars

    def all_nodes(self):
        """Every node, those of subgraphs (loop bodies) included."""
        def nested(nodes):
            for node in nodes:
                yield node
                for attr in node.attribute:
                    if attr.type == onnx.AttributeProto.GRAPH:
                        yield from nested(attr.g.node)
        return nested(self.nodes)

    def subgraphs(self):
        """The subgraphs (loop bodies) of the graph, nested ones included."""
        return [attr.g for node in self.all_nodes() for attr in node.attribute
                if attr.type == onnx.AttributeProto.GRAPH]

    def value(self, name, shape, perm=None):
        """A `Value` for an emitted tensor."""
        shape = tuple(shape)
        return Value(name, shape, tuple(perm) if perm is not None else identity(len(shape)))

    def layout(self, value, perm):
        """`value`'s data in layout `perm`: a cached `Transpose` when it differs."""
        perm = tuple(perm)
        if value.perm == perm:
            return value
        key = (value.name, value.perm, perm)
        if key not in self._layouts:
            order = [value.perm.index(axis) for axis in perm]
            name = self.node("Transpose", [value.name], f"{value.name}/layout", perm=order)
            self._layouts[key] = Value(name, value.shape, perm)
        return self._layouts[key]

    def keras(self, value):
        """`value` in the Keras layout."""
        return self.layout(value, identity(value.rank))

    def channels_first(self, value):
        """`value` with its last Keras axis stored second (`NC...`)."""
        return self.layout(value, channels_first(value.rank))

    def broadcast_constant(self, array, value, base, dtype=np.float32):
        """A constant that broadcasts against `value` as `array` does in Keras.

        `array` is right-aligned against `value`'s Keras shape (NumPy
        broadcasting) and then laid out as `value` is.
        """
        array = np.asarray(array, dtype)
        if array.ndim == 0:
            return self.constant(array, base, dtype)
        if array.ndim > value.rank:
            raise ValueError("constant of higher rank than the tensor")
        full = array.reshape((1,) * (value.rank - array.ndim) + array.shape)
        return self.constant(np.transpose(full, value.perm), base, dtype)

    def reduce(self, op_type, value_name, axes, keepdims, base):
        """A Reduce* node; axes are an attribute before opset 18 (13 for ReduceSum)."""
        axes = [int(a) for a in axes]
        as_input = self.opset >= (13 if op_type == "ReduceSum" else 18)
        if as_input:
            return self.node(op_type, [value_name, self.ints(axes, "axes")], base,
                             keepdims=int(keepdims))
        return self.node(op_type, [value_name], base, axes=axes, keepdims=int(keepdims))

    def drop_unused(self):
        """Drops the initializers no node reads (replaced divisors, ignored layer outputs)."""
        used = {name for node in self.all_nodes() for name in node.input}
        self.initializers = [(n, a) for n, a in self.initializers if n in used]

    def model(self, name, inputs, outputs, producer, initializers=True):
        """The `onnx.ModelProto`.

        `inputs`/`outputs` are `(name, shape)` pairs, or `(name, shape,
        element type)` triples for other types than float32. With
        `initializers=False` the graph holds none (see `serialized`).
        """
        def info(name, shape, elem_type=FLOAT):
            dims = ["batch" if i == 0 and d is None else d for i, d in enumerate(shape)]
            return helper.make_tensor_value_info(name, elem_type, dims)

        graph = helper.make_graph(
            self.nodes, name, [info(*i) for i in inputs], [info(*o) for o in outputs],
        )
        opsets = [helper.make_opsetid("", self.opset)]
        model = helper.make_model(
            graph, opset_imports=opsets, producer_name=producer,
            ir_version=helper.find_min_ir_version_for(opsets),
        )
        # Filled in place: `make_graph` and `make_model` copy what they are
        # given, which for ResNet50 is 100 MB twice.
        for tensor_name, array in self.initializers if initializers else ():
            tensor = model.graph.initializer.add()
            tensor.name = tensor_name
            tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
            tensor.dims.extend(array.shape)
            tensor.raw_data = array.tobytes()
        return model

    def serialized(self, name, inputs, outputs, producer):
        """The bytes of `model(...)`, each initializer copied once (`wire`)."""
        return wire.serialize(self.model(name, inputs, outputs, producer, initializers=False),
                              self.initializers)


@dataclasses.dataclass
class Call:
    """One call of a layer or op, with its tensors already emitted.

    Attributes:
        layer: The Keras layer or op.
        inputs: The input `Value`s, flat, in call order.
        args: The positional arguments with `Value`s for tensors.
        kwargs: The keyword arguments, likewise.
        shapes: The Keras shapes of the call's outputs, flat.
        base: A name prefix for the nodes emitted.
        dtypes: The Keras dtype names of the outputs (None: all float32).
        input_dtypes: The Keras dtype names of `inputs` (None: all float32).
        masks: The Keras masks the call's input tensors carry (flat, like
            `inputs`): a `Value`, None, or `"unknown"` for a mask not in
            the graph. Layers that read masks themselves (attention) use it.
    """

    layer: object
    inputs: list
    args: tuple
    kwargs: dict
    shapes: list
    base: str
    dtypes: list = None
    input_dtypes: list = None
    masks: list = dataclasses.field(default_factory=list)

    def implicit_mask(self, value):
        """The Keras mask the input `value` carries: a `Value`, or None without one.

        Raises:
            Uncovered: The mask is not computed in the graph (tf-keras keeps
                masks outside it), so the layer cannot honour it.
        """
        masks = self.masks or [None] * len(self.inputs)
        mask = masks[self.inputs.index(value)] if value in self.inputs else None
        if mask is not None and not isinstance(mask, Value):
            raise Uncovered([(self.base, type(self.layer).__name__,
                              "an input mask not computed in the graph")])
        return mask

    def given_mask(self):
        """The mask the layer applies to its first input: a `Value`, or None without one.

        That is its `mask=` argument, else its second positional one (a
        `pool(x, mask)` or `softmax(x, mask)` inside a traced call), else
        the mask its first input carries (`implicit_mask`).

        Raises:
            Uncovered: The mask is not a tensor of the graph.
        """
        mask = self.kwargs.get("mask")
        if mask is None and len(self.args) > 1:
            mask = self.args[1]
        mask = self.implicit_mask(self.inputs[0]) if mask is None else mask
        if mask is not None and not isinstance(mask, Value):
            raise Uncovered([(self.base, type(self.layer).__name__,
                              "a mask that is not a tensor of the graph")])
        return mask

    def out(self, name, perm=None, index=0):
        """The `Value` of output `index`, emitted as `name` in layout `perm`."""
        shape = tuple(self.shapes[index])
        return Value(name, shape, tuple(perm) if perm is not None else identity(len(shape)))
