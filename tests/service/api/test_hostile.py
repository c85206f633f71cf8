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
            "target must be a finite number within float32's range",
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
    event loop, 4.6 s for a million); now one error naming the first wrong position, no echoed list."""
    for ids in ("true", "0.5"):
        body = '{"query": {"feature": [0.5, ' + ",".join(["true"] * 50_000) + "]}}"
        if ids == "0.5":
            body = '{"size": 1, "query_ids": [0, ' + ",".join(["0.5"] * 50_000) + "]}"
        url = f"{BASE}/attributions" if ids == "true" else f"{BASE}/coreset"
        response = client.post(url, content=body, headers=JSON)
        assert response.status_code == 422
        assert len(response.content) < 1_000
        (error,) = response.json()["detail"]
        shown = "true/false" if ids == "true" else "float"
        expected = "a list of numbers" if ids == "true" else "a list of integer ids"
        assert error["msg"] == f"expected {expected}; position 1 holds {shown}"


def _input(*leaves: str) -> str:
    """A digits raw-input body whose first values are ``leaves`` (JSON tokens), the rest 0.0."""
    return '{"query": {"input": [' + ",".join([*leaves, *["0.0"] * (784 - len(leaves))]) + "]}}"


@pytest.mark.parametrize(
    ("body", "loc", "kind"),
    [
        ('{"query": {"id": 0, "id": 1}}', ["body", "query", "id"], "duplicate_key"),
        ('{"query": {"id": 0}, "top_k": 3, "top_k": 300}', ["body", "top_k"], "duplicate_key"),
        ('{"query": {"id": "5"}}', ["body", "query", "id"], "int_type"),
        ('{"query": null}', ["body", "query"], "query_kind"),
        ('{"query": [0]}', ["body", "query"], "query_kind"),
        ('{"query": {"input": []}}', ["body", "query", "input"], "too_short"),
        ('{"query": {"feature": [1, true]}}', ["body", "query", "feature"], "number_list"),
    ],
)
def test_strict_bodies_answer_one_error_at_the_field(
    client: TestClient, body: str, loc: list, kind: str
) -> None:
    """Review findings: duplicate JSON keys took the last value silently; a bad query object answered one
    error per query kind (stored, input, feature) instead of one for the kind it names."""
    response = client.post(f"{BASE}/attributions", content=body, headers=JSON)
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert (error["loc"], error["type"]) == (loc, kind)


@pytest.mark.parametrize(
    ("leaves", "expected"),
    [
        (["true", "0.5"], "position [0] holds true, not a number"),
        (["0.5", "false"], "position [1] holds false, not a number"),
        (["0.5", '"a"'], "position [1] holds text"),
        (["null"], "position [0] holds null"),
        (["1" + "0" * 25], "position [0] holds an integer beyond 64 bits"),
        (["[[0.5]]"], "input must have shape [784]; it is nested deeper at [0]"),
    ],
)
def test_raw_inputs_numpy_would_misread_are_refused(client: TestClient, leaves: list, expected: str) -> None:
    """``[true, 0.5]`` was read as ``[1.0, 0.5]``; an integer beyond 64 bits was called "text"; deep
    nesting got numpy's message about dimensions."""
    response = client.post(f"{BASE}/attributions", content=_input(*leaves), headers=JSON)
    assert response.status_code == 422, response.text
    assert expected in response.json()["detail"]


def test_a_body_nested_beyond_the_parser_is_422(client: TestClient) -> None:
    body = '{"query": {"input": ' + "[" * 100_000 + "]" * 100_000 + "}}"
    response = client.post(f"{BASE}/attributions", content=body, headers=JSON)
    assert response.status_code == 422
    assert response.json()["detail"].startswith("request body nests arrays or objects too deeply")


