"""Verify what is written: load each output back as a user would and check it.

The in-memory model can be right while the file is wrong: a Keras file
stores configs, and a model whose config does not name its layers' classes
(a keras-hub backbone, a custom layer creating BatchNormalization in its
`__init__`) loads back with the layers its own code creates. So every
model a run writes is loaded again with the flavour's loader, in safe mode
unless `--unsafe`, and must have the same layers, of the same classes, at
the same places, and give the original's outputs on the check batch.

When a Keras 3 `.keras` file loads back with other layers than the
conversion put in place (or its weights no longer fit what its config
re-creates), the layers the conversion rewrote are recorded in the file
(`bnconvert.persist`) and the file is checked again. What still does not
load back as converted is refused, naming the layer; no file is left.
"""

from bnconvert import deep_load
from bnconvert import formats
from bnconvert import persist
from bnconvert import stability
from bnconvert import walk
from bnconvert.errors import BnconvertError
from bnconvert.errors import VerificationError
from bnconvert.errors import first_line


def check_file(path, fmt, flavour, model, conversion, *, name, custom_objects=None,
               safe_mode=True):
    """Loads the file just written from `model` and holds it to the conversion.

    Args:
        path: The written file or SavedModel directory (a temporary place).
        fmt: Its format.
        flavour: The model's `Flavour`.
        model: The converted model the file was written from.
        conversion: The `bnconvert.convert.Conversion` (original outputs on
            the check batch and their tolerance).
        name: The final output path, for messages.
        custom_objects: As for loading the input.
        safe_mode: As for loading the input.

    Returns:
        A dict for the report: `path`, `layers` (how many were compared),
        `recorded` (layer paths whose conversion was recorded in the file),
        `max_abs_diff`, `max_rel_diff`.

    Raises:
        VerificationError: The file does not load, loads with other layers,
            or gives other outputs.
    """
    want = _classes(model, flavour)
    recordable = flavour.records_conversions and fmt == formats.KERAS
    try:
        # The file holds what `model` holds: its layer count bounds the load's depth.
        reloaded = deep_load.call(
            lambda: _load(path, fmt, flavour, custom_objects, safe_mode, name), len(want), name,
        )
        wrong = _differences(want, _classes(reloaded, flavour))
    except VerificationError:
        if not recordable:
            raise
        wrong = None  # the layers' weights do not fit what the config re-creates
    recorded = []
    if (wrong or wrong is None) and recordable:
        rewritten = {id(layer) for layer in conversion.rewritten}
        positions = {
            at: path for path, at, layer in walk.iter_positions(model, flavour)
            if id(layer) in rewritten
        }
        recorded = sorted(positions.values())
        persist.record(path, model, list(positions))
        # The file holds what `model` holds: its layer count bounds the load's depth.
        reloaded = deep_load.call(
            lambda: _load(path, fmt, flavour, custom_objects, safe_mode, name), len(want), name,
        )
        wrong = _differences(want, _classes(reloaded, flavour))
    if wrong:
        layer_path, cls, got = next(iter(wrong.values()))
        raise VerificationError(
            f"{name} would load back with {got} at layer '{layer_path}' where the "
            f"conversion put {cls.__name__} ({len(wrong)} layer(s) differ); its model "
            "re-creates that layer in its own code and this file format cannot record "
            "the conversion. Nothing was written; save as .keras with Keras 3."
        )
    figures = {"path": str(name), "layers": len(want), "recorded": recorded,
               "max_abs_diff": None, "max_rel_diff": None}
    if conversion.expected is not None:
        _, (figures["max_abs_diff"], figures["max_rel_diff"]) = stability.run_and_compare(
            reloaded, conversion.sample, conversion.expected,
            tolerance=conversion.tolerance, relative=conversion.relative, atol=conversion.atol,
            what=f"The written file {name}", allow_nonfinite=conversion.allow_nonfinite,
        )
    return figures


def _load(path, fmt, flavour, custom_objects, safe_mode, name):
    try:
        return flavour.load(path, fmt, custom_objects, safe_mode)
    except BnconvertError:
        raise
    except Exception as e:  # noqa: BLE001 - Keras raises many kinds here
        raise VerificationError(
            f"{name} was written but does not load back ({type(e).__name__}: "
            f"{first_line(e)}); nothing was written."
        ) from e


def _classes(model, flavour):
    """`{position: (path, class)}` for the model and every layer below it."""
    found = {"": (model.name, type(model))}
    for path, at, layer in walk.iter_positions(model, flavour):
        found[at] = (path, type(layer))
    return found


def _differences(want, got):
    """`{position: (path, wanted class, what the file gives)}` where they differ."""
    wrong = {}
    for at, (path, cls) in want.items():
        other = got.get(at)
        if other is None or other[1] is not cls:
            wrong[at] = (path, cls, other[1].__name__ if other else "no layer")
    for at in got.keys() - want.keys():
        wrong[at] = (got[at][0], type(None), got[at][1].__name__)
    return wrong
