"""``infotrace-serve``: run the attribution service with uvicorn."""

from __future__ import annotations

import json
from typing import Annotated

import typer
import uvicorn

from service.app import create_app
from service.settings import Settings

app = typer.Typer(
    help="Serve infotrace attribution indexes over HTTP (FastAPI + uvicorn).",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def run(
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
) -> None:
    """Serve every index under INFOTRACE_INDEX_ROOT on INFOTRACE_HOST:INFOTRACE_PORT (127.0.0.1:8000)."""
    settings = Settings()  # type: ignore[call-arg]  # read from the environment
    base = f"http://{settings.host}:{settings.port}"
    body = json.dumps({"query": {"id": 0}, "top_k": 10})
    typer.echo(f"infotrace serving indexes from {settings.index_root} at {base}  (OpenAPI: {base}/docs)")
    typer.echo("Top 10 training examples behind stored test query 0 of the demo index:")
    typer.echo(
        f"  curl -s -X POST {base}/v1/indexes/digits/attributions -H 'Content-Type: application/json' "
        f"-d '{body}'"
    )
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=log_level)


@app.command()
def version() -> None:
    """Print the service version."""
    typer.echo("infotrace 0.1.0")


if __name__ == "__main__":
    app()
