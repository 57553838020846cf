"""The native ONNX exporter: Keras layers straight to ONNX nodes.

The Keras graph is walked once, node by node in the model's own order;
every layer or op becomes ONNX nodes through the emitter tables of
`layers` (layers with weights), `shape` (layers without) and
`ops` (raw ops). Nested models are walked in place. A layer the
tables do not know (a custom layer, a Lambda, a keras-hub block) is opened
by calling its `call` on fresh symbolic inputs, which records its sublayers
and `keras.ops` calls as a small graph, walked the same way; a layer whose
code cannot run symbolically stays uncovered.

Nothing is emitted for an uncovered model: every uncovered layer is
collected and reported together (`graph.Uncovered`), so that the
caller can fall back to tf2onnx and say why.
"""

import tensorflow as tf

from bnconvert import keras_internals as internals
from bnconvert.onnx import attention
from bnconvert.onnx import encoding
from bnconvert.onnx import preprocessing
from bnconvert.onnx import layers
from bnconvert.onnx import norm
from bnconvert.onnx import ops
from bnconvert.onnx import peephole
from bnconvert.onnx import recurrent
from bnconvert.onnx import shape
from bnconvert.onnx import wrappers
from bnconvert.onnx.graph import FLOAT
from bnconvert.onnx.graph import FLOAT16
from bnconvert.onnx.graph import Call
from bnconvert.onnx.graph import Graph
from bnconvert.onnx.graph import Uncovered
from bnconvert.onnx.graph import Value
from bnconvert.onnx.graph import dtype_name
from bnconvert.onnx.graph import is_float
from bnconvert.onnx.graph import tensor_type

LAYERS = {**layers.EMITTERS, **shape.EMITTERS, **attention.EMITTERS, **recurrent.EMITTERS,
          **preprocessing.EMITTERS, **norm.EMITTERS, **wrappers.EMITTERS, **encoding.EMITTERS}
DEFAULT_OPSET = 17
OPSETS = range(13, 22)
# Layers of these packages are mapped by class name; any other class
# (including subclasses of Keras layers) is opened by tracing its call.
_KNOWN_PACKAGES = ("keras.", "tf_keras.", "bnconvert.")


def emit(model, flavour, input_names, output_names, opset=None, precision="float32"):
    """The ONNX model of a Keras model, emitted natively.

    Args:
        model: A built Keras model with symbolic inputs (Functional,
            Sequential, or any model whose `call` runs on symbolic tensors).
        flavour: The model's `Flavour`.
        input_names: ONNX names of the model's inputs, in order.
        output_names: ONNX names of its outputs, in order.
        opset: The ONNX opset (`DEFAULT_OPSET` if None).
        precision: `"float32"` or `"float16"`: the float type the graph
            computes in. A mixed-precision model's float32 variables are
            written as they are (float32) or rounded (float16).

    Returns:
        An `onnx.ModelProto`: inputs and outputs in the Keras layout with a
        dynamic batch dimension. Inputs carry their Keras dtypes; integer
        and boolean outputs too, float outputs are float32 (float16 when
        both the graph and the Keras output are).

    Raises:
        Uncovered: Some layers have no mapping; all of them are listed.
    """
    g = Graph(opset or DEFAULT_OPSET)
    g.hard_sigmoid = flavour.hard_sigmoid
    walker = _Walker(g, flavour)
    g.trace = walker.trace_function
    env = {}
    inputs = []
    for name in output_names:
        g.reserve(name)
    for tensor, name in zip(model.inputs, input_names):
        g.reserve(name)
        elem = tensor_type(tensor.dtype, name)
        value = name
        # Float inputs join the graph's float type (the lowering below
        # turns these casts to float16).
        if is_float(tensor.dtype) and (elem != FLOAT or precision != "float32"):
            value = g.node("Cast", [name], f"{name}/cast", to=FLOAT)
        env[id(tensor)] = Value(value, tuple(tensor.shape), tuple(range(len(tensor.shape))))
        inputs.append((name, tuple(tensor.shape), elem))
    if flavour.is_graph_model(model):
        walker.walk(model, env, "")
    else:
        # A subclassed model with symbolic inputs: opened like a custom layer.
        tensors = list(model.inputs)
        args = (tensors[0] if len(tensors) == 1 else tensors,)
        outs = walker.trace(model, tensors, args, {}, env, "")
        env.update(zip((id(t) for t in model.outputs), outs))
    if walker.uncovered:
        raise Uncovered(walker.uncovered)
    inner = FLOAT
    if precision == "float16":
        g.to_float16()
        inner = FLOAT16
    outputs = []
    for tensor, name in zip(model.outputs, output_names):
        value = g.keras(env[id(tensor)])
        elem = tensor_type(tensor.dtype, name)
        if is_float(tensor.dtype):
            elem = FLOAT16 if elem == FLOAT16 == inner else FLOAT
        if elem == inner:
            g.node("Identity", [value.name], name, output_names=[name])
        else:
            g.node("Cast", [value.name], name, output_names=[name], to=elem)
        outputs.append((name, tuple(tensor.shape), elem))
    _fuse_output_transposes(g, output_names)
    g.divisions_to_products()
    shapes = {v.name: tuple(v.shape[a] for a in v.perm) for v in env.values()
              if isinstance(v, Value)}
    peephole.optimize(g, {i[0]: i[1] for i in inputs}, output_names, shapes)
    return g.model(model.name, inputs, outputs, "bnconvert")


