"""infotrace service: FastAPI app that answers attribution queries over loaded indexes (DESIGN.md 2.2).

:mod:`service.core` (settings, observability, worker processes), :mod:`service.engine` (registry, queries,
retrieval, the per-index engine), :mod:`service.api` (dependencies, schemas, routers), :mod:`service.render`
(PNG renderings), :func:`create_app` (the app), ``service.cli`` (``infotrace-serve``).

The names below are imported on first use (PEP 562), so that ``infotrace-serve run`` can set up
Prometheus's multiprocess folder before anything imports ``prometheus_client`` (:mod:`service.core.workers`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.app import create_app
    from service.core.settings import Settings
    from service.engine import AttributionEngine, IndexRegistry, Query, Ranked

__all__ = ["AttributionEngine", "IndexRegistry", "Query", "Ranked", "Settings", "create_app"]

_HOMES = {
    "AttributionEngine": "service.engine",
    "IndexRegistry": "service.engine",
    "Query": "service.engine",
    "Ranked": "service.engine",
    "Settings": "service.core.settings",
    "create_app": "service.app",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'service' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
