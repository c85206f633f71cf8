"""Language-model benchmark on the text demo (issue #12): featurization throughput beside bergson and the
floor, query latency, and retrieval of planted near-copies, in one run.

Run from the repository root::

    .venv/bin/python -m benchmarks.lm [--quick] [--out benchmarks/results/lm.json]

1. The model is the text demo's (``stdlib-lm``: :mod:`indexer.demo.lm`, built under ``--index-root`` if it
   is not there), its inputs the demo's training passages (`(n, 64)` token ids).
2. Throughput, on the first ``n_throughput`` passages in batches of ``batch_size``, ``rounds`` times with
   the methods in turn (the medians and the median same-round ratios are reported): infotrace's Kronecker
   featurizer (the index's own plan, k = 512), bergson's ``InMemoryCollector`` (per-module two-sided
   projection with the same total k, the same summed margins backpropagated) when bergson is installed
   (``make bench-featurize`` installs it in ``var/bergson-venv``; it runs in that interpreter as a
   subprocess), and the floor (one forward and backward of the summed margins, no features). Examples/s and
   tokens/s (real tokens, padding excluded) of the median batch after a warm-up batch.
3. Latency, in process: a text query with a given continuation, a greedy one (16 tokens), a stored query;
   featurization and ranking (top 10 by information loss) each, p50/p90.
4. Planted copies: for ``n_planted`` stored queries (held-out passages) a lightly edited copy (one word
   dropped) is added to the training set and the index rebuilt with the same model; each query's copy
   should rank first. Recall@1, recall@10 and MRR per score (and for bergson's features by cosine, when it
   is installed). The model never saw the copies in training: this measures whether the features recognise
   a near-duplicate, the retrieval use of attribution (the target: recall@10 >= 0.95 for the best score).

Writes ``--out`` (JSON) and ``LM.md`` beside it. Figures are reported, never asserted.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from benchmarks.common import benchmark_parser, latency_stats, load_average, machine_info, write_report_files
from indexer.build import build_index
from indexer.config import IndexConfig
from indexer.data import Dataset
from indexer.demo.lm import TEXT_DEMO_NAME, build_text_demo_index
from indexer.demo.text import encode_passages
from indexer.enums import Direction, Score
from indexer.features.hooks import HookFeaturizer
from indexer.features.language import IGNORE_INDEX, LanguageModelMargin, causal_lm_targets
from indexer.features.projection import KroneckerProjection
from indexer.store.reader import IndexData, load_index
from service.engine import AttributionEngine

__all__ = [
    "FULL",
    "QUICK",
    "Settings",
    "bergson_retrieval",
    "edit_passage",
    "main",
    "planted_retrieval",
    "markdown_report",
    "rank_metrics",
]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BERGSON_PYTHON = PROJECT_ROOT / "var" / "bergson-venv" / "bin" / "python"
"""Where ``make bench-featurize`` installs bergson (a venv of its own, see the Makefile)."""


@dataclass(frozen=True)
class Settings:
    """One mode of the benchmark.

    Attributes:
        n_throughput: passages featurized per method; batch_size: passages per batch.
        n_latency: repetitions per query kind; n_planted: planted copies (stored queries).
        rounds: throughput rounds (each method once per round, in turn; medians are reported).
    """

    n_throughput: int
    batch_size: int
    n_latency: int
    n_planted: int
    rounds: int


FULL = Settings(n_throughput=256, batch_size=32, n_latency=30, n_planted=100, rounds=4)
QUICK = Settings(n_throughput=96, batch_size=32, n_latency=3, n_planted=10, rounds=1)

_WORD = re.compile(r"\b[A-Za-z]{4,}\b ")


def edit_passage(text: str) -> str:
    """A light edit: the first word of four letters or more (with its space) dropped; the text unchanged
    when it has none."""
    return _WORD.sub("", text, count=1)


def _batches(index: IndexData, n: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    assert index.inputs is not None  # the demo stores its inputs
    ids = torch.from_numpy(np.array(index.inputs[:n]))
    targets = torch.from_numpy(np.array(index.examples["label"][:n]))
    return [(ids[i : i + batch_size], targets[i : i + batch_size]) for i in range(0, n, batch_size)]


def _rates(seconds: list[float], batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Examples/s and tokens/s of the median batch after the first (the warm-up)."""
    timed = list(zip(seconds, batches, strict=True))[1:] or list(zip(seconds, batches, strict=True))
    per_example = statistics.median(s / len(b[0]) for s, b in timed)
    tokens = sum(int((b[1] != IGNORE_INDEX).sum()) + len(b[1]) for _, b in timed)  # targets + the first token
    examples = sum(len(b[0]) for _, b in timed)
    return {
        "examples_per_s": 1.0 / per_example,
        "tokens_per_s": (tokens / examples) / per_example,
        "batches_timed": len(timed),
    }


