"""The project's exceptions. Each subclasses the built-in that a caller would catch anyway."""

from __future__ import annotations

__all__ = [
    "InfotraceError",
    "IndexNotFoundError",
    "IndexCorruptError",
    "IndexFormatError",
    "IndexNotReadyError",
    "InvalidQueryError",
    "UnknownExampleError",
    "ModelMismatchError",
    "NotStoredError",
]


class InfotraceError(Exception):
    """Base class of every error that infotrace raises on purpose."""


class IndexNotFoundError(InfotraceError, FileNotFoundError):
    """An index directory, or a file inside it, does not exist."""


class IndexCorruptError(InfotraceError, ValueError):
    """A file of an index does not match its manifest (checksum, shape or dtype). Names the file."""


class IndexFormatError(InfotraceError, ValueError):
    """The manifest is unreadable, misses a field, or has a format version this code does not read."""


class IndexNotReadyError(InfotraceError, RuntimeError):
    """An index is present but cannot be served (it failed to load or verify); says why."""


class InvalidQueryError(InfotraceError, ValueError):
    """A query is malformed: wrong shape, dtype, non-finite values or out-of-range options."""


class UnknownExampleError(InfotraceError, KeyError):
    """An example or query id that the index does not hold."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else ""


class ModelMismatchError(InfotraceError, ValueError):
    """A model, checkpoint or feature dimension that differs from the one the index was built with."""


class NotStoredError(InfotraceError, LookupError):
    """Something the index does not hold was asked for: the inputs of an index built without them, or a
    rendering of inputs that are not images (no ``image_shape``)."""
