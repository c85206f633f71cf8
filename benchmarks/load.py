"""Load benchmark: N concurrent HTTP clients against a live uvicorn process, bounded in time and requests.

Run from the repository root::

    .venv/bin/python -m benchmarks.load --index-root var/indexes --clients 32 --duration 60 \\
        --out benchmarks/results/load.json

The service is started as a subprocess (the ``infotrace-serve run`` console script next to this Python,
``INFOTRACE_INDEX_ROOT=--index-root``, on a free port of 127.0.0.1), or an already running one is targeted
with ``--url`` (loopback addresses only: this tool never sends load to another machine). ``--clients``
asyncio workers, each with its own ``httpx.AsyncClient`` (one keep-alive connection), send requests back to
back until ``--duration`` seconds have passed or ``--max-requests`` have been issued, whichever comes first.
Each request is drawn from a fixed mix (:data:`DEFAULT_MIX`):

- ``stored_id``: ``POST /v1/indexes/{name}/attributions`` for a random stored query id, with a random
  score, direction and top_k;
- ``raw_input``: the same for a raw test digit (the test split of
  ``indexer.demo.mnist.load_mnist_sample()``), which the service featurizes with the index's model and
  projection;
- ``subset``: ``POST /v1/indexes/{name}/attributions/subset`` (greedy group attribution, small sizes);
- ``list_indexes``: ``GET /v1/indexes``.

Every request's client-side latency and status is recorded; a transport error, a non-200 status or a 200
whose body lacks what was asked for counts as an error. Writes ``--out`` (JSON: machine and its load
average, settings, mix, counts by kind and status, error samples, p50/p90/p99/mean latency per kind and
overall, throughput) and ``LOAD.md`` next to it. This is a benchmark, not a test: it asserts nothing about
latency. The client runs on the same machine as the server and shares its cores.

:func:`run_load` is the importable, parameterised core (``tests/service/test_load.py`` runs it briefly).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.common import benchmark_parser, latency_stats, load_average, machine_info, write_report_files
from benchmarks.live_server import running_service
from indexer.enums import Direction, Objective, Score

__all__ = [
    "DEFAULT_MIX",
    "KINDS",
    "is_loopback_url",
    "run_load",
    "run_load_async",
    "spawned_server",
    "Server",
    "process_cpu_seconds",
    "markdown",
    "main",
    "parse_args",
]

KINDS = ("stored_id", "raw_input", "subset", "list_indexes")
DEFAULT_MIX: dict[str, float] = {"stored_id": 0.55, "raw_input": 0.30, "subset": 0.05, "list_indexes": 0.10}
"""Share of each request kind (renormalised over the kinds the target index can answer)."""

TOP_KS = (1, 5, 10, 20, 50)
SUBSET_SIZES = (5, 10, 20)
SUBSET_CANDIDATES = (100, 200)
READY_TIMEOUT_S = 90.0
ERROR_SAMPLES = 20
PREFERRED_INDEX = "digits"


# ---- targets and requests ------------------------------------------------------------------------------


def is_loopback_url(url: str) -> bool:
    """Whether ``url`` is an http(s) URL whose host is a loopback address (or ``localhost``)."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        return False
    if parsed.scheme not in ("http", "https") or not parsed.host:
        return False
    host = parsed.host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Target:
    """The index under load, as the service lists it."""

    name: str
    n_train: int
    n_query: int
    k: int | None
    raw_inputs: bool
    input_shape: list[int] | None


@dataclass(frozen=True)
class Planned:
    """One request to send: its kind, method, path, body and what a complete answer must hold."""

    kind: str
    method: str
    path: str
    body: bytes | None
    expect: int  # results (at most) / members (exactly) / 0 for the index list


