"""Issue #4's coreset: train from scratch on m chosen examples with the full run's number of steps.

Chosen sets: the greedy information-gain coreset over the validation queries, the top-m of every
method's summed validation scores, k-center greedy on the features, and m random examples; each model
is tested on the held-out test rows.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from benchmarks.quality.metrics import k_center_greedy, measure_cost
from benchmarks.quality.stages.base import (
    RANDOM,
    StageContext,
    accuracy,
    cost_record,
    infotrace_features,
    log,
    raw_scores,
)
from indexer.enums import Score

__all__ = ["coreset_stage"]


def coreset_stage(
    ctx: StageContext, methods: list[Any], damping: dict[str, float | None]
) -> tuple[dict[str, float], dict[str, Any]]:
    """Select each coreset, retrain on it with every seed and measure held-out accuracy.

    A coreset of ``size`` trains for ``ceil(steps_full / ceil(size / batch_size))`` epochs, so it takes
    as many optimiser steps as the full-data model.

    Args:
        methods: the fitted methods; damping: method key -> tuned damping.

    Returns:
        ``(selection_cost, table)``: the greedy selection's ``{"wall_s": seconds, "peak_rss_bytes":
        bytes}``, and f"{fraction:g}" -> ``{"size", "epochs", "methods": name -> {"accuracy_mean",
        "accuracy_sd"}}``.
    """
    config, n_train, validation = ctx.config, ctx.n_train, ctx.validation
    info = infotrace_features(methods)
    phi_train = info.train.phi
    tau_ig = damping[f"infotrace_{Score.INFORMATION_GAIN.value}"]
    sizes = [max(1, round(f * n_train)) for f in config.coreset_fractions]
    val_phi = info.query_phi(validation.inputs, validation.targets)
    log(
        f"{ctx.model_name}: greedy information-gain coreset of {max(sizes)}"
        f" over {len(validation)} validation queries"
    )
    with measure_cost() as c:
        core = info.surrogate(float(tau_ig)).coreset(val_phi, max(sizes), progress=True)
    rankings: dict[str, np.ndarray] = {}
    for method in methods:
        summed = raw_scores(method, validation, damping[method.key]).sum(0)
        rankings[method.key] = np.argsort(-summed, kind="stable")
    kcenter = k_center_greedy(phi_train.astype(np.float64), max(sizes), seed=config.seed)
    steps_full = config.epochs * math.ceil(n_train / config.batch_size)
    table: dict[str, Any] = {}
    for fraction, size in zip(config.coreset_fractions, sizes, strict=True):
        epochs = math.ceil(steps_full / math.ceil(size / config.batch_size))
        chosen = {
            "greedy_information_gain": core.indices[:size],
            "k_center_greedy": kcenter[:size],
            **{key: r[:size] for key, r in rankings.items()},
        }
        rng = np.random.default_rng(config.seed + 30)
        chosen[RANDOM] = rng.choice(n_train, size=size, replace=False)
        table[f"{fraction:g}"] = {
            "size": size,
            "epochs": epochs,
            "methods": _coreset_accuracy(ctx, chosen, epochs, f"{fraction:.0%}"),
        }
    return cost_record(c), table


def _coreset_accuracy(
    ctx: StageContext, chosen: dict[str, np.ndarray], epochs: int, label: str
) -> dict[str, dict[str, float]]:
    """Train on each chosen set with every seed; name -> held-out accuracy mean and sd over seeds."""
    n_train, seeds = ctx.n_train, list(range(ctx.config.n_seeds))
    jobs = ctx.retrains(epochs=epochs)
    slots = {}
    for name, members in chosen.items():
        mask = np.zeros((1, n_train), dtype=bool)
        mask[0, members] = True
        for s in seeds:
            slots[(name, s)] = jobs.add(mask, s)
    logits = jobs.run(f"{ctx.model_name} coreset {label} retrains")
    held, labels = ctx.queries.heldout_rows, ctx.labels
    table = {}
    for name in chosen:
        acc = np.array([accuracy(logits[slots[(name, s)]][0][held], labels[held]) for s in seeds])
        table[name] = {
            "accuracy_mean": float(acc.mean()),
            "accuracy_sd": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
        }
    return table
