"""One router module per resource: indexes (and health), attributions (POST and GET forms, subsets,
coresets), examples (and their renderings), the dashboard."""

from __future__ import annotations

from service.api.routes import attributions, dashboard, examples, indexes

__all__ = ["attributions", "dashboard", "examples", "indexes"]
