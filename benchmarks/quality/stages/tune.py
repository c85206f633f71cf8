"""Each method's damping, chosen on the validation queries by their LDS (before any test metric)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from benchmarks.quality.lds import lds
from benchmarks.quality.stages.base import HarnessError, log, signed_scores
from indexer.data import Dataset

__all__ = ["tune_damping"]


def tune_damping(
    methods: list[Any], validation: Dataset, masks: np.ndarray, outputs: np.ndarray, grid: Sequence[float]
) -> dict[str, dict[str, Any]]:
    """Each method's damping: the grid value with the highest validation LDS (ties: the smaller value).

    A grid value whose scores fail (e.g. a singular inverse) is logged and skipped.

    Args:
        methods: the fitted methods; validation: the validation queries;
        masks: `(M, n_train)` LDS subsets; outputs: `(M, n_validation)` margins of their retrains;
        grid: the damping values to try, each in its method's own units.

    Returns:
        method key -> ``{"damping": chosen value (None without damping), "validation_lds": {repr(value):
        mean LDS, NaN where it failed}}``.

    Raises:
        HarnessError: no grid value gave a method a finite validation LDS.
    """
    chosen: dict[str, dict[str, Any]] = {}
    for method in methods:
        if method.damping_param is None:
            chosen[method.key] = {"damping": None, "validation_lds": {}}
            continue
        curve: dict[str, float] = {}
        for damping in tqdm(grid, desc=f"tune {method.key}", leave=False):
            try:
                curve[repr(damping)] = lds(signed_scores(method, validation, damping), masks, outputs).mean
            except (RuntimeError, ValueError, np.linalg.LinAlgError) as exc:  # e.g. a singular inverse
                log(f"{method.key}: damping {damping} failed ({type(exc).__name__}: {exc}); skipped")
                curve[repr(damping)] = float("nan")
        finite = {d: v for d, v in curve.items() if math.isfinite(v)}
        if not finite:
            raise HarnessError(f"{method.key}: no damping value of the grid gave a finite validation LDS")
        best = max(finite, key=lambda d: (finite[d], -float(d)))
        chosen[method.key] = {"damping": float(best), "validation_lds": curve}
    return chosen
