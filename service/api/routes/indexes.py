"""Health, readiness and the indexes the service holds (DESIGN.md 2.2)."""

from __future__ import annotations

import os
import weakref

from fastapi import APIRouter, Response, status

from service.api.deps import IndexDep, RegistryDep
from service.api.errors import ERROR_RESPONSES
from service.api.schemas import Health, IndexList, IndexSummary, Readiness
from service.api.strict import StrictJSONRoute
from service.engine.engine import AttributionEngine

__all__ = ["router"]

router = APIRouter(route_class=StrictJSONRoute)


@router.get("/healthz", response_model=Health, tags=["ops"])
@router.head("/healthz", include_in_schema=False)
async def healthz() -> Health:
    """Liveness: the process answers."""
    return Health(status="ok", pid=os.getpid())


@router.get("/readyz", response_model=Readiness, tags=["ops"], responses={503: {"model": Readiness}})
@router.head("/readyz", include_in_schema=False)
async def readyz(registry: RegistryDep, response: Response) -> Readiness:
    """Readiness: 200 when every index found under the root is loaded; 503 (with reasons) otherwise. A served
    index that cannot featurize raw inputs is ready (stored-id and feature queries work); ``missing`` says
    why."""
    states = dict.fromkeys(registry.engines, "ready") | dict(registry.failures)
    ready = bool(registry.engines) and not registry.failures
    detail = None
    if not states:
        detail = f"no index folders (subfolders holding manifest.json) under {registry.root}"
    if not ready:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    missing = {
        name: {"raw_input_queries": engine.model_error}
        for name, engine in sorted(registry.engines.items())
        if engine.model_error is not None
    }
    return Readiness(ready=ready, indexes=states, detail=detail, missing=missing)


def _summary(engine: AttributionEngine) -> IndexSummary:
    manifest = engine.data.manifest
    return IndexSummary(
        name=engine.name,
        ready=True,
        n_train=engine.data.n_train,
        n_query=engine.data.n_query,
        k=engine.data.k,
        model=manifest.model.to_json(),
        projection=manifest.projection.to_json(),
        surrogate=manifest.surrogate.to_json(),
        faiss=manifest.faiss.to_json(),
        raw_input_queries=engine.raw_inputs,
        text_queries=engine.raw_inputs and engine.queries.tokenizer is not None,
        error=engine.model_error,
    )


_SUMMARIES: weakref.WeakKeyDictionary[AttributionEngine, str] = weakref.WeakKeyDictionary()
"""Each loaded engine's summary as JSON: it never changes while the engine is served (a new version is a new
engine), and the per-layer projection blocks of a large model take milliseconds to serialize."""


def _summary_json(engine: AttributionEngine) -> str:
    cached = _SUMMARIES.get(engine)
    if cached is None:
        cached = _SUMMARIES[engine] = _summary(engine).model_dump_json()
    return cached


@router.get("/v1/indexes", response_model=IndexList, tags=["indexes"])
def list_indexes(registry: RegistryDep) -> Response:
    """Every index under the root, ready or not."""
    ready = [_summary_json(engine) for _, engine in sorted(registry.engines.items())]
    broken = [
        IndexSummary(
            name=name, ready=False, error=why, raw_input_queries=False, text_queries=False
        ).model_dump_json()
        for name, why in sorted(registry.failures.items())
    ]
    body = '{"indexes":[' + ",".join(ready + broken) + "]}"  # IndexList, from the summaries' JSON
    return Response(body, media_type="application/json")


@router.get("/v1/indexes/{name}", response_model=IndexSummary, tags=["indexes"], responses=ERROR_RESPONSES)
def get_index_summary(engine: IndexDep) -> Response:
    """One index: sizes, model, projection, surrogate and FAISS settings from its manifest."""
    return Response(_summary_json(engine), media_type="application/json")
