"""End to end: a small index on the real digits, served by a live uvicorn process on a free loopback port."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from benchmarks.live_server import running_service
from indexer.data import Dataset
from indexer.enums import Direction, Score
from indexer.store.reader import load_index
from service.engine import AttributionEngine

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def live_url(index_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_service(index_root, tmp_path_factory.mktemp("live") / "server.log") as service:
        yield service.url


def test_live_server_answers_like_the_library(live_url: str, index_root: Path, test_digits: Dataset) -> None:
    engine = AttributionEngine(load_index(index_root / "digits"))
    with httpx.Client(base_url=live_url, timeout=30) as client:
        assert client.get("/healthz").json()["status"] == "ok"
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
            query = engine.queries.input(test_digits.inputs[i].tolist())
            ranked = engine.rank(query, Score.INFORMATION_LOSS, Direction.BOTH, 10, 100)
            assert [r["id"] for r in got["results"]] == ranked.ids.tolist()
            assert np.isclose(got["query"]["posterior_variance"], query.terms.posterior_variance, rtol=1e-9)
        bad = client.post("/v1/indexes/digits/attributions", json={"query": {"input": [1.0, 2.0]}})
        assert bad.status_code == 422 and "shape [784]" in bad.json()["detail"]
        assert client.get("/readyz").status_code == 200


def _exchange(port: int, request: bytes) -> bytes:
    """Send raw bytes on a fresh connection; everything the server answers until it closes it."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def test_a_client_that_sends_less_than_it_announces_is_cut_off(
    index_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Issue #16 case 6: a Content-Length longer than the body held the connection with no time limit; now
    it gets 408 after INFOTRACE_BODY_TIMEOUT_S and the connection is closed. The service keeps serving."""
    import socket
    import time

    log = tmp_path_factory.mktemp("slow") / "server.log"
    with running_service(index_root, log, env={"INFOTRACE_BODY_TIMEOUT_S": "1"}) as service:
        with socket.create_connection(("127.0.0.1", service.port), timeout=20) as sock:
            sock.sendall(
                b"POST /v1/indexes/digits/attributions HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n" + b'{"query": {"id"'
            )
            started = time.monotonic()
            received = b""
            while chunk := sock.recv(65536):  # b"" once the server closes the connection
                received += chunk
            waited = time.monotonic() - started
        assert received.startswith(b"HTTP/1.1 408 "), received[:200]
        assert b"request body not received within 1.0 s (INFOTRACE_BODY_TIMEOUT_S)" in received
        assert 0.5 < waited < 15  # cut off after about the timeout, not held open
        # a chunked body that never ends: the same, and the message speaks of chunks
        chunked = _exchange(
            service.port,
            b"POST /v1/indexes/digits/attributions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"que\r\n',
        )
        assert chunked.startswith(b"HTTP/1.1 408 ") and b"the final zero-length chunk" in chunked
        # two framings at once (request smuggling): refused before the body is read
        both = _exchange(
            service.port,
            b"POST /v1/indexes/digits/attributions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        )
        assert both.startswith(b"HTTP/1.1 400 ") and b"both Content-Length and Transfer-Encoding" in both
        # requests h11 cannot parse: uvicorn answered plain text; JSON like every other error now
        for framing in (b"Content-Length: abc", b"Content-Length: 4\r\nContent-Length: 5", b"NoColonHere"):
            broken = _exchange(
                service.port,
                b"POST /v1/indexes/digits/attributions HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n\r\n",
            )
            head, _, payload = broken.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400 ") and b"content-type: application/json" in head.lower()
            assert json.loads(payload) == {
                "detail": "malformed HTTP/1.1 request: Invalid HTTP request received."
            }
        # slow headers (slowloris): the request line and headers never finish; closed, not held
        with socket.create_connection(("127.0.0.1", service.port), timeout=20) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            started = time.monotonic()
            assert sock.recv(100) == b""
            assert 0.5 < time.monotonic() - started < 15
        assert (
            httpx.post(f"{service.url}/v1/indexes/digits/attributions", json={"query": {"id": 0}}).status_code
            == 200
        )
