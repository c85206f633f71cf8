"""End to end: a small index on the real digits, served by a live uvicorn process on a free loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from indexer.data import Dataset
from indexer.enums import Direction, Score
from indexer.index_format import load_index
from service.engine import AttributionEngine

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def live_url(index_root: Path) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "INFOTRACE_INDEX_ROOT": str(index_root), "INFOTRACE_PORT": str(port)}
    cli = Path(sys.executable).with_name("infotrace-serve")
    proc = subprocess.Popen(
        [str(cli), "run", "--log-level", "warning"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited early: {proc.stdout.read() if proc.stdout else ''}")
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        else:
            raise TimeoutError("server did not become ready within 60 s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_live_server_answers_like_the_library(live_url: str, index_root: Path, test_digits: Dataset) -> None:
    engine = AttributionEngine(load_index(index_root / "digits"))
    with httpx.Client(base_url=live_url, timeout=30) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/v1/indexes").json()["indexes"][0]["name"] == "digits"
        for i in (0, 1, 2):
            body = {
                "query": {"input": test_digits.inputs[i].tolist()},
                "top_k": 10,
                "score": "information_loss",
            }
            response = client.post("/v1/indexes/digits/attributions", json=body)
            assert response.status_code == 200, response.text
            got = response.json()
            query = engine.input_query(test_digits.inputs[i].tolist())
            ranked = engine.rank(query.terms, Score.INFORMATION_LOSS, Direction.BOTH, 10, 100)
            assert [r["id"] for r in got["results"]] == ranked.ids.tolist()
            assert np.isclose(got["query"]["posterior_variance"], query.terms.posterior_variance, rtol=1e-9)
        bad = client.post("/v1/indexes/digits/attributions", json={"query": {"input": [1.0, 2.0]}})
        assert bad.status_code == 422 and "shape [784]" in bad.json()["detail"]
        assert client.get("/readyz").status_code == 200
