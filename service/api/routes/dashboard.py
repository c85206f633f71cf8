"""The audit dashboard at ``/``: static files (``service/static``: HTML, vanilla JavaScript, CSS; no
framework, no CDN, so it works offline) that talk to the JSON API. Every view it shows links to its raw
JSON, e.g. the GET forms of :mod:`service.api.routes.attributions` for stored queries."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from service.api.strict import StrictJSONRoute

__all__ = ["router", "mount_dashboard", "STATIC_DIR"]

STATIC_DIR = Path(__file__).resolve().parents[2] / "static"
"""The dashboard's files, shipped as package data (``service/static``)."""

router = APIRouter(route_class=StrictJSONRoute)


@router.get("/", include_in_schema=False)
def dashboard() -> FileResponse:
    """The dashboard page (``service/static/index.html``)."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


def mount_dashboard(app: FastAPI) -> None:
    """Add the dashboard to ``app``: the page at ``/`` and its assets under ``/static``.

    Args:
        app: the service app. The assets are mounted under ``/static`` (not at ``/``), so that no route
            added later is shadowed by the file server.
    """
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
