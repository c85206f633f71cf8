"""The plan of a Kronecker projection (DESIGN.md 1.7): which layers get a block and how large, from the model
and a total budget of k features.

Blocks go to every supported layer (:func:`~indexer.features.hooks.layer_kind`) whose module name matches
the configured patterns and whose forward really runs (a probe, :func:`fired_modules`); the sizes are shared
out of k by water-filling; every other trainable parameter is the rest block. The plan is recorded in the
manifest (its coverage record), so the service rebuilds the same projection without a probe.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from indexer.enums import BlockProjection, Distribution, Uncovered, parse_enum
from indexer.features.featurize import model_outputs, to_device
from indexer.features.hooks import HookFeaturizer, gradient_shape, layer_bias, layer_kind, model_device
from indexer.features.projection import KroneckerProjection, LayerBlock, RestBlock
from indexer.features.tasks import OutputFunction

__all__ = ["SMALL_LAYER_PARAMS", "SMALL_LAYER_SIDE", "fired_modules", "plan_kronecker", "mismatched_blocks"]


def fired_modules(model: nn.Module, inputs: Any) -> set[str]:
    """Names of the supported modules whose forward runs when ``model`` is called on ``inputs`` (a probe).

    Args:
        model: the network; inputs: a batch it accepts (tensor or mapping), on its device.

    Returns:
        ``model.named_modules()`` names; a supported module missing here is bypassed by its parent (e.g.
        ``MultiheadAttention`` uses ``out_proj.weight`` directly), so hooks cannot see its gradient.
    """
    fired: set[str] = set()
    handles = [
        module.register_forward_hook(lambda *_, name=name: fired.add(name))
        for name, module in model.named_modules()
        if layer_kind(module) is not None
    ]
    try:
        with torch.no_grad():
            model_outputs(model, to_device(inputs, model_device(model)))
    finally:
        for handle in handles:
            handle.remove()
    return fired


def _factor(share: float, rows: int, cols: int) -> tuple[int, int]:
    """`(k_row, k_col)` within the gradient's shape whose product is close to ``share``: among the sizes
    within 5% of the largest product not above it, the most balanced (a side of 1 or 2 would make the
    block's estimate of inner products noisy)."""
    target = max(1, int(share))
    if rows * cols <= target:
        return rows, cols
    options = [(k_row, min(cols, target // k_row)) for k_row in range(1, min(rows, target) + 1)]
    best = max(r * c for r, c in options)
    near = [(r, c) for r, c in options if r * c >= 0.95 * best]
    return min(near, key=lambda rc: (max(rc) / min(rc), -rc[0] * rc[1], rc[0]))


SMALL_LAYER_PARAMS = 65_536
"""Default largest gradient (rows x cols, bias included) of a layer projected whole (a count sketch of
vec(G)) rather than two-sided (:class:`~indexer.features.projection.LayerBlock`): such a block forms one
`(batch, rows x cols)` float32 gradient per batch (64 MiB at batch 256), and it is what keeps small
networks' LDS at the dense projection's."""

SMALL_LAYER_SIDE = 4096
"""Largest side (rows or cols) of a whole block: a whole embedding's input side is its one-hot ids,
`(batch, T, rows)` float32, and a whole 3-D convolution's identity kernels are `(patch, patch)`."""


def plan_kronecker(
    model: nn.Module,
    k: int,
    seed: int = 0,
    distribution: Distribution | str = Distribution.GAUSSIAN,
    layers: Sequence[str] = ("*",),
    dims: dict[str, tuple[int, int]] | None = None,
    uncovered: Uncovered | str = Uncovered.DENSE,
    fired: set[str] | None = None,
    exclude: frozenset[str] = frozenset(),
    small_params: int = SMALL_LAYER_PARAMS,
    small_projection: BlockProjection | str = BlockProjection.COUNT_SKETCH,
) -> KroneckerProjection:
    """Choose the blocks of a Kronecker projection of ``model``'s tangent features (DESIGN.md 1.7).

    Every supported layer whose module name matches one of ``layers`` gets a block for its weight (and
    bias); a total budget of ``k`` features is shared among the blocks (balanced ``k_row`` x ``k_col``,
    water-filled so that small layers give their unused share to large ones) after the rest block's share,
    ``k * P_rest / P`` (at least 1) when the rest is dense-projected. ``dims`` fixes a block's sizes. A
    layer whose gradient has at most ``small_params`` entries (and neither side above
    :data:`SMALL_LAYER_SIDE`) is projected whole instead, ``R^T vec(G)`` with its share of features (at most
    rows x cols), unless ``dims`` names it.

    Args:
        model: the network (its trainable parameters are projected).
        k: the total number of features wanted (the plan's ``k`` may differ slightly: at least one feature
            per side and block).
        seed: projection seed; distribution: entries of the matrices.
        layers: fnmatch patterns of module names to project per layer (``model.named_modules()`` names).
        dims: module-name pattern -> ``(k_row, k_col)`` for the matching blocks.
        uncovered: ``"dense"`` or ``"omit"`` for the parameters outside the blocks.
        fired: names of the modules whose forward ran on a probe batch (see :class:`HookFeaturizer`); a
            supported module outside it (its forward is bypassed, e.g. ``MultiheadAttention.out_proj``)
            gets no block. None: every supported module is trusted to run.
        exclude: weight names that get no block (their gradient has paths the hooks do not see, found by
            :func:`mismatched_blocks`): they go to the rest block.
        small_params: gradients of at most this many entries are projected whole (0: every block
            two-sided).
        small_projection: the R of those blocks: ``count_sketch`` (the default) or ``dense`` (a seeded
            Gaussian matrix, what indexes built before count sketches have; kept for them and for tests).

    Returns:
        The :class:`~indexer.features.projection.KroneckerProjection`.

    Raises:
        ValueError: ``k`` below 1, a negative ``small_params``, ``small_projection`` two-sided, a weight
            shared by layers of different shapes, or a ``dims`` entry outside its layer's shape.
    """
    if k < 1:
        raise ValueError(f"k must be positive; got {k}")
    if small_params < 0:
        raise ValueError(f"small_params must be 0 or more; got {small_params}")
    whole = parse_enum(BlockProjection, small_projection)
    if whole is BlockProjection.KRONECKER:
        raise ValueError(
            "small_projection is count_sketch or dense (small_params=0 makes every block two-sided)"
        )
    treatment = parse_enum(Uncovered, uncovered)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    name_of = {id(p): name for name, p in named}
    n_params = sum(p.numel() for _, p in named)
    found: dict[str, tuple[LayerBlock, str]] = {}  # weight name -> (block with k = 0, module name)
    for module_name, module in model.named_modules():
        kind = layer_kind(module)
        if kind is None or not any(fnmatch.fnmatchcase(module_name, pattern) for pattern in layers):
            continue
        if (fired is not None and module_name not in fired) or getattr(module, "weight", None) is None:
            continue
        weight_name = name_of.get(id(module.weight))
        if weight_name is None or weight_name in exclude:  # frozen, or its gradient has other paths
            continue
        bias = layer_bias(module)
        rows, cols = gradient_shape(kind, module, bias is not None)
        params = (weight_name,) + ((name_of[id(bias)],) if bias is not None else ())
        if weight_name in found:
            first = found[weight_name][0]
            if (first.rows, first.cols) != (rows, cols) or len(first.params) != len(params):
                raise ValueError(
                    f"the weight {weight_name!r} is shared by {found[weight_name][1]!r} and {module_name!r} "
                    f"with different gradient shapes ({first.rows}, {first.cols}) and ({rows}, {cols}) "
                    "(a bias on one of them only): such a tie is not supported"
                )
            continue
        found[weight_name] = (LayerBlock(weight_name, kind, params, rows, cols, 0, 0), module_name)
    covered = {p for block, _ in found.values() for p in block.params}
    rest_named = [(name, p) for name, p in named if name not in covered]
    rest_numel = sum(p.numel() for _, p in rest_named)
    k_rest = 0
    if rest_named and treatment is Uncovered.DENSE:
        k_rest = min(rest_numel, max(1, round(k * rest_numel / n_params)))
    blocks = _allocate(found, k - k_rest, dims or {}, small_params, whole)
    rest = RestBlock(tuple(n for n, _ in rest_named), tuple(int(p.numel()) for _, p in rest_named), k_rest)
    return KroneckerProjection(int(seed), parse_enum(Distribution, distribution), blocks, rest, n_params)


def _allocate(
    found: dict[str, tuple[LayerBlock, str]],
    budget: int,
    dims: dict[str, tuple[int, int]],
    small_params: int,
    whole: BlockProjection,
) -> tuple[LayerBlock, ...]:
    sizes: dict[str, tuple[int, int]] = {}
    small: set[str] = set()
    for name, (block, module_name) in found.items():
        for pattern, (k_row, k_col) in dims.items():
            if fnmatch.fnmatchcase(module_name, pattern):
                if not (1 <= k_row <= block.rows and 1 <= k_col <= block.cols):
                    raise ValueError(
                        f"dims {pattern!r} = ({k_row}, {k_col}) must lie within the gradient shape "
                        f"({block.rows}, {block.cols}) of {module_name!r}"
                    )
                sizes[name] = (k_row, k_col)
                break
    budget -= sum(r * c for r, c in sizes.values())
    # water-filling: the smallest layers first, each taking at most its equal share of what is left
    free = sorted(
        (n for n in found if n not in sizes), key=lambda n: (found[n][0].rows * found[n][0].cols, n)
    )
    for i, name in enumerate(free):
        block = found[name][0]
        share = max(budget, 0) / (len(free) - i)
        numel = block.rows * block.cols
        if numel <= small_params and max(block.rows, block.cols) <= SMALL_LAYER_SIDE:
            sizes[name] = (min(numel, max(1, int(share))), 1)
            small.add(name)
        else:
            sizes[name] = _factor(share, block.rows, block.cols)
        budget -= sizes[name][0] * sizes[name][1]
    order = list(found)  # model order, whatever order the sizes were chosen in
    return tuple(
        LayerBlock(
            b.name,
            b.layer,
            b.params,
            b.rows,
            b.cols,
            *sizes[n],
            whole if n in small else BlockProjection.KRONECKER,
        )
        for n in order
        for b in (found[n][0],)
    )


def _gradient_matrix(block: LayerBlock, grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """G `(rows, cols)` of a block in its own coordinates, from one example's parameter gradients."""
    w = grads[block.params[0]].double()
    bias = grads[block.params[1]].double() if len(block.params) > 1 else None
    if block.layer == "embedding":
        return w
    if block.layer == "gpt2_conv1d":
        return torch.cat([w, bias[None]], 0) if bias is not None else w
    w2 = w.reshape(w.shape[0], -1)
    return torch.cat([w2, bias[:, None]], 1) if bias is not None else w2


def mismatched_blocks(
    model: nn.Module, plan: KroneckerProjection, output_fn: OutputFunction, inputs: Any, targets: torch.Tensor
) -> frozenset[str]:
    """The blocks whose hooks do not see their weight's whole gradient, on one probe example.

    A weight used outside its module's forward (a tied head written ``h @ embedding.weight.T``, a
    ``F.linear`` with a module's weight), an embedding with ``scale_grad_by_freq``, a layer whose forward is
    bypassed: for each block, the features from the hooks are compared with ``R_row^T G R_col`` (a whole
    block: ``R^T vec(G)``) for G from one plain autograd backward.

    Args:
        model: the network, in eval mode; plan: its plan; output_fn: the output function m.
        inputs, targets: a batch (only its first example is used), on the model's device.

    Returns:
        The weight names of the blocks that differ by more than ``max(1e-3, 8 eps)`` of their size
        (relative), eps the machine epsilon of the weight's dtype (bfloat16: 0.0625): a missed path is of
        the order of the gradient itself, rounding in a low-precision model is a few eps.
    """
    one = {k: v[:1] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[:1]
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    raw = model_outputs(model, one).reshape(1, -1)
    grads = torch.autograd.grad(
        output_fn.output(raw[0], targets[0]), [p for _, p in named], allow_unused=True
    )
    by_name = {
        n: (g if g is not None else torch.zeros_like(p)) for (n, p), g in zip(named, grads, strict=True)
    }
    blocks_only = KroneckerProjection(plan.seed, plan.distribution, plan.blocks, RestBlock(), plan.n_params)
    try:
        with HookFeaturizer(model, blocks_only) as hooks:
            phi = hooks.featurize(output_fn, one, targets[:1]).phi[0].astype(np.float64)
    except ValueError:  # a block's layer did not run at all: every block is suspect, check them one by one
        phi = None
    bad, start = set(), 0
    for block in plan.blocks:
        g = _gradient_matrix(block, by_name).to(raw.device)
        if block.whole:  # R^T vec(G), its sides identities (never formed here)
            want = block.project_whole(g.reshape(-1).cpu().numpy(), plan.seed, plan.distribution)
        else:
            r_row, r_col = (
                torch.from_numpy(m).double().to(raw.device)
                for m in block.matrices(plan.seed, plan.distribution)
            )
            want = (r_row.T @ g @ r_col).reshape(-1).cpu().numpy()
        got = phi[start : start + block.k] if phi is not None else np.zeros(block.k)
        start += block.k
        dtype = by_name[block.name].dtype
        tolerance = max(1e-3, 8 * torch.finfo(dtype).eps) if dtype.is_floating_point else 1e-3
        if np.abs(got - want).max() > tolerance * max(np.abs(want).max(), 1e-30):
            bad.add(block.name)
    return frozenset(bad)
