"""Rewrites of the emitted graph that make onnxruntime run it faster.

They run once the walk has emitted every node, on `Graph.nodes` and
`Graph.initializers`, and keep what the graph computes (up to a rounding
of the constants they merge):

- `hoist_input_transposes`: elementwise ops with a constant between a graph
  input and the `Transpose` a convolution asked for run after it instead.
  On a channels-last image, a per-channel constant broadcasts over an
  innermost axis of 3, which onnxruntime runs about six times slower than
  the same op over `NCHW` planes (EfficientNetV2B0's input `Rescaling` and
  `Normalization`: 1.1 ms of its 15 ms before, 0.2 ms after);
- `fold_affine_chains`: a chain of `Mul`/`Add`/`Sub` by constants becomes
  one `Add` and one `Mul` (`(x * s - m) * r` is `(x - m / s) * (s r)`), and
  that `Mul` goes into the weights of a convolution reading the chain (an
  input's `Rescaling` before the stem: one pass over the image less);
- `crops.crop_before_padding`: a `Pad` then `Slice`s (NASNet's padding and
  cropping) as a `Slice` before a smaller `Pad`;
- `stem.read_channels_last`: the first convolution of a channels-last image
  of a few channels reads it as one wide channel, with no `Transpose`;
- `subsample.subsample_first`: strided 1x1 convolutions read a tensor
  subsampled once, computed at the lower resolution where nothing else
  reads it at the full one;
- `pooled_dense.dense_as_convolution`: a `Dense` on a globally pooled image
  as a 1x1 convolution;
- `drop_unused`: nodes whose outputs nothing reads are removed.
"""

import numpy as np

from bnconvert.onnx import graph_passes
from bnconvert.onnx.crops import crop_before_padding
from bnconvert.onnx.node_index import Index
from bnconvert.onnx.node_index import attribute
from bnconvert.onnx.node_index import drop
from bnconvert.onnx.pooled_dense import dense_as_convolution
from bnconvert.onnx.stem import read_channels_last
from bnconvert.onnx.subsample import subsample_first

_ELEMENTWISE = ("Mul", "Add", "Sub", "Div")
_AFFINE = ("Mul", "Add", "Sub")


def optimize(g, input_shapes, output_names, shapes):
    """Runs every rewrite on `g`.

    Args:
        g: The `Graph`, fully emitted.
        input_shapes: `{graph input name: shape}`.
        output_names: The graph's output names (they are never rewritten).
        shapes: `{tensor name: shape as stored}` (None for unknown sizes) of
            the tensors whose shapes are known; the rewrites add to it.
    """
    hoist_input_transposes(g, input_shapes, output_names, shapes)
    fold_affine_chains(g, output_names, shapes)
    crop_before_padding(g, output_names, shapes)
    read_channels_last(g, input_shapes, output_names, shapes)
    subsample_first(g, output_names, shapes)
    dense_as_convolution(g, output_names, shapes)
    graph_passes.keep_pads_before_pools(g, output_names)
    drop_unused(g, output_names)


def hoist_input_transposes(g, input_shapes, output_names, shapes):
    """Moves each input's `Transpose` above the elementwise ops with constants before it."""
    input_ranks = {name: len(shape) for name, shape in input_shapes.items()}
    index = Index(g, output_names)
    # One transpose of an input per layout, however many chains start from it; a
    # graph input is there from the start, so its transposes can all run first.
    first = [n for n in g.nodes if n.op_type == "Transpose" and n.input[0] in input_ranks]
    g.nodes = first + [n for n in g.nodes if not any(n is t for t in first)]
    done = {(n.input[0], tuple(_perm(n))): n.output[0] for n in first}
    for transpose in [n for n in g.nodes if n.op_type == "Transpose"]:
        chain, name = [], transpose.input[0]
        while index.uses.get(name) == 1 and index.split(index.producer.get(name), _ELEMENTWISE):
            chain.append(index.producer[name])
            name = index.split(chain[-1], _ELEMENTWISE)[0]
        rank = input_ranks.get(name)
        if not chain or rank is None or name in index.producer:
            continue
        perm = _perm(transpose)
        if len(perm) != rank or any(index.arrays[n.input[index.split(n, _ELEMENTWISE)[1]]].ndim
                                    > rank for n in chain):
            continue
        final = transpose.output[0]
        drop(g, [transpose])
        if (name, tuple(perm)) not in done:
            transpose.input[0] = name
            transpose.output[0] = done[name, tuple(perm)] = g.unique(f"{name}/layout")
            shapes[transpose.output[0]] = tuple(input_shapes[name][a] for a in perm)
            g.nodes.insert(0, transpose)
        _rewire(g, index, chain[::-1], done[name, tuple(perm)], final, perm)


def _perm(transpose):
    return list(attribute(transpose, "perm", None))


def _rewire(g, index, chain, data, final, perm):
    """`chain` (in order) reading `data` in layout `perm`, its constants laid out alike."""
    for node in chain:
        _, i = index.split(node, _ELEMENTWISE)
        array = index.arrays[node.input[i]]
        if array.ndim:
            array = np.transpose(array.reshape((1,) * (len(perm) - array.ndim) + array.shape),
                                 perm)
        node.input[i] = g.constant(array, f"{node.input[i]}/layout", array.dtype)
        node.input[1 - i] = data
        data = node.output[0]
    chain[-1].output[0] = final


