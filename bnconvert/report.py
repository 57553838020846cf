"""What a conversion did: one event per normalization layer, plus verification.

A `ConversionReport` collects a `LayerEvent` for every normalization layer the
converter (and the folder) met: which rule applied, or why none did. It
renders as a dict, as JSON, and as a short text table for the CLI.
"""

import dataclasses
import json

ACTIONS = ("applied", "skipped", "unchanged", "folded", "kept")


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
        tolerance_kind: `"absolute"` or `"relative"` (when BN was folded).
        verification_note: Why verification did not run, or what was fed.
        rule_sources: The rule files in force.
    """

    direction: str
    source: str = ""
    events: list = dataclasses.field(default_factory=list)
    verified: bool = False
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None
    tolerance: float | None = None
    tolerance_kind: str = "absolute"
    verification_note: str = ""
    rule_sources: tuple = ()

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
                "note": self.verification_note,
            },
            "rule_sources": list(self.rule_sources),
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
            rows.append((e.path, e.class_before, e.class_after, e.action, detail))
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
                f"verified: max |diff| = {self.max_abs_diff:.3g}, "
                f"relative {self.max_rel_diff:.3g} "
                f"({self.tolerance_kind} tolerance {self.tolerance:g})"
            )
        elif self.verification_note:
            lines.append(f"not verified: {self.verification_note}")
        return "\n".join(lines)
