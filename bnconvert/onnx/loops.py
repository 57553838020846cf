"""Keras's loops over tensors (`ops.map`, `vectorized_map`, `scan`, `fori_loop`) as ONNX `Loop`s.

A loop's function is traced once, on symbolic tensors of one step's shapes
(`Graph.trace_callable`, the walk's tracing of unknown layers), and the
nodes it records become the body of one ONNX `Loop`:

- `map(f, xs)` and `vectorized_map(f, xs)`: step `i` gathers element `i`
  of every tensor of `xs` along the leading axis; each output of `f` is a
  scan output, which `Loop` stacks along a new leading axis, as Keras does;
- `scan(f, init, xs)`: the carry (the leaves of `init`) is loop-carried,
  `y` a scan output; `reverse=True` walks the steps from the last and
  reverses the stacked `y`, so that `y[i]` belongs to `xs[i]`;
- `fori_loop(lower, upper, body, init)`: `upper - lower` steps (whole
  numbers, known when the graph is written), the step's index
  `lower + i` as int32 and the value loop-carried.

The number of steps is the leading dimension of the mapped tensors, read
at run time (`Shape`), so a loop over the batch works for any batch size.
"""

import numpy as np
import onnx
import tensorflow as tf
from onnx import helper

from bnconvert.onnx import math
from bnconvert.onnx.graph import BOOL
from bnconvert.onnx.graph import Uncovered
from bnconvert.onnx.graph import Value
from bnconvert.onnx.graph import identity
from bnconvert.onnx.graph import tensor_type

INT64 = onnx.TensorProto.INT64


def _tensors(call, structure, what):
    """The leaves of `structure`, each a `Value` of the graph in the Keras layout."""
    leaves = tf.nest.flatten(structure)
    if not all(isinstance(v, Value) for v in leaves):
        raise Uncovered([(call.base, what, "loop over values that are not tensors of the model")])
    return leaves


def _info(name, dtype):
    return helper.make_tensor_value_info(name, tensor_type(math.graph_dtype(dtype), name), None)


def scalar(g, value, base, elem=INT64):
    """A 0-d integer tensor (`Graph.constant` writes at least one dimension)."""
    return g.node("Constant", [], base, value=helper.make_tensor(base, elem, [], [int(value)]))


def trip_count(g, x, base):
    """The length of `x`'s leading axis as an int64 scalar."""
    if x.shape[0] is not None:
        return scalar(g, x.shape[0], f"{base}/steps")
    shape = g.node("Shape", [x.name], base)
    return g.node("Gather", [shape, scalar(g, 0, f"{base}/zero")], base, axis=0)


def loop(g, base, what, steps, carried, sliced, body, reverse=False):
    """One `Loop` node; returns `(final carried names, stacked output names)`.

    Args:
        g: The `Graph`.
        base: A name prefix for the nodes emitted.
        what: The class of the layer or op looping (for errors).
        steps: The int64 scalar tensor holding the number of steps.
        carried: `(Value, dtype)` pairs threaded through the steps.
        sliced: `(Value, dtype)` pairs whose leading axis the steps walk.
        body: `body(index, carries, slices)` -> `(new carries, outputs,
            output dtypes)`, all `Value`s; `index` is the int64 step index.
        reverse: Walk the steps from the last.
    """
    iteration, condition = g.unique(f"{base}/iteration"), g.unique(f"{base}/condition")
    carry_in = [g.unique(f"{base}/carry") for _ in carried]
    sources = [g.keras(v) for v, _ in sliced]
    initial = [g.keras(v).name for v, _ in carried]
    with g.subgraph() as nodes:
        index = iteration
        if reverse:
            last = g.node("Sub", [steps, scalar(g, 1, f"{base}/one")], base)
            index = g.node("Sub", [last, iteration], base)
        slices = [Value(g.node("Gather", [x.name, index], base, axis=0), x.shape[1:],
                        identity(x.rank - 1)) for x in sources]
        carries = [Value(name, v.shape, identity(v.rank)) for name, (v, _) in zip(carry_in, carried)]
        new_carries, outputs, dtypes = body(index, carries, slices)
        if len(new_carries) != len(carried):
            raise Uncovered([(base, what, "a carry of another structure")])
        names = [g.node("Identity", [condition], base)] + [
            g.node("Identity", [g.keras(v).name], base) for v in new_carries + outputs]
    graph = helper.make_graph(
        nodes, g.unique(f"{base}/body"),
        [helper.make_tensor_value_info(iteration, INT64, []),
         helper.make_tensor_value_info(condition, BOOL, [])]
        + [_info(n, d) for n, (_, d) in zip(carry_in, carried)],
        [helper.make_tensor_value_info(names[0], BOOL, [])]
        + [_info(n, d) for n, d in zip(names[1:], [d for _, d in carried] + dtypes)],
    )
    count = len(carried) + len(outputs)
    results = g.node("Loop", [steps, "", *initial], base, outputs=count, body=graph)
    results = [results] if count == 1 else results
    stacked = results[len(carried):]
    if reverse:
        stacked = [_reversed(g, y, base) for y in stacked]
    return results[:len(carried)], stacked


