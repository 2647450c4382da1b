"""The bridge's error types."""


class CheckpointError(ValueError):
    """A checkpoint or state dict cannot be used: corrupt, unsafe, or not matching the model.

    The message names the file (or source) and what is wrong.
    """


class UnsupportedModelError(CheckpointError, TypeError):
    """An upstream (torchvision / timm) model or state dict the zoo cannot convert exactly.

    Another class, a changed layer (different class or settings at a module path), a
    configuration that cannot be read from the instance, missing or unexpected keys, wrong
    shapes or dtypes. The message names the module path or key, what was found and what was
    expected. A ``ValueError`` (through :class:`CheckpointError`), and a ``TypeError`` for the
    callers that caught "no conversion rule for this class" as one before the zoo existed.
    """
