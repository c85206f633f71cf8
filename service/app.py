"""The FastAPI application: indexes loaded in the lifespan, project exceptions mapped to status codes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import faiss
import threadpoolctl
import torch
from fastapi import FastAPI, Request, status
from fastapi.responses import JSONResponse

from indexer.exceptions import (
    IndexCorruptError,
    IndexFormatError,
    IndexNotFoundError,
    InvalidQueryError,
    ModelMismatchError,
    UnknownExampleError,
)
from service.registry import IndexRegistry
from service.routes import router
from service.settings import Settings

__all__ = ["create_app"]

STATUS_OF: dict[type[Exception], int] = {
    InvalidQueryError: 422,
    UnknownExampleError: status.HTTP_404_NOT_FOUND,
    IndexNotFoundError: status.HTTP_404_NOT_FOUND,
    ModelMismatchError: status.HTTP_409_CONFLICT,
    IndexCorruptError: status.HTTP_503_SERVICE_UNAVAILABLE,
    IndexFormatError: status.HTTP_503_SERVICE_UNAVAILABLE,
}


def limit_threads(n: int) -> None:
    """Cap torch's, the BLAS libraries' and FAISS's thread pools at ``n`` threads each (process-wide)."""
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)
    threadpoolctl.threadpool_limits(n)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service.

    Args:
        settings: configuration; None reads ``INFOTRACE_*`` environment variables.

    Returns:
        The FastAPI app. Indexes under ``settings.index_root`` are loaded when the lifespan starts.

    Raises:
        pydantic.ValidationError: required settings (``INFOTRACE_INDEX_ROOT``) are missing or invalid.
    """
    settings = settings or Settings()  # type: ignore[call-arg]  # read from the environment

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.compute_threads is not None:
            limit_threads(settings.compute_threads)
        app.state.registry = IndexRegistry.load(settings.index_root, settings.projection_cache_bytes)
        yield
        app.state.registry = None

    app = FastAPI(
        title="infotrace",
        version="0.1.0",
        description="Training data attribution: which training examples a prediction owes most to, with "
        "information-theoretic scores (information gain, information loss) and signed influence.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.registry = None
    app.include_router(router)

    for exc_type, code in STATUS_OF.items():

        async def handler(request: Request, exc: Exception, code: int = code) -> JSONResponse:
            return JSONResponse(status_code=code, content={"detail": str(exc)})

        app.add_exception_handler(exc_type, handler)
    return app
