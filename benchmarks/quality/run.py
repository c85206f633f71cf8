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

This module orchestrates; each stage is a function of :mod:`benchmarks.quality.stages`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import harness_machine_info, write_json
from benchmarks.quality.setting import (
    MODELS,
    QualityConfig,
    Queries,
    full_config,
    quick_config,
    split_queries,
    train_reference,
)
from benchmarks.quality.stages import (
    RANDOM,
    HarnessError,
    StageContext,
    coreset_stage,
    cost_stage,
    counterfactual_stage,
    evaluation_scores,
    full_retrain_accuracy,
    group_stage,
    harness_methods,
    lds_retrains,
    lds_table,
    mislabel_stage,
    near_duplicate_stage,
    signed_scores,
    tune_damping,
)
from benchmarks.quality.stages.base import accuracy, log
from indexer.data import Dataset

__all__ = ["HarnessError", "run", "update", "add_models", "check_result", "main"]

MACHINE_PACKAGES = ("infotrace", "torch", "numpy", "faiss-cpu", "traker", "dattri", "captum")
"""The distributions whose versions the result's machine record lists."""


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


def _run_model(
    model_name: str,
    config: QualityConfig,
    train: Dataset,
    queries: Queries,
    cache_dir: Path,
    chunk: int,
) -> dict[str, Any]:
    """Every stage for one model, in order; the tables of its entry in ``quality.json``."""
    t_model = time.perf_counter()
    base_config, config = config, config.for_model(model_name)
    ctx = StageContext(model_name, config, train, queries, cache_dir / model_name, chunk)
    out: dict[str, Any] = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    if config != base_config:
        out["sizes_override"] = {
            key: value for key, value in config.to_json().items() if value != base_config.to_json()[key]
        }
    labels, held = ctx.labels, queries.heldout_rows

    log(f"{model_name}: reference model")
    reference = train_reference(train, config, model_name, seed=0)
    with torch.no_grad():
        ref_logits = reference(queries.test.inputs).numpy()
    out["reference_accuracy"] = float(accuracy(ref_logits[held], labels[held]))

    methods = harness_methods(config)
    out["methods"] = [
        {"key": m.key, "name": m.name, "package": m.package, "damping_param": m.damping_param}
        for m in methods
    ]
    for method in methods:
        log(f"{model_name}: featurize the training set with {method.key}")
        method.fit(reference, train.inputs, train.targets)

    # ---- LDS with its noise ceiling; damping tuned on the validation queries ----
    retrains = lds_retrains(ctx)
    log(f"{model_name}: tune damping over {list(config.damping_grid)}")
    tuning = tune_damping(
        methods,
        ctx.validation,
        retrains.masks,
        retrains.margins[:, queries.validation_rows],
        config.damping_grid,
    )
    damping = {key: t["damping"] for key, t in tuning.items()}
    for m in out["methods"]:
        m["damping"] = damping[m["key"]]
        m["validation_lds"] = tuning[m["key"]]["validation_lds"]
    signed = evaluation_scores(ctx, methods, damping)
    out["lds"] = lds_table(ctx, signed, retrains)

    # ---- counterfactual removal of the top-k proponents (and k random examples, the floor) ----
    signed_cf = {key: s[: config.n_counterfactual] for key, s in signed.items()}
    out["counterfactual"], base_full = counterfactual_stage(ctx, signed_cf)
    out["base_accuracy"] = full_retrain_accuracy(ctx, base_full, ref_logits)

    # ---- group counterfactual (#4): greedy joint sets against top-m single-example sets ----
    if config.group_sizes:  # none for the CNN (QualityConfig.for_model)
        out["group"], out["near_duplicate_rate"], out["group_joint_scores"] = group_stage(
            ctx, methods, damping, signed_cf
        )
    # ---- coreset (#4): train from scratch on m chosen examples, same number of optimiser steps ----
    if config.coreset_fractions:
        out["coreset_selection_cost"], out["coreset"] = coreset_stage(ctx, methods, damping)
    # ---- ground truth: planted near-duplicates, then planted mislabels ----
    out["retrieval"] = near_duplicate_stage(ctx, methods, damping)
    out["mislabel"] = mislabel_stage(ctx, methods, damping)
    # ---- cost, on fresh adapters at the chosen damping ----
    out["cost"] = cost_stage(ctx, reference, damping)
    out["wall_s"] = round(time.perf_counter() - t_model, 1)
    return out


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
        "machine": harness_machine_info(MACHINE_PACKAGES),
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
    base_config = config
    for model_name in base_config.models:
        config = base_config.for_model(model_name)
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
            **{f"group m={m}": res.get("group", {}).get(str(m), {}) for m in config.group_sizes},
            **{
                f"coreset {f:g}": res.get("coreset", {}).get(f"{f:g}", {}).get("methods", {})
                for f in config.coreset_fractions
            },
        }
        set_keys = [*keys, RANDOM, "greedy_information_loss", "greedy_information_gain"]
        for m in config.group_sizes:
            tables[f"group m={m} (sets)"] = dict.fromkeys(res.get("group", {}).get(str(m), {}))
            tables[f"near-duplicate rate m={m}"] = res.get("near_duplicate_rate", {}).get(str(m), {})
        for f in config.coreset_fractions:
            rows = res.get("coreset", {}).get(f"{f:g}", {}).get("methods", {})
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
    base_config = config
    for model_name, res in result["models"].items():
        config = base_config.for_model(model_name)
        ctx = StageContext(model_name, config, train, queries, cache_dir / model_name, chunk)
        reference = train_reference(train, config, model_name, seed=0)
        damping = {m["key"]: m["damping"] for m in res["methods"]}
        if "group" in stages and config.group_sizes:
            methods = harness_methods(config)
            for method in methods:
                method.fit(reference, train.inputs, train.targets)
            # all evaluation queries then the first n_counterfactual, exactly as run() scores them
            signed_cf = {
                m.key: signed_scores(m, ctx.evaluation, damping[m.key])[: config.n_counterfactual]
                for m in methods
            }
            res["group"], res["near_duplicate_rate"], res["group_joint_scores"] = group_stage(
                ctx, methods, damping, signed_cf
            )
        if "cost" in stages:
            res["cost"] = cost_stage(ctx, reference, damping)
    result["updated"] = {
        "stages": list(stages),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    result = _nan_to_none(result)
    check_result(result, base_config)
    return result


def add_models(
    result: dict[str, Any], config: QualityConfig, cache_dir: Path, names: Sequence[str], chunk: int = 32
) -> dict[str, Any]:
    """Run every stage for models not yet in ``result`` and add their sections (the others are kept).

    Args:
        result: a result of :func:`run`; config: its configuration (the models it lists may differ, and
            fields the result predates are taken from ``config``); names: models of :data:`MODELS` to run.

    Returns:
        The result with the new models' sections, ``config.models`` the union in run order, and an
        ``added`` record (models, date, seconds).

    Raises:
        ValueError: a name is already in the result, or another field of ``config`` differs from the
            result's.
    """
    present = [name for name in names if name in result["models"]]
    if present:
        raise ValueError(f"{present} are already in the result; rerun the harness to replace them")
    previous, wanted = result["config"], config.to_json()
    differ = sorted(key for key, value in previous.items() if key != "models" and wanted.get(key) != value)
    if differ:
        raise ValueError(f"the result was made with other {differ}; rerun the harness instead")
    t0 = time.perf_counter()
    models = (*previous["models"], *names)
    config = dataclasses.replace(config, models=models)
    train, queries = split_queries(config)
    for model_name in names:
        result["models"][model_name] = _run_model(model_name, config, train, queries, cache_dir, chunk)
    result["config"] = config.to_json()
    result["added"] = {
        "models": list(names),
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
    parser.add_argument("--models", default=None, help="comma-separated subset of: mlp,logreg,cnn")
    parser.add_argument("--chunk", type=int, default=32, help="models retrained at once")
    parser.add_argument(
        "--add-models",
        default=None,
        help="run only these models (comma-separated) and add them to <out>/quality.json",
    )
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
            parser.error(f"unknown model(s) {unknown}; expected a subset of {','.join(MODELS)}")
        config = dataclasses.replace(config, models=names)
    added = tuple(m.strip() for m in (args.add_models or "").split(",") if m.strip())
    if [m for m in added if m not in MODELS] or (args.add_models is not None and not added):
        parser.error(f"--add-models takes a subset of {','.join(MODELS)}; got {args.add_models!r}")
    out = args.out or (Path("var/bench-quick") if args.quick else Path("benchmarks/results"))
    mode = "quick" if args.quick else "full"
    if added:
        if not (out / "quality.json").is_file():
            parser.error(f"--add-models needs an existing {out / 'quality.json'}")
        previous = json.loads((out / "quality.json").read_text())
        try:
            result = add_models(previous, config, args.cache_dir / mode, added, chunk=args.chunk)
        except ValueError as error:
            parser.error(str(error))
    elif args.update:
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
    write_json(out / "quality.json", result, indent=1)
    from benchmarks.quality.report import write_report

    (reporter or write_report)(result, out)
    record = result["added"] if added else result["updated"] if args.update else result
    log(f"wrote {out / 'quality.json'} and {out / 'QUALITY.md'} in {record['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
