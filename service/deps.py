"""FastAPI dependencies: the settings, the registry and one index, typed with ``Annotated``.

They only read app state, so they are ``async``: they run on the event loop and never wait for the thread
pool that runs the heavy routes (a liveness probe must not queue behind attributions).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request, status

from service.engine import AttributionEngine
from service.registry import IndexRegistry
from service.settings import Settings

__all__ = ["get_settings", "get_registry", "get_index", "SettingsDep", "RegistryDep", "IndexDep"]

from indexer.constants import INDEX_NAME_PATTERN  # noqa: E402


async def get_settings(request: Request) -> Settings:
    """The app's :class:`Settings` (set by :func:`service.app.create_app`)."""
    settings: Settings = request.app.state.settings
    return settings


async def get_registry(request: Request) -> IndexRegistry:
    """The loaded :class:`IndexRegistry` (set in the lifespan)."""
    registry: IndexRegistry | None = getattr(request.app.state, "registry", None)
    if registry is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail="indexes are not loaded yet")
    return registry


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[IndexRegistry, Depends(get_registry)]


async def get_index(
    registry: RegistryDep,
    name: Annotated[str, Path(pattern=INDEX_NAME_PATTERN, description="index name (see GET /v1/indexes)")],
) -> AttributionEngine:
    """The engine of index ``name``: 404 when unknown, 503 when present but not loadable."""
    if name in registry.failures:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            detail=f"index {name!r} is not ready: {registry.failures[name]}",
        )
    if name not in registry.engines:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            detail=f"no index named {name!r}; served indexes: {sorted(registry.engines)}",
        )
    return registry.engines[name]


IndexDep = Annotated[AttributionEngine, Depends(get_index)]
