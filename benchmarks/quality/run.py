"""Attribution quality, infotrace against TRAK, dattri and Captum in one run (issues #3 and #4).

``python -m benchmarks.quality.run [--quick]`` (or ``make bench`` / ``make bench-quick``) runs, for each
benchmark model (the MLP 784-64-10 and a logistic regression) on the digits of the main job:

1. LDS (M random subsets at alpha, one retrain each) with its noise ceiling (a second retrain seed on
   a sample of the subsets), after tuning each method's damping on the validation queries;
2. counterfactual removal of each method's top-k proponents (and of k random examples, the floor),
   retrained with several seeds: margin drop, flip fraction, predictive-entropy change;
3. ground-truth retrieval: planted near-duplicates (recall@1/10, MRR) and planted mislabels (ROC-AUC of
   the self-scores, share found in the top 10%);
4. cost: wall time and peak memory of featurizing the training set and of scoring the queries;
5. (issue #4) group counterfactual of the greedy joint information-loss / information-gain sets against
   the top-m single-example sets, coreset accuracy (greedy information gain against random, top-m of
   every method and k-center greedy), and the near-duplicate rate of returned sets.

Results go to ``<out>/quality.json`` and ``<out>/QUALITY.md`` with PNG plots
(:mod:`benchmarks.quality.report`). Retrains are cached under ``--cache-dir`` (one file per retrained
model), so a rerun reuses every finished retrain. The harness checks its own bookkeeping as it goes
(:func:`check_result`); it asserts nothing about which method wins.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from benchmarks.quality.infotrace_method import InfotraceMethod, infotrace_methods
from benchmarks.quality.lds import lds, per_query_spearman, random_subsets
from benchmarks.quality.metrics import (
    counterfactual_summary,
    found_in_top,
    k_center_greedy,
    mean_near_duplicate_rate,
    mean_reciprocal_rank,
    measure_cost,
    recall_at,
    retrieval_ranks,
    roc_auc,
)
from benchmarks.quality.metrics import margins as np_margins
from benchmarks.quality.retrain import retrain_logits
from benchmarks.quality.setting import (
    MODELS,
    QualityConfig,
    Queries,
    full_config,
    plant_mislabels,
    plant_near_duplicates,
    quick_config,
    split_queries,
    train_reference,
)
from indexer.coreset import coreset_information_gain
from indexer.data import Dataset
from indexer.enums import Objective, Score
from indexer.subset import greedy_subset, joint_information_gain, joint_information_loss

__all__ = ["HarnessError", "run", "update", "check_result", "main"]

RANDOM = "random"
RECALL_CURVE_KS = (1, 2, 5, 10, 20, 50)


class HarnessError(AssertionError):
    """The harness's own bookkeeping is inconsistent (a bug in the harness, not a method's result)."""


def _log(message: str) -> None:
    tqdm.write(f"[{dt.datetime.now():%H:%M:%S}] {message}", file=sys.stderr)


def _signed(method: Any, data: Dataset, damping: float | None) -> np.ndarray:
    """Signed scores `(n_query, n_train)`: infotrace's information scores get the sign of influence."""
    if isinstance(method, InfotraceMethod):
        return method.signed_scores(data.inputs, data.targets, damping)
    return np.asarray(method.scores(data.inputs, data.targets, damping), dtype=np.float64)


def _raw(method: Any, data: Dataset, damping: float | None) -> np.ndarray:
    """Scores as each method defines them (unsigned information scores stay unsigned)."""
    return np.asarray(method.scores(data.inputs, data.targets, damping), dtype=np.float64)


def _methods(config: QualityConfig) -> list[Any]:
    from benchmarks.quality.peers import missing_peers, peer_methods

    missing = missing_peers()
    if missing:
        raise SystemExit(
            f"peer packages missing: {', '.join(missing)}; install them with pip install -e '.[bench]'"
        )
    peers = peer_methods(
        config.k, config.seed, cg_max_iter=config.cg_max_iter, cg_hessian_examples=config.cg_hessian_examples
    )
    return [*infotrace_methods(config.k, config.seed), *peers]


