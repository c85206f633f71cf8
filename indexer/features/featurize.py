"""Per-example projected tangent features phi = R^T d m(x, y; theta) / d theta (DESIGN.md 1.1, 1.7).

Two featurizers share one interface (:class:`Featurizer`):

- :class:`DenseFeaturizer`: ``vmap`` over ``grad`` gives the whole per-example gradients of a batch,
  flattened in ``model.named_parameters()`` order; a buffer of them is projected by a
  :class:`~indexer.features.projection.DenseProjection` at once (memory: one `(buffer_rows, n_params)`
  buffer). The reference, for small models.
- :class:`~indexer.features.hooks.HookFeaturizer`: the per-layer Kronecker projection from hooks, one forward
  and one backward pass per batch, no per-example gradient ever formed. The default.

:func:`~indexer.features.stream.tangent_features` runs either over a dataset in buffers of consecutive
examples (:mod:`indexer.features.stream`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from indexer.data import Batch
from indexer.features.projection import DenseProjection
from indexer.features.tasks import OutputFunction

__all__ = [
    "BufferFeatures",
    "DenseFeaturizer",
    "Featurizer",
    "Features",
    "buffer_rows",
    "count_parameters",
    "example_gradient",
    "host_array",
    "model_outputs",
    "select_logits",
    "per_example_gradients",
    "to_device",
]


@dataclass(frozen=True)
class Features:
    """Projected tangent features of a set of examples, and what was read of them on the way.

    Attributes:
        phi: `(n, k)` float32 projected tangent features.
        outputs: `(n,)` float64 output-function values m_i at theta*.
        model_outputs: `(n, n_summary)` float32 :meth:`OutputFunction.summarize` of the raw model outputs
            (the logits themselves for classification and regression).
        targets: `(n, ...)` the targets the output function was evaluated at (`(n, T)` token ids for a
            language model).
        beta: `(n,)` float64 likelihood weights beta_i (DESIGN.md 1.1, 1.8), from the same forward pass.
        grad_term: `(n,)` float64 beta_i r_i (DESIGN.md 1.3, 1.8).
        metadata: n dicts from the source (empty when it has none).
        inputs: `(n, *input_shape)` the inputs, when they were kept (for rendering); else None.
        input_shape: the shape of one input (the first tensor of a mapping).
        input_dtype: its torch dtype name.
        input_dtypes: for a mapping input (keyword arguments), each keyword's torch dtype name, in the
            mapping's order; None for a single tensor.
    """

    phi: np.ndarray
    outputs: np.ndarray
    model_outputs: np.ndarray
    targets: np.ndarray
    beta: np.ndarray
    grad_term: np.ndarray
    metadata: list[dict[str, Any]] = field(default_factory=list)
    inputs: np.ndarray | None = None
    input_shape: tuple[int, ...] = ()
    input_dtype: str = "float32"
    input_dtypes: dict[str, str] | None = None


@dataclass(frozen=True)
class BufferFeatures:
    """What a featurizer computes for one buffer (or batch) of consecutive examples.

    Attributes:
        phi: `(rows, k)` float32 projected tangent features.
        outputs: `(rows,)` float64 output-function values.
        model_outputs: `(rows, n_summary)` float32 summaries of the raw model outputs (see
            :class:`Features`).
        beta: `(rows,)` float64 likelihood weights beta_i
            (:meth:`~indexer.features.tasks.OutputFunction.likelihood_terms`).
        grad_term: `(rows,)` float64 beta_i r_i.
    """

    phi: np.ndarray
    outputs: np.ndarray
    model_outputs: np.ndarray
    beta: np.ndarray
    grad_term: np.ndarray

    @staticmethod
    def concatenate(parts: Sequence[BufferFeatures]) -> BufferFeatures:
        """The parts one after the other (rows in order)."""
        return BufferFeatures(
            phi=np.concatenate([p.phi for p in parts]),
            outputs=np.concatenate([p.outputs for p in parts]),
            model_outputs=np.concatenate([p.model_outputs for p in parts]),
            beta=np.concatenate([p.beta for p in parts]),
            grad_term=np.concatenate([p.grad_term for p in parts]),
        )


class Featurizer(Protocol):
    """Turns batches into projected tangent features (:class:`DenseFeaturizer`, ``HookFeaturizer``)."""

    k: int
    """Projected dimension."""

    def buffer_rows(self, batch_size: int, buffer_bytes: int) -> int:
        """Examples per buffer (a multiple of ``batch_size``) for a memory budget of ``buffer_bytes``."""
        ...

    def featurize_buffer(self, output_fn: OutputFunction, batches: Sequence[Batch]) -> BufferFeatures:
        """Features of consecutive batches, in order."""
        ...


def to_device(inputs: Any, device: torch.device) -> Any:
    """A batch input (tensor, or a mapping of tensors) on ``device``."""
    if isinstance(inputs, dict):
        return {key: value.to(device) for key, value in inputs.items()}
    return inputs.to(device)


def model_outputs(model: nn.Module, inputs: Any) -> torch.Tensor:
    """Call the model on a batch: a tensor positionally, a mapping as keyword arguments. A result with a
    ``logits`` attribute or key (transformers, or a dict) gives its logits; a tuple or list its first element.

    Returns:
        `(B, ...)` the model's raw output.

    Raises:
        ValueError: the model returns something else (the message says what was expected).
    """
    return select_logits(model(**inputs) if isinstance(inputs, dict) else model(inputs))


def select_logits(out: Any) -> torch.Tensor:
    """The output tensor of what a model returns (see :func:`model_outputs`).

    Raises:
        ValueError: no tensor of outputs in it.
    """
    if isinstance(out, dict) and "logits" in out:
        out = out["logits"]
    elif hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, tuple | list) and out:
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise ValueError(
            f"the model returns a {type(out).__name__}; expected a tensor of outputs, a tuple whose first "
            "element is one, or a result with logits"
        )
    return out


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


def per_example_gradients(
    model: nn.Module,
    output_fn: OutputFunction,
    inputs: Any,
    targets: torch.Tensor,
    names: Sequence[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Whole per-example gradients of one batch with vmap over grad.

    Args:
        model: the network, in eval mode; its buffers are used as they are.
        output_fn: the scalar output function m.
        inputs: `(n, *input_shape)` model inputs, or a mapping of such tensors (keyword arguments).
        targets: `(n, ...)` targets.
        names: differentiate with respect to these trainable parameters only (default: all of them).

    Returns:
        ``(gradients, outputs, model_outputs)``: `(n, n_params)` float32 flattened gradients in
        ``named_parameters()`` order, `(n,)` output values, `(n, n_outputs)` raw outputs.
    """
    trainable = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    chosen = list(trainable) if names is None else list(names)
    params = {name: trainable[name] for name in chosen}
    fixed = {name: p for name, p in trainable.items() if name not in params}
    fixed |= {name: b.detach() for name, b in model.named_buffers()}

    def m(
        p: dict[str, torch.Tensor], x: Any, y: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        one = {key: v.unsqueeze(0) for key, v in x.items()} if isinstance(x, dict) else x.unsqueeze(0)
        out_raw = functional_call(model, (p, fixed), kwargs=one) if isinstance(one, dict) else None
        if out_raw is None:
            out_raw = functional_call(model, (p, fixed), (one,))
        raw = select_logits(out_raw).reshape(-1)
        out = output_fn.output(raw, y)
        return out, (out.detach(), raw.detach())

    grads, (outputs, raw) = vmap(grad(m, has_aux=True), in_dims=(None, 0, 0))(params, inputs, targets)
    n = int(targets.shape[0])
    flat = torch.cat([grads[name].reshape(n, -1) for name in params], dim=1)
    return flat, outputs, raw.reshape(n, -1)


class DenseFeaturizer:
    """Whole per-example gradients (vmap over grad) projected by a dense matrix: the reference featurizer.

    Args:
        model: the network, in eval mode.
        projection: a :class:`~indexer.features.projection.DenseProjection` for the model's parameter count.

    Raises:
        ValueError: the projection is for another parameter count.
    """

    def __init__(self, model: nn.Module, projection: DenseProjection) -> None:
        n_params = count_parameters(model)
        if projection.n_params != n_params:
            raise ValueError(f"projection is for {projection.n_params} parameters; the model has {n_params}")
        self.model = model
        self.projection = projection
        self.k = projection.k
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))

    def buffer_rows(self, batch_size: int, buffer_bytes: int) -> int:
        """The most whole batches whose float32 gradients fit in ``buffer_bytes`` (at least one)."""
        return buffer_rows(self.projection.n_params, batch_size, buffer_bytes)

    def featurize_buffer(self, output_fn: OutputFunction, batches: Sequence[Batch]) -> BufferFeatures:
        """The buffer's gradients, gathered batch by batch, then projected in one pass over R's blocks."""
        grads, outputs, raw, beta, grad_term = [], [], [], [], []
        for batch in batches:
            inputs, targets = to_device(batch.inputs, self.device), batch.targets.to(self.device)
            g, out, r = per_example_gradients(self.model, output_fn, inputs, targets)
            terms = output_fn.likelihood_terms(r, targets, out)
            grads.append(g.float().cpu().numpy())
            outputs.append(out.double().cpu().numpy())
            raw.append(output_fn.summarize(r.detach()).float().cpu().numpy())
            beta.append(terms[0])
            grad_term.append(terms[1])
        return BufferFeatures(
            phi=self.projection.project(np.concatenate(grads)),
            outputs=np.concatenate(outputs),
            model_outputs=np.concatenate(raw),
            beta=np.concatenate(beta),
            grad_term=np.concatenate(grad_term),
        )