def pick_target(indexes: list[dict[str, Any]], name: str | None) -> Target:
    """The index to load: ``name``, else ``digits`` when served, else the first ready one.

    Raises:
        RuntimeError: no such ready index.
    """
    ready = {entry["name"]: entry for entry in indexes if entry.get("ready")}
    if not ready:
        raise RuntimeError(f"the service has no ready index: {indexes}")
    chosen = name or (PREFERRED_INDEX if PREFERRED_INDEX in ready else sorted(ready)[0])
    if chosen not in ready:
        raise RuntimeError(f"index {chosen!r} is not served (ready: {sorted(ready)})")
    entry = ready[chosen]
    shape = (entry.get("model") or {}).get("input_shape")
    return Target(
        name=chosen,
        n_train=int(entry["n_train"]),
        n_query=int(entry["n_query"]),
        k=entry.get("k"),
        raw_inputs=bool(entry.get("raw_input_queries")),
        input_shape=None if shape is None else [int(d) for d in shape],
    )


def effective_mix(mix: Mapping[str, float], target: Target, n_inputs: int) -> dict[str, float]:
    """``mix`` restricted to the kinds ``target`` can answer, renormalised to sum to 1.

    Raises:
        ValueError: an unknown kind, a negative weight, or nothing left to send.
    """
    unknown = set(mix) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown request kinds {sorted(unknown)}; known: {list(KINDS)}")
    if any(w < 0 for w in mix.values()):
        raise ValueError(f"mix weights must be non-negative: {dict(mix)}")
    usable = dict(mix)
    if target.n_query == 0:
        usable.pop("stored_id", None)
    if not target.raw_inputs or n_inputs == 0:
        usable.pop("raw_input", None)
    if target.n_query == 0 and "raw_input" not in usable:
        usable.pop("subset", None)
    total = sum(usable.values())
    if total <= 0:
        raise ValueError(f"no request kind of {dict(mix)} can be sent to index {target.name!r}")
    return {kind: weight / total for kind, weight in usable.items() if weight > 0}


class RequestMaker:
    """Draws requests of the mix for one index (raw inputs are JSON-encoded once, up front)."""

    def __init__(self, target: Target, test_inputs: Sequence[Any], mix: Mapping[str, float]) -> None:
        self.target = target
        self.encoded_inputs = [json.dumps(np.asarray(x, dtype=np.float32).tolist()) for x in test_inputs]
        self.mix = effective_mix(mix, target, len(self.encoded_inputs))
        self.kinds = list(self.mix)
        self.weights = [self.mix[kind] for kind in self.kinds]
        self.attributions = f"/v1/indexes/{target.name}/attributions"

    def _query(self, rng: random.Random, stored: bool) -> str:
        if stored:
            return json.dumps({"id": rng.randrange(self.target.n_query)})
        return '{"input": ' + rng.choice(self.encoded_inputs) + "}"

    def make(self, kind: str, rng: random.Random) -> Planned:
        """One request of ``kind`` with random parameters drawn from ``rng``."""
        n = self.target.n_train
        if kind == "list_indexes":
            return Planned(kind, "GET", "/v1/indexes", None, 0)
        if kind in ("stored_id", "raw_input"):
            top_k = min(rng.choice(TOP_KS), n)
            score, direction = rng.choice(list(Score)), rng.choice(list(Direction))
            body = (
                f'{{"query": {self._query(rng, kind == "stored_id")}, "top_k": {top_k}, '
                f'"score": "{score.value}", "direction": "{direction.value}"}}'
            )
            return Planned(kind, "POST", self.attributions, body.encode(), top_k)
        if kind == "subset":
            size = min(rng.choice(SUBSET_SIZES), n)
            candidates = max(size, min(rng.choice(SUBSET_CANDIDATES), n))
            stored = self.target.n_query > 0 and (not self.encoded_inputs or rng.random() < 0.7)
            objective = rng.choice(list(Objective))
            body = (
                f'{{"query": {self._query(rng, stored)}, "size": {size}, "candidates": {candidates}, '
                f'"objective": "{objective.value}"}}'
            )
            return Planned(kind, "POST", self.attributions + "/subset", body.encode(), size)
        raise ValueError(f"unknown request kind {kind!r}")

    def draw(self, rng: random.Random) -> Planned:
        """A request of a kind drawn from the mix."""
        return self.make(rng.choices(self.kinds, self.weights)[0], rng)


