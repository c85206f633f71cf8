"""A new version of an index (an update's add or remove) is picked up by the running service without a
restart: every request during the switch succeeds and answers as one of the two versions, then the new one."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

from indexer.precomputed import build_from_features
from indexer.update import add_features, remove_examples
from service.app import create_app
from service.core.settings import Settings

K = 16


def _answer(client: TestClient, query_id: int) -> tuple[int, list[int]]:
    found = client.post("/v1/indexes/live/attributions", json={"query": {"id": query_id}, "top_k": 5})
    assert found.status_code == 200, found.text
    body = found.json()
    return body["query"]["id"], [r["id"] for r in body["results"]]


def _answers(client: TestClient) -> dict[int, list[int]]:
    return dict(_answer(client, q) for q in range(6))


def _served_n_train(client: TestClient) -> int:
    return int(client.get("/v1/indexes/live").json()["n_train"])


def test_updates_are_served_without_a_restart_and_without_failed_requests(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    phi = rng.standard_normal((6000, K)).astype(np.float32)
    outputs = phi @ rng.standard_normal(K)
    targets = (outputs > 0).astype(np.int64)
    queries = {"query_phi": rng.standard_normal((6, K)).astype(np.float32), "query_outputs": np.zeros(6),
               "query_targets": np.ones(6, dtype=np.int64)}  # fmt: skip
    root = tmp_path / "root"
    index = build_from_features(
        phi[:5000], root / "live", outputs=outputs[:5000], targets=targets[:5000], **queries
    )
    with TestClient(create_app(Settings(index_root=root, reload_interval=0.05))) as client:
        before = _answers(client)
        seen: list[tuple[int, list[int]]] = []
        failures: list[str] = []
        done = threading.Event()

        def hammer() -> None:
            while not done.is_set():
                try:
                    seen.append(_answer(client, len(seen) % 6))
                except AssertionError as exc:
                    failures.append(str(exc))

        threads = [threading.Thread(target=hammer) for _ in range(3)]
        for t in threads:
            t.start()
        add_features(index, phi[5000:], outputs=outputs[5000:], targets=targets[5000:])
        deadline = time.monotonic() + 20
        while _served_n_train(client) != 6000 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # more requests on the new version
        done.set()
        for t in threads:
            t.join()
        after = _answers(client)
        assert _served_n_train(client) == 6000 and failures == []
        assert after != before  # 1,000 more examples change some top 5
        assert len(seen) > 10 and all(ids in (before[q], after[q]) for q, ids in seen)

        remove_examples(index, list(range(5000, 6000)))  # back to the first 5,000: the first answers again
        deadline = time.monotonic() + 20
        while _served_n_train(client) != 5000 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _answers(client) == before
        metrics = client.get("/metrics").text
        assert 'infotrace_index_examples{index="live"} 5000.0' in metrics
