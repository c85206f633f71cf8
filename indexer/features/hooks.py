"""Per-layer capture for the Kronecker projection (DESIGN.md 1.7): featurize a batch with one forward and one
backward pass (the plan of blocks is made by :mod:`indexer.features.plan`).

For a weight matrix used at positions t (tokens, spatial locations, or one position for a plain vector),
the per-example gradient of the output m is ``G = sum_t u_t v_t^T`` in the weight's own `(rows, cols)`
coordinates (a Linear: ``u_t = delta_t``, the gradient of m at the layer's output, and ``v_t = [a_t, 1]``,
its input with a 1 for the bias). Its block of the features is

    ``R_row^T G R_col = sum_t (R_row^T u_t) (R_col^T v_t)^T``,

so a forward hook keeps the projected input side and the backward pass gives the projected output side; G
is never formed and no `(batch, P)` tensor exists. A small layer's whole block (identity sides) forms its
own G per example, `(batch, rows x cols)` with rows x cols bounded by the plan, and projects it with a
count sketch (one scatter-add). The output-side gradients come from ``torch.autograd.grad`` with respect
to each layer's output (no parameter gradient is computed); an output that a later in-place operation
overwrites (``ReLU(inplace=True)``) is detected by its version counter, and that layer's gradient is then
read at a zero tensor added to its output instead (the batch featurized again).

Supported layers: ``nn.Linear``, ``nn.Conv1d/2d/3d`` (any stride, padding, dilation and padding mode;
groups = 1), ``nn.Embedding`` (the padding index contributes nothing) and transformers' ``Conv1D``
(recognised by name; transformers is never imported here). A weight shared by several layers (tied
embeddings) is one block whose contributions add up, as its gradient does. Everything else (norm scales,
free tensors, grouped convolutions, a layer whose forward is bypassed) is the rest block: its own small
per-example gradients dense-projected, or left out (:class:`~indexer.enums.Uncovered`).

Per example exact only when each m_i depends on its own input alone: the model must be in eval mode and
batch-first (dimension 0 of every layer input is the example). A layer called once on an input of batch size
1 that the whole batch shares (GPT-2's position embedding of ``position_ids`` `(1, T)`) has its input and
output expanded to the batch, which leaves the forward unchanged wherever its output is broadcast.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from indexer.data import Batch
from indexer.enums import BlockProjection, Distribution
from indexer.features.featurize import BufferFeatures, model_outputs, per_example_gradients, to_device
from indexer.features.projection import DenseProjection, KroneckerProjection, LayerBlock
from indexer.features.tasks import OutputFunction

__all__ = ["layer_kind", "layer_bias", "gradient_shape", "model_device", "HookFeaturizer"]


def layer_kind(module: nn.Module) -> str | None:
    """The supported layer kind of ``module`` (see :class:`~indexer.features.LayerBlock`), or None."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d) and module.groups == 1:
        return f"conv{module.weight.dim() - 2}d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers"):
        return "gpt2_conv1d"
    return None


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def layer_bias(module: nn.Module) -> nn.Parameter | None:
    """The layer's trainable bias, or None."""
    bias = getattr(module, "bias", None)
    return bias if isinstance(bias, nn.Parameter) and bias.requires_grad else None


def gradient_shape(kind: str, module: Any, has_bias: bool) -> tuple[int, int]:
    """`(rows, cols)` of the layer's gradient matrix G, the bias one more input-side row or column."""
    weight = module.weight
    if kind == "embedding":
        return int(weight.shape[0]), int(weight.shape[1])
    if kind == "gpt2_conv1d":  # weight (d_in, d_out): inputs on the rows
        return int(weight.shape[0]) + int(has_bias), int(weight.shape[1])
    return int(weight.shape[0]), int(np.prod(weight.shape[1:])) + int(has_bias)


