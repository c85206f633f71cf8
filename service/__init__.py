"""infotrace service: FastAPI app that answers attribution queries over loaded indexes (DESIGN.md 2.2)."""

from __future__ import annotations

from service.app import create_app
from service.engine import AttributionEngine, Query, Ranked
from service.registry import IndexRegistry
from service.settings import Settings

__all__ = ["AttributionEngine", "IndexRegistry", "Query", "Ranked", "Settings", "create_app"]