def _infotrace_throughput(
    engine: AttributionEngine, batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, Any]:
    proj = engine.data.manifest.projection
    plan = KroneckerProjection.from_coverage_json(proj.seed, proj.entries, proj.coverage or {})
    model = engine.queries.model
    assert model is not None
    output_fn = LanguageModelMargin(engine.queries.output_fn.vocab_size)  # type: ignore[attr-defined]
    seconds = []
    with HookFeaturizer(model, plan) as featurizer:
        for ids, targets in batches:
            started = time.perf_counter()
            featurizer.featurize(output_fn, ids, targets)
            seconds.append(time.perf_counter() - started)
    return {**_rates(seconds, batches), "k": plan.k}


def _floor_throughput(
    engine: AttributionEngine, batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, Any]:
    model = engine.queries.model
    assert model is not None
    output_fn = engine.queries.output_fn
    seconds = []
    for ids, targets in batches:
        started = time.perf_counter()
        logits = model(ids).reshape(len(ids), -1)
        torch.func.vmap(output_fn.output)(logits, targets).sum().backward()
        model.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - started)
    return _rates(seconds, batches)


def _bergson_run(
    index_dir: Path, n: int, batch_size: int, k: int, features_out: Path | None
) -> dict[str, Any]:
    """bergson on the demo model in its own interpreter (:mod:`benchmarks.lm_bergson`); ``{"error": ...}``
    when it is not installed or fails."""
    if not BERGSON_PYTHON.is_file():
        return {
            "error": f"bergson is not installed ({BERGSON_PYTHON} missing; make bench-featurize installs it)"
        }
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "bergson.json"
        command = [
            str(BERGSON_PYTHON), "-m", "benchmarks.lm_bergson", "--index", str(index_dir), "--n", str(n),
            "--batch-size", str(batch_size), "--k", str(k), "--out", str(out),
        ]  # fmt: skip
        if features_out is not None:
            command += ["--features", str(features_out)]
        done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            return {"error": f"bergson failed: {done.stderr.strip().splitlines()[-1:]}"}
        result: dict[str, Any] = json.loads(out.read_text())
        return result


THROUGHPUT_METHODS = (
    "infotrace (Kronecker hooks)",
    "bergson (InMemoryCollector)",
    "floor (forward + backward)",
)
"""The throughput table's rows, in the order they run in each round."""


