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


def first_line(error, limit=200):
    """The first line of an exception's message (or its class name), at most `limit` chars.

    Messages of TensorFlow, h5py and zipfile errors can span pages; a
    bnconvert error quotes only their first line, so that it stays one line.
    """
    text = str(error).strip().splitlines()
    line = text[0] if text else type(error).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."
