"""Attribution routes (DESIGN.md 2.2): ranked examples, greedy subsets and coresets, each as a POST with a
JSON body and (for stored queries) a read-only, linkable GET form that answers exactly what the POST does.

Each route translates: request schema -> limits -> engine call -> response schema. Sync handlers: FastAPI
runs them in its thread pool, off the event loop.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Response
from fastapi import Query as Param
from pydantic import BaseModel, ValidationError

from indexer.enums import Direction, Objective, Score
from indexer.exceptions import InvalidQueryError
from service.api.deps import IndexDep, SettingsDep
from service.api.errors import ERROR_RESPONSES, error_outcome
from service.api.schemas import (
    AttributionRequest,
    AttributionResponse,
    BatchAttributionRequest,
    BatchAttributionResponse,
    CoresetMember,
    CoresetRequest,
    CoresetResponse,
    FeatureQuery,
    InputQuery,
    QueryInfo,
    QuerySpec,
    ScoreSet,
    StoredQuery,
    SubsetMember,
    SubsetRequest,
    SubsetResponse,
    TextQuery,
    Timings,
    json_response,
    plain_json_response,
)
from service.api.strict import StrictJSONRoute
from service.core.settings import Settings
from service.engine.engine import AttributionEngine
from service.engine.query import Query
from service.engine.results import Attribution, QueryDescription
from service.engine.results import Timings as EngineTimings
from service.engine.retrieval import SearchKnobs

__all__ = ["router"]

router = APIRouter(tags=["attributions"], route_class=StrictJSONRoute)

RequestT = TypeVar("RequestT", bound=BaseModel)


def _clamp_defaults(request: RequestT, limits: dict[str, int]) -> RequestT:
    """Lower the fields the caller left at their defaults to the limits (an explicit value is checked)."""
    update = {
        name: limit
        for name, limit in limits.items()
        if name not in request.model_fields_set and getattr(request, name) > limit
    }
    return request.model_copy(update=update) if update else request


def _check_limit(name: str, value: int, limit: int, why: str) -> None:
    if value > limit:
        raise InvalidQueryError(f"{name} must be at most {limit} ({why}); got {value}")


def _query(engine: AttributionEngine, spec: QuerySpec) -> Query:
    if isinstance(spec, StoredQuery):
        return engine.queries.stored(spec.id)
    if isinstance(spec, FeatureQuery):
        return engine.queries.feature(spec.feature)
    if isinstance(spec, TextQuery):
        return engine.queries.text(spec.text, spec.continuation, spec.max_new_tokens)
    return engine.queries.input(spec.input, spec.target)


def _query_info(description: QueryDescription) -> QueryInfo:
    return QueryInfo(**vars(description))


def _score_set(scores: dict[Score, float]) -> ScoreSet:
    return ScoreSet(**{score.value: value for score, value in scores.items()})


def _timings(timings: EngineTimings, started: float) -> Timings:
    return Timings(
        featurize_ms=timings.featurize_ms,
        retrieve_ms=timings.retrieve_ms,
        rerank_ms=timings.rerank_ms,
        total_ms=(time.perf_counter() - started) * 1e3,
    )


def _prepared(
    request: AttributionRequest, engine: AttributionEngine, settings: Settings
) -> tuple[AttributionRequest, int, SearchKnobs]:
    """The request with its defaults lowered to the limits, its retrieval depth and search knobs.

    Raises:
        InvalidQueryError: an option beyond the service's limits or a knob the index does not take.
    """
    n = engine.data.n_train
    request = _clamp_defaults(request, {"top_k": min(settings.max_top_k, n)})
    _check_limit("top_k", request.top_k, min(settings.max_top_k, n), "the service limit and the index size")
    # an approximate index's recorded depth (its recall was measured there), else the service's default
    depth = engine.data.manifest.faiss.recall_candidates if not engine.exact else 0
    default = min(depth or settings.default_candidates, settings.max_candidates)  # a default fits the limit
    candidates = request.candidates or default
    _check_limit("candidates", candidates, settings.max_candidates, "the service limit")
    knobs = SearchKnobs(nprobe=request.nprobe, ef_search=request.ef_search)
    if knobs.nprobe is not None:
        _check_limit("nprobe", knobs.nprobe, settings.max_nprobe, "the service limit")
    if knobs.ef_search is not None:
        _check_limit("ef_search", knobs.ef_search, settings.max_ef_search, "the service limit")
    engine.check_knobs(knobs)
    return request, candidates, knobs


_SCORE_KEYS = {score: score.value for score in Score}  # Enum.value is a property: looked up once


def _attribution_response(engine: AttributionEngine, found: Attribution, started: float) -> dict[str, Any]:
    """An :class:`AttributionResponse` as plain data (:func:`plain_json_response`): the engine's typed
    results have its fields, one for one."""
    return {
        "index": engine.name,
        "score": found.score.value,
        "direction": found.direction.value,
        "top_k": found.top_k,
        "candidates_searched": found.depth,
        "exact": found.exact,
        "recall_at_10": found.recall_at_10,
        "query": vars(found.query),
        "results": [
            {**vars(example), "scores": {_SCORE_KEYS[s]: value for s, value in example.scores.items()}}
            for example in found.examples
        ],
        "timings": _timings(found.timings, started).model_dump(),
    }


@router.post("/v1/indexes/{name}/attributions", response_model=AttributionResponse, responses=ERROR_RESPONSES)
def attributions(request: AttributionRequest, engine: IndexDep, settings: SettingsDep) -> Response:
    """Training examples ranked by how much the query's prediction owes to them (DESIGN.md 1.3, 2.2)."""
    started = time.perf_counter()
    request, candidates, knobs = _prepared(request, engine, settings)
    query = _query(engine, request.query)
    found = engine.attribute(query, request.score, request.direction, request.top_k, candidates, knobs)
    return plain_json_response(_attribution_response(engine, found, started))


