"""The store over HTTP (DESIGN.md 2.1): an approximate index reports its recorded recall and takes its
search knobs per request within the limits; the exact scan says exact and refuses knobs; an index built from
precomputed features serves stored and feature queries and refuses raw inputs, saying why."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from indexer.config import IndexConfig
from indexer.precomputed import build_from_features
from indexer.store.reader import load_index
from service.app import create_app
from service.core.settings import Settings

K = 24


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    phi = rng.standard_normal((3000, K)).astype(np.float32)
    root = tmp_path_factory.mktemp("store-root")
    common = {
        "outputs": rng.standard_normal(3000),
        "targets": rng.integers(0, 2, 3000),
        "query_phi": rng.standard_normal((12, K)).astype(np.float32),
        "query_outputs": np.zeros(12),
        "query_targets": np.ones(12, dtype=np.int64),
    }
    build_from_features(phi, root / "exact", **common)
    build_from_features(phi, root / "ivf", config=IndexConfig(faiss_factory="IVF16,Flat", nprobe=2), **common)
    build_from_features(phi, root / "hnsw", config=IndexConfig(faiss_factory="HNSW16"), **common)
    deep = IndexConfig(faiss_factory="IVF16,PQ4", search_depth=300, recall_queries=20)
    build_from_features(phi, root / "deep", config=deep, **common)
    return root


@pytest.fixture(scope="module")
def client(root: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(index_root=root, max_nprobe=16, max_ef_search=256))) as c:
        yield c


def test_the_exact_scan_says_exact_and_refuses_knobs(client: TestClient) -> None:
    found = client.post("/v1/indexes/exact/attributions", json={"query": {"id": 3}, "top_k": 5}).json()
    assert found["exact"] is True and found["recall_at_10"] is None and len(found["results"]) == 5
    refused = client.post("/v1/indexes/exact/attributions", json={"query": {"id": 3}, "nprobe": 4})
    assert refused.status_code == 422 and "searched exactly" in refused.text


def test_an_approximate_index_reports_its_recorded_recall(client: TestClient, root: Path) -> None:
    recorded = load_index(root / "ivf").manifest.faiss.recall_at_10 or {}
    for score in ("information_gain", "influence"):
        body = {"query": {"id": 3}, "score": score, "top_k": 10}
        found = client.post("/v1/indexes/ivf/attributions", json=body).json()
        assert found["exact"] is False and found["recall_at_10"] == recorded[score]
    # more lists visited: a superset of the candidates, so the information-gain answer is at least as good
    exact = client.post("/v1/indexes/exact/attributions", json={"query": {"id": 3}, "top_k": 10}).json()
    every_list = client.post("/v1/indexes/ivf/attributions", json={"query": {"id": 3}, "nprobe": 16}).json()
    assert [r["id"] for r in every_list["results"]] == [r["id"] for r in exact["results"]]


@pytest.mark.parametrize(
    ("index", "body", "status", "says"),
    [
        ("ivf", {"nprobe": 17}, 422, "nprobe must be at most 16"),
        ("ivf", {"nprobe": 0}, 422, "greater than or equal to 1"),
        ("ivf", {"ef_search": 8}, 422, "ef_search applies to HNSW indexes only"),
        ("hnsw", {"nprobe": 2}, 422, "nprobe applies to IVF indexes only"),
        ("hnsw", {"ef_search": 257}, 422, "ef_search must be at most 256"),
        ("hnsw", {"ef_search": "64"}, 422, "valid integer"),
    ],
)
def test_search_knobs_are_checked(client: TestClient, index: str, body: dict, status: int, says: str) -> None:
    answer = client.post(f"/v1/indexes/{index}/attributions", json={"query": {"id": 0}, **body})
    assert answer.status_code == status and says in answer.text, answer.text


def test_a_features_only_index_serves_features_and_refuses_inputs(client: TestClient, root: Path) -> None:
    phi_q = load_index(root / "exact").query_phi[2].astype(float).tolist()
    by_feature = client.post("/v1/indexes/exact/attributions", json={"query": {"feature": phi_q}}).json()
    by_id = client.post("/v1/indexes/exact/attributions", json={"query": {"id": 2}}).json()
    assert [r["id"] for r in by_feature["results"]] == [r["id"] for r in by_id["results"]]
    assert by_id["query"]["prediction"] is None and by_id["results"][0]["prediction"] is None
    raw = client.post("/v1/indexes/exact/attributions", json={"query": {"input": [0.0] * K}})
    assert raw.status_code in (409, 422) and "model" in raw.text
    example = client.get("/v1/indexes/exact/examples/7")
    assert example.status_code == 200 and example.json()["prediction"] is None


def test_an_approximate_index_is_searched_at_its_recorded_depth(client: TestClient, root: Path) -> None:
    info = load_index(root / "deep").manifest.faiss
    assert info.recall_candidates == 300 and info.factory == "IVF16,PQ4"
    found = client.post("/v1/indexes/deep/attributions", json={"query": {"id": 1}}).json()
    assert (
        found["candidates_searched"] == 300
        and found["recall_at_10"] == (info.recall_at_10 or {})["information_gain"]
    )
    asked = client.post("/v1/indexes/deep/attributions", json={"query": {"id": 1}, "candidates": 50}).json()
    assert asked["candidates_searched"] == 50
    exact = client.post("/v1/indexes/exact/attributions", json={"query": {"id": 1}}).json()
    assert exact["candidates_searched"] >= 100  # the service default, deepened as needed


def test_a_recorded_depth_beyond_the_service_limit_is_lowered_to_it(root: Path) -> None:
    with TestClient(create_app(Settings(index_root=root, max_candidates=120))) as small:
        found = small.post("/v1/indexes/deep/attributions", json={"query": {"id": 1}})
        assert found.status_code == 200 and found.json()["candidates_searched"] == 120
        asked = small.post("/v1/indexes/deep/attributions", json={"query": {"id": 1}, "candidates": 121})
        assert asked.status_code == 422 and "candidates must be at most 120" in asked.text
