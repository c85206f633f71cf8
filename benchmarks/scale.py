"""The vector store at scale (DESIGN.md 2.1): synthetic features at N = 100,000 and 1,000,000, k = 512.

For each N: bytes per example on disk, build and load time, RSS after loading and after queries, stored-id
query latency (p50/p99, in-process) of the exact scan against this machine's memory-bandwidth floor for one
scan of the stored features (an int64 sum over the same bytes, measured in the same run), and each
approximate FAISS factory with its recall@10 (measured by the build against the exact scan) and latency.

Features are drawn once (seeded: 64 clusters plus noise, written as float16) and cached under
``var/bench-scale``. ``--quick`` runs N = 20,000 and two factories (what CI runs).

    python -m benchmarks.scale --out benchmarks/results/scale.json
"""

from __future__ import annotations

import gc
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import benchmark_parser, latency_stats, machine_info, write_report_files
from indexer.config import IndexConfig
from indexer.enums import Direction, Score
from indexer.precomputed import build_from_features
from indexer.store.layout import PHI_FILE
from indexer.store.reader import load_index
from indexer.update import add_features, remove_examples
from service.engine import AttributionEngine

__all__ = ["draw_features", "floor_ms", "measure", "probe", "main"]

K = 512
N_QUERIES = 200
PLOT_FILE = "scale_recall_latency.png"
ADDED = 10_000
REMOVED = 1_000
CLUSTERS = 64
FACTORIES_FULL: dict[str, dict[str, Any]] = {
    "IVF1024,Flat": {"nprobe": 16},
    "IVF1024,SQ8": {"nprobe": 16},
    "IVF1024,PQ64": {"nprobe": 32, "search_depth": 1000},  # compact: 64-byte codes, a deeper rerank
    "HNSW32": {"ef_search": 128},
}
UPDATED_FACTORIES = ("IVF1024,PQ64", "IVF64,PQ32")
"""The approximate indexes whose add and removal are timed too (the compact mode, full and quick)."""

HNSW_MAX_N = 200_000
"""HNSW is built only up to this N here: its graph build over a million 512-d vectors takes longer than the
rest of the benchmark on 2 cores (reported as left out)."""
FACTORIES_QUICK: dict[str, dict[str, Any]] = {
    "IVF64,Flat": {"nprobe": 8},
    "IVF64,PQ32": {"nprobe": 8, "search_depth": 500},
}


def rss_bytes() -> int:
    """This process's resident set size, bytes (from /proc/self/statm)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


def draw_features(cache: Path, n: int, k: int = K, seed: int = 0) -> tuple[np.memmap, dict[str, Any]]:
    """`(n, k)` float16 clustered features (memory-mapped from the cache) and the outputs, targets and
    held-out query features, drawn once per (n, k, seed)."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"phi-{n}x{k}-{seed}.npy"
    base = np.random.default_rng(0)  # the clusters and the margin direction are the same for every seed
    centres = base.standard_normal((CLUSTERS, k)).astype(np.float32) * 0.6
    direction = base.standard_normal(k) / np.sqrt(k)
    rng = base if seed == 0 else np.random.default_rng(seed)
    if not path.exists():
        partial = path.with_suffix(".partial.npy")
        out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float16, shape=(n, k))
        for start in range(0, n, 65536):
            m = min(65536, n - start)
            chunk = centres[rng.integers(0, CLUSTERS, m)] + rng.standard_normal((m, k), dtype=np.float32)
            out[start : start + m] = chunk
        out.flush()
        del out
        partial.rename(path)
    phi = np.load(path, mmap_mode="r")
    outputs = np.empty(n)
    for start in range(0, n, 65536):  # margins: a linear function of the features plus noise
        outputs[start : start + 65536] = np.asarray(phi[start : start + 65536], np.float32) @ direction * 2
    outputs += np.random.default_rng(seed + 1).standard_normal(n)
    targets = (outputs + np.random.default_rng(seed + 2).standard_normal(n) > 0).astype(np.int64)
    q_rng = np.random.default_rng(seed + 3)
    query_phi = (
        centres[q_rng.integers(0, CLUSTERS, N_QUERIES)] + q_rng.standard_normal((N_QUERIES, k))
    ).astype(np.float32)
    extra = {
        "outputs": outputs,
        "targets": targets,
        "query_phi": query_phi,
        "query_outputs": query_phi @ direction * 2,
        "query_targets": np.ones(N_QUERIES, dtype=np.int64),
    }
    return phi, extra


def floor_ms(phi_path: Path, repeats: int = 7) -> float:
    """The memory-bandwidth floor of one scan of the stored features: an int64 sum over the same bytes (page
    cache warm), best of ``repeats``, milliseconds."""
    phi = np.load(phi_path, mmap_mode="r")
    flat = phi.reshape(-1).view(np.int64)
    flat.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        flat.sum()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


