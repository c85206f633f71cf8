"""The HTTP layer: dependencies, request and response schemas, error mapping and the routers. Routes only
translate (request -> engine call -> typed result -> response schema)."""

from __future__ import annotations

from service.api.deps import IndexDep, RegistryDep, SettingsDep, get_index, get_registry, get_settings
from service.api.errors import STATUS_OF, install_error_handlers

__all__ = [
    "IndexDep",
    "RegistryDep",
    "STATUS_OF",
    "SettingsDep",
    "get_index",
    "get_registry",
    "get_settings",
    "install_error_handlers",
]