class _WholeR:
    """A whole block's R on the featurizing device (:class:`~indexer.features.projection.LayerBlock`): a
    count sketch's columns and signs (the default), or a dense R held transposed, R^T `(k, rows x cols)`, so
    that a single query is one matrix-vector product reading its rows in order."""

    def __init__(
        self, block: LayerBlock, seed: int, distribution: Distribution, device: torch.device
    ) -> None:
        self.k = block.k
        self.r_t: torch.Tensor | None = None
        if block.projection is BlockProjection.COUNT_SKETCH:
            columns, signs = block.count_sketch(seed)
            self.columns = torch.from_numpy(columns).to(device)
            self.signs = torch.from_numpy(signs).to(device)
        else:
            r = block.whole_matrix(seed, distribution)
            self.r_t = torch.from_numpy(np.ascontiguousarray(r.T)).to(device)

    def project(self, g: torch.Tensor) -> torch.Tensor:
        """`(B, k)` = vec(G) R for `(B, rows x cols)` float32 gradients: a count sketch as one scatter-add
        (one add per entry), a dense R as one product (a batch of one: one matrix-vector product)."""
        if self.r_t is None:
            out = torch.zeros(g.shape[0], self.k, dtype=g.dtype, device=g.device)
            return out.index_add_(1, self.columns, g * self.signs)
        if g.shape[0] == 1:
            return torch.mv(self.r_t, g[0])[None]
        return g @ self.r_t.T


class _InPlace(Exception):
    """A captured layer output was modified in place after its hook ran: featurize the batch again with
    that layer's gradient read at a zero tensor added to its output."""


def _gradient_point(
    owner: _Binding | _NormTap, output: torch.Tensor, shared: bool = False
) -> tuple[torch.Tensor | None, int | None, torch.Tensor | None]:
    """Where the backward reads ``d m / d output`` for one hooked call: ``(point, version, returned)``.

    The output itself (``returned`` None: the forward goes on unchanged), with its version counter, which
    :meth:`HookFeaturizer._featurize` checks after the forward: an in-place operation on it later (a
    ``ReLU(inplace=True)``) would make its gradient the one after that operation. An owner found so (its
    ``direct`` set to False) or a ``shared`` output (expanded to the batch) gets a zero tensor added to its
    output instead (``version`` None), which costs one fill and one add of the output's size. A call whose
    output has no gradient (under ``torch.no_grad``) gives no point (None): it contributes nothing.
    """
    if not (torch.is_grad_enabled() and output.requires_grad):  # e.g. a call under no_grad: no gradient
        return None, None, None
    if owner.direct and not shared:
        return output, output._version, None
    eps = torch.zeros_like(output, requires_grad=True)
    return eps, None, output + eps


