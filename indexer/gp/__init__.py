"""The Gaussian-process surrogate and its scores (DESIGN.md 1.1-1.5). :class:`Surrogate` is the entry point;
its methods call the formulas of the other modules with its own arrays.

Which function implements which formula (DESIGN.md section: function):

- 1.1 the output m, beta_i and beta_i r_i: :class:`indexer.features.tasks.ClassificationMargin` and
  ``RegressionOutput`` (``output``, ``likelihood_weight``, ``grad_term``); phi = R^T g:
  :mod:`indexer.features.projection` applied by :func:`indexer.features.stream.tangent_features`;
  tau = trace(Phi^T B Phi) / k: :func:`surrogate.default_prior_precision`.
- 1.2 A = tau I + Phi^T B Phi = L L^T, u_i = L^-1 phi_i, h_i, s_i: :func:`surrogate.fit_surrogate`;
  u_q and v_q of a query: :meth:`Surrogate.query_terms`; the entropy of f_q, 0.5 log(2 pi e v_q):
  :func:`indexer.features.tasks.gaussian_entropy`.
- 1.3 information loss, information gain, influence, the baselines: :func:`scores.example_scores`
  (through :meth:`Surrogate.scores`); the sign of influence for the unsigned scores:
  :func:`scores.signed_score`; the vector form z_i and a_q and the score from <a_q, z_i>:
  :func:`scores.score_vectors`, :func:`scores.query_vector`, :func:`scores.score_from_inner`.
- 1.4 joint IL(S) and IG(S): :func:`subset.joint_information_loss`, :func:`subset.joint_information_gain`,
  both through :func:`subset.joint_score` (:meth:`Surrogate.joint_score`); the greedy subset:
  :func:`subset.greedy_subset` (:meth:`Surrogate.greedy_subset`) with the incremental Cholesky step
  :class:`greedy.GreedyCholesky`, shared by the coreset :func:`coreset.coreset_information_gain`
  (:meth:`Surrogate.coreset`), whose objective is :func:`coreset.summed_information_gain`.
- 1.5 the finite forms: :func:`scores.safe_div`, :func:`scores.information_gain_of_ratio`; the floor on s_i:
  :data:`S_FLOOR`.
"""

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
