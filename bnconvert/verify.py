"""One sample batch and one output comparison, for every check bnconvert makes.

The same generated batch feeds the conversion check (original model against
converted model, in Keras) and the ONNX check (Keras against onnxruntime):
float inputs standard normal, integer inputs 0 or 1, booleans random, from
one seed; an unknown batch size becomes 2 (so that a batch dimension frozen
to 1 by mistake shows up) and other unknown sizes 32 (enough for the 32x
downsampling of image backbones).

A swap (BN -> SyncBN and back) must reproduce the outputs exactly, so it is
held to an absolute tolerance (default 1e-6). Folding a BN into the layer
before it, and running a graph in another runtime, change the order of
floating-point operations; those are held element by element to

    |actual - reference| <= atol * max(1, rms(reference)) + rtol * |reference|

per output, `atol` = 1e-5 and `rtol` = 1e-4 by default. A bound relative to
the largest output rejected correct classifiers (a softmax whose largest
probability is 0.006); `atol` covers elements near zero, scaled by the
output's RMS so that large logits get a proportionate floor.
`benchmarks/tolerances.py` measured, on keras.applications models with
random weights and randomized BN statistics (96x96): correct folds differ by
at most 3.4e-8 (ResNet50), their ONNX exports by up to 6.5e-6 (ResNet50V2,
whose softmax peaks at 0.014: 4.7e-4 of its largest output; it needs atol
5.1e-6 at rtol 1e-4); one BN's gamma 1% off in the fold differs by 1.6e-5
(ResNet50V2, needs atol 1.5e-5) and 1.7e-4 (ResNet50): accepted and
rejected respectively by these defaults. A fold that leaves out epsilon
changes these outputs by less than float32 noise; no output check can see it.
"""

import keras
import numpy as np

from bnconvert import keras_internals as internals
from bnconvert.errors import VerificationError

ABSOLUTE_TOLERANCE = 1e-6
RELATIVE_TOLERANCE = 1e-4
ATOL = 1e-5

SAMPLE_BATCH = 2
# A Keras 3 model whose eager forward pass would hold more runs as a graph.
EAGER_LIMIT = 1 << 30
UNKNOWN_DIM = 32
SEED = 1234


def input_specs(model):
    """`[(shape, numpy dtype)]` of `model`'s inputs in `model.inputs` order, or `None`.

    Models built on symbolic inputs give their inputs; a subclassed Keras 3
    model built from an input shape gives its build config's shape.
    """
    if internals.has_symbolic_inputs(model):
        return [(tuple(t.shape), _numpy_dtype(t.dtype)) for t in model.inputs]
    build = model.get_build_config() if getattr(model, "built", False) else None
    shape = (build or {}).get("input_shape")
    if isinstance(shape, (list, tuple)) and all(d is None or isinstance(d, int) for d in shape):
        return [(tuple(shape), np.dtype("float32"))]
    return None


def _numpy_dtype(dtype):
    return np.dtype(getattr(dtype, "as_numpy_dtype", dtype))


def sample_inputs(model, batch=SAMPLE_BATCH):
    """One seeded batch for `model`, as a flat list in `model.inputs` order.

    Args:
        model: A built model of either flavour.
        batch: Size given to an unknown batch dimension.

    Returns:
        `(arrays, note)`: the arrays, or `None` and the reason when no batch
        can be made.
    """
    specs = input_specs(model)
    if specs is None:
        return None, (
            f"model '{model.name}' has no defined inputs (not built from an input "
            "shape); nothing to compare"
        )
    rng = np.random.default_rng(SEED)
    arrays = []
    for shape, dtype in specs:
        dims = tuple(
            (batch if i == 0 else UNKNOWN_DIM) if d is None else int(d)
            for i, d in enumerate(shape)
        )
        if np.issubdtype(dtype, np.floating):
            arrays.append(rng.standard_normal(dims).astype(dtype))
        elif dtype == np.bool_:
            arrays.append(rng.integers(0, 2, size=dims).astype(bool))
        elif np.issubdtype(dtype, np.integer):
            arrays.append(rng.integers(0, 2, size=dims).astype(dtype))
        else:
            return None, f"cannot generate inputs of dtype {dtype}"
    return arrays, "one generated batch, training=False"


