"""What a conversion did: one event per normalization layer, plus verification.

A `ConversionReport` collects a `LayerEvent` for every normalization layer the
converter (and the folder) met: which rule applied, or why none did. It
renders as a dict, as JSON, and as a short text table for the CLI (names
from the model escaped, `bnconvert.printable`).
"""

import dataclasses
import json

from bnconvert import verify
from bnconvert import walk as walk_lib
from bnconvert.printable import printable

ACTIONS = ("applied", "skipped", "unchanged", "folded", "kept")

_NORMALIZATION_SETTINGS = (
    "axis", "momentum", "epsilon", "center", "scale", "renorm", "synchronized",
    "trainable",
)


@dataclasses.dataclass(frozen=True)
class LayerEvent:
    """What happened to one layer.

    Attributes:
        path: Names from the outermost model down to the layer, joined by
            `/` (`"outer_model/inner_model/layer"`).
        class_before: Class name of the layer in the source model.
        class_after: Class name in the result (the same unless rewritten).
        rule: Name of the rule involved, or `None`.
        action: One of `"applied"`, `"skipped"`, `"unchanged"` (conversion)
            or `"folded"`, `"kept"` (folding).
        reason: Why, in a few words.
    """

    path: str
    class_before: str
    class_after: str
    rule: str | None
    action: str
    reason: str = ""

    def __post_init__(self):
        if self.action not in ACTIONS:
            raise ValueError(
                f"Unknown action for layer '{self.path}'; use one of "
                f"{list(ACTIONS)}. Received: action={self.action!r}"
            )


@dataclasses.dataclass
class ConversionReport:
    """Per-layer events and verification figures of one conversion.

    Attributes:
        direction: `"sync"` or `"inference"`.
        source: Where the model came from (a path, or the model's name).
        events: `LayerEvent`s in the order the layers were met.
        verified: `True` when the outputs were compared, `False` when
            verification was off or impossible (see `verification_note`).
        max_abs_diff: Largest absolute difference between original and
            converted outputs, or `None` if not verified.
        max_rel_diff: `max_abs_diff` divided by the largest absolute
            original output.
        tolerance: The tolerance the difference was held to.
        tolerance_kind: `"absolute"`, or `"relative"` when BN was folded: then
            `tolerance` is the `rtol` of the per-element check of
            `bnconvert.verify.compare`.
        atol: Its absolute term (None for an absolute check).
        compute_dtype: The least precise float dtype the model computes in
            (`"float16"`/`"bfloat16"` for mixed precision): the checks take
            their default tolerance from its rounding.
        verification_note: Why verification did not run, or what was fed.
        verified_on: Where the outputs were checked when not on the model in
            memory: `"the written file"`, `"the ONNX file (onnxruntime)"`.
        rule_sources: The rule files in force.
        file_checks: One dict per model file written, loaded back and
            checked (`bnconvert.written.check_file`).
        warnings: What was accepted only on request (non-finite outputs).
        timings: Seconds spent in each step of the run, by step name
            (`bnconvert.timing.STEPS`), in run order.
    """

    direction: str
    source: str = ""
    events: list = dataclasses.field(default_factory=list)
    verified: bool = False
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None
    tolerance: float | None = None
    tolerance_kind: str = "absolute"
    atol: float | None = None
    compute_dtype: str = "float32"
    verification_note: str = ""
    verified_on: str = ""
    rule_sources: tuple = ()
    file_checks: list = dataclasses.field(default_factory=list)
    warnings: list = dataclasses.field(default_factory=list)
    timings: dict = dataclasses.field(default_factory=dict)

    def add(self, event):
        """Appends one `LayerEvent`."""
        self.events.append(event)

    def count(self, action):
        """Number of events with `action`."""
        return sum(1 for e in self.events if e.action == action)

    @property
    def converted(self):
        """Number of layers a rule rewrote."""
        return self.count("applied")

    @property
    def skipped(self):
        """Number of normalization layers no rule could rewrite."""
        return self.count("skipped")

    @property
    def unchanged(self):
        """Number of layers that already had the target form."""
        return self.count("unchanged")

    @property
    def folded(self):
        """Number of BN layers folded into their producer."""
        return self.count("folded")

    def counts(self):
        """Dict action -> number of events, for every action."""
        return {action: self.count(action) for action in ACTIONS}

    def to_dict(self):
        """Returns the report as plain JSON-compatible Python data."""
        return {
            "direction": self.direction,
            "source": self.source,
            "counts": self.counts(),
            "verification": {
                "verified": self.verified,
                "max_abs_diff": self.max_abs_diff,
                "max_rel_diff": self.max_rel_diff,
                "tolerance": self.tolerance,
                "tolerance_kind": self.tolerance_kind,
                "atol": self.atol,
                "compute_dtype": self.compute_dtype,
                "note": self.verification_note,
            },
            "rule_sources": list(self.rule_sources),
            "file_checks": list(self.file_checks),
            "warnings": list(self.warnings),
            "timings": dict(self.timings),
            "events": [dataclasses.asdict(e) for e in self.events],
        }

    def to_json(self, indent=2):
        """Returns `to_dict()` as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent)

    def summary_table(self, max_rows=None):
        """Returns a short text table: one line per event, then totals.

        Args:
            max_rows: Optional cap on the number of event lines; the rest
                are counted in one closing line.
        """
        header = ("layer", "before", "after", "action", "rule / reason")
        rows = []
        for e in self.events:
            detail = e.rule or ""
            if e.reason:
                detail = f"{detail}: {e.reason}" if detail else e.reason
            rows.append(tuple(map(printable, (e.path, e.class_before, e.class_after,
                                              e.action, detail))))
        shown = rows if max_rows is None else rows[:max_rows]
        widths = [
            max([len(header[i])] + [len(r[i]) for r in shown]) for i in range(4)
        ]

        def line(cells):
            head = "  ".join(c.ljust(w) for c, w in zip(cells[:4], widths))
            return f"{head}  {cells[4]}".rstrip()

        lines = [line(header)] + [line(r) for r in shown]
        if len(rows) > len(shown):
            lines.append(f"... {len(rows) - len(shown)} more layer(s)")
        totals = ", ".join(f"{n} {a}" for a, n in self.counts().items() if n)
        lines.append(
            f"{self.direction}: {self.converted} layer(s) converted"
            + (f" ({totals})" if totals else "")
        )
        if self.verified:
            lines.append(
                f"verified{' on ' + self.verified_on if self.verified_on else ''}: "
                f"max |diff| = {self.max_abs_diff:.3g}, "
                f"relative {self.max_rel_diff:.3g} "
                + (f"(absolute tolerance {self.tolerance:g})" if self.tolerance_kind == "absolute"
                   else f"(per element: {self.atol or verify.ATOL:g} * max(1, rms) + "
                   f"{self.tolerance:g} * |original|)")
                + (f", {self.compute_dtype} compute" if self.compute_dtype != "float32" else "")
            )
        elif self.verification_note:
            lines.append(f"not verified: {self.verification_note}")
        for check in self.file_checks:
            line = f"file check: {check['path']} loads back with {check['layers']} layer(s) as converted"
            if check["max_abs_diff"] is not None:
                line += f", max |diff| = {check['max_abs_diff']:.3g}"
            if check["recorded"]:
                line += f"; conversion recorded in the file for {len(check['recorded'])} layer(s)"
            lines.append(line)
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(map(printable, lines))


# -- bnconvert inspect ---------------------------------------------------------


def _layer_settings(layer):
    # tf-keras leaves `synchronized` (and `renorm` when off) out of
    # get_config(), and both Sync layers drop `synchronized`; the layer's
    # attribute of the same name says it then.
    config = layer.get_config()
    settings = {}
    for key in _NORMALIZATION_SETTINGS:
        value = config.get(key, getattr(layer, key, None))
        if value is not None:
            settings[key] = value
    axis = settings.get("axis")
    if axis is not None and not isinstance(axis, int):
        # tf-keras keeps a built layer's axes in a tracking ListWrapper.
        settings["axis"] = [int(a) for a in axis]
    settings["trainable"] = bool(layer.trainable)
    if type(layer).__name__.startswith("Sync"):
        settings["synchronized"] = True
    return settings


def _layer_shape(layer):
    shapes = {tuple(int(d) for d in w.shape) for w in layer.weights}
    if len(shapes) == 1:
        return list(shapes.pop())
    return [list(s) for s in sorted(shapes)] or None


def inspect_rows(model, flavour, named=frozenset()):
    """One row per normalization layer of `model`: path, class, shape, settings.

    Args:
        model: The inspected model (before any change).
        flavour: The model's `Flavour`.
        named: Classes the rules name (normalization layers too).

    Returns:
        A list of dicts with `path`, `class`, `shape`, `settings` and an
        empty `events` list (see `add_events`).
    """
    return [
        {"path": path, "class": type(layer).__name__, "shape": _layer_shape(layer),
         "settings": _layer_settings(layer), "events": []}
        for path, layer in walk_lib.normalization_layers(model, flavour, named)
    ]


def add_events(rows, report):
    """Adds each of the report's events to the row of its layer (a new row if none)."""
    by_path = {row["path"]: row for row in rows}
    for event in report.events:
        row = by_path.get(event.path)
        if row is None:
            row = {"path": event.path, "class": event.class_before, "shape": None,
                   "settings": {}, "events": []}
            rows.append(row)
            by_path[event.path] = row
        row["events"].append(_event_dict(event))
    return rows


