"""What an index stores of its examples, made from their features: the per-example arrays
``examples.<key>.npy`` and ``queries.<key>.npy``, the stored features in their storage dtype and the rows of
``metadata.sqlite`` (DESIGN.md 2.1)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from indexer.config import IndexConfig
from indexer.features.featurize import Features
from indexer.features.models import ModelSpec
from indexer.features.tasks import OutputFunction
from indexer.gp.surrogate import Surrogate
from indexer.store.layout import (
    KEY_BETA,
    KEY_GRAD_TERM,
    KEY_H,
    KEY_LABEL,
    KEY_MODEL_OUTPUT,
    KEY_OUTPUT,
    KEY_PHI_NORM,
    KEY_PREDICTION,
    KEY_PROBABILITIES,
    KEY_S,
    SPLIT_QUERY,
    SPLIT_TRAIN,
)
from indexer.store.manifest import Manifest
from indexer.store.sections import Counts, FaissInfo, ModelInfo, ProjectionInfo, SurrogateInfo
from indexer.store.writer import MetadataRow

__all__ = [
    "build_manifest",
    "example_stats",
    "model_stats",
    "query_stats",
    "metadata_rows",
    "stored_features",
    "keyed_files",
    "row_norms",
]


def stored_features(phi: np.ndarray, dtype: str, what: str = "training") -> np.ndarray:
    """The features as the index stores them (DESIGN.md 2.1): the surrogate is fitted on these values, so
    every score is exact for what is stored.

    Args:
        phi: `(n, k)` projected tangent features, any float dtype.
        dtype: ``"float16"`` or ``"float32"``.
        what: which features, for the error message.

    Returns:
        `(n, k)` array of ``dtype`` (``phi`` itself when it already has it).

    Raises:
        ValueError: a value beyond the dtype's range (float16: 65504), naming the first example.
    """
    target = np.dtype(dtype)
    if phi.dtype == target:
        return phi
    with np.errstate(over="ignore"):
        out = phi.astype(target)
    bad = ~np.isfinite(out).all(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{what} example {row}: a feature value of magnitude {float(np.abs(phi[row]).max()):.3g} is "
            f"beyond {dtype}'s range ({float(np.finfo(target).max):.6g}); build with feature_dtype='float32' "
            "(--feature-dtype float32)"
        )
    return out


def row_norms(phi: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """`(n,)` float64 |phi_i| of the stored values, a chunk of rows in float64 at a time."""
    out = np.empty(len(phi))
    for start in range(0, len(phi), chunk):
        out[start : start + chunk] = np.linalg.norm(
            np.asarray(phi[start : start + chunk], np.float64), axis=1
        )
    return out


def keyed_files(arrays: dict[str, np.ndarray], name: Callable[[str], str]) -> dict[str, np.ndarray]:
    """``{file name: array}`` for per-row arrays keyed as in :mod:`indexer.store.layout` (one ``.npy``
    each, so that the reader memory-maps them)."""
    return {name(key): array for key, array in arrays.items()}


def model_stats(features: Features, output_fn: OutputFunction) -> dict[str, np.ndarray]:
    """What the model says of each example: output m_i, label, |phi_i| and, with model outputs, the
    prediction, the model output (or its summary) and class probabilities; key -> `(n, ...)` array."""
    stats = {
        KEY_OUTPUT: features.outputs,
        KEY_LABEL: features.targets,
        KEY_PHI_NORM: row_norms(features.phi),
    }
    if features.model_outputs.shape[1:] == (0,):  # precomputed features: no model outputs, no predictions
        return stats
    prediction, probabilities = output_fn.predict(features.model_outputs)
    stats[KEY_PREDICTION] = prediction
    stats[KEY_MODEL_OUTPUT] = features.model_outputs
    if probabilities is not None:
        stats[KEY_PROBABILITIES] = probabilities
    return stats


def example_stats(
    features: Features, output_fn: OutputFunction, surrogate: Surrogate
) -> dict[str, np.ndarray]:
    """``examples.<key>.npy``: what the model says of each training example, and the surrogate's caches.

    Returns:
        key -> `(n_train, ...)` array (keys in :mod:`indexer.store.layout`).
    """
    return {
        **model_stats(features, output_fn),
        KEY_BETA: surrogate.beta,
        KEY_GRAD_TERM: surrogate.grad_term,
        KEY_H: np.asarray(surrogate.h),
        KEY_S: np.asarray(surrogate.s),
    }


def query_stats(features: Features, output_fn: OutputFunction) -> dict[str, np.ndarray]:
    """``queries.<key>.npy``: what the model says of each stored query (empty arrays when there are none).

    Returns:
        key -> `(n_query, ...)` array.
    """
    if len(features.phi):
        return model_stats(features, output_fn)
    empty = np.zeros(0)
    return {KEY_OUTPUT: empty, KEY_LABEL: empty, KEY_PREDICTION: empty, KEY_PHI_NORM: empty}


def _label(target: np.ndarray) -> int | float | list:
    """A target as SQLite stores it: a Python number, or a JSON list for a sequence target."""
    if np.ndim(target):
        return np.asarray(target).tolist()
    value = np.asarray(target).item()
    return int(value) if isinstance(value, int | bool) else float(value)


def metadata_rows(train: Features, queries: Features) -> list[MetadataRow]:
    """``(split, row, label, metadata)`` for every training example and stored query."""
    return [
        (split, row, _label(features.targets[row]), features.metadata[row] if features.metadata else {})
        for split, features in ((SPLIT_TRAIN, train), (SPLIT_QUERY, queries))
        for row in range(len(features.phi))
    ]


def build_manifest(
    name: str,
    model_spec: ModelSpec | None,
    checkpoint_sha256: str | None,
    source_checkpoint_sha256: str | None,
    n_params: int,
    n_outputs: int,
    output_fn: OutputFunction,
    image_shape: tuple[int, int] | None,
    tangent: Features,
    surrogate: Surrogate,
    config: IndexConfig,
    projection: ProjectionInfo,
    faiss: FaissInfo,
    n_query: int,
    timings: dict[str, float],
    extra: dict[str, Any],
) -> Manifest:
    """The manifest of a new index from what its build made (DESIGN.md 2.1); ``files`` are added by the
    writer."""
    return Manifest(
        name=name,
        created_unix=time.time(),
        model=ModelInfo(
            spec=model_spec,
            checkpoint_sha256=checkpoint_sha256,
            source_checkpoint_sha256=source_checkpoint_sha256,
            n_params=n_params,
            output_function=output_fn.name,
            output_params=output_fn.params(),
            input_shape=tangent.input_shape,
            input_dtype=tangent.input_dtype,
            n_outputs=n_outputs,
            image_shape=image_shape,
            input_dtypes=tangent.input_dtypes,
            target_shape=tuple(int(d) for d in tangent.targets.shape[1:]),
            target_dtype=str(tangent.targets.dtype),
        ),
        projection=projection,
        surrogate=SurrogateInfo(
            prior_precision=surrogate.prior_precision,
            prior_precision_source="given" if config.prior_precision is not None else "mean_eigenvalue",
            likelihood=output_fn.name,
            s_floor=surrogate.s_floor,
            n_clamped=surrogate.n_clamped,
            n_train=len(tangent.phi),
        ),
        faiss=faiss,
        counts=Counts(
            n_train=len(tangent.phi),
            n_query=n_query,
            k=projection.k,
            feature_dtype=config.feature_dtype.value,
        ),
        config=config.to_json(),
        timings_seconds=timings,
        extra=extra,
    )
