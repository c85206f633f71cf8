"""Seeded random projection of tangent features, generated block by block (DESIGN.md 1.1).

``phi = R^T g`` with R a `(n_params, k)` matrix of i.i.d. N(0, 1/k) (or +-1/sqrt(k)) entries. R is cut into
row blocks of :data:`PROJECTION_BLOCK_ROWS` rows; block b is drawn from its own
``numpy`` generator seeded with ``(seed, b)``. The features therefore depend only on (seed, kind, k,
n_params), never on how many blocks are held at once, and the full matrix never has to exist in memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from indexer.enums import ProjectionKind, parse_enum

__all__ = ["PROJECTION_BLOCK_ROWS", "RandomProjection"]

PROJECTION_BLOCK_ROWS = 4096
"""Rows of the projection matrix generated per seeded block. Fixed so that features do not depend on
how many blocks are processed at a time (DESIGN.md 1.1: same seed, same model => same features)."""


class RandomProjection:
    """The projection R of DESIGN.md 1.1.

    Args:
        n_params: P, length of the tangent feature (number of model parameters).
        k: projected dimension.
        seed: non-negative integer seed.
        kind: ``"gaussian"`` or ``"rademacher"``.
        cache_bytes: keep generated blocks in memory while their total stays within this many bytes
            (0: regenerate on every call, so memory stays at one block). The service caches small
            projections to featurize queries in milliseconds; the indexer keeps memory bounded.

    Raises:
        ValueError: non-positive ``n_params`` or ``k``, negative ``seed``, unknown ``kind``.
    """

    def __init__(
        self,
        n_params: int,
        k: int,
        seed: int = 0,
        kind: ProjectionKind | str = ProjectionKind.GAUSSIAN,
        cache_bytes: int = 0,
    ) -> None:
        if n_params <= 0 or k <= 0:
            raise ValueError(f"n_params and k must be positive; got n_params={n_params}, k={k}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative; got {seed}")
        self.n_params = int(n_params)
        self.k = int(k)
        self.seed = int(seed)
        self.kind = parse_enum(ProjectionKind, kind)
        self.n_blocks = math.ceil(self.n_params / PROJECTION_BLOCK_ROWS)
        whole_bytes = self.n_params * self.k * 4
        self._cache: list[np.ndarray] | None = [] if 0 < whole_bytes <= cache_bytes else None

    def block(self, b: int) -> np.ndarray:
        """Transposed block b of R.

        Args:
            b: block number, ``0 <= b < n_blocks``.

        Returns:
            `(k, rows_b)` float32, the rows ``[b * PROJECTION_BLOCK_ROWS, ...)`` of R, transposed so that
            ``block @ g_chunk`` is a contiguous matrix product.
        """
        if self._cache is not None and b < len(self._cache):
            return self._cache[b]
        start = b * PROJECTION_BLOCK_ROWS
        rows = min(PROJECTION_BLOCK_ROWS, self.n_params - start)
        rng = np.random.default_rng([self.seed, b])
        scale = np.float32(1.0 / math.sqrt(self.k))
        if self.kind is ProjectionKind.GAUSSIAN:
            values = rng.standard_normal((self.k, rows), dtype=np.float32)
        else:
            values = rng.integers(0, 2, size=(self.k, rows), dtype=np.int8).astype(np.float32) * 2 - 1
        values *= scale
        if self._cache is not None and b == len(self._cache):
            self._cache.append(values)
        return values

    def blocks(self) -> Iterator[tuple[slice, np.ndarray]]:
        """Yield ``(row_slice, block)`` for every block of R, in order (see :meth:`block`)."""
        for b in range(self.n_blocks):
            start = b * PROJECTION_BLOCK_ROWS
            yield slice(start, min(start + PROJECTION_BLOCK_ROWS, self.n_params)), self.block(b)

    def project(self, gradients: np.ndarray) -> np.ndarray:
        """phi = R^T g for a batch of tangent features.

        Args:
            gradients: `(n, n_params)` float32 (other float dtypes are cast) tangent features g.

        Returns:
            `(n, k)` float32 projected features.

        Raises:
            ValueError: the second dimension is not ``n_params``.
        """
        g = np.asarray(gradients)
        if g.ndim != 2 or g.shape[1] != self.n_params:
            raise ValueError(f"gradients must have shape (n, {self.n_params}); got {g.shape}")
        # torch's matmul on the numpy buffers (no copies): it shares the thread pool that computed the
        # gradients, where numpy's BLAS threads would contend with torch's (3x slower per query, measured)
        g_t = torch.from_numpy(np.ascontiguousarray(g, dtype=np.float32))
        out = torch.zeros((g_t.shape[0], self.k), dtype=torch.float32)
        for rows, block in self.blocks():
            out.addmm_(g_t[:, rows], torch.from_numpy(block).T)
        return out.numpy()

    def matrix(self) -> np.ndarray:
        """The whole of R as `(n_params, k)` float32: for tests on small problems only."""
        return np.concatenate([block.T for _, block in self.blocks()], axis=0)
