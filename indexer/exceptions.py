"""The project's exceptions. Each subclasses the built-in that a caller would catch anyway."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "InfotraceError",
    "IndexNotFoundError",
    "IndexCorruptError",
    "IndexFormatError",
    "IndexNotReadyError",
    "InvalidQueryError",
    "InvalidTargetsError",
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


class InvalidTargetsError(InfotraceError, ValueError):
    """Targets an output function cannot explain (raised by ``check_targets`` before any work is done).

    Args:
        reason: the rule the targets break, and what was expected.
        rows: the offending rows of the batch that was checked, so that a caller who knows where the batch
            starts can name the examples; empty when the rule concerns the batch as a whole.

    Attributes:
        reason: as given; rows: as given, a tuple of ints.
    """

    def __init__(self, reason: str, rows: Sequence[int] = ()) -> None:
        self.reason = reason
        self.rows = tuple(int(r) for r in rows)
        shown = list(self.rows[:10])
        where = f"rows {shown}{' ...' if len(self.rows) > 10 else ''} of the batch: " if self.rows else ""
        super().__init__(f"{where}{reason}")


class UnknownExampleError(InfotraceError, KeyError):
    """An example or query id that the index does not hold."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else ""


class ModelMismatchError(InfotraceError, ValueError):
    """A model, checkpoint or feature dimension that differs from the one the index was built with."""


class NotStoredError(InfotraceError, LookupError):
    """Something the index does not hold was asked for: the inputs of an index built without them, or a
    rendering of inputs that are not images (no ``image_shape``)."""
