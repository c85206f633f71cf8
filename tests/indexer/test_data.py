"""Streamed data: a torch Dataset or IterableDataset, tuple or dict batches, gives the index an in-memory
Dataset of the same examples gives, without holding the inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import IterableDataset, TensorDataset

from indexer.build import build_index
from indexer.config import IndexConfig
from indexer.data import Batch, BatchLayout, Dataset, StreamedDataset
from indexer.features.tasks import ClassificationMargin
from indexer.store.reader import load_index

TinyProblem = tuple[torch.nn.Module, Dataset]


class DictExamples(torch.utils.data.Dataset):
    """Examples as dicts, the way a tokenized corpus comes: the input under "x", the label under "labels"."""

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.data.inputs[i], "labels": self.data.targets[i], "metadata": {"row": i}}


class Stream(IterableDataset):
    """An iterable dataset without a length: read once, in order."""

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __iter__(self):
        for i in range(len(self.data)):
            yield self.data.inputs[i], self.data.targets[i]


class KeywordModel(torch.nn.Module):
    """The tiny MLP called with a keyword argument, as dict batches call it."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


@pytest.mark.parametrize("form", ["map", "iterable"])
def test_a_streamed_build_equals_the_in_memory_one(
    tmp_path: Path, tiny_problem: TinyProblem, form: str
) -> None:
    model, data = tiny_problem
    config = IndexConfig(k=8, batch_size=8)
    memory = load_index(build_index(model, ClassificationMargin(), data, tmp_path / "memory", config=config))
    source = TensorDataset(data.inputs, data.targets) if form == "map" else Stream(data)
    streamed = build_index(
        model,
        ClassificationMargin(),
        StreamedDataset(source),
        tmp_path / "streamed",
        config=config,
        progress=False,
    )
    index = load_index(streamed)
    np.testing.assert_array_equal(index.phi, memory.phi)
    np.testing.assert_array_equal(index.examples["label"], memory.examples["label"])
    assert index.inputs is None and index.query_inputs is None  # not asked for: not stored
    assert index.manifest.model.input_shape == (6,) and index.manifest.model.input_dtype == "float32"


def test_dict_batches_with_metadata_and_stored_inputs(tmp_path: Path, tiny_problem: TinyProblem) -> None:
    model, data = tiny_problem
    wrapped = KeywordModel(model)  # its parameter names (the projection's seeds) are "inner.*"
    streamed = StreamedDataset(DictExamples(data), BatchLayout(input_keys=("x",)))
    out = build_index(
        wrapped,
        ClassificationMargin(),
        streamed,
        tmp_path / "dicts",
        store_inputs=True,
        progress=False,
    )
    index = load_index(out)
    np.testing.assert_array_equal(index.inputs, data.inputs.numpy())
    assert index.metadata.get_one("train", 7) == {"label": int(data.targets[7]), "row": 7}
    reference = load_index(
        build_index(wrapped, ClassificationMargin(), data, tmp_path / "plain", progress=False)
    )
    np.testing.assert_allclose(index.phi, reference.phi, rtol=1e-6, atol=1e-7)


def test_batch_layouts_say_what_they_expected() -> None:
    layout = BatchLayout()
    got = layout.read(
        {"input_ids": torch.ones(2, 3), "attention_mask": torch.ones(2, 3), "labels": torch.zeros(2)}
    )
    assert isinstance(got, Batch) and set(got.inputs) == {"input_ids", "attention_mask"}
    assert got.mask is not None and got.mask.shape == (2, 3)
    with pytest.raises(ValueError, match="needs its targets under 'labels'"):
        layout.read({"input_ids": torch.ones(2, 3)})
    with pytest.raises(ValueError, match=r"must be \(input, target\) or \(input, target, mask\); got 4"):
        layout.read((1, 2, 3, 4))
    with pytest.raises(ValueError, match="lacks the model's input"):
        BatchLayout(input_keys=("pixels",)).read({"x": torch.ones(2), "labels": torch.zeros(2)})


def test_bad_targets_in_a_later_batch_are_refused_before_they_are_featurized(
    tmp_path: Path, tiny_problem: TinyProblem
) -> None:
    model, data = tiny_problem
    targets = data.targets.clone()
    targets[-1] = 7  # the model has 3 outputs
    with pytest.raises(ValueError, match=r"must lie in 0\.\.2"):
        build_index(
            model,
            ClassificationMargin(),
            StreamedDataset(TensorDataset(data.inputs, targets)),
            tmp_path / "bad",
            config=IndexConfig(batch_size=8),
            progress=False,
        )
    assert not (tmp_path / "bad").exists()
