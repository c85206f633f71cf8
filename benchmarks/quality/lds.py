"""Linear datamodeling score (LDS) and its noise ceiling.

LDS (Park et al., TRAK, 2023): draw M random subsets of the training set, retrain a model on each and
record its output (here the margin) on every query. An attribution method predicts the output on a
subset as the sum of its scores over the subset's examples; its LDS for a query is the Spearman rank
correlation, across the M subsets, between predicted and actual outputs, averaged over queries.

A query whose predictions or outputs are constant across subsets has no defined correlation; it is
excluded from the mean and counted in :attr:`CorrelationSummary.n_excluded`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

__all__ = ["CorrelationSummary", "random_subsets", "per_query_spearman", "lds", "noise_ceiling"]


@dataclass(frozen=True)
class CorrelationSummary:
    """Per-query correlations and their mean.

    Attributes:
        mean: mean over the queries with a defined correlation (NaN if none).
        per_query: `(n_query,)` float64 correlations, NaN where undefined (a constant column).
        n_excluded: number of NaN entries left out of the mean.
    """

    mean: float
    per_query: np.ndarray
    n_excluded: int


def random_subsets(n_train: int, n_subsets: int, alpha: float, seed: int) -> np.ndarray:
    """Random training subsets, each of exactly ``round(alpha * n_train)`` examples.

    Args:
        n_train: training-set size; n_subsets: M; alpha: fraction kept, in (0, 1]; seed: numpy seed.

    Returns:
        `(n_subsets, n_train)` bool masks.

    Raises:
        ValueError: alpha outside (0, 1] or a subset size of 0.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must lie in (0, 1]; got {alpha}")
    size = round(alpha * n_train)
    if size < 1:
        raise ValueError(f"alpha {alpha} of {n_train} examples leaves empty subsets")
    rng = np.random.default_rng(seed)
    masks = np.zeros((n_subsets, n_train), dtype=bool)
    for m in range(n_subsets):
        masks[m, rng.choice(n_train, size=size, replace=False)] = True
    return masks


def per_query_spearman(a: np.ndarray, b: np.ndarray) -> CorrelationSummary:
    """Spearman correlation of column q of ``a`` with column q of ``b``, for every q.

    Args:
        a, b: `(M, n_query)` arrays (M subsets/observations per query).

    Returns:
        The per-query correlations (NaN where either column is constant) and their mean.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"expected two (M, n_query) arrays of one shape; got {a.shape} and {b.shape}")
    ra = rankdata(a, axis=0)
    rb = rankdata(b, axis=0)
    ra -= ra.mean(0)
    rb -= rb.mean(0)
    denom = np.sqrt((ra * ra).sum(0) * (rb * rb).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.where(denom > 0, (ra * rb).sum(0) / np.where(denom > 0, denom, 1.0), np.nan)
    valid = ~np.isnan(corr)
    mean = float(corr[valid].mean()) if valid.any() else float("nan")
    return CorrelationSummary(mean=mean, per_query=corr, n_excluded=int((~valid).sum()))


def lds(scores: np.ndarray, masks: np.ndarray, outputs: np.ndarray) -> CorrelationSummary:
    """Linear datamodeling score of attribution scores.

    Args:
        scores: `(n_query, n_train)` attribution scores (score of training example i for query q).
        masks: `(M, n_train)` bool subsets the models were retrained on.
        outputs: `(M, n_query)` output (margin) of the model retrained on subset m at query q.

    Returns:
        Per-query Spearman correlation between ``masks @ scores.T`` `(M, n_query)` and ``outputs``,
        and its mean over queries (constant columns excluded and counted).
    """
    scores = np.asarray(scores, dtype=np.float64)
    masks = np.asarray(masks)
    if masks.ndim != 2 or scores.ndim != 2 or scores.shape[1] != masks.shape[1]:
        raise ValueError(
            f"scores (n_query, n_train) {scores.shape} and masks (M, n_train) {masks.shape} disagree"
        )
    if np.shape(outputs) != (masks.shape[0], scores.shape[0]):
        raise ValueError(
            f"outputs must be (M, n_query) = {(masks.shape[0], scores.shape[0])}; got {np.shape(outputs)}"
        )
    predicted = masks.astype(np.float64) @ scores.T  # (M, n_query)
    return per_query_spearman(predicted, outputs)


def noise_ceiling(outputs_seed_a: np.ndarray, outputs_seed_b: np.ndarray) -> CorrelationSummary:
    """How well one retrain seed predicts another on the same subsets: an upper reference for LDS.

    Args:
        outputs_seed_a, outputs_seed_b: `(M, n_query)` outputs of models retrained on the same M subsets
            with two different seeds.

    Returns:
        Per-query Spearman correlation between the two, and its mean over queries.
    """
    return per_query_spearman(outputs_seed_a, outputs_seed_b)
