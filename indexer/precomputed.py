"""An index from precomputed features (DESIGN.md 2.1): for users who bring their own projected tangent
features (another featurizer, another framework), and for the scale benchmark.

The index is the same as :func:`~indexer.build.build_index` writes, without a model: the service answers
stored and feature queries (raw inputs are refused, saying there is no model).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from indexer.build import assemble_index, check_index_name
from indexer.config import IndexConfig
from indexer.data import read_array_file
from indexer.features.featurize import Features
from indexer.features.tasks import OutputFunction, output_function_from_spec
from indexer.store.sections import ProjectionInfo
from indexer.store.shards import build_lock

__all__ = ["FEATURE_KEYS", "build_from_features", "load_feature_file", "precomputed_features"]

FEATURE_KEYS = (
    "phi",
    "outputs",
    "targets",
    "beta",
    "grad_term",
    "query_phi",
    "query_outputs",
    "query_targets",
)
"""The arrays of a feature file (:func:`load_feature_file`): ``phi``, ``outputs`` and ``targets`` required."""


def load_feature_file(path: Path) -> dict[str, np.ndarray]:
    """Read a ``.safetensors`` or ``.npz`` feature file for ``infotrace-index build-from-features``.

    Returns:
        key -> numpy array (bfloat16 features as float32: numpy has no bfloat16).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an archive, a pickled or non-numeric array, an unknown key, or ``phi``, ``outputs``
            or ``targets`` missing.
    """
    tensors = read_array_file(Path(path), FEATURE_KEYS)
    for key in ("phi", "outputs", "targets"):
        if key not in tensors:
            raise ValueError(f"feature file {path} has no array {key!r}; it has {sorted(tensors)}")
    return {key: (t.float() if t.dtype == torch.bfloat16 else t).numpy() for key, t in tensors.items()}


def precomputed_features(
    phi: np.ndarray,
    outputs: np.ndarray,
    targets: np.ndarray,
    output_fn: OutputFunction,
    beta: np.ndarray | None,
    grad_term: np.ndarray | None,
    metadata: list[dict[str, Any]] | None,
    split: str,
) -> Features:
    """:class:`~indexer.features.featurize.Features` of precomputed features, checked, with beta_i and
    beta_i r_i from the output function unless given.

    Args:
        phi: `(n, k)` features; outputs: `(n,)` m_i; targets: `(n,)`; output_fn: the likelihood; beta,
            grad_term: `(n,)` overrides (both or neither); metadata: n dicts; split: for error messages.

    Raises:
        ValueError: shapes, dtypes or non-finite values (the message names the split and the array).
    """
    phi = np.asarray(phi)
    if phi.ndim != 2 or not np.issubdtype(phi.dtype, np.floating):
        raise ValueError(f"{split} features must be a float (n, k) array; got {phi.dtype}{list(phi.shape)}")
    n = len(phi)
    outputs = np.asarray(outputs, dtype=np.float64)
    targets = np.asarray(targets)
    for name, array in (("outputs", outputs), ("targets", targets)):
        if array.shape[:1] != (n,) or array.ndim != 1:
            raise ValueError(f"{split} {name} must have shape ({n},); got {list(array.shape)}")
    if not np.all(np.isfinite(outputs)):
        raise ValueError(f"{split} outputs must be finite")
    if (beta is None) != (grad_term is None):
        raise ValueError(
            "give both beta and grad_term (beta_i r_i), or neither (then they come from the outputs)"
        )
    if beta is None:
        beta = output_fn.likelihood_weight(outputs, targets)
        grad_term = output_fn.grad_term(outputs, targets)
    beta = np.asarray(beta, dtype=np.float64)
    grad_term = np.asarray(grad_term, dtype=np.float64)
    for name, array in (("beta", beta), ("grad_term", grad_term)):
        if array.shape != (n,) or not np.all(np.isfinite(array)):
            raise ValueError(f"{split} {name} must be finite with shape ({n},); got {list(array.shape)}")
    if metadata is not None and len(metadata) != n:
        raise ValueError(f"{split} metadata must have {n} entries; got {len(metadata)}")
    return Features(
        phi=phi,
        outputs=outputs,
        model_outputs=np.zeros((n, 0), dtype=np.float32),
        targets=targets,
        beta=beta,
        grad_term=grad_term,
        metadata=list(metadata) if metadata is not None else [],
        input_shape=(phi.shape[1],),
        input_dtype=str(phi.dtype),
    )


def build_from_features(
    phi: np.ndarray,
    out_dir: Path,
    *,
    outputs: np.ndarray,
    targets: np.ndarray,
    output_function: str | OutputFunction = "classification_margin",
    beta: np.ndarray | None = None,
    grad_term: np.ndarray | None = None,
    query_phi: np.ndarray | None = None,
    query_outputs: np.ndarray | None = None,
    query_targets: np.ndarray | None = None,
    metadata: list[dict[str, Any]] | None = None,
    config: IndexConfig | None = None,
    name: str | None = None,
    extra_manifest: dict[str, Any] | None = None,
) -> Path:
    """Build an index from projected tangent features (DESIGN.md 1.1-1.3, 2.1).

    Args:
        phi: `(n_train, k)` float features (any float dtype; stored as ``config.feature_dtype``, and the
            surrogate is fitted on the stored values).
        out_dir: the index folder (replaced atomically if it exists).
        outputs: `(n_train,)` output-function values m_i (the margin for classification, the output for
            regression).
        targets: `(n_train,)` labels (class ids) or regression targets.
        output_function: the likelihood: a registered name (``"classification_margin"``, ``"regression"``)
            or an :class:`~indexer.features.tasks.OutputFunction`.
        beta, grad_term: `(n_train,)` beta_i and beta_i r_i, overriding what the output function derives
            from ``outputs`` and ``targets`` (give both or neither).
        query_phi, query_outputs, query_targets: stored (held-out) queries, `(n_query, k)`, `(n_query,)`,
            `(n_query,)`; also the queries an approximate index's recall is measured on.
        metadata: one JSON-serialisable dict per training example.
        config: :class:`IndexConfig` (its featurization fields are unused; ``k`` is ``phi``'s width).
        name: index name (default: ``out_dir``'s folder name); extra_manifest: more manifest fields.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: shapes that disagree, non-finite values, a folder name the service cannot serve, a value
            beyond float16's range (use ``feature_dtype="float32"``), or a FAISS factory that cannot be
            trained on these vectors.
        BlockingIOError: another process is building the same ``out_dir``.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    check_index_name(out_dir)
    output_fn = (
        output_function_from_spec(output_function) if isinstance(output_function, str) else output_function
    )
    train = precomputed_features(phi, outputs, targets, output_fn, beta, grad_term, metadata, "train")
    k = train.phi.shape[1]
    config = replace(config or IndexConfig(), k=k)  # the features' width, whatever the config said
    if query_phi is None:
        query_phi = np.zeros((0, k), dtype=train.phi.dtype)
        query_outputs, query_targets = np.zeros(0), np.zeros(0, dtype=train.targets.dtype)
    if query_outputs is None or query_targets is None:
        raise ValueError("query_phi needs query_outputs and query_targets")
    queries = precomputed_features(
        query_phi, query_outputs, query_targets, output_fn, None, None, None, "query"
    )
    if queries.phi.shape[1] != k:
        raise ValueError(f"query features have width {queries.phi.shape[1]}; the training features have {k}")
    projection = ProjectionInfo(kind="precomputed", k=k, seed=config.seed)
    with build_lock(out_dir):
        return assemble_index(
            out_dir,
            train,
            queries,
            output_fn,
            config,
            projection,
            model={
                "model_spec": None,
                "checkpoint_sha256": None,
                "source_checkpoint_sha256": None,
                "n_params": 0,
                "n_outputs": 0,
                "image_shape": None,
            },
            name=name or out_dir.name,
            started=started,
            timings={},
            extra_manifest=extra_manifest or {},
            keep_inputs=False,
            extra_files={},
        )