@pytest.mark.parametrize(
    ("url", "loc", "kind"),
    [
        (f"{BASE}/examples/0.0", ["path", "example_id"], "int_parsing"),
        (f"{BASE}/examples/1_0", ["path", "example_id"], "int_parsing"),
        (f"{BASE}/examples/%200", ["path", "example_id"], "int_parsing"),
        (f"{BASE}/queries/+1/image.png", ["path", "example_id"], "int_parsing"),
        (f"{BASE}/attributions?query_id=1.0", ["query", "query_id"], "int_parsing"),
        (f"{BASE}/attributions?query_id=%2B1", ["query", "query_id"], "int_parsing"),
        (f"{BASE}/attributions?query_id=1&query_id=2", ["query", "query_id"], "duplicate_parameter"),
        (f"{BASE}/attributions?query_id=1&top_k=2&top_k=3", ["query", "top_k"], "duplicate_parameter"),
        (f"{BASE}/examples/0?includeinput=true", ["query", "includeinput"], "extra_forbidden"),
        (f"{BASE}/examples/0/image.png?scale=2&scale=3", ["query", "scale"], "duplicate_parameter"),
        (f"{BASE}?verbose=1", ["query", "verbose"], "extra_forbidden"),
        ("/v1/indexes?page=2", ["query", "page"], "extra_forbidden"),
    ],
)
def test_query_and_path_parameters_are_parsed_strictly(
    client: TestClient, url: str, loc: list, kind: str
) -> None:
    """Review findings: ``0.0``, ``1_0``, `` 0`` and ``+1`` were read as integer ids, a repeated parameter
    took its last value, and unknown parameters were ignored on every route but the attribution forms."""
    response = client.get(url)
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert (error["loc"], error["type"]) == (loc, kind)
    assert client.get(f"{BASE}/examples/0?include_input=false").status_code == 200


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"content-type": "application/json; charset=latin-1"}, "JSON bodies are UTF-8"),
        ([("content-type", "application/json"), ("content-type", "text/plain")], "2 Content-Type headers"),
    ],
)
def test_content_types_are_one_utf8_json(client: TestClient, headers: object, expected: str) -> None:
    """``charset=latin-1`` was accepted and decoded as UTF-8; of two Content-Type headers the first won."""
    response = client.post(f"{BASE}/attributions", content=b'{"query": {"id": 0}}', headers=headers)
    assert response.status_code == 415
    assert expected in response.json()["detail"]
    ok = client.post(f"{BASE}/attributions", content=b'{"query": {"id": 0}}', headers={
        "content-type": "application/json; charset=UTF-8"
    })  # fmt: skip
    assert ok.status_code == 200


def test_request_ids_are_plain_tokens(client: TestClient) -> None:
    """A client's X-Request-ID was echoed and logged whatever it was (60 KB, control bytes)."""
    kept = client.get("/healthz", headers={"x-request-id": "job-42.attempt:1"})
    assert kept.headers["x-request-id"] == "job-42.attempt:1"
    for hostile in ("x" * 129, "a b", "id\x7f"):
        replaced = client.get("/healthz", headers={"x-request-id": hostile}).headers["x-request-id"]
        assert replaced != hostile and len(replaced) == 32 and int(replaced, 16) >= 0


def test_health_and_readiness_answer_head(client: TestClient) -> None:
    """Load balancers probe with HEAD; it was 405."""
    for path in ("/healthz", "/readyz"):
        response = client.head(path)
        assert (response.status_code, response.content) == (200, b"")


def test_a_feature_near_float32s_limit_ranks_as_a_small_one(client: TestClient) -> None:
    """FAISS searches in float32: a feature of 3e38 everywhere overflowed its inner products, and the
    inner-product ranking came back empty, marked exact; 1e38 gave another order than 1e30. Scaling a
    query up must not reorder the linear scores."""
    k = client.get(BASE).json()["k"]
    rankings = {}
    for value in (1.0, 1e30, 3e38):
        for score in ("inner_product", "influence"):
            body = {"query": {"feature": [value] * k}, "score": score, "top_k": 10}
            response = client.post(f"{BASE}/attributions", json=body).json()
            rankings[value, score] = [r["id"] for r in response["results"]]
            assert len(rankings[value, score]) == 10 and response["exact"] is True
    for score in ("inner_product", "influence"):
        assert rankings[1.0, score] == rankings[1e30, score] == rankings[3e38, score]