def _top_k_masks(scores: np.ndarray, k: int, n_train: int) -> np.ndarray:
    """Masks `(n_query, n_train)` keeping all but each row's k highest scores (stable: lowest row first)."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    masks = np.ones((len(scores), n_train), dtype=bool)
    np.put_along_axis(masks, order, False, axis=1)
    return masks


def _removal_masks(sets: Sequence[np.ndarray], n_train: int) -> np.ndarray:
    masks = np.ones((len(sets), n_train), dtype=bool)
    for row, members in enumerate(sets):
        masks[row, members] = False
    return masks


def _cost(c: Any) -> dict[str, float]:
    return {"wall_s": round(float(c.wall_s), 3), "peak_rss_bytes": int(c.peak_rss_bytes)}


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


class _Retrains:
    """Collects (mask, seed) retrain jobs and runs them in one cached, deduplicated batch."""

    def __init__(
        self, train: Dataset, inputs: torch.Tensor, config: Any, cache_dir: Path, chunk: int
    ) -> None:
        self.train, self.inputs, self.config, self.cache_dir, self.chunk = (
            train,
            inputs,
            config,
            cache_dir,
            chunk,
        )
        self.masks: list[np.ndarray] = []
        self.seeds: list[int] = []

    def add(self, masks: np.ndarray, seeds: int | Sequence[int]) -> slice:
        """Queue `(n, n_train)` masks with one seed for all or one seed each; returns their rows."""
        start = len(self.masks)
        self.masks.extend(masks)
        self.seeds.extend([int(seeds)] * len(masks) if isinstance(seeds, int) else [int(s) for s in seeds])
        if len(self.seeds) != len(self.masks):
            raise HarnessError(f"{len(masks)} masks were queued with a different number of seeds")
        return slice(start, len(self.masks))

    def run(self, desc: str) -> np.ndarray:
        if not self.masks:
            return np.zeros((0, len(self.inputs), 0), np.float32)
        return retrain_logits(
            self.train,
            self.inputs,
            np.stack(self.masks),
            np.array(self.seeds),
            self.config,
            self.cache_dir,
            chunk_size=self.chunk,
            progress=desc,
        )


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return (logits.argmax(-1) == labels).mean(-1)


def _tune(
    methods: list[Any], validation: Dataset, masks: np.ndarray, outputs: np.ndarray, grid: Sequence[float]
) -> dict[str, dict[str, Any]]:
    """Each method's damping: the grid value with the highest validation LDS (ties: the smaller value)."""
    chosen: dict[str, dict[str, Any]] = {}
    for method in methods:
        if method.damping_param is None:
            chosen[method.key] = {"damping": None, "validation_lds": {}}
            continue
        curve: dict[str, float] = {}
        for damping in tqdm(grid, desc=f"tune {method.key}", leave=False):
            try:
                curve[repr(damping)] = lds(_signed(method, validation, damping), masks, outputs).mean
            except (RuntimeError, ValueError, np.linalg.LinAlgError) as exc:  # e.g. a singular inverse
                _log(f"{method.key}: damping {damping} failed ({type(exc).__name__}: {exc}); skipped")
                curve[repr(damping)] = float("nan")
        finite = {d: v for d, v in curve.items() if math.isfinite(v)}
        if not finite:
            raise HarnessError(f"{method.key}: no damping value of the grid gave a finite validation LDS")
        best = max(finite, key=lambda d: (finite[d], -float(d)))
        chosen[method.key] = {"damping": float(best), "validation_lds": curve}
    return chosen


def _random_scores(config: QualityConfig, n_train: int) -> np.ndarray:
    """`(n_counterfactual, n_train)` seeded noise whose top-k is the random floor's removal set."""
    return np.random.default_rng(config.seed + 20).standard_normal((config.n_counterfactual, n_train))


def _removal_summaries(
    jobs: _Retrains,
    sets: dict[str, dict[int, np.ndarray]],
    seeds: Sequence[int],
    rows: np.ndarray,
    labels: np.ndarray,
    desc: str,
) -> tuple[dict[str, dict[int, dict[str, float]]], np.ndarray]:
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
    out: dict[str, dict[int, dict[str, float]]] = {}
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


