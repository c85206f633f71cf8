"""FastAPI dependencies: the settings, the registry and one index's engine, typed with ``Annotated``.

They only read app state, so they are ``async``: they run on the event loop and never wait for the thread
pool that runs the heavy routes (a liveness probe must not queue behind attributions). Tests swap them with
``app.dependency_overrides``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request, status

from indexer.store.layout import INDEX_NAME_PATTERN
from service.core.settings import Settings
from service.engine.engine import AttributionEngine
from service.engine.registry import IndexRegistry

__all__ = ["get_settings", "get_registry", "get_index", "SettingsDep", "RegistryDep", "IndexDep"]


async def get_settings(request: Request) -> Settings:
    """The app's :class:`~service.core.settings.Settings` (set by :func:`service.app.create_app`)."""
    settings: Settings = request.app.state.settings
    return settings


async def get_registry(request: Request) -> IndexRegistry:
    """The loaded :class:`~service.engine.registry.IndexRegistry` (set in the lifespan).

    Raises:
        HTTPException: 503 while the indexes are still loading.
    """
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
    """The engine of index ``name``.

    Raises:
        IndexNotFoundError: no such index (404); IndexNotReadyError: present but not loadable (503).
    """
    return registry.get(name)


IndexDep = Annotated[AttributionEngine, Depends(get_index)]
