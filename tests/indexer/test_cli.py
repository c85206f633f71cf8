"""``infotrace-index``: options derived from IndexConfig, one-line errors, the same index as the library."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from safetensors.numpy import save_file
from torch import nn
from typer.testing import CliRunner

from indexer.build import build_index
from indexer.cli import app
from indexer.config import IndexConfig
from indexer.data import Dataset
from indexer.features.language import LanguageModelMargin, causal_lm_targets
from indexer.features.models import register_model, save_checkpoint
from indexer.features.tasks import ClassificationMargin
from indexer.store.reader import load_index

TinyProblem = tuple[torch.nn.Module, Dataset]


def test_build_options_are_the_config_fields() -> None:
    """Every IndexConfig field is a build option with the field's default and help text: one source."""
    group = typer.main.get_command(app)
    options = {p.name: p for p in group.commands["build"].params}  # type: ignore[attr-defined]
    for field in dataclasses.fields(IndexConfig):
        option = options[field.name]
        assert option.default == field.default, field.name
        assert option.help == field.metadata["help"], field.name
    assert {"out", "model", "checkpoint", "data", "model_kwargs", "output", "sigma"} <= set(options)


def test_bad_config_values_are_one_line_errors(tmp_path: Path) -> None:
    cli = str(Path(sys.executable).with_name("infotrace-index"))
    shown = subprocess.run(
        [
            cli,
            "build",
            "--out",
            str(tmp_path / "x"),
            "--model",
            "mlp",
            "--checkpoint",
            "c",
            "--data",
            "d",
            "--k",
            "0",
        ],
        capture_output=True,
        text=True,
    )
    assert shown.returncode == 2
    assert (
        shown.stderr.strip()
        == "error: k, batch_size and buffer_bytes must be positive; got 0, 128, 268435456"
    )