def probe(index_dir: Path, n_queries: int, rounds: int) -> dict[str, Any]:
    """Load an index in this (fresh) process and query it as the service would (one compute thread):
    load time, RSS growth after loading and after the queries, stored-id latency (the first round warms the
    page cache and the per-score weights and is not timed)."""
    from service.app import limit_threads

    limit_threads(1)  # the service's default (INFOTRACE_COMPUTE_THREADS=1)
    before = rss_bytes()
    t0 = time.perf_counter()
    engine = AttributionEngine(load_index(index_dir))
    load_s = time.perf_counter() - t0
    after_load = rss_bytes() - before
    times = []
    for r in range(rounds):
        for q in range(n_queries):
            query = engine.queries.stored(q)
            t0 = time.perf_counter()
            engine.attribute(query, Score.INFORMATION_GAIN, Direction.BOTH, 10, 100)
            if r:
                times.append((time.perf_counter() - t0) * 1e3)
    return {
        "load_s": load_s,
        "rss_after_load": after_load,
        "rss_after_queries": rss_bytes() - before,
        "query_ms": latency_stats(times),
    }


def _probe_in_subprocess(index_dir: Path, rounds: int) -> dict[str, Any]:
    queries = min(50, N_QUERIES)
    code = (
        "import json; from pathlib import Path; from benchmarks.scale import probe; "
        f"print(json.dumps(probe(Path({str(index_dir)!r}), {queries}, {rounds})))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _updates(out: Path, cache: Path, n: int, build_s: float) -> dict[str, Any]:
    """Time to add 10,000 examples and to remove 1,000 from an index, against its full build (the exact
    index, and the compact one: its add fills a FAISS shard, its removal refills every list)."""
    more, extra = draw_features(cache, ADDED, seed=7)
    t0 = time.perf_counter()
    add_features(out, np.asarray(more), outputs=extra["outputs"], targets=extra["targets"])
    add_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    remove_examples(out, np.arange(0, n, n // REMOVED)[:REMOVED])
    remove_s = time.perf_counter() - t0
    return {
        "added": ADDED,
        "add_s": add_s,
        "add_over_build": add_s / build_s,
        "removed": REMOVED,
        "remove_s": remove_s,
        "remove_over_build": remove_s / build_s,
    }


def measure(
    root: Path, cache: Path, n: int, factories: dict[str, dict[str, Any]], rounds: int
) -> dict[str, Any]:
    """Everything of one N (see the module docstring)."""
    phi, extra = draw_features(cache, n)
    rows: list[dict[str, Any]] = []
    chosen = {f: kn for f, kn in factories.items() if not (f.startswith("HNSW") and n > HNSW_MAX_N)}
    runs: dict[str, dict[str, Any]] = {"Flat": {}, **chosen}
    updates = None
    approximate_updates: dict[str, Any] = {}
    for factory, knobs in runs.items():
        out = root / f"scale-{n}-{factory.replace(',', '_')}"
        shutil.rmtree(out, ignore_errors=True)
        gc.collect()
        t0 = time.perf_counter()
        build_from_features(
            phi, out, config=IndexConfig(faiss_factory=factory, recall_queries=100, **knobs), **extra
        )
        build_s = time.perf_counter() - t0
        probed = _probe_in_subprocess(out, rounds)
        index = load_index(out)
        files = index.manifest.files
        disk = sum(f.bytes for f in files.values())
        faiss_bytes = files["faiss.index"].bytes if "faiss.index" in files else 0
        row = {
            "factory": factory,
            "knobs": knobs,
            "exact": index.manifest.faiss.exact,
            "recall_at_10": index.manifest.faiss.recall_at_10,
            "build_s": build_s,
            "load_s": probed["load_s"],
            "disk_bytes_per_example": disk / n,
            "features_bytes_per_example": files[PHI_FILE].bytes / n,
            "faiss_bytes_per_example": faiss_bytes / n,
            "rss_after_load_bytes_per_example": probed["rss_after_load"] / n,
            "rss_after_queries_bytes_per_example": probed["rss_after_queries"] / n,
            "query_ms": probed["query_ms"],
        }
        del index
        if factory == "Flat":
            row["floor_ms"] = floor_ms(out / PHI_FILE)
            row["p50_over_floor"] = row["query_ms"]["p50_ms"] / row["floor_ms"]
            updates = _updates(out, cache, n, build_s)
        elif factory in UPDATED_FACTORIES:
            approximate_updates[factory] = _updates(out, cache, n, build_s)
        rows.append(row)
        print(f"N={n} {factory}: {row}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    left_out = sorted(set(factories) - set(chosen))
    return {
        "n": n,
        "k": K,
        "methods": rows,
        "left_out": left_out,
        "updates": updates,
        "approximate_updates": approximate_updates,
    }


def render(report: dict[str, Any]) -> str:
    """The markdown report."""
    lines = [
        "# Vector store at scale",
        "",
        "Synthetic clustered features (float16 store, k = 512), built with `build_from_features`; stored-id",
        "queries in-process (information gain, top 10), after one warm-up round. Floor: one int64",
        "sum over the stored features' bytes (page cache warm): the memory-bandwidth floor of a scan.",
        "Load, RSS and latency are measured in a fresh process per index with one compute thread (the",
        "service's default). RSS: its growth after loading, and after the queries (the pages of the features",
        "the scan or the rerank touched count; they are the page cache's, shared by every process serving",
        "the index). The exact rows use the default depth 100, deepened until exact.",
        f"Machine: {report['machine'].get('cpu_model')}, {report['machine'].get('cpu_count')} CPUs, "
        f"load average at start {report['machine'].get('loadavg_at_start')}.",
        "",
        "| N | factory | recall@10 (IG) | build s | load s | disk B/ex | FAISS B/ex | RSS after load B/ex | "
        "RSS after queries B/ex | p50 ms | p99 ms | floor ms | p50 / floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for scale in report["scales"]:
        for r in scale["methods"]:
            recall = "exact" if r["exact"] else f"{r['recall_at_10']['information_gain']:.3f}"
            floor = f"{r['floor_ms']:.1f}" if "floor_ms" in r else ""
            ratio = f"{r['p50_over_floor']:.2f}" if "p50_over_floor" in r else ""
            lines.append(
                f"| {scale['n']:,} | {r['factory']} | {recall} | {r['build_s']:.1f} | {r['load_s']:.2f} | "
                f"{r['disk_bytes_per_example']:,.0f} | {r['faiss_bytes_per_example']:,.0f} | "
                f"{r['rss_after_load_bytes_per_example']:,.0f} | "
                f"{r['rss_after_queries_bytes_per_example']:,.0f} | "
                f"{r['query_ms']['p50_ms']:.2f} | {r['query_ms']['p99_ms']:.2f} | {floor} | {ratio} |"
            )
    for scale in report["scales"]:
        if scale.get("left_out"):
            lines.append(
                f"\nLeft out at N = {scale['n']:,}: {', '.join(scale['left_out'])} (HNSW graph build time on "
                f"this machine; built up to N = {HNSW_MAX_N:,})."
            )
    lines += ["", f"![recall against latency]({PLOT_FILE})"]
    lines += [
        "",
        "Updates (new versions written atomically; equal to fresh builds, see tests), against the same",
        "index's full build: the exact index, and the compact one (its add fills a FAISS shard of its own,",
        "its removal refills every list):",
        "",
        "| N | index | add 10,000 s | add / full build | remove 1,000 s | remove / full build |",
        "|---|---|---|---|---|---|",
    ]
    for scale in report["scales"]:
        updated = {"Flat": scale.get("updates"), **scale.get("approximate_updates", {})}
        for factory, u in updated.items():
            if u:
                lines.append(
                    f"| {scale['n']:,} | {factory} | {u['add_s']:.1f} | {u['add_over_build']:.2f} | "
                    f"{u['remove_s']:.1f} | {u['remove_over_build']:.2f} |"
                )
    lines += ["", "Recall@10 of every score (approximate indexes, candidates reranked exactly):", ""]
    for scale in report["scales"]:
        for r in scale["methods"]:
            if not r["exact"]:
                scores = ", ".join(f"{s} {v:.3f}" for s, v in sorted(r["recall_at_10"].items()))
                lines.append(f"- N = {scale['n']:,}, {r['factory']} {r['knobs']}: {scores}")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> Path:
    """Recall@10 (information gain) against stored-id p50 latency, one point per index, one colour per N;
    the exact scan at recall 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for scale in report["scales"]:
        xs, ys, names = [], [], []
        for r in scale["methods"]:
            xs.append(r["query_ms"]["p50_ms"])
            ys.append(1.0 if r["exact"] else r["recall_at_10"]["information_gain"])
            names.append(r["factory"])
        ax.scatter(xs, ys, label=f"N = {scale['n']:,}")
        for x, y, name in zip(xs, ys, names, strict=True):
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("stored-id query p50, ms (log scale, one compute thread)")
    ax.set_ylabel("recall@10, information gain")
    ax.set_title("Exact scan and approximate FAISS indexes, k = 512, float16 store")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and write its JSON and SCALE.md (``--render``: only rewrite SCALE.md from the
    JSON)."""
    parser = benchmark_parser("benchmarks.scale", __doc__)
    parser.add_argument("--render", action="store_true", help="rewrite SCALE.md from the JSON at --out")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scale.json"))
    parser.add_argument("--cache", type=Path, default=Path("var/bench-scale"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--factories", nargs="*", default=None, help="a subset of the approximate factories")
    parser.add_argument("--quick", action="store_true", help="N = 20,000, two factories (CI)")
    args = parser.parse_args(argv)
    if args.render:
        report = json.loads(args.out.read_text())
        write_report_files(args.out, report, render(report), "SCALE.md")
        plot(report, args.out.parent / PLOT_FILE)
        return
    sizes = [20_000] if args.quick else args.sizes
    factories = FACTORIES_QUICK if args.quick else FACTORIES_FULL
    if args.factories is not None:
        factories = {name: knobs for name, knobs in factories.items() if name in args.factories}
    root = args.cache / "indexes"
    root.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": machine_info(),
        "scales": [measure(root, args.cache, n, factories, rounds=2 if args.quick else 3) for n in sizes],
    }
    path = write_report_files(args.out, report, render(report), "SCALE.md")
    plot(report, args.out.parent / PLOT_FILE)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