def run(model, arrays):
    """`model`'s outputs (inference mode) on flat `arrays`, as a flat list of arrays.

    A Keras 3 Functional model called eagerly keeps every intermediate
    tensor until its call returns: 4.3 GB for EfficientNetV2L on two
    480x480 images, three times the model. A model that would hold more
    than `EAGER_LIMIT` bytes so runs as one TensorFlow graph, which frees
    each tensor after its last use. Tracing costs about twice an eager pass
    (EfficientNetV2S: 6.5 s against 3.0 s, holding 0.1 GB against 0.94 GB),
    so smaller models stay eager.
    """
    inputs = _structured(model, arrays)
    if eager_bytes(model, arrays) > EAGER_LIMIT:
        import tensorflow as tf

        outputs = tf.function(lambda x: model(x, training=False), autograph=False)(inputs)
    else:
        outputs = model(inputs, training=False)
    return [np.asarray(o) for o in keras.tree.flatten(outputs)]


def eager_bytes(model, arrays):
    """The bytes a Keras 3 Functional model's eager call on `arrays` holds at once.

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


def compare(expected, actual, *, tolerance, relative, what="The converted model", atol=ATOL):
    """Holds `actual` outputs to `expected` ones (see the module docstring).

    Args:
        expected: Flat list of reference outputs.
        actual: Flat list of outputs to check.
        tolerance: With `relative=False`, the largest accepted absolute
            difference; with `relative=True`, `rtol`.
        relative: Whether to use the per-element relative check.
        what: Names the checked side in messages.
        atol: The absolute term of the relative check.

    Returns:
        `(max_abs_diff, max_rel_diff)`: the largest absolute difference, and
        the largest one of an output divided by that output's largest
        reference magnitude (for the report).

    Raises:
        VerificationError: Different output count or shapes, or a difference
            beyond the tolerance.
    """
    if len(expected) != len(actual):
        raise VerificationError(
            f"{what} has {len(actual)} outputs, the reference {len(expected)}."
        )
    worst_abs, worst_rel, failed = 0.0, 0.0, None
    for a, b in zip(expected, actual):
        a = np.asarray(a, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        if a.shape != b.shape:
            raise VerificationError(
                f"An output of {what[0].lower() + what[1:]} has shape {b.shape}, "
                f"the reference's {a.shape}."
            )
        if not a.size:
            continue
        # NaN where the reference has NaN too is agreement, not a difference.
        diff = np.nan_to_num(np.where(np.isnan(a) & np.isnan(b), 0.0, np.abs(a - b)), nan=np.inf)
        scale = float(np.nanmax(np.abs(a), initial=0.0))
        worst_abs = max(worst_abs, float(diff.max()))
        worst_rel = max(worst_rel, float(diff.max()) / scale if scale > 0 else float(diff.max()))
        if relative:
            rms = float(np.sqrt(np.nanmean(np.square(a)))) if np.isfinite(a).all() else 1.0
            allowed = atol * max(1.0, rms) + tolerance * np.abs(np.nan_to_num(a))
        else:
            allowed = tolerance
        if failed is None and not np.all(diff <= allowed):
            failed = float(diff.max())
    if failed is not None:
        rule = (
            f"{atol:g} * max(1, rms) + {tolerance:g} * |reference| per element"
            if relative else f"{tolerance:g} absolute"
        )
        raise VerificationError(
            f"{what}'s outputs differ from the reference's by up to {worst_abs:.3g} "
            f"({worst_rel:.3g} relative to the largest output), beyond {rule}, on a "
            "generated batch; nothing was written. Check the rules, or raise the "
            "tolerance if the difference is expected."
        )
    return worst_abs, worst_rel


def default_tolerance(folding):
    """The default tolerance: relative when BN layers are folded."""
    return RELATIVE_TOLERANCE if folding else ABSOLUTE_TOLERANCE
