"""Single-example attribution scores and their vector-database form (DESIGN.md 1.3, 1.5).

The formulas, on explicit arrays; :class:`~indexer.gp.surrogate.Surrogate` feeds them its own arrays
(``surrogate.scores(query, ids)``, ``surrogate.score_vectors(score)``). Every formula is written so that
saturated examples (beta_i -> 0) and zero features give 0, never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from indexer.enums import Score

__all__ = [
    "QueryTerms",
    "example_scores",
    "signed_score",
    "score_vectors",
    "query_vector",
    "score_from_inner",
    "scan_query_vector",
    "scan_weights",
    "information_gain_of_ratio",
    "safe_div",
]


@dataclass(frozen=True)
class QueryTerms:
    """What the scores need of one query (DESIGN.md 1.2), made by
    :meth:`~indexer.gp.surrogate.Surrogate.query_terms`.

    Attributes:
        phi: `(k,)` float64 projected tangent feature phi_q.
        whitened: `(k,)` float64 u_q = L^-1 phi_q.
        posterior_variance: v_q = |u_q|^2, posterior variance of f_q (output units squared).
        phi_norm: |phi_q|.
        precision_phi: `(k,)` float64 A^-1 phi_q = L^-T u_q, so that the posterior covariance
            c_qi = u_q . u_i = phi_i . A^-1 phi_q is one inner product with the stored feature (DESIGN.md 2.1:
            no whitened copy of the features is kept).
    """

    phi: np.ndarray
    whitened: np.ndarray
    posterior_variance: float
    phi_norm: float
    precision_phi: np.ndarray


def safe_div(num: np.ndarray, den: np.ndarray | float) -> np.ndarray:
    """``num / den`` in float64, 0 where ``den <= 0`` (DESIGN.md 1.5: a zero vector scores 0, never NaN).

    Args:
        num: `(...)` numerators; den: denominators broadcastable to ``num``'s shape.

    Returns:
        `(...)` float64, the shape of ``num``.
    """
    den_arr = np.broadcast_to(np.asarray(den, dtype=np.float64), np.shape(num))
    out = np.zeros(np.shape(num), dtype=np.float64)
    np.divide(num, den_arr, out=out, where=den_arr > 0)
    return out


def information_gain_of_ratio(ratio: np.ndarray) -> np.ndarray:
    """-0.5 log(1 - rho), the information gain of a squared correlation rho in [0, 1), in nats.

    Every information gain of DESIGN.md 1.3 and 1.4 has this form (rho = k_qS (K_SS + B^-1)^-1 k_Sq / k_qq).
    rho < 1 whenever tau > 0 (Cauchy-Schwarz); the clip at 1 - 1e-16 only guards the last float64 ulp.

    Args:
        ratio: `(...)` float64 rho.

    Returns:
        `(...)` float64 nats.
    """
    return -0.5 * np.log1p(-np.minimum(ratio, 1.0 - 1e-16))


def example_scores(
    query: QueryTerms,
    *,
    phi: np.ndarray,
    beta: np.ndarray,
    grad_term: np.ndarray,
    s: np.ndarray,
    prior_precision: float,
) -> dict[Score, np.ndarray]:
    """Every score of DESIGN.md 1.3 for one query and a set of training examples, in float64.

    - information_loss = 0.5 log(1 + beta_i c_qi^2 / (v_q s_i))   (nats)
    - information_gain = -0.5 log(1 - beta_i (phi_q.phi_i)^2 / (|phi_q|^2 (beta_i |phi_i|^2 + tau)))   (nats)
    - influence = c_qi beta_i r_i / s_i   (output units)
    - inner_product = phi_q.phi_i ; cosine = phi_q.phi_i / (|phi_q| |phi_i|)

    Args:
        query: the query's :class:`QueryTerms`.
        phi: `(m, k)` features of the examples (any float dtype; used in float64). The posterior covariance
            c_qi = u_q . u_i is computed as phi_i . A^-1 phi_q (``query.precision_phi``).
        beta: `(m,)` likelihood weights.
        grad_term: `(m,)` beta_i r_i.
        s: `(m,)` one minus leverage (already clamped).
        prior_precision: tau.

    Returns:
        ``{Score: (m,) float64}`` for all five scores.
    """
    phi64 = np.asarray(phi, dtype=np.float64)
    # einsum, not a BLAS product: an example's score must not depend on which other rows are scored with
    # it (a matrix-vector product's kernel, and so its last bits, changes with the number of rows; a
    # deepening or a batch reranks other sets of rows than a single query at another depth)
    c = np.einsum("ij,j->i", phi64, query.precision_phi)
    x = np.einsum("ij,j->i", phi64, query.phi)
    phi_norm = np.linalg.norm(phi64, axis=1)
    information_loss = 0.5 * np.log1p(safe_div(beta * c**2, query.posterior_variance * s))
    ratio = safe_div(beta * x**2, query.phi_norm**2 * (beta * phi_norm**2 + prior_precision))
    information_gain = information_gain_of_ratio(ratio)
    return {
        Score.INFORMATION_LOSS: information_loss,
        Score.INFORMATION_GAIN: information_gain,
        Score.INFLUENCE: c * grad_term / s,
        Score.INNER_PRODUCT: x,
        Score.COSINE: safe_div(x, query.phi_norm * phi_norm),
    }


def signed_score(score: Score, scores: dict[Score, np.ndarray]) -> np.ndarray:
    """The score with a direction: signed scores as they are, unsigned ones times sign(influence).

    Args:
        score: which score.
        scores: output of :func:`example_scores`.

    Returns:
        `(m,)` float64; positive for proponents, negative for opponents (DESIGN.md 1.3).
    """
    if score.signed:
        return scores[score]
    return np.sign(scores[Score.INFLUENCE]) * scores[score]


def score_vectors(
    score: Score,
    *,
    phi: np.ndarray,
    whitened: np.ndarray | None,
    beta: np.ndarray,
    grad_term: np.ndarray,
    s: np.ndarray,
    prior_precision: float,
) -> np.ndarray:
    """Per-example vectors z_i such that the score is monotone in <a_q, z_i> (DESIGN.md 1.3).

    - information_loss: z_i = u_i sqrt(beta_i / s_i)
    - information_gain: z_i = sqrt(beta_i) phi_i / sqrt(beta_i |phi_i|^2 + tau)
    - influence: z_i = u_i beta_i r_i / s_i
    - inner_product: z_i = phi_i ; cosine: z_i = phi_i / |phi_i| (0 for a zero feature)

    Args:
        score: which score.
        phi: `(n, k)` features; whitened: `(n, k)` u_i (needed by information_loss and influence only, None
            otherwise); beta, grad_term, s: `(n,)`; prior_precision: tau.

    Returns:
        `(n, k)` float64 vectors.
    """
    phi64 = np.asarray(phi, dtype=np.float64)
    if score in (Score.INFORMATION_LOSS, Score.INFLUENCE) and whitened is None:
        raise ValueError(f"the {score.value} vectors need the whitened features")
    if score is Score.INFORMATION_LOSS:
        return whitened * np.sqrt(beta / s)[:, None]
    if score is Score.INFORMATION_GAIN:
        norm2 = np.einsum("nk,nk->n", phi64, phi64)
        return phi64 * (np.sqrt(beta) / np.sqrt(beta * norm2 + prior_precision))[:, None]
    if score is Score.INFLUENCE:
        return whitened * (grad_term / s)[:, None]
    if score is Score.INNER_PRODUCT:
        return phi64
    norm = np.linalg.norm(phi64, axis=1)
    return phi64 * safe_div(np.ones_like(norm), norm)[:, None]


def query_vector(score: Score, query: QueryTerms) -> np.ndarray:
    """The query side a_q of :func:`score_vectors`.

    Returns:
        `(k,)` float64: u_q for information_loss and influence, phi_q for information_gain and
        inner_product, phi_q / |phi_q| for cosine (0 for a zero query).
    """
    if score in (Score.INFORMATION_LOSS, Score.INFLUENCE):
        return query.whitened
    if score is Score.COSINE:
        return query.phi / query.phi_norm if query.phi_norm > 0 else np.zeros_like(query.phi)
    return query.phi


def score_from_inner(score: Score, inner: np.ndarray, query: QueryTerms) -> np.ndarray:
    """Map x = <a_q, z_i> to the score; monotone in x (signed scores) or in |x| (unsigned ones).

    Args:
        score: which score.
        inner: `(m,)` inner products x.
        query: the query's terms.

    Returns:
        `(m,)` float64 scores, equal to :func:`example_scores` up to rounding.
    """
    x = np.asarray(inner, dtype=np.float64)
    if score is Score.INFORMATION_LOSS:
        return 0.5 * np.log1p(safe_div(x**2, np.full_like(x, query.posterior_variance)))
    if score is Score.INFORMATION_GAIN:
        return information_gain_of_ratio(safe_div(x**2, np.full_like(x, query.phi_norm**2)))
    return x


def scan_query_vector(score: Score, query: QueryTerms) -> np.ndarray:
    """The query vector b_q of the scan form ``x_i = w_i <b_q, phi_i>`` (DESIGN.md 2.1).

    Returns:
        `(k,)` float64: A^-1 phi_q for information_loss and influence, phi_q for information_gain and
        inner_product, phi_q / |phi_q| for cosine (0 for a zero query).
    """
    if score in (Score.INFORMATION_LOSS, Score.INFLUENCE):
        return query.precision_phi
    return query_vector(score, query)


def scan_weights(
    score: Score,
    *,
    beta: np.ndarray,
    grad_term: np.ndarray,
    s: np.ndarray,
    phi_norm: np.ndarray,
    prior_precision: float,
) -> np.ndarray:
    """Per-example weights w_i of the scan form: ``x_i = w_i <b_q, phi_i>`` equals the vector form's
    <a_q, z_i> (DESIGN.md 1.3, 2.1), so :func:`score_from_inner` maps it to the score; every score's exact
    top-k is one scan of the stored features.

    - information_loss: w_i = sign(beta_i r_i) sqrt(beta_i / s_i) (|x_i| = |<u_q, z_i>|; the sign of x_i is
      the sign of the influence, so x_i is the information loss's signed key)
    - information_gain: w_i = sqrt(beta_i) / sqrt(beta_i |phi_i|^2 + tau)
    - influence: w_i = beta_i r_i / s_i ; inner_product: 1 ; cosine: 1 / |phi_i| (0 for a zero feature)

    Args:
        score: which score.
        beta, grad_term, s: `(n,)` float64 per-example terms; phi_norm: `(n,)` |phi_i|; prior_precision: tau.

    Returns:
        `(n,)` float64 weights.
    """
    if score is Score.INFORMATION_LOSS:
        return np.sign(grad_term) * np.sqrt(beta / s)
    if score is Score.INFORMATION_GAIN:
        return np.sqrt(beta) / np.sqrt(beta * phi_norm**2 + prior_precision)
    if score is Score.INFLUENCE:
        return grad_term / s
    if score is Score.INNER_PRODUCT:
        return np.ones_like(phi_norm, dtype=np.float64)
    return safe_div(np.ones_like(phi_norm, dtype=np.float64), phi_norm)