@router.post(
    "/v1/indexes/{name}/attributions:batch",
    response_model=BatchAttributionResponse,
    responses=ERROR_RESPONSES,
)
def attributions_batch(request: BatchAttributionRequest, engine: IndexDep, settings: SettingsDep) -> Response:
    """Several attribution queries in one pass: raw inputs featurized as one batch, one scan (a matrix
    product over the stored features) or one FAISS search for all, then each reranked exactly.

    Each item is the body of ``POST .../attributions`` and gets the answer that route gives it (the same
    examples, ranks and scores, bit for bit; ``candidates_searched`` may differ, the batched scan bounding
    in float32, and the timings do): ``{"status": 200, "response": ...}``, or ``{"status": 4xx, "error":
    {"detail": ...}}`` for an item that route would refuse, validation errors located under ``["body",
    "requests", i]``. Raw inputs are featurized together (INFOTRACE_BATCH_INPUTS_TOGETHER, default true):
    their features then equal the single route's up to float32 rounding, and their scores after the
    index's float16 rounding to about 1e-3 relative; with the setting false each input is featurized
    alone and its answer is the single route's bit for bit. The batch as a whole is refused (422) when it
    is not a non-empty list of at most INFOTRACE_MAX_BATCH items, and when its body is not JSON the
    service reads (duplicate keys, numbers beyond float64, nesting beyond the parser: the strict parsing
    of every route, before any item is looked at).
    """
    started = time.perf_counter()
    _check_limit("the number of requests", len(request.requests), settings.max_batch, "INFOTRACE_MAX_BATCH")
    outcomes: list[dict[str, Any] | None] = [None] * len(request.requests)  # BatchItem, as plain data
    ready: list[tuple[int, AttributionRequest, int, SearchKnobs]] = []

    def refuse(i: int, exc: Exception) -> None:
        outcome = error_outcome(exc, ("body", "requests", i))
        if outcome is None:
            raise exc  # not the client's: a 500 for the whole batch, logged with its traceback
        outcomes[i] = {"status": outcome[0], "response": None, "error": {"detail": outcome[1]}}

    for i, item in enumerate(request.requests):
        try:
            ready.append((i, *_prepared(AttributionRequest.model_validate(item), engine, settings)))
        except (ValidationError, InvalidQueryError) as exc:
            refuse(i, exc)
    queries: dict[int, Query] = {}
    together = settings.batch_inputs_together
    raw = [
        (i, spec)
        for i, spec, *_ in [(i, r.query) for i, r, _, _ in ready]
        if together and isinstance(spec, InputQuery)
    ]
    for (i, _), query in zip(raw, engine.queries.inputs([(s.input, s.target) for _, s in raw]), strict=True):
        if isinstance(query, Exception):
            refuse(i, query)
        else:
            queries[i] = query
    for i, r, _, _ in ready:
        if not (together and isinstance(r.query, InputQuery)):
            try:
                queries[i] = _query(engine, r.query)
            except Exception as exc:  # refuse() re-raises what is not the client's
                refuse(i, exc)
    featurized_ms = (time.perf_counter() - started) * 1e3  # validation and every query's featurization
    retrieve_ms = rerank_ms = 0.0
    groups: dict[SearchKnobs, list[tuple[int, AttributionRequest, int]]] = {}
    for i, r, candidates, knobs in ready:
        if i in queries:
            groups.setdefault(knobs, []).append((i, r, candidates))
    for knobs, members in groups.items():
        found = engine.attribute_many(
            [(queries[i], r.score, r.direction, r.top_k, candidates) for i, r, candidates in members], knobs
        )
        for (i, _, _), one in zip(members, found, strict=True):
            retrieve_ms += one.timings.retrieve_ms  # each item's share of the batched scan, and its own
            rerank_ms += one.timings.rerank_ms
            outcomes[i] = {
                "status": 200,
                "response": _attribution_response(engine, one, started),
                "error": None,
            }
    results = [outcome for outcome in outcomes if outcome is not None]
    assert len(results) == len(outcomes), "every item has an outcome: an answer or its error"
    timings = Timings(
        featurize_ms=featurized_ms,
        retrieve_ms=retrieve_ms,
        rerank_ms=rerank_ms,
        total_ms=(time.perf_counter() - started) * 1e3,
    )
    answered = sum(item["status"] == 200 for item in results)
    return plain_json_response(  # BatchAttributionResponse
        {"index": engine.name, "answered": answered, "results": results, "timings": timings.model_dump()}
    )


