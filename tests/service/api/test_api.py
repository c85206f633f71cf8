"""Every endpoint through httpx (Starlette's TestClient), on a real small digits index."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from indexer.build import build_index
from indexer.config import IndexConfig
from indexer.data import Dataset
from indexer.enums import Direction, Score
from indexer.features.models import ModelSpec, build_model
from indexer.features.tasks import RegressionOutput
from indexer.gp.coreset import coreset_information_gain
from indexer.gp.scores import signed_score
from indexer.store.layout import MANIFEST_CHECKSUM_FIELD
from indexer.store.manifest import manifest_checksum
from indexer.store.reader import load_index
from service.app import create_app
from service.core.settings import Settings
from service.engine import AttributionEngine

URL = "/v1/indexes/digits/attributions"


@pytest.fixture(scope="module")
def client(index_root: Path) -> Iterator[TestClient]:
    app = create_app(Settings(index_root=index_root, max_top_k=200))
    with TestClient(app) as c:
        yield c


def brute_force_top_k(
    index_root: Path, phi_q: np.ndarray, score: Score, direction: Direction, k: int
) -> list[int]:
    """Top-k over ALL training examples, from every score computed in float64, no FAISS."""
    data = load_index(index_root / "digits")
    s = data.surrogate
    terms = s.query_terms(phi_q)
    scores = s.scores(terms)
    signed = signed_score(score, scores)
    ids = np.arange(data.n_train)
    if direction is Direction.PROPONENTS:
        key, keep = signed, signed > 0
    elif direction is Direction.OPPONENTS:
        key, keep = -signed, signed < 0
    else:
        key, keep = np.abs(signed), np.ones_like(signed, dtype=bool)
    order = np.lexsort((ids, -key))
    return [int(i) for i in order[keep[order]][:k]]


def test_health_ready_and_docs(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "pid": os.getpid()}  # in-process: this one
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "indexes": {"digits": "ready"}, "detail": None, "missing": {}}
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/indexes", "/v1/indexes/{name}", "/v1/indexes/{name}/attributions"} <= set(paths)


def test_list_and_describe_index(client: TestClient) -> None:
    listed = client.get("/v1/indexes").json()["indexes"]
    assert [i["name"] for i in listed] == ["digits"]
    one = client.get("/v1/indexes/digits").json()
    assert one["n_train"] == 600 and one["n_query"] == 80 and one["k"] == 64
    assert one["model"]["n_params"] == 784 * 16 + 16 + 16 * 10 + 10
    assert one["surrogate"]["prior_precision"] > 0
    assert one["raw_input_queries"] is True


@pytest.mark.parametrize("score", list(Score))
@pytest.mark.parametrize("direction", list(Direction))
def test_top_k_equals_brute_force(
    client: TestClient, index_root: Path, score: Score, direction: Direction
) -> None:
    data = load_index(index_root / "digits")
    for query_id in (0, 7, 31):
        body = {
            "query": {"id": query_id},
            "top_k": 10,
            "score": score.value,
            "direction": direction.value,
            "candidates": 10,
        }
        response = client.post(URL, json=body)
        assert response.status_code == 200, response.text
        got = [r["id"] for r in response.json()["results"]]
        assert got == brute_force_top_k(index_root, data.query_phi[query_id], score, direction, 10)


def test_response_carries_every_score_and_query_info(client: TestClient, index_root: Path) -> None:
    data = load_index(index_root / "digits")
    body = client.post(URL, json={"query": {"id": 3}, "top_k": 5}).json()
    q = body["query"]
    assert q["kind"] == "stored" and q["id"] == 3 and q["label"] == int(data.queries["label"][3])
    assert q["prediction"] in range(10) and math.isclose(sum(q["probabilities"]), 1.0, rel_tol=1e-9)
    terms = data.surrogate.query_terms(data.query_phi[3])
    assert math.isclose(q["posterior_variance"], terms.posterior_variance, rel_tol=1e-12)
    p = np.asarray(q["probabilities"])
    assert math.isclose(q["predictive_entropy"], float(-(p * np.log(p)).sum()), rel_tol=1e-9)
    assert [r["rank"] for r in body["results"]] == [1, 2, 3, 4, 5]
    ids = np.array([r["id"] for r in body["results"]])
    s = data.surrogate
    expected = s.scores(terms, ids)
    for r, row in enumerate(body["results"]):
        for score in Score:
            assert math.isclose(row["scores"][score.value], expected[score][r], rel_tol=1e-9, abs_tol=1e-15)
        assert row["sign"] == int(np.sign(expected[Score.INFLUENCE][r]))
        assert row["label"] == int(data.examples["label"][row["id"]])
        assert "source_row" in row["metadata"]
    assert body["timings"]["total_ms"] > 0


def test_raw_input_matches_stored_query(client: TestClient, test_digits: Dataset) -> None:
    """A raw test digit with its label explained equals the stored query of the same digit."""
    raw = {"input": test_digits.inputs[5].tolist(), "target": int(test_digits.targets[5])}
    by_input = client.post(URL, json={"query": raw, "top_k": 10}).json()
    by_id = client.post(URL, json={"query": {"id": 5}, "top_k": 10}).json()
    assert [r["id"] for r in by_input["results"]] == [r["id"] for r in by_id["results"]]
    assert math.isclose(
        by_input["query"]["posterior_variance"], by_id["query"]["posterior_variance"], rel_tol=1e-4
    )
    assert by_input["query"]["kind"] == "input" and by_input["timings"]["featurize_ms"] > 0


def test_raw_input_without_target_explains_prediction(client: TestClient, test_digits: Dataset) -> None:
    body = client.post(URL, json={"query": {"input": test_digits.inputs[9].tolist()}}).json()
    assert body["query"]["target"] == body["query"]["prediction"]
    assert len(body["results"]) == 10


def test_feature_query_matches_stored_query(client: TestClient, index_root: Path) -> None:
    phi = load_index(index_root / "digits").query_phi[11].tolist()
    by_feature = client.post(URL, json={"query": {"feature": phi}, "score": "influence"}).json()
    by_id = client.post(URL, json={"query": {"id": 11}, "score": "influence"}).json()
    assert [r["id"] for r in by_feature["results"]] == [r["id"] for r in by_id["results"]]
    assert by_feature["query"]["prediction"] is None and by_feature["query"]["predictive_entropy"] is None


def test_subset_endpoint(client: TestClient) -> None:
    for objective in ("information_loss", "information_gain"):
        body = client.post(
            URL + "/subset", json={"query": {"id": 2}, "size": 5, "objective": objective, "candidates": 50}
        ).json()
        members = body["members"]
        assert len(members) == 5 and len({m["id"] for m in members}) == 5
        assert np.allclose(np.cumsum([m["marginal_gain"] for m in members]), [m["joint"] for m in members])
        assert math.isclose(body["joint"], members[-1]["joint"])
        # greedy's first pick is the best single example, so the greedy joint is at least the top-1's
        assert body["joint"] >= members[0]["joint"] > 0


def test_coreset_endpoint_equals_the_library(client: TestClient, index_root: Path) -> None:
    data = load_index(index_root / "digits")
    s = data.surrogate
    want = coreset_information_gain(data.phi, s.beta, s.prior_precision, data.query_phi[[1, 5, 9]], 6)
    body = client.post("/v1/indexes/digits/coreset", json={"size": 6, "query_ids": [1, 5, 9]}).json()
    assert [m["id"] for m in body["members"]] == want.indices.tolist()
    assert np.allclose([m["objective"] for m in body["members"]], want.objective, rtol=1e-12)
    assert body["n_queries"] == 3 and math.isclose(body["objective"], want.objective[-1])
    everything = client.post("/v1/indexes/digits/coreset", json={"size": 3}).json()
    assert everything["n_queries"] == 80 and len(everything["members"]) == 3
    unknown = client.post("/v1/indexes/digits/coreset", json={"size": 3, "query_ids": [80]})
    assert unknown.status_code == 404 and "valid ids are 0..79" in unknown.json()["detail"]
    assert client.post("/v1/indexes/digits/coreset", json={"size": 0}).status_code == 422
    too_big = client.post("/v1/indexes/digits/coreset", json={"size": 601})
    assert too_big.status_code == 422 and "size must be at most 100" in too_big.json()["detail"]


BAD_REQUESTS = [
    ({"query": {"input": [0.0] * 783}}, 422, "shape [784]"),
    ({"query": {"input": [[0.0] * 784]}}, 422, "shape [784]"),
    ({"query": {"input": ["a"] * 784}}, 422, "input"),
    ({"query": {"feature": [0.0] * 63}}, 422, "shape (64,)"),
    ({"query": {"id": 80}}, 404, "valid ids are 0..79"),
    ({"query": {"id": -1}}, 422, "greater than or equal to 0"),
    ({"query": {"id": 1, "target": 3}}, 422, "'target' applies only to an 'input' query"),
    ({"query": {"input": []}}, 422, "at least 1 item"),
    ({"query": {}}, 422, "exactly one of"),
    ({"query": {"id": 1, "feature": [0.0] * 64}}, 422, "exactly one of"),
    ({"query": {"id": 1}, "top_k": 0}, 422, "greater than or equal to 1"),
    ({"query": {"id": 1}, "top_k": -3}, 422, "greater than or equal to 1"),
    ({"query": {"id": 1}, "top_k": 201}, 422, "top_k must be at most 200"),
    ({"query": {"id": 1}, "score": "banana"}, 422, "information_gain"),
    ({"query": {"id": 1}, "direction": "sideways"}, 422, "proponents"),
    ({"query": {"input": [0.5] * 784, "target": 10}}, 422, "class index in 0..9"),
    ({"query": {"id": 1}, "surprise": 1}, 422, "Extra inputs"),
    ({"query": {"id": True}}, 422, "valid integer"),
    ({"query": {"id": "3"}}, 422, "valid integer"),
    ({"query": {"id": 2.0}}, 422, "valid integer"),
    ({"query": {"id": 1}, "top_k": True}, 422, "valid integer"),
    ({"query": {"id": 1}, "top_k": "3"}, 422, "valid integer"),
    ({"query": {"input": [0.5] * 784, "target": True}}, 422, "target"),
    ({"query": {"input": [True] * 784}}, 422, "position [0] holds true, not a number"),
    ({"query": {"input": [None] * 784}}, 422, "position [0] holds null"),
    ({"query": {"input": [[0.5] * 392, [0.5] * 391]}}, 422, "it is nested deeper at [0]"),
    ({"query": {"input": [1e39] * 784}}, 422, "finite float32"),
    ({"query": {"feature": [1e39] * 64}}, 422, "finite float32"),
    ({"query": {"feature": [1e200] * 64}}, 422, "finite float32"),
    ({"query": {"feature": [True] * 64}}, 422, "position 0 holds true/false"),
]


@pytest.mark.parametrize(("body", "code", "message"), BAD_REQUESTS)
def test_bad_input_gives_clear_4xx(client: TestClient, body: dict, code: int, message: str) -> None:
    response = client.post(URL, json=body)
    assert response.status_code == code, response.text
    assert message in response.text
    assert client.get("/healthz").status_code == 200  # and the service keeps serving


@pytest.mark.parametrize(("field", "length"), [("input", 784), ("feature", 64)])
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_values_are_refused(client: TestClient, field: str, length: int, literal: str) -> None:
    # JSON has no NaN literal, but Python's json module reads and writes one, as a hostile client might
    raw = f'{{"query": {{"{field}": [' + ",".join([literal] + ["0.0"] * (length - 1)) + "]}}"
    response = client.post(URL, content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert "finite" in response.text


def test_docs_work_offline(client: TestClient) -> None:
    page = client.get("/docs").text
    assert "/docs-assets/swagger-ui-bundle.js" in page and "cdn." not in page
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200


def test_index_is_served_under_its_folder_name(index_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(index_root / "digits", root / "renamed")
    with TestClient(create_app(Settings(index_root=root))) as other:
        assert other.get("/v1/indexes/renamed").json()["name"] == "renamed"
        body = other.post("/v1/indexes/renamed/attributions", json={"query": {"id": 0}}).json()
        assert body["index"] == "renamed"


def test_empty_root_says_why_not_ready(tmp_path: Path) -> None:
    with TestClient(create_app(Settings(index_root=tmp_path))) as other:
        ready = other.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["detail"] == f"no index folders (subfolders holding manifest.json) under {tmp_path}"


def test_import_path_factories_need_trust(index_root: Path, tmp_path: Path) -> None:
    """An index folder must not make the service import arbitrary code (a manifest naming builtins:print)."""
    root = tmp_path / "root"
    shutil.copytree(index_root / "digits", root / "digits")
    manifest_path = root / "digits" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["model"]["spec"]["factory"] = "tests_evil_module_that_does_not_exist:make"
    manifest[MANIFEST_CHECKSUM_FIELD] = manifest_checksum(manifest)  # signed: only trust protects now
    manifest_path.write_text(json.dumps(manifest))
    with TestClient(create_app(Settings(index_root=root))) as other:
        raw = other.post(URL, json={"query": {"input": [0.5] * 784}})
        assert raw.status_code == 409 and "INFOTRACE_TRUSTED_MODEL_FACTORIES" in raw.json()["detail"]
        assert other.post(URL, json={"query": {"id": 0}}).status_code == 200


def test_unknown_index_and_bad_names(client: TestClient) -> None:
    response = client.post("/v1/indexes/nope/attributions", json={"query": {"id": 1}})
    assert response.status_code == 404 and "served indexes: ['digits']" in response.text
    assert client.get("/v1/indexes/nope").status_code == 404
    assert client.get("/v1/indexes/..%2F..%2Fetc").status_code in (404, 422)


def test_subset_bad_sizes(client: TestClient) -> None:
    url = URL + "/subset"
    assert client.post(url, json={"query": {"id": 1}, "size": 0}).status_code == 422
    response = client.post(url, json={"query": {"id": 1}, "size": 20, "candidates": 10})
    assert response.status_code == 422 and "must be at least size" in response.text


def test_regression_stored_query_has_its_gaussian_predictive_entropy(tmp_path: Path) -> None:
    """Stored queries keep their raw outputs, so every output function gives its own predictive entropy."""
    torch.manual_seed(3)
    spec = ModelSpec("mlp", {"in_features": 4, "hidden": [6], "out_features": 1})
    data = Dataset(torch.randn(30, 4), torch.randn(30))
    queries = Dataset(torch.randn(5, 4), torch.randn(5))
    out = build_index(
        build_model(spec),
        RegressionOutput(sigma=0.5),
        data,
        tmp_path / "reg",
        queries=queries,
        model_spec=spec,
        config=IndexConfig(k=6),
        progress=False,
    )
    engine = AttributionEngine(load_index(out))
    query = engine.queries.stored(2)
    v = query.terms.posterior_variance
    assert engine.describe(query).predictive_entropy == pytest.approx(
        0.5 * math.log(2 * math.pi * math.e * (0.25 + v))
    )
