"""Metric 1: the linear datamodeling score (LDS) of every method, with its noise ceiling.

M random subsets at ``lds_alpha`` are retrained once each (a different seed per subset); a sample of
``ceiling_subsets`` of them is retrained with a second seed, and the Spearman correlation between the two
retrains of a subset is the ceiling a perfect attribution could reach (:mod:`benchmarks.quality.lds`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from benchmarks.quality.lds import lds, per_query_spearman, random_subsets
from benchmarks.quality.metrics import margins as np_margins
from benchmarks.quality.stages.base import HarnessError, StageContext, log, signed_scores

__all__ = ["LdsRetrains", "evaluation_scores", "lds_retrains", "lds_table"]


@dataclass(frozen=True)
class LdsRetrains:
    """The LDS subsets and the margins of their retrains on the whole test split.

    Attributes:
        masks: `(M, n_train)` bool subsets; margins: `(M, n_test)` margins of their retrains;
        ceiling_margins: `(ceiling_subsets, n_test)` margins of the first subsets' second-seed retrains.
    """

    masks: np.ndarray
    margins: np.ndarray
    ceiling_margins: np.ndarray


def lds_retrains(ctx: StageContext) -> LdsRetrains:
    """Draw the LDS subsets and retrain them (seed m for subset m; 10,000 + m for the ceiling's)."""
    config = ctx.config
    masks = random_subsets(ctx.n_train, config.lds_subsets, config.lds_alpha, seed=config.seed + 10)
    jobs = ctx.retrains()
    lds_rows = jobs.add(masks, range(config.lds_subsets))  # a different seed per subset
    # the noise ceiling: the same subsets retrained with a second seed each
    ceiling_rows = jobs.add(
        masks[: config.ceiling_subsets], [10_000 + m for m in range(config.ceiling_subsets)]
    )
    log(f"{ctx.model_name}: {len(jobs.masks)} LDS retrains")
    logits = jobs.run(f"{ctx.model_name} LDS retrains")
    return LdsRetrains(
        masks, np_margins(logits[lds_rows], ctx.labels), np_margins(logits[ceiling_rows], ctx.labels)
    )


def evaluation_scores(
    ctx: StageContext, methods: list[Any], damping: dict[str, float | None]
) -> dict[str, np.ndarray]:
    """Each method's signed scores of the evaluation queries at its tuned damping.

    Returns:
        method key -> `(n_eval, n_train)` float64.

    Raises:
        HarnessError: a method's scores have another shape or are not finite.
    """
    n_eval = len(ctx.evaluation)
    signed: dict[str, np.ndarray] = {}
    for method in methods:
        signed[method.key] = signed_scores(method, ctx.evaluation, damping[method.key])
        if signed[method.key].shape != (n_eval, ctx.n_train) or not np.isfinite(signed[method.key]).all():
            raise HarnessError(f"{method.key}: scores are not finite ({n_eval}, {ctx.n_train})")
    return signed


def lds_table(ctx: StageContext, signed: dict[str, np.ndarray], retrains: LdsRetrains) -> dict[str, Any]:
    """The LDS of each method on the evaluation queries, and the noise ceiling.

    Args:
        signed: method key -> `(n_eval, n_train)` signed scores (:func:`evaluation_scores`).

    Returns:
        ``{"noise_ceiling": {"mean", "n_excluded", "n_subsets"}, "methods": {key: {"mean", "sem",
        "n_excluded"}}}``; ``sem`` is the standard error of the mean over the queries with a defined LDS.
    """
    config, eval_rows = ctx.config, ctx.queries.eval_rows
    eval_out = retrains.margins[:, eval_rows]
    ceiling = per_query_spearman(
        retrains.ceiling_margins[:, eval_rows], retrains.margins[: config.ceiling_subsets][:, eval_rows]
    )
    table: dict[str, Any] = {
        "noise_ceiling": {
            "mean": ceiling.mean,
            "n_excluded": ceiling.n_excluded,
            "n_subsets": config.ceiling_subsets,
        },
        "methods": {},
    }
    for key, s in signed.items():
        res = lds(s, retrains.masks, eval_out)
        finite = res.per_query[np.isfinite(res.per_query)]
        sem = float(finite.std(ddof=1) / math.sqrt(len(finite))) if len(finite) > 1 else float("nan")
        table["methods"][key] = {"mean": res.mean, "sem": sem, "n_excluded": res.n_excluded}
    return table
