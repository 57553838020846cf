"""The native ONNX exporter: Keras layers straight to ONNX nodes.

The Keras graph is walked once, node by node in the model's own order;
every layer or op becomes ONNX nodes through the emitter tables of
`layers` (layers with weights), `shape` (layers without) and
`ops` (raw ops). Nested models are walked in place. A layer the
tables do not know (a custom layer, a Lambda, a keras-hub block) is opened
by calling its `call` on fresh symbolic inputs, which records its sublayers
and `keras.ops` calls as a small graph, walked the same way (`tracing` lets
more layers run symbolically; tensors the call computes from shapes alone
become initializers). A layer that needs its batch size as a number is
traced at batch 1 and run per batch element in an ONNX `Loop` (`loops`); a
layer whose code cannot run symbolically even so stays uncovered.

Nothing is emitted for an uncovered model: every uncovered layer is
collected and reported together (`graph.Uncovered`), so that the
caller can fall back to tf2onnx and say why.
"""

import contextlib

import tensorflow as tf

from bnconvert import keras_internals as internals
from bnconvert.onnx import attention
from bnconvert.onnx import conv_recurrent
from bnconvert.onnx import encoding
from bnconvert.onnx import graph_passes
from bnconvert.onnx import kernel_gaps
from bnconvert.onnx import preprocessing
from bnconvert.onnx import layers
from bnconvert.onnx import loops
from bnconvert.onnx import masks
from bnconvert.onnx import norm
from bnconvert.onnx import ops
from bnconvert.onnx import peephole
from bnconvert.onnx import recurrent
from bnconvert.onnx import shape
from bnconvert.onnx import sizes
from bnconvert.onnx import spectral
from bnconvert.onnx import tracing
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
from bnconvert.onnx.math import cast
from bnconvert.onnx.math import graph_dtype

LAYERS = {**layers.EMITTERS, **shape.EMITTERS, **attention.EMITTERS, **recurrent.EMITTERS,
          **preprocessing.EMITTERS, **norm.EMITTERS, **wrappers.EMITTERS, **encoding.EMITTERS,
          **spectral.LAYER_EMITTERS, **conv_recurrent.EMITTERS}
DEFAULT_OPSET = 17
OPSETS = range(13, 22)


def emit(model, flavour, input_names, output_names, opset=None, precision="float32",
         serialized=False):
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
        serialized: Return the model's bytes (written faster than the
            proto's own serialization, see `onnx.wire`).

    Returns:
        An `onnx.ModelProto` (or its bytes): inputs and outputs in the Keras layout with a
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
    g.trace_callable = walker.trace_callable
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
    with tracing.lenient(model, flavour):
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
        graph_passes.to_float16(g)
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
    graph_passes.divisions_to_products(g)
    shapes = {v.name: tuple(v.shape[a] for a in v.perm) for v in env.values()
              if isinstance(v, Value)}
    # Its last step drops the nodes and initializers nothing reads.
    peephole.optimize(g, {i[0]: i[1] for i in inputs}, output_names, shapes)
    kernel_gaps.widen_integer_kernels(g, inputs, outputs)
    make = g.serialized if serialized else g.model
    return make(model.name, inputs, outputs, "bnconvert")


def _fuse_output_transposes(g, output_names):
    """Write a final Transpose straight to the output name (no Identity after it)."""
    producers = {n.output[0]: n for n in g.nodes}
    uses = {}
    for n in g.all_nodes():
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    for node in [n for n in g.nodes if n.op_type == "Identity" and n.output[0] in output_names]:
        source = producers.get(node.input[0])
        if source is None or uses[node.input[0]] != 1 or source.op_type != "Transpose":
            continue
        source.output[0] = node.output[0]
        g.nodes.remove(node)


