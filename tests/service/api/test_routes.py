"""The route layer only translates: with the index and settings dependencies swapped
(``app.dependency_overrides``), each response is the engine's typed result field for field, limits come from
the settings given, and the project's exceptions become status codes with their message."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from indexer.enums import Direction, Objective, Score
from indexer.store.reader import load_index
from service.api.deps import get_index, get_settings
from service.app import create_app
from service.core.settings import Settings
from service.engine import AttributionEngine

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "tiny-v1"
"""A 24-example index with 4 stored queries and k = 6 (see tests/indexer/store/test_manifest.py)."""


@pytest.fixture(scope="module")
def engine() -> AttributionEngine:
    return AttributionEngine(load_index(FIXTURE))


@pytest.fixture(scope="module")
def client(engine: AttributionEngine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    app = create_app(Settings(index_root=tmp_path_factory.mktemp("empty-root")))
    app.dependency_overrides[get_index] = lambda: engine
    app.dependency_overrides[get_settings] = lambda: Settings(
        index_root=FIXTURE.parent, max_top_k=3, max_coreset_size=2, default_candidates=4
    )
    with TestClient(app) as c:
        yield c


def test_attribution_response_is_the_engine_result(client: TestClient, engine: AttributionEngine) -> None:
    body = client.post(
        "/v1/indexes/anything/attributions",
        json={"query": {"id": 2}, "score": "influence", "direction": "proponents"},
    ).json()
    want = engine.attribute(engine.queries.stored(2), Score.INFLUENCE, Direction.PROPONENTS, 3, 4)
    assert body["index"] == "tiny-v1" and body["top_k"] == 3  # the default 10 lowered to the limit
    assert body["candidates_searched"] == want.depth and body["exact"] is want.exact
    assert [r["id"] for r in body["results"]] == [e.id for e in want.examples]
    for row, example in zip(body["results"], want.examples, strict=True):
        assert row["scores"] == {score.value: value for score, value in example.scores.items()}
        assert (row["rank"], row["sign"], row["signed_score"]) == (
            example.rank,
            example.sign,
            example.signed_score,
        )
        assert (row["label"], row["prediction"], row["metadata"]) == (
            example.label,
            example.prediction,
            example.metadata,
        )
    query = vars(want.query)
    assert {key: body["query"][key] for key in query} == query
    get = client.get(
        "/v1/indexes/anything/attributions?query_id=2&score=influence&direction=proponents"
    ).json()
    assert get["results"] == body["results"] and get["query"] == body["query"]


def test_subset_and_coreset_responses_are_the_engine_results(
    client: TestClient, engine: AttributionEngine
) -> None:
    body = client.post(
        "/v1/indexes/x/attributions/subset", json={"query": {"id": 1}, "size": 3, "candidates": 8}
    ).json()
    want = engine.subset(engine.queries.stored(1), Objective.INFORMATION_LOSS, 3, 8)
    assert [m["id"] for m in body["members"]] == [m.id for m in want.members]
    assert [m["joint"] for m in body["members"]] == [m.joint for m in want.members]
    assert (body["joint"], body["top_single_joint"], body["candidates"]) == (
        want.joint,
        want.top_single_joint,
        want.candidates,
    )
    coreset = client.post("/v1/indexes/x/coreset", json={"size": 2, "query_ids": [0, 3]}).json()
    want_core = engine.coreset(2, [0, 3])
    assert [m["id"] for m in coreset["members"]] == [m.id for m in want_core.members]
    assert coreset["objective"] == want_core.objective and coreset["n_queries"] == 2


@pytest.mark.parametrize(
    ("url", "body", "code", "detail"),
    [
        ("attributions", {"query": {"id": 1}, "top_k": 4}, 422, "top_k must be at most 3 (the service limit"),
        ("coreset", {"size": 3}, 422, "size must be at most 2 (the service limit and the index size); got 3"),
        ("attributions", {"query": {"id": 9}}, 404, "no stored query with id 9; valid ids are 0..3"),
        (
            "attributions",
            {"query": {"feature": [0.5] * 5}},
            422,
            "query feature must have shape (6,); got (5,)",
        ),
        ("attributions", {"query": {"input": [0.5] * 4}}, 422, "input must have shape [5]; got [4]"),
        ("coreset", {"size": 1, "query_ids": [0, 4]}, 404, "no stored query with id 4; valid ids are 0..3"),
    ],
)
def test_limits_and_project_exceptions_become_status_codes(
    client: TestClient, url: str, body: dict, code: int, detail: str
) -> None:
    response = client.post(f"/v1/indexes/x/{url}", json=body)
    assert response.status_code == code
    assert detail in response.json()["detail"]


def test_get_forms_refuse_unknown_and_negative_parameters(client: TestClient) -> None:
    misspelt = client.get("/v1/indexes/x/attributions?query_id=1&topk=2")
    assert misspelt.status_code == 422
    (error,) = misspelt.json()["detail"]
    assert error["loc"] == ["query", "topk"] and error["type"] == "extra_forbidden"
    assert error["msg"] == (
        "unknown query parameter; this route takes ['query_id', 'top_k', 'score', 'direction', 'candidates']"
    )
    negative = client.get("/v1/indexes/x/attributions?query_id=-1")
    assert negative.status_code == 422 and negative.json()["detail"][0]["loc"] == ["query", "query_id"]
    assert client.get("/v1/indexes/x/attributions/subset?query_id=1&sizes=3").status_code == 422


def test_coreset_query_ids_are_bounded_by_the_stored_queries(client: TestClient) -> None:
    response = client.post("/v1/indexes/x/coreset", json={"size": 1, "query_ids": [0, 1, 2, 3, 4]})
    assert response.status_code == 422
    assert response.json()["detail"] == "the number of query_ids must be at most 4 (stored queries); got 5"
    repeated = client.post("/v1/indexes/x/coreset", json={"size": 1, "query_ids": [0, 1, 0, 1, 2]})
    assert repeated.status_code == 422  # a query counted twice weighted the objective silently
    (error,) = repeated.json()["detail"]
    assert error["loc"] == ["body", "query_ids"]
    assert (
        error["msg"] == "Value error, query ids must be distinct (each query counts once); repeated: [0, 1]"
    )


def test_a_default_subset_size_fits_a_small_candidate_limit(
    engine: AttributionEngine, tmp_path: Path
) -> None:
    app = create_app(Settings(index_root=tmp_path))
    app.dependency_overrides[get_index] = lambda: engine
    app.dependency_overrides[get_settings] = lambda: Settings(index_root=tmp_path, max_subset_candidates=5)
    with TestClient(app) as c:
        body = c.post("/v1/indexes/x/attributions/subset", json={"query": {"id": 0}}).json()
        assert (body["size"], body["candidates"]) == (5, 5)
        explicit = c.post("/v1/indexes/x/attributions/subset", json={"query": {"id": 0}, "size": 6})
        assert explicit.status_code == 422 and "candidates (5) must be at least size (6)" in explicit.text


def test_settings_refuse_a_default_above_its_limit(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"default_candidates \(500\) must be at most max_candidates \(200\)"
    ):
        Settings(index_root=tmp_path, default_candidates=500, max_candidates=200)
