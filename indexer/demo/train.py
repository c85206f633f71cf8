"""Seeded training of the demo classifier, cached as a safetensors checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from indexer.data import Dataset
from indexer.features.models import ModelSpec, build_model, load_checkpoint, save_checkpoint

__all__ = ["train_classifier", "trained_model"]


def train_classifier(
    model: nn.Module,
    data: Dataset,
    epochs: int = 20,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> nn.Module:
    """Train a classifier with Adam on cross-entropy, deterministically for a given seed.

    Args:
        model: the network, trained in place and returned.
        data: inputs `(n, ...)`, integer targets `(n,)`.
        epochs, lr, batch_size: the usual; seed: fixes the shuffling order.
        progress: show a progress bar over epochs.

    Returns:
        The trained model in eval mode.
    """
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in tqdm(range(epochs), desc="train", disable=not progress, leave=False):
        order = torch.randperm(len(data), generator=generator)
        for start in range(0, len(data), batch_size):
            rows = order[start : start + batch_size]
            optimiser.zero_grad()
            loss_fn(model(data.inputs[rows]), data.targets[rows]).backward()
            optimiser.step()
    return model.eval()


def trained_model(
    spec: ModelSpec, data: Dataset, checkpoint: Path, seed: int = 0, epochs: int = 20
) -> nn.Module:
    """Load ``checkpoint`` if it exists, else train a fresh ``spec`` model with ``seed`` and save it there.

    Returns:
        The model with trained weights, in eval mode.
    """
    torch.manual_seed(seed)
    model = build_model(spec)
    if Path(checkpoint).is_file():
        load_checkpoint(model, checkpoint)
        return model.eval()
    train_classifier(model, data, epochs=epochs, seed=seed)
    Path(checkpoint).parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, checkpoint)
    return model
