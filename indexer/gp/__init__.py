"""The Gaussian-process surrogate and its scores (DESIGN.md 1.1-1.5): fit, single-example scores, joint
scores and greedy subsets, coresets. :class:`Surrogate` is the entry point; its methods call the formulas
of the other modules with its own arrays."""

from __future__ import annotations

from indexer.gp.coreset import CoresetResult, coreset_information_gain, summed_information_gain
from indexer.gp.greedy import GreedyCholesky
from indexer.gp.scores import (
    QueryTerms,
    example_scores,
    information_gain_of_ratio,
    query_vector,
    score_from_inner,
    score_vectors,
    signed_score,
)
from indexer.gp.subset import (
    GreedyResult,
    greedy_subset,
    joint_information_gain,
    joint_information_loss,
    joint_score,
)
from indexer.gp.surrogate import S_FLOOR, Surrogate, default_prior_precision, fit_surrogate

__all__ = [
    "CoresetResult",
    "GreedyCholesky",
    "GreedyResult",
    "QueryTerms",
    "S_FLOOR",
    "Surrogate",
    "coreset_information_gain",
    "default_prior_precision",
    "example_scores",
    "fit_surrogate",
    "greedy_subset",
    "information_gain_of_ratio",
    "joint_information_gain",
    "joint_information_loss",
    "joint_score",
    "query_vector",
    "score_from_inner",
    "score_vectors",
    "signed_score",
    "summed_information_gain",
]
