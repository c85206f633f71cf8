"""Hostile and malformed requests (issue #16): every one gets a JSON 4xx that names what was wrong; an
unexpected error is a JSON 500 with the request id, logged once and counted."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.core.settings import Settings

BASE = "/v1/indexes/digits"
JSON = {"content-type": "application/json"}
NON_FINITE = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"]

# (route, a valid body with a {} placeholder, the field the placeholder sits in)
BODY_FIELDS = [
    (f"{BASE}/attributions", '{{"query": {{"id": 0}}, "top_k": {}}}', ["body", "top_k"]),
    (f"{BASE}/attributions", '{{"query": {{"id": 0}}, "candidates": {}}}', ["body", "candidates"]),
    (f"{BASE}/attributions", '{{"query": {{"id": 0}}, "score": {}}}', ["body", "score"]),
    (f"{BASE}/attributions", '{{"query": {{"id": {}}}}}', ["body", "query", "id"]),
    (f"{BASE}/attributions", '{{"query": {}}}', ["body", "query"]),
    (f"{BASE}/attributions", "{}", ["body"]),
    (f"{BASE}/attributions", '{{"query": {{"id": 0}}, "unknown": {}}}', ["body", "unknown"]),
    (f"{BASE}/attributions", '{{"query": {{"feature": [0.5, {}]}}}}', ["body", "query", "feature", 1]),
    (f"{BASE}/attributions", '{{"query": {{"input": [[{}]]}}}}', ["body", "query", "input", 0, 0]),
    (f"{BASE}/attributions", '{{"query": {{"input": [0], "target": {}}}}}', ["body", "query", "target"]),
    (f"{BASE}/attributions/subset", '{{"query": {{"id": 0}}, "size": {}}}', ["body", "size"]),
    (f"{BASE}/coreset", '{{"size": {}}}', ["body", "size"]),
    (f"{BASE}/coreset", '{{"size": 2, "query_ids": [1, {}]}}', ["body", "query_ids", 1]),
]


@pytest.fixture(scope="module")
def client(index_root: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(index_root=index_root)), raise_server_exceptions=False) as c:
        yield c


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.mark.parametrize("token", NON_FINITE)
@pytest.mark.parametrize(("url", "template", "loc"), BODY_FIELDS)
def test_non_finite_numbers_are_refused_naming_the_field(
    client: TestClient, url: str, template: str, loc: list, token: str
) -> None:
    """Case 1: NaN, Infinity and numbers beyond float64 were 500s (FastAPI could not serialise them)."""
    response = client.post(url, content=template.format(token), headers=JSON)
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == loc
    assert error["input"] == token
    assert error["msg"] == (
        f"{token} is not a finite JSON number (NaN, Infinity or beyond float64's range); "
        "expected a finite number"
    )


@pytest.mark.parametrize(
    ("url", "body"),
    [
        (f"{BASE}/attributions", '{"query": {"id": 0}, "top_k": 1' + "0" * 400 + "}"),
        (f"{BASE}/attributions", '{"query": {"id": 1' + "0" * 400 + "}}"),
        (f"{BASE}/attributions", '{"query": {"id": 1' + "0" * 5000 + "}}"),  # beyond int()'s 4,300 digits
        (f"{BASE}/coreset", '{"size": 1' + "0" * 400 + "}"),
        (f"{BASE}/coreset", '{"size": 2, "query_ids": [-1' + "0" * 400 + "]}"),
    ],
)
def test_huge_integers_are_refused(client: TestClient, url: str, body: str) -> None:
    response = client.post(url, content=body, headers=JSON)
    assert response.status_code in (404, 422), response.text
    assert response.json()["detail"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "image/png"])
@pytest.mark.parametrize(
    ("url", "body"),
    [
        (f"{BASE}/attributions", '{"query": {"id": 0}}'),
        (f"{BASE}/attributions/subset", '{"query": {"id": 0}, "size": 2}'),
        (f"{BASE}/coreset", '{"size": 2}'),
    ],
)
def test_a_body_that_is_not_json_gets_415(client: TestClient, url: str, body: str, content_type: str) -> None:
    """Case 6: a wrong Content-Type was a 422 about the body's shape; 415 is the convention."""
    response = client.post(url, content=body, headers={"content-type": content_type})
    assert response.status_code == 415
    assert response.json()["detail"] == (
        f"request body must be JSON (Content-Type: application/json); got {content_type!r}"
    )
    missing = client.post(url, content=body)
    assert missing.status_code == 415 and missing.json()["detail"].endswith("got no Content-Type")
    for content_type in ("application/json; charset=utf-8", "application/vnd.api+json"):
        ok = client.post(url, content=body, headers={"content-type": content_type})
        assert ok.status_code == 200, ok.text


