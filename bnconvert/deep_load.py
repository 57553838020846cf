"""Loading models deeper than Python's recursion limit, on a stack sized for them.

Keras's loaders (Keras 3 and tf-keras, every format) recurse once per
layer of a Functional graph: measured, loading a chain of n layers goes
n + 16 Python frames deep, so a chain of 2,000 layers exceeds the default
limit of 1,000. The limit protects the C stack; raising it is safe only on
a stack known to hold that many frames.

`call` therefore runs a load whose config counts more layers than the
current limit allows in a worker thread whose stack is sized for the
frames it needs (`STACK_PER_FRAME` each, measured far below: 2,001 layers
load on a 1 MB stack), with the recursion limit raised only as far as that
layer count needs, and put back afterwards. The layer count comes from
the config, parsed before Keras sees it (`bnconvert.config_checks`); a
config counting more than `MAX_LAYERS` layers is refused in one line
(fail closed), never loaded with an unbounded limit.

A model that fits the current limit loads in the calling thread as
before. The worker thread re-enters the caller's `tf.distribute`
strategy scope, the one thread-local state a load depends on.
"""

import sys
import threading

from bnconvert.errors import ModelLoadError

# Frames per layer the loaders need (measured 1), and those of the loader's
# own calls and of its caller (measured 16).
FRAMES_PER_LAYER = 2
BASE_FRAMES = 200
# Stack bytes allowed per frame (measured far below: 2,001 layers on 1 MB).
STACK_PER_FRAME = 8 << 10
MAX_LAYERS = 10_000
_POLL_SECONDS = 0.2


def frames_needed(layers):
    """The recursion limit a load of a config counting `layers` layers needs."""
    return BASE_FRAMES + FRAMES_PER_LAYER * int(layers)


def call(function, layers, path):
    """`function()` (a load of the model file `path`) with room for `layers` layers of recursion.

    Args:
        function: Callable with no arguments that loads the model.
        layers: The number of layers the model's config counts (nested
            models' layers included).
        path: The model file, for the error message.

    Returns:
        What `function` returns.

    Raises:
        ModelLoadError: The config counts more than `MAX_LAYERS` layers.
        Whatever `function` raises.
    """
    needed = frames_needed(layers)
    if needed + _depth() <= sys.getrecursionlimit():
        return function()
    if layers > MAX_LAYERS:
        raise ModelLoadError(
            f"{path} is refused: its config counts {layers} layers, more than the "
            f"{MAX_LAYERS} that bnconvert loads (Keras's loader recurses once per layer); "
            "split the model, or load it yourself with a raised recursion limit."
        )
    return _on_large_stack(function, needed)


def _depth():
    frame, depth = sys._getframe(), 0
    while frame is not None:
        frame, depth = frame.f_back, depth + 1
    return depth


def _on_large_stack(function, frames):
    """`function()` in a thread with a stack for `frames` frames, the limit raised to match."""
    strategy = _strategy()
    result = {}

    def work():
        try:
            if strategy is None:
                result["value"] = function()
            else:
                with strategy.scope():
                    result["value"] = function()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            result["error"] = e

    # The limit is the interpreter's, not the thread's: only raised, and
    # only for as long as the load runs.
    old_limit = sys.getrecursionlimit()
    worker = threading.Thread(target=work, name="bnconvert-deep-load", daemon=True)
    sys.setrecursionlimit(max(old_limit, frames))
    try:
        # The stack size applies to threads started while it is set.
        old_stack = threading.stack_size(frames * STACK_PER_FRAME)
        try:
            worker.start()
        finally:
            threading.stack_size(old_stack)
        while worker.is_alive():  # a timed join lets the caller see Ctrl-C
            worker.join(_POLL_SECONDS)
    finally:
        sys.setrecursionlimit(old_limit)
    if "error" in result:
        raise result["error"]
    return result["value"]


def _strategy():
    """The caller's non-default `tf.distribute` strategy, or `None`."""
    tf = sys.modules.get("tensorflow")
    if tf is None or not tf.distribute.has_strategy():
        return None
    return tf.distribute.get_strategy()
