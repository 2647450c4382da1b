"""The bridge's error type."""


class CheckpointError(ValueError):
    """A checkpoint or state dict cannot be used: corrupt, unsafe, or not matching the model.

    The message names the file (or source) and what is wrong.
    """
