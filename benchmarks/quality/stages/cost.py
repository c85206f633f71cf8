"""Metric 4: wall time and peak memory of featurizing the training set and of scoring the queries."""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.quality.infotrace_method import InfotraceFeatures, InfotraceMethod
from benchmarks.quality.metrics import measure_cost
from benchmarks.quality.stages.base import StageContext, cost_record, harness_methods, log, signed_scores

__all__ = ["cost_stage"]


def cost_stage(
    ctx: StageContext, reference: torch.nn.Module, damping: dict[str, float | None]
) -> dict[str, dict[str, Any]]:
    """Metric 4 on fresh adapters: featurize the training set, then score the evaluation queries.

    Each method (each infotrace score too) gets its own fresh adapter, so nothing is shared or cached
    between rows; a package that applies its damping while caching (dattri TRAK) or re-finalizes for it
    (traker) pays for that in ``score``, and methods that cache nothing pay everything there, so
    ``total_s`` is the comparable figure.

    Args:
        reference: the trained reference model; damping: method key -> the damping to score with.

    Returns:
        method key -> {"featurize": cost, "score": cost, "total_s": seconds}; a cost is
        ``{"wall_s": seconds, "peak_rss_bytes": bytes}`` (the score's also has ``n_queries``).
    """
    config, train, evaluation = ctx.config, ctx.train, ctx.evaluation
    cost: dict[str, dict[str, Any]] = {}
    for method in harness_methods(config):
        if isinstance(method, InfotraceMethod):
            method = InfotraceMethod(
                method.score, InfotraceFeatures(config.k, config.seed, method.features.projection)
            )
        log(f"{ctx.model_name}: cost of {method.key}")
        with measure_cost() as fit_cost:
            method.fit(reference, train.inputs, train.targets)
        with measure_cost() as score_cost:
            signed_scores(method, evaluation, damping[method.key])
        cost[method.key] = {
            "featurize": cost_record(fit_cost),
            "score": dict(cost_record(score_cost), n_queries=len(evaluation)),
            "total_s": round(fit_cost.wall_s + score_cost.wall_s, 3),
        }
        if hasattr(method, "close"):
            method.close()
    return cost
