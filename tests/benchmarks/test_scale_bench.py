"""The committed scale report is what its JSON renders to, and it holds the rows the README quotes."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.scale import render

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def test_the_committed_scale_report_is_its_json_rendered() -> None:
    report = json.loads((RESULTS / "scale.json").read_text())
    assert (RESULTS / "SCALE.md").read_text() == render(report)
    sizes = [scale["n"] for scale in report["scales"]]
    assert sizes == [100_000, 1_000_000]
    million = {row["factory"]: row for row in report["scales"][1]["methods"]}
    assert million["Flat"]["exact"] and million["Flat"]["disk_bytes_per_example"] <= 4 * 512 + 64
    assert million["IVF1024,Flat"]["recall_at_10"]["information_gain"] >= 0.95
    assert (RESULTS / "scale_recall_latency.png").stat().st_size > 10_000
