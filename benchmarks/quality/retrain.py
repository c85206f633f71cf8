"""Batched, seeded, cached retraining of the demo MLP on subsets of a training set.

Many copies of ``indexer.features.models.mlp(784, [64], 10)`` are trained at once: their parameters are
stacked with :func:`torch.func.stack_module_state` and the forward pass is ``vmap(functional_call)`` over the
stack. Each model ``m`` has its own subset (a boolean mask row) and its own seed, and is trained exactly
as :func:`indexer.demo.train.train_classifier` would train it alone on its subset:

- initial weights: ``torch.manual_seed(seed); mlp(...)`` (as :func:`indexer.demo.train.trained_model` does);
- shuffling: a ``torch.Generator`` seeded with ``seed``; each epoch ``randperm(n_m)`` over the model's
  own ``n_m`` subset examples, cut into batches of ``batch_size`` (the last one partial);
- Adam (lr 1e-3, betas (0.9, 0.999), eps 1e-8) on the mean cross-entropy of each batch.

Batching models whose subsets differ in size: every model takes ``ceil(n_m / batch_size)`` steps per
epoch, like training alone. The stack runs ``max_m ceil(n_m / batch_size)`` steps per epoch; a model
whose epoch is over sits the remaining steps out (its parameters and Adam state, step count included,
are left untouched), and a partial batch is padded to ``batch_size`` rows with weight 0 (the loss is
the weighted mean, so padding contributes nothing). Hence model ``m`` of a stack ends with the same
weights, to float tolerance, as ``train_classifier`` on its subset alone: nothing in its trajectory
depends on the other models. Adam is ``torch.optim.Adam`` over per-model views of the stacked
tensors (its fused kernel on CPU).

Results (logits of the retrained models on the query inputs; margins, DESIGN.md 1.1, follow from them)
are cached on disk, one ``.npz`` file (``allow_pickle=False``) per retrained model, keyed by a sha256 of
its mask, seed, the training hyperparameters and the data, so that a rerun reuses every finished retrain.

Run ``python -m benchmarks.quality.retrain`` to measure model-retrains per second, batched vs alone.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from tqdm.auto import tqdm

from indexer.data import Dataset
from indexer.features.models import cnn, mlp

__all__ = [
    "RetrainConfig",
    "margins",
    "init_stacked",
    "train_stacked",
    "stacked_margins",
    "retrain_margins",
    "train_alone",
    "data_hash",
    "model_key",
    "retrain_logits",
    "stacked_logits",
]

_CACHE_VERSION = "retrain-v2"


@dataclass(frozen=True)
class RetrainConfig:
    """Hyperparameters of a retrain (those of :func:`indexer.demo.train.train_classifier`).

    Attributes:
        epochs: passes over each model's subset; lr: Adam learning rate; batch_size: rows per step;
        in_features, hidden, out_features: the MLP architecture (default: the demo 784-64-10).
        channels: when not empty, the model is :func:`indexer.features.models.cnn` instead: one 3 x 3
            convolution + BatchNorm2d + ReLU + 2 x 2 max-pool block per entry on ``in_features`` square
            images, then one hidden Linear layer of width ``hidden[0]``.
    """

    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 64
    in_features: int = 784
    hidden: tuple[int, ...] = (64,)
    out_features: int = 10
    channels: tuple[int, ...] = ()

    def build(self) -> nn.Module:
        """A fresh model of this architecture (weights from the current global torch RNG).

        Raises:
            ValueError: a CNN whose ``in_features`` is not a square side divisible by ``2 ** len(channels)``,
                or whose ``hidden`` is not one width.
        """
        if not self.channels:
            return mlp(self.in_features, list(self.hidden), self.out_features)
        side = math.isqrt(self.in_features)
        if side * side != self.in_features or len(self.hidden) != 1:
            raise ValueError(
                f"a CNN needs square images and one hidden width; got {self.in_features} inputs, "
                f"hidden {list(self.hidden)}"
            )
        return cnn(side, list(self.channels), self.hidden[0], self.out_features, batch_norm=True)

    def describe(self) -> str:
        """A canonical string of every field, for cache keys."""
        arch = f"arch={self.in_features}-{list(self.hidden)}-{self.out_features}"
        cnn_part = f";cnn={list(self.channels)}" if self.channels else ""
        return f"epochs={self.epochs};lr={self.lr!r};batch={self.batch_size};{arch}{cnn_part}"


def margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Classification margin ``z_y - logsumexp_{c != y} z_c`` (DESIGN.md 1.1).

    Args:
        logits: `(..., n, C)` logits; labels: `(n,)` int64 class indices (broadcast over leading dims).

    Returns:
        `(..., n)` margins, same dtype as ``logits``.
    """
    is_label = torch.arange(logits.shape[-1], device=logits.device) == labels[:, None]  # (n, C)
    z_y = (logits * is_label).sum(-1)
    others = logits.masked_fill(is_label, -math.inf)
    return z_y - torch.logsumexp(others, dim=-1)


