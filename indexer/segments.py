"""An `(n, ...)` array stored as consecutive row segments (DESIGN.md 2.1: an add appends a file).

An add writes its new training features as a new file and links the earlier files unchanged into the new
version of the index, so that it neither copies nor re-hashes the existing features (1 GB at 1M x 512
float16: a copy, a checksum and a flush of it took 3.5 s here, more than the rest of an add).
:class:`RowSegments` presents those files, each memory-mapped, as one array for the reads the index does:
rows by id or slice, the shape and dtype, ``np.asarray`` (a copy: for small indexes and tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["RowSegments", "concatenated"]


class RowSegments:
    """Several arrays with the same trailing shape and dtype, read as their concatenation along rows.

    Args:
        parts: the segments in order, each `(n_j, ...)` (memory maps are fine); at least one.

    Raises:
        ValueError: no parts, or parts whose dtype or trailing shape differ.
    """

    def __init__(self, parts: Sequence[np.ndarray]) -> None:
        if not parts:
            raise ValueError("RowSegments needs at least one segment")
        first = parts[0]
        for p in parts[1:]:
            if p.dtype != first.dtype or p.shape[1:] != first.shape[1:]:
                raise ValueError(
                    f"segments must share dtype and trailing shape; got {first.dtype}{first.shape} and "
                    f"{p.dtype}{p.shape}"
                )
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        self.dtype = first.dtype
        self.shape = (int(self.starts[-1]), *first.shape[1:])

    @property
    def ndim(self) -> int:
        """Number of dimensions."""
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of all segments."""
        return sum(p.nbytes for p in self.parts)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: Any) -> np.ndarray:
        """Rows by an int, a slice, an int array or a boolean mask (a new array; one int: that row)."""
        if isinstance(rows, tuple):  # rows, then the trailing dimensions
            head = self[rows[0]]
            keeps_rows = isinstance(rows[0], slice) or np.ndim(rows[0]) > 0
            return head[(slice(None), *rows[1:])] if keeps_rows else head[rows[1:]]
        if isinstance(rows, slice):
            start, stop, step = rows.indices(len(self))
            if step == 1:
                return self._range(start, max(start, stop))
            rows = np.arange(start, stop, step)
        ids = np.asarray(rows)
        if ids.dtype == bool:
            ids = np.flatnonzero(ids)
        if ids.ndim == 0:
            i = int(ids)
            if i < 0:
                i += len(self)
            if not 0 <= i < len(self):
                raise IndexError(f"row {int(ids)} is out of range for {len(self)} rows")
            j = int(np.searchsorted(self.starts, i, side="right")) - 1
            return np.asarray(self.parts[j][i - self.starts[j]])
        ids = np.where(ids < 0, ids + len(self), ids).astype(np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"row ids out of range for {len(self)} rows")
        out = np.empty((len(ids), *self.shape[1:]), dtype=self.dtype)
        which = np.searchsorted(self.starts, ids, side="right") - 1
        for j in np.unique(which):
            mask = which == j
            out[mask] = self.parts[j][ids[mask] - self.starts[j]]
        return out

    def _range(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 as one array (a view when they lie in one segment)."""
        pieces = []
        for j, part in enumerate(self.parts):
            lo, hi = max(start, self.starts[j]), min(stop, self.starts[j + 1])
            if lo < hi:
                pieces.append(part[lo - self.starts[j] : hi - self.starts[j]])
        if len(pieces) == 1:
            return pieces[0]
        if not pieces:
            return np.empty((0, *self.shape[1:]), dtype=self.dtype)
        return np.concatenate(pieces)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = np.concatenate(self.parts)
        return whole if dtype is None else whole.astype(dtype)

    def astype(self, dtype: Any, copy: bool = True) -> np.ndarray:
        """All rows as one array of ``dtype``."""
        return np.asarray(self, dtype=dtype)


def concatenated(parts: Sequence[np.ndarray]) -> np.ndarray | RowSegments:
    """The one array itself, or :class:`RowSegments` over several."""
    return parts[0] if len(parts) == 1 else RowSegments(parts)
