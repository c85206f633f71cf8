"""Worker memory benchmark: is the index's memory shared by the service's worker processes, or multiplied?

Run from the repository root::

    .venv/bin/python -m benchmarks.worker_memory --n 200000 --k 512 --out benchmarks/results/workers.json

Builds a synthetic index from features (``--n`` examples, ``--k`` dimensions, float16 store: ``n * k * 2``
bytes of ``phi.npy``), serves it with ``infotrace-serve run`` once per worker count (``--workers 1 2``) on
a loopback port, sends every worker exact-scan queries (feature queries: each reads the whole ``phi``), and
then reads each process's ``/proc/<pid>/smaps_rollup``: RSS, PSS (a shared page counted 1/n in each of the n
processes that map it), shared and private pages. When the store is shared, the workers' PSS adds up to
about one copy of the index plus each worker's private memory, while their RSS, summed, counts the index
once per worker. Writes ``--out`` (JSON) and ``WORKERS.md`` beside it. Linux only (``/proc``). A benchmark,
not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.common import benchmark_parser, machine_info, write_report_files
from benchmarks.live_server import running_service

__all__ = ["children", "main", "markdown", "measure", "server_memory", "smaps_rollup"]

SMAPS_FIELDS = ("Rss", "Pss", "Shared_Clean", "Shared_Dirty", "Private_Clean", "Private_Dirty")


def smaps_rollup(pid: int) -> dict[str, int]:
    """``/proc/<pid>/smaps_rollup``'s :data:`SMAPS_FIELDS`, in bytes.

    Raises:
        OSError: no such process (or not Linux).
    """
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in SMAPS_FIELDS:
            values[name] = int(rest.split()[0]) * 1024  # kB
    return values


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (the service's workers under its master), from ``/proc``."""
    return sorted(int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split())


def server_memory(pid: int) -> list[dict[str, Any]]:
    """``role``, ``pid`` and :func:`smaps_rollup` (bytes) of the service's master ``pid`` and of each of
    its workers (empty off Linux)."""
    rows = []
    with contextlib.suppress(OSError):
        rows.append({"role": "master", "pid": pid, **smaps_rollup(pid)})
        for i, child in enumerate(children(pid)):
            rows.append({"role": f"worker {i + 1}", "pid": child, **smaps_rollup(child)})
    return rows


def _build(root: Path, n: int, k: int, seed: int) -> Path:
    from indexer.config import IndexConfig
    from indexer.precomputed import build_from_features

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((64, k)).astype(np.float32)
    phi = np.empty((n, k), dtype=np.float16)
    for start in range(0, n, 50_000):  # in chunks: never an (n, k) float32 array
        stop = min(start + 50_000, n)
        rows = centres[rng.integers(0, 64, stop - start)] + rng.standard_normal((stop - start, k))
        phi[start:stop] = (rows / np.sqrt(k)).astype(np.float16)
    return build_from_features(
        phi,
        root / "synthetic",
        outputs=rng.standard_normal(n),
        targets=rng.integers(0, 2, n),
        config=IndexConfig(seed=seed),
    )


def measure(
    index_root: Path, workers: int, k: int, queries_per_worker: int, log_path: Path
) -> dict[str, Any]:
    """Serve ``index_root`` with ``workers`` worker processes, scan from every worker, read their memory.

    Returns:
        ``workers``, ``processes`` (role, pid, and :func:`smaps_rollup` of the master and each worker, bytes),
        ``queries`` sent and ``seconds`` they took.
    """
    env = {"INFOTRACE_WORKERS": str(workers), "INFOTRACE_RELOAD_INTERVAL": "0"}
    rng = np.random.default_rng(1)
    with running_service(index_root, log_path, env, ready_timeout_s=180) as service:
        pids = children(service.process.pid)
        seen: dict[int, int] = dict.fromkeys(pids, 0)
        started = time.perf_counter()
        sent = 0
        deadline = time.monotonic() + 300
        while min(seen.values()) < queries_per_worker and time.monotonic() < deadline:
            with httpx.Client(base_url=service.url, timeout=120) as client:  # a new connection: any worker
                pid = int(client.get("/healthz").json()["pid"])
                body = {"query": {"feature": rng.standard_normal(k).tolist()}, "top_k": 10}
                response = client.post("/v1/indexes/synthetic/attributions", json=body)
                response.raise_for_status()
                seen[pid] = seen.get(pid, 0) + 1
                sent += 1
        seconds = time.perf_counter() - started
        processes = [{"role": "master", "pid": service.process.pid, **smaps_rollup(service.process.pid)}]
        processes += [
            {"role": f"worker {i + 1}", "pid": pid, **smaps_rollup(pid)} for i, pid in enumerate(pids)
        ]
    return {
        "workers": workers,
        "processes": processes,
        "queries": sent,
        "seconds": seconds,
        "per_worker": seen,
    }


