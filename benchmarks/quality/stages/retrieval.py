"""Metric 3, ground truth planted in the training set: near-duplicates of queries, and mislabels.

Each stage trains a reference model on the planted training set and refits every method on it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from benchmarks.quality.metrics import found_in_top, mean_reciprocal_rank, recall_at, retrieval_ranks, roc_auc
from benchmarks.quality.setting import Planted, plant_mislabels, plant_near_duplicates, train_reference
from benchmarks.quality.stages.base import HarnessError, StageContext, log, raw_scores

__all__ = ["RECALL_CURVE_KS", "mislabel_stage", "near_duplicate_stage"]

RECALL_CURVE_KS = (1, 2, 5, 10, 20, 50)
"""The ranks k of the recall@k curve of the near-duplicate retrieval."""


def near_duplicate_stage(
    ctx: StageContext, methods: list[Any], damping: dict[str, float | None]
) -> dict[str, dict[str, Any]]:
    """Plant a near-duplicate of each of some queries and find it by each method's raw scores.

    Args:
        methods: the methods (refitted here); damping: method key -> tuned damping.

    Returns:
        method key -> ``{"recall@1", "recall@10", "mrr", "recall_curve": {str(k): recall}}``, each None
        with an ``error`` where the method failed.

    Raises:
        HarnessError: a planted copy does not carry its query's label or is not its nearest example.
    """
    config, queries = ctx.config, ctx.queries
    dup = plant_near_duplicates(ctx.train, queries, config)
    _check_planted_duplicates(dup, ctx)
    dup_model = train_reference(dup.train, config, ctx.model_name, seed=0)
    dup_queries = queries.subset(dup.query_rows)
    table: dict[str, dict[str, Any]] = {}
    for method in methods:
        method.fit(dup_model, dup.train.inputs, dup.train.targets)
        try:
            ranks = retrieval_ranks(raw_scores(method, dup_queries, damping[method.key]), dup.positions)
        except (RuntimeError, ValueError, np.linalg.LinAlgError) as exc:  # e.g. IF-CG's NaN guard
            log(f"{ctx.model_name}: retrieval with {method.key} failed: {exc}")
            table[method.key] = {
                "recall@1": None,
                "recall@10": None,
                "mrr": None,
                "error": str(exc),
            }
            table[method.key]["recall_curve"] = {str(k): None for k in RECALL_CURVE_KS}
            continue
        table[method.key] = {
            "recall@1": recall_at(ranks, 1),
            "recall@10": recall_at(ranks, 10),
            "mrr": mean_reciprocal_rank(ranks),
            "recall_curve": {str(k): recall_at(ranks, k) for k in RECALL_CURVE_KS},
        }
    return table


def mislabel_stage(
    ctx: StageContext, methods: list[Any], damping: dict[str, float | None]
) -> dict[str, dict[str, Any]]:
    """Flip some training labels and rank the training set by each method's self-scores.

    Args:
        methods: the methods (refitted here); damping: method key -> tuned damping.

    Returns:
        method key -> ``{"roc_auc", "found_in_top"}`` (share of the flipped found in the top
        ``found_fraction``), both None with an ``error`` where the method failed.

    Raises:
        HarnessError: the flips are not where recorded, or a method's self-scores are not finite.
    """
    config, train, n_train = ctx.config, ctx.train, ctx.n_train
    mis = plant_mislabels(train, config)
    if not np.array_equal(np.flatnonzero((mis.train.targets != train.targets).numpy()), mis.positions):
        raise HarnessError("the planted mislabels are not where the harness recorded them")
    mis_model = train_reference(mis.train, config, ctx.model_name, seed=0)
    flipped = np.zeros(n_train, dtype=bool)
    flipped[mis.positions] = True
    table: dict[str, dict[str, Any]] = {}
    for method in methods:
        method.fit(mis_model, mis.train.inputs, mis.train.targets)
        try:
            self_scores = np.asarray(method.self_scores(damping[method.key]), dtype=np.float64)
        except (RuntimeError, ValueError, np.linalg.LinAlgError) as exc:
            log(f"{ctx.model_name}: self-scores of {method.key} failed: {exc}")
            table[method.key] = {"roc_auc": None, "found_in_top": None, "error": str(exc)}
            continue
        if self_scores.shape != (n_train,) or not np.isfinite(self_scores).all():
            raise HarnessError(f"{method.key}: self-scores are not finite ({n_train},)")
        table[method.key] = {
            "roc_auc": roc_auc(self_scores, flipped),
            "found_in_top": found_in_top(self_scores, flipped, config.found_fraction),
        }
    return table


def _check_planted_duplicates(dup: Planted, ctx: StageContext) -> None:
    src = ctx.queries.subset(dup.query_rows)
    copies = dup.train.inputs[torch.from_numpy(dup.positions)]
    if not torch.equal(dup.train.targets[torch.from_numpy(dup.positions)], src.targets):
        raise HarnessError("planted near-duplicates do not carry their query's label")
    distance = (copies - src.inputs).norm(dim=1)
    others = torch.cdist(src.inputs, dup.train.inputs[: dup.positions[0]]).min(dim=1).values
    if not bool((distance < others).all()):
        raise HarnessError("a planted near-duplicate is not the nearest training example to its query")