def _counterfactual_stage(
    model_name: str,
    config: QualityConfig,
    train: Dataset,
    queries: Queries,
    signed_cf: dict[str, np.ndarray],
    cache: Path,
    chunk: int,
) -> tuple[dict[str, dict[str, dict[str, float]]], np.ndarray]:
    """Metric 2: remove each method's top-k proponents for each counterfactual query and retrain.

    Args:
        signed_cf: method key -> `(n_counterfactual, n_train)` signed scores of the counterfactual queries.

    Returns:
        ``(table, base_full)``: str(k) -> method (and ``random``) -> summary; `(S, n_test, C)` logits.
    """
    n_train = len(train)
    sets = {
        key: {k: _top_k_masks(s, k, n_train) for k in config.removal_sizes}
        for key, s in [*signed_cf.items(), (RANDOM, _random_scores(config, n_train))]
    }
    jobs = _Retrains(train, queries.test.inputs, config.retrain_config(model_name), cache, chunk)
    _log(f"{model_name}: counterfactual retrains")
    summaries, base_full = _removal_summaries(
        jobs,
        sets,
        range(config.n_seeds),
        queries.eval_rows[: config.n_counterfactual],
        queries.test.targets.numpy(),
        f"{model_name} counterfactual retrains",
    )
    table = {str(k): {name: summaries[name][k] for name in sets} for k in config.removal_sizes}
    return table, base_full


