"""Datasets the indexer reads: in-memory tensors with optional per-example metadata, and dataset files.

The demo's digits are in :mod:`indexer.demo.mnist`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file

__all__ = ["Dataset", "load_arrays"]


@dataclass(frozen=True)
class Dataset:
    """Examples to index or to store as queries.

    Attributes:
        inputs: `(n, *input_shape)` model inputs (float32 for the built-in models).
        targets: `(n,)` labels (int64) or regression targets (float).
        metadata: n JSON-serialisable dicts (anything the adapter knows), or empty.
        image_shape: `(height, width)` when each input is an image, for rendering; else None.

    Raises:
        ValueError: lengths disagree, or an ``image_shape`` whose pixels are not the input's values.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    metadata: list[dict[str, Any]] = field(default_factory=list)
    image_shape: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if len(self.inputs) != len(self.targets):
            raise ValueError(
                f"inputs ({len(self.inputs)}) and targets ({len(self.targets)}) differ in length"
            )
        if self.metadata and len(self.metadata) != len(self.inputs):
            raise ValueError(f"metadata has {len(self.metadata)} rows for {len(self.inputs)} examples")
        if self.image_shape is not None:
            per_example = int(np.prod(self.inputs.shape[1:]))
            height, width = self.image_shape
            if height < 1 or width < 1 or height * width != per_example:
                raise ValueError(
                    f"image_shape {tuple(self.image_shape)} must have one pixel per input value: each input "
                    f"has {per_example} values (shape {list(self.inputs.shape[1:])})"
                )

    def __len__(self) -> int:
        return len(self.inputs)


def load_arrays(path: Path) -> tuple[Dataset, Dataset | None]:
    """Read a dataset file for the CLI: ``.safetensors`` or ``.npz`` (read with ``allow_pickle=False``).

    Keys: ``train_inputs``, ``train_targets`` and optionally ``query_inputs``, ``query_targets``.

    Returns:
        ``(train, queries)``; queries is None when the file has none.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an unsupported suffix, a pickled array, or a missing key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            arrays = dict(load_file(str(path)))
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"dataset file {path} is not a readable safetensors file: {exc}") from exc
    elif path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}
        except ValueError as exc:
            raise ValueError(
                f"dataset file {path} holds object arrays, which are never unpickled: {exc}"
            ) from exc
    else:
        raise ValueError(f"dataset file {path} must end in .safetensors or .npz")
    for key in ("train_inputs", "train_targets"):
        if key not in arrays:
            raise ValueError(f"dataset file {path} has no array {key!r}; it has {sorted(arrays)}")

    def make(prefix: str) -> Dataset:
        x = torch.from_numpy(np.ascontiguousarray(arrays[f"{prefix}_inputs"]))
        return Dataset(
            inputs=x.float() if x.is_floating_point() else x,
            targets=torch.from_numpy(np.ascontiguousarray(arrays[f"{prefix}_targets"])),
        )

    if ("query_inputs" in arrays) != ("query_targets" in arrays):
        present = "query_inputs" if "query_inputs" in arrays else "query_targets"
        raise ValueError(
            f"dataset file {path} has {present!r} without its partner: give both query arrays or none"
        )
    queries = make("query") if "query_inputs" in arrays else None
    return make("train"), queries
