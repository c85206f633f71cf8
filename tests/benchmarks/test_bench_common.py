"""What the benchmarks share: latency statistics against numpy, machine records, report files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.common import (
    LATENCY_KEYS,
    harness_machine_info,
    latency_stats,
    machine_info,
    write_json,
    write_report_files,
)


def test_latency_stats_match_numpy() -> None:
    values = [5.0, 1.0, 3.0, 2.0, 4.0, 100.0]
    stats = latency_stats(values)
    assert list(stats) == ["n", *LATENCY_KEYS]
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    assert stats == {
        "n": 6,
        "p50_ms": p50,
        "p90_ms": p90,
        "p99_ms": p99,
        "mean_ms": np.mean(values),
        "min_ms": 1.0,
        "max_ms": 100.0,
    }
    assert latency_stats(values, allow_empty=True) == stats


def test_latency_stats_of_nothing_raise_or_are_none() -> None:
    with pytest.raises(ValueError, match="no latencies"):
        latency_stats([])
    assert latency_stats([], allow_empty=True) == dict.fromkeys(LATENCY_KEYS, None) | {"n": 0}


def test_machine_records_keep_their_report_keys() -> None:
    assert list(machine_info()) == [
        "platform",
        "machine",
        "cpu_model",
        "cpu_count",
        "cpus_usable",
        "torch_threads",
        "faiss_omp_threads",
        "thread_env",
        "python",
        "versions",
        "date_utc",
        "loadavg_at_start",
    ]
    brief = harness_machine_info(["numpy", "no-such-distribution"])
    assert list(brief) == ["platform", "processor", "cpu_count", "torch_threads", "python", "versions"]
    assert brief["versions"] == {"numpy": np.__version__, "no-such-distribution": None}


def test_report_files_are_json_and_markdown_side_by_side(tmp_path) -> None:
    out = tmp_path / "new" / "speed.json"
    markdown = write_report_files(out, {"b": 1, "a": [1.5]}, "# report\n", "SPEED.md")
    assert markdown == out.parent / "SPEED.md" and markdown.read_text() == "# report\n"
    assert out.read_text() == json.dumps({"b": 1, "a": [1.5]}, indent=2) + "\n"
    assert write_json(tmp_path / "q.json", {"x": 1}, indent=1).read_text() == '{\n "x": 1\n}\n'
