"""Validation of the constructor arguments both SyncBatchNormalization flavours share.

Each check raises `ValueError` with one line: what is wrong, then
`Received: name=value`, as Keras does.
"""

import numbers

CLIPPING_KEYS = ("rmax", "rmin", "dmax")

# A group cannot have more replicas than a job has: the largest accelerator
# pods hold thousands of chips (a TPU v5p pod 8960), so 2**16 leaves room
# while a mistyped or hostile value (int64 max, 10**30) fails at once, not at
# the first training step, and group arithmetic stays well inside int32.
MAX_SYNC_GROUP_SIZE = 2**16


def check_unit_interval(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"Argument `{name}` must be a float in [0, 1]. Received: {name}={value!r}"
        )
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(
            f"Argument `{name}` must be in [0, 1]. Received: {name}={value!r}"
        )
    return float(value)


def check_bool(name, value):
    if not isinstance(value, bool):
        raise ValueError(
            f"Argument `{name}` must be True or False. Received: {name}={value!r}"
        )
    return value


def check_axis(axis):
    if isinstance(axis, bool):
        raise ValueError(
            "Argument `axis` must be an integer or a list of integers. "
            f"Received: axis={axis!r}"
        )
    if isinstance(axis, numbers.Integral):
        return int(axis)
    if isinstance(axis, (list, tuple)) and axis and all(
        isinstance(a, numbers.Integral) and not isinstance(a, bool) for a in axis
    ):
        return [int(a) for a in axis]
    raise ValueError(
        "Argument `axis` must be an integer or a non-empty list of integers. "
        f"Received: axis={axis!r}"
    )


def check_renorm_clipping(renorm_clipping, renorm=True):
    """Validates `renorm_clipping` as Keras does, with Keras's messages.

    As in `keras.layers.BatchNormalization`, the dict is only checked when
    `renorm=True`; otherwise it is kept as given (it has no effect).
    """
    if not renorm:
        return renorm_clipping
    if renorm_clipping is None:
        return None
    if not isinstance(renorm_clipping, dict):
        raise ValueError(
            "Argument `renorm_clipping` must be a dict with keys among "
            f"{list(CLIPPING_KEYS)}. Received: renorm_clipping={renorm_clipping!r}"
        )
    unknown = sorted(set(renorm_clipping) - set(CLIPPING_KEYS))
    if unknown:
        # The opening words are Keras's, so code matching its message works.
        raise ValueError(
            f"Received invalid keys for `renorm_clipping` argument: {unknown}. "
            f"Supported values: {list(CLIPPING_KEYS)}. "
            f"Received: renorm_clipping={renorm_clipping!r}"
        )
    clipping = {}
    for key, value in renorm_clipping.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(
                f"`renorm_clipping['{key}']` must be a number. "
                f"Received: renorm_clipping={renorm_clipping!r}"
            )
        clipping[key] = float(value)
    rmin, rmax = clipping.get("rmin"), clipping.get("rmax")
    if rmin is not None and rmax is not None and rmax < rmin:
        raise ValueError(
            "rmax should be greater than rmin in the `renorm_clipping` argument. "
            f"Received: renorm_clipping={renorm_clipping!r}"
        )
    if clipping.get("dmax", 0.0) < 0:
        raise ValueError(
            "dmax should be non-negative in the `renorm_clipping` argument. "
            f"Received: renorm_clipping={renorm_clipping!r}"
        )
    return clipping


def check_sync_group_size(sync_group_size):
    """`None` or 0 (all replicas) or an int up to `MAX_SYNC_GROUP_SIZE`; `None` for all."""
    if sync_group_size is None:
        return None
    if isinstance(sync_group_size, bool) or not isinstance(
        sync_group_size, numbers.Integral
    ):
        raise ValueError(
            "Argument `sync_group_size` must be None or a non-negative integer "
            f"(0 or None: all replicas). Received: sync_group_size={sync_group_size!r}"
        )
    if not 0 <= sync_group_size <= MAX_SYNC_GROUP_SIZE:
        raise ValueError(
            f"Argument `sync_group_size` must be from 0 to {MAX_SYNC_GROUP_SIZE} replicas "
            f"(0 or None: all replicas). Received: sync_group_size={sync_group_size!r}"
        )
    return int(sync_group_size) or None


def check_epsilon(epsilon):
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real):
        raise ValueError(
            f"Argument `epsilon` must be a positive float. Received: epsilon={epsilon!r}"
        )
    if not epsilon > 0:
        raise ValueError(
            f"Argument `epsilon` must be positive. Received: epsilon={epsilon!r}"
        )
    return float(epsilon)


def check_adjustment(adjustment):
    if adjustment is not None and not callable(adjustment):
        raise ValueError(
            "Argument `adjustment` must be a callable or None. "
            f"Received: adjustment={adjustment!r}"
        )
    return adjustment


def check_constructor_args(
    *, axis, momentum, epsilon, center, scale, renorm, renorm_clipping,
    renorm_momentum, trainable, adjustment, sync_group_size=None,
):
    """Checks the shared arguments; returns them normalized, by name."""
    return {
        "axis": check_axis(axis),
        "momentum": check_unit_interval("momentum", momentum),
        "renorm_momentum": check_unit_interval("renorm_momentum", renorm_momentum),
        "epsilon": check_epsilon(epsilon),
        "center": check_bool("center", center),
        "scale": check_bool("scale", scale),
        "renorm": check_bool("renorm", renorm),
        "trainable": check_bool("trainable", trainable),
        "renorm_clipping": check_renorm_clipping(
            renorm_clipping, renorm=check_bool("renorm", renorm)
        ),
        "sync_group_size": check_sync_group_size(sync_group_size),
        "adjustment": check_adjustment(adjustment),
    }
