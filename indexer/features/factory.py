"""The featurizer an :class:`~indexer.config.IndexConfig` asks for, and the manifest's record of its
projection (DESIGN.md 1.1, 1.7)."""

from __future__ import annotations

import fnmatch
import logging

import torch
from torch import nn

from indexer.config import IndexConfig
from indexer.data import Batch
from indexer.enums import Device, ProjectionKind
from indexer.features.featurize import DenseFeaturizer, Featurizer, count_parameters, to_device
from indexer.features.hooks import HookFeaturizer
from indexer.features.plan import fired_modules, mismatched_blocks, plan_kronecker
from indexer.features.projection import DenseProjection
from indexer.features.tasks import OutputFunction
from indexer.store.sections import ProjectionInfo

__all__ = ["make_featurizer", "resolve_device"]

log = logging.getLogger("infotrace.indexer")


def resolve_device(device: Device) -> torch.device:
    """``auto``: CUDA when torch sees a GPU, else the CPU.

    Raises:
        ValueError: ``cuda`` without a CUDA device.
    """
    if device is Device.CPU:
        return torch.device("cpu")
    if device is Device.CUDA and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_featurizer(
    model: nn.Module, config: IndexConfig, probe: Batch, output_fn: OutputFunction
) -> tuple[Featurizer, ProjectionInfo]:
    """Move the model to the configured device and make its featurizer.

    The Kronecker plan is made after a probe forward pass on ``probe`` (the first training batch), so that
    a layer whose forward is bypassed gets no block, and checked on its first example against a plain
    autograd gradient (:func:`~indexer.features.plan.mismatched_blocks`): a weight whose gradient has paths
    the hooks do not see goes to the rest block, with a warning. A warning also says when less than
    ``min_coverage`` of the parameters reaches the features.

    Args:
        model: the network, in eval mode.
        config: the build's settings.
        probe: a batch the model accepts.
        output_fn: the output function m (for the check).

    Returns:
        ``(featurizer, projection)``: the featurizer (call ``close`` on a ``HookFeaturizer`` when done) and
        the manifest's ``projection`` section.

    Raises:
        ValueError: a bad device or Kronecker setting (see :func:`~indexer.features.hooks.plan_kronecker`).
    """
    model.to(resolve_device(config.device))
    if config.projection is ProjectionKind.DENSE:
        if config.projection_dims or config.layer_patterns != ("*",):
            log.warning("projection_dims and projection_layers apply to the Kronecker projection; ignored")
        dense = DenseProjection(count_parameters(model), config.k, config.seed, config.distribution)
        info = ProjectionInfo("dense", config.k, config.seed, config.distribution.value)
        return DenseFeaturizer(model, dense), info
    device = resolve_device(config.device)
    inputs, targets = to_device(probe.inputs, device), probe.targets.to(device)
    settings = (
        config.k,
        config.seed,
        config.distribution,
        config.layer_patterns,
        config.dims(),
        config.uncovered,
    )
    small = config.small_layer_params
    plan = plan_kronecker(model, *settings, fired=fired_modules(model, inputs), small_params=small)
    unmatched = [
        p for p in config.dims() if not any(fnmatch.fnmatchcase(n, p) for n, _ in model.named_modules())
    ]
    if unmatched:
        log.warning("projection_dims patterns match no module of the model: %s", unmatched)
    mismatched = mismatched_blocks(model, plan, output_fn, inputs, targets)
    if mismatched:
        log.warning(
            "the gradients of %s have paths their layers' hooks do not see (a weight used outside its "
            "module, scale_grad_by_freq, a bypassed forward): they are dense-projected in the rest block",
            sorted(mismatched),
        )
        plan = plan_kronecker(
            model, *settings, fired=fired_modules(model, inputs), exclude=mismatched, small_params=small
        )
    coverage = plan.coverage_json()
    if coverage["covered_fraction"] < config.min_coverage:
        log.warning(
            "the Kronecker projection covers %.1f%% of the %d parameters (min_coverage %.0f%%); "
            "not covered: %s",
            100 * coverage["covered_fraction"],
            plan.n_params,
            100 * config.min_coverage,
            ", ".join(plan.rest.params[:10]) + (" ..." if len(plan.rest.params) > 10 else ""),
        )
    info = ProjectionInfo("kronecker", plan.k, config.seed, config.distribution.value, coverage)
    return HookFeaturizer(model, plan), info
