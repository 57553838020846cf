"""Modules named with `--custom-objects`: imported, and their classes collected.

Importing runs any registration decorators in the module (Keras 3's
`register_keras_serializable`, tf-keras's too). The CLI imports these
modules before TensorFlow starts, so that a library which configures
TensorFlow on import (some set `TF_USE_LEGACY_KERAS`) is in effect.
"""

import importlib
import importlib.util
import inspect
import os
import pathlib
import sys

from bnconvert.errors import ModelLoadError
from bnconvert.errors import first_line as _first_line


def import_custom_objects(module_names):
    """Imports modules that define custom Keras objects, for loading.

    Importing runs any `@keras.saving.register_keras_serializable()`
    decorators in the module. The returned dict also maps the name of every
    public class and function the module defines itself (not the ones it
    imports) to that object, so unregistered custom layers resolve by class
    name; a module-level dict named `custom_objects` is merged in last.

    Args:
        module_names: Iterable of dotted module names (`mypkg.layers`) or
            paths to `.py` files. Modules are looked up on `sys.path` and in
            the current directory.

    Returns:
        A dict of name -> object, suitable for `custom_objects=`.

    Raises:
        ModelLoadError: if a module cannot be found or fails to import.
    """
    objects = {}
    for name in module_names:
        module = _import_module(name)
        for attr, value in vars(module).items():
            if attr.startswith("_"):
                continue
            if (inspect.isclass(value) or inspect.isfunction(value)) and (
                getattr(value, "__module__", None) == module.__name__
            ):
                objects[attr] = value
        extra = getattr(module, "custom_objects", None)
        if isinstance(extra, dict):
            objects.update(extra)
    return objects


def module_name_for_file(path):
    """The module name a `.py` file given with `--custom-objects` is imported under."""
    return f"_bnconvert_custom_{pathlib.Path(path).stem}"


def _import_module(name):
    try:
        if name.endswith(".py") or os.sep in name:
            path = pathlib.Path(name)
            if not path.is_file():
                what = "is not a regular file" if path.exists() else "does not exist"
                raise ModelLoadError(
                    f"Custom-objects file {path} {what}. "
                    f"Received: custom_objects={name!r}"
                )
            module_name = module_name_for_file(path)
            done = sys.modules.get(module_name)
            if done is not None and getattr(done, "__file__", None) == str(path.resolve()):
                return done  # imported already, before TensorFlow started
            spec = importlib.util.spec_from_file_location(module_name, path.resolve())
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(module_name, None)
                raise
            return module
        # A console script's sys.path starts at its own directory, not the
        # current one, where a user's module usually lives.
        cwd = os.getcwd()
        added = cwd not in sys.path
        if added:
            sys.path.append(cwd)
        try:
            return importlib.import_module(name)
        finally:
            if added:
                sys.path.remove(cwd)
    except ModelLoadError:
        raise
    except ImportError as e:
        raise ModelLoadError(
            f"Cannot import custom-objects module {name!r}: {_first_line(e)}; "
            "check the name and that it is on PYTHONPATH or in the current "
            "directory."
        ) from e
    except Exception as e:  # The module's own code failed.
        raise ModelLoadError(
            f"Importing custom-objects module {name!r} failed: "
            f"{type(e).__name__}: {_first_line(e)}"
        ) from e
