"""Container surgery: copying a subclassed model or custom layer with new sublayers.

`clone_model` refuses subclassed models, and Keras's own deep copy cannot
rebuild a custom layer that has no `build()`. So a layer that holds
sublayers is copied from its config; each sublayer its `__init__` creates
is then swapped, in the copy's attributes, lists, tuples and dicts (as
PyTorch's `convert_sync_batchnorm` swaps modules), for the converter's
counterpart of the original's sublayer; only then is the copy built and
given the original's own variables. Nothing relies on the container being
rebuildable by Keras from its input shape alone.
"""

import warnings

from bnconvert import keras_internals as internals
from bnconvert.errors import ConversionError
from bnconvert.errors import first_line
from bnconvert.walk import join


def copy_container(converter, layer, here):
    """Returns a copy of `layer` whose sublayers are the converter's counterparts."""
    flavour = converter.flavour
    classes = {}
    for sub in _flatten(layer, flavour):
        cls = type(sub)
        classes[cls.__name__] = cls
        classes[flavour.registered_name(cls)] = cls
    classes.update(converter.custom_objects)
    try:
        new = flavour.from_config(type(layer), layer.get_config(), classes)
    except Exception as e:
        raise ConversionError(
            f"Cannot copy layer '{here}' ({type(layer).__name__}): "
            f"{first_line(e)}. Give the class a get_config() that its "
            "__init__ accepts, or pass it in custom_objects."
        ) from e
    if new.name != layer.name:
        new.name = layer.name
    _swap_children(converter, layer, new, here)
    if layer.built:
        build_config = layer.get_build_config()
        with warnings.catch_warnings():
            # Keras warns when build() is the default; the sublayers are
            # already built here.
            warnings.simplefilter("ignore")
            if build_config:
                new.build_from_config(build_config)
            else:
                new.built = True
    store = {}
    layer.save_own_variables(store)
    if store:
        new.load_own_variables(store)
    if isinstance(layer, flavour.Model) and layer.compiled:
        new.compile_from_config(layer.get_compile_config())
    return new


def _swap_children(converter, original, copied, here):
    """Replaces each sublayer of `copied` by the counterpart of `original`'s."""
    flavour = converter.flavour
    old_children, new_children = flavour.sublayers(original), flavour.sublayers(copied)
    # Paired by position: __init__ creates them in the same order. (The
    # classes may differ: the original may itself be a converted copy.)
    if len(old_children) != len(new_children):
        raise ConversionError(
            f"The copy of '{here}' ({type(original).__name__}) does not create "
            "the same sublayers as the original; make its __init__ create "
            "them from its config alone. Received: sublayers="
            f"{[c.name for c in old_children]}"
        )
    for old, twin in zip(old_children, new_children):
        replacement = converter.convert(old, here)
        _replace_sublayer(copied, twin, replacement, join(here, old.name))


def _replace_sublayer(parent, old, new, where):
    """Replaces `old` by `new` everywhere `parent` holds it, keeping the order."""
    found = False

    def swap(value):
        nonlocal found
        if value is old:
            found = True
            return new
        if isinstance(value, (list, tuple)):
            items = [swap(item) for item in value]
            if all(a is b for a, b in zip(items, value)):
                return value
            if issubclass(type(value), list):  # list, Keras's TrackedList
                for i, item in enumerate(items):
                    list.__setitem__(value, i, item)
                return value
            # Tuples, named tuples, and TensorFlow's tracking proxies of them
            # are rebuilt and assigned again.
            if hasattr(value, "_fields"):
                return type(value)(*items)
            return tuple(items) if isinstance(value, tuple) else list(items)
        if isinstance(value, dict):
            for key, item in list(value.items()):
                swapped = swap(item)
                if swapped is not item:
                    value[key] = swapped
            return value
        return value

    # Keras's own list of direct sublayers: weights, saving and `trainable`
    # follow it, so the new layer takes the old one's place in it.
    internals.replace_tracked_sublayer(parent, old, new)
    for name, value in list(vars(parent).items()):
        if name in internals.TRACKING_ATTRIBUTES:
            continue
        swapped = swap(value)
        if swapped is not value:
            setattr(parent, name, swapped)
    if not found:
        raise ConversionError(
            f"Layer '{where}' is not held in an attribute, list, tuple or dict of "
            f"its parent '{parent.name}', so it cannot be swapped; store it in an "
            "attribute."
        )


def _flatten(layer, flavour):
    """`layer` and every layer below it, each once."""
    seen, out, stack = set(), [], [layer]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        out.append(current)
        stack.extend(reversed(flavour.sublayers(current)))
    return out
