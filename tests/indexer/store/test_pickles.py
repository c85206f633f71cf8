"""Nothing from a file is ever unpickled: pickle bombs in checkpoints, datasets and indexes are refused."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from indexer.data import load_arrays
from indexer.exceptions import IndexCorruptError
from indexer.features.models import ModelSpec, build_model, load_checkpoint
from indexer.store.hashing import sha256_file
from indexer.store.layout import MANIFEST_CHECKSUM_FIELD, MANIFEST_FILE, PHI_FILE
from indexer.store.manifest import manifest_checksum
from indexer.store.reader import load_index


class Bomb:
    """Unpickling this runs a command that leaves a marker file: the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _model() -> torch.nn.Module:
    return build_model(ModelSpec("mlp", {"in_features": 4, "hidden": [3], "out_features": 2}))


def test_pickle_bomb_checkpoint_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bomb = tmp_path / "weights.pt"
    with open(bomb, "wb") as fh:
        pickle.dump({"0.weight": Bomb(marker)}, fh)
    torch_style = tmp_path / "weights2.pt"
    torch.save({"0.weight": Bomb(marker)}, torch_style)  # torch.save pickles whatever it is given
    for path in (bomb, torch_style):
        with pytest.raises(ValueError, match="not a safetensors file or a weights-only torch state dict"):
            load_checkpoint(_model(), path)
    assert not marker.exists()


def test_pickled_dataset_arrays_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    data = tmp_path / "data.npz"
    np.savez(data, train_inputs=np.array([Bomb(marker)], dtype=object), train_targets=np.zeros(1))
    with pytest.raises(ValueError, match="never unpickled"):
        load_arrays(data)
    assert not marker.exists()


def test_pickle_in_an_index_is_refused_even_with_matching_checksums(index_root: Path, tmp_path: Path) -> None:
    """Someone replaces phi.npy by an object array and updates every checksum: loading still refuses."""
    marker = tmp_path / "pwned"
    index = tmp_path / "digits"
    shutil.copytree(index_root / "digits", index)
    np.save(index / PHI_FILE, np.array([Bomb(marker)], dtype=object), allow_pickle=True)
    manifest = json.loads((index / MANIFEST_FILE).read_text())
    manifest["files"][PHI_FILE] = {
        "sha256": sha256_file(index / PHI_FILE),
        "bytes": (index / PHI_FILE).stat().st_size,
    }
    manifest[MANIFEST_CHECKSUM_FIELD] = manifest_checksum(manifest)
    (index / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(IndexCorruptError, match=r"phi\.npy is not a plain \.npy array"):
        load_index(index)
    assert not marker.exists()