def _mb(value: float) -> str:
    return f"{value / 2**20:,.1f}"


def markdown(report: dict[str, Any]) -> str:
    """The WORKERS.md report."""
    m, st = report["machine"], report["settings"]
    lines = [
        "# infotrace worker memory",
        "",
        f"{m['date_utc']} · {m['cpu_model'] or m['machine']} · {m['cpus_usable']} usable CPUs · "
        f"synthetic index from features: n = {st['n']:,}, k = {st['k']}, float16 store, phi.npy "
        f"{_mb(st['phi_bytes'])} MB, index folder {_mb(st['index_bytes'])} MB. Each run: "
        "`infotrace-serve run` with INFOTRACE_WORKERS workers, at least "
        f"{st['queries_per_worker']} exact-scan queries answered by each worker (every one reads all of "
        "phi), then /proc/<pid>/smaps_rollup of every process.",
        "",
        "| workers | process | RSS MB | PSS MB | shared MB | private MB |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for run in report["runs"]:
        for p in run["processes"]:
            shared = p["Shared_Clean"] + p["Shared_Dirty"]
            private = p["Private_Clean"] + p["Private_Dirty"]
            lines.append(
                f"| {run['workers']} | {p['role']} | {_mb(p['Rss'])} | {_mb(p['Pss'])} | {_mb(shared)} | "
                f"{_mb(private)} |"
            )
    lines += ["", "Summed over the workers (the master aside):", ""]
    lines += ["| workers | RSS MB, summed | PSS MB, summed | private MB, summed |", "|---:|---:|---:|---:|"]
    for run in report["runs"]:
        ws = [p for p in run["processes"] if p["role"] != "master"]
        lines.append(
            f"| {run['workers']} | {_mb(sum(p['Rss'] for p in ws))} | {_mb(sum(p['Pss'] for p in ws))} | "
            f"{_mb(sum(p['Private_Clean'] + p['Private_Dirty'] for p in ws))} |"
        )
    lines += [
        "",
        "RSS counts a page in every process that maps it; PSS divides a shared page among them. The index's "
        "files are memory-mapped read-only, so their pages are the page cache's, shared: adding a worker "
        "adds its private memory (the interpreter, torch, the posterior), not another copy of phi. "
        "Generated by `python -m benchmarks.worker_memory`.",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = benchmark_parser("python -m benchmarks.worker_memory", __doc__)
    parser.add_argument("--n", type=int, default=200_000, help="training examples (default 200000)")
    parser.add_argument("--k", type=int, default=512, help="feature dimension (default 512)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default 1 2)")
    parser.add_argument("--queries-per-worker", type=int, default=3, help="scans per worker (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/workers.json"))
    args = parser.parse_args(argv)
    if args.n < 100 or args.k < 2 or min(args.workers) < 1:
        parser.error("--n must be at least 100, --k at least 2, --workers at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="infotrace-workers-") as scratch:
        root = Path(scratch) / "indexes"
        print(f"[workers] building n = {args.n:,}, k = {args.k}", file=sys.stderr)
        folder = _build(root, args.n, args.k, args.seed)
        index_bytes = sum(p.stat().st_size for p in folder.iterdir())
        phi_bytes = (folder / "phi.npy").stat().st_size
        runs = []
        for workers in args.workers:
            print(f"[workers] serving with {workers} worker(s)", file=sys.stderr)
            runs.append(
                measure(root, workers, args.k, args.queries_per_worker, Path(scratch) / f"w{workers}.log")
            )
    report = {
        "benchmark": "infotrace worker memory",
        "machine": machine,
        "settings": {
            "n": args.n,
            "k": args.k,
            "queries_per_worker": args.queries_per_worker,
            "seed": args.seed,
            "phi_bytes": phi_bytes,
            "index_bytes": index_bytes,
        },
        "runs": runs,
    }
    text = markdown(report)
    path = write_report_files(args.out, report, text, "WORKERS.md")
    print(f"[workers] wrote {args.out} and {path}", file=sys.stderr)
    print(text)
    return report


if __name__ == "__main__":
    main()