def test_compressed_bodies_made_up_methods_and_a_zero_variance(client: TestClient) -> None:
    """Review findings: Content-Encoding was ignored (a gzip body was "not UTF-8", a plain one labelled
    gzip was read); every made-up HTTP method added series to /metrics; a query with zero posterior variance
    answered output_entropy null against a schema saying float (now nullable)."""
    body = b'{"query": {"id": 0}}'
    for encoding in ("gzip", "br, zstd"):
        response = client.post(f"{BASE}/attributions", content=body,
                               headers={**JSON, "content-encoding": encoding})  # fmt: skip
        assert response.status_code == 415
        assert (
            response.json()["detail"]
            == f"Content-Encoding {encoding!r} is not supported; send the JSON body uncompressed"
        )
    assert (
        client.post(
            f"{BASE}/attributions", content=body, headers={**JSON, "content-encoding": "identity"}
        ).status_code
        == 200
    )
    for i in range(3):
        client.request(f"MADEUP{i}", "/healthz")
    methods = {labels.get("method") for (_, labels_t), _ in _samples(client.get("/metrics").text).items()
               for labels in [dict(labels_t)]}  # fmt: skip
    assert "other" in methods and not any(str(m).startswith("MADEUP") for m in methods)
    k = client.get(BASE).json()["k"]
    zero = client.post(f"{BASE}/attributions", json={"query": {"feature": [0.0] * k}})
    assert zero.status_code == 200 and zero.json()["query"]["output_entropy"] is None


def test_a_default_coreset_size_fits_a_small_limit(index_root: Path) -> None:
    """The coreset's default size (10) over a limit of 5 was refused although the client sent none; the
    attribution routes lower their defaults to the limits."""
    app = create_app(Settings(index_root=index_root, max_coreset_size=5))
    with TestClient(app) as small:
        response = small.post(f"{BASE}/coreset", json={})
        assert response.status_code == 200 and response.json()["size"] == 5
        refused = small.post(f"{BASE}/coreset", json={"size": 6})
        assert refused.status_code == 422 and "size must be at most 5" in refused.json()["detail"]


def test_regression_targets_beyond_float32_are_refused(tmp_path: Path) -> None:
    """A regression index took "target": 1e39 (or 10**300) although its residuals are float32."""
    import torch

    from indexer.build import build_index
    from indexer.config import IndexConfig
    from indexer.data import Dataset
    from indexer.features.models import ModelSpec, build_model
    from indexer.features.tasks import RegressionOutput

    spec = ModelSpec("mlp", {"in_features": 4, "hidden": [3], "out_features": 1})
    torch.manual_seed(0)
    build_index(build_model(spec), RegressionOutput(1.0), Dataset(torch.randn(20, 4), torch.randn(20)),
                tmp_path / "reg", model_spec=spec, config=IndexConfig(k=4), progress=False)  # fmt: skip
    with TestClient(create_app(Settings(index_root=tmp_path))) as reg:
        for target in ("1e39", "1" + "0" * 300):
            body = '{"query": {"input": [0.1, 0.2, 0.3, 0.4], "target": ' + target + "}}"
            response = reg.post("/v1/indexes/reg/attributions", content=body, headers=JSON)
            assert response.status_code == 422
            assert "target must be a finite number within float32's range" in response.json()["detail"]
        ok = reg.post(
            "/v1/indexes/reg/attributions", json={"query": {"input": [0.1, 0.2, 0.3, 0.4], "target": 3e38}}
        )
        assert ok.status_code == 200