@router.post(
    "/v1/indexes/{name}/attributions/subset", response_model=SubsetResponse, responses=ERROR_RESPONSES
)
def subset_attribution(request: SubsetRequest, engine: IndexDep, settings: SettingsDep) -> Response:
    """Greedy group attribution: the set of m examples with the largest joint score (DESIGN.md 1.4)."""
    started = time.perf_counter()
    n = engine.data.n_train
    limits = {"size": min(settings.max_subset_size, n), "candidates": min(settings.max_subset_candidates, n)}
    given = request.model_fields_set
    pool = request.candidates if "candidates" in given else min(request.candidates, limits["candidates"])
    size = (
        request.size if "size" in given else min(request.size, limits["size"], pool)
    )  # a default fits the pool
    request = request.model_copy(update={"candidates": pool, "size": size})
    for field in ("size", "candidates"):
        _check_limit(field, getattr(request, field), limits[field], "the service limit and the index size")
    if request.candidates < request.size:
        raise InvalidQueryError(f"candidates ({request.candidates}) must be at least size ({request.size})")
    query = _query(engine, request.query)
    found = engine.subset(query, request.objective, request.size, request.candidates)
    return json_response(
        SubsetResponse(
            index=engine.name,
            objective=found.objective,
            size=found.size,
            candidates=found.candidates,
            query=_query_info(found.query),
            members=[SubsetMember(**{**vars(m), "scores": _score_set(m.scores)}) for m in found.members],
            joint=found.joint,
            top_single_joint=found.top_single_joint,
            timings=_timings(found.timings, started),
        )
    )


