"""The index directory: checksums verified on load, atomic writes, deterministic builds, the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.numpy import save_file

import indexer.store.writer as writer
from indexer.build import build_index
from indexer.config import IndexConfig
from indexer.data import Dataset
from indexer.exceptions import IndexCorruptError, IndexFormatError, IndexNotFoundError
from indexer.features.models import ModelSpec, build_model, save_checkpoint
from indexer.features.tasks import ClassificationMargin, RegressionOutput
from indexer.store.layout import FORMAT_VERSION, MANIFEST_CHECKSUM_FIELD, MANIFEST_FILE, PHI_FILE
from indexer.store.manifest import manifest_checksum
from indexer.store.reader import load_index
from service.app import create_app
from service.core.settings import Settings


@pytest.fixture()
def index_copy(index_root: Path, tmp_path: Path) -> Path:
    target = tmp_path / "root" / "digits"
    shutil.copytree(index_root / "digits", target)
    return target


def test_load_round_trip(index_root: Path, test_digits: Dataset) -> None:
    data = load_index(index_root / "digits")
    assert data.inputs.shape == (600, 784) and data.query_inputs.shape == (80, 784)
    assert np.array_equal(data.query_inputs, test_digits.inputs.numpy())
    assert data.phi.shape == (600, 64) and data.phi.dtype == np.float32
    assert data.surrogate.whitened.shape == (600, 64) and data.surrogate.whitened.dtype == np.float64
    assert data.query_phi.shape == (80, 64)
    assert data.manifest.format_version == FORMAT_VERSION
    assert data.manifest.projection.to_json() == {"kind": "gaussian", "k": 64, "seed": 0}
    tau = data.manifest.surrogate.prior_precision
    beta = data.surrogate.beta
    assert np.isclose(tau, float((beta * (data.phi.astype(np.float64) ** 2).sum(1)).sum() / 64), rtol=1e-12)
    assert data.metadata.get_one("train", 5)["label"] == int(data.examples["label"][5])


def test_altered_file_is_named(index_copy: Path) -> None:
    raw = bytearray((index_copy / PHI_FILE).read_bytes())
    raw[-1] ^= 0xFF
    (index_copy / PHI_FILE).write_bytes(bytes(raw))
    with pytest.raises(IndexCorruptError, match=r"phi\.npy does not match its sha256"):
        load_index(index_copy)


def test_truncated_and_missing_files_are_named(index_copy: Path) -> None:
    whitened = index_copy / "whitened.npy"
    whitened.write_bytes(whitened.read_bytes()[:100])
    with pytest.raises(IndexCorruptError, match=r"whitened\.npy has 100 bytes"):
        load_index(index_copy)
    whitened.unlink()
    with pytest.raises(IndexCorruptError, match=r"whitened\.npy is listed in the manifest but missing"):
        load_index(index_copy)


def test_manifest_problems(index_copy: Path, tmp_path: Path) -> None:
    manifest = json.loads((index_copy / MANIFEST_FILE).read_text())
    (index_copy / MANIFEST_FILE).write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(IndexFormatError, match="format_version is 99; this infotrace reads version 1"):
        load_index(index_copy)
    del manifest["surrogate"]
    resign(index_copy / MANIFEST_FILE, manifest)
    with pytest.raises(IndexFormatError, match="lacks the field"):
        load_index(index_copy)
    (index_copy / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(IndexFormatError, match="not valid JSON"):
        load_index(index_copy)
    with pytest.raises(IndexNotFoundError, match="manifest.json does not exist"):
        load_index(tmp_path / "nowhere")


def resign(path: Path, manifest: dict) -> None:
    """Write an edited manifest with a matching self-checksum, as a deliberate (not accidental) edit would."""
    path.write_text(json.dumps({**manifest, MANIFEST_CHECKSUM_FIELD: manifest_checksum(manifest)}))


@pytest.mark.parametrize(
    ("field", "value"),
    [("projection", {"kind": "gaussian", "k": 64, "seed": 1}), ("surrogate", {"prior_precision": 1.0})],
)
def test_edited_manifest_is_refused(index_copy: Path, field: str, value: dict) -> None:
    """Changing the seed or tau would silently change every score: the manifest checks itself."""
    manifest = json.loads((index_copy / MANIFEST_FILE).read_text())
    manifest[field] = {**manifest[field], **value}
    (index_copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(IndexCorruptError, match="was edited after the index was written"):
        load_index(index_copy)


def test_shape_that_disagrees_with_manifest(index_copy: Path) -> None:
    manifest = json.loads((index_copy / MANIFEST_FILE).read_text())
    manifest["counts"]["k"] = 65
    resign(index_copy / MANIFEST_FILE, manifest)
    with pytest.raises(
        IndexCorruptError, match=r"phi\.npy holds float32\(600, 64\); expected float32\(600, 65\)"
    ):
        load_index(index_copy)


def test_service_serves_healthy_index_beside_a_corrupt_one(index_root: Path, index_copy: Path) -> None:
    root = index_copy.parent
    shutil.copytree(index_root / "digits", root / "broken")
    (root / "broken" / "cholesky.npy").write_bytes(b"garbage")
    with TestClient(create_app(Settings(index_root=root))) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["indexes"]["digits"] == "ready"
        assert "cholesky.npy" in ready.json()["indexes"]["broken"]
        broken = client.post("/v1/indexes/broken/attributions", json={"query": {"id": 0}})
        assert broken.status_code == 503 and "cholesky.npy" in broken.json()["detail"]
        assert client.post("/v1/indexes/digits/attributions", json={"query": {"id": 0}}).status_code == 200


def _tiny_problem(n: int = 40) -> tuple[torch.nn.Module, Dataset]:
    torch.manual_seed(1)
    model = build_model(ModelSpec("mlp", {"in_features": 6, "hidden": [5], "out_features": 3}))
    data = Dataset(torch.randn(n, 6), torch.randint(0, 3, (n,)))
    return model, data


def test_crash_during_write_leaves_no_partial_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, data = _tiny_problem()
    out = tmp_path / "tiny"
    build_index(model, ClassificationMargin(), data, out, config=IndexConfig(k=8), progress=False)
    before = json.loads((out / MANIFEST_FILE).read_text())["files"]

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(writer, "_write_metadata", crash)
    with pytest.raises(OSError, match="disk full"):
        build_index(model, ClassificationMargin(), data, out, config=IndexConfig(k=8, seed=5), progress=False)
    # no temporary folder left behind; only the finished featurization shards, kept for a resumed build
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left[-1] == "tiny" and [n.split("-")[0] for n in left[:-1]] == [".tiny.work"]
    assert json.loads((out / MANIFEST_FILE).read_text())["files"] == before  # old index untouched
    load_index(out)


def test_same_seed_same_model_same_index(tmp_path: Path) -> None:
    model, data = _tiny_problem()
    a = build_index(
        model, ClassificationMargin(), data, tmp_path / "a", config=IndexConfig(k=8), progress=False
    )
    b = build_index(
        model, ClassificationMargin(), data, tmp_path / "b", config=IndexConfig(k=8), progress=False
    )
    c = build_index(
        model, ClassificationMargin(), data, tmp_path / "c", config=IndexConfig(k=8, seed=1), progress=False
    )
    assert np.array_equal(load_index(a).phi, load_index(b).phi)
    assert not np.allclose(load_index(a).phi, load_index(c).phi)


def test_regression_index_and_prior_override(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = build_model(ModelSpec("mlp", {"in_features": 4, "hidden": [6], "out_features": 1}))
    data = Dataset(torch.randn(30, 4), torch.randn(30))
    out = build_index(
        model,
        RegressionOutput(sigma=0.5),
        data,
        tmp_path / "reg",
        config=IndexConfig(k=6, prior_precision=2.5),
        progress=False,
    )
    loaded = load_index(out)
    assert loaded.manifest.surrogate.prior_precision == 2.5
    assert np.allclose(loaded.surrogate.beta, 4.0)
    residual = data.targets.numpy() - loaded.examples["output"]
    assert np.allclose(loaded.surrogate.grad_term, residual / 0.25)


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (torch.full((40,), 3), r"must lie in 0\.\.2 \(the model has 3 outputs\); got values from 3 to 3"),
        (torch.full((40,), -1), r"must lie in 0\.\.2"),
        (torch.full((40,), 1.5), "must be integer class indices"),
    ],
)
def test_bad_classification_targets_are_refused(tmp_path: Path, targets: torch.Tensor, message: str) -> None:
    model, data = _tiny_problem()
    bad = Dataset(data.inputs, targets)
    with pytest.raises(ValueError, match=message):
        build_index(
            model, ClassificationMargin(), bad, tmp_path / "x", config=IndexConfig(k=8), progress=False
        )
    with pytest.raises(ValueError, match=message):
        build_index(model, ClassificationMargin(), data, tmp_path / "y", queries=bad, progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_mismatched_models_and_names_are_refused(tmp_path: Path) -> None:
    model, data = _tiny_problem()
    with pytest.raises(ValueError, match="regression explains a model with exactly 1 output; it has 3"):
        build_index(model, RegressionOutput(), data, tmp_path / "r", progress=False)
    with pytest.raises(ValueError, match=r"the model rejects inputs of shape \[7\]"):
        build_index(model, ClassificationMargin(), Dataset(torch.randn(40, 7), data.targets), tmp_path / "s")
    with pytest.raises(ValueError, match="index folder name 'bad name!' must match"):
        build_index(model, ClassificationMargin(), data, tmp_path / "bad name!", progress=False)


def test_cli_help_and_build(tmp_path: Path) -> None:
    cli = str(Path(sys.executable).with_name("infotrace-index"))
    for args in ([], ["build"], ["demo"]):
        shown = subprocess.run([cli, *args, "--help"], capture_output=True, text=True, check=True).stdout
        assert "Usage" in shown
    model, data = _tiny_problem()
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


def test_cli_refuses_pickled_checkpoint(tmp_path: Path) -> None:
    model, data = _tiny_problem()
    evil = tmp_path / "evil.pt"
    torch.save({"state": model.state_dict(), "extra": Path("x")}, evil)  # a non-tensor object: pickled
    safetensors_ckpt = tmp_path / "ok.safetensors"
    save_checkpoint(model, safetensors_ckpt)
    with pytest.raises(ValueError, match="not a safetensors file or a weights-only torch state dict"):
        build_index(model, ClassificationMargin(), data, tmp_path / "x", checkpoint=evil, progress=False)
    build_index(
        model, ClassificationMargin(), data, tmp_path / "y", checkpoint=safetensors_ckpt, progress=False
    )
