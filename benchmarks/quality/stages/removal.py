"""Removal sets and their retrains, shared by the counterfactual and the group-counterfactual stages.

A removal set is given as a keep-mask `(n_query, n_train)` (False = removed); each is retrained with
several seeds and compared with the full-data retrain of the same seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from benchmarks.quality.metrics import counterfactual_summary
from benchmarks.quality.metrics import margins as np_margins
from benchmarks.quality.stages.base import RANDOM, Retrains, StageContext, log, random_scores

__all__ = [
    "removal_masks",
    "removal_retrains",
    "removal_summaries",
    "top_k",
    "top_k_masks",
    "with_random_floor",
]

Summaries = dict[str, dict[int, dict[str, float]]]
"""Set name -> set size -> summary (the fields of ``counterfactual_summary`` and ``abs_margin_change``)."""


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """`(n_query, k)` columns of each row's k highest scores, highest first (ties: lowest column first)."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def top_k_masks(scores: np.ndarray, k: int, n_train: int) -> np.ndarray:
    """Masks `(n_query, n_train)` keeping all but each row's k highest scores (stable: lowest row first)."""
    masks = np.ones((len(scores), n_train), dtype=bool)
    np.put_along_axis(masks, top_k(scores, k), False, axis=1)
    return masks


def removal_masks(sets: Sequence[np.ndarray], n_train: int) -> np.ndarray:
    """Masks `(len(sets), n_train)` keeping all but the members of each set."""
    masks = np.ones((len(sets), n_train), dtype=bool)
    for row, members in enumerate(sets):
        masks[row, members] = False
    return masks


def with_random_floor(ctx: StageContext, signed_cf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The methods' signed scores `(n_counterfactual, n_train)`, then :data:`RANDOM`'s seeded noise."""
    return {**signed_cf, RANDOM: random_scores(ctx.config, ctx.n_train)}


def removal_summaries(
    jobs: Retrains,
    sets: dict[str, dict[int, np.ndarray]],
    seeds: Sequence[int],
    rows: np.ndarray,
    labels: np.ndarray,
    desc: str,
) -> tuple[Summaries, np.ndarray]:
    """Retrain without each set (per query, per seed) and summarise against the full retrain.

    Args:
        jobs: an empty job list; sets: name -> size -> `(n_q, n_train)` keep-masks (False = removed);
        seeds: retrain seeds; rows: `(n_q,)` test rows of the queries; labels: `(n_test,)` labels.

    Returns:
        ``(summaries, base_full)``: name -> size -> summary dict, and `(S, n_test, C)` full-data logits.
    """
    n_train = len(jobs.train)
    base_rows = [jobs.add(np.ones((1, n_train), dtype=bool), s) for s in seeds]
    slots = {
        (name, size, s): jobs.add(masks, s)
        for name, by in sets.items()
        for size, masks in by.items()
        for s in seeds
    }
    logits = jobs.run(desc)
    base_full = np.stack([logits[base_rows[s]][0] for s in range(len(seeds))])
    base = base_full[:, rows]  # (S, n_q, C)
    q_labels = labels[rows]
    out: Summaries = {}
    for name, size in ((name, size) for name, by in sets.items() for size in by):
        removed = np.stack([logits[slots[(name, size, s)]][np.arange(len(rows)), rows] for s in seeds])
        res = counterfactual_summary(base, removed, q_labels)
        drop = np_margins(base, q_labels) - np_margins(removed, q_labels)  # (S, n_q)
        out.setdefault(name, {})[size] = {
            **res.__dict__,
            # |seed-averaged margin change| per query, averaged: how far the set moves the query either way
            "abs_margin_change": float(np.abs(drop.mean(0)).mean()),
        }
    return out, base_full


def removal_retrains(
    ctx: StageContext, sets: dict[str, dict[int, np.ndarray]], rows: np.ndarray, what: str, progress: str
) -> tuple[Summaries, np.ndarray]:
    """:func:`removal_summaries` of ``sets`` with every seed of the configuration, on a fresh job list.

    Args:
        sets: as in :func:`removal_summaries`; rows: `(n_q,)` test rows of the queries;
        what: the stage, as the log line names it; progress: the progress bar's text after the model name.

    Returns:
        As :func:`removal_summaries`.
    """
    jobs = ctx.retrains()
    log(f"{ctx.model_name}: {what} retrains")
    return removal_summaries(
        jobs, sets, range(ctx.config.n_seeds), rows, ctx.labels, f"{ctx.model_name} {progress}"
    )