@router.post("/v1/indexes/{name}/coreset", response_model=CoresetResponse, responses=ERROR_RESPONSES)
def coreset(request: CoresetRequest, engine: IndexDep, settings: SettingsDep) -> Response:
    """m training examples carrying the most information about a query set (summed information gain)."""
    started = time.perf_counter()
    limit = min(settings.max_coreset_size, engine.data.n_train)
    request = _clamp_defaults(request, {"size": limit})  # as the attribution routes: a default fits
    _check_limit("size", request.size, limit, "the service limit and the index size")
    if request.query_ids is not None:
        # each id is one row of an (n_ids, n_train) float64 working array: bounded by the stored queries
        _check_limit("the number of query_ids", len(request.query_ids), engine.data.n_query, "stored queries")
    found = engine.coreset(request.size, request.query_ids)
    elapsed = (time.perf_counter() - started) * 1e3
    return json_response(
        CoresetResponse(
            index=engine.name,
            size=found.size,
            n_queries=found.n_queries,
            members=[CoresetMember(**vars(m)) for m in found.members],
            objective=found.objective,
            timings=Timings(featurize_ms=0.0, retrieve_ms=0.0, rerank_ms=elapsed, total_ms=elapsed),
        )
    )


# ---- read-only GET forms for stored queries (linked from the dashboard) -------------------------------
# Options left out are left out of the request too, so that defaults are lowered to the limits exactly as a
# POST without them (an explicit value is checked against the limit).

QueryId = Annotated[
    int, Param(ge=0, description="id of a stored query (see GET /v1/indexes/{name}/queries/{id})")
]


_ATTRIBUTION_DEFAULTS = AttributionRequest.model_validate({"query": {"id": 0}})
_SUBSET_DEFAULTS = SubsetRequest.model_validate({"query": {"id": 0}})


def _given(**options: Any) -> dict[str, Any]:
    return {name: value for name, value in options.items() if value is not None}


@router.get(
    "/v1/indexes/{name}/attributions",
    response_model=AttributionResponse,
    responses=ERROR_RESPONSES,
)
def attributions_by_id(
    engine: IndexDep,
    settings: SettingsDep,
    query_id: QueryId,
    top_k: Annotated[
        int | None,
        Param(ge=1, description=f"number of examples to return (default {_ATTRIBUTION_DEFAULTS.top_k})"),
    ] = None,
    score: Annotated[
        Score | None, Param(description=f"ranking score (default {_ATTRIBUTION_DEFAULTS.score.value})")
    ] = None,
    direction: Annotated[
        Direction | None,
        Param(description=f"proponents, opponents or both (default {_ATTRIBUTION_DEFAULTS.direction.value})"),
    ] = None,
    candidates: Annotated[int | None, Param(ge=1, description="retrieval depth before the rerank")] = None,
) -> Response:
    """Read-only, linkable form of ``POST .../attributions`` for a stored query; the same response."""
    body = {
        "query": {"id": query_id},
        **_given(top_k=top_k, score=score, direction=direction, candidates=candidates),
    }
    return attributions(AttributionRequest.model_validate(body), engine, settings)


@router.get(
    "/v1/indexes/{name}/attributions/subset",
    response_model=SubsetResponse,
    responses=ERROR_RESPONSES,
)
def subset_by_id(
    engine: IndexDep,
    settings: SettingsDep,
    query_id: QueryId,
    size: Annotated[
        int | None, Param(ge=1, description=f"examples m in the greedy set (default {_SUBSET_DEFAULTS.size})")
    ] = None,
    objective: Annotated[
        Objective | None,
        Param(description=f"joint score to maximise (default {_SUBSET_DEFAULTS.objective.value})"),
    ] = None,
    candidates: Annotated[
        int | None, Param(ge=1, description=f"candidate pool size (default {_SUBSET_DEFAULTS.candidates})")
    ] = None,
) -> Response:
    """Read-only, linkable form of ``POST .../attributions/subset`` for a stored query; the same response."""
    body = {"query": {"id": query_id}, **_given(size=size, objective=objective, candidates=candidates)}
    return subset_attribution(SubsetRequest.model_validate(body), engine, settings)
