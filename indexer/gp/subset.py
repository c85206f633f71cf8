"""Group attribution: joint scores of a subset and their greedy maximisation (DESIGN.md 1.4).

Both joint scores are a monotone function of a quadratic form ``Q(S) = b_S^T G_SS^-1 b_S`` with a
positive-definite kernel over the candidate pool, written in the finite form of DESIGN.md 1.5
(D = diag(sqrt(beta))):

- information loss: G = I - (D U)(D U)^T, b = D c_q, IL(S) = 0.5 log(1 + Q / v_q);
  this is the Woodbury form of DESIGN.md 1.4 scaled by D on both sides.
- information gain: G = I + W W^T with W = D Phi / sqrt(tau), b = D Phi phi_q / tau,
  IG(S) = -0.5 log(1 - Q / k_qq), k_qq = |phi_q|^2 / tau.

Greedy selection grows the Cholesky factor of G_SS by one row per step (:class:`~indexer.gp.greedy.
GreedyCholesky`, shared with the coreset), so a step costs O(pool * (|S| + k)). The entry point is
:meth:`~indexer.gp.surrogate.Surrogate.greedy_subset` (and ``joint_score``), which feeds these functions
the surrogate's arrays for a set of candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import cho_factor, cho_solve

from indexer.enums import Objective, parse_enum
from indexer.gp.greedy import GreedyCholesky
from indexer.gp.scores import QueryTerms, information_gain_of_ratio

__all__ = [
    "GreedyResult",
    "joint_information_loss",
    "joint_information_gain",
    "joint_score",
    "greedy_subset",
]


@dataclass(frozen=True)
class GreedyResult:
    """A greedy subset.

    Attributes:
        indices: `(m,)` int64 positions in the candidate pool, in the order chosen.
        marginal_gains: `(m,)` float64 nats, the objective's increase at each step.
        joint: `(m,)` float64 nats, the objective of the first j+1 picks.
    """

    indices: np.ndarray
    marginal_gains: np.ndarray
    joint: np.ndarray


def _kernel_terms(
    objective: Objective,
    query: QueryTerms,
    phi: np.ndarray,
    whitened: np.ndarray,
    beta: np.ndarray,
    prior_precision: float,
) -> tuple[np.ndarray, float, np.ndarray, float]:
    """Return (V, sign, b, scale): G = I + sign V V^T, J = transform(Q) with ``scale`` (v_q or k_qq)."""
    d = np.sqrt(np.asarray(beta, dtype=np.float64))
    if objective is Objective.INFORMATION_LOSS:
        v = whitened * d[:, None]
        return v, -1.0, v @ query.whitened, query.posterior_variance
    phi64 = np.asarray(phi, dtype=np.float64)
    v = phi64 * (d / np.sqrt(prior_precision))[:, None]
    return v, 1.0, v @ query.phi / np.sqrt(prior_precision), query.phi_norm**2 / prior_precision


def _objective_of(objective: Objective, q: np.ndarray | float, scale: float) -> np.ndarray:
    q = np.asarray(q, dtype=np.float64)
    if scale <= 0:  # a zero query feature: nothing can change it
        return np.zeros_like(q)
    if objective is Objective.INFORMATION_LOSS:
        return 0.5 * np.log1p(q / scale)
    return information_gain_of_ratio(q / scale)


def joint_score(
    objective: Objective | str,
    query: QueryTerms,
    phi: np.ndarray,
    whitened: np.ndarray,
    beta: np.ndarray,
    prior_precision: float,
) -> float:
    """Joint information loss or gain of a whole subset S (DESIGN.md 1.4), in nats.

    Args:
        objective: ``"information_loss"`` or ``"information_gain"``.
        query: the query's terms.
        phi: `(m, k)` features of the subset's members.
        whitened: `(m, k)` float64 u_i of the members.
        beta: `(m,)` likelihood weights.
        prior_precision: tau.

    Returns:
        The joint score in nats (0 for an empty subset).

    Raises:
        ValueError: unknown objective.
    """
    obj = parse_enum(Objective, objective)
    if len(beta) == 0:
        return 0.0
    v, sign, b, scale = _kernel_terms(obj, query, phi, whitened, beta, prior_precision)
    gram = np.eye(len(b)) + sign * (v @ v.T)
    q = float(b @ cho_solve(cho_factor(gram, lower=True), b))
    return float(_objective_of(obj, q, scale))


def joint_information_loss(query: QueryTerms, whitened: np.ndarray, beta: np.ndarray) -> float:
    """IL(S) = 0.5 log(1 + c_S^T M_S^-1 c_S / v_q), M_S = diag(1/beta_S) - U_S U_S^T (DESIGN.md 1.4).

    Args:
        query: the query's terms; whitened: `(m, k)` u_i of S; beta: `(m,)`.

    Returns:
        nats.
    """
    return joint_score(Objective.INFORMATION_LOSS, query, whitened, whitened, beta, 1.0)


def joint_information_gain(
    query: QueryTerms, phi: np.ndarray, beta: np.ndarray, prior_precision: float
) -> float:
    """IG(S) = 0.5 log(k_qq / (k_qq - k_qS (K_SS + diag(1/beta_S))^-1 k_Sq)) (DESIGN.md 1.4).

    Args:
        query: the query's terms; phi: `(m, k)` features of S; beta: `(m,)`; prior_precision: tau.

    Returns:
        nats.
    """
    return joint_score(Objective.INFORMATION_GAIN, query, phi, phi, beta, prior_precision)


def greedy_subset(
    objective: Objective | str,
    query: QueryTerms,
    phi: np.ndarray,
    whitened: np.ndarray,
    beta: np.ndarray,
    prior_precision: float,
    size: int,
) -> GreedyResult:
    """Greedy maximisation of a joint score over a candidate pool, with incremental Cholesky updates.

    At each step the candidate with the largest marginal gain is added (ties: lowest pool position).
    Neither objective is submodular in general, so no lazy evaluation is used: the incremental update
    already costs only O(pool * (|S| + k)) per step.

    Args:
        objective: ``"information_loss"`` or ``"information_gain"``.
        query: the query's terms.
        phi: `(pool, k)` features; whitened: `(pool, k)` float64 u_i; beta: `(pool,)`.
        prior_precision: tau.
        size: m, number of members to choose, 1 <= m <= pool.

    Returns:
        :class:`GreedyResult`.

    Raises:
        ValueError: unknown objective, or ``size`` outside [1, pool].
    """
    obj = parse_enum(Objective, objective)
    pool = len(beta)
    if not 1 <= size <= pool:
        raise ValueError(f"size must be between 1 and the pool size {pool}; got {size}")
    v, sign, b, scale = _kernel_terms(obj, query, phi, whitened, beta, prior_precision)
    state = GreedyCholesky(v, sign, b, capacity=size)
    indices, gains, joint = [], [], []
    q_total = 0.0
    current = 0.0
    for _ in range(size):
        delta_q = state.gains()
        pick = int(np.argmax(delta_q))
        q_total += float(delta_q[pick])
        state.add(pick)
        value = float(_objective_of(obj, q_total, scale))
        indices.append(pick)
        gains.append(value - current)
        joint.append(value)
        current = value
    return GreedyResult(np.asarray(indices, dtype=np.int64), np.asarray(gains), np.asarray(joint))
