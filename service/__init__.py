"""infotrace service: FastAPI app that answers attribution queries over loaded indexes (DESIGN.md 2.2).

:mod:`service.core` (settings, observability), :mod:`service.engine` (registry, queries, retrieval, the
per-index engine), :mod:`service.api` (dependencies, schemas, routers), :mod:`service.render` (PNG
renderings), :func:`create_app` (the app), ``service.cli`` (``infotrace-serve``).
"""

from __future__ import annotations

from service.app import create_app
from service.core.settings import Settings
from service.engine import AttributionEngine, IndexRegistry, Query, Ranked

__all__ = ["AttributionEngine", "IndexRegistry", "Query", "Ranked", "Settings", "create_app"]
