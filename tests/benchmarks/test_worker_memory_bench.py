"""The committed worker-memory report is what its JSON renders to, shows the index shared by two workers,
and the /proc readers read this process right."""

from __future__ import annotations

import json
import os
from pathlib import Path

from benchmarks.worker_memory import SMAPS_FIELDS, markdown, smaps_rollup

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def test_the_committed_report_is_its_json_rendered_and_shows_sharing() -> None:
    report = json.loads((RESULTS / "workers.json").read_text())
    assert (RESULTS / "WORKERS.md").read_text() == markdown(report)
    runs = {run["workers"]: run for run in report["runs"]}
    phi = report["settings"]["phi_bytes"]
    two = [p for p in runs[2]["processes"] if p["role"] != "master"]
    assert len(two) == 2 and all(
        n >= report["settings"]["queries_per_worker"] for n in runs[2]["per_worker"].values()
    )
    # each worker maps all of phi (RSS), but it is shared: neither holds it privately
    assert all(p["Rss"] > phi and p["Private_Clean"] + p["Private_Dirty"] < phi for p in two)
    assert sum(p["Pss"] for p in two) < sum(p["Rss"] for p in two) - phi / 2


def test_smaps_rollup_reads_this_process() -> None:
    mine = smaps_rollup(os.getpid())
    assert set(mine) == set(SMAPS_FIELDS) and mine["Rss"] >= mine["Pss"] > 0
