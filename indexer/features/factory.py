"""The featurizer an :class:`~indexer.config.IndexConfig` asks for, and the manifest's record of its
projection (DESIGN.md 1.1, 1.7)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from indexer.config import IndexConfig
from indexer.data import Batch
from indexer.enums import Device, ProjectionKind
from indexer.features.featurize import DenseFeaturizer, Featurizer, count_parameters
from indexer.features.hooks import HookFeaturizer
from indexer.features.plan import fired_modules, plan_kronecker
from indexer.features.projection import DenseProjection
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


def make_featurizer(model: nn.Module, config: IndexConfig, probe: Batch) -> tuple[Featurizer, ProjectionInfo]:
    """Move the model to the configured device and make its featurizer.

    The Kronecker plan is made after a probe forward pass on ``probe`` (the first training batch), so that
    a layer whose forward is bypassed gets no block; a warning says when less than ``min_coverage`` of the
    parameters reaches the features.

    Args:
        model: the network, in eval mode.
        config: the build's settings.
        probe: a batch the model accepts.

    Returns:
        ``(featurizer, projection)``: the featurizer (call ``close`` on a ``HookFeaturizer`` when done) and
        the manifest's ``projection`` section.

    Raises:
        ValueError: a bad device or Kronecker setting (see :func:`~indexer.features.hooks.plan_kronecker`).
    """
    model.to(resolve_device(config.device))
    if config.projection is ProjectionKind.DENSE:
        dense = DenseProjection(count_parameters(model), config.k, config.seed, config.distribution)
        info = ProjectionInfo("dense", config.k, config.seed, config.distribution.value)
        return DenseFeaturizer(model, dense), info
    plan = plan_kronecker(
        model,
        config.k,
        config.seed,
        config.distribution,
        config.layer_patterns,
        config.dims(),
        config.uncovered,
        fired=fired_modules(model, probe.inputs),
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
