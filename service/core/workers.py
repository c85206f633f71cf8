"""Several worker processes behind one socket: gunicorn's arbiter with uvicorn workers (``uvicorn-worker``).

``infotrace-serve run`` starts a gunicorn master that binds the socket and forks ``INFOTRACE_WORKERS``
workers (default: the CPUs this process may use). Each worker is a uvicorn server running its own
:func:`~service.create_app` app: it loads every index in its lifespan, before it accepts a connection, and
serves it from the memory-mapped store (DESIGN.md 2.1), so the features and per-example arrays sit once in
the operating system's page cache, shared by all workers; what each worker holds privately is the
interpreter, torch, the model and the small posterior arrays (measured in ``benchmarks/results/LOAD.md``).

What the master does:
- a worker that dies (SIGKILL, out of memory) is replaced by a fresh one; the others keep serving;
- SIGTERM: the socket is closed, every worker finishes its in-flight requests (up to
  ``INFOTRACE_REQUEST_TIMEOUT_S`` + 5 s), then exits;
- Prometheus multiprocess mode: each worker writes its counters to memory-mapped files in one folder
  (``PROMETHEUS_MULTIPROC_DIR``, a fresh temporary folder unless the operator names one), ``/metrics`` on
  any worker sums them, and the master marks a dead worker's gauges gone.

Each worker also watches for new index versions on its own (``INFOTRACE_RELOAD_INTERVAL``), so a version
switch reaches every worker within one interval of it landing.

Linux and macOS only (gunicorn forks). The multiprocess folder must be chosen before ``prometheus_client``
is first imported: :func:`~service.core.startup.prepare_metrics_dir` runs first thing in
``infotrace-serve run``, and this module (which imports it) only after.
"""

from __future__ import annotations

import json
import logging
import logging.config
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import typer
import uvicorn
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from uvicorn_worker import UvicornWorker

from service.core.observability import configure_logging
from service.core.protocol import header_timeout_protocol
from service.core.settings import Settings
from service.core.startup import ANNOUNCED_FILE, MULTIPROC_ENV

__all__ = [
    "InfotraceWorker",
    "ServiceApplication",
]

_LOG_LEVEL_ENV = "INFOTRACE_SERVE_LOG_LEVEL"
"""How ``infotrace-serve run --log-level`` reaches the workers (forked, with the master's environment)."""

log = logging.getLogger("infotrace.service")


