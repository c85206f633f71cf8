"""Fuzzing the API from its own OpenAPI schema (schemathesis): no 5xx responses, no schema violations."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks

from service.app import create_app
from service.core.settings import Settings
from service.engine.registry import IndexRegistry

EXAMPLES_PER_OPERATION = 120
MIN_REQUESTS = 1000


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
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
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