def test_an_integer_beyond_float64_is_refused_at_its_location(client: TestClient) -> None:
    """Beyond int()'s 4,300 digits this was a JSON error at ``["body", 0]`` quoting Python's own advice."""
    for digits in (400, 5000):
        body = '{"query": {"id": 0}, "top_k": ' + "9" * digits + "}"
        (error,) = client.post(f"{BASE}/attributions", content=body, headers=JSON).json()["detail"]
        assert error["loc"] == ["body", "top_k"] and error["input"] == f"an integer of {digits} digits"


def test_a_body_that_is_not_utf8_is_refused(client: TestClient) -> None:
    response = client.post(f"{BASE}/attributions", content=b'{"query": {"id": 0}, "x": "\xff"}', headers=JSON)
    assert response.status_code == 422
    assert response.json()["detail"].startswith("request body is not UTF-8 text: 'utf-8' codec can't decode")


@pytest.mark.parametrize("token", ["NaN", "Infinity", "1e400", "1" + "0" * 400])
@pytest.mark.parametrize("param", ["top_k", "candidates", "query_id"])
def test_non_finite_query_parameters_are_refused(client: TestClient, param: str, token: str) -> None:
    params = {"query_id": "0", param: token}
    response = client.get(f"{BASE}/attributions", params=params)
    unknown_id = param == "query_id" and token.isdigit()  # a valid integer, just not a stored id
    assert response.status_code == (404 if unknown_id else 422), response.text
    assert ("no stored query with id" if unknown_id else param) in response.text


@pytest.mark.parametrize("path", ["/v1/indexes/..%2F", "/v1/indexes/digits/", "/v1/indexes/%2e%2e/", "/v1/"])
def test_trailing_slashes_and_dot_segments_are_404_not_redirects(client: TestClient, path: str) -> None:
    """Case 6: ``/v1/indexes/..%2F`` answered a 307 redirect to a path the client never asked for."""
    response = client.get(path, follow_redirects=False)
    assert response.status_code == 404
    assert "location" not in response.headers


def test_an_unexpected_error_is_a_json_500_logged_once_and_counted(
    index_root: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Case 2: a 500 had no access-log line, no request id and no ``status="500"`` series."""
    from service.engine.engine import AttributionEngine

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(AttributionEngine, "attribute", broken)
    app = create_app(Settings(index_root=index_root))
    with TestClient(app, raise_server_exceptions=False) as c, caplog.at_level(logging.INFO):
        response = c.post(
            f"{BASE}/attributions", json={"query": {"id": 0}}, headers={"X-Request-ID": "req-500"}
        )
        metrics = c.get("/metrics").text
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {
        "detail": "internal error; the service log has its traceback under request id req-500",
        "request_id": "req-500",
    }
    assert response.headers["X-Request-ID"] == "req-500"
    tracebacks = [r for r in caplog.records if r.exc_info and "req-500" in r.getMessage()]
    assert len(tracebacks) == 1 and "RuntimeError: a bug" in caplog.text
    access = [r for r in caplog.records if r.name == "infotrace.access" and getattr(r, "status", None) == 500]
    assert len(access) == 1 and access[0].request_id == "req-500"  # type: ignore[attr-defined]
    route = ("route", "/v1/indexes/{name}/attributions")
    assert (
        _samples(metrics)[("infotrace_requests_total", (("method", "POST"), route, ("status", "500")))] == 1
    )


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            # 309 digits: past float64 (1.8e308) but short enough to reach the route as an integer
            '{"query": {"input": [' + ",".join(["0.0"] * 784) + '], "target": ' + "9" * 309 + "}}",
            "target must be a finite number within float64's range",
        ),
        ('{"query": {"feature": [' + "9" * 309 + "]}}", "feature values must be finite float32"),
        ('{"query": {"id": 0}, "score": "\\ud800"}', "lone UTF-16 surrogate"),
        ('{"query": {"id": 0}, "\\udfff": 1}', "lone UTF-16 surrogate"),
    ],
)
def test_review_findings_are_4xx_not_500(client: TestClient, body: str, expected: str) -> None:
    """A newcomer's review found these 500s: integers beyond float64 as a target or a feature, a lone
    surrogate in a string the 422 would echo."""
    response = client.post(f"{BASE}/attributions", content=body, headers=JSON)
    assert response.status_code == 422, response.text
    assert expected in response.text


def test_a_huge_validation_error_is_capped(client: TestClient) -> None:
    """50,000 booleans as a feature made 50,000 errors echoing the whole list (14 MB, seconds of work on the
    event loop); now at most 20 errors and no long echoed input."""
    body = '{"query": {"feature": [' + ",".join(["true"] * 50_000) + "]}}"
    response = client.post(f"{BASE}/attributions", content=body, headers=JSON)
    assert response.status_code == 422
    assert len(response.content) < 20_000
    assert response.json()["detail"][-1]["type"] == "truncated"