def fold_affine_chains(g, output_names, shapes):
    """Chains of `Mul`/`Add`/`Sub` by constants as one `Add` and one `Mul`, the `Mul`
    folded into the weights of a convolution that reads the chain alone.

    A chain of a `Mul` and an `Add` before anything else is left as it is
    (nothing to gain).
    """
    index = Index(g, output_names)
    for last in list(g.nodes):
        if index.split(last, _AFFINE) is None or _continues(index, last):
            continue
        chain = [last]
        while True:
            data = index.split(chain[-1], _AFFINE)[0]
            before = index.producer.get(data)
            if index.uses.get(data) != 1 or index.split(before, _AFFINE) is None:
                break
            chain.append(before)
        chain.reverse()
        conv = _conv_reading(index, last.output[0])
        if conv is None and (len(chain) < 2 or (
                len(chain) == 2 and chain[0].op_type != chain[1].op_type)):
            continue
        shift, scale = _affine(index, chain)
        if shift is None:
            continue
        data = index.split(chain[0], _AFFINE)[0]
        if conv is not None and _scale_weights(g, index, conv, scale, shapes.get(data)):
            scale = np.ones((), scale.dtype)
            if not np.any(shift):  # the whole chain went into the weights
                drop(g, chain)
                conv.input[0] = data
                continue
        elif len(chain) == 1:
            continue
        _replace(g, chain, data, shift, scale)


def _conv_reading(index, name):
    """The `Conv` with constant weights whose data input is `name`, read by nothing else."""
    consumers = index.consumers.get(name, ())
    if index.uses.get(name) != 1 or len(consumers) != 1:
        return None
    conv = consumers[0]
    if conv.op_type != "Conv" or conv.input[0] != name or conv.domain:
        return None
    if not all(n in index.arrays for n in conv.input[1:] if n):
        return None
    return conv


def _scale_weights(g, index, conv, scale, shape):
    """Folds `x * scale` (per input channel) into `conv`'s weights; False if it cannot.

    Exact whatever the padding: a padded zero times the scale is still zero.
    `shape` is the one of `x` (None if unknown): the scale must not broadcast
    it to more channels or axes than it has.
    """
    weights = index.arrays[conv.input[1]]
    if scale.ndim > weights.ndim or weights.dtype != scale.dtype or shape is None \
            or len(shape) != weights.ndim:
        return False
    full = scale.reshape((1,) * (weights.ndim - scale.ndim) + scale.shape)
    if any(d != 1 for i, d in enumerate(full.shape) if i != 1):
        return False
    per_channel = full.reshape(-1).astype(np.float64)
    out_channels, group_width = weights.shape[:2]
    groups = int(attribute(conv, "group", 1))
    if per_channel.size not in (1, group_width * groups) or shape[1] != group_width * groups:
        return False
    # Output channel o of group k reads input channels k * width ... (k + 1) * width - 1.
    group_of = np.arange(out_channels) // (out_channels // groups)
    channel = group_of[:, None] * group_width + np.arange(group_width)[None, :]
    factor = per_channel[channel % per_channel.size]
    scaled = weights.astype(np.float64) * factor.reshape(factor.shape + (1,) * (weights.ndim - 2))
    conv.input[1] = g.constant(scaled, f"{conv.input[1]}/scaled", weights.dtype)
    return True


def _continues(index, node):
    """Whether `node`'s output feeds, alone, another link of a chain (it ends none)."""
    out = node.output[0]
    if index.uses.get(out) != 1 or len(index.consumers.get(out, ())) != 1:
        return False
    split = index.split(index.consumers[out][0], _AFFINE)
    return split is not None and split[0] == out


def _affine(index, chain):
    """`(shift, scale)` with `chain(x) == (x + shift) * scale`, or `(None, None)`.

    The shift comes first: moving a `Mul` behind an `Add` (`x a + b` as
    `(x + b / a) a`) rounds as the chain did, while the other way
    (`(x + b) a` as `x a + b a`) would cancel digits when `x` is close to
    `-b`, as in a `Normalization` of data far from zero.
    """
    dtypes = set()
    shift, scale = np.float64(0.0), np.float64(1.0)
    for node in chain:
        _, i = index.split(node, _AFFINE)
        array = index.arrays[node.input[i]]
        dtypes.add(array.dtype)
        c = array.astype(np.float64)
        if node.op_type == "Mul":
            scale = scale * c
            continue
        if not np.all(scale != 0):
            return None, None
        if node.op_type == "Add" or i == 1:  # x + c, x - c
            shift = shift + (c if node.op_type == "Add" else -c) / scale
        else:  # c - x
            shift, scale = shift - c / scale, -scale
    if len(dtypes) != 1 or not (np.all(np.isfinite(shift)) and np.all(np.isfinite(scale))):
        return None, None
    (dtype,) = dtypes
    return shift.astype(dtype), scale.astype(dtype)


def _replace(g, chain, data, shift, scale):
    """`chain` (its last output kept) as `Add(data, shift)` then `Mul(., scale)`.

    A shift of zeros or a scale of ones is left out (one of the two stays).
    """
    final = chain[-1].output[0]
    at = drop(g, chain)
    base = chain[0].output[0]
    kept = []
    if np.any(shift != 0):
        kept.append(("Add", g.constant(shift, f"{base}/shift", shift.dtype)))
    if np.any(scale != 1) or not kept:
        kept.append(("Mul", g.constant(scale, f"{base}/scale", scale.dtype)))
    for node, (op_type, constant) in zip(chain, kept):
        node.op_type = op_type
        node.name = g.unique(f"{base}/{op_type}")
        del node.input[:]
        node.input.extend([data, constant])
        data = node.output[0]
    node.output[0] = final
    g.nodes[at:at] = chain[:len(kept)]


def drop_unused(g, output_names):
    """Removes nodes (and initializers) whose outputs nothing reads."""
    while True:
        index = Index(g, output_names)
        dead = [n for n in g.nodes if not any(index.uses.get(o) for o in n.output)]
        if not dead:
            break
        gone = {id(node) for node in dead}
        g.nodes = [n for n in g.nodes if id(n) not in gone]
    g.drop_unused()
