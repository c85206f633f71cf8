"""Per-example tangent features g(x) = d m(x, y; theta) / d theta with ``torch.func`` (DESIGN.md 1.1).

``vmap`` over ``grad`` of the output function gives the gradients of a whole batch at once; they are
flattened in ``model.named_parameters()`` order and projected before the next batch, so memory holds at
most one buffer of `(buffer_rows, n_params)` float32 gradients. Each finished buffer can be handed to a
:class:`BufferCache` (the indexer's shard store, :mod:`indexer.store.shards`), so that an interrupted build
resumes from the buffers it already finished.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from indexer.features.projection import RandomProjection
from indexer.features.tasks import OutputFunction

__all__ = [
    "BufferCache",
    "BufferFeatures",
    "Features",
    "buffer_rows",
    "per_example_gradients",
    "example_gradient",
    "tangent_features",
    "count_parameters",
]


@dataclass(frozen=True)
class Features:
    """Projected tangent features of a set of examples.

    Attributes:
        phi: `(n, k)` float32 projected tangent features.
        outputs: `(n,)` float64 output-function values m_i at theta*.
        model_outputs: `(n, n_outputs)` float32 raw model outputs (logits).
        targets: `(n,)` the targets the output function was evaluated at.
    """

    phi: np.ndarray
    outputs: np.ndarray
    model_outputs: np.ndarray
    targets: np.ndarray


@dataclass(frozen=True)
class BufferFeatures:
    """What :func:`tangent_features` computes for one buffer of consecutive examples.

    Attributes:
        phi: `(rows, k)` float32 projected tangent features.
        outputs: `(rows,)` float64 output-function values.
        model_outputs: `(rows, n_outputs)` float32 raw model outputs.
    """

    phi: np.ndarray
    outputs: np.ndarray
    model_outputs: np.ndarray


class BufferCache(Protocol):
    """Keeps finished buffers of :func:`tangent_features` (e.g. :class:`indexer.store.shards.SplitShards`).

    Buffer ``b`` holds examples ``[b * buffer_rows, min((b + 1) * buffer_rows, n))``; the cache must only
    hand back buffers computed with the same model, output function, projection, data and buffer layout.
    """

    def load(self, buffer: int, rows: int) -> BufferFeatures | None:
        """The stored, verified buffer ``buffer`` of ``rows`` examples, or None to compute it."""
        ...

    def save(self, buffer: int, features: BufferFeatures) -> None:
        """Store buffer ``buffer`` once it is complete."""
        ...


def buffer_rows(n_params: int, batch_size: int, buffer_bytes: int) -> int:
    """Examples per buffer: the most whole batches whose float32 gradients fit in ``buffer_bytes``.

    Args:
        n_params: P, the length of one gradient.
        batch_size: examples per vmap call.
        buffer_bytes: gradient memory per projection pass, in bytes.

    Returns:
        A positive multiple of ``batch_size`` (at least one batch, however small ``buffer_bytes``).
    """
    return max(batch_size, (buffer_bytes // (4 * n_params)) // batch_size * batch_size)


def count_parameters(model: nn.Module) -> int:
    """Number P of trainable parameters, the length of a tangent feature."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def per_example_gradients(
    model: nn.Module, output_fn: OutputFunction, inputs: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tangent features of one batch with vmap over grad.

    Args:
        model: the network, in eval mode; its buffers are used as they are.
        output_fn: the scalar output function m.
        inputs: `(n, *input_shape)` model inputs.
        targets: `(n,)` targets.

    Returns:
        ``(gradients, outputs, model_outputs)``: `(n, n_params)` float32 flattened gradients in
        ``named_parameters()`` order, `(n,)` output values, `(n, n_outputs)` raw outputs.
    """
    params = _params(model)
    buffers = {name: b.detach() for name, b in model.named_buffers()}

    def m(
        p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        raw = functional_call(model, (p, buffers), (x.unsqueeze(0),)).squeeze(0)
        out = output_fn.output(raw, y)
        return out, (out.detach(), raw.detach())

    grads, (outputs, raw) = vmap(grad(m, has_aux=True), in_dims=(None, 0, 0))(params, inputs, targets)
    flat = torch.cat([grads[name].reshape(inputs.shape[0], -1) for name in params], dim=1)
    return flat, outputs, raw.reshape(inputs.shape[0], -1)


def example_gradient(
    model: nn.Module, output_fn: OutputFunction, x: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tangent feature of ONE example with plain autograd: the service's per-query path.

    For a single example one backward pass is about 4x cheaper than vmap's batching machinery (0.5 ms
    versus 2.2 ms for the demo MLP, measured); the result equals :func:`per_example_gradients`.

    Args:
        model: the network, in eval mode.
        output_fn: the output function m.
        x: `(*input_shape)` one input.
        target: `()` its target.

    Returns:
        ``(gradient, output, model_output)``: `(n_params,)` float32 flattened in ``named_parameters()``
        order, `()` output value, `(n_outputs,)` raw outputs.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    raw = model(x.unsqueeze(0)).reshape(-1)
    out = output_fn.output(raw, target)
    grads = torch.autograd.grad(out, params)
    return torch.cat([g.reshape(-1) for g in grads]), out.detach(), raw.detach()


def tangent_features(
    model: nn.Module,
    output_fn: OutputFunction,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    projection: RandomProjection,
    batch_size: int = 128,
    buffer_bytes: int = 256 * 2**20,
    progress: str | None = None,
    cache: BufferCache | None = None,
) -> Features:
    """Projected tangent features phi = R^T d m / d theta of every example (DESIGN.md 1.1).

    Args:
        model: the network with the trained weights theta*; switched to eval mode.
        output_fn: the output function m.
        inputs: `(n, *input_shape)` inputs, on the model's device.
        targets: `(n,)` targets to evaluate m at.
        projection: the seeded projection; its ``n_params`` must equal the model's parameter count.
        batch_size: examples per vmap call.
        buffer_bytes: gradients are gathered up to this many bytes before each pass over R's blocks.
        progress: a tqdm description, or None for no progress bar.
        cache: where finished buffers are kept: buffers it already holds are taken from it, every
            buffer computed is saved to it (see :func:`buffer_rows` for the layout). None: no cache.

    Returns:
        :class:`Features` with `(n, k)` float32 ``phi``.

    Raises:
        ValueError: ``inputs`` and ``targets`` disagree in length, or ``projection`` was made for a
            different parameter count.
    """
    n_params = count_parameters(model)
    if projection.n_params != n_params:
        raise ValueError(f"projection is for {projection.n_params} parameters; the model has {n_params}")
    if len(inputs) != len(targets):
        raise ValueError(f"inputs ({len(inputs)}) and targets ({len(targets)}) must have the same length")
    model.eval()
    n = len(inputs)
    rows_per_buffer = buffer_rows(n_params, batch_size, buffer_bytes)
    phi = np.zeros((n, projection.k), dtype=np.float32)
    outputs = np.zeros(n, dtype=np.float64)
    raw_chunks: list[np.ndarray] = []
    with tqdm(total=n, desc=progress, unit="ex", disable=progress is None, leave=False) as bar:
        for buffer, start in enumerate(range(0, n, rows_per_buffer)):
            stop = min(start + rows_per_buffer, n)
            done = cache.load(buffer, stop - start) if cache is not None else None
            if done is None:
                done = _featurize_buffer(
                    model, output_fn, inputs[start:stop], targets[start:stop], projection, batch_size, bar
                )
                if cache is not None:
                    cache.save(buffer, done)
            else:
                bar.update(stop - start)
            phi[start:stop] = done.phi
            outputs[start:stop] = done.outputs
            raw_chunks.append(done.model_outputs)
    raw_all = np.concatenate(raw_chunks) if raw_chunks else np.zeros((0, 0), dtype=np.float32)
    return Features(phi=phi, outputs=outputs, model_outputs=raw_all, targets=targets.cpu().numpy())


def _featurize_buffer(
    model: nn.Module,
    output_fn: OutputFunction,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    projection: RandomProjection,
    batch_size: int,
    bar: tqdm,
) -> BufferFeatures:
    grads, outputs, raw = [], [], []
    for b in range(0, len(inputs), batch_size):
        g, out, r = per_example_gradients(
            model, output_fn, inputs[b : b + batch_size], targets[b : b + batch_size]
        )
        grads.append(g.float().cpu().numpy())
        outputs.append(out.double().cpu().numpy())
        raw.append(r.float().cpu().numpy())
        bar.update(len(g))
    return BufferFeatures(
        phi=projection.project(np.concatenate(grads)),
        outputs=np.concatenate(outputs),
        model_outputs=np.concatenate(raw),
    )
