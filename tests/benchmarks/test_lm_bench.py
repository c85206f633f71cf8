"""The language-model benchmark's own bookkeeping (benchmarks/lm.py): the edit, the rank metrics and the
bergson cosine ranks, against hand-computed values."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.lm import bergson_retrieval, edit_passage, rank_metrics


def test_the_edit_drops_the_first_long_word() -> None:
    assert edit_passage("Return the number of items.") == "the number of items."
    assert edit_passage("a b c of it") == "a b c of it"  # no word of four letters: unchanged


def test_rank_metrics() -> None:
    got = rank_metrics([1, 2, 11, 1])
    assert got == {"recall_at_1": 0.5, "recall_at_10": 0.75, "mrr": (1 + 0.5 + 1 / 11 + 1) / 4}


def test_bergson_cosine_ranks_the_planted_rows(tmp_path: Path) -> None:
    # 3 original training rows, then the copies of queries 0 and 1 (rows 3, 4)
    train = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.9, 0.1], [-1.0, 0.2]])
    query = np.array([[1.0, 0.05], [0.0, 1.0]])
    np.savez(tmp_path / "f.npz", train=train, query=query)
    # query 0: row 3 (cos 0.998) below row 0 (0.9988): rank 2
    # query 1: row 4 (cos 0.196) below rows 1 and 2: rank 3
    assert bergson_retrieval(tmp_path / "f.npz", n_train=3, n_planted=2) == rank_metrics([2, 3])


def test_the_report_renders_the_committed_run_and_methods_that_did_not_run() -> None:
    """The committed LM.md is what markdown_report makes of the committed lm.json; without bergson (as in
    CI's quick mode) its rows say why instead of failing."""
    import copy
    import json

    from benchmarks.lm import markdown_report

    results = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    report = json.loads((results / "lm.json").read_text())
    assert markdown_report(report) == (results / "LM.md").read_text()
    missing = {"error": "bergson is not installed"}
    without = copy.deepcopy(report)
    without["throughput"]["bergson (InMemoryCollector)"] = missing
    without["throughput_ratios"]["infotrace / bergson"] = None
    without["planted"]["bergson cosine"] = missing
    text = markdown_report(without)
    assert text.count("not run: bergson is not installed") == 2 and "infotrace / bergson -" in text
