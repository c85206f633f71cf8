"""The examples the indexer reads, in batches (DESIGN.md 2: "streamed from a dataset").

- :class:`Dataset`: in-memory tensors with optional per-example metadata (the convenience, and what the
  CLI's dataset files give).
- :class:`StreamedDataset`: any ``torch.utils.data.Dataset`` or ``IterableDataset`` read through a
  ``DataLoader``, batch by batch, with a :class:`BatchLayout` that says where the model's input, the target
  and the padding mask are in each batch (tuples or dicts); its inputs are never all in memory.

Both give :class:`Batch` objects, which is all the featurizers see. The demo's digits are in
:mod:`indexer.demo.mnist`.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.utils.data import DataLoader

__all__ = [
    "DATA_KEYS",
    "read_array_file",
    "Batch",
    "BatchLayout",
    "Dataset",
    "Examples",
    "StreamedDataset",
    "load_arrays",
]


@dataclass(frozen=True)
class Batch:
    """One batch as a featurizer reads it.

    Attributes:
        inputs: the model's input: a `(B, ...)` tensor, or a mapping of them (keyword arguments).
        targets: `(B, ...)` targets of the output function.
        mask: `(B, T)` 1 for positions that count and 0 for padding, or None.
        metadata: B JSON-serialisable dicts (what the source knows of each example), or empty.
    """

    inputs: Any
    targets: torch.Tensor
    mask: torch.Tensor | None = None
    metadata: Sequence[dict[str, Any]] = ()

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    @property
    def first_input(self) -> torch.Tensor:
        """`(B, ...)` the input tensor, or the first of a mapping's (the one whose shape is recorded)."""
        return next(iter(self.inputs.values())) if isinstance(self.inputs, dict) else self.inputs


@dataclass(frozen=True)
class BatchLayout:
    """Where the parts of a collated batch are.

    A tuple or list batch is ``(input, target)`` or ``(input, target, mask)``. A dict batch gives the model
    the keys ``input_keys`` as keyword arguments (all keys but the target, mask-free ones included, when
    None), the target under ``target_key``, the padding mask under ``mask_key`` (optional; it is also
    passed to the model when it is one of the input keys), and per-example metadata under
    ``metadata_key`` (optional, a list of dicts).

    Attributes:
        input_keys: dict batches: the model's keyword arguments (None: every key but target and metadata).
        target_key: dict batches: the targets' key.
        mask_key: dict batches: the `(B, T)` padding mask's key (absent: no mask).
        metadata_key: dict batches: the metadata's key (absent: none).
    """

    input_keys: tuple[str, ...] | None = None
    target_key: str = "labels"
    mask_key: str = "attention_mask"
    metadata_key: str = "metadata"

    def read(self, batch: Any) -> Batch:
        """The :class:`Batch` of one collated batch.

        Raises:
            ValueError: a batch of another structure, or without targets; the message says what was expected.
        """
        if isinstance(batch, list | tuple):
            if len(batch) not in (2, 3):
                raise ValueError(
                    f"a tuple batch must be (input, target) or (input, target, mask); got {len(batch)}"
                )
            return Batch(
                batch[0], torch.as_tensor(batch[1]), torch.as_tensor(batch[2]) if len(batch) == 3 else None
            )
        if isinstance(batch, dict):
            if self.target_key not in batch:
                raise ValueError(
                    f"a dict batch needs its targets under {self.target_key!r}; it has {sorted(batch)}"
                )
            keys = self.input_keys or tuple(k for k in batch if k not in (self.target_key, self.metadata_key))
            missing = [k for k in keys if k not in batch]
            if missing:
                raise ValueError(f"the batch lacks the model's input(s) {missing}; it has {sorted(batch)}")
            mask = batch.get(self.mask_key)
            targets = torch.as_tensor(batch[self.target_key])
            return Batch(
                {k: batch[k] for k in keys},
                targets,
                None if mask is None else torch.as_tensor(mask),
                _rows(batch.get(self.metadata_key, ()), len(targets)),
            )
        raise ValueError(
            f"a batch must be a tuple (input, target[, mask]) or a dict; got {type(batch).__name__}"
        )


def _rows(metadata: Any, n: int) -> list[dict[str, Any]]:
    """Per-example metadata dicts from a batch's metadata: a list of dicts, or the columns torch's default
    collate makes of them (a dict of `(n,)` tensors or lists)."""
    if isinstance(metadata, dict):
        columns = {
            key: value.tolist() if isinstance(value, torch.Tensor) else list(value)
            for key, value in metadata.items()
        }
        rows = [{key: column[i] for key, column in columns.items()} for i in range(n)]
    else:
        rows = list(metadata)
    if rows and len(rows) != n:
        raise ValueError(f"a batch of {n} examples has {len(rows)} metadata rows")
    return rows


