"""Cross-cutting parts of the service: settings from the environment, and observability (request ids,
JSON logs, Prometheus metrics, API keys, body limits, timeouts)."""

from __future__ import annotations

from service.core.observability import BodyGuard, Metrics, configure_logging, install_request_middleware
from service.core.settings import Settings

__all__ = ["BodyGuard", "Metrics", "Settings", "configure_logging", "install_request_middleware"]
