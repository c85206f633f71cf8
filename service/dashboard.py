"""The audit dashboard at ``/`` and the read-only GET forms of the attribution queries it links to.

The dashboard is static (``service/static``: HTML, vanilla JavaScript, CSS; no framework, no CDN, so it
works offline) and talks to the JSON API. Every view it shows has a raw-JSON link: a stored-query view
links to ``GET /v1/indexes/{name}/attributions?query_id=...`` (or ``.../attributions/subset?...``), which
answer exactly what the POST endpoints answer for the same query, built by the same route functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, FastAPI, Query
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from indexer.enums import Direction, Objective, Score
from service.deps import IndexDep, SettingsDep
from service.routes import ERROR_RESPONSES, attributions, subset_attribution
from service.schemas import (
    AttributionRequest,
    AttributionResponse,
    SubsetRequest,
    SubsetResponse,
)

__all__ = ["router", "mount_dashboard", "STATIC_DIR"]

STATIC_DIR = Path(__file__).parent / "static"
"""The dashboard's files, shipped as package data."""

router = APIRouter()

QueryId = Annotated[int, Query(description="id of a stored query (see GET /v1/indexes/{name}/queries/{id})")]

# the defaults of the POST bodies, so that a GET without options answers like a POST without them
_ATTRIBUTION_DEFAULTS = AttributionRequest.model_validate({"query": {"id": 0}})
_SUBSET_DEFAULTS = SubsetRequest.model_validate({"query": {"id": 0}})


@router.get(
    "/v1/indexes/{name}/attributions",
    response_model=AttributionResponse,
    tags=["attributions"],
    responses=ERROR_RESPONSES,
)
def attributions_by_id(
    engine: IndexDep,
    settings: SettingsDep,
    query_id: QueryId,
    top_k: Annotated[int, Query(ge=1, description="number of training examples to return")] = (
        _ATTRIBUTION_DEFAULTS.top_k
    ),
    score: Annotated[Score, Query(description="ranking score (DESIGN.md 1.3)")] = _ATTRIBUTION_DEFAULTS.score,
    direction: Annotated[Direction, Query(description="proponents, opponents or both (by magnitude)")] = (
        _ATTRIBUTION_DEFAULTS.direction
    ),
    candidates: Annotated[int | None, Query(ge=1, description="retrieval depth before the rerank")] = None,
) -> AttributionResponse:
    """Read-only, linkable form of ``POST .../attributions`` for a stored query; the same response."""
    request = AttributionRequest.model_validate(
        {
            "query": {"id": query_id},
            "top_k": top_k,
            "score": score,
            "direction": direction,
            "candidates": candidates,
        }
    )
    return attributions(request, engine, settings)


@router.get(
    "/v1/indexes/{name}/attributions/subset",
    response_model=SubsetResponse,
    tags=["attributions"],
    responses=ERROR_RESPONSES,
)
def subset_by_id(
    engine: IndexDep,
    settings: SettingsDep,
    query_id: QueryId,
    size: Annotated[int, Query(ge=1, description="number of examples m in the greedy set")] = (
        _SUBSET_DEFAULTS.size
    ),
    objective: Annotated[Objective, Query(description="joint score to maximise (DESIGN.md 1.4)")] = (
        _SUBSET_DEFAULTS.objective
    ),
    candidates: Annotated[int, Query(ge=1, description="candidate pool size")] = _SUBSET_DEFAULTS.candidates,
) -> SubsetResponse:
    """Read-only, linkable form of ``POST .../attributions/subset`` for a stored query; the same response."""
    request = SubsetRequest.model_validate(
        {"query": {"id": query_id}, "size": size, "objective": objective, "candidates": candidates}
    )
    return subset_attribution(request, engine, settings)


@router.get("/", include_in_schema=False)
def dashboard() -> FileResponse:
    """The dashboard page (``service/static/index.html``)."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


def mount_dashboard(app: FastAPI) -> None:
    """Add the dashboard to ``app``: the page at ``/``, its assets under ``/static``, the GET query forms.

    Args:
        app: the service app. The assets are mounted under ``/static`` (not at ``/``), so that no route
            added later is shadowed by the file server.
    """
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