def incomplete(planned: Planned, payload: Any) -> str | None:
    """Why a 200 body does not answer ``planned`` (None when it does)."""
    if not isinstance(payload, dict):
        return "body is not a JSON object"
    if planned.kind == "list_indexes":
        return None if isinstance(payload.get("indexes"), list) else "no 'indexes' list"
    if planned.kind == "subset":
        members = payload.get("members")
        if not isinstance(members, list) or len(members) != planned.expect:
            return f"expected {planned.expect} subset members"
        return None
    results = payload.get("results")
    if not isinstance(results, list) or len(results) > planned.expect:
        # fewer than top_k is valid: a direction with fewer examples of that sign
        return f"expected a list of at most {planned.expect} results"
    return None


# ---- the load ------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One completed (or failed) request."""

    kind: str
    status: int | None
    latency_ms: float
    error: str | None
    worker: int


class _Budget:
    """Shared stop condition of the workers: a deadline and a cap on requests issued."""

    def __init__(self, deadline: float, max_requests: int) -> None:
        self.deadline = deadline
        self.max_requests = max_requests
        self.issued = 0
        self.stopped_by: str | None = None

    def take(self) -> bool:
        if self.issued >= self.max_requests:
            self.stopped_by = self.stopped_by or "max_requests"
            return False
        if time.monotonic() >= self.deadline:
            self.stopped_by = self.stopped_by or "duration"
            return False
        self.issued += 1  # one event loop: no lock needed
        return True


async def _send(client: httpx.AsyncClient, planned: Planned, worker: int) -> Sample:
    headers = {"content-type": "application/json"} if planned.body is not None else None
    started = time.perf_counter()
    try:
        response = await client.request(planned.method, planned.path, content=planned.body, headers=headers)
    except httpx.HTTPError as exc:
        elapsed = (time.perf_counter() - started) * 1e3
        return Sample(planned.kind, None, elapsed, f"{type(exc).__name__}: {exc}", worker)
    elapsed = (time.perf_counter() - started) * 1e3
    error = None
    if response.status_code != 200:
        error = f"HTTP {response.status_code}: {response.text[:300]}"
    else:
        try:
            error = incomplete(planned, response.json())
        except ValueError as exc:
            error = f"invalid JSON body: {exc}"
    return Sample(planned.kind, response.status_code, elapsed, error, worker)


async def _worker(
    worker: int,
    base_url: str,
    maker: RequestMaker,
    budget: _Budget,
    seed: int,
    timeout_s: float,
    samples: list[Sample],
) -> None:
    rng = random.Random(seed * 1_000_003 + worker)
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    client = httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits, trust_env=False)
    async with client:
        while budget.take():
            samples.append(await _send(client, maker.draw(rng), worker))


