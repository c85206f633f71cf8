"""Posterior variances h_i and one minus the leverages s_i computed on demand (DESIGN.md 1.2, 2.1).

Adding examples raises the posterior precision (``A' = A + sum_new beta_j phi_j phi_j^T >= A``), so every
old example's posterior variance ``h_i = phi_i^T A^-1 phi_i`` can only fall and ``s_i = max(1 - beta_i
h_i, floor)`` can only rise. Recomputing them for all N examples costs ``N k^2`` float64 operations, as
much as a fit (1M x 512: most of an add's time), so an add keeps the old examples' stored values as bounds
(h from above, s from below) and :class:`OnDemandLeverage` computes the exact values from the current
Cholesky factor for the rows a score asks for, once each (cached). Consumers index it like the array it
stands for; the exact scan reads :attr:`OnDemandLeverage.bound` (a score's key with s from below is a bound
on its magnitude, :class:`~indexer.store.search.Searcher`). A removal lowers the precision, so it
recomputes every value (the stored values are exact again).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
from scipy.linalg import solve_triangular

__all__ = ["LeverageColumn", "OnDemandLeverage"]

_CHUNK = 65536
"""Rows whitened at a time when every value is asked for (memory: this many x k float64)."""


class OnDemandLeverage:
    """Exact h_i and s_i of the current posterior, computed per row from its Cholesky factor and cached.

    Args:
        cholesky: `(k, k)` float64 lower factor L of the current posterior precision A = L L^T.
        phi: `(n_train, k)` stored features (any float dtype; a memory map or row segments are fine).
        beta: `(n_train,)` float64 likelihood weights.
        h_bound: `(n_train,)` float64 stored h_i: exact for some rows, an upper bound for the others (those
            of an earlier posterior with a subset of the examples).
        s_bound: `(n_train,)` float64 stored s_i: exact or a lower bound, row by row as ``h_bound``.
        s_floor: the clamp floor of s (DESIGN.md 1.5).

    Thread-safe: two threads asking for the same row may both compute it and write the same value.
    """

    def __init__(
        self,
        cholesky: np.ndarray,
        phi: Any,
        beta: np.ndarray,
        h_bound: np.ndarray,
        s_bound: np.ndarray,
        s_floor: float,
    ) -> None:
        n = len(h_bound)
        if not (len(phi) == len(beta) == len(s_bound) == n):
            raise ValueError(
                f"phi, beta, h and s must have one row per example; got {len(phi)}, {len(beta)}, {n}, "
                f"{len(s_bound)}"
            )
        self.cholesky, self.phi, self.beta, self.s_floor = cholesky, phi, beta, s_floor
        self.h_bound, self.s_bound = h_bound, s_bound
        self._h = np.zeros(n)
        self._known = np.zeros(n, dtype=bool)
        self._all_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._h)

    def h(self, rows: np.ndarray) -> np.ndarray:
        """`(m,)` float64 exact h_i = |L^-1 phi_i|^2 of the row ids ``rows`` (DESIGN.md 1.2)."""
        rows = np.asarray(rows, dtype=np.int64)
        missing = np.unique(rows[~self._known[rows]])
        for start in range(0, len(missing), _CHUNK):
            part = missing[start : start + _CHUNK]
            u = solve_triangular(self.cholesky, np.asarray(self.phi[part], dtype=np.float64).T, lower=True)
            self._h[part] = np.einsum("kn,kn->n", u, u)
            self._known[part] = True
        return self._h[rows]

    def s(self, rows: np.ndarray) -> np.ndarray:
        """`(m,)` float64 exact s_i = max(1 - beta_i h_i, floor) of the row ids ``rows`` (DESIGN.md 1.5)."""
        rows = np.asarray(rows, dtype=np.int64)
        return np.maximum(1.0 - np.asarray(self.beta)[rows] * self.h(rows), self.s_floor)

    def all_h(self) -> np.ndarray:
        """`(n_train,)` every exact h_i (``n_train k^2`` float64 operations the first time)."""
        with self._all_lock:
            return self.h(np.arange(len(self)))

    def n_clamped(self) -> int:
        """How many exact s_i are at the floor (computes every h_i)."""
        return int(np.sum(1.0 - np.asarray(self.beta) * self.all_h() < self.s_floor))


class LeverageColumn:
    """h or s of an :class:`OnDemandLeverage` seen as a `(n_train,)` float64 array: ``column[rows]`` with
    row ids or a slice gives exact values, ``np.asarray(column)`` all of them; :attr:`bound` the stored
    bounds (h from above, s from below).

    Args:
        leverage: the shared computation; which: ``"h"`` or ``"s"``.
    """

    def __init__(self, leverage: OnDemandLeverage, which: str) -> None:
        if which not in ("h", "s"):
            raise ValueError(f"which must be 'h' or 's'; got {which!r}")
        self.leverage, self.which = leverage, which

    @property
    def bound(self) -> np.ndarray:
        """`(n_train,)` float64 stored values: an upper bound of every h_i, a lower bound of every s_i."""
        return self.leverage.h_bound if self.which == "h" else self.leverage.s_bound

    @property
    def shape(self) -> tuple[int]:
        """``(n_train,)``."""
        return (len(self.leverage),)

    def __len__(self) -> int:
        return len(self.leverage)

    def __getitem__(self, rows: Any) -> Any:
        """Exact values of ``rows`` (int ids, a slice or a boolean mask); a scalar for one int id."""
        ids = np.arange(len(self))[rows]
        one = np.ndim(ids) == 0
        ids = np.atleast_1d(ids)
        values = self.leverage.h(ids) if self.which == "h" else self.leverage.s(ids)
        return float(values[0]) if one else values

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        values = self[:]
        return values if dtype is None else values.astype(dtype)
