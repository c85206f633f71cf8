"""HTTP routes (DESIGN.md 2.2). Sync handlers: FastAPI runs them in its thread pool, off the event loop."""

from __future__ import annotations

import math
import time
from typing import Any, TypeVar

import numpy as np
from fastapi import APIRouter, Response, status
from pydantic import BaseModel

from indexer.enums import Score
from indexer.exceptions import InvalidQueryError
from service.deps import IndexDep, RegistryDep, SettingsDep
from service.engine import AttributionEngine, Query
from service.schemas import (
    AttributedExample,
    AttributionRequest,
    AttributionResponse,
    CoresetMember,
    CoresetRequest,
    CoresetResponse,
    FeatureQuery,
    Health,
    IndexList,
    IndexSummary,
    QueryInfo,
    QuerySpec,
    Readiness,
    ScoreSet,
    StoredQuery,
    SubsetMember,
    SubsetRequest,
    SubsetResponse,
    Timings,
)

__all__ = ["router"]

router = APIRouter()

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"description": "unknown index or example id"},
    409: {"description": "the index cannot featurize raw inputs (no model spec) or the model does not match"},
    422: {"description": "malformed query: shape, dtype, non-finite values or out-of-range options"},
    503: {"description": "the index is present but not ready (failed to load or verify)"},
}


@router.get("/healthz", response_model=Health, tags=["ops"])
async def healthz() -> Health:
    """Liveness: the process answers."""
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, tags=["ops"], responses={503: {"model": Readiness}})
async def readyz(registry: RegistryDep, response: Response) -> Readiness:
    """Readiness: 200 when every index found under the root is loaded; 503 (with reasons) otherwise."""
    states = dict.fromkeys(registry.engines, "ready") | dict(registry.failures)
    ready = bool(registry.engines) and not registry.failures
    detail = None
    if not states:
        detail = f"no index folders (subfolders holding manifest.json) under {registry.root}"
    if not ready:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return Readiness(ready=ready, indexes=states, detail=detail)


def _summary(name: str, engine: AttributionEngine) -> IndexSummary:
    m = engine.data.manifest
    return IndexSummary(
        name=name,
        ready=True,
        n_train=engine.data.n_train,
        n_query=len(engine.data.query_phi),
        k=engine.data.k,
        model=dict(m["model"]),
        projection=m["projection"],
        surrogate=m["surrogate"],
        faiss=m["faiss"],
        raw_input_queries=engine.model is not None,
        error=engine.model_error,
    )


@router.get("/v1/indexes", response_model=IndexList, tags=["indexes"])
def list_indexes(registry: RegistryDep) -> IndexList:
    """Every index under the root, ready or not."""
    ready = [_summary(name, engine) for name, engine in sorted(registry.engines.items())]
    broken = [
        IndexSummary(name=name, ready=False, error=why, raw_input_queries=False)
        for name, why in sorted(registry.failures.items())
    ]
    return IndexList(indexes=ready + broken)


@router.get("/v1/indexes/{name}", response_model=IndexSummary, tags=["indexes"], responses=ERROR_RESPONSES)
def get_index_summary(engine: IndexDep) -> IndexSummary:
    """One index: sizes, model, projection, surrogate and FAISS settings from its manifest."""
    return _summary(engine.data.name, engine)


def _query(engine: AttributionEngine, spec: QuerySpec) -> Query:
    if isinstance(spec, StoredQuery):
        return engine.stored_query(spec.id)
    if isinstance(spec, FeatureQuery):
        return engine.feature_query(spec.feature)
    return engine.input_query(spec.input, spec.target)


def _query_info(engine: AttributionEngine, query: Query) -> QueryInfo:
    v = query.terms.posterior_variance
    return QueryInfo(
        kind=query.kind,
        id=query.id,
        label=query.label,
        target=query.target,
        prediction=query.prediction,
        probabilities=query.probabilities,
        output=query.output,
        posterior_variance=v,
        output_entropy=0.5 * math.log(2 * math.pi * math.e * v) if v > 0 else -math.inf,
        predictive_entropy=engine.predictive_entropy(query),
        metadata=_without_label(engine.query_metadata(query.id)) if query.id is not None else None,
    )


@router.post(
    "/v1/indexes/{name}/coreset",
    response_model=CoresetResponse,
    tags=["attributions"],
    responses=ERROR_RESPONSES,
)
def coreset(request: CoresetRequest, engine: IndexDep, settings: SettingsDep) -> CoresetResponse:
    """m training examples carrying the most information about a query set (summed information gain)."""
    started = time.perf_counter()
    _check_limit(
        "size",
        request.size,
        min(settings.max_coreset_size, engine.data.n_train),
        "the service limit and the index size",
    )
    result = engine.coreset(request.size, request.query_ids)
    ids = [int(i) for i in result.indices]
    meta = engine.train_metadata(ids)
    members = [
        CoresetMember(
            step=step + 1,
            id=i,
            label=meta.get(i, {}).get("label"),
            marginal_gain=float(result.marginal_gains[step]),
            objective=float(result.objective[step]),
        )
        for step, i in enumerate(ids)
    ]
    elapsed = (time.perf_counter() - started) * 1e3
    return CoresetResponse(
        index=engine.data.name,
        size=request.size,
        n_queries=len(request.query_ids) if request.query_ids is not None else len(engine.data.query_phi),
        members=members,
        objective=float(result.objective[-1]),
        timings=Timings(featurize_ms=0.0, retrieve_ms=0.0, rerank_ms=elapsed, total_ms=elapsed),
    )


