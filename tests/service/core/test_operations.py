"""Operating the service: metrics, request ids and JSON logs, API keys, body limit, timeouts, model hashes."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from indexer.data import Dataset
from indexer.features.models import build_model, load_checkpoint, save_checkpoint
from indexer.store.manifest import read_manifest
from service.app import create_app
from service.core.settings import Settings

URL = "/v1/indexes/digits/attributions"


def client_for(index_root: Path, **settings: object) -> TestClient:
    return TestClient(create_app(Settings(index_root=index_root, **settings)))  # type: ignore[arg-type]


def test_metrics_count_requests_by_route_and_status(index_root: Path) -> None:
    with client_for(index_root) as client:
        assert client.post(URL, json={"query": {"id": 1}}).status_code == 200
        assert client.post(URL, json={"query": {"id": 999}}).status_code == 404
        text = client.get("/metrics").text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    route = ("route", "/v1/indexes/{name}/attributions")
    assert samples[("infotrace_requests_total", (("method", "POST"), route, ("status", "200")))] == 1
    assert samples[("infotrace_requests_total", (("method", "POST"), route, ("status", "404")))] == 1
    duration = "infotrace_request_duration_seconds_count"
    assert samples[(duration, (("method", "POST"), route, ("status", "200")))] == 1
    assert samples[(duration, (("method", "POST"), route, ("status", "404")))] == 1
    digits = (("index", "digits"),)
    assert samples[("infotrace_index_examples", digits)] == 600
    assert samples[("infotrace_index_ready", digits)] == 1
    size = sum(p.stat().st_size for p in (index_root / "digits").iterdir())
    assert samples[("infotrace_index_bytes", digits)] == size


def test_request_id_header_and_json_log(index_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    with client_for(index_root) as client, caplog.at_level(logging.INFO, logger="infotrace.access"):
        given = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
        fresh = client.post(URL, json={"query": {"id": 2}})
    assert given.headers["X-Request-ID"] == "abc-123"
    assert len(fresh.headers["X-Request-ID"]) == 32
    records = [r for r in caplog.records if r.name == "infotrace.access"]
    assert [r.request_id for r in records] == ["abc-123", fresh.headers["X-Request-ID"]]  # type: ignore[attr-defined]
    assert records[1].route == "/v1/indexes/{name}/attributions" and records[1].status == 200  # type: ignore[attr-defined]


def test_json_log_lines_from_a_live_process(index_root: Path) -> None:
    """The CLI's logging config writes one JSON object per line, with the request id."""
    code = (
        "import logging.config, sys\n"
        "from fastapi.testclient import TestClient\n"
        "from service.app import create_app\n"
        "from service.core.observability import configure_logging\n"
        "from service.core.settings import Settings\n"
        "logging.config.dictConfig(configure_logging(True))\n"
        f"with TestClient(create_app(Settings(index_root={str(index_root)!r}))) as c:\n"
        "    c.get('/healthz', headers={'X-Request-ID': 'line-check'})\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    lines = [json.loads(line) for line in run.stderr.splitlines() if line.startswith("{")]
    access = [line for line in lines if line.get("name") == "infotrace.access"]
    assert access and access[0]["request_id"] == "line-check" and access[0]["status"] == 200


@pytest.fixture()
def keyed(index_root: Path, tmp_path: Path) -> Iterator[TestClient]:
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("file-key\n\n")
    with client_for(index_root, api_keys="env-key-1, env-key-2", api_keys_file=keys_file) as client:
        yield client


def test_api_keys(keyed: TestClient) -> None:
    body = {"query": {"id": 0}}
    refused = keyed.post(URL, json=body)
    assert refused.status_code == 401 and "API key" in refused.json()["detail"]
    assert refused.headers["WWW-Authenticate"] == "Bearer"
    assert keyed.post(URL, json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert (
        keyed.post(URL, json=body, headers={"X-API-Key": "env-key"}).status_code == 401
    )  # a prefix is not a key
    assert keyed.post(URL, json=body, headers={"Authorization": "Bearer env-key-2"}).status_code == 200
    assert keyed.post(URL, json=body, headers={"X-API-Key": "file-key"}).status_code == 200
    assert keyed.post(URL, json=body, headers={"Cookie": "infotrace_api_key=env-key-1"}).status_code == 200
    assert keyed.get("/metrics").status_code == 401
    assert keyed.get("/healthz").status_code == 200 and keyed.get("/readyz").status_code == 200


def test_serving_off_loopback_without_keys_is_refused(index_root: Path) -> None:
    cli = str(Path(sys.executable).with_name("infotrace-serve"))
    env = {**os.environ, "INFOTRACE_INDEX_ROOT": str(index_root), "INFOTRACE_HOST": "0.0.0.0"}
    env.pop("INFOTRACE_API_KEYS", None)
    run = subprocess.run([cli, "run"], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "refusing to serve on non-loopback host '0.0.0.0' without API keys" in run.stderr


def test_empty_keys_file_and_bad_settings_are_one_line_errors(index_root: Path, tmp_path: Path) -> None:
    cli = str(Path(sys.executable).with_name("infotrace-serve"))
    empty = tmp_path / "keys.txt"
    empty.write_text("\n  \n")
    cases = {
        "INFOTRACE_API_KEYS_FILE": (str(empty), "holds no key"),
        "INFOTRACE_MODEL_CHECKPOINTS": ("{bad", "INFOTRACE_MODEL_CHECKPOINTS"),
    }
    for variable, (value, message) in cases.items():
        env = {**os.environ, "INFOTRACE_INDEX_ROOT": str(index_root), variable: value}
        run = subprocess.run([cli, "run"], env=env, capture_output=True, text=True, timeout=60)
        assert run.returncode == 2, run.stderr
        assert run.stderr.startswith("bad settings:") and message in run.stderr
        assert "Traceback" not in run.stderr


def test_defaults_follow_lowered_limits(index_root: Path) -> None:
    with client_for(index_root, max_top_k=5, max_subset_candidates=30) as client:
        assert len(client.post(URL, json={"query": {"id": 0}}).json()["results"]) == 5
        assert client.post(URL, json={"query": {"id": 0}, "top_k": 6}).status_code == 422  # explicit: checked
        subset = client.post(URL + "/subset", json={"query": {"id": 0}, "size": 3})
        assert subset.status_code == 200 and subset.json()["candidates"] == 30


def test_gpu_asked_for_without_gpu_is_explained(index_root: Path) -> None:
    with client_for(index_root, use_gpu=True) as client:
        ready = client.get("/readyz").json()
    assert "FAISS sees no GPU" in ready["indexes"]["digits"]


def test_plain_text_logs_keep_the_request_fields(index_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    with client_for(index_root) as client, caplog.at_level(logging.INFO, logger="infotrace.access"):
        client.get("/healthz", headers={"X-Request-ID": "plain-1"})
    line = [r.getMessage() for r in caplog.records if r.name == "infotrace.access"][0]
    assert line.startswith("GET /healthz 200 ") and line.endswith("id=plain-1")


def test_body_size_limit(index_root: Path) -> None:
    with client_for(index_root, max_body_bytes=2048) as client:
        big = client.post(URL, json={"query": {"input": [0.5] * 784}})
        assert big.status_code == 413 and "exceeds 2048 bytes" in big.json()["detail"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies while streaming
            yield b'{"query": {"input": ['
            for _ in range(783):
                yield b"0.5, "
            yield b"0.5]}}"

        streamed = client.post(URL, content=chunks(), headers={"Content-Type": "application/json"})
        assert streamed.status_code == 413
        assert client.post(URL, json={"query": {"id": 0}}).status_code == 200


def test_request_timeout_gives_503(index_root: Path, test_digits: Dataset) -> None:
    with client_for(index_root, request_timeout_s=1e-6) as client:
        slow = client.post(URL, json={"query": {"input": test_digits.inputs[0].tolist()}})
    assert slow.status_code == 503 and "INFOTRACE_REQUEST_TIMEOUT_S" in slow.json()["detail"]


def test_checkpoint_hash_mismatch_refuses_raw_queries(
    index_root: Path, tmp_path: Path, test_digits: Dataset
) -> None:
    same = tmp_path / "same.safetensors"
    shutil.copyfile(index_root / "digits" / "model.safetensors", same)
    retrained = tmp_path / "retrained.safetensors"
    spec = read_manifest(index_root / "digits").model.spec
    assert spec is not None
    model = build_model(spec)
    load_checkpoint(model, same)
    with torch.no_grad():
        model[0].bias += 0.01  # type: ignore[index,operator]
    save_checkpoint(model, retrained)
    raw = {"query": {"input": test_digits.inputs[0].tolist()}}
    with client_for(index_root, model_checkpoints={"digits": str(same)}) as client:
        assert client.post(URL, json=raw).status_code == 200
    with client_for(index_root, model_checkpoints={"digits": str(retrained)}) as client:
        refused = client.post(URL, json=raw)
        assert refused.status_code == 409
        assert "is not the one index 'digits' was built from" in refused.json()["detail"]
        assert client.post(URL, json={"query": {"id": 0}}).status_code == 200  # stored queries still served
        assert client.get("/v1/indexes/digits").json()["raw_input_queries"] is False
