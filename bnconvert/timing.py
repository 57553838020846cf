"""Where a run's time goes: every step timed, shown while it runs, summed for the report.

A large model spends minutes in a conversion; a step nobody timed is where
a slow check hid (issue 18: an archive check that re-read a 480 MB file
once per dataset). Each step of a run goes through `Steps.step`, which
shows its label on the progress display (the CLI prints one stderr line
per step) and adds its seconds to `seconds[key]`, which the report carries
as `timings`.

Imports nothing heavy: the CLI's argument checks run before TensorFlow
starts.
"""

import contextlib
import time

# The report's step names, in the order a run takes them.
STEPS = (
    "input_checks", "custom_objects", "rules", "load", "copy", "convert", "fold", "verify", "save",
    "file_check", "export", "onnxruntime_check",
)


class _NoProgress:
    @contextlib.contextmanager
    def step(self, label):
        yield


class Steps:
    """Times the steps of one run.

    Args:
        progress: Optional object whose `step(label)` context manager
            brackets each step (the CLI prints them).

    Attributes:
        seconds: Dict step name (see `STEPS`) -> seconds spent in it.
    """

    def __init__(self, progress=None):
        self.progress = progress or _NoProgress()
        self.seconds = {}

    @contextlib.contextmanager
    def step(self, key, label):
        """Shows `label` while the block runs, and adds its time to `seconds[key]`."""
        if key not in STEPS:
            raise ValueError(f"Unknown step; use one of {list(STEPS)}. Received: key={key!r}")
        start = time.perf_counter()
        try:
            with self.progress.step(label):
                yield
        finally:
            self.add(key, time.perf_counter() - start)

    def add(self, key, seconds):
        """Adds `seconds` to `seconds[key]` (for a step timed by someone else)."""
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds

    def ordered(self):
        """`seconds` rounded to milliseconds, in run order."""
        return {key: round(self.seconds[key], 3) for key in STEPS if key in self.seconds}
