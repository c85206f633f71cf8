"""The index directory: checksums, shapes and the manifest verified on load; atomic writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

import indexer.store.writer as writer
from indexer.build import build_index
from indexer.config import IndexConfig
from indexer.data import Dataset
from indexer.exceptions import IndexCorruptError, IndexFormatError, IndexNotFoundError
from indexer.features.tasks import ClassificationMargin
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
    # the features stored once, float16 by default, memory-mapped; no whitened copy
    assert data.phi.shape == (600, 64) and data.phi.dtype == np.float16
    assert isinstance(data.phi.base, np.memmap)  # a plain view of the map
    assert data.query_phi.shape == (80, 64) and data.query_phi.dtype == np.float16
    assert data.manifest.counts.feature_dtype == "float16" and data.faiss_index is None
    assert not any("whitened" in name or name.startswith("faiss") for name in data.manifest.files)
    assert data.manifest.format_version == FORMAT_VERSION
    projection = data.manifest.projection
    assert (projection.kind, projection.k, projection.seed, projection.distribution) == (
        "kronecker",
        64,
        0,
        "gaussian",
    )
    assert [b["name"] for b in (projection.coverage or {})["blocks"]] == ["0.weight", "2.weight"]
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
    beta = index_copy / "examples.beta.npy"
    beta.write_bytes(beta.read_bytes()[:100])
    with pytest.raises(IndexCorruptError, match=r"examples\.beta\.npy has 100 bytes"):
        load_index(index_copy)
    beta.unlink()
    with pytest.raises(IndexCorruptError, match=r"examples\.beta\.npy is listed in the manifest but missing"):
        load_index(index_copy)


def test_manifest_problems(index_copy: Path, tmp_path: Path) -> None:
    manifest = json.loads((index_copy / MANIFEST_FILE).read_text())
    (index_copy / MANIFEST_FILE).write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(IndexFormatError, match="format_version is 99; this infotrace reads versions 1, 2"):
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
    [("projection", {"seed": 1}), ("surrogate", {"prior_precision": 1.0})],
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
        IndexCorruptError, match=r"phi\.npy holds float16\(600, 64\); expected float16\(600, 65\)"
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


def test_crash_during_write_leaves_no_partial_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_problem: tuple[torch.nn.Module, Dataset]
) -> None:
    model, data = tiny_problem
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


def test_metadata_is_read_from_new_threads_after_the_folder_is_deleted(
    index_copy: Path, tmp_path: Path
) -> None:
    """An engine answering on an old version after the switch (a new request thread, the old folder deleted)
    still reads its metadata (a connection opened later through /proc/self/fd failed: a 500)."""
    import threading

    data = load_index(index_copy)
    want = data.metadata.get("train", [0, 5])
    moved = tmp_path / "moved"
    shutil.move(index_copy, moved)
    shutil.rmtree(moved)
    got: list[object] = []
    thread = threading.Thread(target=lambda: got.append(data.metadata.get("train", [0, 5])))
    thread.start()
    thread.join()
    assert got == [want] and set(want) == {0, 5}


def test_a_metadata_file_that_is_not_sqlite_is_named(tmp_path: Path) -> None:
    from indexer.store.reader import MetadataStore

    (tmp_path / "metadata.sqlite").write_bytes(b"not a database at all, just some bytes" * 40)
    with pytest.raises(IndexCorruptError, match="metadata.sqlite is not a readable SQLite database"):
        MetadataStore(tmp_path / "metadata.sqlite")
