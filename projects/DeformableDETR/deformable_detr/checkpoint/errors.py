"""Errors of the checkpoint package; every message starts with the file it is about."""

__all__ = ["CheckpointConversionError", "CheckpointFileError", "fail"]


class CheckpointConversionError(ValueError):
    """A checkpoint that the converter does not understand; the message names the file and key."""


class CheckpointFileError(RuntimeError):
    """A checkpoint file that is missing, unreadable or corrupt; the message names the file."""


def fail(source, message):
    """Raise a :class:`CheckpointConversionError` about ``source`` (a file name)."""
    raise CheckpointConversionError(f"{source}: {message}")
