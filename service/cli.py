"""``infotrace-serve``: run the attribution service (gunicorn master, uvicorn worker processes).

This module imports nothing that imports ``prometheus_client``: ``run`` sets up its multiprocess folder
first (:mod:`service.core.workers`).
"""

from __future__ import annotations

import re
from typing import Annotated

import typer
from pydantic import ValidationError
from pydantic_settings import SettingsError

from indexer.plugins import PluginError, load_plugins
from service.core.settings import Settings
from service.core.startup import available_cpus, prepare_metrics_dir

app = typer.Typer(
    help="Serve infotrace attribution indexes over HTTP (FastAPI + uvicorn).",
    no_args_is_help=True,
    add_completion=False,
)


def _settings() -> Settings:
    try:
        settings = Settings()  # type: ignore[call-arg]  # read from the environment
        settings.keys()  # a missing or empty keys file is a settings error too
        return settings
    except ValidationError as exc:  # before ValueError, which it subclasses
        problems = "; ".join(
            f"INFOTRACE_{'_'.join(str(p) for p in error['loc']).upper()}: {error['msg']}"
            for error in exc.errors()
        )
        typer.echo(f"bad settings: {problems}", err=True)
        raise typer.Exit(code=2) from exc
    except SettingsError as exc:  # pydantic-settings could not decode a JSON value
        field = re.search(r'field "(\w+)"', str(exc))
        name = f"INFOTRACE_{field.group(1).upper()}" if field else "a setting"
        typer.echo(
            f"bad settings: {name} must be JSON (lists and mappings are given as JSON): {exc}", err=True
        )
        raise typer.Exit(code=2) from exc
    except (FileNotFoundError, ValueError) as exc:
        typer.echo(f"bad settings: {exc}", err=True)
        raise typer.Exit(code=2) from exc


@app.command()
def run(
    log_level: Annotated[str, typer.Option(help="log level")] = "info",
) -> None:
    """Serve every index under INFOTRACE_INDEX_ROOT on INFOTRACE_HOST:INFOTRACE_PORT (127.0.0.1:8000) with
    INFOTRACE_WORKERS worker processes (default: one per CPU)."""
    settings = _settings()
    if not settings.index_root.is_dir():
        typer.echo(f"INFOTRACE_INDEX_ROOT={settings.index_root} is not a folder of index folders", err=True)
        raise typer.Exit(code=2)
    if not settings.loopback and not settings.keys() and not settings.allow_unauthenticated:
        typer.echo(
            f"refusing to serve on non-loopback host {settings.host!r} without API keys: set "
            "INFOTRACE_API_KEYS or INFOTRACE_API_KEYS_FILE, or INFOTRACE_ALLOW_UNAUTHENTICATED=true "
            "behind your own gateway",
            err=True,
        )
        raise typer.Exit(code=2)
    metrics_dir, ours = prepare_metrics_dir()  # before a plugin could import prometheus_client
    try:
        load_plugins(settings.plugins)  # checked here once; each worker imports them again
    except PluginError as exc:
        typer.echo(f"INFOTRACE_PLUGINS: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    workers = settings.workers or available_cpus()
    from service.core.workers import ServiceApplication  # imports prometheus_client: after the line above

    ServiceApplication(settings, workers, log_level, metrics_dir, ours).run()  # exits when stopped


@app.command()
def version() -> None:
    """Print the service version."""
    typer.echo("infotrace 0.1.0")


if __name__ == "__main__":
    app()
