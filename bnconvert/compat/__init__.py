"""The tf-keras (Keras 2) flavour: `bnconvert.compat.SyncBatchNormalization`.

tf-keras is optional and takes about half a second to import, so importing
bnconvert does not import it. Instead, `install_registration_hook()` (called
by `import bnconvert`) arranges for the tf-keras layer to be registered with
tf-keras the moment `tf_keras` is imported, or at once if it already is.
Either way, `tf_keras.models.load_model` finds
`"bnconvert>SyncBatchNormalization"` after a plain `import bnconvert`.
"""

import importlib.util
import sys
import warnings

_TF_KERAS = "tf_keras"


def _register():
    """Imports the tf-keras layer module, whose class decorator registers it."""
    from bnconvert.compat import tf_keras_layers  # noqa: F401


class _RegisterAfterImport:
    """A one-shot `sys.meta_path` finder: registers the layer after tf_keras loads.

    It finds nothing itself. Asked for `tf_keras`, it removes itself, lets the
    other finders find the package, and wraps the package loader's
    `exec_module` so that registration runs right after `tf_keras/__init__.py`
    has executed (the module object and its loader stay tf-keras's own).
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TF_KERAS:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_module_then_register(module):
            try:
                exec_module(module)
            finally:
                # The loader is tf-keras's own instance; leave it as found.
                loader.__dict__.pop("exec_module", None)
            try:
                _register()
            except Exception as error:  # noqa: BLE001 - never break tf_keras
                warnings.warn(
                    "bnconvert could not register its tf-keras "
                    f"SyncBatchNormalization: {error!r}",
                    stacklevel=2,
                )

        loader.exec_module = exec_module_then_register
        return spec


def install_registration_hook():
    """Registers the tf-keras layer now or when `tf_keras` is first imported.

    Does nothing when tf-keras is not installed. Safe to call repeatedly.
    """
    if _TF_KERAS in sys.modules:
        _register()
        return
    if any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        return
    if importlib.util.find_spec(_TF_KERAS) is None:
        return
    sys.meta_path.insert(0, _RegisterAfterImport())


def __getattr__(name):
    # `bnconvert.compat.SyncBatchNormalization` imports tf-keras on first use.
    if name == "SyncBatchNormalization":
        from bnconvert.compat.tf_keras_layers import SyncBatchNormalization

        return SyncBatchNormalization
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["SyncBatchNormalization", "install_registration_hook"]