class _Walker:
    def __init__(self, g, flavour):
        self.g = g
        self.flavour = flavour
        self.uncovered = []
        self.dtypes = {}  # id(tensor) -> the dtype it has in the graph
        self.traced_dtypes = []  # of the outputs of the layer traced last

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

    def emit_producers(self, tensor, env, prefix, depth):
        """Emits the calls that computed `tensor` outside the model's graph (a Keras 3 mask)."""
        node = internals.producing_node(tensor)
        if node is None or node.is_input or node.layer is None or depth == 0 \
                or any(id(t) in env for t in node.outputs):
            return
        for t in node.input_tensors:
            if id(t) not in env and tracing.is_symbolic(self.flavour.keras, t):
                self.emit_producers(t, env, prefix, depth - 1)
        if all(id(t) in env for t in node.input_tensors if tracing.is_symbolic(
                self.flavour.keras, t)):
            self.node(node.layer, node.input_tensors, node.args, node.kwargs, node.outputs,
                      env, prefix)

    def _placeholders(self, outputs, env, prefix, layer):
        for t in outputs:
            env[id(t)] = Value(f"?{prefix}{layer.name}", tuple(t.shape),
                               tuple(range(len(t.shape))))

    def _emit(self, layer, tensors, args, kwargs, outputs, env, base):
        in_dtypes = [self.dtypes.get(id(t)) or dtype_name(t) for t in tensors]
        out_dtypes = [dtype_name(t) for t in outputs]
        floated = {}
        kind = type(layer).__name__
        if kind in LAYERS and type(layer).__module__.startswith(tracing.KNOWN_PACKAGES):
            position = {id(t): i for i, t in enumerate(tensors)}
            data = [t for t in tf.nest.flatten(args[:1]) if id(t) in position]
            cast = layers.as_floats(self.g, layer, [env[id(t)] for t in data],
                                    [in_dtypes[position[id(t)]] for t in data], out_dtypes, base)
            floated = {id(data[i]): v for i, v in cast.items()}
            in_dtypes = [("float32" if id(t) in floated else d) for t, d in zip(tensors, in_dtypes)]

        def sub(x):
            return floated.get(id(x)) or (env[id(x)] if id(x) in env else x)

        floats = [d for d in in_dtypes if d in ("float16", "bfloat16", "float32", "float64")]
        if floats and "float64" not in floats and not isinstance(layer, self.flavour.Layer):
            # Keras's symbolic inference promotes `x / np.sqrt(2.0)` to
            # float64; the TensorFlow backend computes it in the tensor's dtype.
            out_dtypes = [floats[0] if d == "float64" else d for d in out_dtypes]
        self.dtypes.update((id(t), d) for t, d in zip(outputs, out_dtypes))
        call = Call(layer, [sub(t) for t in tensors],
                    tf.nest.map_structure(sub, tuple(args)),
                    tf.nest.map_structure(sub, dict(kwargs)),
                    [tuple(t.shape) for t in outputs], base, out_dtypes, in_dtypes,
                    masks=[masks.carried(self, t, env, base) for t in tensors])
        if not isinstance(layer, self.flavour.Layer):
            return ops.emit_op(self.g, call)
        # A mixed-precision layer (float16/bfloat16 compute) keeps float32
        # variables: the graph is written in float32 (`precision` may lower it).
        # Integer lookups compute in their vocabulary's dtype; their emitters cast.
        dtype = getattr(layer, "compute_dtype", "float32")
        if dtype not in (None, "float32", "float16", "bfloat16") \
                and kind not in encoding.INTEGER_LAYERS:
            raise Uncovered([(base, kind, f"compute dtype {dtype}")])
        if self.flavour.is_graph_model(layer):
            inner = dict(zip((id(t) for t in layer.inputs), call.inputs))
            self.walk(layer, inner, base + "/")
            return [inner.get(id(t)) or self._missing(base) for t in layer.outputs]
        if kind in ("TFOpLambda", "SlicingOpLambda"):
            return ops.emit_tf_function(self.g, call)
        if kind in LAYERS and type(layer).__module__.startswith(tracing.KNOWN_PACKAGES):
            return LAYERS[kind](self.g, call)
        if kind == "InputLayer":
            return call.inputs
        return self.trace(layer, tensors, args, kwargs, env, base + "/", outputs)

    def _missing(self, base):
        raise Uncovered([(base, "model", "an output of a nested model")])

    def trace(self, layer, tensors, args, kwargs, env, prefix, outputs=None):
        """Opens a layer by calling its `call` on fresh symbolic inputs.

        `args` and `kwargs` are the call's own, holding `tensors` (emitted
        already, in `env`); each becomes a fresh `keras.Input`. Outputs it
        computes from shapes alone (concrete tensors) become initializers.
        A call that fails with unknown sizes as None is traced again with
        them as graph values (`sizes.run_time_sizes`: a text model's
        sequence length), so the graph stays dynamic; so is one whose
        outputs fix a size that the model's own `outputs` leave unknown
        (a table sliced by a length read as None). One that still needs
        its batch size as a number is traced at batch 1 and run once per
        batch element (`_per_sample`).
        """
        def plain():
            outs, _, shapes = self._trace(layer, tensors, args, kwargs, env, prefix)
            return outs, tracing.fixes_sizes(shapes, outputs)

        def with_sizes():
            with sizes.run_time_sizes(self.flavour.keras):
                return self._trace(layer, tensors, args, kwargs, env, prefix)[0], False

        def per_sample():
            return self._per_sample(layer, tensors, args, kwargs, env, prefix), False

        attempts = [plain]
        if any(None in tuple(t.shape) for t in tensors):
            attempts.append(with_sizes)
        if any(len(t.shape) and t.shape[0] is None for t in tensors):
            attempts.append(per_sample)
        outs = tracing.first_traced(self, attempts, with_sizes)
        # Keras's symbolic call gives some layers their policy's float dtype
        # whatever they return (`Lambda(lambda t: t * 2)` of int32: float32),
        # and the layers after it follow that dtype: so does the graph.
        for i, (t, dtype) in enumerate(zip(outputs or [], self.traced_dtypes)):
            if not is_float(dtype) and is_float(dtype_name(t)) and isinstance(outs[i], Value):
                outs[i] = cast(self.g, outs[i], graph_dtype(dtype),
                               graph_dtype(dtype_name(t)), prefix.rstrip("/"))
        return outs

    def _trace(self, layer, tensors, args, kwargs, env, prefix, batch=None):
        """`(outputs, dtypes, shapes)` of `layer`'s call traced (at batch size `batch` if given)."""
        keras = self.flavour.keras
        values = {id(t): env[id(t)] for t in tensors}
        fresh = {}

        def symbolic(x):
            if id(x) in values:
                if id(x) not in fresh:
                    shape = tuple(x.shape)
                    if batch is not None and len(shape) and shape[0] is None:
                        shape = (batch,) + shape[1:]
                    fresh[id(x)] = keras.Input(batch_shape=shape, dtype=x.dtype)
                return fresh[id(x)]
            return x

        def record():
            call_args = tf.nest.map_structure(symbolic, tuple(args))
            call_kwargs = tf.nest.map_structure(symbolic, tracing.accepted_kwargs(layer, kwargs))
            result = layer.call(*call_args, **call_kwargs)
            return self._sub_model([fresh[id(t)] for t in tensors if id(t) in fresh], result)

        sub = self._record(record, getattr(layer, "name", "model"), type(layer).__name__, prefix)
        inner = {id(fresh[i]): values[i] for i in fresh}
        outs = self._walk_traced(sub, inner, prefix)
        self.traced_dtypes = [dtype_name(t) for t in sub.flat]
        return outs, self.traced_dtypes, [tuple(t.shape) for t in sub.flat]

    def _per_sample(self, layer, tensors, args, kwargs, env, prefix):
        """`layer` traced at batch 1 and run once per element of the batch, in an ONNX `Loop`.

        Inputs with a dynamic batch axis are sliced per step, the others
        passed whole; the outputs of the steps are stacked. The gate checks
        on a batch of several that the layer treats its elements apart.
        """
        g, base, what = self.g, prefix.rstrip("/"), type(layer).__name__
        batched = [t for t in tensors if len(t.shape) and t.shape[0] is None]
        sliced = [(env[id(t)], self.dtypes.get(id(t)) or dtype_name(t)) for t in batched]
        shapes = []

        def body(index, carries, slices):
            inner = dict(env)
            for t, s in zip(batched, slices):
                inner[id(t)] = g.value(g.node("Unsqueeze", [s.name, g.ints([0], "axes")], base),
                                       (1,) + s.shape)
            outs, dtypes, traced = self._trace(layer, tensors, args, kwargs, inner, prefix, 1)
            if any(not shape or shape[0] != 1 for shape in traced):
                raise Uncovered([(base, what, "an output without the batch axis")])
            shapes.extend(shape[1:] for shape in traced)
            return [], [g.value(g.node("Squeeze", [g.keras(o).name, g.ints([0], "axes")], base),
                                o.shape[1:]) for o in outs], dtypes

        steps = loops.trip_count(g, g.keras(sliced[0][0]), base)
        _, stacked = loops.loop(g, base, what, steps, [], sliced, body)
        return [g.value(name, (None,) + tuple(shape)) for name, shape in zip(stacked, shapes)]

    def trace_function(self, function, value, base):
        """`function(value)` for a Python function (an activation), traced like a layer."""
        name = getattr(function, "__name__", "function")
        outs, _ = self.trace_callable(function, [(value.shape, "float32")], [value], base)
        if len(outs) != 1:
            raise Uncovered([(base, "function", f"{name} returns {len(outs)} tensors")])
        return outs[0]

    def trace_callable(self, function, specs, values, base):
        """`function(*values)` for a Python function of tensors, traced like a layer.

        Args:
            function: Called once on symbolic tensors of `specs`.
            specs: `(shape, dtype)` of each argument.
            values: The `Value` each argument is in the graph.
            base: A name prefix for the nodes emitted.

        Returns:
            `(outputs, dtypes)`: the `Value`s of the function's flattened
            result and their Keras dtype names.
        """
        keras = self.flavour.keras
        xs = [keras.Input(batch_shape=tuple(shape), dtype=dtype) for shape, dtype in specs]
        name = getattr(function, "__name__", "function")
        sub = self._record(lambda: self._sub_model(xs, function(*xs)), name, "function",
                           base + "/")
        outs = self._walk_traced(sub, dict(zip((id(x) for x in xs), values)), base + "/")
        return outs, [dtype_name(t) for t in sub.flat]

    def _sub_model(self, inputs, result):
        """The traced model of `result`, with the call's concrete outputs kept apart."""
        symbolic, flat = tracing.split_outputs(self.flavour.keras, result)
        model = self.flavour.keras.Model(inputs, symbolic) if symbolic else None
        return _Traced(model, flat)

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
        if sub.model is not None:
            self.walk(sub.model, inner, prefix)
        out = []
        for t in sub.flat:
            if tracing.is_symbolic(self.flavour.keras, t):
                out.append(inner.get(id(t)))
                continue
            array = tracing.as_array(t)
            if array.dtype == object:
                raise Uncovered([(prefix.rstrip("/"), "output", f"a {type(t).__name__}")])
            out.append(self.g.value(tracing.constant(self.g, array, f"{prefix}constant"),
                                    array.shape))
        if any(v is None for v in out):
            self._missing(prefix)
        return out


class _Traced:
    """A traced call: the model of its symbolic outputs (None without any), all outputs flat."""

    def __init__(self, model, flat):
        self.model = model
        self.flat = flat
