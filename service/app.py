"""The FastAPI application: indexes loaded in the lifespan, the routers, middleware and error mapping."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
import faiss
import threadpoolctl
import torch
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
from swagger_ui_bundle import swagger_ui_path

from indexer.plugins import load_plugins
from service.api.errors import install_error_handlers
from service.api.routes import attributions, dashboard, examples, indexes
from service.core.observability import BodyGuard, Metrics, install_request_middleware
from service.core.settings import Settings
from service.core.startup import MULTIPROC_ENV
from service.engine.registry import IndexRegistry

log = logging.getLogger("infotrace.service")

__all__ = ["create_app"]


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
        indexer.plugins.PluginError: (when the lifespan starts) a module of ``settings.plugins`` does not
            import.
    """
    settings = settings or Settings()  # type: ignore[call-arg]  # read from the environment

    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.compute_threads is not None:
            limit_threads(settings.compute_threads)
        # sync handlers run in this many threads; the rest wait their turn in order of arrival
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.worker_threads
        load_plugins(settings.plugins)  # before the indexes: their manifests may name what plugins register
        registry = IndexRegistry.load(
            settings.index_root,
            settings.projection_cache_bytes,
            settings.model_checkpoints,
            frozenset(settings.trusted_model_factories),
            settings.use_gpu,
        )

        def publish() -> None:
            for name, engine in list(registry.engines.items()):
                metrics.index_examples.labels(name).set(engine.data.n_train)
                with contextlib.suppress(OSError):  # a folder being replaced by a newer version
                    metrics.index_bytes.labels(name).set(
                        sum(p.stat().st_size for p in engine.data.path.iterdir())
                    )
                metrics.index_ready.labels(name).set(1)
            for name in list(registry.failures):
                metrics.index_ready.labels(name).set(0)

        publish()
        app.state.registry = registry
        stop = threading.Event()

        def watch() -> None:  # new versions of indexes (DESIGN.md 2.1), swapped in without a restart
            while not stop.wait(settings.reload_interval):
                try:
                    if registry.refresh():
                        publish()
                except Exception:  # a broken new version is logged by refresh; keep watching
                    log.exception("checking for new index versions failed")

        watcher = threading.Thread(target=watch, name="infotrace-index-watch", daemon=True)
        if settings.reload_interval > 0:
            watcher.start()
        yield
        stop.set()
        if watcher.is_alive():
            watcher.join(timeout=5)
        app.state.registry = None

    app = FastAPI(
        title="infotrace",
        version="0.1.0",
        description="Training data attribution: which training examples a prediction owes most to, with "
        "information-theoretic scores (information gain, information loss) and signed influence.",
        lifespan=lifespan,
        docs_url=None,  # served below from the swagger-ui-bundle package: the default loads a CDN
        redoc_url=None,
        # /v1/indexes/x/ is a 404 like any unknown path, not a redirect to a path the client did not ask for
        redirect_slashes=False,
    )
    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        """Swagger UI for the OpenAPI schema, with its assets served locally (works offline)."""
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="infotrace API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon-32x32.png",
        )

    app.state.settings = settings
    app.state.registry = None
    app.state.metrics = metrics
    app.include_router(indexes.router)
    app.include_router(attributions.router)

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    def prometheus_metrics() -> PlainTextResponse:
        """Prometheus metrics: requests and latency by route and status, index sizes and readiness; with
        several worker processes, summed over all of them (Prometheus multiprocess mode)."""
        registry = metrics.registry
        if os.environ.get(MULTIPROC_ENV):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    # the body guard sits inside the per-request middleware, so a 413 or 408 is still logged and counted
    app.add_middleware(BodyGuard, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    install_request_middleware(app, metrics, settings.keys(), settings.request_timeout_s)
    app.include_router(examples.router)
    dashboard.mount_dashboard(app)
    install_error_handlers(app)
    return app
