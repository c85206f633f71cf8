"""Several worker processes in a live ``infotrace-serve run`` (gunicorn master, uvicorn workers): both
workers answer, a worker killed with SIGKILL is replaced while the other keeps answering, and the metrics
add up across workers. (SIGTERM letting in-flight requests finish: ``test_concurrency.py``, which runs the
default number of workers, one per CPU.)"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.live_server import RunningService, running_service
from benchmarks.worker_memory import children

pytestmark = pytest.mark.slow

ATTRIBUTIONS = "/v1/indexes/digits/attributions"


@pytest.fixture(scope="module")
def service(index_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    log_path = tmp_path_factory.mktemp("workers") / "server.log"
    with running_service(index_root, log_path, {"INFOTRACE_WORKERS": "2"}) as running:
        yield running


def pid_of(client: httpx.Client) -> int:
    """The worker behind this client's keep-alive connection."""
    response = client.get("/healthz")
    assert response.status_code == 200
    return int(response.json()["pid"])


def clients_on_each_worker(url: str, wanted: set[int]) -> dict[int, list[httpx.Client]]:
    """Open keep-alive connections until each worker holds at least two."""
    by_worker: dict[int, list[httpx.Client]] = {pid: [] for pid in wanted}
    for _ in range(200):
        if all(len(c) >= 2 for c in by_worker.values()):
            return by_worker
        client = httpx.Client(base_url=url, timeout=30, limits=httpx.Limits(max_connections=1))
        by_worker.setdefault(pid_of(client), []).append(client)
    raise AssertionError(f"the kernel never gave a connection to each worker: {by_worker}")


def attributions_counted(url: str) -> float:
    """``infotrace_requests_total`` of the attribution route, every status, as /metrics reports it."""
    text = httpx.get(url + "/metrics", timeout=30).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "infotrace_requests_total"
        and sample.labels.get("route") == "/v1/indexes/{name}/attributions"
    )


def test_both_workers_answer_and_the_metrics_add_up(service: RunningService) -> None:
    pids = set(children(service.process.pid))
    assert len(pids) == 2
    before = attributions_counted(service.url)
    by_worker = clients_on_each_worker(service.url, pids)
    sent = 0
    for clients in by_worker.values():
        for client in clients:
            for i in range(5):
                response = client.post(ATTRIBUTIONS, json={"query": {"id": i}, "top_k": 3})
                assert response.status_code == 200
                sent += 1
            client.close()
    # whichever worker answers /metrics, it reports the sum over both
    assert [attributions_counted(service.url) - before for _ in range(4)] == [sent] * 4


def test_a_killed_worker_is_replaced_and_the_other_keeps_answering(service: RunningService) -> None:
    master = service.process.pid
    pids = set(children(master))
    by_worker = clients_on_each_worker(service.url, pids)
    victim, survivor = sorted(pids)
    expected = by_worker[survivor][0].post(ATTRIBUTIONS, json={"query": {"id": 2}, "top_k": 5}).json()
    os.kill(victim, signal.SIGKILL)
    answers = []
    for _ in range(10):  # while the master notices and forks a replacement
        for client in by_worker[survivor]:
            response = client.post(ATTRIBUTIONS, json={"query": {"id": 2}, "top_k": 5})
            assert response.status_code == 200, response.text
            answers.append(response.json())
    assert all(a["results"] == expected["results"] for a in answers)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        current = children(master)
        if len(current) == 2 and victim not in current:
            break
        time.sleep(0.2)
    replacement = set(children(master)) - {survivor}
    assert len(replacement) == 1 and victim not in replacement, children(master)
    # the replacement answers once its indexes are loaded (it accepts no connection before)
    seen: set[int] = set()
    deadline = time.monotonic() + 60
    while replacement - seen and time.monotonic() < deadline:
        with httpx.Client(base_url=service.url, timeout=30) as fresh:
            seen.add(pid_of(fresh))
            assert (
                fresh.post(ATTRIBUTIONS, json={"query": {"id": 2}, "top_k": 5}).json()["results"]
                == (expected["results"])
            )
    assert replacement <= seen
    for clients in by_worker.values():
        for client in clients:
            client.close()