def test_cli_help_and_build(tmp_path: Path, tiny_problem: TinyProblem) -> None:
    cli = str(Path(sys.executable).with_name("infotrace-index"))
    for args in ([], ["build"], ["demo"]):
        shown = subprocess.run([cli, *args, "--help"], capture_output=True, text=True, check=True).stdout
        assert "Usage" in shown
    model, data = tiny_problem
    checkpoint = tmp_path / "weights.pt"
    torch.save(model.state_dict(), checkpoint)
    dataset = tmp_path / "data.safetensors"
    save_file(
        {
            "train_inputs": data.inputs.numpy(),
            "train_targets": data.targets.numpy(),
            "query_inputs": data.inputs[:5].numpy(),
            "query_targets": data.targets[:5].numpy(),
        },
        str(dataset),
    )
    out = tmp_path / "indexes" / "cli"
    subprocess.run(
        [
            cli,
            "build",
            "--out",
            str(out),
            "--model",
            "mlp",
            "--model-kwargs",
            '{"in_features": 6, "hidden": [5], "out_features": 3}',
            "--checkpoint",
            str(checkpoint),
            "--data",
            str(dataset),
            "--k",
            "8",
        ],
        check=True,
        capture_output=True,
    )
    missing = subprocess.run(
        [
            cli,
            "build",
            "--out",
            str(out),
            "--model",
            "mlp",
            "--model-kwargs",
            '{"in_features": 6, "hidden": [5], "out_features": 3}',
            "--checkpoint",
            str(tmp_path / "nope.pt"),
            "--data",
            str(dataset),
            "--k",
            "8",
        ],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2
    assert (
        missing.stderr.strip().splitlines()[-1] == f"error: checkpoint {tmp_path / 'nope.pt'} does not exist"
    )
    via_cli = load_index(out)
    assert via_cli.n_train == 40 and len(via_cli.query_phi) == 5
    via_api = build_index(
        model, ClassificationMargin(), data, tmp_path / "api", config=IndexConfig(k=8), progress=False
    )
    assert np.array_equal(via_cli.phi, load_index(via_api).phi)


def test_cli_refuses_pickled_checkpoint(tmp_path: Path, tiny_problem: TinyProblem) -> None:
    model, data = tiny_problem
    evil = tmp_path / "evil.pt"
    torch.save({"state": model.state_dict(), "extra": Path("x")}, evil)  # a non-tensor object: pickled
    safetensors_ckpt = tmp_path / "ok.safetensors"
    save_checkpoint(model, safetensors_ckpt)
    with pytest.raises(ValueError, match="not a safetensors file or a weights-only torch state dict"):
        build_index(model, ClassificationMargin(), data, tmp_path / "x", checkpoint=evil, progress=False)
    build_index(
        model, ClassificationMargin(), data, tmp_path / "y", checkpoint=safetensors_ckpt, progress=False
    )


def test_unreadable_files_are_one_line_errors(tmp_path: Path, tiny_problem: TinyProblem) -> None:
    cli = str(Path(sys.executable).with_name("infotrace-index"))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    args = ["build", "--out", str(tmp_path / "x"), "--model", "mlp", "--checkpoint", "c.pt", "--data"]
    shown = subprocess.run([cli, *args, str(garbage)], capture_output=True, text=True)
    assert shown.returncode == 2 and "Traceback" not in shown.stderr
    assert (
        shown.stderr.strip().splitlines()[-1].startswith(f"error: dataset file {garbage} is not a readable")
    )
    model, data = tiny_problem
    lonely = tmp_path / "lonely.safetensors"
    save_file(
        {
            "train_inputs": data.inputs.numpy(),
            "train_targets": data.targets.numpy(),
            "query_inputs": data.inputs[:2].numpy(),
        },
        str(lonely),
    )
    shown = subprocess.run([cli, *args, str(lonely)], capture_output=True, text=True)
    assert shown.returncode == 2 and "'query_inputs' without its partner" in shown.stderr
    index = build_index(model, ClassificationMargin(), data, tmp_path / "tiny", progress=False)
    shown = subprocess.run(
        [cli, "coreset", "--index", str(index), "--size", "2", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert (
        shown.returncode == 2
        and shown.stderr.strip()
        == f"error: --out {tmp_path} is a folder; give the path of a JSON file to write"
    )
    shown = subprocess.run(
        [cli, "coreset", "--index", str(index), "--size", "2"], capture_output=True, text=True
    )
    assert shown.returncode == 2 and "has no stored queries" in shown.stderr


def test_a_factory_faiss_rejects_fails_before_featurizing(tmp_path: Path, tiny_problem: TinyProblem) -> None:
    model, data = tiny_problem
    with pytest.raises(ValueError, match="FAISS rejects the factory string 'Nonsense42' for dimension 512"):
        build_index(
            model,
            ClassificationMargin(),
            data,
            tmp_path / "x",
            config=IndexConfig(faiss_factory="Nonsense42"),
        )
    assert not any(tmp_path.iterdir())  # refused before any shard was written


class ExplodingLM(nn.Module):
    """A tiny causal LM whose forward fails the way torch does (a RuntimeError of several lines) on any
    batch holding token 12: after the probe, in the middle of featurizing."""

    def __init__(self, vocab: int = 13) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 4)
        self.head = nn.Linear(4, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if bool((ids == 12).any()):
            raise RuntimeError("CUDA out of memory.\n  Tried to allocate 2.00 GiB\n")
        return self.head(torch.cumsum(self.embed(ids), 1))


def _token_files(tmp_path: Path, model: nn.Module, explode_from: int | None) -> tuple[Path, Path]:
    """A checkpoint of ``model`` and a dataset file of 16 sequences of 6 token ids (ids < 12, but 12 from
    example ``explode_from`` on) with causal targets."""
    ids = torch.randint(0, 12, (16, 6), generator=torch.Generator().manual_seed(0))
    if explode_from is not None:
        ids[explode_from:, 2] = 12
    checkpoint, data = tmp_path / "lm.safetensors", tmp_path / "tokens.safetensors"
    save_checkpoint(model, checkpoint)
    save_file({"train_inputs": ids.numpy(), "train_targets": causal_lm_targets(ids).numpy()}, str(data))
    return checkpoint, data


def test_every_build_error_is_one_line(tmp_path: Path) -> None:
    """A RuntimeError from torch in the middle of a build reaches the user as one line, exit code 1, the
    traceback only on request; user errors stay exit code 2."""
    register_model("exploding_lm", ExplodingLM)
    checkpoint, data = _token_files(tmp_path, ExplodingLM(), explode_from=9)
    args = ["build", "--out", str(tmp_path / "x"), "--model", "exploding_lm", "--checkpoint", str(checkpoint)]
    args += ["--data", str(data), "--output", "lm_margin", "--batch-size", "4", "--k", "8"]
    shown = CliRunner().invoke(app, [*args, "--vocab-size", "13"])
    assert shown.exit_code == 1 and "Traceback" not in shown.output
    assert shown.stderr.strip().splitlines()[-1] == (
        "error: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB (set INFOTRACE_TRACEBACK=1 for "
        "the traceback)"
    )
    verbose = CliRunner(env={"INFOTRACE_TRACEBACK": "1"}).invoke(app, [*args, "--vocab-size", "13"])
    assert verbose.exit_code == 1 and "Traceback" in verbose.stderr
    assert (
        verbose.stderr.strip().splitlines()[-1]
        == "error: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    )
    missing = CliRunner().invoke(app, args)
    assert missing.exit_code == 2 and missing.stderr.strip().splitlines()[-1] == (
        "error: --output lm_margin needs --vocab-size (the width of the logits at each position)"
    )


def test_a_language_model_index_from_the_cli(tmp_path: Path, tiny_lm) -> None:
    """--output lm_margin with (n, T) token ids and targets, a tied model: the library's index."""
    register_model("tiny_causal_lm", tiny_lm)
    model = tiny_lm(vocab=13, tied=True)
    checkpoint, data = _token_files(tmp_path, model, explode_from=None)
    out = tmp_path / "lm"
    shown = CliRunner().invoke(
        app,
        [
            "build",
            "--out",
            str(out),
            "--model",
            "tiny_causal_lm",
            "--model-kwargs",
            '{"vocab": 13, "tied": true}',
            "--checkpoint",
            str(checkpoint),
            "--data",
            str(data),
            "--output",
            "lm_margin",
            "--vocab-size",
            "13",
            "--k",
            "8",
        ],
    )
    assert shown.exit_code == 0, shown.output
    index = load_index(out)
    assert index.manifest.model.output_params == {"vocab_size": 13}
    assert (index.manifest.model.target_shape, index.manifest.model.target_dtype) == ((6,), "int64")
    ids = torch.randint(0, 12, (16, 6), generator=torch.Generator().manual_seed(0))
    via_api = build_index(
        model,
        LanguageModelMargin(13),
        Dataset(ids, causal_lm_targets(ids)),
        tmp_path / "api",
        config=IndexConfig(k=8),
        progress=False,
    )
    assert np.array_equal(index.phi, load_index(via_api).phi)


def test_the_cnn_demo_builds_a_convolutional_index(tmp_path: Path) -> None:
    """``infotrace-index demo --demo digits-cnn``: the built-in CNN with BatchNorm, trained and indexed
    (tiny here: 200 digits, one epoch); every weight is covered, the norms by the rest block."""
    from indexer.demo.mnist import CNN_SPEC, build_demo_index
    from indexer.features.models import build_model, cnn

    assert sum(p.numel() for p in build_model(CNN_SPEC).parameters()) == 207_018
    assert cnn(side=16, channels=[4], hidden=8, out_features=3)(torch.zeros(2, 256)).shape == (2, 3)
    with pytest.raises(ValueError, match="side 30 must be divisible by 2 \\*\\* 2"):
        cnn(side=30)
    path = build_demo_index(
        tmp_path / "indexes", k=64, n_train=200, epochs=1, progress=False, name="digits-cnn"
    )
    data = load_index(path)
    coverage = data.manifest.projection.coverage or {}
    assert [b["layer"] for b in coverage["blocks"]] == ["conv2d", "conv2d", "linear", "linear"]
    assert coverage["covered_fraction"] == 1.0 and coverage["rest"]["treatment"] == "dense"
    assert {p["name"] for p in coverage["rest"]["params"]} == {"2.weight", "2.bias", "6.weight", "6.bias"}
    assert data.n_train == 200 and data.manifest.model.image_shape == (28, 28)
    with pytest.raises(ValueError, match="unknown digits demo 'nope'"):
        build_demo_index(tmp_path / "indexes", name="nope")


def _dtype_mlp(dtype: str = "float32") -> nn.Module:
    """A 5-4-3 MLP in ``dtype`` (seeded: the CLI and the library build the same weights)."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(getattr(torch, dtype))


@pytest.mark.parametrize(
    ("model_dtype", "file_dtype", "suffix"),
    [
        ("float16", "float64", ".npz"),
        ("float64", "float64", ".npz"),
        ("bfloat16", "bfloat16", ".safetensors"),
        ("float32", "bfloat16", ".safetensors"),
    ],
)
def test_the_cli_builds_models_of_every_float_dtype(
    tmp_path: Path, model_dtype: str, file_dtype: str, suffix: str
) -> None:
    """Issue #16: the CLI cast every float input to float32, so a float16/bfloat16/float64 model could not
    be built from a file, and a bfloat16 safetensors file was a traceback (numpy has no bfloat16). Inputs
    now keep the file's precision until they are cast to the model's dtype: the library's index."""
    from safetensors.torch import save_file as save_tensors

    register_model("test_cli_dtype_mlp", _dtype_mlp)
    model = _dtype_mlp(model_dtype)
    checkpoint = tmp_path / "weights.safetensors"
    save_checkpoint(model, checkpoint)
    x = torch.randn(24, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=torch.Generator().manual_seed(1))
    data = tmp_path / f"data{suffix}"
    if suffix == ".npz":
        np.savez(data, train_inputs=x.to(getattr(torch, file_dtype)).numpy(), train_targets=y.numpy())
    else:
        save_tensors({"train_inputs": x.to(getattr(torch, file_dtype)), "train_targets": y}, str(data))
    kwargs = f'{{"dtype": "{model_dtype}"}}'
    shown = CliRunner().invoke(
        app,
        ["build", "--out", str(tmp_path / "cli"), "--model", "test_cli_dtype_mlp", "--model-kwargs", kwargs,
         "--checkpoint", str(checkpoint), "--data", str(data), "--k", "8", "--min-coverage", "0"],
    )  # fmt: skip
    assert shown.exit_code == 0, shown.output
    index = load_index(tmp_path / "cli")
    assert index.manifest.model.input_dtype == model_dtype
    inputs = x.to(getattr(torch, file_dtype)).to(getattr(torch, model_dtype))
    assert index.phi.dtype == np.float16 and np.all(np.isfinite(index.phi))
    via_api = build_index(
        model,
        ClassificationMargin(),
        Dataset(inputs, y),
        tmp_path / "api",
        config=IndexConfig(k=8, min_coverage=0.0),
        progress=False,
    )
    assert np.array_equal(index.phi, load_index(via_api).phi)


def test_dataset_files_are_described_as_what_they_are(tmp_path: Path) -> None:
    """A newcomer review: a .npz that is no archive and a string array were both called "object arrays", a
    folder "does not exist", and a misspelt key (query_input) silently built an index without queries."""
    from indexer.data import load_arrays

    not_zip = tmp_path / "plain.npz"
    not_zip.write_bytes(b"just text")
    with pytest.raises(ValueError, match=r"plain\.npz is not an \.npz archive \(numpy\.savez writes one\)$"):
        load_arrays(not_zip)
    strings = tmp_path / "strings.npz"
    np.savez(strings, train_inputs=np.array(["a", "b"]), train_targets=np.zeros(2, np.int64))
    with pytest.raises(
        ValueError, match=r"array 'train_inputs' has dtype <U1, which is not a numeric tensor"
    ):
        load_arrays(strings)
    with pytest.raises(ValueError, match=r"is a folder; give a \.safetensors or \.npz file"):
        load_arrays(tmp_path)
    typo = tmp_path / "typo.npz"
    np.savez(typo, train_inputs=np.zeros((2, 3), np.float32), train_targets=np.zeros(2, np.int64),
             query_input=np.zeros((1, 3), np.float32))  # fmt: skip
    with pytest.raises(
        ValueError, match=r"has unknown array\(s\) \['query_input'\]; expected \['train_inputs',"
    ):
        load_arrays(typo)
