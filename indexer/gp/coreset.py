"""Coreset selection: m training examples maximising the summed information gain over a query set
(DESIGN.md 1.4, last point).

The objective is sum_q IG(S | q), IG(S | q) = -0.5 log(1 - Q_q(S) / k_qq) with
Q_q(S) = b_qS^T (I + W_S W_S^T)^-1 b_qS, W = D Phi / sqrt(tau), b_q = W phi_q / sqrt(tau) and
k_qq = |phi_q|^2 / tau (the finite form of :mod:`indexer.gp.subset`). The kernel I + W W^T does not depend
on the query, so one growing Cholesky factor (:class:`~indexer.gp.greedy.GreedyCholesky`) serves every
query; each step costs O(n_query * N + N * (|S| + k)). The entry point is
:meth:`~indexer.gp.surrogate.Surrogate.coreset`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from indexer.gp.greedy import GreedyCholesky
from indexer.gp.scores import information_gain_of_ratio

__all__ = ["CoresetResult", "coreset_information_gain", "summed_information_gain"]


@dataclass(frozen=True)
class CoresetResult:
    """A greedy coreset.

    Attributes:
        indices: `(m,)` int64 training rows, in the order chosen.
        marginal_gains: `(m,)` float64 nats, the summed objective's increase at each step.
        objective: `(m,)` float64 nats, sum over queries of IG(first j+1 picks | q).
    """

    indices: np.ndarray
    marginal_gains: np.ndarray
    objective: np.ndarray


def _information_gain(q: np.ndarray, k_qq: np.ndarray) -> np.ndarray:
    ratio = np.divide(q, k_qq, out=np.zeros_like(q), where=k_qq > 0)
    return information_gain_of_ratio(ratio)


def summed_information_gain(
    phi: np.ndarray, beta: np.ndarray, prior_precision: float, query_phi: np.ndarray
) -> float:
    """sum_q IG(S | q) of a whole subset S, computed directly (DESIGN.md 1.4), in nats.

    Args:
        phi: `(m, k)` features of S; beta: `(m,)`; prior_precision: tau; query_phi: `(n_query, k)`.

    Returns:
        nats (0 for an empty S).
    """
    if len(beta) == 0:
        return 0.0
    w = np.asarray(phi, dtype=np.float64) * (np.sqrt(beta) / np.sqrt(prior_precision))[:, None]
    queries = np.asarray(query_phi, dtype=np.float64)
    b = queries @ w.T / np.sqrt(prior_precision)  # (n_query, m)
    gram = np.eye(len(beta)) + w @ w.T
    q = np.einsum("qm,qm->q", b, np.linalg.solve(gram, b.T).T)
    return float(_information_gain(q, np.einsum("qk,qk->q", queries, queries) / prior_precision).sum())


def coreset_information_gain(
    phi: np.ndarray,
    beta: np.ndarray,
    prior_precision: float,
    query_phi: np.ndarray,
    size: int,
    progress: bool = False,
) -> CoresetResult:
    """Greedy coreset: at each step add the training example that raises sum_q IG(S | q) most.

    Ties go to the lowest row. The summed information gain is not submodular in general, so every
    candidate is re-evaluated at every step (no lazy evaluation); the shared Cholesky factor keeps a step at
    O(n_query * N + N * (|S| + k)).

    Args:
        phi: `(n_train, k)` training features.
        beta: `(n_train,)` likelihood weights.
        prior_precision: tau.
        query_phi: `(n_query, k)` features of the query set (e.g. a validation split).
        size: m, 1 <= m <= n_train.
        progress: show a progress bar over steps.

    Returns:
        :class:`CoresetResult`.

    Raises:
        ValueError: shapes disagree, no queries, or ``size`` outside [1, n_train].
    """
    phi64 = np.asarray(phi, dtype=np.float64)
    queries = np.asarray(query_phi, dtype=np.float64)
    n, k = phi64.shape
    if queries.ndim != 2 or queries.shape[1] != k or len(queries) == 0:
        raise ValueError(f"query_phi must be (n_query >= 1, {k}); got {queries.shape}")
    if np.shape(beta) != (n,):
        raise ValueError(f"beta must have shape ({n},); got {np.shape(beta)}")
    if not 1 <= size <= n:
        raise ValueError(f"size must be between 1 and the number of training examples {n}; got {size}")
    w = phi64 * (np.sqrt(beta) / np.sqrt(prior_precision))[:, None]  # (N, k)
    k_qq = np.einsum("qk,qk->q", queries, queries) / prior_precision
    state = GreedyCholesky(w, 1.0, queries @ w.T / np.sqrt(prior_precision), capacity=size)
    q_total = np.zeros(len(queries))
    current = float(_information_gain(q_total, k_qq).sum())
    indices, gains, objective = [], [], []
    for _ in tqdm(range(size), desc="coreset", disable=not progress, leave=False):
        # summed gain of each candidate: sum_q IG(Q_q + r_qj^2 / d_j) - IG(Q_q); members give -inf
        q_new = q_total[:, None] + state.gains()
        totals = _information_gain(q_new, np.broadcast_to(k_qq[:, None], q_new.shape)).sum(axis=0)
        totals[state.chosen] = -np.inf
        pick = int(np.argmax(totals))
        alpha = np.asarray(state.add(pick))  # (n_query,)
        q_total = q_total + alpha**2
        value = float(totals[pick])
        indices.append(pick)
        gains.append(value - current)
        objective.append(value)
        current = value
    return CoresetResult(np.asarray(indices, dtype=np.int64), np.asarray(gains), np.asarray(objective))