def _reversed(g, name, base):
    return g.node("Slice", [name, g.ints([-1]), g.ints([np.iinfo(np.int64).min]), g.ints([0]),
                            g.ints([-1])], base)


def _dtype(call, value):
    return math.dtype_of(call, value)


def _map(function_key, elements_key):
    def emit(g, call, p):
        function, elements = p[function_key], p[elements_key]
        leaves = _tensors(call, elements, type(call.layer).__name__)
        sliced = [(v, _dtype(call, v)) for v in leaves]

        def body(index, carries, slices):
            def step(*args):
                return function(tf.nest.pack_sequence_as(elements, list(args)))
            outs, dtypes = g.trace_callable(
                step, [(s.shape, d) for s, (_, d) in zip(slices, sliced)], slices, call.base)
            return [], outs, dtypes

        steps = trip_count(g, g.keras(leaves[0]), call.base)
        _, ys = loop(g, call.base, type(call.layer).__name__, steps, [], sliced, body)
        return [call.out(y, index=i) for i, y in enumerate(ys)]
    return emit


def _scan(g, call, p):
    function, init, xs = p["f"], p["init"], p.get("xs")
    carried = [(v, _dtype(call, v)) for v in _tensors(call, init, "Scan")]
    sliced = [(v, _dtype(call, v)) for v in (_tensors(call, xs, "Scan") if xs is not None else [])]
    if p.get("length") is not None:
        steps = scalar(g, p["length"], f"{call.base}/steps")
    elif sliced:
        steps = trip_count(g, g.keras(sliced[0][0]), call.base)
    else:
        raise Uncovered([(call.base, "Scan", "neither xs nor length")])

    def body(index, carries, slices):
        def step(*args):
            carry = tf.nest.pack_sequence_as(init, list(args[:len(carried)]))
            x = tf.nest.pack_sequence_as(xs, list(args[len(carried):])) if xs is not None else None
            return function(carry, x)
        specs = [(v.shape, d) for v, d in carried] + [(s.shape, d) for s, (_, d) in
                                                       zip(slices, sliced)]
        outs, dtypes = g.trace_callable(step, specs, carries + slices, call.base)
        return outs[:len(carried)], outs[len(carried):], dtypes[len(carried):]

    final, ys = loop(g, call.base, "Scan", steps, carried, sliced, body,
                     reverse=bool(p.get("reverse")))
    return [call.out(name, index=i) for i, name in enumerate(final + ys)]


def _fori_loop(g, call, p):
    lower, upper = p["lower"], p["upper"]
    if isinstance(lower, Value) or isinstance(upper, Value):
        raise Uncovered([(call.base, "ForiLoop", "bounds computed in the model")])
    lower, upper = int(math.constant(lower)), int(math.constant(upper))
    value = p["init_val"]
    carried = [(v, _dtype(call, v)) for v in _tensors(call, value, "ForiLoop")]
    steps = scalar(g, max(upper - lower, 0), f"{call.base}/steps")

    def body(index, carries, slices):
        i = g.node("Add", [g.node("Cast", [index], call.base, to=onnx.TensorProto.INT32),
                           scalar(g, lower, f"{call.base}/lower", onnx.TensorProto.INT32)],
                   call.base)

        def step(i, *args):
            return p["body_fun"](i, tf.nest.pack_sequence_as(value, list(args)))
        specs = [((), "int32")] + [(v.shape, d) for v, d in carried]
        outs, _ = g.trace_callable(step, specs, [Value(i, (), ())] + carries, call.base)
        return outs, [], []

    final, _ = loop(g, call.base, "ForiLoop", steps, carried, [], body)
    return [call.out(name, index=i) for i, name in enumerate(final)]


EMITTERS = {
    "map": _map("f", "xs"),
    "vectorized_map": _map("function", "elements"),
    "scan": _scan,
    "fori_loop": _fori_loop,
}