async def run_load_async(
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
    """Run the load against ``base_url`` and summarise it (see the module docstring).

    Args:
        base_url: the service, e.g. ``http://127.0.0.1:8000`` (loopback only).
        clients: concurrent workers, each with its own ``httpx.AsyncClient``.
        duration_s: stop issuing requests after this many seconds.
        max_requests: stop issuing requests after this many (whichever bound comes first).
        test_inputs: raw model inputs for ``raw_input`` requests (none: that kind is not sent).
        mix: kind -> weight (see :data:`DEFAULT_MIX`).
        index: the index to query (default: ``digits`` if served, else the first ready one).
        seed: seeds every worker's random choices.
        timeout_s: per-request timeout; the whole run is also cut off at
            ``duration_s + timeout_s + 30`` seconds.
        warmup_per_kind: untimed requests of each kind before the load (they must succeed).

    Returns:
        ``settings``, ``mix``, ``requests`` (counts), ``errors`` (count, by kind, samples), ``latency_ms``
        (``overall`` and per kind, for the requests answered with 200 and complete: ``ok``; and for all),
        ``throughput_rps`` and ``wall_seconds``.

    Raises:
        ValueError: a non-loopback URL or non-positive bounds.
        RuntimeError: the service lists no usable index, or a warm-up request failed.
    """
    if not is_loopback_url(base_url):
        raise ValueError(f"refusing to load {base_url!r}: only loopback addresses are allowed")
    if clients < 1 or duration_s <= 0 or max_requests < 1 or timeout_s <= 0:
        raise ValueError("clients, duration_s, max_requests and timeout_s must be positive")
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, trust_env=False) as client:
        listing = await client.get("/v1/indexes")
        listing.raise_for_status()
        target = pick_target(listing.json()["indexes"], index)
        inputs = list(test_inputs) if target.raw_inputs else []
        if inputs and target.input_shape is not None and list(np.shape(inputs[0])) != target.input_shape:
            inputs = []  # these inputs do not fit this index's model: no raw-input requests
        maker = RequestMaker(target, inputs, mix)
        warm_rng = random.Random(seed - 1)
        for kind in maker.kinds:
            for _ in range(warmup_per_kind):
                sample = await _send(client, maker.make(kind, warm_rng), -1)
                if sample.error is not None:
                    raise RuntimeError(f"warm-up {kind} request failed: {sample.error}")

    samples: list[Sample] = []
    started_cpu = os.times()
    started_wall = time.perf_counter()
    budget = _Budget(time.monotonic() + duration_s, max_requests)
    workers = [
        asyncio.create_task(_worker(w, base_url, maker, budget, seed, timeout_s, samples))
        for w in range(clients)
    ]
    cut_off = False
    try:
        await asyncio.wait_for(asyncio.gather(*workers), timeout=duration_s + timeout_s + 30)
    except TimeoutError:
        cut_off = True  # wait_for has cancelled the workers; what they recorded is kept
    wall = time.perf_counter() - started_wall
    ended_cpu = os.times()
    client_cpu = (ended_cpu.user - started_cpu.user) + (ended_cpu.system - started_cpu.system)

    by_status = Counter("transport_error" if s.status is None else str(s.status) for s in samples)
    by_kind = Counter(s.kind for s in samples)
    failed = [s for s in samples if s.error is not None]
    ok = [s for s in samples if s.error is None]
    latency = {
        name: {"overall": latency_stats([s.latency_ms for s in rows], allow_empty=True)}
        | {
            kind: latency_stats([s.latency_ms for s in rows if s.kind == kind], allow_empty=True)
            for kind in maker.kinds
        }
        for name, rows in (("ok", ok), ("all", samples))
    }
    return {
        "settings": {
            "url": base_url,
            "index": target.name,
            "n_train": target.n_train,
            "n_query": target.n_query,
            "k": target.k,
            "raw_input_queries": target.raw_inputs,
            "n_test_inputs": len(inputs),
            "clients": clients,
            "duration_s": duration_s,
            "max_requests": max_requests,
            "timeout_s": timeout_s,
            "seed": seed,
            "warmup_per_kind": warmup_per_kind,
            "top_k_choices": list(TOP_KS),
            "subset_sizes": list(SUBSET_SIZES),
            "subset_candidates": list(SUBSET_CANDIDATES),
            "scores": [s.value for s in Score],
            "directions": [d.value for d in Direction],
            "objectives": [o.value for o in Objective],
        },
        "mix": {"requested": dict(mix), "effective": maker.mix},
        "stopped_by": "cut_off" if cut_off else (budget.stopped_by or "duration"),
        "requests": {
            "issued": budget.issued,
            "completed": len(samples),
            "by_kind": dict(sorted(by_kind.items())),
            "by_status": dict(sorted(by_status.items())),
            "per_worker_min": min(Counter(s.worker for s in samples).values(), default=0),
        },
        "errors": {
            "count": len(failed),
            "by_kind": dict(sorted(Counter(s.kind for s in failed).items())),
            "samples": [
                {"kind": s.kind, "status": s.status, "error": s.error} for s in failed[:ERROR_SAMPLES]
            ],
        },
        "latency_ms": latency,
        "throughput_rps": len(samples) / wall if wall > 0 else 0.0,
        "ok_throughput_rps": len(ok) / wall if wall > 0 else 0.0,
        "wall_seconds": wall,
        "client_cpu_seconds": client_cpu,
    }


