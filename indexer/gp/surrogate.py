"""The Gaussian-process surrogate on projected tangent features (DESIGN.md 1.1, 1.2), and its methods.

Linear-Gaussian model ``f_i = phi_i^T w``, prior ``w ~ N(0, tau^-1 I_k)``, per-example noise precision
``beta_i``. :func:`fit_surrogate` computes the posterior caches once, at index time, in float64; the
:class:`Surrogate` it returns is the one object through which every score of DESIGN.md 1.3 and every
joint score, greedy subset and coreset of 1.4 is computed (the formulas live in :mod:`indexer.gp.scores`,
:mod:`indexer.gp.subset` and :mod:`indexer.gp.coreset`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import solve_triangular
from scipy.linalg.lapack import dtrtrs

from indexer.enums import Objective, Score, parse_enum
from indexer.exceptions import InvalidQueryError
from indexer.gp.coreset import CoresetResult, coreset_information_gain, summed_information_gain
from indexer.gp.leverage import LeverageColumn
from indexer.gp.scores import QueryTerms, example_scores, score_vectors
from indexer.gp.subset import GreedyResult, greedy_subset, joint_score
from indexer.segments import RowSegments

__all__ = [
    "S_FLOOR",
    "Surrogate",
    "QueryTerms",
    "data_term",
    "fit_surrogate",
    "default_prior_precision",
    "sharded_data_term",
    "whiten",
]

S_FLOOR = 1e-6
"""Default floor on s_i = 1 - beta_i h_i (DESIGN.md 1.5): keeps influence and information loss finite."""

Rows = np.ndarray | slice | None
"""Which training examples: `(m,)` int64 row ids, a slice, or None for all of them."""


@dataclass(frozen=True)
class Surrogate:
    """A fitted surrogate: the posterior over w and the per-example caches of DESIGN.md 1.2.

    Attributes:
        prior_precision: tau.
        cholesky: `(k, k)` float64 lower-triangular L with A = tau I + Phi^T B Phi = L L^T.
        phi: `(n_train, k)` the features the surrogate was fitted on (float16 or float32 as stored, possibly
            memory-mapped, or float64; :class:`~indexer.segments.RowSegments` when an add appended a file);
            every score is computed from these values in float64. No whitened
            copy is kept (DESIGN.md 2.1): u_i = L^-1 phi_i is formed for the rows that need it
            (:meth:`whiten`), and c_qi = phi_i . A^-1 phi_q.
        beta: `(n_train,)` float64 likelihood weights.
        grad_term: `(n_train,)` float64 beta_i r_i.
        h: `(n_train,)` float64 posterior variance |u_i|^2 of f_i: an array, or (after an add kept the old
            examples' values as bounds) a :class:`~indexer.gp.leverage.LeverageColumn` that gives exact
            values for the rows asked for.
        s: `(n_train,)` float64 one minus the leverage, 1 - beta_i h_i, clamped at ``s_floor`` (an array or
            a column, as ``h``).
        s_floor: the clamp floor.
        n_clamped: how many s_i were raised to the floor (an upper bound while ``s`` is a column).
    """

    prior_precision: float
    cholesky: np.ndarray
    phi: np.ndarray | RowSegments
    beta: np.ndarray
    grad_term: np.ndarray
    h: np.ndarray | LeverageColumn
    s: np.ndarray | LeverageColumn
    s_floor: float
    n_clamped: int

    @property
    def leverage_exact(self) -> bool:
        """Whether ``s`` (and ``h``) hold exact values for every row (False: stored bounds, exact values
        computed on demand; DESIGN.md 2.1)."""
        return not isinstance(self.s, LeverageColumn)

    @property
    def s_lower_bound(self) -> np.ndarray:
        """`(n_train,)` float64 lower bounds of every s_i (the exact values when :attr:`leverage_exact`)."""
        return self.s.bound if isinstance(self.s, LeverageColumn) else np.asarray(self.s)

    @property
    def k(self) -> int:
        """Projected dimension."""
        return int(self.cholesky.shape[0])

    @property
    def n_train(self) -> int:
        """Number of training examples N in the posterior."""
        return int(self.phi.shape[0])

    def query_terms(self, phi_q: np.ndarray) -> QueryTerms:
        """Whiten one query feature: u_q = L^-1 phi_q, v_q = |u_q|^2 (DESIGN.md 1.2).

        Args:
            phi_q: `(k,)` projected tangent feature of the query, any float dtype.

        Returns:
            :class:`~indexer.gp.scores.QueryTerms` in float64.

        Raises:
            InvalidQueryError: wrong shape or non-finite values.
        """
        phi = np.asarray(phi_q, dtype=np.float64)
        if phi.shape != (self.k,):
            raise InvalidQueryError(f"query feature must have shape ({self.k},); got {phi.shape}")
        if not np.all(np.isfinite(phi)):
            raise InvalidQueryError("query feature must be finite; it contains NaN or infinity")
        u = _lower_solve(self.cholesky, phi, transposed=False)
        return QueryTerms(
            phi=phi,
            whitened=u,
            posterior_variance=float(u @ u),
            phi_norm=float(np.linalg.norm(phi)),
            precision_phi=_lower_solve(self.cholesky, u, transposed=True),
        )

    def whiten(self, rows: Rows = None) -> np.ndarray:
        """u_i = L^-1 phi_i of the given rows (DESIGN.md 1.2), computed from the stored features.

        Args:
            rows: `(m,)` row ids, a slice, or None for all (memory: m x k float64, so ask for what you need).

        Returns:
            `(m, k)` float64.
        """
        take = slice(None) if rows is None else rows
        return whiten(self.cholesky, self.phi[take])

    def scores(self, query: QueryTerms, rows: Rows = None) -> dict[Score, np.ndarray]:
        """Every single-example score of DESIGN.md 1.3 for ``query`` (information loss and gain in nats,
        influence in output units, the two baselines), in float64 from the stored features.

        Args:
            query: from :meth:`query_terms`.
            rows: the training examples to score (None: all).

        Returns:
            ``{Score: (m,) float64}``.
        """
        take = slice(None) if rows is None else rows
        many = np.arange(self.n_train)[take] if isinstance(take, slice) else np.asarray(take)
        if many.ndim == 1 and len(many) > FIT_CHUNK_ROWS:  # a deep rerank: float64 a chunk at a time
            parts = [self.scores(query, many[rows]) for rows in _chunks(len(many))]
            return {score: np.concatenate([p[score] for p in parts]) for score in Score}
        return example_scores(
            query,
            phi=self.phi[take],
            beta=self.beta[take],
            grad_term=self.grad_term[take],
            s=self.s[take],
            prior_precision=self.prior_precision,
        )

    def score_vectors(self, score: Score, rows: Rows = None) -> np.ndarray:
        """`(m, k)` float64 per-example vectors z_i of the vector-database form (DESIGN.md 1.3) of ``rows``
        (None: all; the posterior scores whiten those rows, so ask for what you need)."""
        take = slice(None) if rows is None else rows
        posterior = score in (Score.INFORMATION_LOSS, Score.INFLUENCE)
        return score_vectors(
            score,
            phi=self.phi[take],
            whitened=self.whiten(take) if posterior else None,
            beta=self.beta[take],
            grad_term=self.grad_term[take],
            s=self.s[take],
            prior_precision=self.prior_precision,
        )

    def joint_score(self, objective: Objective | str, query: QueryTerms, rows: np.ndarray) -> float:
        """Joint information loss or gain of removing / observing the whole set ``rows`` (DESIGN.md 1.4).

        Args:
            objective: ``"information_loss"`` or ``"information_gain"``.
            query: the query's terms.
            rows: `(m,)` training rows of the subset S.

        Returns:
            nats (0 for an empty subset).

        Raises:
            ValueError: unknown objective.
        """
        return joint_score(
            parse_enum(Objective, objective),
            query,
            self.phi[rows],
            self.whiten(rows),
            self.beta[rows],
            self.prior_precision,
        )

    def greedy_subset(
        self, objective: Objective | str, query: QueryTerms, pool: np.ndarray, size: int
    ) -> GreedyResult:
        """Greedy maximisation of a joint score over the candidates ``pool`` (DESIGN.md 1.4).

        Args:
            objective: ``"information_loss"`` or ``"information_gain"``.
            query: the query's terms.
            pool: `(pool,)` training rows of the candidates.
            size: m, 1 <= m <= pool.

        Returns:
            :class:`~indexer.gp.subset.GreedyResult`; its ``indices`` are positions in ``pool``.

        Raises:
            ValueError: unknown objective, or ``size`` outside [1, pool].
        """
        return greedy_subset(
            parse_enum(Objective, objective),
            query,
            self.phi[pool],
            self.whiten(pool),
            self.beta[pool],
            self.prior_precision,
            size,
        )

    def coreset(self, query_phi: np.ndarray, size: int, progress: bool = False) -> CoresetResult:
        """Greedy coreset: m training examples maximising sum_q IG(S | q) over a query set (DESIGN.md 1.4).

        Args:
            query_phi: `(n_query, k)` features of the query set (e.g. a validation split).
            size: m, 1 <= m <= n_train.
            progress: show a progress bar over steps.

        Returns:
            :class:`~indexer.gp.coreset.CoresetResult` with training rows.

        Raises:
            ValueError: shapes disagree, no queries, or ``size`` outside [1, n_train].
        """
        phi = np.asarray(self.phi) if isinstance(self.phi, RowSegments) else self.phi
        return coreset_information_gain(
            phi, self.beta, self.prior_precision, query_phi, size, progress=progress
        )

    def summed_information_gain(self, rows: np.ndarray, query_phi: np.ndarray) -> float:
        """sum_q IG(S | q) of the training rows S over the query set, computed directly, in nats."""
        return summed_information_gain(self.phi[rows], self.beta[rows], self.prior_precision, query_phi)


FIT_CHUNK_ROWS = 65536
"""Rows of features converted to float64 at a time by :func:`fit_surrogate` (the data term is a sum)."""


def _lower_solve(cholesky: np.ndarray, b: np.ndarray, transposed: bool) -> np.ndarray:
    """L^-1 b (or L^-T b) for one `(k,)` float64 vector: LAPACK's ``dtrtrs`` called as
    ``scipy.linalg.solve_triangular(..., lower=True, check_finite=False)`` calls it, so the bits are its
    bits, without its per-call validation and dispatch (about 50 us, two solves per query: a tenth of a
    batch of stored queries). ``b`` is finite (the caller checks) and L is by construction."""
    if cholesky.flags.f_contiguous:
        x, info = dtrtrs(cholesky, b, lower=1, trans=int(transposed))
    else:  # trtrs expects Fortran order: solve with L^T seen as an upper factor, as scipy does
        x, info = dtrtrs(cholesky.T, b, lower=0, trans=int(not transposed))
    if info != 0:
        raise np.linalg.LinAlgError(f"triangular solve failed (LAPACK dtrtrs info {info})")
    return np.asarray(x)


def whiten(cholesky: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """u = L^-1 phi for each row of ``phi`` (DESIGN.md 1.2).

    Args:
        cholesky: `(k, k)` float64 lower factor L; phi: `(m, k)` features, any float dtype.

    Returns:
        `(m, k)` float64.
    """
    return solve_triangular(cholesky, np.asarray(phi, dtype=np.float64).T, lower=True).T


def _chunks(n: int) -> list[slice]:
    return [slice(start, min(start + FIT_CHUNK_ROWS, n)) for start in range(0, n, FIT_CHUNK_ROWS)]


def data_term(phi: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """sum_i beta_i phi_i phi_i^T of one block of examples (DESIGN.md 1.2, 2.3), in float64, summed over
    chunks of :data:`FIT_CHUNK_ROWS` rows in order (the features are never converted whole).

    The same block gives the same bits wherever it is computed (a Ray task or the building process), which
    is what makes a distributed build's surrogate identical to a single-process build's.

    Args:
        phi: `(m, k)` features as stored (float16, float32 or float64); beta: `(m,)` float64 weights.

    Returns:
        `(k, k)` float64, symmetric positive semi-definite.
    """
    term = np.zeros((phi.shape[1], phi.shape[1]))
    for rows in _chunks(len(phi)):
        chunk = phi[rows]
        term += (chunk * beta[rows, None]).T @ chunk
    return term


def sharded_data_term(phi: np.ndarray, beta: np.ndarray, shard_rows: int) -> np.ndarray:
    """The data term summed shard by shard: :func:`data_term` of each block of ``shard_rows`` consecutive
    examples, added in order (DESIGN.md 2.3): what a Ray build sums from its tasks' blocks.

    Args:
        phi: `(n, k)` stored features; beta: `(n,)` float64 weights; shard_rows: examples per shard (> 0).

    Returns:
        `(k, k)` float64.

    Raises:
        ValueError: ``shard_rows`` is not positive.
    """
    if shard_rows <= 0:
        raise ValueError(f"shard_rows must be positive; got {shard_rows}")
    total = np.zeros((phi.shape[1], phi.shape[1]))
    for start in range(0, len(phi), shard_rows):
        total += data_term(phi[start : start + shard_rows], beta[start : start + shard_rows])
    return total


def default_prior_precision(phi: np.ndarray, beta: np.ndarray) -> float:
    """tau = trace(Phi^T B Phi) / k, the mean eigenvalue of the data term (DESIGN.md 1.1).

    Args:
        phi: `(n_train, k)` features.
        beta: `(n_train,)` likelihood weights.

    Returns:
        tau > 0 (float).

    Raises:
        ValueError: the data term is zero (all beta_i or all phi_i vanish), so no scale can be inferred.
    """
    phi64 = np.asarray(phi, dtype=np.float64)
    tau = float(np.einsum("n,nk,nk->", beta, phi64, phi64) / phi64.shape[1])
    if not (np.isfinite(tau) and tau > 0):
        raise ValueError("trace(Phi^T B Phi) is zero or not finite; pass an explicit prior precision tau")
    return tau


def fit_surrogate(
    phi: np.ndarray,
    beta: np.ndarray,
    grad_term: np.ndarray,
    prior_precision: float | None = None,
    s_floor: float = S_FLOOR,
    summed_data_term: np.ndarray | None = None,
) -> Surrogate:
    """Fit the surrogate's posterior (DESIGN.md 1.2).

    A = tau I + sum_i beta_i phi_i phi_i^T, A = L L^T, u_i = L^-1 phi_i, h_i = |u_i|^2,
    s_i = max(1 - beta_i h_i, s_floor). The data term is summed over chunks of :data:`FIT_CHUNK_ROWS` rows
    converted to float64 (:func:`data_term`), so the features are never converted whole, unless it is given
    (summed from shards, DESIGN.md 2.3).

    Args:
        phi: `(n_train, k)` projected tangent features (float32 or float64; used in float64 and kept as
            given).
        beta: `(n_train,)` likelihood weights beta_i >= 0.
        grad_term: `(n_train,)` beta_i r_i.
        prior_precision: tau; None for :func:`default_prior_precision`.
        s_floor: floor for s_i (DESIGN.md 1.5).
        summed_data_term: `(k, k)` float64 sum_i beta_i phi_i phi_i^T of exactly these features, computed
            elsewhere (e.g. :func:`sharded_data_term`, or by a build's Ray tasks); None: computed here.

    Returns:
        The fitted :class:`Surrogate`.

    Raises:
        ValueError: inconsistent shapes, negative or non-finite beta, non-finite features, tau <= 0, a given
            data term of another shape or not finite.
    """
    phi64 = np.asarray(phi)  # converted to float64 a chunk at a time
    beta = np.asarray(beta, dtype=np.float64)
    grad_term = np.asarray(grad_term, dtype=np.float64)
    if phi64.ndim != 2:
        raise ValueError(f"phi must be (n_train, k); got shape {phi64.shape}")
    n, k = phi64.shape
    if beta.shape != (n,) or grad_term.shape != (n,):
        raise ValueError(f"beta and grad_term must have shape ({n},); got {beta.shape} and {grad_term.shape}")
    if not np.all(np.isfinite(phi64)):
        raise ValueError("phi contains NaN or infinity")
    if not (np.all(np.isfinite(beta)) and np.all(beta >= 0)):
        raise ValueError("beta must be finite and non-negative")
    if summed_data_term is None:
        term = data_term(phi64, beta)
    else:
        term = np.asarray(summed_data_term, dtype=np.float64)
        if term.shape != (k, k) or not np.all(np.isfinite(term)):
            raise ValueError(f"the data term must be a finite ({k}, {k}) matrix; got shape {term.shape}")
    tau = float(np.trace(term) / k) if prior_precision is None else float(prior_precision)
    if not (np.isfinite(tau) and tau > 0):
        if prior_precision is None:
            raise ValueError("trace(Phi^T B Phi) is zero or not finite; pass an explicit prior precision tau")
        raise ValueError(f"prior precision tau must be positive and finite; got {tau}")
    cholesky = np.linalg.cholesky(tau * np.eye(k) + term)
    h = np.empty(n)
    for rows in _chunks(n):  # h_i = |L^-1 phi_i|^2, a chunk at a time (no whitened copy is kept)
        u = whiten(cholesky, phi64[rows])
        h[rows] = np.einsum("nk,nk->n", u, u)
    s_raw = 1.0 - beta * h
    s = np.maximum(s_raw, s_floor)
    return Surrogate(
        prior_precision=tau,
        cholesky=cholesky,
        phi=np.asarray(phi),
        beta=beta,
        grad_term=grad_term,
        h=h,
        s=s,
        s_floor=float(s_floor),
        n_clamped=int(np.sum(s_raw < s_floor)),
    )
