"""The error every private-name access raises when an upgrade moved its name."""


class InternalsError(ImportError):
    """A private Keras/TF name bnconvert relies on is gone (an upgrade moved it)."""


def _missing(what, error):
    return InternalsError(
        f"This Keras/TensorFlow version has no {what}, which bnconvert needs; "
        f"install a version in bnconvert's supported range ({error})"
    )
