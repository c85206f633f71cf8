"""Cross-cutting parts of the service: settings from the environment, observability (request ids, JSON
logs, Prometheus metrics, API keys, body limits, timeouts) and the worker processes.

The names below are imported on first use (PEP 562): ``prometheus_client`` must not be imported before
``infotrace-serve run`` has chosen its multiprocess folder (:mod:`service.core.workers`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.core.observability import (
        BodyGuard,
        Metrics,
        RequestMiddleware,
        configure_logging,
        install_request_middleware,
    )
    from service.core.settings import Settings

__all__ = [
    "BodyGuard",
    "Metrics",
    "RequestMiddleware",
    "Settings",
    "configure_logging",
    "install_request_middleware",
]

_HOMES = dict.fromkeys(
    ["BodyGuard", "Metrics", "RequestMiddleware", "configure_logging", "install_request_middleware"],
    "service.core.observability",
) | {"Settings": "service.core.settings"}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'service.core' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
