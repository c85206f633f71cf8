"""Metric 2: counterfactual removal of each method's top-k proponents (and of k random examples)."""

from __future__ import annotations

import numpy as np

from benchmarks.quality.stages.base import HarnessError, StageContext, accuracy
from benchmarks.quality.stages.removal import removal_retrains, top_k_masks, with_random_floor

__all__ = ["counterfactual_stage", "full_retrain_accuracy"]


def counterfactual_stage(
    ctx: StageContext, signed_cf: dict[str, np.ndarray]
) -> tuple[dict[str, dict[str, dict[str, float]]], np.ndarray]:
    """Remove each method's top-k proponents for each counterfactual query and retrain.

    Args:
        signed_cf: method key -> `(n_counterfactual, n_train)` signed scores of the counterfactual queries.

    Returns:
        ``(table, base_full)``: str(k) -> method (and ``random``) -> summary; `(S, n_test, C)` logits of
        the full-data retrains, one per seed.
    """
    config = ctx.config
    sets = {
        key: {k: top_k_masks(s, k, ctx.n_train) for k in config.removal_sizes}
        for key, s in with_random_floor(ctx, signed_cf).items()
    }
    summaries, base_full = removal_retrains(
        ctx,
        sets,
        ctx.queries.eval_rows[: config.n_counterfactual],
        "counterfactual",
        "counterfactual retrains",
    )
    table = {str(k): {name: summaries[name][k] for name in sets} for k in config.removal_sizes}
    return table, base_full


def full_retrain_accuracy(
    ctx: StageContext, base_full: np.ndarray, reference_logits: np.ndarray
) -> list[float]:
    """Held-out accuracy of each seed's full-data retrain, after checking seed 0 against the reference.

    Args:
        base_full: `(S, n_test, C)` logits of :func:`counterfactual_stage`; reference_logits:
            `(n_test, C)` logits of the reference model (trained with seed 0 on the same data).

    Returns:
        One accuracy in [0, 1] per seed.

    Raises:
        HarnessError: the seed-0 retrain differs from the reference model on the counterfactual queries.
    """
    held, cf_rows = ctx.queries.heldout_rows, ctx.queries.eval_rows[: ctx.config.n_counterfactual]
    accuracies = [float(a) for a in accuracy(base_full[:, held], ctx.labels[held])]
    if not np.allclose(base_full[0][cf_rows], reference_logits[cf_rows], atol=1e-4):
        raise HarnessError("the seed-0 full retrain differs from the reference model")
    return accuracies
