"""Errors that bnconvert raises for bad input.

Each message is one line: what is wrong, where (file, layer or rule), and what
to do about it. The CLI prints it as is, without a traceback.
"""


class BnconvertError(Exception):
    """Base class of every error caused by the user's input."""


class ModelLoadError(BnconvertError):
    """A model file or directory cannot be read as a Keras model."""


class RuleError(BnconvertError):
    """A rule file is unreadable or does not follow the rule schema."""


class ConversionError(BnconvertError):
    """A layer cannot be rewritten as its rule asks."""


class VerificationError(BnconvertError):
    """The rewritten model does not reproduce the original's outputs."""


class OutputError(BnconvertError):
    """An output path cannot be written (exists without --force, bad dir)."""