def _event_dict(event):
    return {
        "path": event.path,
        "class_before": event.class_before,
        "class_after": event.class_after,
        "rule": event.rule,
        "action": event.action,
        "reason": event.reason,
    }


def _format_settings(settings):
    """`axis=-1 momentum=0.99 epsilon=0.001 center scale`: true flags by name."""
    parts = []
    for key, value in settings.items():
        if key == "trainable":
            if not value:
                parts.append("frozen")
        elif isinstance(value, bool):
            if value:
                parts.append(key)
        elif isinstance(value, float):
            parts.append(f"{key}={value:g}")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def _format_event(event):
    if event["action"] == "applied":
        return f"{event['rule']}: -> {event['class_after']}"
    text = event["action"]
    if event["rule"]:
        text = f"{event['rule']}: {text}"
    return f"{text} ({event['reason']})" if event["reason"] else text


def format_inspect_rows(rows):
    """The `bnconvert inspect` table of `inspect_rows`, as text."""
    headers = ("path", "class", "shape", "settings", "rule")
    table = []
    for row in rows:
        shape = row["shape"]
        if shape and all(isinstance(d, int) for d in shape):
            shape = "x".join(str(d) for d in shape)
        actions = "; ".join(_format_event(e) for e in row["events"])
        table.append(tuple(map(printable, (
            row["path"], row["class"], str(shape or "-"),
            _format_settings(row["settings"]), actions or "no rule applies",
        ))))
    widths = [
        max([len(h)] + [len(r[i]) for r in table]) for i, h in enumerate(headers)
    ]
    # The last column is left unpadded so lines carry no trailing blanks.
    lines = [
        "  ".join(h.ljust(w) for h, w in zip(headers[:-1], widths)) + "  " + headers[-1]
    ]
    for r in table:
        lines.append(
            "  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1]
        )
    return "\n".join(lines)