def _check_masks_seeds(masks: np.ndarray, seeds: np.ndarray, n_train: int) -> tuple[np.ndarray, np.ndarray]:
    masks = np.asarray(masks)
    seeds = np.asarray(seeds)
    if masks.dtype != np.bool_ or masks.ndim != 2 or masks.shape[1] != n_train:
        raise ValueError(f"masks must be bool (n_models, {n_train}); got {masks.dtype} {masks.shape}")
    if seeds.shape != (masks.shape[0],) or not np.issubdtype(seeds.dtype, np.integer):
        raise ValueError(
            f"seeds must be integers of shape ({masks.shape[0]},); got {seeds.dtype} {seeds.shape}"
        )
    if (masks.sum(1) == 0).any():
        raise ValueError("every subset mask must select at least one training example")
    return masks, seeds.astype(np.int64)


def init_stacked(seeds: np.ndarray, config: RetrainConfig) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Initial weights (and buffers) of one model per seed, stacked.

    Model ``m`` gets the weights of ``torch.manual_seed(seeds[m]); config.build()``; the global RNG state
    is restored afterwards.

    Args:
        seeds: `(n_models,)` integer seeds.

    Returns:
        ``(base, state)``: a template module (on the meta device) for ``functional_call`` and a dict of
        the stacked parameters, `(n_models, *shape)` float32, detached, followed by the stacked buffers
        (a BatchNorm's running mean and variance float32, its batch count int64; none for an MLP).
    """
    models = []
    with torch.random.fork_rng(devices=[]):
        for seed in seeds:
            torch.manual_seed(int(seed))
            models.append(config.build())
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    return base, {k: v.detach().clone() for k, v in {**params, **buffers}.items()}


def _batch_plan(
    masks: np.ndarray, seeds: np.ndarray, epochs: int, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-step row indices, row weights and activity of every model.

    Returns:
        rows `(n_steps, n_models, batch_size)` int64 training-set rows (0 where padded),
        weights `(n_steps, n_models, batch_size)` float32 (1 real row, 0 padding),
        active `(n_steps, n_models)` bool (the model takes an optimiser step).
    """
    n_models = masks.shape[0]
    sizes = masks.sum(1)
    steps_per_epoch = int(max(math.ceil(s / batch_size) for s in sizes))
    n_steps = epochs * steps_per_epoch
    rows = torch.zeros((n_steps, n_models, batch_size), dtype=torch.int64)
    weights = torch.zeros((n_steps, n_models, batch_size), dtype=torch.float32)
    active = torch.zeros((n_steps, n_models), dtype=torch.bool)
    for m in range(n_models):
        subset = torch.from_numpy(np.flatnonzero(masks[m]))
        generator = torch.Generator().manual_seed(int(seeds[m]))
        n_m = len(subset)
        for epoch in range(epochs):
            order = subset[torch.randperm(n_m, generator=generator)]
            for j, start in enumerate(range(0, n_m, batch_size)):
                chunk = order[start : start + batch_size]
                t = epoch * steps_per_epoch + j
                rows[t, m, : len(chunk)] = chunk
                weights[t, m, : len(chunk)] = 1.0
                active[t, m] = True
    return rows, weights, active


def train_stacked(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    masks: np.ndarray,
    seeds: np.ndarray,
    config: RetrainConfig = RetrainConfig(),
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Train one model per (mask, seed) at once, each as ``train_classifier`` would train it alone.

    A model with buffers (the CNN's BatchNorm) normalises each batch by that batch's statistics and
    updates its running statistics, so it cannot take padded rows or sit a step out: such models are
    stacked only when every subset has the same size (then every batch of the stack is real rows, and
    every model steps together); :func:`retrain_logits` groups them so.

    Args:
        inputs: `(n_train, in_features)` float32; targets: `(n_train,)` int64 labels.
        masks: `(n_models, n_train)` bool subsets; seeds: `(n_models,)` integer seeds (init and shuffle).
        config: hyperparameters.

    Returns:
        ``(base, state)``: template module and stacked trained parameters and buffers `(n_models, *shape)`.

    Raises:
        ValueError: bad masks or seeds, or a model with buffers stacked over subsets of different sizes.
    """
    masks, seeds = _check_masks_seeds(masks, seeds, len(inputs))
    base, state = init_stacked(seeds, config)
    param_names = {name for name, _ in base.named_parameters()}
    params = {k: v for k, v in state.items() if k in param_names}
    buffers = {k: v for k, v in state.items() if k not in param_names}
    sizes = masks.sum(1)
    if buffers and (sizes != sizes[0]).any():
        raise ValueError(
            f"a model with buffers (BatchNorm) is stacked only over subsets of one size; got sizes "
            f"{sorted(set(sizes.tolist()))}"
        )
    rows, weights, active = _batch_plan(masks, seeds, config.epochs, config.batch_size)
    n_models = masks.shape[0]
    # Each model's slice of a stacked tensor is its own torch.optim.Adam parameter (a view sharing the
    # stack's storage), so each keeps its own Adam state and step count; a model that sits a step out
    # gets grad None, which Adam skips entirely. The fused CPU kernel updates all slices in one call.
    slices = {k: [nn.Parameter(v[m]) for m in range(n_models)] for k, v in params.items()}
    optimiser = torch.optim.Adam(
        [p for views in slices.values() for p in views], lr=config.lr, fused=inputs.device.type == "cpu"
    )

    def model_loss(
        p: dict[str, torch.Tensor],
        b: dict[str, torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
        w: torch.Tensor,
    ) -> torch.Tensor:
        # BatchNorm in training mode updates the running statistics of b in place: b is batched over
        # the stack like p, so each model's buffers take its own batch's statistics
        logits = functional_call(base, {**p, **b}, (x,))
        ce = nn.functional.cross_entropy(logits, y, reduction="none")
        return (ce * w).sum() / w.sum().clamp_min(1.0)

    base.train()
    grad_fn = vmap(torch.func.grad(model_loss))
    for t in range(rows.shape[0]):
        act = active[t].tolist()
        if not any(act):
            continue
        # the widest real batch of this step: padding beyond it would be weight-0 rows for every model
        width = int(weights[t].sum(1).max())
        r = rows[t, :, :width]
        grads = grad_fn(params, buffers, inputs[r], targets[r], weights[t, :, :width])
        for k, views in slices.items():
            for m, view in enumerate(views):
                view.grad = grads[k][m] if act[m] else None
        optimiser.step()
    return base, {**params, **buffers}


def stacked_margins(
    base: nn.Module, params: dict[str, torch.Tensor], inputs: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Margins of every stacked model on the same query examples.

    Args:
        base, params: from :func:`train_stacked` (params `(n_models, *shape)`).
        inputs: `(n_query, in_features)`; labels: `(n_query,)` int64.

    Returns:
        `(n_models, n_query)` float32 margins.
    """
    return margins(stacked_logits(base, params, inputs), labels)


def train_alone(
    train: Dataset, mask: np.ndarray, seed: int, config: RetrainConfig = RetrainConfig()
) -> nn.Module:
    """Reference: one model trained by :func:`indexer.demo.train.train_classifier` on ``train[mask]``.

    Args:
        train: the full training set (n_train rows); mask: `(n_train,)` bool subset; seed: init and shuffle.

    Returns:
        The trained model (eval mode).
    """
    from indexer.demo.train import train_classifier

    rows = torch.from_numpy(np.flatnonzero(mask))
    subset = Dataset(train.inputs[rows], train.targets[rows])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = config.build()
    return train_classifier(
        model,
        subset,
        epochs=config.epochs,
        lr=config.lr,
        batch_size=config.batch_size,
        seed=int(seed),
        progress=False,
    )


def data_hash(*tensors: torch.Tensor) -> str:
    """sha256 over the dtype, shape and bytes of each tensor (e.g. train inputs, targets, queries)."""
    digest = hashlib.sha256()
    for t in tensors:
        a = t.detach().cpu().contiguous().numpy()
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def model_key(mask: np.ndarray, seed: int, config: RetrainConfig, data_digest: str) -> str:
    """Cache key of one retrain: sha256 of (mask `(n_train,)` bool, seed, config, data digest)."""
    digest = hashlib.sha256(_CACHE_VERSION.encode())
    mask = np.ascontiguousarray(mask, dtype=np.bool_)
    digest.update(f"{mask.shape}".encode())
    digest.update(np.packbits(mask).tobytes())
    digest.update(int(seed).to_bytes(8, "little", signed=True))
    digest.update(config.describe().encode())
    digest.update(data_digest.encode())
    return digest.hexdigest()


def _train_chunk(
    train: Dataset, query_inputs: torch.Tensor, masks: np.ndarray, seeds: np.ndarray, config: RetrainConfig
) -> np.ndarray:
    """Train one chunk and return its `(n_chunk, n_query, C)` float32 logits (the step the cache skips)."""
    base, params = train_stacked(train.inputs, train.targets, masks, seeds, config)
    return stacked_logits(base, params, query_inputs).numpy().astype(np.float32)


def stacked_logits(base: nn.Module, params: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
    """Logits of every stacked model on the same inputs.

    Args:
        base, params: from :func:`train_stacked` (params `(n_models, *shape)`); inputs: `(n, in_features)`.

    Returns:
        `(n_models, n, C)` float32 logits.
    """
    base.eval()  # a BatchNorm normalises by its running statistics, as the trained model serves
    with torch.no_grad():
        return vmap(lambda p: functional_call(base, p, (inputs,)))(params)


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_cached(path: Path, mask: np.ndarray, seed: int) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as cached:
            # the stored mask and seed guard against a stale or foreign file under the same name
            if np.array_equal(np.unpackbits(cached["mask"])[: len(mask)].astype(bool), mask) and int(
                cached["seed"]
            ) == int(seed):
                return np.asarray(cached["logits"])
    except (OSError, ValueError, KeyError):  # a truncated or unreadable file is retrained, not trusted
        return None
    return None


def _chunks(
    order: list[tuple[str, int]], sizes: np.ndarray, chunk_size: int, one_size: bool
) -> list[list[tuple[str, int]]]:
    """Cut the size-sorted jobs ``order`` ((key, row) pairs) into chunks of at most ``chunk_size``;
    with ``one_size`` (a model with BatchNorm) a chunk also ends where the subset size ``sizes[row]``
    changes."""
    chunks: list[list[tuple[str, int]]] = []
    for job in order:
        same = not one_size or (bool(chunks) and sizes[chunks[-1][0][1]] == sizes[job[1]])
        if chunks and len(chunks[-1]) < chunk_size and same:
            chunks[-1].append(job)
        else:
            chunks.append([job])
    return chunks


def retrain_logits(
    train: Dataset,
    query_inputs: torch.Tensor,
    masks: np.ndarray,
    seeds: np.ndarray,
    config: RetrainConfig = RetrainConfig(),
    cache_dir: Path | None = None,
    chunk_size: int = 32,
    progress: str | None = None,
) -> np.ndarray:
    """Retrain one model per (mask, seed) and return their logits on the query inputs, with a disk cache.

    Each retrain is cached on its own as ``cache_dir/<key>.npz`` (key: :func:`model_key`), so a rerun,
    or another experiment asking for the same (mask, seed), reuses it. Retrains not in the cache are
    trained ``chunk_size`` at a time (models of similar subset size together) and saved as each chunk
    finishes (a CNN's chunks hold subsets of one size only, see :func:`train_stacked`). Duplicate
    (mask, seed) rows are trained once.

    Args:
        train: training set, inputs `(n_train, in_features)`, targets `(n_train,)` int64.
        query_inputs: `(n_query, in_features)` float32 inputs the retrained models are evaluated on.
        masks: `(n_models, n_train)` bool; seeds: `(n_models,)` integers.
        config: hyperparameters; cache_dir: where retrains are cached (None: no cache).
        chunk_size: models trained at once; progress: a tqdm description, or None for no bar.

    Returns:
        `(n_models, n_query, C)` float32 logits.

    Raises:
        ValueError: masks not bool `(n_models, n_train)`, an empty subset, or seeds of the wrong shape.
    """
    masks, seeds = _check_masks_seeds(masks, seeds, len(train))
    n_models = masks.shape[0]
    digest = data_hash(train.inputs, train.targets, query_inputs)
    keys = [model_key(masks[m], int(seeds[m]), config, digest) for m in range(n_models)]
    results: dict[str, np.ndarray] = {}
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        for m, key in enumerate(keys):
            if key not in results:
                hit = _load_cached(cache_dir / f"{key}.npz", masks[m], int(seeds[m]))
                if hit is not None:
                    results[key] = hit
    todo: dict[str, int] = {}
    for m, key in enumerate(keys):
        if key not in results and key not in todo:
            todo[key] = m
    order = sorted(todo.items(), key=lambda item: (int(masks[item[1]].sum()), item[0]))
    with tqdm(total=len(order), desc=progress, unit="model", disable=progress is None, leave=False) as bar:
        for chunk in _chunks(order, masks.sum(1), chunk_size, one_size=bool(config.channels)):
            rows = np.array([m for _, m in chunk])
            logits = _train_chunk(train, query_inputs, masks[rows], seeds[rows], config)
            for (key, m), out in zip(chunk, logits, strict=True):
                results[key] = out
                if cache_dir is not None:
                    _save_npz(
                        cache_dir / f"{key}.npz",
                        logits=out,
                        mask=np.packbits(masks[m]),
                        seed=np.int64(seeds[m]),
                    )
            bar.update(len(chunk))
    return (
        np.stack([results[key] for key in keys]) if keys else np.zeros((0, len(query_inputs), 0), np.float32)
    )


def retrain_margins(
    train: Dataset,
    query: Dataset,
    masks: np.ndarray,
    seeds: np.ndarray,
    config: RetrainConfig = RetrainConfig(),
    cache_dir: Path | None = None,
    chunk_size: int = 32,
    progress: str | None = None,
) -> np.ndarray:
    """Margins (DESIGN.md 1.1) of retrained models on labelled queries: :func:`retrain_logits` then margins.

    Args:
        query: inputs `(n_query, in_features)` and labels `(n_query,)` int64; the rest as in
            :func:`retrain_logits`.

    Returns:
        `(n_models, n_query)` float32 margins.
    """
    logits = retrain_logits(train, query.inputs, masks, seeds, config, cache_dir, chunk_size, progress)
    return margins(torch.from_numpy(logits), query.targets).numpy()


def main() -> None:
    """Measure model-retrains per second, batched vs one at a time."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-models", type=int, default=32)
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--alpha", type=float, default=1.0, help="subset fraction (1.0: all n_train)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--n-alone", type=int, default=8, help="models timed one at a time")
    args = parser.parse_args()
    from indexer.demo.mnist import load_mnist_sample

    train, _ = load_mnist_sample(n_train=args.n_train)
    rng = np.random.default_rng(0)
    size = max(1, round(args.alpha * args.n_train))
    masks = np.zeros((args.n_models, args.n_train), dtype=bool)
    for m in range(args.n_models):
        masks[m, rng.choice(args.n_train, size, replace=False)] = True
    seeds = np.arange(args.n_models)
    config = RetrainConfig(epochs=args.epochs)
    print(
        f"torch threads: {torch.get_num_threads()}, "
        f"{args.n_models} models x {size} examples x {args.epochs} epochs"
    )
    # warm up both paths (first-call costs of vmap, autograd and the fused kernel are not per-retrain)
    train_stacked(train.inputs, train.targets, masks[:2], seeds[:2], RetrainConfig(epochs=1))
    train_alone(train, masks[0], 0, RetrainConfig(epochs=1))
    t0 = time.perf_counter()
    train_stacked(train.inputs, train.targets, masks, seeds, config)
    batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    for m in range(args.n_alone):
        train_alone(train, masks[m], int(seeds[m]), config)
    alone = (time.perf_counter() - t0) / args.n_alone
    print(f"batched: {batched:.2f} s for {args.n_models} models = {args.n_models / batched:.2f} retrains/s")
    print(f"alone:   {alone:.2f} s per model = {1 / alone:.2f} retrains/s (mean of {args.n_alone})")


if __name__ == "__main__":
    main()