def _announce(server: uvicorn.Server, api: Any, settings: Settings, workers: int) -> None:
    """Print where to reach the service and a ready curl command per index (the first ready worker)."""
    folder = os.environ.get(MULTIPROC_ENV)
    if folder:
        try:
            os.close(os.open(Path(folder) / ANNOUNCED_FILE, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return  # another worker has printed it
    sockets = [sock for listener in server.servers for sock in listener.sockets]
    port = sockets[0].getsockname()[1] if sockets else settings.port  # the bound one, even for port 0
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    base = f"http://{host}:{port}"
    registry = api.state.registry
    names = sorted(registry.engines) if registry is not None else []
    typer.echo(
        f"infotrace is serving {len(names)} index(es) {names} at {base} with {workers} worker process(es)  "
        f"(OpenAPI: {base}/docs)"
    )
    stored = json.dumps({"query": {"id": 0}, "top_k": 10})
    text = json.dumps({"query": {"text": "Return the number of", "continuation": " items"}, "top_k": 5})
    for name in names:
        takes_text = registry.engines[name].queries.tokenizer is not None
        if takes_text:
            typer.echo(f"Top 5 training passages behind a sentence's continuation, index {name!r}:")
        else:
            typer.echo(f"Top 10 training examples behind stored test query 0 of index {name!r}:")
        typer.echo(
            f"  curl -s -X POST {base}/v1/indexes/{name}/attributions "
            f"-H 'Content-Type: application/json' -d '{text if takes_text else stored}'"
        )


class _AnnouncingServer(uvicorn.Server):
    """A uvicorn server that announces the service once its indexes are loaded and its socket serves."""

    def __init__(self, config: uvicorn.Config, api: Any, settings: Settings, workers: int) -> None:
        super().__init__(config)
        self.api = api
        self.settings = settings
        self.workers = workers

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started:
            _announce(self, self.api, self.settings, self.workers)


class InfotraceWorker(UvicornWorker):
    """A gunicorn worker running the service on uvicorn with the service's own HTTP protocol (a time limit
    on request headers, JSON 400s), its JSON logs and no uvicorn access log (the service logs each request
    with its id).

    Settings are read from the environment (the master checked them before forking).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        settings = Settings()  # type: ignore[call-arg]  # read from the environment
        self.settings = settings
        self.CONFIG_KWARGS = {
            "loop": "asyncio",
            "http": header_timeout_protocol(settings.body_timeout_s),
            "access_log": False,
            "timeout_graceful_shutdown": int(settings.request_timeout_s) + 1,
        }
        super().__init__(*args, **kwargs)
        level = os.environ.get(_LOG_LEVEL_ENV, "info")
        logging.config.dictConfig(configure_logging(settings.json_logs, level))
        for name in ("uvicorn.error", "uvicorn.access"):  # UvicornWorker points them at gunicorn's handlers
            logger = logging.getLogger(name)
            logger.handlers = []
            logger.propagate = True

    async def _serve(self) -> None:
        self.config.app = self.wsgi
        server = _AnnouncingServer(self.config, self.wsgi, self.settings, self.cfg.workers)
        self._install_sigquit_handler()
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)


def _master_logging(json_logs: bool, level: str) -> dict[str, Any]:
    config = configure_logging(json_logs, level)
    config["loggers"]["gunicorn.error"] = {"level": level.upper(), "handlers": ["stderr"], "propagate": False}
    return config


def _child_exit(server: Arbiter, worker: Any) -> None:
    """gunicorn hook (master): a worker has exited; drop its live gauges from the metrics folder."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


class ServiceApplication(BaseApplication):  # type: ignore[misc]  # gunicorn ships no type hints
    """gunicorn application serving ``create_app()`` in ``workers`` uvicorn worker processes.

    Args:
        settings: the service settings (host, port, timeouts); each worker reads them again from the
            environment.
        workers: worker processes (>= 1).
        log_level: ``infotrace-serve run --log-level``.
        metrics_dir: the Prometheus multiprocess folder; removed at exit when ``remove_metrics_dir``.
        remove_metrics_dir: whether the folder is ours (a temporary one).
    """

    def __init__(
        self,
        settings: Settings,
        workers: int,
        log_level: str,
        metrics_dir: Path,
        remove_metrics_dir: bool,
    ) -> None:
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        os.environ[_LOG_LEVEL_ENV] = log_level

        def on_exit(server: Arbiter) -> None:
            if remove_metrics_dir:
                shutil.rmtree(metrics_dir, ignore_errors=True)

        self.options: dict[str, Any] = {
            "bind": [f"{host}:{settings.port}"],
            "workers": workers,
            "worker_class": InfotraceWorker,
            # seconds a worker may go silent (its event loop blocked) before the master replaces it; loading
            # the indexes at start is one such stretch
            "timeout": max(1, round(settings.worker_timeout_s)),
            "graceful_timeout": int(settings.request_timeout_s) + 5,
            "keepalive": 5,
            "worker_tmp_dir": "/dev/shm" if os.path.isdir("/dev/shm") else None,
            "proc_name": "infotrace",
            "control_socket_disable": True,  # gunicorn 25's control socket in $HOME: not used here
            "child_exit": _child_exit,
            "on_exit": on_exit,
            "loglevel": log_level,
            # the master's own lines (workers booting, exiting) in the service's format too: gunicorn's
            # handler goes to /dev/null and its logger to the service's
            "errorlog": os.devnull,
            "logconfig_dict": _master_logging(settings.json_logs, log_level),
            "accesslog": None,
        }
        super().__init__()

    def load_config(self) -> None:
        """Hand the options to gunicorn's config (gunicorn calls this once, in the master)."""
        for key, value in self.options.items():
            if value is not None:
                self.cfg.set(key, value)

    def load(self) -> Any:
        """The ASGI app of one worker (gunicorn calls this in each worker after the fork)."""
        from service.app import create_app

        return create_app(Settings())  # type: ignore[call-arg]  # read from the environment