def _upcast(tensor: torch.Tensor) -> torch.Tensor:
    """float16 and bfloat16 as float32 (numpy cannot take bfloat16); other dtypes unchanged."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def example_gradient(
    model: nn.Module,
    output_fn: OutputFunction,
    x: torch.Tensor | Mapping[str, torch.Tensor],
    target: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tangent feature of ONE example with plain autograd: the service's per-query path.

    For a single example one backward pass is about 4x cheaper than vmap's batching machinery (0.5 ms
    versus 2.2 ms for the demo MLP, measured); the result equals :func:`per_example_gradients`.

    Args:
        model: the network, in eval mode.
        output_fn: the output function m.
        x: `(*input_shape)` one input, or a mapping of keyword tensors of one example.
        target: `()` its target (`(T,)` for a language model).

    Returns:
        ``(gradient, output, model_output)``: `(n_params,)` flattened in ``named_parameters()`` order (the
        model's dtype; float16 and bfloat16 as float32), `()` output value, `(n_outputs,)` raw outputs.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    batched = (
        {key: value.unsqueeze(0) for key, value in x.items()} if isinstance(x, Mapping) else x.unsqueeze(0)
    )
    raw = model_outputs(model, batched).reshape(-1)
    out = output_fn.output(raw, target)
    grads = torch.autograd.grad(out, params)
    return torch.cat([_upcast(g.reshape(-1)) for g in grads]), out.detach(), raw.detach()


def host_array(tensor: torch.Tensor) -> np.ndarray:
    """A tensor as a numpy array on the host, for the index files.

    numpy has no bfloat16, so a bfloat16 tensor becomes float32 (exact: every bfloat16 is a float32); the
    manifest's ``input_dtype`` keeps the original, and the service casts raw queries to it.

    Args:
        tensor: any shape and dtype, on any device.

    Returns:
        The same values, same shape; dtype the tensor's, float32 for bfloat16.
    """
    tensor = tensor.detach().cpu()
    return (tensor.float() if tensor.dtype is torch.bfloat16 else tensor).numpy()