@dataclass(frozen=True)
class StreamedDataset:
    """Examples read from a torch dataset batch by batch; nothing but the current batch is in memory.

    Attributes:
        source: a ``torch.utils.data.Dataset`` or ``IterableDataset`` (read in its own order, which must be
            the same on every pass for a build to resume).
        layout: where the parts of each batch are.
        collate_fn: the ``DataLoader``'s collate function (None: torch's default).
        num_workers: ``DataLoader`` worker processes.
        image_shape: `(height, width)` when each input is an image, else None.
    """

    source: Any
    layout: BatchLayout = field(default_factory=BatchLayout)
    collate_fn: Callable[[list[Any]], Any] | None = None
    num_workers: int = 0
    image_shape: tuple[int, int] | None = None

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """The examples in order, ``batch_size`` at a time (the last batch may be shorter).

        Raises:
            ValueError: a batch the layout cannot read.
        """
        loader = DataLoader(
            self.source,
            batch_size=batch_size,
            shuffle=False,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
        )
        for batch in loader:
            yield self.layout.read(batch)

    def __len__(self) -> int:
        """The source's length (a ``TypeError`` for an iterable dataset without one)."""
        return len(self.source)


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

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """The examples in order, ``batch_size`` at a time (slices of the tensors, no copies)."""
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))
            yield Batch(self.inputs[start:stop], self.targets[start:stop], None, self.metadata[start:stop])


Examples = Dataset | StreamedDataset
"""What :func:`indexer.build.build_index` indexes: in-memory tensors or a streamed torch dataset."""


DATA_KEYS = ("train_inputs", "train_targets", "query_inputs", "query_targets")
"""The arrays of a dataset file (:func:`load_arrays`); the query pair is optional."""


def read_array_file(path: Path, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The arrays of a ``.safetensors`` or ``.npz`` file (``allow_pickle=False``), each as a tensor of its
    own dtype (a safetensors file may hold bfloat16).

    Args:
        path: the file; keys: the array names allowed in it.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a folder, an unsupported suffix, a file that is not an archive, a pickled or non-numeric
            array, an unknown key (the message lists the allowed ones).
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"dataset file {path} is a folder; give a .safetensors or .npz file")
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            arrays = dict(load_file(str(path)))
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"dataset file {path} is not a readable safetensors file: {exc}") from exc
    elif path.suffix == ".npz":
        if not zipfile.is_zipfile(path):
            raise ValueError(f"dataset file {path} is not an .npz archive (numpy.savez writes one)")
        try:
            with np.load(path, allow_pickle=False) as npz:
                raw = {key: npz[key] for key in npz.files}
        except ValueError as exc:
            raise ValueError(
                f"dataset file {path} holds object arrays, which are never unpickled: {exc}"
            ) from exc
        arrays = {key: _tensor(path, key, array) for key, array in raw.items()}
    else:
        raise ValueError(f"dataset file {path} must end in .safetensors or .npz")
    unknown = sorted(set(arrays) - set(keys))
    if unknown:
        raise ValueError(f"dataset file {path} has unknown array(s) {unknown}; expected {list(keys)}")
    return arrays


def load_arrays(path: Path) -> tuple[Dataset, Dataset | None]:
    """Read a dataset file for the CLI: ``.safetensors`` or ``.npz`` (read with ``allow_pickle=False``).

    Keys: ``train_inputs``, ``train_targets`` and optionally ``query_inputs``, ``query_targets``. Every
    array keeps the dtype it has in the file (a safetensors file may hold bfloat16, which numpy cannot);
    integer inputs (token ids) stay integers. (``infotrace-index build`` then casts floating-point
    inputs to the model's parameter dtype.)

    Returns:
        ``(train, queries)``; queries is None when the file has none.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a folder, an unsupported suffix, a file that is not an archive, a pickled or
            non-numeric array, a missing or an unknown key.
    """
    path = Path(path)
    arrays = read_array_file(path, DATA_KEYS)
    for key in ("train_inputs", "train_targets"):
        if key not in arrays:
            raise ValueError(f"dataset file {path} has no array {key!r}; it has {sorted(arrays)}")

    def make(prefix: str) -> Dataset:
        return Dataset(inputs=arrays[f"{prefix}_inputs"], targets=arrays[f"{prefix}_targets"])

    if ("query_inputs" in arrays) != ("query_targets" in arrays):
        present = "query_inputs" if "query_inputs" in arrays else "query_targets"
        raise ValueError(
            f"dataset file {path} has {present!r} without its partner: give both query arrays or none"
        )
    queries = make("query") if "query_inputs" in arrays else None
    return make("train"), queries


def _tensor(path: Path, key: str, array: np.ndarray) -> torch.Tensor:
    """One ``.npz`` array as a tensor of the same dtype.

    Raises:
        ValueError: a dtype torch has no tensor for (strings, unsigned 16/32/64-bit on older torch,
            structured arrays), naming the key.
    """
    try:
        return torch.from_numpy(np.ascontiguousarray(array))
    except TypeError as exc:
        raise ValueError(
            f"dataset file {path}: array {key!r} has dtype {array.dtype}, which is not a numeric tensor "
            "type (give numbers: float, int, or bool)"
        ) from exc
