"""``infotrace-serve``: run the attribution service with uvicorn."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

import typer
import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError
from pydantic_settings import SettingsError

from indexer.plugins import PluginError, load_plugins
from service.app import create_app
from service.core.observability import configure_logging
from service.core.protocol import header_timeout_protocol
from service.core.settings import Settings

app = typer.Typer(
    help="Serve infotrace attribution indexes over HTTP (FastAPI + uvicorn).",
    no_args_is_help=True,
    add_completion=False,
)


class _AnnouncingServer(uvicorn.Server):
    """A uvicorn server that prints where to reach it once the socket is bound and the indexes loaded."""

    def __init__(self, config: uvicorn.Config, api: FastAPI, settings: Settings) -> None:
        super().__init__(config)
        self.api = api
        self.settings = settings

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if not self.started:
            return
        sockets = [sock for server in self.servers for sock in server.sockets]
        port = (
            sockets[0].getsockname()[1] if sockets else self.settings.port
        )  # the bound one, even for port 0
        base = f"http://{self.settings.host}:{port}"
        registry = self.api.state.registry
        names = sorted(registry.engines) if registry is not None else []
        typer.echo(f"infotrace is serving {len(names)} index(es) {names} at {base}  (OpenAPI: {base}/docs)")
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
    """Serve every index under INFOTRACE_INDEX_ROOT on INFOTRACE_HOST:INFOTRACE_PORT (127.0.0.1:8000)."""
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
    try:
        load_plugins(settings.plugins)
    except PluginError as exc:
        typer.echo(f"INFOTRACE_PLUGINS: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    api = create_app(settings)
    config = uvicorn.Config(
        api,
        host=settings.host,
        port=settings.port,
        log_config=configure_logging(settings.json_logs, log_level),
        access_log=False,  # the service logs each request itself, with its request id
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 1,
        http=header_timeout_protocol(settings.body_timeout_s),  # slow request headers: connection closed
    )
    server = _AnnouncingServer(config, api, settings)
    server.run()
    if not server.started:
        raise typer.Exit(code=1)


@app.command()
def version() -> None:
    """Print the service version."""
    typer.echo("infotrace 0.1.0")


if __name__ == "__main__":
    app()
