"""Seeded training of the demo classifier, cached as a safetensors checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from indexer.data import Dataset
from indexer.exceptions import InfotraceError
from indexer.features.models import ModelSpec, build_model, load_checkpoint, save_checkpoint
from indexer.store.reader import load_index

__all__ = ["built_with", "train_classifier", "train_language_model", "trained_model"]


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


def train_language_model(
    model: nn.Module,
    ids: torch.Tensor,
    attention_mask: torch.Tensor,
    steps: int = 1500,
    lr: float = 3e-3,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> nn.Module:
    """Train a causal language model with AdamW on next-token cross-entropy, deterministically for a seed.

    The logits at position t are scored against the token at t + 1 where that token is real (mask 1); the
    learning rate decays linearly to zero over ``steps``.

    Args:
        model: token ids `(b, T)` -> logits `(b, T, vocab)`; trained in place and returned.
        ids: `(n, T)` int64 token ids; attention_mask: `(n, T)` 1 for real tokens, 0 for padding.
        steps: optimiser steps of ``batch_size`` sequences drawn without replacement per pass; lr: peak
            learning rate; seed: fixes the order.
        progress: show a progress bar over steps.

    Returns:
        The trained model in eval mode.
    """
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: 1 - step / steps)
    targets = torch.where(attention_mask[:, 1:].bool(), ids[:, 1:], torch.full_like(ids[:, 1:], -100))
    model.train()
    order = torch.randperm(len(ids), generator=generator)
    position = 0
    for _ in tqdm(range(steps), desc="train", disable=not progress, leave=False):
        if position + batch_size > len(ids):
            order, position = torch.randperm(len(ids), generator=generator), 0
        rows = order[position : position + batch_size]
        position += batch_size
        logits = model(ids[rows])[:, :-1]
        loss = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets[rows].reshape(-1), ignore_index=-100
        )
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
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


def built_with(out_dir: Path, settings: dict[str, Any]) -> bool:
    """Whether ``out_dir`` holds an index that loads and verifies and was built by a demo with exactly
    ``settings`` (its manifest's ``demo`` field): an older layout, a damaged file or other settings are
    rebuilt."""
    try:
        return bool(load_index(out_dir).manifest.extra.get("demo") == settings)
    except InfotraceError:
        return False