def _without_label(meta: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in meta.items() if key != "label"}


def _score_set(scores: dict[Score, np.ndarray], i: int) -> ScoreSet:
    return ScoreSet(**{score.value: float(values[i]) for score, values in scores.items()})


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


@router.post(
    "/v1/indexes/{name}/attributions",
    response_model=AttributionResponse,
    tags=["attributions"],
    responses=ERROR_RESPONSES,
)
def attributions(request: AttributionRequest, engine: IndexDep, settings: SettingsDep) -> AttributionResponse:
    """Training examples ranked by how much the query's prediction owes to them (DESIGN.md 1.3, 2.2)."""
    started = time.perf_counter()
    n = engine.data.n_train
    request = _clamp_defaults(request, {"top_k": min(settings.max_top_k, n)})
    _check_limit("top_k", request.top_k, min(settings.max_top_k, n), "the service limit and the index size")
    candidates = request.candidates or settings.default_candidates
    _check_limit("candidates", candidates, settings.max_candidates, "the service limit")
    query = _query(engine, request.query)
    ranked = engine.rank(query.terms, request.score, request.direction, request.top_k, candidates)
    ids = [int(i) for i in ranked.ids]
    meta = engine.train_metadata(ids)
    predictions = engine.train_prediction(ranked.ids)
    results = [
        AttributedExample(
            rank=r + 1,
            id=i,
            label=meta.get(i, {}).get("label"),
            prediction=predictions[r].item(),
            sign=int(np.sign(ranked.signed[r])),
            signed_score=float(ranked.signed[r]),
            scores=_score_set(ranked.scores, r),
            metadata=_without_label(meta.get(i, {})),
        )
        for r, i in enumerate(ids)
    ]
    info = _query_info(engine, query)
    return AttributionResponse(
        index=engine.data.name,
        score=request.score,
        direction=request.direction,
        top_k=request.top_k,
        candidates_searched=ranked.depth,
        exact=engine.exact,
        query=info,
        results=results,
        timings=Timings(
            featurize_ms=query.featurize_ms,
            retrieve_ms=ranked.retrieve_ms,
            rerank_ms=ranked.rerank_ms,
            total_ms=(time.perf_counter() - started) * 1e3,
        ),
    )


@router.post(
    "/v1/indexes/{name}/attributions/subset",
    response_model=SubsetResponse,
    tags=["attributions"],
    responses=ERROR_RESPONSES,
)
def subset_attribution(request: SubsetRequest, engine: IndexDep, settings: SettingsDep) -> SubsetResponse:
    """Greedy group attribution: the set of m examples with the largest joint score (DESIGN.md 1.4)."""
    started = time.perf_counter()
    n = engine.data.n_train
    request = _clamp_defaults(
        request,
        {"size": min(settings.max_subset_size, n), "candidates": min(settings.max_subset_candidates, n)},
    )
    _check_limit(
        "size", request.size, min(settings.max_subset_size, n), "the service limit and the index size"
    )
    _check_limit(
        "candidates",
        request.candidates,
        min(settings.max_subset_candidates, n),
        "the service limit and the index size",
    )
    if request.candidates < request.size:
        raise InvalidQueryError(f"candidates ({request.candidates}) must be at least size ({request.size})")
    query = _query(engine, request.query)
    found = engine.subset(query.terms, request.objective, request.size, request.candidates)
    greedy, pool = found["greedy"], found["pool"]
    ids = [int(i) for i in found["ids"]]
    meta = engine.train_metadata(ids)
    members = [
        SubsetMember(
            step=step + 1,
            id=i,
            label=meta.get(i, {}).get("label"),
            marginal_gain=float(greedy.marginal_gains[step]),
            joint=float(greedy.joint[step]),
            scores=_score_set(pool.scores, int(greedy.indices[step])),
            metadata=_without_label(meta.get(i, {})),
        )
        for step, i in enumerate(ids)
    ]
    info = _query_info(engine, query)
    return SubsetResponse(
        index=engine.data.name,
        objective=request.objective,
        size=request.size,
        candidates=len(pool.ids),
        query=info,
        members=members,
        joint=float(greedy.joint[-1]),
        top_single_joint=float(found["top_single_joint"]),
        timings=Timings(
            featurize_ms=query.featurize_ms,
            retrieve_ms=pool.retrieve_ms,
            rerank_ms=pool.rerank_ms,
            total_ms=(time.perf_counter() - started) * 1e3,
        ),
    )
