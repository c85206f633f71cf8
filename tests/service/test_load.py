"""A short form of the load benchmark (``benchmarks/load.py``, locust in a subprocess): 8 concurrent clients
for about 5 s against a live ``infotrace-serve run`` on the small test index, a run bounded by its request
count, and the batch phase. Zero errors and only 200s; no latency assertion."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.load import (
    is_loopback_url,
    parse_args,
    run_batch_load,
    run_load,
    server_memory,
    spawned_server,
)
from indexer.data import Dataset

pytestmark = pytest.mark.slow


def test_short_load_has_no_errors(index_root: Path, test_digits: Dataset, tmp_path: Path) -> None:
    inputs = [row.tolist() for row in test_digits.inputs]
    with spawned_server(index_root, tmp_path / "server.log") as server:
        url = server.url
        report = run_load(url, clients=8, duration_s=5.0, max_requests=20_000, test_inputs=inputs, seed=1)
        bounded = run_load(url, clients=8, duration_s=30.0, max_requests=24, test_inputs=inputs, seed=2)
        batch = run_batch_load(url, clients=2, duration_s=3.0, batch_size=5, seed=3)
        memory = server_memory(server.pid)

    requests = report["requests"]
    assert report["errors"] == {"count": 0, "by_kind": {}, "samples": []}
    assert list(requests["by_status"]) == ["200"]
    assert requests["completed"] == requests["issued"] == requests["by_status"]["200"] > 0
    assert {"stored_id", "raw_input", "list_indexes"} <= set(requests["by_kind"])
    assert requests["per_worker_min"] > 0  # all 8 clients got answers
    assert report["stopped_by"] == "duration"
    assert report["wall_seconds"] < 5.0 + 30.0  # the duration bound held (a generous bound, not a timing)
    assert report["latency_ms"]["ok"]["overall"]["n"] == requests["completed"]

    assert bounded["stopped_by"] == "max_requests"
    assert bounded["requests"]["completed"] == bounded["requests"]["issued"] == 24
    assert bounded["errors"]["count"] == 0 and report["load_tool"].startswith("locust ")

    assert batch["available"] and batch["errors"]["count"] == 0 and batch["batches"] > 0
    assert batch["items_by_status"] == {"200": 5 * batch["batches"]}
    assert batch["stored_queries_per_s"] > 0
    roles = [p["role"] for p in memory]
    assert roles[0] == "master" and len(roles) >= 2 and all(p["Rss"] >= p["Pss"] > 0 for p in memory)


def test_load_targets_loopback_only() -> None:
    assert is_loopback_url("http://127.0.0.1:8000") and is_loopback_url("http://localhost:1")
    assert is_loopback_url("http://[::1]:8000")
    assert not is_loopback_url("http://10.0.0.5:8000") and not is_loopback_url("http://example.com")
    assert not is_loopback_url("ftp://127.0.0.1/") and not is_loopback_url("not a url")
    with pytest.raises(ValueError, match="only loopback"):
        run_load("http://192.0.2.1:8000", clients=1, duration_s=1.0, max_requests=1)
    with pytest.raises(SystemExit):
        parse_args(["--url", "http://192.0.2.1:8000"])