def _group_stage(
    model_name: str,
    config: QualityConfig,
    train: Dataset,
    queries: Queries,
    methods: list[Any],
    damping: dict[str, float | None],
    signed_cf: dict[str, np.ndarray],
    cache: Path,
    chunk: int,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Issue #4's group counterfactual, near-duplicate rate and joint scores of every removed set.

    Sets per counterfactual query and size m: the greedy joint information-loss and information-gain
    sets (DESIGN.md 1.4; pool: the top ``group_pool`` by the objective's single score), the top-m by
    each unsigned information score (what the subset endpoint compares against), each method's top-m
    proponents (signed) and m random examples.

    Returns:
        ``(group, near_duplicate_rate, joint_scores)``, each keyed by str(m) then set name; joint scores
        are the mean over queries of the set's joint information loss and gain in nats.
    """
    n_train = len(train)
    n_cf = config.n_counterfactual
    cf_rows = queries.eval_rows[:n_cf]
    cf_q = queries.subset(cf_rows)
    by_key = {m.key: m for m in methods}
    info = next(m for m in methods if isinstance(m, InfotraceMethod)).features
    phi_q = info.query_phi(cf_q.inputs, cf_q.targets)
    members: dict[str, dict[int, list[np.ndarray]]] = {}
    for objective, score in (
        (Objective.INFORMATION_LOSS, Score.INFORMATION_LOSS),
        (Objective.INFORMATION_GAIN, Score.INFORMATION_GAIN),
    ):
        tau = damping[f"infotrace_{score.value}"]
        sur = info.surrogate(float(tau))  # the information scores always have a tuned tau
        raw = _raw(by_key[f"infotrace_{score.value}"], cf_q, tau)
        greedy: dict[int, list[np.ndarray]] = {m: [] for m in config.group_sizes}
        for j in range(n_cf):
            pool = np.argsort(-raw[j], kind="stable")[: config.group_pool]
            result = greedy_subset(
                objective,
                sur.query_terms(phi_q[j]),
                info.train.phi[pool],
                sur.whitened[pool],
                sur.beta[pool],
                sur.prior_precision,
                max(config.group_sizes),
            )
            for m in config.group_sizes:
                greedy[m].append(pool[result.indices[:m]])
        members[f"greedy_{objective.value}"] = greedy
        members[f"top_unsigned_{score.value}"] = {
            m: list(np.argsort(-raw, axis=1, kind="stable")[:, :m]) for m in config.group_sizes
        }
    for key, s in [*signed_cf.items(), (RANDOM, _random_scores(config, n_train))]:
        members[key] = {m: list(np.argsort(-s, axis=1, kind="stable")[:, :m]) for m in config.group_sizes}
    sets = {
        name: {m: _removal_masks(sets_m, n_train) for m, sets_m in by.items()} for name, by in members.items()
    }
    jobs = _Retrains(train, queries.test.inputs, config.retrain_config(model_name), cache, chunk)
    _log(f"{model_name}: group-counterfactual retrains")
    summaries, _ = _removal_summaries(
        jobs,
        sets,
        range(config.n_seeds),
        cf_rows,
        queries.test.targets.numpy(),
        f"{model_name} group retrains",
    )
    group = {str(m): {name: summaries[name][m] for name in sets} for m in config.group_sizes}
    near_dup = {
        str(m): {name: mean_near_duplicate_rate(info.train.phi, members[name][m], 0.95) for name in members}
        for m in config.group_sizes
    }
    sur_il = info.surrogate(float(damping[f"infotrace_{Score.INFORMATION_LOSS.value}"]))
    sur_ig = info.surrogate(float(damping[f"infotrace_{Score.INFORMATION_GAIN.value}"]))
    joint: dict[str, dict[str, dict[str, float]]] = {}
    for m in config.group_sizes:
        joint[str(m)] = {}
        for name in members:
            il, ig = [], []
            for j, idx in enumerate(members[name][m]):
                il.append(
                    joint_information_loss(
                        sur_il.query_terms(phi_q[j]), sur_il.whitened[idx], sur_il.beta[idx]
                    )
                )
                ig.append(
                    joint_information_gain(
                        sur_ig.query_terms(phi_q[j]),
                        info.train.phi64[idx],
                        sur_ig.beta[idx],
                        sur_ig.prior_precision,
                    )
                )
            joint[str(m)][name] = {
                "joint_information_loss": float(np.mean(il)),
                "joint_information_gain": float(np.mean(ig)),
            }
    return group, near_dup, joint


def _cost_stage(
    model_name: str,
    config: QualityConfig,
    train: Dataset,
    evaluation: Dataset,
    reference: torch.nn.Module,
    damping: dict[str, float | None],
) -> dict[str, dict[str, Any]]:
    """Metric 4 on fresh adapters: featurize the training set, then score the evaluation queries.

    Each method (each infotrace score too) gets its own fresh adapter, so nothing is shared or cached
    between rows; a package that applies its damping while caching (dattri TRAK) or re-finalizes for it
    (traker) pays for that in ``score``, and methods that cache nothing pay everything there, so
    ``total_s`` is the comparable figure.

    Returns:
        method key -> {"featurize": cost, "score": cost, "total_s": seconds}.
    """
    from benchmarks.quality.infotrace_method import InfotraceFeatures

    cost: dict[str, dict[str, Any]] = {}
    for method in _methods(config):
        if isinstance(method, InfotraceMethod):
            method = InfotraceMethod(method.score, InfotraceFeatures(config.k, config.seed))
        _log(f"{model_name}: cost of {method.key}")
        with measure_cost() as fit_cost:
            method.fit(reference, train.inputs, train.targets)
        with measure_cost() as score_cost:
            _signed(method, evaluation, damping[method.key])
        cost[method.key] = {
            "featurize": _cost(fit_cost),
            "score": dict(_cost(score_cost), n_queries=len(evaluation)),
            "total_s": round(fit_cost.wall_s + score_cost.wall_s, 3),
        }
        if hasattr(method, "close"):
            method.close()
    return cost


def _run_model(
    model_name: str,
    config: QualityConfig,
    train: Dataset,
    queries: Queries,
    cache_dir: Path,
    chunk: int,
) -> dict[str, Any]:
    t_model = time.perf_counter()
    out: dict[str, Any] = {}
    rcfg = config.retrain_config(model_name)
    n_train = len(train)
    labels_all = queries.test.targets.numpy()
    evaluation = queries.subset(queries.eval_rows)
    validation = queries.subset(queries.validation_rows)
    test_inputs = queries.test.inputs
    cache = cache_dir / model_name

    _log(f"{model_name}: reference model")
    reference = train_reference(train, config, model_name, seed=0)
    with torch.no_grad():
        ref_logits = reference(test_inputs).numpy()
    out["reference_accuracy"] = float(
        _accuracy(ref_logits[queries.heldout_rows], labels_all[queries.heldout_rows])
    )

    methods = _methods(config)
    out["methods"] = [
        {"key": m.key, "name": m.name, "package": m.package, "damping_param": m.damping_param}
        for m in methods
    ]
    for method in methods:
        _log(f"{model_name}: featurize the training set with {method.key}")
        method.fit(reference, train.inputs, train.targets)

    # ---- LDS with its noise ceiling; damping tuned on the validation queries ----
    masks = random_subsets(n_train, config.lds_subsets, config.lds_alpha, seed=config.seed + 10)
    jobs = _Retrains(train, test_inputs, rcfg, cache, chunk)
    lds_rows = jobs.add(masks, range(config.lds_subsets))  # a different seed per subset
    # the noise ceiling: the same subsets retrained with a second seed each
    ceiling_rows = jobs.add(
        masks[: config.ceiling_subsets], [10_000 + m for m in range(config.ceiling_subsets)]
    )
    _log(f"{model_name}: {len(jobs.masks)} LDS retrains")
    lds_logits = jobs.run(f"{model_name} LDS retrains")
    lds_margins = np_margins(lds_logits[lds_rows], labels_all)  # (M, n_test)
    ceiling_margins = np_margins(lds_logits[ceiling_rows], labels_all)
    eval_out = lds_margins[:, queries.eval_rows]
    val_out = lds_margins[:, queries.validation_rows]

    _log(f"{model_name}: tune damping over {list(config.damping_grid)}")
    tuning = _tune(methods, validation, masks, val_out, config.damping_grid)
    damping = {key: t["damping"] for key, t in tuning.items()}
    for m in out["methods"]:
        m["damping"] = damping[m["key"]]
        m["validation_lds"] = tuning[m["key"]]["validation_lds"]

    signed: dict[str, np.ndarray] = {}
    for method in methods:
        signed[method.key] = _signed(method, evaluation, damping[method.key])
        if (
            signed[method.key].shape != (len(evaluation), n_train)
            or not np.isfinite(signed[method.key]).all()
        ):
            raise HarnessError(f"{method.key}: scores are not finite ({len(evaluation)}, {n_train})")
    ceiling = per_query_spearman(
        ceiling_margins[:, queries.eval_rows], lds_margins[: config.ceiling_subsets][:, queries.eval_rows]
    )
    out["lds"] = {
        "noise_ceiling": {
            "mean": ceiling.mean,
            "n_excluded": ceiling.n_excluded,
            "n_subsets": config.ceiling_subsets,
        },
        "methods": {},
    }
    for key, s in signed.items():
        res = lds(s, masks, eval_out)
        finite = res.per_query[np.isfinite(res.per_query)]
        sem = float(finite.std(ddof=1) / math.sqrt(len(finite))) if len(finite) > 1 else float("nan")
        out["lds"]["methods"][key] = {"mean": res.mean, "sem": sem, "n_excluded": res.n_excluded}

    # ---- counterfactual removal of the top-k proponents (and k random examples, the floor) ----
    n_cf = config.n_counterfactual
    cf_rows = queries.eval_rows[:n_cf]
    signed_cf = {key: s[:n_cf] for key, s in signed.items()}
    out["counterfactual"], base_full = _counterfactual_stage(
        model_name, config, train, queries, signed_cf, cache, chunk
    )
    out["base_accuracy"] = [
        float(a) for a in _accuracy(base_full[:, queries.heldout_rows], labels_all[queries.heldout_rows])
    ]
    if not np.allclose(base_full[0][cf_rows], ref_logits[cf_rows], atol=1e-4):
        raise HarnessError("the seed-0 full retrain differs from the reference model")
    info = next(m for m in methods if isinstance(m, InfotraceMethod)).features
    phi_train = info.train.phi

    # ---- group counterfactual (#4): greedy joint sets against top-m single-example sets ----
    out["group"], out["near_duplicate_rate"], out["group_joint_scores"] = _group_stage(
        model_name, config, train, queries, methods, damping, signed_cf, cache, chunk
    )

    # ---- coreset (#4): train from scratch on m chosen examples, same number of optimiser steps ----
    ig_key = f"infotrace_{Score.INFORMATION_GAIN.value}"
    tau_ig = damping[ig_key]
    sizes = [max(1, round(f * n_train)) for f in config.coreset_fractions]
    val_phi = info.query_phi(validation.inputs, validation.targets)
    _log(
        f"{model_name}: greedy information-gain coreset of {max(sizes)}"
        f" over {len(validation)} validation queries"
    )
    with measure_cost() as c:
        core = coreset_information_gain(
            phi_train, info.train.beta, tau_ig, val_phi, max(sizes), progress=True
        )
    out["coreset_selection_cost"] = _cost(c)
    rankings: dict[str, np.ndarray] = {}
    for method in methods:
        summed = _raw(method, validation, damping[method.key]).sum(0)
        rankings[method.key] = np.argsort(-summed, kind="stable")
    kcenter = k_center_greedy(phi_train.astype(np.float64), max(sizes), seed=config.seed)
    steps_full = config.epochs * math.ceil(n_train / config.batch_size)
    seeds = list(range(config.n_seeds))
    out["coreset"] = {}
    for fraction, size in zip(config.coreset_fractions, sizes, strict=True):
        epochs = math.ceil(steps_full / math.ceil(size / config.batch_size))
        jobs = _Retrains(train, test_inputs, config.retrain_config(model_name, epochs=epochs), cache, chunk)
        chosen = {
            "greedy_information_gain": core.indices[:size],
            "k_center_greedy": kcenter[:size],
            **{key: r[:size] for key, r in rankings.items()},
        }
        rng = np.random.default_rng(config.seed + 30)
        chosen[RANDOM] = rng.choice(n_train, size=size, replace=False)
        coreset_slots = {}
        for name, members in chosen.items():
            mask = np.zeros((1, n_train), dtype=bool)
            mask[0, members] = True
            for s in seeds:
                coreset_slots[(name, s)] = jobs.add(mask, s)
        logits = jobs.run(f"{model_name} coreset {fraction:.0%} retrains")
        held = queries.heldout_rows
        table = {}
        for name in chosen:
            acc = np.array(
                [_accuracy(logits[coreset_slots[(name, s)]][0][held], labels_all[held]) for s in seeds]
            )
            table[name] = {
                "accuracy_mean": float(acc.mean()),
                "accuracy_sd": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            }
        out["coreset"][f"{fraction:g}"] = {"size": size, "epochs": epochs, "methods": table}

    # ---- ground truth: planted near-duplicates ----
    dup = plant_near_duplicates(train, queries, config)
    _check_planted_duplicates(dup, queries)
    dup_model = train_reference(dup.train, config, model_name, seed=0)
    dup_queries = queries.subset(dup.query_rows)
    out["retrieval"] = {}
    for method in methods:
        method.fit(dup_model, dup.train.inputs, dup.train.targets)
        try:
            ranks = retrieval_ranks(_raw(method, dup_queries, damping[method.key]), dup.positions)
        except (RuntimeError, ValueError, np.linalg.LinAlgError) as exc:  # e.g. IF-CG's NaN guard
            _log(f"{model_name}: retrieval with {method.key} failed: {exc}")
            out["retrieval"][method.key] = {
                "recall@1": None,
                "recall@10": None,
                "mrr": None,
                "error": str(exc),
            }
            out["retrieval"][method.key]["recall_curve"] = {str(k): None for k in RECALL_CURVE_KS}
            continue
        out["retrieval"][method.key] = {
            "recall@1": recall_at(ranks, 1),
            "recall@10": recall_at(ranks, 10),
            "mrr": mean_reciprocal_rank(ranks),
            "recall_curve": {str(k): recall_at(ranks, k) for k in RECALL_CURVE_KS},
        }

    # ---- ground truth: planted mislabels ----
    mis = plant_mislabels(train, config)
    if not np.array_equal(np.flatnonzero((mis.train.targets != train.targets).numpy()), mis.positions):
        raise HarnessError("the planted mislabels are not where the harness recorded them")
    mis_model = train_reference(mis.train, config, model_name, seed=0)
    flipped = np.zeros(n_train, dtype=bool)
    flipped[mis.positions] = True
    out["mislabel"] = {}
    for method in methods:
        method.fit(mis_model, mis.train.inputs, mis.train.targets)
        try:
            self_scores = np.asarray(method.self_scores(damping[method.key]), dtype=np.float64)
        except (RuntimeError, ValueError, np.linalg.LinAlgError) as exc:
            _log(f"{model_name}: self-scores of {method.key} failed: {exc}")
            out["mislabel"][method.key] = {"roc_auc": None, "found_in_top": None, "error": str(exc)}
            continue
        if self_scores.shape != (n_train,) or not np.isfinite(self_scores).all():
            raise HarnessError(f"{method.key}: self-scores are not finite ({n_train},)")
        out["mislabel"][method.key] = {
            "roc_auc": roc_auc(self_scores, flipped),
            "found_in_top": found_in_top(self_scores, flipped, config.found_fraction),
        }
    # ---- cost, on fresh adapters at the chosen damping ----
    out["cost"] = _cost_stage(model_name, config, train, evaluation, reference, damping)
    out["wall_s"] = round(time.perf_counter() - t_model, 1)
    return out


def _check_planted_duplicates(dup: Any, queries: Queries) -> None:
    src = queries.subset(dup.query_rows)
    copies = dup.train.inputs[torch.from_numpy(dup.positions)]
    if not torch.equal(dup.train.targets[torch.from_numpy(dup.positions)], src.targets):
        raise HarnessError("planted near-duplicates do not carry their query's label")
    distance = (copies - src.inputs).norm(dim=1)
    others = torch.cdist(src.inputs, dup.train.inputs[: dup.positions[0]]).min(dim=1).values
    if not bool((distance < others).all()):
        raise HarnessError("a planted near-duplicate is not the nearest training example to its query")


def _machine() -> dict[str, Any]:
    versions = {}
    for package in ("infotrace", "torch", "numpy", "faiss-cpu", "traker", "dattri", "captum"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "versions": versions,
    }


def run(config: QualityConfig, cache_dir: Path, chunk: int = 32, mode: str = "full") -> dict[str, Any]:
    """Run every metric for every model of ``config``.

    Args:
        config: sizes and seeds; cache_dir: retrain cache; chunk: models retrained at once; mode: a label.

    Returns:
        The result dict written to ``quality.json`` (see :func:`check_result` for its shape).

    Raises:
        HarnessError: the harness's own bookkeeping failed a check.
        SystemExit: a peer package is not installed (the ``bench`` extra).
    """
    t0 = time.perf_counter()
    started = dt.datetime.now(dt.UTC)
    train, queries = split_queries(config)
    result: dict[str, Any] = {
        "mode": mode,
        "date": started.isoformat(timespec="seconds"),
        "machine": _machine(),
        "config": config.to_json(),
        "sizes": {
            "n_train": len(train),
            "n_eval": len(queries.eval_rows),
            "n_validation": len(queries.validation_rows),
            "n_heldout": len(queries.heldout_rows),
        },
        "models": {},
    }
    for model_name in config.models:
        result["models"][model_name] = _run_model(model_name, config, train, queries, cache_dir, chunk)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    result = _nan_to_none(result)
    check_result(result, config)
    return result


def check_result(result: dict[str, Any], config: QualityConfig) -> None:
    """Every method appears on every metric of every model, with a number (or an explicit None).

    Raises:
        HarnessError: a table lacks a method, a removal size, a coreset fraction or a model.
    """
    problems = []
    for model_name in config.models:
        res = result["models"].get(model_name)
        if res is None:
            raise HarnessError(f"model {model_name} missing from the result")
        keys = [m["key"] for m in res["methods"]]
        if len(keys) < 10:
            problems.append(f"{model_name}: only {len(keys)} methods")
        tables: dict[str, dict] = {
            "lds": res["lds"]["methods"],
            "retrieval": res["retrieval"],
            "mislabel": res["mislabel"],
            "cost": res["cost"],
            **{f"counterfactual k={k}": res["counterfactual"].get(str(k), {}) for k in config.removal_sizes},
            **{f"group m={m}": res["group"].get(str(m), {}) for m in config.group_sizes},
            **{
                f"coreset {f:g}": res["coreset"].get(f"{f:g}", {}).get("methods", {})
                for f in config.coreset_fractions
            },
        }
        set_keys = [*keys, RANDOM, "greedy_information_loss", "greedy_information_gain"]
        for m in config.group_sizes:
            tables[f"group m={m} (sets)"] = dict.fromkeys(res["group"].get(str(m), {}))
            tables[f"near-duplicate rate m={m}"] = res.get("near_duplicate_rate", {}).get(str(m), {})
        for f in config.coreset_fractions:
            rows = res["coreset"].get(f"{f:g}", {}).get("methods", {})
            for extra in (RANDOM, "greedy_information_gain", "k_center_greedy"):
                if extra not in rows:
                    problems.append(f"{model_name} coreset {f:g}: missing {extra}")
        for table, rows in tables.items():
            expected = set_keys if "(sets)" in table or "near-duplicate" in table else keys
            missing = [k for k in expected if k not in rows]
            if missing:
                problems.append(f"{model_name} {table}: missing {missing}")
        for k in config.removal_sizes:
            if RANDOM not in res["counterfactual"].get(str(k), {}):
                problems.append(f"{model_name}: no random floor at k={k}")
        if res["lds"]["noise_ceiling"]["mean"] is None:
            problems.append(f"{model_name}: noise ceiling undefined")
    if problems:
        raise HarnessError("; ".join(problems))


def update(
    result: dict[str, Any], config: QualityConfig, cache_dir: Path, stages: Sequence[str], chunk: int = 32
) -> dict[str, Any]:
    """Recompute some stages of an existing result with the dampings it chose (no re-tuning).

    Args:
        result: a result of :func:`run` made with ``config``; stages: any of ``group``, ``cost``.

    Returns:
        The result with those sections replaced and an ``updated`` record (stages, date, seconds).

    Raises:
        ValueError: an unknown stage, or ``config`` differs from the one the result was made with.
    """
    unknown = sorted(set(stages) - {"group", "cost"})
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; expected group and/or cost")
    if result["config"] != config.to_json():
        raise ValueError("the result was made with another configuration; rerun the harness instead")
    t0 = time.perf_counter()
    train, queries = split_queries(config)
    evaluation = queries.subset(queries.eval_rows)
    for model_name, res in result["models"].items():
        reference = train_reference(train, config, model_name, seed=0)
        damping = {m["key"]: m["damping"] for m in res["methods"]}
        if "group" in stages:
            methods = _methods(config)
            for method in methods:
                method.fit(reference, train.inputs, train.targets)
            # all evaluation queries then the first n_counterfactual, exactly as run() scores them
            signed_cf = {
                m.key: _signed(m, evaluation, damping[m.key])[: config.n_counterfactual] for m in methods
            }
            res["group"], res["near_duplicate_rate"], res["group_joint_scores"] = _group_stage(
                model_name, config, train, queries, methods, damping, signed_cf, cache_dir / model_name, chunk
            )
        if "cost" in stages:
            res["cost"] = _cost_stage(model_name, config, train, evaluation, reference, damping)
    result["updated"] = {
        "stages": list(stages),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    result = _nan_to_none(result)
    check_result(result, config)
    return result


def main(argv: Sequence[str] | None = None, reporter: Callable[..., None] | None = None) -> int:
    """Command line: run the harness, write ``quality.json``, ``QUALITY.md`` and the plots."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, minutes on 2 cores (what CI runs)")
    parser.add_argument(
        "--out", type=Path, default=None, help="default: benchmarks/results (quick: var/bench-quick)"
    )
    parser.add_argument("--cache-dir", type=Path, default=Path("var/bench-cache"), help="retrain cache")
    parser.add_argument("--models", default=None, help="comma-separated subset of: mlp,logreg")
    parser.add_argument("--chunk", type=int, default=32, help="models retrained at once")
    parser.add_argument(
        "--update",
        default=None,
        help="recompute only these stages (group,cost) of <out>/quality.json with its tuned dampings",
    )
    args = parser.parse_args(argv)
    config = quick_config() if args.quick else full_config()
    if args.models:
        names = tuple(m.strip() for m in args.models.split(",") if m.strip())
        unknown = [m for m in names if m not in MODELS]
        if unknown:
            parser.error(f"unknown model(s) {unknown}; expected a subset of mlp,logreg")
        config = dataclasses.replace(config, models=names)
    out = args.out or (Path("var/bench-quick") if args.quick else Path("benchmarks/results"))
    mode = "quick" if args.quick else "full"
    if args.update:
        stages = [st.strip() for st in args.update.split(",") if st.strip()]
        unknown = sorted(set(stages) - {"group", "cost"})
        if unknown or not stages:
            parser.error(f"--update takes group and/or cost; got {args.update!r}")
        if not (out / "quality.json").is_file():
            parser.error(
                f"--update needs an existing {out / 'quality.json'}; run the harness without --update first"
            )
        previous = json.loads((out / "quality.json").read_text())
        result = update(previous, config, args.cache_dir / mode, stages, chunk=args.chunk)
    else:
        result = run(config, args.cache_dir / mode, chunk=args.chunk, mode=mode)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(result, indent=1, sort_keys=False) + "\n")
    from benchmarks.quality.report import write_report

    (reporter or write_report)(result, out)
    seconds = result["updated"]["wall_s"] if args.update else result["wall_s"]
    _log(f"wrote {out / 'quality.json'} and {out / 'QUALITY.md'} in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