def run_load(base_url: str, **kwargs: Any) -> dict[str, Any]:
    """Synchronous :func:`run_load_async` (its own event loop); same arguments and result."""
    return asyncio.run(run_load_async(base_url, **kwargs))


# ---- the server ----------------------------------------------------------------------------------------


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a running process (Linux ``/proc``; None elsewhere or when gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


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
        yield Server(service.url, service.process.pid)


# ---- report --------------------------------------------------------------------------------------------


def _fmt(value: float | int | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _loads(values: list[float] | None) -> str:
    return "unknown" if values is None else " / ".join(f"{v:.2f}" for v in values)


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
        f"queries. {st['clients']} concurrent clients (asyncio, one httpx.AsyncClient and keep-alive "
        f"connection each) for {st['duration_s']:g} s (at most {st['max_requests']:,} requests); stopped by "
        f"{report['stopped_by']}. Mix: "
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
    cpu = f"the load generator used {report['client_cpu_seconds']:.0f} CPU seconds"
    if report.get("server_cpu_seconds") is not None:
        cpu += f" and the server {report['server_cpu_seconds']:.0f}"
    lines += [
        "",
        f"The clients run on the same machine as the server and share its cores ({cpu} in "
        f"{report['wall_seconds']:.0f} s), so latency is mostly queueing behind the other clients' requests: "
        "one uvicorn process answers them from FastAPI's thread pool, with torch, BLAS and FAISS on one "
        "thread each (INFOTRACE_COMPUTE_THREADS=1). Generated by `python -m benchmarks.load`.",
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
    if args.url is None and not args.index_root.is_dir():
        parser.error(f"--index-root {args.index_root} is not a folder (run `make index-demo` first)")
    return args


def _test_inputs(n: int) -> list[list[float]]:
    from indexer.demo.mnist import load_mnist_sample

    _, test = load_mnist_sample()
    return [row.tolist() for row in test.inputs[:n]]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    machine = machine_info()
    inputs = _test_inputs(args.n_inputs) if args.n_inputs > 0 else []
    load_kwargs: dict[str, Any] = {
        "clients": args.clients,
        "duration_s": args.duration,
        "max_requests": args.max_requests,
        "test_inputs": inputs,
        "index": args.index,
        "seed": args.seed,
        "timeout_s": args.timeout,
    }
    print(
        f"[load] {args.clients} clients for {args.duration:g} s (at most {args.max_requests} requests)",
        file=sys.stderr,
    )
    if args.url is not None:
        server = f"already running at {args.url}"
        result = run_load(args.url.rstrip("/"), **load_kwargs)
    else:
        with tempfile.TemporaryDirectory(prefix="infotrace-load-") as scratch:
            log_path = Path(scratch) / "server.log"
            with spawned_server(args.index_root, log_path) as spawned:
                server = (
                    f"`infotrace-serve run` started here on {spawned.url} "
                    "(default settings; a JSON log line per request, to a file)"
                )
                cpu_before = process_cpu_seconds(spawned.pid)
                result = run_load(spawned.url, **load_kwargs)
                cpu_after = process_cpu_seconds(spawned.pid)
                if cpu_before is not None and cpu_after is not None:
                    result["server_cpu_seconds"] = cpu_after - cpu_before  # warm-up and load
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
