"""Speed benchmark: indexing throughput, bytes on disk per example, query latency in-process and over HTTP.

Run from the repository root::

    .venv/bin/python -m benchmarks.speed --index-root var/indexes --out benchmarks/results/speed.json

1. Indexing. The demo index (MLP 784-64-10 on 4,000 real MNIST digits, k = 512) is built from scratch
   with ``indexer.demo.mnist.build_demo_index(root, force=True, progress=False)`` into a temporary index
   root made as a sibling of ``--index-root`` (``<index-root>/../.speed-*``), so the demo's checkpoint cache
   ``<index-root>/../cache`` is the very one ``make index-demo`` uses. When the checkpoint is not cached,
   the demo trains the model; that time is reported separately as ``training_seconds``. The indexing time
   is the ``build_index`` call alone: checkpoint load, featurize + project (the training digits and the
   stored queries), surrogate fit, score vectors, FAISS, write. Bytes on disk per training example =
   size of the index folder / n_train.
2. In-process latency (no HTTP): ``load_index`` + ``AttributionEngine``; raw-input queries (test digits)
   timed as featurize (``engine.queries.input``) and rank (``engine.rank``: FAISS retrieval + exact
   float64 rerank), and stored-id queries (``engine.queries.stored``), after warm-up queries.
3. Live-service latency: uvicorn in a real subprocess on a free loopback port, one persistent
   ``httpx.Client``, sequential ``POST /v1/indexes/digits/attributions`` requests (raw inputs, then stored
   ids) after warm-ups; client-side latency and the server's own ``timings``.

Writes ``--out`` (JSON: machine, settings, every number) and ``SPEED.md`` next to it, and prints the
markdown report. The target compared against is p50 <= 10 ms per raw-input query over HTTP.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import numpy as np
from tqdm.auto import tqdm

import indexer.demo.mnist as demo_mnist
from benchmarks.common import benchmark_parser, latency_stats, load_average, machine_info, write_report_files
from benchmarks.live_server import running_service
from indexer.demo.mnist import load_mnist_sample
from indexer.enums import Direction, Score
from indexer.store.manifest import read_manifest
from indexer.store.reader import load_index
from service.app import limit_threads
from service.engine import AttributionEngine, Query, Ranked

TOP_K = 10
CANDIDATES = 100
SCORE = Score.INFORMATION_GAIN
DIRECTION = Direction.BOTH
TARGET_HTTP_P50_MS = 10.0
READY_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 30.0
INDEX_NAME = demo_mnist.DEMO_NAME
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def log(message: str) -> None:
    """A status line on stderr that does not break the progress bars."""
    tqdm.write(f"[speed] {message}", file=sys.stderr)


# ---- 1. indexing ---------------------------------------------------------------------------------------


def bench_indexing(index_root: Path) -> tuple[Path, dict[str, Any]]:
    """Build the demo index from scratch under ``index_root`` and time it.

    ``trained_model`` and ``build_index`` are wrapped (as ``indexer.demo.mnist`` sees them) only to time them;
    the demo's own checkpoint-cache logic decides whether training happens.

    Returns:
        ``(index_dir, results)``.
    """
    real_trained_model = demo_mnist.trained_model
    real_build_index = demo_mnist.build_index
    seen: dict[str, Any] = {}

    def timed_trained_model(spec: Any, data: Any, checkpoint: Path, *args: Any, **kwargs: Any) -> Any:
        cached = Path(checkpoint).is_file()
        if not cached:
            log(f"checkpoint {checkpoint} is not cached: training the demo model first (timed separately)")
        started = time.perf_counter()
        model = real_trained_model(spec, data, checkpoint, *args, **kwargs)
        seen["checkpoint"] = {
            "path": str(checkpoint),
            "cached": cached,
            "seconds": time.perf_counter() - started,
        }
        return model

    def timed_build_index(*args: Any, **kwargs: Any) -> Path:
        started = time.perf_counter()
        out = real_build_index(*args, **kwargs)
        seen["build_index_seconds"] = time.perf_counter() - started
        return out

    log(f"building the demo index from scratch under {index_root}")
    started = time.perf_counter()
    with (
        mock.patch.object(demo_mnist, "trained_model", timed_trained_model),
        mock.patch.object(demo_mnist, "build_index", timed_build_index),
    ):
        index_dir = demo_mnist.build_demo_index(index_root, force=True, progress=False)
    wall = time.perf_counter() - started
    if "checkpoint" not in seen or "build_index_seconds" not in seen:
        raise RuntimeError(
            "build_demo_index no longer calls trained_model and build_index; update the benchmark"
        )

    manifest = read_manifest(index_dir)
    n_train, n_query = manifest.counts.n_train, manifest.counts.n_query
    timings = manifest.timings_seconds
    featurize = float(timings["featurize"])
    before_write = float(timings["total"])
    indexing = float(seen["build_index_seconds"])

    files = sorted(p for p in index_dir.rglob("*") if p.is_file())
    sizes = {str(p.relative_to(index_dir)): p.stat().st_size for p in files}
    total_bytes = sum(sizes.values())
    checkpoint = seen["checkpoint"]
    results = {
        "checkpoint": checkpoint,
        "training_seconds": None if checkpoint["cached"] else checkpoint["seconds"],
        "build_demo_index_wall_seconds": wall,
        "indexing_seconds": indexing,
        "examples_per_second": n_train / indexing,
        "breakdown_seconds": {
            "featurize_project": featurize,
            "fit_scores_faiss": before_write - featurize,
            "write": indexing - before_write,
        },
        "breakdown_note": (
            "featurize_project = manifest timings_seconds.featurize (checkpoint load + tangent features + "
            f"projection of {n_train} training digits and {n_query} stored queries); fit_scores_faiss = "
            "manifest total - featurize (surrogate, score vectors, FAISS); "
            "write = build_index time - manifest total (checkpoint copy, hashes, files, fsync, rename)"
        ),
        "manifest_timings_seconds": timings,
        "featurized_examples": n_train + n_query,
        "featurize_examples_per_second": (n_train + n_query) / featurize,
        "disk": {
            "total_bytes": total_bytes,
            "bytes_per_train_example": total_bytes / n_train,
            "files_bytes": sizes,
            "files_bytes_per_train_example": {name: size / n_train for name, size in sizes.items()},
        },
    }
    return index_dir, results


# ---- 2. in-process -------------------------------------------------------------------------------------


def _time_queries(
    engine: AttributionEngine, make_query: Callable[[int], Query], n_queries: int, warmup: int, desc: str
) -> dict[str, Any]:
    featurize: list[float] = []
    rank: list[float] = []
    total: list[float] = []
    retrieve: list[float] = []
    rerank: list[float] = []
    depths: list[int] = []
    for i in tqdm(range(warmup + n_queries), desc=desc, unit="q", leave=False):
        t0 = time.perf_counter()
        query = make_query(i)
        t1 = time.perf_counter()
        ranked: Ranked = engine.rank(query, SCORE, DIRECTION, TOP_K, CANDIDATES)
        t2 = time.perf_counter()
        if len(ranked.ids) != TOP_K:
            raise RuntimeError(f"{desc}: query {i} returned {len(ranked.ids)} results, expected {TOP_K}")
        if i < warmup:
            continue
        featurize.append((t1 - t0) * 1e3)
        rank.append((t2 - t1) * 1e3)
        total.append((t2 - t0) * 1e3)
        retrieve.append(ranked.retrieve_ms)
        rerank.append(ranked.rerank_ms)
        depths.append(ranked.depth)
    return {
        "featurize": latency_stats(featurize),
        "rank": latency_stats(rank),
        "total": latency_stats(total),
        "engine_retrieve": latency_stats(retrieve),
        "engine_rerank": latency_stats(rerank),
        "depth": {
            "initial": CANDIDATES,
            "max": int(max(depths)),
            "mean": float(np.mean(depths)),
            "deepened_fraction": float(np.mean(np.asarray(depths) > CANDIDATES)),
        },
    }


def bench_in_process(
    index_dir: Path, test_inputs: list[list[float]], n_queries: int, warmup: int
) -> dict[str, Any]:
    """Latency of raw-input and stored-id queries against an engine in this process.

    Thread pools are capped as the service caps them (``Settings.compute_threads``), so the numbers are
    the service's own minus HTTP.
    """
    limit_threads(1)
    t0 = time.perf_counter()
    data = load_index(index_dir)
    t1 = time.perf_counter()
    engine = AttributionEngine(data)
    t2 = time.perf_counter()
    n_stored = len(data.query_phi)
    log(f"in-process: {n_queries} raw-input and {n_queries} stored-id queries after {warmup} warm-ups each")
    raw = _time_queries(
        engine,
        lambda i: engine.queries.input(test_inputs[i % len(test_inputs)]),
        n_queries,
        warmup,
        "in-process raw",
    )
    stored = _time_queries(
        engine, lambda i: engine.queries.stored(i % n_stored), n_queries, warmup, "in-process ids"
    )
    return {
        "load_index_seconds": t1 - t0,
        "engine_init_seconds": t2 - t1,
        "raw_input": raw,
        "stored_id": stored,
    }


# ---- 3. live service -----------------------------------------------------------------------------------


def _time_requests(
    client: httpx.Client, bodies: list[bytes], n_queries: int, warmup: int, desc: str
) -> dict[str, Any]:
    url = f"/v1/indexes/{INDEX_NAME}/attributions"
    client_ms: list[float] = []
    server: dict[str, list[float]] = {"featurize_ms": [], "retrieve_ms": [], "rerank_ms": [], "total_ms": []}
    response_bytes: list[int] = []
    for i in tqdm(range(warmup + n_queries), desc=desc, unit="req", leave=False):
        t0 = time.perf_counter()
        response = client.post(url, content=bodies[i % len(bodies)])
        t1 = time.perf_counter()
        if response.status_code != 200:
            raise RuntimeError(f"{desc}: request {i} got HTTP {response.status_code}: {response.text[:500]}")
        payload = response.json()
        if len(payload["results"]) != TOP_K:
            raise RuntimeError(
                f"{desc}: request {i} returned {len(payload['results'])} results, expected {TOP_K}"
            )
        if i < warmup:
            continue
        client_ms.append((t1 - t0) * 1e3)
        for key, values in server.items():
            values.append(float(payload["timings"][key]))
        response_bytes.append(len(response.content))
    client_stats = latency_stats(client_ms)
    server_stats = {key: latency_stats(values) for key, values in server.items()}
    return {
        "client": client_stats,
        "server_timings": server_stats,
        "server_total_p50_ms": server_stats["total_ms"]["p50_ms"],
        "http_overhead_p50_ms": client_stats["p50_ms"] - server_stats["total_ms"]["p50_ms"],
        "request_bytes_mean": float(np.mean([len(b) for b in bodies])),
        "response_bytes_mean": float(np.mean(response_bytes)),
    }


def bench_http(
    index_root: Path,
    test_inputs: list[list[float]],
    n_stored: int,
    n_queries: int,
    warmup: int,
    log_path: Path,
) -> dict[str, Any]:
    """Latency of sequential attribution requests to a live uvicorn server."""
    # Bodies are encoded up front so the client's JSON encoding is not part of the measured time.
    raw_bodies = [json.dumps({"query": {"input": x}, "top_k": TOP_K}).encode() for x in test_inputs]
    id_bodies = [json.dumps({"query": {"id": i}, "top_k": TOP_K}).encode() for i in range(n_stored)]
    log("starting uvicorn in a subprocess")
    with running_service(index_root, log_path, ready_timeout_s=READY_TIMEOUT_S) as service:
        base, ready_seconds = service.url, service.ready_seconds
        log(f"server ready at {base} after {ready_seconds:.1f} s; {n_queries} + {n_queries} requests")
        headers = {"content-type": "application/json"}
        with httpx.Client(base_url=base, timeout=REQUEST_TIMEOUT_S, headers=headers) as client:
            raw = _time_requests(client, raw_bodies, n_queries, warmup, "HTTP raw")
            stored = _time_requests(client, id_bodies, n_queries, warmup, "HTTP ids")
    return {
        "server_start_to_ready_seconds": ready_seconds,
        "endpoint": f"POST /v1/indexes/{INDEX_NAME}/attributions",
        "raw_input": raw,
        "stored_id": stored,
    }


# ---- report --------------------------------------------------------------------------------------------


def _row(name: str, s: dict[str, Any]) -> str:
    return f"| {name} | {s['p50_ms']:.2f} | {s['p90_ms']:.2f} | {s['p99_ms']:.2f} | {s['mean_ms']:.2f} |"


def _thread_env(m: dict[str, Any]) -> str:
    given = [f"{key}={value}" for key, value in m["thread_env"].items() if value is not None]
    return ", ".join(given) or "unset"


def markdown(report: dict[str, Any]) -> str:
    """The short SPEED.md table."""
    m, st, ix, ip, http = (report[key] for key in ("machine", "settings", "indexing", "in_process", "http"))
    p50 = http["raw_input"]["client"]["p50_ms"]
    met = report["target"]["met"]
    training = ix["training_seconds"]
    training_text = "cached, not run" if training is None else f"{training:.2f} s"
    lines = [
        "# infotrace speed benchmark",
        "",
        f"{m['date_utc']} · {m['cpu_model'] or m['machine']} · {m['cpus_usable']} usable CPUs "
        f"(torch threads {m['torch_threads']}, thread env {_thread_env(m)}) · "
        f"load average at start {m['loadavg_at_start']} · "
        f"torch {m['versions']['torch']}, numpy {m['versions']['numpy']}, faiss {m['versions']['faiss']}",
        "",
        f"Demo index: MLP 784-64-10 ({st['n_params']:,} parameters), n_train = {st['n_train']:,}, "
        f"k = {st['k']}, {st['n_query']:,} stored queries; queries ask for top_k = {TOP_K}, "
        f"{SCORE.value}, {DIRECTION.value}, {CANDIDATES} candidates; {st['n_queries']} timed queries per row "
        f"after {st['warmup']} warm-ups.",
        "",
        f"**Target: p50 <= {TARGET_HTTP_P50_MS:g} ms per raw-input query over HTTP — "
        f"{'met' if met else 'NOT met'} (measured p50 {p50:.2f} ms).**",
        "",
        "## Indexing",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| indexing time (featurize + project + fit + write) | {ix['indexing_seconds']:.2f} s |",
        f"| training examples per second | {ix['examples_per_second']:.0f} |",
        f"| featurize + project (manifest; {ix['featurized_examples']:,} examples) | "
        f"{ix['breakdown_seconds']['featurize_project']:.2f} s |",
        f"| fit + score vectors + FAISS | {ix['breakdown_seconds']['fit_scores_faiss']:.2f} s |",
        f"| write | {ix['breakdown_seconds']['write']:.2f} s |",
        f"| training (checkpoint not cached) | {training_text} |",
        f"| bytes on disk per training example | {ix['disk']['bytes_per_train_example']:,.0f} "
        f"({ix['disk']['total_bytes'] / 2**20:.1f} MiB in all) |",
        "",
        "| file | bytes | bytes / example |",
        "|---|---:|---:|",
    ]
    n_train = st["n_train"]
    for name, size in sorted(ix["disk"]["files_bytes"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {name} | {size:,} | {size / n_train:,.1f} |")
    lines += [
        "",
        "## Query latency (ms)",
        "",
        "| path | p50 | p90 | p99 | mean |",
        "|---|---:|---:|---:|---:|",
        _row("in-process raw input: featurize", ip["raw_input"]["featurize"]),
        _row("in-process raw input: rank", ip["raw_input"]["rank"]),
        _row("in-process raw input: total", ip["raw_input"]["total"]),
        _row("in-process stored id: query", ip["stored_id"]["featurize"]),
        _row("in-process stored id: rank", ip["stored_id"]["rank"]),
        _row("in-process stored id: total", ip["stored_id"]["total"]),
        _row("HTTP raw input (client)", http["raw_input"]["client"]),
        _row("HTTP raw input (server timings.total_ms)", http["raw_input"]["server_timings"]["total_ms"]),
        _row("HTTP stored id (client)", http["stored_id"]["client"]),
        _row("HTTP stored id (server timings.total_ms)", http["stored_id"]["server_timings"]["total_ms"]),
        "",
        f"Service start to ready: {http['server_start_to_ready_seconds']:.1f} s. Engine load in-process: "
        f"load_index {ip['load_index_seconds']:.2f} s + engine {ip['engine_init_seconds']:.2f} s. "
        f"Rerank depth deepened beyond {CANDIDATES} for "
        f"{ip['raw_input']['depth']['deepened_fraction']:.0%} of raw-input queries "
        f"(max {ip['raw_input']['depth']['max']}).",
        "",
        "Client-side times include the loopback round trip, request validation and response serialisation; "
        "request bodies were JSON-encoded before timing. Generated by `python -m benchmarks.speed`.",
        "",
    ]
    return "\n".join(lines)


# ---- main ----------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = benchmark_parser("python -m benchmarks.speed", __doc__)
    parser.add_argument(
        "--index-root",
        type=Path,
        default=Path("var/indexes"),
        help="the service's index root; the benchmark builds into a temporary sibling of it and shares "
        "its checkpoint cache <index-root>/../cache (default: var/indexes)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks/results/speed.json"),
        help="JSON results; SPEED.md goes next to it",
    )
    parser.add_argument(
        "--n-queries", type=int, default=200, help="timed queries per kind and path (default 200)"
    )
    parser.add_argument("--warmup", type=int, default=10, help="untimed warm-up queries before each series")
    parser.add_argument("--keep", action="store_true", help="keep the temporary index root (path is logged)")
    args = parser.parse_args(argv)
    if args.n_queries < 1 or args.warmup < 0:
        parser.error("--n-queries must be positive and --warmup non-negative")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    machine = machine_info()
    anchor = args.index_root.resolve().parent
    anchor.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".speed-", dir=anchor))
    try:
        index_dir, indexing = bench_indexing(scratch)
        manifest = read_manifest(index_dir)
        demo = manifest.extra.get("demo", {})
        _, test = load_mnist_sample(n_train=int(demo.get("n_train", 4000)), seed=int(demo.get("seed", 0)))
        test_inputs = [row.tolist() for row in test.inputs]
        n_stored = manifest.counts.n_query
        in_process = bench_in_process(index_dir, test_inputs, args.n_queries, args.warmup)
        http = bench_http(scratch, test_inputs, n_stored, args.n_queries, args.warmup, scratch / "server.log")
    finally:
        if args.keep:
            log(f"kept the temporary index root {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    p50 = http["raw_input"]["client"]["p50_ms"]
    report = {
        "benchmark": "infotrace speed",
        "machine": machine | {"loadavg_at_end": load_average()},
        "settings": {
            "index": INDEX_NAME,
            "k": manifest.projection.k,
            "n_train": manifest.counts.n_train,
            "n_query": n_stored,
            "n_params": manifest.model.n_params,
            "demo": demo,
            "faiss_factory": manifest.faiss.factory,
            "top_k": TOP_K,
            "candidates": CANDIDATES,
            "score": SCORE.value,
            "direction": DIRECTION.value,
            "n_queries": args.n_queries,
            "warmup": args.warmup,
        },
        "target": {
            "what": "p50 latency of one raw-input attribution query over HTTP (client side)",
            "p50_ms_at_most": TARGET_HTTP_P50_MS,
            "measured_p50_ms": p50,
            "met": p50 <= TARGET_HTTP_P50_MS,
        },
        "indexing": indexing,
        "in_process": in_process,
        "http": http,
        "benchmark_wall_seconds": time.perf_counter() - started,
    }
    text = markdown(report)
    markdown_path = write_report_files(args.out, report, text, "SPEED.md")
    log(f"wrote {args.out} and {markdown_path} in {report['benchmark_wall_seconds']:.0f} s")
    print(text)
    return report


if __name__ == "__main__":
    main()
