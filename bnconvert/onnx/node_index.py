"""Who produces and who reads each tensor of a `Graph` being rewritten.

Shared by the rewrites of `peephole`, `crops` and `stem`, which run on
`Graph.nodes` and `Graph.initializers` once the walk is done.
"""

import contextlib

from onnx import helper as onnx_helper


def attribute(node, name, default):
    """The value of `node`'s attribute `name` (lists as lists), or `default` if it has none."""
    found = [a for a in node.attribute if a.name == name]
    return onnx_helper.get_attribute_value(found[0]) if found else default


def inner_inputs(node):
    """The tensors the subgraphs of `node` (a `Loop`, `Scan` or `If` body) read, at any depth."""
    names = []
    for attr in node.attribute:
        for graph in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            for inner in graph.node:
                names += list(inner.input) + inner_inputs(inner)
    return names


class Index:
    """Producers and use counts of the tensors of `g` (graph outputs count as uses)."""

    def __init__(self, g, output_names):
        self.arrays = dict(g.initializers)
        self.producer = {out: node for node in g.nodes for out in node.output}
        self.uses = {name: 1 for name in output_names}
        self.consumers = {}
        for node in g.nodes:
            for name in list(node.input) + inner_inputs(node):
                self.uses[name] = self.uses.get(name, 0) + 1
                self.consumers.setdefault(name, []).append(node)

    def split(self, node, ops):
        """`(data input, constant index)` of a binary `node` with one float constant, or None."""
        if node is None or node.op_type not in ops or len(node.input) != 2:
            return None
        constant = [i for i, name in enumerate(node.input) if name in self.arrays]
        if len(constant) != 1 or self.arrays[node.input[constant[0]]].dtype.kind != "f":
            return None
        return node.input[1 - constant[0]], constant[0]


def position(g, node):
    return next(i for i, n in enumerate(g.nodes) if n is node)


@contextlib.contextmanager
def placed_at(g, at):
    """Within: the nodes `g.node` appends go to position `at` of `g.nodes` on leaving.

    A rewrite emits its nodes where the nodes it replaced were, so that
    `g.nodes` stays in an order that runs. Nodes it keeps, dropped and
    appended again to `g.nodes` within, go there too, in that order.
    """
    count = len(g.nodes)
    yield
    new = g.nodes[count:]
    del g.nodes[count:]
    g.nodes[at:at] = new


def drop(g, nodes):
    """Removes `nodes` from `g`; returns where the first one was."""
    at = position(g, nodes[0])
    gone = {id(node) for node in nodes}
    g.nodes = [n for n in g.nodes if id(n) not in gone]
    return at