class _Binding:
    """One hooked module: its block, kind, and where its forward keeps the projected input side."""

    def __init__(self, featurizer: HookFeaturizer, block_index: int, kind: str, module: nn.Module) -> None:
        self.featurizer = featurizer
        self.block_index = block_index
        self.kind = kind
        self.module = module
        self.has_bias = layer_bias(module) is not None
        self.whole = featurizer.plan.blocks[block_index].whole
        self.direct = True  # d m / d output read at the output itself (see _gradient_point)
        self._identity: torch.Tensor | None = None  # a whole 3-D convolution's kernels (_identity_kernels)

    def __call__(self, module: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        f = self.featurizer.state  # this thread's batch, if it is featurizing one
        if not getattr(f, "capturing", False):
            return None
        r_row, r_col = self.featurizer.matrices[self.block_index]
        x = args[0]
        shared = x.shape[0] == 1 and output.shape[0] == 1 and f.batch_size > 1
        if shared:
            # one input shared by the whole batch (GPT-2's position ids, (1, T)), its output broadcast
            # downstream: expanded to the batch, so that each example's gradient reaches its own row
            x = x.expand(f.batch_size, *x.shape[1:])
            output = output.expand(f.batch_size, *output.shape[1:])
        if x.shape[0] != f.batch_size:
            raise ValueError(
                f"layer {type(module).__name__} receives inputs of shape {list(x.shape)} whose first "
                f"dimension is not the batch ({f.batch_size}): per-example features need batch-first layers"
            )
        if self.kind == "embedding":
            ids = x.reshape(f.batch_size, -1)
            # (B, T, k_row): a row lookup; a whole block's identity rows are the one-hot ids
            side = F.one_hot(ids, int(module.num_embeddings)).float() if self.whole else r_row[ids]
            pad = module.padding_idx
            if pad is not None:
                side = side * (x.reshape(f.batch_size, -1, 1) != pad)
        elif self.kind.startswith("conv"):
            side = self._conv_side(module, x.float(), r_col)
        else:
            flat = x.reshape(f.batch_size, -1, x.shape[-1]).float()
            if self.whole:  # identity sides: the input itself (the bias: gradient()), no identity product
                side = flat
            else:
                r_in = r_row if self.kind == "gpt2_conv1d" else r_col
                side = flat @ r_in[: x.shape[-1]]
                if self.has_bias:
                    side = side + r_in[-1]
        point, version, returned = _gradient_point(self, output, shared)
        f.calls.append((self, side, point, version))
        return returned

    def _conv_side(self, module: Any, x: torch.Tensor, r_col: torch.Tensor) -> torch.Tensor:
        """`(B, L, k_col)`: each output location's patch projected by R_col, as one convolution with R_col's
        columns as kernels (the patch is never unfolded); for a whole block `(B, L, patch)`, the patches
        themselves, unfolded (1-D and 2-D; a 3-D one by a convolution with identity kernels), without the
        bias's 1 (:meth:`gradient` adds the bias's row or column)."""
        weight = module.weight
        padding = module.padding
        if module.padding_mode != "zeros" or isinstance(padding, str):  # "same"/"valid": padded here
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
            padding = (0,) * (x.dim() - 2)
        if self.whole and x.dim() in (3, 4):  # unfold: a copy, where the identity kernels cost patch^2
            lead = () if x.dim() == 4 else (1,)  # a 1-D convolution as a 2-D one on (1, length)
            patches = F.unfold(
                x if x.dim() == 4 else x[:, :, None],
                (*lead, *weight.shape[2:]),
                dilation=(*lead, *module.dilation),
                padding=(*(0,) * len(lead), *padding),
                stride=(*lead, *module.stride),
            )
            return patches.transpose(1, 2)  # the bias's 1: in gradient()
        conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[x.dim()]
        if self.whole:  # a 3-D patch (torch has no 3-D unfold): identity kernels give the patch itself
            kernels = self._identity_kernels(weight)
        else:
            patch = int(np.prod(weight.shape[1:]))
            kernels = r_col[:patch].T.reshape(r_col.shape[1], *weight.shape[1:])
        out = conv(x, kernels, None, module.stride, padding, module.dilation)
        side = out.reshape(out.shape[0], out.shape[1], -1).transpose(1, 2)
        return side + r_col[-1] if self.has_bias and not self.whole else side

    def _identity_kernels(self, weight: torch.Tensor) -> torch.Tensor:
        """`(patch, C_in, *kernel)` float32: one kernel per entry of the patch, made once per binding."""
        if self._identity is None:
            patch = int(np.prod(weight.shape[1:]))
            eye = torch.eye(patch, device=weight.device)
            self._identity = eye.reshape(patch, *weight.shape[1:])
        return self._identity

    def out_side(self, grad: torch.Tensor) -> torch.Tensor:
        """`(B, T, k)`: the gradient at the layer's output projected by the block's output-side matrix."""
        r_row, r_col = self.featurizer.matrices[self.block_index]
        b = grad.shape[0]
        if self.kind.startswith("conv"):
            per_location = grad.reshape(b, grad.shape[1], -1).float()
            if self.whole:  # the identity side: the gradient itself, (B, L, C_out) as a view
                return per_location.transpose(1, 2)
            return torch.einsum("bol,ok->blk", per_location, r_row)
        r_out = r_col if self.kind in ("embedding", "gpt2_conv1d") else r_row
        flat = grad.reshape(b, -1, grad.shape[-1]).float()
        return flat if self.whole else flat @ r_out

    def gradient(self, side: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`(B, k_row, k_col)`: the block's part of one call, ``sum_t`` of the outer products of the two
        projected sides `(B, T, .)`; for a whole block `(B, rows, cols)`, G itself (identity sides), its bias
        row or column ``sum_t`` of the output side, here rather than a 1 appended to every input position."""
        if self.input_on_rows:
            part = torch.einsum("btr,btc->brc", side, out)
            return torch.cat([part, out.sum(1)[:, None]], 1) if self.whole and self.has_bias else part
        part = torch.einsum("btr,btc->brc", out, side)
        return torch.cat([part, out.sum(1)[:, :, None]], 2) if self.whole and self.has_bias else part

    @property
    def input_on_rows(self) -> bool:
        """Whether the input side is the rows of G (embedding, gpt2_conv1d) rather than its columns."""
        return self.kind in ("embedding", "gpt2_conv1d")


class _NormTap:
    """A batch norm (running statistics) or layer norm in the rest block: the per-example gradients of its
    scale and shift from hooks, ``sum_t delta_t * xhat_t`` and ``sum_t delta_t`` (no vmap pass)."""

    def __init__(self, featurizer: HookFeaturizer, module: Any, weight: str | None, bias: str | None) -> None:
        self.featurizer = featurizer
        self.weight = weight
        self.bias = bias
        self.layer = isinstance(module, nn.LayerNorm)
        self.n_params = int(np.prod(module.normalized_shape)) if self.layer else 0
        self.direct = True  # d m / d output read at the output itself (see _gradient_point)

    def __call__(self, module: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        state = self.featurizer.state
        if not getattr(state, "capturing", False):
            return None
        x = args[0].float()
        if self.layer:
            dims = tuple(range(x.dim() - len(module.normalized_shape), x.dim()))
            mean, var = x.mean(dims, keepdim=True), x.var(dims, unbiased=False, keepdim=True)
            xhat = (x - mean) / torch.sqrt(var + module.eps)
        else:  # running statistics (x - mean first: x / sigma - mean / sigma cancels when |mean| >> sigma)
            shape = (1, -1) + (1,) * (x.dim() - 2)
            mean, var = module.running_mean.float().reshape(shape), module.running_var.float().reshape(shape)
            xhat = (x - mean).mul_(torch.rsqrt(var + module.eps))
        point, version, returned = _gradient_point(self, output)
        state.norm_calls.append((self, xhat.detach(), point, version))
        return returned

    def grads(self, xhat: torch.Tensor, delta: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
        """Add this call's per-example `(B, numel)` gradients of the scale and shift to ``out``."""
        b, delta = delta.shape[0], delta.float()
        if self.layer:  # the parameters span the trailing dims: sum over every other position
            w = (delta * xhat).reshape(b, -1, self.n_params).sum(1)
            bias = delta.reshape(b, -1, self.n_params).sum(1)
        else:  # one parameter per channel (dim 1); sum_t delta_t xhat_t without a (B, C, L) product
            c = delta.shape[1]
            flat = delta.reshape(b, c, -1)
            w, bias = torch.einsum("bcl,bcl->bc", flat, xhat.reshape(b, c, -1)), flat.sum(2)
        for grad, name in ((w, self.weight), (bias, self.bias)):
            if name is not None:
                out[name] = out[name] + grad if name in out else grad


class HookFeaturizer:
    """Featurizes batches with a :class:`~indexer.features.projection.KroneckerProjection` (DESIGN.md 1.7).

    Hooks are registered on the model for the featurizer's lifetime: call :meth:`close` (or use it as a
    context manager) to remove them. Thread-safe: each thread's batch is captured in its own state; a plan
    whose rest block needs a vmap pass (parameters other than norms) featurizes one batch at a time.

    Args:
        model: the network, in eval mode, batch-first.
        plan: the projection; its blocks must name weights of supported layers of ``model``.
        device: where the matrices live (default: the model's device).

    Raises:
        ValueError: a block that names no supported layer's weight of this model, or a rest parameter the
            model does not have.
    """

    def __init__(
        self, model: nn.Module, plan: KroneckerProjection, device: torch.device | None = None
    ) -> None:
        self.model = model
        self.plan = plan
        self.k = plan.k
        self.device = device or model_device(model)
        # per thread: several threads may featurize through the same hooks at once (the service's pool)
        self.state = threading.local()
        params = dict(model.named_parameters())
        index = {block.name: i for i, block in enumerate(plan.blocks)}
        # a whole block's sides are identities, never multiplied: empty placeholders stand for them
        none = torch.empty(0, 0, device=self.device)
        self.matrices = [
            (none, none)
            if block.whole
            else tuple(
                torch.from_numpy(m).to(self.device) for m in block.matrices(plan.seed, plan.distribution)
            )
            for block in plan.blocks
        ]
        # a whole block's sides are identities, so its part of a batch is G itself, then projected by R
        self.whole_r = [
            _WholeR(block, plan.seed, plan.distribution, self.device) if block.whole else None
            for block in plan.blocks
        ]
        self._handles = []
        bound: set[str] = set()
        for module in model.modules():
            kind = layer_kind(module)
            weight = getattr(module, "weight", None)
            name = next((n for n, p in params.items() if p is weight), None) if kind else None
            if kind is None or name is None or name not in index:
                continue
            block = plan.blocks[index[name]]
            # a tied weight may be used by layers of another kind (an embedding and its output head)
            if (block.rows, block.cols) != gradient_shape(kind, module, layer_bias(module) is not None):
                raise ValueError(
                    f"block {name!r} is for a gradient of shape ({block.rows}, {block.cols}); the model's "
                    f"{kind} layer has another"
                )
            self._handles.append(module.register_forward_hook(_Binding(self, index[name], kind, module)))
            bound.add(name)
        missing = sorted(set(index) - bound)
        if missing:
            raise ValueError(
                f"the projection has blocks for {missing}, which are not supported layers of the model"
            )
        unknown = [n for n in plan.rest.params if n not in params]
        if unknown:
            raise ValueError(f"the projection's rest block names parameters the model lacks: {unknown[:5]}")
        self._rest = (
            DenseProjection(plan.rest.n_params, plan.rest.k, plan.seed, plan.distribution)
            if plan.rest.k
            else None
        )
        self._norm_params: set[str] = set()
        if self._rest is not None:
            self._tap_norms(params)
        self._needs_vmap = bool(set(plan.rest.params) - self._norm_params) and self._rest is not None
        self._vmap_lock = threading.Lock()

    def _tap_norms(self, params: dict[str, nn.Parameter]) -> None:
        """Hooks on the rest block's batch norms (with running statistics) and layer norms, so that their
        scales' and shifts' per-example gradients need no vmap pass."""
        rest = set(self.plan.rest.params)
        name_of = {id(p): n for n, p in params.items()}
        for module in self.model.modules():
            batch_norm = (
                isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None
            )
            layer_norm = isinstance(module, nn.LayerNorm)
            if not (batch_norm or layer_norm):
                continue
            names = [name_of.get(id(getattr(module, attr, None))) for attr in ("weight", "bias")]
            if not any(n in rest for n in names):
                continue
            weight, bias = (n if n in rest else None for n in names)
            self._handles.append(module.register_forward_hook(_NormTap(self, module, weight, bias)))
            self._norm_params |= {n for n in (weight, bias) if n is not None}

    def close(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> HookFeaturizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def buffer_rows(self, batch_size: int, buffer_bytes: int) -> int:
        """The most whole batches whose float32 features fit in ``buffer_bytes`` (at least one): the buffer
        only sets how much work a resumed build can lose, not the featurization's memory."""
        return max(batch_size, (buffer_bytes // (4 * max(self.k, 1))) // batch_size * batch_size)

    def featurize_buffer(self, output_fn: OutputFunction, batches: Sequence[Batch]) -> BufferFeatures:
        """Each batch featurized on its own, concatenated in order."""
        return BufferFeatures.concatenate([self.featurize(output_fn, b.inputs, b.targets) for b in batches])

    def featurize(self, output_fn: OutputFunction, inputs: Any, targets: torch.Tensor) -> BufferFeatures:
        """Projected tangent features of one batch: one forward, one backward (DESIGN.md 1.7).

        Args:
            output_fn: the output function m.
            inputs: the model's batch input, `(B, ...)` tensor or a mapping of them (on the model's device).
            targets: `(B, ...)` targets.

        Returns:
            :class:`~indexer.features.featurize.BufferFeatures` with `(B, k)` float32 ``phi``.

        Raises:
            ValueError: the model is in train mode, a layer is not batch-first, or a block's layer did not
                run (its forward is bypassed).
        """
        while True:  # again only after a captured output was found modified in place (at most once per layer)
            try:
                if self._needs_vmap:  # functional_call swaps the shared module's parameters: one at a time
                    with self._vmap_lock:
                        return self._featurize(output_fn, inputs, targets)
                return self._featurize(output_fn, inputs, targets)
            except _InPlace:
                continue

    def _featurize(self, output_fn: OutputFunction, inputs: Any, targets: torch.Tensor) -> BufferFeatures:
        training = [name for name, m in self.model.named_modules() if m.training]
        if training:
            raise ValueError(
                f"the model is in train mode ({training[0] or 'the root module'}): dropout is random and "
                "batch norm mixes the examples of a batch, so per-example features would be wrong; call "
                "model.eval()"
            )
        b = int(targets.shape[0])
        inputs, targets = to_device(inputs, self.device), targets.to(self.device)
        state = self.state
        state.batch_size, state.calls, state.norm_calls, state.capturing = b, [], [], True
        norm_grads: dict[str, torch.Tensor] = {}
        try:
            raw = model_outputs(self.model, inputs)
            flat = raw.reshape(b, -1)
            m = torch.func.vmap(output_fn.output)(flat, targets)
            captured = state.calls + state.norm_calls
            moved = [
                o
                for o, _, point, v in captured
                if point is not None and v is not None and point._version != v
            ]
            if moved:  # modified in place after the hook: read their gradient at an added zero instead
                for owner in moved:
                    owner.direct = False
                raise _InPlace
            live = [i for i, (_, _, point, _) in enumerate(captured) if point is not None]
            found = (
                torch.autograd.grad(m.sum(), [captured[i][2] for i in live], allow_unused=True)
                if live
                else ()
            )
            all_grads: list[torch.Tensor | None] = [None] * len(captured)
            for i, got in zip(live, found, strict=True):
                all_grads[i] = got
            grads, norm_deltas = all_grads[: len(state.calls)], all_grads[len(state.calls) :]
            for (tap, xhat, _, _), delta in zip(state.norm_calls, norm_deltas, strict=True):
                if delta is not None:
                    tap.grads(xhat, delta, norm_grads)
            blocks: list[torch.Tensor | None] = [None] * len(self.plan.blocks)
            for (binding, side, _, _), grad in zip(state.calls, grads, strict=True):
                if grad is None:
                    continue
                part = binding.gradient(side, binding.out_side(grad))
                i = binding.block_index
                previous = blocks[i]
                blocks[i] = part if previous is None else previous + part
            ran = {binding.block_index for binding, _, _, _ in state.calls}
            silent = [block.name for i, block in enumerate(self.plan.blocks) if i not in ran]
            if silent:
                raise ValueError(
                    f"the layer of block {silent[0]!r} did not run: its forward is bypassed (e.g. "
                    "MultiheadAttention uses out_proj.weight directly); make the plan with a probe "
                    "(fired_modules) so that its parameters go to the rest block"
                )
        finally:
            state.capturing, state.calls, state.norm_calls = False, [], []
        pieces = [
            (
                torch.zeros(b, block.k, device=self.device)
                if blk is None
                else blk.reshape(b, -1)
                if whole_r is None
                else whole_r.project(blk.reshape(b, -1))
            )
            for blk, block, whole_r in zip(blocks, self.plan.blocks, self.whole_r, strict=True)
        ]
        phi = torch.cat(pieces, dim=1).detach().cpu().numpy() if pieces else np.zeros((b, 0), np.float32)
        if self._rest is not None:
            phi = np.concatenate([phi, self._rest_features(output_fn, inputs, targets, norm_grads)], axis=1)
        beta, grad_term = output_fn.likelihood_terms(flat.detach(), targets, m.detach())
        return BufferFeatures(
            phi=np.ascontiguousarray(phi, dtype=np.float32),
            outputs=m.detach().double().cpu().numpy(),
            model_outputs=output_fn.summarize(flat.detach()).float().cpu().numpy(),
            beta=beta,
            grad_term=grad_term,
        )

    def _rest_features(
        self,
        output_fn: OutputFunction,
        inputs: Any,
        targets: torch.Tensor,
        norm_grads: dict[str, torch.Tensor],
    ) -> np.ndarray:
        """`(B, k_rest)`: the rest block's per-example gradients, dense-projected: the norms' from their
        hooks, any other parameters' from torch.func (those parameters only)."""
        assert self._rest is not None  # only called with a rest block
        b = int(targets.shape[0])
        others = [n for n in self.plan.rest.params if n not in self._norm_params]
        pieces: dict[str, torch.Tensor] = {}
        if others:
            grads, _, _ = per_example_gradients(self.model, output_fn, inputs, targets, names=others)
            offsets = np.cumsum([0] + [self.plan.rest.sizes[self.plan.rest.params.index(n)] for n in others])
            pieces = {n: grads[:, offsets[i] : offsets[i + 1]] for i, n in enumerate(others)}
        rows = []
        for name, size in zip(self.plan.rest.params, self.plan.rest.sizes, strict=True):
            piece = pieces.get(name, norm_grads.get(name))
            rows.append(piece.reshape(b, -1).float() if piece is not None else torch.zeros(b, size))
        return self._rest.project(torch.cat([r.cpu() for r in rows], dim=1).numpy())
