"""Fuzzing the API from its own OpenAPI schema (schemathesis): no 5xx responses, no schema violations."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks

from service.app import create_app
from service.core.settings import Settings
from service.engine.registry import IndexRegistry

EXAMPLES_PER_OPERATION = 120
MIN_REQUESTS = 1000


def _repeatable(max_examples: int) -> settings:
    """Hypothesis settings of every fuzzer here: derandomized (the same cases each run), no deadline."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )


def _aim_at_the_index(case: schemathesis.Case) -> None:
    """Random names and ids only ever reach the 404 branches (tested in test_api): fold them onto the real
    index and mostly-valid ids (0..99 over 80 stored queries) so that the fuzzing reaches the scoring code."""
    if case.path_parameters and "name" in case.path_parameters:
        case.path_parameters["name"] = "digits"
    for params in (case.path_parameters, case.query):
        for key in ("example_id", "query_id"):
            if params and isinstance(params.get(key), int):
                params[key] = params[key] % 100
    query = case.body.get("query") if isinstance(case.body, dict) else None
    if isinstance(query, dict) and isinstance(query.get("id"), int) and not isinstance(query["id"], bool):
        query["id"] = query["id"] % 100


def _fuzzer(operation: Any, sent: dict[str, int]) -> Callable[[], None]:
    label = f"{operation.method.upper()} {operation.path}"

    @given(case=operation.as_strategy())
    @_repeatable(EXAMPLES_PER_OPERATION)
    def fuzz(case: schemathesis.Case) -> None:
        _aim_at_the_index(case)
        sent[label] = sent.get(label, 0) + 1
        # every default check except positive-data acceptance: a schema-valid request may still be refused
        # with a 4xx for limits the schema cannot state (top_k above the index size, an input's shape)
        case.call_and_validate(excluded_checks=[checks.positive_data_acceptance])

    return fuzz  # type: ignore[no-any-return]


def test_api_conforms_to_its_schema(index_root: Path) -> None:
    """Every operation, fuzzed with schemathesis' strategies; each response passes all default checks
    (not a server error, documented status code and content type, response body matches the schema)."""
    app = create_app(Settings(index_root=index_root, max_top_k=50, max_candidates=2000, max_subset_size=20))
    # schemathesis drives the ASGI app without its lifespan, so load the indexes as the lifespan would
    app.state.registry = IndexRegistry.load(index_root)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    sent: dict[str, int] = {}
    for result in schema.get_all_operations():
        _fuzzer(result.ok(), sent)()
    assert sum(sent.values()) >= MIN_REQUESTS, sent
    assert "POST /v1/indexes/{name}/attributions" in sent


HOSTILE_TOKENS = [
    "NaN",
    "Infinity",
    "-Infinity",
    "1e400",
    "-1e400",
    "1" + "0" * 400,
    "-" + "9" * 5000,
    '"\u0000"',
]
CONTENT_TYPES = ["application/json", "text/plain", "application/x-www-form-urlencoded", None]
HOSTILE_PER_OPERATION = 60
MARKER = "\u2603hostile\u2603"


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every position in a JSON document (the root, each key's value, each list item)."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += _paths(item, (*prefix, i))
    return found


def _with_token(document: Any, path: tuple[Any, ...], marker: str) -> Any:
    if not path:
        return marker
    copy = dict(document) if isinstance(document, dict) else list(document)
    copy[path[0]] = _with_token(document[path[0]], path[1:], marker)
    return copy


def _hostile_fuzzer(operation: Any, client: Any, sent: dict[str, int]) -> Callable[[], None]:
    from hypothesis import strategies as st

    label = f"{operation.method.upper()} {operation.path}"

    @given(case=operation.as_strategy(), data=st.data())
    @_repeatable(HOSTILE_PER_OPERATION)
    def hostile(case: schemathesis.Case, data: st.DataObject) -> None:
        _aim_at_the_index(case)
        token = data.draw(st.sampled_from(HOSTILE_TOKENS))
        query = dict(case.query or {})
        path_params = dict(case.path_parameters or {})
        has_body = isinstance(case.body, dict | list)  # schemathesis leaves bodies unset with a sentinel
        where = data.draw(
            st.sampled_from(["query"] + (["path"] if path_params else []) + (["body"] if has_body else []))
        )
        if where == "query":
            query[data.draw(st.sampled_from(sorted(query) or ["top_k"]))] = token.strip('"')
        elif where == "path":
            path_params[data.draw(st.sampled_from(sorted(path_params)))] = token.strip('"')
        body_text, content_type = None, None
        if has_body:
            document = case.body
            if where == "body":  # the token goes in raw: json.dumps could not write most of them
                document = _with_token(document, data.draw(st.sampled_from(_paths(document))), MARKER)
            body_text = json.dumps(document).replace(f'"{MARKER}"', token)
            content_type = data.draw(st.sampled_from(CONTENT_TYPES))
        url = operation.path.format(**{k: quote(str(v), safe="") for k, v in path_params.items()})
        headers = {"content-type": content_type} if content_type else {}
        response = client.request(
            operation.method.upper(), url, params=query, content=body_text, headers=headers
        )
        sent[label] = sent.get(label, 0) + 1
        assert response.status_code < 500, (label, url, query, body_text, response.text[:500])
        if response.status_code >= 400:
            assert "detail" in response.json(), response.text[:300]

    return hostile  # type: ignore[no-any-return]


def test_hostile_tokens_in_every_field_of_every_route_get_no_5xx(index_root: Path) -> None:
    """Non-finite numbers, integers beyond any range and wrong content types, put by hypothesis into every
    position of schemathesis' generated bodies, query strings and path parameters: never a 5xx, and every
    error is JSON with a ``detail`` (issue #16)."""
    from fastapi.testclient import TestClient

    app = create_app(Settings(index_root=index_root, max_top_k=50, max_candidates=2000, max_subset_size=20))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    sent: dict[str, int] = {}
    with TestClient(app, raise_server_exceptions=False) as client:
        for operation in operations:
            _hostile_fuzzer(operation, client, sent)()
    assert len(sent) == len(operations), sent
    assert min(sent.values()) >= len(HOSTILE_TOKENS), sent  # a route without parameters: one per token
