"""The incremental-Cholesky step shared by greedy subsets and coresets (DESIGN.md 1.4).

Both greedy searches maximise a function of ``Q(S) = b_S^T G_SS^-1 b_S`` with a kernel
``G = I + sign V V^T`` over a candidate pool (``sign = -1``: the information-loss kernel
``I - (D U)(D U)^T``; ``+1``: the information-gain kernel ``I + W W^T``), for one query (``b`` of shape
`(pool,)`) or for many at once (`(n_query, pool)`: the coreset, whose kernel does not depend on the query).

:class:`GreedyCholesky` keeps the rows ``l_j`` of the growing Cholesky factor of ``G_SS`` against every
candidate j, the Schur complements ``d_j = G_jj - |l_j|^2`` and the residuals ``r_j = b_j - l_j^T alpha``.
Adding candidate j raises Q by ``r_j^2 / d_j`` (per query); an addition costs O(pool * (|S| + k)), with no
refactorisation.
"""

from __future__ import annotations

import numpy as np

__all__ = ["GreedyCholesky"]


class GreedyCholesky:
    """The state of a greedy selection under the kernel ``G = I + sign V V^T``.

    Args:
        vectors: `(pool, k)` float64 V.
        sign: +1.0 or -1.0.
        b: `(pool,)` or `(n_query, pool)` float64 right-hand sides b (one row per query).
        capacity: the most members that will be added (columns of the factor kept).

    Attributes:
        residual: `(pool,)` or `(n_query, pool)` float64 ``b_j - l_j^T alpha`` (per query).
        diag: `(pool,)` float64 ``G_jj - |l_j|^2``, the Schur complement of each candidate (about 0 for
            members).
        chosen: `(pool,)` bool, the members so far.
        size: number of members so far.

    Raises:
        ValueError: shapes that disagree, or ``sign`` not +-1.
    """

    def __init__(self, vectors: np.ndarray, sign: float, b: np.ndarray, capacity: int) -> None:
        if sign not in (1.0, -1.0):
            raise ValueError(f"sign must be +1 or -1; got {sign}")
        pool = len(vectors)
        if np.shape(b)[-1] != pool:
            raise ValueError(f"b must have {pool} entries per query (the pool); got shape {np.shape(b)}")
        self.vectors = vectors
        self.sign = sign
        self.residual = np.array(b, dtype=np.float64, copy=True)
        self.diag = 1.0 + sign * np.einsum("nk,nk->n", vectors, vectors)
        self._rows = np.zeros((pool, capacity))  # l_j, the rows of the growing Cholesky factor
        self.chosen = np.zeros(pool, dtype=bool)
        self.size = 0

    def gains(self) -> np.ndarray:
        """Increase of Q from adding each candidate: ``r_j^2 / d_j``, -inf for members.

        Returns:
            The shape of :attr:`residual`, float64.
        """
        with np.errstate(divide="ignore", invalid="ignore"):
            delta = np.where(self.diag > 0, self.residual**2 / self.diag, 0.0)
        delta[..., self.chosen] = -np.inf
        return delta

    def add(self, pick: int) -> np.ndarray | float:
        """Add candidate ``pick``: one new column of the factor, updated Schur complements and residuals.

        Args:
            pick: pool position of a candidate that is not yet a member.

        Returns:
            ``alpha = r_pick / sqrt(d_pick)`` before the update (a float, or `(n_query,)`): Q grows by
            ``alpha**2``.

        Raises:
            ValueError: ``pick`` is already a member, or the factor is full.
        """
        if self.chosen[pick]:
            raise ValueError(f"candidate {pick} is already a member")
        step = self.size
        if step >= self._rows.shape[1]:
            raise ValueError(f"the factor holds at most {self._rows.shape[1]} members")
        d_pick = np.sqrt(self.diag[pick])
        # new column of the factor: (G_pick,j - l_pick . l_j) / d_pick for every j
        column = (
            self.sign * (self.vectors @ self.vectors[pick]) - self._rows[:, :step] @ self._rows[pick, :step]
        ) / d_pick
        column[pick] = d_pick
        alpha = self.residual[..., pick] / d_pick
        self._rows[:, step] = column
        self.diag = self.diag - column**2
        self.residual = self.residual - np.asarray(alpha)[..., None] * column
        self.chosen[pick] = True
        self.size += 1
        return alpha