def _fuse_output_transposes(g, output_names):
    """Write a final Transpose straight to the output name (no Identity after it)."""
    producers = {n.output[0]: n for n in g.nodes}
    uses = {}
    for n in g.nodes:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    for node in [n for n in g.nodes if n.op_type == "Identity" and n.output[0] in output_names]:
        source = producers.get(node.input[0])
        if source is None or uses[node.input[0]] != 1 or source.op_type != "Transpose":
            continue
        source.output[0] = node.output[0]
        g.nodes.remove(node)


def _mask(tensor, env):
    """The `Value` of `tensor`'s Keras mask, None, or "unknown" (not produced in the graph)."""
    mask = getattr(tensor, "_keras_mask", None)
    if mask is None:
        return None
    return env.get(id(mask), "unknown")


class _Walker:
    def __init__(self, g, flavour):
        self.g = g
        self.flavour = flavour
        self.uncovered = []
        self.dtypes = {}  # id(tensor) -> the dtype it has in the graph

    def walk(self, model, env, prefix):
        """Emits every node of a Functional (or Sequential) model."""
        for node in internals.graph_nodes(model):
            if node.is_input:
                continue
            self.node(node.layer, node.input_tensors, node.args, node.kwargs,
                      node.outputs, env, prefix)

    def node(self, layer, tensors, args, kwargs, outputs, env, prefix):
        missing = [t for t in tensors if id(t) not in env]
        if missing:  # an input not produced (its producer was uncovered)
            self._placeholders(outputs, env, prefix, layer)
            return
        base = prefix + layer.name
        try:
            values = self._emit(layer, tensors, args, kwargs, outputs, env, base)
        except Uncovered as e:
            self.uncovered += [(n or base, c or type(layer).__name__, w) for n, c, w in e.layers]
            self._placeholders(outputs, env, prefix, layer)
            return
        for tensor, value in zip(outputs, values):
            env[id(tensor)] = value

    def _placeholders(self, outputs, env, prefix, layer):
        for t in outputs:
            env[id(t)] = Value(f"?{prefix}{layer.name}", tuple(t.shape),
                               tuple(range(len(t.shape))))

    def _emit(self, layer, tensors, args, kwargs, outputs, env, base):
        def sub(x):
            return env[id(x)] if id(x) in env else x

        in_dtypes = [self.dtypes.get(id(t)) or dtype_name(t) for t in tensors]
        out_dtypes = [dtype_name(t) for t in outputs]
        floats = [d for d in in_dtypes if d in ("float16", "bfloat16", "float32", "float64")]
        if floats and "float64" not in floats and not isinstance(layer, self.flavour.Layer):
            # Keras's symbolic inference promotes `x / np.sqrt(2.0)` to
            # float64; the TensorFlow backend computes it in the tensor's dtype.
            out_dtypes = [floats[0] if d == "float64" else d for d in out_dtypes]
        self.dtypes.update((id(t), d) for t, d in zip(outputs, out_dtypes))
        call = Call(layer, [env[id(t)] for t in tensors],
                    tf.nest.map_structure(sub, tuple(args)),
                    tf.nest.map_structure(sub, dict(kwargs)),
                    [tuple(t.shape) for t in outputs], base, out_dtypes, in_dtypes,
                    masks=[_mask(t, env) for t in tensors])
        if not isinstance(layer, self.flavour.Layer):
            return ops.emit_op(self.g, call)
        # A mixed-precision layer (float16/bfloat16 compute) keeps float32
        # variables: the graph is written in float32 (`precision` may lower it).
        dtype = getattr(layer, "compute_dtype", "float32")
        if dtype not in (None, "float32", "float16", "bfloat16"):
            raise Uncovered([(base, type(layer).__name__, f"compute dtype {dtype}")])
        kind = type(layer).__name__
        if self.flavour.is_graph_model(layer):
            inner = dict(zip((id(t) for t in layer.inputs), call.inputs))
            self.walk(layer, inner, base + "/")
            return [inner.get(id(t)) or self._missing(base) for t in layer.outputs]
        if kind in ("TFOpLambda", "SlicingOpLambda"):
            return ops.emit_tf_function(self.g, call)
        if kind in LAYERS and type(layer).__module__.startswith(_KNOWN_PACKAGES):
            return LAYERS[kind](self.g, call)
        if kind == "InputLayer":
            return call.inputs
        return self.trace(layer, tensors, args, kwargs, env, base + "/")

    def _missing(self, base):
        raise Uncovered([(base, "model", "an output of a nested model")])

    def trace(self, layer, tensors, args, kwargs, env, prefix):
        """Opens a layer by calling its `call` on fresh symbolic inputs.

        `args` and `kwargs` are the call's own, holding `tensors` (emitted
        already, in `env`); each becomes a fresh `keras.Input`.
        """
        keras = self.flavour.keras
        values = {id(t): env[id(t)] for t in tensors}
        fresh = {}

        def symbolic(x):
            if id(x) in values:
                if id(x) not in fresh:
                    fresh[id(x)] = keras.Input(batch_shape=tuple(x.shape), dtype=x.dtype)
                return fresh[id(x)]
            return x

        def record():
            call_args = tf.nest.map_structure(symbolic, tuple(args))
            call_kwargs = tf.nest.map_structure(symbolic, dict(kwargs))
            result = layer.call(*call_args, **call_kwargs)
            inputs = [fresh[id(t)] for t in tensors if id(t) in fresh]
            return keras.Model(inputs, tf.nest.flatten(result))

        sub = self._record(record, getattr(layer, "name", "model"), type(layer).__name__, prefix)
        inner = {id(fresh[i]): values[i] for i in fresh}
        return self._walk_traced(sub, inner, prefix)

    def trace_function(self, function, value, base):
        """`function(value)` for a Python function (an activation), traced like a layer."""
        keras = self.flavour.keras
        x = keras.Input(batch_shape=value.shape)
        name = getattr(function, "__name__", "function")
        sub = self._record(lambda: keras.Model(x, function(x)), name, "function", base + "/")
        outs = self._walk_traced(sub, {id(x): value}, base + "/")
        if len(outs) != 1:
            raise Uncovered([(base, "function", f"{name} returns {len(outs)} tensors")])
        return outs[0]

    @staticmethod
    def _record(build, name, kind, prefix):
        """`build()`, the traced sub-model; `Uncovered` if it does not run symbolically."""
        try:
            return build()
        except Exception as e:  # noqa: BLE001 - user code raises anything
            reason = str(e).strip().splitlines()[0][:100] if str(e).strip() else type(e).__name__
            raise Uncovered([(prefix.rstrip("/") or name, kind,
                              f"its call does not run on symbolic tensors ({reason})")])

    def _walk_traced(self, sub, inner, prefix):
        self.walk(sub, inner, prefix)
        out = [inner.get(id(t)) for t in sub.outputs]
        if any(v is None for v in out):
            self._missing(prefix)
        return out
