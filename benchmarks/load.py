"""Load benchmark: locust's concurrent clients against a live ``infotrace-serve run``, bounded in time and
in requests, loopback only.

Run from the repository root::

    .venv/bin/python -m benchmarks.load --index-root var/indexes --clients 32 --duration 60 \\
        --batch-size 100 --out benchmarks/results/load.json

The service is started as a subprocess (the ``infotrace-serve run`` console script next to this Python,
with its default settings: one worker process per CPU), or an already running one is targeted with
``--url`` (loopback addresses only: this tool never sends load to another machine). The load is locust
(``locust -f benchmarks/locustfile.py --headless``, in a subprocess of its own): ``--clients`` users, each
one keep-alive connection sending requests back to back until ``--duration`` seconds have passed or
``--max-requests`` have been issued. Each request is drawn from a fixed mix
(:data:`~benchmarks.load_requests.DEFAULT_MIX`):

- ``stored_id``: ``POST /v1/indexes/{name}/attributions`` for a random stored query id, with a random
  score, direction and top_k;
- ``raw_input``: the same for a raw test digit (the test split of
  ``indexer.demo.mnist.load_mnist_sample()``), which the service featurizes with the index's model;
- ``subset``: ``POST /v1/indexes/{name}/attributions/subset`` (greedy group attribution, small sizes);
- ``list_indexes``: ``GET /v1/indexes``.

With ``--batch-size N`` a second, separate phase (``--batch-clients`` users for ``--batch-duration`` s)
sends ``POST /v1/indexes/{name}/attributions:batch`` with N stored-id items each and reports stored
queries answered per second.

Every request's client-side latency and status is recorded; a transport error, a non-200 status or a 200
whose body lacks what was asked for counts as an error. At the end, each server process's memory is read
from ``/proc/<pid>/smaps_rollup`` (the master and each worker: RSS, PSS, shared and private). Writes
``--out`` (JSON: machine and its load average, settings, mix, counts by kind and status, error samples,
p50/p90/p99/mean latency per kind and overall, throughput, CPU seconds of the load generator and of the
server, memory per process) and ``LOAD.md`` next to it. This is a benchmark, not a test: it asserts
nothing about latency. The load generator runs on the same machine as the server and shares its cores.

:func:`run_load` is the importable, parameterised core (``tests/service/test_load.py`` runs it briefly).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.common import benchmark_parser, latency_stats, load_average, machine_info, write_report_files
from benchmarks.live_server import running_service
from benchmarks.load_requests import (
    BATCH_KIND,
    DEFAULT_MIX,
    KINDS,
    PLAN_ENV,
    RequestMaker,
    incomplete,
    is_loopback_url,
    pick_target,
)
from benchmarks.worker_memory import children, server_memory
from indexer.enums import Direction, Objective, Score
from service.core.startup import available_cpus

__all__ = [
    "DEFAULT_MIX",
    "KINDS",
    "LOCUSTFILE",
    "Server",
    "is_loopback_url",
    "main",
    "markdown",
    "parse_args",
    "process_cpu_seconds",
    "run_batch_load",
    "run_load",
    "server_memory",
    "spawned_server",
]

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
TOP_KS = (1, 5, 10, 20, 50)
SUBSET_SIZES = (5, 10, 20)
SUBSET_CANDIDATES = (100, 200)
READY_TIMEOUT_S = 90.0
ERROR_SAMPLES = 20


def _locust_version() -> str:
    from importlib.metadata import version

    return f"locust {version('locust')}"


def _choices() -> dict[str, list[str]]:
    return {
        "scores": [s.value for s in Score],
        "directions": [d.value for d in Direction],
        "objectives": [o.value for o in Objective],
    }


def _prepare(
    base_url: str, index: str | None, test_inputs: Sequence[Any], mix: Mapping[str, float], timeout_s: float
) -> tuple[RequestMaker, list[str]]:
    """The target index (from the service's listing) and its request maker."""
    with httpx.Client(base_url=base_url, timeout=timeout_s, trust_env=False) as client:
        listing = client.get("/v1/indexes")
        listing.raise_for_status()
        target = pick_target(listing.json()["indexes"], index)
    inputs = list(test_inputs) if target.raw_inputs else []
    if inputs and target.input_shape is not None and list(np.shape(inputs[0])) != target.input_shape:
        inputs = []  # these inputs do not fit this index's model: no raw-input requests
    encoded = [json.dumps(np.asarray(x, dtype=np.float32).tolist()) for x in inputs]
    return RequestMaker(target, encoded, mix, **_choices()), encoded


def _warm_up(base_url: str, maker: RequestMaker, per_kind: int, seed: int, timeout_s: float) -> None:
    """Untimed requests of each kind before the load; each must succeed.

    Raises:
        RuntimeError: a warm-up request failed.
    """
    rng = random.Random(seed - 1)
    with httpx.Client(base_url=base_url, timeout=timeout_s, trust_env=False) as client:
        for kind in maker.kinds:
            for _ in range(per_kind):
                planned = maker.make(kind, rng)
                headers = {"content-type": "application/json"} if planned.body is not None else None
                response = client.request(planned.method, planned.path, content=planned.body, headers=headers)
                problem = f"HTTP {response.status_code}: {response.text[:300]}"
                if response.status_code == 200:
                    problem = incomplete(planned, response.json()) or ""
                if problem:
                    raise RuntimeError(f"warm-up {kind} request failed: {problem}")


def _run_locust(plan: dict[str, Any], clients: int, duration_s: float, timeout_s: float) -> dict[str, Any]:
    """Run the locustfile headless on ``plan`` in a subprocess; its samples, and its CPU seconds.

    Raises:
        RuntimeError: locust exited without writing its samples (its output is in the message).
    """
    with tempfile.TemporaryDirectory(prefix="infotrace-locust-") as scratch:
        plan = plan | {"out": str(Path(scratch) / "samples.json")}
        plan_path = Path(scratch) / "plan.json"
        plan_path.write_text(json.dumps(plan))
        command = [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(LOCUSTFILE),
            "--headless",
            "--users",
            str(clients),
            "--spawn-rate",
            str(clients),  # all users within a second
            "--run-time",
            f"{max(1, round(duration_s))}s",
            "--stop-timeout",
            f"{timeout_s:g}",  # in-flight requests finish when the time is up
            "--host",
            plan["url"],
            "--only-summary",
            "--loglevel",
            "WARNING",
            "BatchUser" if plan["mode"] == "batch" else "ServiceUser",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOCUST_")} | {
            PLAN_ENV: str(plan_path)
        }
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(
            command,
            env=env,
            capture_output=True,
            text=True,
            timeout=duration_s + timeout_s + 120,
            check=False,
        )
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = Path(plan["out"])
        if not out.exists():
            raise RuntimeError(f"locust wrote no samples (exit {done.returncode}): {done.stderr[-3000:]}")
        result: dict[str, Any] = json.loads(out.read_text())
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result | {"client_cpu_seconds": cpu}


def _plan(base_url: str, maker: RequestMaker, encoded: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "url": base_url,
        "target": asdict(maker.target),
        "encoded_inputs": encoded,
        "mix": maker.mix,
        **_choices(),
        **extra,
    }


def run_load(
    base_url: str,
    *,
    clients: int,
    duration_s: float,
    max_requests: int,
    test_inputs: Sequence[Any] = (),
    mix: Mapping[str, float] = DEFAULT_MIX,
    index: str | None = None,
    seed: int = 0,
    timeout_s: float = 30.0,
    warmup_per_kind: int = 2,
) -> dict[str, Any]:
    """Run the mixed load against ``base_url`` with locust and summarise it (see the module docstring).

    Args:
        base_url: the service, e.g. ``http://127.0.0.1:8000`` (loopback only).
        clients: locust users, each with one keep-alive connection.
        duration_s: stop issuing requests after this many seconds (whole seconds, at least 1).
        max_requests: stop issuing requests after this many (whichever bound comes first).
        test_inputs: raw model inputs for ``raw_input`` requests (none: that kind is not sent).
        mix: kind -> weight (see :data:`DEFAULT_MIX`).
        index: the index to query (default: ``digits`` if served, else the first ready one).
        seed: seeds every user's random choices.
        timeout_s: per-request timeout, in seconds.
        warmup_per_kind: untimed requests of each kind before the load (they must succeed).

    Returns:
        ``settings``, ``mix``, ``stopped_by``, ``requests`` (counts), ``errors`` (count, by kind, samples),
        ``latency_ms`` (``ok`` and ``all``, each ``overall`` and per kind), ``throughput_rps``,
        ``ok_throughput_rps``, ``wall_seconds``, ``client_cpu_seconds`` and ``load_tool``.

    Raises:
        ValueError: a non-loopback URL or non-positive bounds.
        RuntimeError: the service lists no usable index, a warm-up request failed, or locust failed.
    """
    if not is_loopback_url(base_url):
        raise ValueError(f"refusing to load {base_url!r}: only loopback addresses are allowed")
    if clients < 1 or duration_s <= 0 or max_requests < 1 or timeout_s <= 0:
        raise ValueError("clients, duration_s, max_requests and timeout_s must be positive")
    maker, encoded = _prepare(base_url, index, test_inputs, mix, timeout_s)
    _warm_up(base_url, maker, warmup_per_kind, seed, timeout_s)
    plan = _plan(
        base_url, maker, encoded, mode="mix", seed=seed, max_requests=max_requests, timeout_s=timeout_s
    )
    result = _run_locust(plan, clients, duration_s, timeout_s)
    samples = result["samples"]
    wall = (result["ended"] or result["started"]) - result["started"] if result["started"] else 0.0
    by_status = Counter("transport_error" if s["status"] is None else str(s["status"]) for s in samples)
    failed = [s for s in samples if s["error"] is not None]
    ok = [s for s in samples if s["error"] is None]
    latency = {
        name: {"overall": latency_stats([s["latency_ms"] for s in rows], allow_empty=True)}
        | {
            kind: latency_stats([s["latency_ms"] for s in rows if s["kind"] == kind], allow_empty=True)
            for kind in maker.kinds
        }
        for name, rows in (("ok", ok), ("all", samples))
    }
    target = maker.target
    return {
        "load_tool": _locust_version(),
        "settings": {
            "url": base_url,
            "index": target.name,
            "n_train": target.n_train,
            "n_query": target.n_query,
            "k": target.k,
            "raw_input_queries": target.raw_inputs,
            "n_test_inputs": len(encoded),
            "clients": clients,
            "duration_s": duration_s,
            "max_requests": max_requests,
            "timeout_s": timeout_s,
            "seed": seed,
            "warmup_per_kind": warmup_per_kind,
            "top_k_choices": list(TOP_KS),
            "subset_sizes": list(SUBSET_SIZES),
            "subset_candidates": list(SUBSET_CANDIDATES),
            **_choices(),
        },
        "mix": {"requested": dict(mix), "effective": maker.mix},
        "stopped_by": result["stopped_by"],
        "requests": {
            "issued": result["issued"],
            "completed": len(samples),
            "by_kind": dict(sorted(Counter(s["kind"] for s in samples).items())),
            "by_status": dict(sorted(by_status.items())),
            "per_worker_min": min(Counter(s["user"] for s in samples).values(), default=0),
        },
        "errors": {
            "count": len(failed),
            "by_kind": dict(sorted(Counter(s["kind"] for s in failed).items())),
            "samples": [
                {"kind": s["kind"], "status": s["status"], "error": s["error"]}
                for s in failed[:ERROR_SAMPLES]
            ],
        },
        "latency_ms": latency,
        "throughput_rps": len(samples) / wall if wall > 0 else 0.0,
        "ok_throughput_rps": len(ok) / wall if wall > 0 else 0.0,
        "wall_seconds": wall,
        "client_cpu_seconds": result["client_cpu_seconds"],
    }


def run_batch_load(
    base_url: str,
    *,
    clients: int,
    duration_s: float,
    batch_size: int,
    index: str | None = None,
    seed: int = 0,
    timeout_s: float = 60.0,
) -> dict[str, Any]:
    """The batch phase: ``clients`` locust users sending ``attributions:batch`` requests of ``batch_size``
    stored-id items back to back for ``duration_s`` seconds.

    Returns:
        ``available`` (False, with ``reason``, when the service has no batch route or the index no stored
        queries), else ``batches``, ``batches_per_s``, ``stored_queries_per_s`` (items answered with 200
        per second), ``items_by_status``, ``latency_ms`` (per batch), ``errors`` and ``client_cpu_seconds``.

    Raises:
        ValueError: a non-loopback URL or non-positive bounds.
    """
    if not is_loopback_url(base_url):
        raise ValueError(f"refusing to load {base_url!r}: only loopback addresses are allowed")
    if clients < 1 or duration_s <= 0 or batch_size < 1:
        raise ValueError("clients, duration_s and batch_size must be positive")
    maker, encoded = _prepare(base_url, index, (), {"stored_id": 1.0, "list_indexes": 1.0}, timeout_s)
    settings = {"clients": clients, "duration_s": duration_s, "batch_size": batch_size, "seed": seed}
    if maker.target.n_query == 0:
        return {"available": False, "reason": "the index has no stored queries", "settings": settings}
    probe = maker.batch(random.Random(seed - 1), batch_size)
    answer = httpx.post(
        base_url + probe.path,
        content=probe.body,
        headers={"content-type": "application/json"},
        timeout=timeout_s,
        trust_env=False,
    )
    if answer.status_code in (404, 405):
        return {
            "available": False,
            "reason": f"HTTP {answer.status_code}: no batch route",
            "settings": settings,
        }
    plan = _plan(
        base_url,
        maker,
        encoded,
        mode="batch",
        batch_size=batch_size,
        seed=seed,
        max_requests=10**9,
        timeout_s=timeout_s,
    )
    result = _run_locust(plan, clients, duration_s, timeout_s)
    samples = [s for s in result["samples"] if s["kind"] == BATCH_KIND]
    wall = (result["ended"] or result["started"]) - result["started"] if result["started"] else 0.0
    items: Counter[str] = Counter()
    for s in samples:
        items.update(s.get("items", {}))
    failed = [s for s in samples if s["error"] is not None]
    return {
        "available": True,
        "settings": settings,
        "batches": len(samples),
        "batches_per_s": len(samples) / wall if wall > 0 else 0.0,
        "stored_queries_per_s": items.get("200", 0) / wall if wall > 0 else 0.0,
        "items_by_status": dict(sorted(items.items())),
        "latency_ms": latency_stats(
            [s["latency_ms"] for s in samples if s["error"] is None], allow_empty=True
        ),
        "errors": {"count": len(failed), "samples": [s["error"] for s in failed[:ERROR_SAMPLES]]},
        "wall_seconds": wall,
        "client_cpu_seconds": result["client_cpu_seconds"],
    }


# ---- the server ----------------------------------------------------------------------------------------


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a running process (Linux ``/proc``; None elsewhere or when gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _tree_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds of ``pid`` and each of its live children (the master and its workers)."""
    pids = [pid]
    with contextlib.suppress(OSError):
        pids += children(pid)
    found = {p: process_cpu_seconds(p) for p in pids}
    return {p: s for p, s in found.items() if s is not None}


@dataclass(frozen=True)
class Server:
    """A service started by :func:`spawned_server`."""

    url: str
    pid: int


@contextlib.contextmanager
def spawned_server(
    index_root: Path,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    ready_timeout_s: float = READY_TIMEOUT_S,
    log_level: str = "info",
) -> Iterator[Server]:
    """Run ``infotrace-serve run`` on a free port of 127.0.0.1 and yield it once ``/readyz`` is 200.

    Args:
        index_root: ``INFOTRACE_INDEX_ROOT``.
        log_path: where the server's output goes.
        env: more ``INFOTRACE_*`` settings for the server (host and port are always loopback and free).
        ready_timeout_s: how long to wait for ``GET /readyz`` to answer 200.
        log_level: ``--log-level`` (``info``, the default of ``infotrace-serve run``, logs every request).

    The process is always terminated (then killed if it lingers) on the way out.
    """
    with running_service(index_root, log_path, dict(env or {}), log_level, ready_timeout_s) as service:
        deadline = time.monotonic() + ready_timeout_s  # /readyz answers once one worker is up: wait for all
        workers = int((env or {}).get("INFOTRACE_WORKERS", 0)) or available_cpus()  # the server's default
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if len(children(service.process.pid)) >= workers:
                    break
            time.sleep(0.2)
        time.sleep(1.0)  # a forked worker loads its indexes before it accepts connections
        yield Server(service.url, service.process.pid)


# ---- report --------------------------------------------------------------------------------------------


def _fmt(value: float | int | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _loads(values: list[float] | None) -> str:
    return "unknown" if values is None else " / ".join(f"{v:.2f}" for v in values)


def _mb(value: float) -> str:
    return f"{value / 2**20:,.1f}"


def markdown(report: dict[str, Any]) -> str:
    """The short LOAD.md report."""
    m, st = report["machine"], report["settings"]
    ok = report["latency_ms"]["ok"]
    lines = [
        "# infotrace load benchmark",
        "",
        f"{m['date_utc']} · {m['cpu_model'] or m['machine']} · {m['cpus_usable']} usable CPUs · "
        f"load average (1, 5, 15 min) at start {_loads(m['loadavg_at_start'])}, "
        f"at end {_loads(m['loadavg_at_end'])} · "
        f"server: {report['server']}",
        "",
        f"Index {st['index']!r}: n_train = {st['n_train']:,}, k = {st['k']}, {st['n_query']:,} stored "
        f"queries. {st['clients']} concurrent clients ({report['load_tool']}, headless: FastHttpUser, one "
        f"keep-alive connection each, no wait) for {st['duration_s']:g} s (at most {st['max_requests']:,} "
        f"requests); stopped by {report['stopped_by']}. Mix: "
        + ", ".join(f"{kind} {share:.0%}" for kind, share in report["mix"]["effective"].items())
        + ". Scores, directions, top_k (1-50) and ids drawn at random; subsets of 5-20 from 100-200 "
        "candidates.",
        "",
        f"**{report['requests']['completed']:,} requests in {report['wall_seconds']:.1f} s: "
        f"{report['throughput_rps']:.1f} requests/s; errors: {report['errors']['count']}; statuses: "
        + ", ".join(f"{status}: {n:,}" for status, n in report["requests"]["by_status"].items())
        + ".**",
        "",
        "Client-side latency of the successful requests (ms):",
        "",
        "| request | n | p50 | p90 | p99 | mean | max |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, s in ok.items():
        lines.append(
            f"| {kind} | {s['n']:,} | {_fmt(s['p50_ms'])} | {_fmt(s['p90_ms'])} | {_fmt(s['p99_ms'])} | "
            f"{_fmt(s['mean_ms'])} | {_fmt(s['max_ms'])} |"
        )
    if report["errors"]["samples"]:
        lines += ["", "First errors:", ""]
        lines += [f"- {e['kind']}: {e['error']}" for e in report["errors"]["samples"]]
    batch = report.get("batch")
    if batch is not None:
        lines += ["", "## Batch route", ""]
        if not batch["available"]:
            lines.append(f"Not measured: {batch['reason']}.")
        else:
            b, lat = batch["settings"], batch["latency_ms"]
            lines.append(
                f"`POST .../attributions:batch`, {b['batch_size']} stored-id items per batch (random score, "
                f"direction and top_k as above), {b['clients']} clients for {b['duration_s']:g} s: "
                f"**{batch['stored_queries_per_s']:,.0f} stored queries/s** ({batch['batches']:,} batches, "
                f"{batch['batches_per_s']:.1f}/s; p50 {_fmt(lat['p50_ms'])} ms, p99 {_fmt(lat['p99_ms'])} ms "
                f"per batch); items by status: "
                + ", ".join(f"{k}: {v:,}" for k, v in batch["items_by_status"].items())
                + f"; errors: {batch['errors']['count']}."
            )
    memory = report.get("server_memory") or []
    if memory:
        lines += [
            "",
            "## Server memory",
            "",
            "At the end of the mixed load, from /proc/<pid>/smaps_rollup (PSS divides a shared page among "
            "the processes that map it):",
            "",
            "| process | pid | RSS MB | PSS MB | shared MB | private MB |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for p in memory:
            shared, private = p["Shared_Clean"] + p["Shared_Dirty"], p["Private_Clean"] + p["Private_Dirty"]
            lines.append(
                f"| {p['role']} | {p['pid']} | {_mb(p['Rss'])} | {_mb(p['Pss'])} | {_mb(shared)} | "
                f"{_mb(private)} |"
            )
    cpu = f"the load generator used {report['client_cpu_seconds']:.0f} CPU seconds"
    if report.get("server_cpu_seconds") is not None:
        cpu += f" and the server (master and workers) {report['server_cpu_seconds']:.0f}"
    lines += [
        "",
        f"The clients run on the same machine as the server and share its cores ({cpu} in "
        f"{report['wall_seconds']:.0f} s of mixed load). Generated by `python -m benchmarks.load`.",
        "",
    ]
    return "\n".join(lines)


# ---- main ----------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = benchmark_parser("python -m benchmarks.load", __doc__)
    parser.add_argument(
        "--index-root",
        type=Path,
        default=Path("var/indexes"),
        help="index root of the server started here (ignored with --url; default: var/indexes)",
    )
    parser.add_argument("--url", help="load an already running service at this loopback URL instead")
    parser.add_argument("--index", help="index name (default: digits if served, else the first ready)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    parser.add_argument(
        "--max-requests", type=int, default=200_000, help="stop after this many requests (default 200000)"
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request timeout, s (default 30)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random request choices")
    parser.add_argument(
        "--n-inputs", type=int, default=200, help="test digits used as raw inputs (default 200)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=0, help="items per batch of the batch phase (default 0: no phase)"
    )
    parser.add_argument("--batch-clients", type=int, default=4, help="clients of the batch phase (default 4)")
    parser.add_argument(
        "--batch-duration", type=float, default=20.0, help="seconds of batch phase (default 20)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks/results/load.json"),
        help="JSON results; LOAD.md goes next to it",
    )
    args = parser.parse_args(argv)
    if args.url is not None and not is_loopback_url(args.url):
        parser.error(f"--url {args.url!r} is not a loopback address; only loopback targets are allowed")
    if args.clients < 1 or args.duration <= 0 or args.max_requests < 1 or args.timeout <= 0:
        parser.error("--clients, --duration, --max-requests and --timeout must be positive")
    if args.batch_size < 0 or args.batch_clients < 1 or args.batch_duration <= 0:
        parser.error("--batch-size must be >= 0, --batch-clients and --batch-duration positive")
    if args.url is None and not args.index_root.is_dir():
        parser.error(f"--index-root {args.index_root} is not a folder (run `make index-demo` first)")
    return args


def _test_inputs(n: int) -> list[list[float]]:
    from indexer.demo.mnist import load_mnist_sample

    _, test = load_mnist_sample()
    return [row.tolist() for row in test.inputs[:n]]


def _measure(
    url: str, args: argparse.Namespace, inputs: list[list[float]], pid: int | None
) -> dict[str, Any]:
    print(
        f"[load] {args.clients} clients for {args.duration:g} s (at most {args.max_requests})",
        file=sys.stderr,
    )
    before = _tree_cpu_seconds(pid) if pid else {}
    result = run_load(
        url,
        clients=args.clients,
        duration_s=args.duration,
        max_requests=args.max_requests,
        test_inputs=inputs,
        index=args.index,
        seed=args.seed,
        timeout_s=args.timeout,
    )
    if pid:
        after = _tree_cpu_seconds(pid)
        # processes alive at both ends (a worker replaced mid-run loses its CPU seconds)
        result["server_cpu_seconds"] = sum(after[p] - before[p] for p in after if p in before)
        result["server_memory"] = server_memory(pid)
    if args.batch_size:
        print(f"[load] batch phase: {args.batch_clients} clients x {args.batch_size} items", file=sys.stderr)
        result["batch"] = run_batch_load(
            url,
            clients=args.batch_clients,
            duration_s=args.batch_duration,
            batch_size=args.batch_size,
            index=args.index,
            seed=args.seed,
            timeout_s=max(args.timeout, 60.0),
        )
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    machine = machine_info()
    inputs = _test_inputs(args.n_inputs) if args.n_inputs > 0 else []
    if args.url is not None:
        server = f"already running at {args.url}"
        result = _measure(args.url.rstrip("/"), args, inputs, None)
    else:
        with tempfile.TemporaryDirectory(prefix="infotrace-load-") as scratch:
            with spawned_server(args.index_root, Path(scratch) / "server.log") as spawned:
                workers = len(children(spawned.pid))
                server = (
                    f"`infotrace-serve run` started here on {spawned.url} (default settings: {workers} "
                    "worker processes, a JSON log line per request, to a file)"
                )
                result = _measure(spawned.url, args, inputs, spawned.pid)
    report = {
        "benchmark": "infotrace load",
        "machine": machine | {"loadavg_at_end": load_average()},
        "server": server,
        **result,
    }
    text = markdown(report)
    markdown_path = write_report_files(args.out, report, text, "LOAD.md")
    print(f"[load] wrote {args.out} and {markdown_path}", file=sys.stderr)
    print(text)
    return report


if __name__ == "__main__":
    main()
