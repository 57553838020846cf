"""`keras.ops.rearrange` (einops patterns) as ONNX: Reshape, Transpose, Reshape.

Emitters are `emit(g, call, p)` as in `math`. The pattern is read as Keras
reads it (`"b (h h1) w c -> b h w (c h1)"`: names and parenthesized groups,
lengths of decomposed axes from the keyword arguments, at most one inferred
per group). A pattern that only permutes axes changes the value's layout and
emits nothing; otherwise the input is split into its named axes, permuted
and merged into the output groups, with at most one size unknown (the batch)
at each reshape.
"""

import re

import numpy as np

from bnconvert.onnx.graph import Uncovered
from bnconvert.onnx.reshaping import transpose

_AXES = re.compile(r"\w+|\(.*?\)")


def _groups(side):
    """`"b (h w) c"` -> `[["b"], ["h", "w"], ["c"]]`."""
    return [re.findall(r"\w+", a) if a.startswith("(") else [a] for a in _AXES.findall(side)]


def _product(sizes):
    return None if None in sizes else int(np.prod(sizes, dtype=np.int64))


def _reshaped(g, call, name, sizes):
    if sizes.count(None) > 1:
        raise Uncovered([(call.base, "Rearrange", "more than one unknown size in a reshape")])
    return g.node("Reshape", [name, g.ints([-1 if s is None else s for s in sizes])], call.base)


def parse(pattern, shape, lengths, what="Rearrange"):
    """`(named sizes, permutation, output sizes)` of an einops pattern on `shape`.

    Raises:
        Uncovered: A pattern this reading does not cover (ellipsis, anonymous
            or repeated axes, an axis on one side only, lengths that do not fit).
    """
    sides = re.split(r"\s*->\s*", pattern.strip())
    if len(sides) != 2 or "." in pattern:
        raise Uncovered([(None, what, f"pattern {pattern!r}")])
    inputs, outputs = (_groups(s) for s in sides)
    flat_in = [a for group in inputs for a in group]
    flat_out = [a for group in outputs for a in group]
    if (len(inputs) != len(shape) or sorted(flat_in) != sorted(flat_out)
            or len(set(flat_in)) != len(flat_in) or any(a.isdigit() for a in flat_in)):
        raise Uncovered([(None, what, f"pattern {pattern!r} on a rank-{len(shape)} tensor")])
    size = {}
    for group, dim in zip(inputs, shape):
        if len(group) == 1:
            size[group[0]] = dim
            continue
        unknown = [a for a in group if a not in lengths]
        known = _product([int(lengths[a]) for a in group if a in lengths])
        if len(unknown) > 1 or (not unknown and dim is not None and known != dim):
            raise Uncovered([(None, what, f"axis lengths that do not split {group}")])
        size.update({a: int(lengths[a]) for a in group if a in lengths})
        if unknown:
            if dim is not None and dim % known:
                raise Uncovered([(None, what, f"axis lengths that do not split {group}")])
            size[unknown[0]] = None if dim is None else dim // known
    named = [size[a] for a in flat_in]
    perm = [flat_in.index(a) for a in flat_out]
    return named, perm, [_product([size[a] for a in group]) for group in outputs]


def rearrange(g, call, p):
    x = p["tensor"]
    names = set(re.findall(r"\w+", p["pattern"]))
    lengths = {k: v for k, v in p.items() if k in names and k not in ("tensor", "pattern")}
    try:
        named, perm, out = parse(p["pattern"], list(x.shape), lengths)
    except Uncovered as e:
        raise Uncovered([(call.base, cls, why) for _, cls, why in e.layers]) from None
    if len(named) == x.rank and len(out) == x.rank:
        # Only the axes move: a change of layout.
        return transpose(g, call, {"x": x, "axes": perm})
    x = g.keras(x)
    name = x.name
    if len(named) != x.rank:
        name = _reshaped(g, call, name, named)
    if perm != sorted(perm):
        name = g.node("Transpose", [name], call.base, perm=perm)
    return [call.out(_reshaped(g, call, name, out))]


EMITTERS = {"rearrange": rearrange}