def _median_round(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One method's rounds: the median examples/s and tokens/s, each round's examples/s, or the error."""
    ok = [run for run in runs if "error" not in run]
    if not ok:
        return runs[0]
    return {
        **ok[0],
        "examples_per_s": statistics.median(run["examples_per_s"] for run in ok),
        "tokens_per_s": statistics.median(run["tokens_per_s"] for run in ok),
        "rounds_examples_per_s": [run["examples_per_s"] for run in ok],
    }


def _ratios(rounds: dict[str, list[dict[str, Any]]]) -> dict[str, float | None]:
    """Median over rounds of infotrace's examples/s over bergson's and over the floor's (same round)."""
    ours, bergson, floor = (rounds[name] for name in THROUGHPUT_METHODS)

    def median_ratio(other: list[dict[str, Any]]) -> float | None:
        pairs = [
            a["examples_per_s"] / b["examples_per_s"]
            for a, b in zip(ours, other, strict=True)
            if "error" not in b
        ]
        return statistics.median(pairs) if pairs else None

    return {"infotrace / bergson": median_ratio(bergson), "infotrace / floor": median_ratio(floor)}


def _latency(engine: AttributionEngine, n: int) -> dict[str, Any]:
    kinds = {
        "text, given continuation": lambda: engine.queries.text("Return the number of", " items in the list"),
        "text, greedy 16 tokens": lambda: engine.queries.text("Return the number of", None, 16),
        "stored query": lambda: engine.queries.stored(0),
    }
    report = {}
    for name, make in kinds.items():
        featurize_ms, rank_ms = [], []
        for _ in range(n):
            started = time.perf_counter()
            query = make()
            featurized = time.perf_counter()
            engine.rank(query, Score.INFORMATION_LOSS, Direction.BOTH, 10, 100)
            featurize_ms.append((featurized - started) * 1e3)
            rank_ms.append((time.perf_counter() - featurized) * 1e3)
        report[name] = {"featurize": latency_stats(featurize_ms), "rank": latency_stats(rank_ms)}
    return report


def rank_metrics(ranks: list[int]) -> dict[str, float]:
    """Recall@1, recall@10 and MRR of 1-based ranks."""
    r = np.asarray(ranks)
    return {
        "recall_at_1": float(np.mean(r == 1)),
        "recall_at_10": float(np.mean(r <= 10)),
        "mrr": float(np.mean(1.0 / r)),
    }


def planted_retrieval(index: IndexData, planted_dir: Path, n_planted: int) -> dict[str, Any]:
    """Plant an edited copy of each of the first ``n_planted`` stored queries in the training set, rebuild
    the index with the same model under ``planted_dir`` (the copies are training examples ``n_train ..``,
    the first ``n_planted`` stored queries its queries), and rank each query's copy by every score.

    Returns:
        per score: recall@1, recall@10, MRR; ``n_planted`` and how many copies differ from their query.
    """
    engine = AttributionEngine(index)
    tokenizer, model = engine.queries.tokenizer, engine.queries.model
    assert index.inputs is not None and index.query_inputs is not None and model is not None
    assert index.manifest.model.spec is not None
    queries = [index.metadata.get_one("query", i)["text"] for i in range(n_planted)]
    copies = [edit_passage(text) for text in queries]
    ids, mask = encode_passages(tokenizer, copies, int(index.inputs.shape[1]))
    n_train = index.n_train
    train = Dataset(
        torch.cat([torch.from_numpy(np.array(index.inputs)), ids]),
        torch.cat([torch.from_numpy(np.array(index.examples["label"])), causal_lm_targets(ids, mask)]),
        metadata=[index.metadata.get_one("train", i) for i in range(n_train)] + [{"text": t} for t in copies],
    )
    stored = Dataset(
        torch.from_numpy(np.array(index.query_inputs[:n_planted])),
        torch.from_numpy(np.array(index.queries["label"][:n_planted])),
        metadata=[{"text": t} for t in queries],
    )
    k = index.manifest.extra.get("demo", {}).get("k", index.k)
    config = IndexConfig(k=k, seed=index.manifest.projection.seed)
    build_index(
        model, engine.queries.output_fn, train, planted_dir, queries=stored,
        model_spec=index.manifest.model.spec, config=config, progress=False,
    )  # fmt: skip
    planted = AttributionEngine(load_index(planted_dir))
    edited = sum(c != q for c, q in zip(copies, queries, strict=True))
    report: dict[str, Any] = {"n_planted": n_planted, "edited": edited}
    n = planted.data.n_train
    for score in Score:
        ranks = []
        for q in range(n_planted):
            ranked = planted.rank(planted.queries.stored(q), score, Direction.BOTH, n, n).ids.tolist()
            ranks.append(ranked.index(n_train + q) + 1)
        report[score.value] = rank_metrics(ranks)
    return report


def bergson_retrieval(features: Path, n_train: int, n_planted: int) -> dict[str, float]:
    """Recall@1, recall@10 and MRR of each planted copy by the cosine of bergson's features (``.npz`` with
    ``train`` `(n_train + n_planted, k)` and ``query`` `(n_planted, k)`)."""
    with np.load(features) as arrays:
        train, query = arrays["train"].astype(np.float64), arrays["query"].astype(np.float64)
    train /= np.linalg.norm(train, axis=1, keepdims=True) + 1e-300
    query /= np.linalg.norm(query, axis=1, keepdims=True) + 1e-300
    cosine = query @ train.T
    return rank_metrics([int((cosine[q] > cosine[q, n_train + q]).sum()) + 1 for q in range(n_planted)])


def markdown_report(report: dict[str, Any]) -> str:
    """``LM.md`` from the report :func:`main` writes (a method that did not run gets a row saying why)."""
    s, m = report["settings"], report["model"]
    lines = [
        "# Language model: the text demo (`benchmarks/lm.py`)",
        "",
        f"Model: the text demo's GPT ({m['n_params']:,} parameters, {m['length']} positions, vocabulary "
        f"{m['vocab']}); {s['n_throughput']} training passages per method and round, batches of "
        f"{s['batch_size']}; on "
        f"{report['machine']['cpu_count']} CPUs "
        f"(load average at start {report['loadavg_at_start']}). {report['mode']} mode.",
        "",
        "## Featurization throughput",
        "",
        "| method | examples/s | tokens/s | k |",
        "|---|---|---|---|",
    ]
    for name, row in report["throughput"].items():
        if "error" in row:
            lines.append(f"| {name} | not run: {row['error']} | | |")
        else:
            k = row.get("k", "-")
            lines.append(f"| {name} | {row['examples_per_s']:.1f} | {row['tokens_per_s']:.0f} | {k} |")
    ratios = report["throughput_ratios"]
    shown = {name: "-" if value is None else f"{value:.2f}" for name, value in ratios.items()}
    lines += [
        "",
        f"Median of {s['rounds']} rounds, the methods in turn within each round; median ratio of the same "
        f"round's examples/s: infotrace / bergson {shown['infotrace / bergson']}, infotrace / floor "
        f"{shown['infotrace / floor']}.",
    ]
    lines += ["", "## Query latency (in process, ms)", ""]
    lines += ["| query | featurize p50 | p90 | rank top 10 p50 |", "|---|---|---|---|"]
    for name, row in report["latency"].items():
        lines.append(
            f"| {name} | {row['featurize']['p50_ms']:.1f} | {row['featurize']['p90_ms']:.1f} | "
            f"{row['rank']['p50_ms']:.2f} |"
        )
    planted = report["planted"]
    lines += [
        "",
        f"## Planted near-copies ({planted['n_planted']} stored queries, each with a copy missing one word "
        f"in the training set; {planted['edited']} copies differ from their query)",
        "",
        "| score | recall@1 | recall@10 | MRR |",
        "|---|---|---|---|",
    ]
    for name, row in planted.items():
        if isinstance(row, dict) and "error" in row:
            lines.append(f"| {name} | not run: {row['error']} | | |")
        elif isinstance(row, dict):
            lines.append(
                f"| {name} | {row['recall_at_1']:.3f} | {row['recall_at_10']:.3f} | {row['mrr']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; write the JSON and ``LM.md``."""
    parser = benchmark_parser("benchmarks.lm", __doc__)
    parser.add_argument("--quick", action="store_true", help="small counts (CI)")
    parser.add_argument("--index-root", type=Path, default=Path("var/indexes"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lm.json"))
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    index_dir = build_text_demo_index(args.index_root, progress=False)
    index = load_index(index_dir)
    engine = AttributionEngine(index)
    report: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "machine": machine_info(),
        "loadavg_at_start": load_average(),
        "settings": vars(settings),
        "model": {
            "name": TEXT_DEMO_NAME,
            "n_params": index.manifest.model.n_params,
            "length": int(index.manifest.model.input_shape[0]),
            "vocab": engine.queries.output_fn.vocab_size,  # type: ignore[attr-defined]
        },
    }
    batches = _batches(index, settings.n_throughput, settings.batch_size)
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in THROUGHPUT_METHODS}
    for _ in tqdm(range(settings.rounds), desc="throughput rounds", disable=args.quick):
        # the methods take turns, round after round: the machine's load changes, their ratio less
        rounds[THROUGHPUT_METHODS[0]].append(_infotrace_throughput(engine, batches))
        rounds[THROUGHPUT_METHODS[1]].append(
            _bergson_run(index_dir, settings.n_throughput, settings.batch_size, index.k, None)
        )
        rounds[THROUGHPUT_METHODS[2]].append(_floor_throughput(engine, batches))
    report["throughput"] = {name: _median_round(runs) for name, runs in rounds.items()}
    report["throughput_ratios"] = _ratios(rounds)
    report["latency"] = _latency(engine, settings.n_latency)
    with tempfile.TemporaryDirectory(dir=args.index_root.parent) as scratch:
        planted_dir = Path(scratch) / "planted"
        report["planted"] = planted_retrieval(index, planted_dir, settings.n_planted)
        features = Path(scratch) / "bergson-features.npz"
        n_planted_train = index.n_train + settings.n_planted
        run = _bergson_run(planted_dir, n_planted_train, settings.batch_size, index.k, features)
        if "error" in run:
            report["planted"]["bergson cosine"] = run
        else:
            report["planted"]["bergson cosine"] = bergson_retrieval(
                features, index.n_train, settings.n_planted
            )
    markdown = write_report_files(args.out, report, markdown_report(report), "LM.md")
    print(markdown.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
