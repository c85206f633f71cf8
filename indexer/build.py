"""The indexer's entry point: model + checkpoint + data -> index directory (DESIGN.md 2, 2.1).

Orchestration only: featurize (:mod:`indexer.features`) -> fit the surrogate (:mod:`indexer.gp`) -> score
vectors and FAISS indexes -> manifest -> write atomically (:mod:`indexer.store`).

Builds are resumable: finished featurization buffers are kept as checksummed shards in a work folder
beside the output (:mod:`indexer.store.shards`), so a build killed at any point and started again with the
same arguments continues where it stopped and writes the same files as an uninterrupted build.
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from indexer.config import IndexConfig
from indexer.data import Dataset
from indexer.enums import Device, ProjectionKind, Score
from indexer.features.featurize import (
    DenseFeaturizer,
    Features,
    Featurizer,
    count_parameters,
    tangent_features,
)
from indexer.features.hooks import HookFeaturizer, fired_modules, plan_kronecker
from indexer.features.models import ModelSpec, load_checkpoint, save_checkpoint
from indexer.features.projection import PROJECTION_BLOCK_ROWS, DenseProjection
from indexer.features.tasks import OutputFunction
from indexer.gp.surrogate import Surrogate, fit_surrogate
from indexer.store.faiss_index import check_factory, make_faiss_index
from indexer.store.hashing import sha256_file, tensor_digest
from indexer.store.layout import (
    CHECKPOINT_FILE,
    CHOLESKY_FILE,
    EXAMPLE_STATS_FILE,
    INDEX_NAME_PATTERN,
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
    PHI_FILE,
    QUERY_INPUTS_FILE,
    QUERY_PHI_FILE,
    QUERY_STATS_FILE,
    SPLIT_QUERY,
    SPLIT_TRAIN,
    TRAIN_INPUTS_FILE,
    WHITENED_FILE,
    scratch_prefix,
)
from indexer.store.manifest import Manifest
from indexer.store.sections import Counts, FaissInfo, ModelInfo, ProjectionInfo, SurrogateInfo
from indexer.store.shards import SHARD_FORMAT_VERSION, ShardStore, build_lock, remove_stale_siblings, work_key
from indexer.store.writer import MetadataRow, write_index_dir

__all__ = ["build_index"]

log = logging.getLogger("infotrace.indexer")


def _stats(features: Features, output_fn: OutputFunction) -> dict[str, np.ndarray]:
    prediction, probabilities = output_fn.predict(features.model_outputs)
    stats = {
        KEY_OUTPUT: features.outputs,
        KEY_LABEL: features.targets,
        KEY_PREDICTION: prediction,
        KEY_PHI_NORM: np.linalg.norm(features.phi.astype(np.float64), axis=1),
        KEY_MODEL_OUTPUT: features.model_outputs,
    }
    if probabilities is not None:
        stats[KEY_PROBABILITIES] = probabilities
    return stats


def _example_stats(
    features: Features, output_fn: OutputFunction, surrogate: Surrogate
) -> dict[str, np.ndarray]:
    """``examples.npz``: what the model says of each training example and the surrogate's caches."""
    return {
        **_stats(features, output_fn),
        KEY_BETA: surrogate.beta,
        KEY_GRAD_TERM: surrogate.grad_term,
        KEY_H: surrogate.h,
        KEY_S: surrogate.s,
    }


def _query_stats(features: Features, output_fn: OutputFunction) -> dict[str, np.ndarray]:
    """``queries.npz``: what the model says of each stored query (empty arrays when there are none)."""
    if len(features.phi):
        return _stats(features, output_fn)
    empty = np.zeros(0)
    return {KEY_OUTPUT: empty, KEY_LABEL: empty, KEY_PREDICTION: empty, KEY_PHI_NORM: empty}


def _metadata_rows(train: Dataset, queries: Dataset) -> list[MetadataRow]:
    return [
        (split, row, _label(data.targets[row]), data.metadata[row] if data.metadata else {})
        for split, data in ((SPLIT_TRAIN, train), (SPLIT_QUERY, queries))
        for row in range(len(data))
    ]


def _manifest(
    name: str,
    model_spec: ModelSpec | None,
    checkpoint_sha256: str,
    source_checkpoint_sha256: str | None,
    n_params: int,
    output_fn: OutputFunction,
    train: Dataset,
    tangent: Features,
    surrogate: Surrogate,
    config: IndexConfig,
    projection: ProjectionInfo,
    n_query: int,
    timings: dict[str, float],
    extra: dict[str, Any],
) -> Manifest:
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
            input_shape=tuple(int(d) for d in train.inputs.shape[1:]),
            input_dtype=str(train.inputs.dtype).removeprefix("torch."),
            n_outputs=int(tangent.model_outputs.shape[1]),
            image_shape=train.image_shape,
        ),
        projection=projection,
        surrogate=SurrogateInfo(
            prior_precision=surrogate.prior_precision,
            prior_precision_source="given" if config.prior_precision is not None else "mean_eigenvalue",
            likelihood=output_fn.name,
            s_floor=surrogate.s_floor,
            n_clamped=surrogate.n_clamped,
            n_train=len(train),
        ),
        faiss=FaissInfo(factory=config.faiss_factory),
        counts=Counts(n_train=len(train), n_query=n_query, k=projection.k),
        config=config.to_json(),
        timings_seconds=timings,
        extra=extra,
    )


def build_index(
    model: nn.Module,
    output_fn: OutputFunction,
    train: Dataset,
    out_dir: Path,
    *,
    checkpoint: Path | None = None,
    queries: Dataset | None = None,
    model_spec: ModelSpec | None = None,
    config: IndexConfig | None = None,
    name: str | None = None,
    extra_manifest: dict[str, Any] | None = None,
    progress: bool = True,
) -> Path:
    """Build an attribution index of ``train`` for ``model`` (DESIGN.md 1.1-1.3, 2.1).

    Resumable: each finished featurization buffer is kept as a checksummed shard in
    ``<parent>/.<name>.work-<key>/`` (:mod:`indexer.store.shards`). A build that is interrupted (an exception,
    Ctrl-C, SIGKILL) and started again with the same arguments reuses the verified shards and computes
    the rest; its files are byte-identical to those of an uninterrupted build. The work folder is removed
    once the index is in place; other arguments give another key and never reuse these shards.

    Args:
        model: the network. Its weights are taken from ``checkpoint`` when given, else used as they are.
        output_fn: the output function m (e.g. :class:`~indexer.features.tasks.ClassificationMargin`).
        train: training examples, inputs `(n_train, *input_shape)`, targets `(n_train,)`.
        out_dir: the index folder to create (replaced atomically if it exists).
        checkpoint: a ``.safetensors`` file or a weights-only ``torch.save`` state dict.
        queries: held-out examples featurized and stored as queries (e.g. the test split).
        model_spec: how to rebuild the architecture; without it the service can only answer stored or
            precomputed-feature queries, not raw inputs.
        config: :class:`IndexConfig`; defaults when None.
        name: index name; defaults to ``out_dir``'s folder name.
        extra_manifest: more JSON fields for the manifest (e.g. the demo's training settings).
        progress: show progress bars.

    Returns:
        ``out_dir``.

    Raises:
        FileNotFoundError, ValueError: a missing or mismatching checkpoint, empty data, a bad config.
        BlockingIOError: another process is building the same ``out_dir``.
    """
    config = config or IndexConfig()
    out_dir = Path(out_dir)
    started = time.perf_counter()
    _prepare(model, output_fn, train, queries, out_dir, checkpoint)
    check_factory(config.k, config.faiss_factory)
    n_params = count_parameters(model)
    featurizer, projection = _featurizer(model, train, config)
    query_set = queries if queries is not None else Dataset(train.inputs[:0], train.targets[:0])
    with (
        build_lock(out_dir),
        # beside the output, named like write_index_dir's temporary folder: what a kill leaves behind is
        # removed by the next build that finishes
        tempfile.TemporaryDirectory(prefix=scratch_prefix(out_dir), dir=out_dir.parent) as scratch,
    ):
        stored_checkpoint = Path(scratch) / CHECKPOINT_FILE
        save_checkpoint(model, stored_checkpoint)
        checkpoint_sha256 = sha256_file(stored_checkpoint)
        material = _work_key_material(
            model, output_fn, train, query_set, checkpoint_sha256, config, featurizer, projection
        )
        store = ShardStore(out_dir, work_key(material), material)
        for other in store.others():
            log.warning("%s holds shards of a build of %s with other arguments; not reused", other, out_dir)
        features = {
            split: _featurize(featurizer, output_fn, data, config, store, split, progress)
            for split, data in ((SPLIT_TRAIN, train), (SPLIT_QUERY, query_set))
        }
        if isinstance(featurizer, HookFeaturizer):
            featurizer.close()
        tangent, query_tangent = features[SPLIT_TRAIN], features[SPLIT_QUERY]
        featurize_seconds = time.perf_counter() - started

        beta = output_fn.likelihood_weight(tangent.outputs, tangent.targets)
        grad_term = output_fn.grad_term(tangent.outputs, tangent.targets)
        surrogate = fit_surrogate(tangent.phi, beta, grad_term, config.prior_precision, config.s_floor)
        faiss_indexes = {
            score: make_faiss_index(surrogate.score_vectors(score), config.faiss_factory) for score in Score
        }
        manifest = _manifest(
            name or out_dir.name,
            model_spec,
            checkpoint_sha256,
            sha256_file(Path(checkpoint)) if checkpoint is not None else None,
            n_params,
            output_fn,
            train,
            tangent,
            surrogate,
            config,
            projection,
            n_query=len(query_set),
            timings={"featurize": featurize_seconds, "total": time.perf_counter() - started},
            extra=extra_manifest or {},
        )
        path = write_index_dir(
            out_dir,
            manifest,
            arrays={
                PHI_FILE: tangent.phi,
                WHITENED_FILE: surrogate.whitened,
                CHOLESKY_FILE: surrogate.cholesky,
                QUERY_PHI_FILE: query_tangent.phi,
                TRAIN_INPUTS_FILE: train.inputs.cpu().numpy(),
                QUERY_INPUTS_FILE: query_set.inputs.cpu().numpy(),
            },
            npz={
                EXAMPLE_STATS_FILE: _example_stats(tangent, output_fn, surrogate),
                QUERY_STATS_FILE: _query_stats(query_tangent, output_fn),
            },
            faiss_indexes=faiss_indexes,
            metadata_rows=_metadata_rows(train, query_set),
            extra_files={CHECKPOINT_FILE: stored_checkpoint},
        )
        # the index is in place: its shards, and whatever killed writes of it left, are no longer needed
        store.remove()
        for stale in remove_stale_siblings(out_dir, keep=Path(scratch)):
            log.info("removed %s, left by an interrupted write of %s", stale, out_dir)
        return path


def _prepare(
    model: nn.Module,
    output_fn: OutputFunction,
    train: Dataset,
    queries: Dataset | None,
    out_dir: Path,
    checkpoint: Path | None,
) -> None:
    """Refuse a bad folder name, empty data or unexplainable targets before any work; load the weights."""
    if not re.fullmatch(INDEX_NAME_PATTERN, out_dir.name):
        raise ValueError(
            f"index folder name {out_dir.name!r} must match {INDEX_NAME_PATTERN} (letters, digits, '_', '.', "
            "'-'): the service serves an index under its folder name"
        )
    if len(train) == 0:
        raise ValueError("the training set is empty")
    if checkpoint is not None:
        load_checkpoint(model, Path(checkpoint))
    model.eval()
    n_outputs = _output_width(model, train.inputs[:1])
    output_fn.check_targets(train.targets, n_outputs)
    if queries is not None:
        if tuple(queries.inputs.shape[1:]) != tuple(train.inputs.shape[1:]):
            raise ValueError(
                f"query inputs have shape {list(queries.inputs.shape[1:])} per example; the training inputs "
                f"have {list(train.inputs.shape[1:])}"
            )
        output_fn.check_targets(queries.targets, n_outputs)


def _featurize(
    featurizer: Featurizer,
    output_fn: OutputFunction,
    data: Dataset,
    config: IndexConfig,
    store: ShardStore,
    split: str,
    progress: bool,
) -> Features:
    """Projected tangent features of one split, reusing and filling its shards."""
    shards = store.split(split)
    features = tangent_features(
        featurizer,
        output_fn,
        data.inputs,
        data.targets,
        batch_size=config.batch_size,
        buffer_bytes=config.buffer_bytes,
        progress=f"featurize {split}" if progress else None,
        cache=shards,
    )
    log.info(
        "featurize %s: %d shard(s) reused, %d computed (%d corrupt recomputed) in %s",
        split,
        shards.reused,
        shards.computed,
        shards.corrupt,
        store.folder,
    )
    return features


def _work_key_material(
    model: nn.Module,
    output_fn: OutputFunction,
    train: Dataset,
    queries: Dataset,
    checkpoint_sha256: str,
    config: IndexConfig,
    featurizer: Featurizer,
    projection: ProjectionInfo,
) -> dict[str, Any]:
    """Everything that determines the featurization shards (see :mod:`indexer.store.shards`)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    projection_key = projection.to_json()
    if projection.structure is ProjectionKind.DENSE:
        projection_key["block_rows"] = PROJECTION_BLOCK_ROWS
    return {
        "shard_format_version": SHARD_FORMAT_VERSION,
        # the weights, and the architecture they are used in (repr names the layers and activations)
        "checkpoint_sha256": checkpoint_sha256,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "model_repr": repr(model),
        "output_function": {"name": output_fn.name, "params": output_fn.params()},
        "projection": projection_key,
        # shard boundaries, and the batch shapes the gradients were computed in
        "batch_size": config.batch_size,
        "buffer_rows": featurizer.buffer_rows(config.batch_size, config.buffer_bytes),
        "train": {"inputs": tensor_digest(train.inputs), "targets": tensor_digest(train.targets)},
        "query": {"inputs": tensor_digest(queries.inputs), "targets": tensor_digest(queries.targets)},
        # other kernels may round differently
        "torch": torch.__version__,
        "numpy": np.__version__,
        "device": str(device),
    }


def _featurizer(model: nn.Module, train: Dataset, config: IndexConfig) -> tuple[Featurizer, ProjectionInfo]:
    """The configured featurizer on the configured device, and the manifest's record of its projection.

    The Kronecker plan is made after a probe forward pass on the first training examples, so that a layer
    whose forward is bypassed gets no block; a warning says when less than ``min_coverage`` of the
    parameters reaches the features.
    """
    model.to(_device(config.device))
    if config.projection is ProjectionKind.DENSE:
        dense = DenseProjection(count_parameters(model), config.k, config.seed, config.distribution)
        info = ProjectionInfo("dense", config.k, config.seed, config.distribution.value)
        return DenseFeaturizer(model, dense), info
    fired = fired_modules(model, train.inputs[: config.batch_size])
    plan = plan_kronecker(
        model,
        config.k,
        config.seed,
        config.distribution,
        config.layer_patterns,
        config.dims(),
        config.uncovered,
        fired=fired,
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


def _device(device: Device) -> torch.device:
    if device is Device.CPU:
        return torch.device("cpu")
    if device is Device.CUDA and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _output_width(model: nn.Module, first: torch.Tensor) -> int:
    try:
        with torch.no_grad():
            out = model(first)
    except RuntimeError as exc:  # e.g. "mat1 and mat2 shapes cannot be multiplied"
        raise ValueError(
            f"the model rejects inputs of shape {list(first.shape[1:])} per example "
            f"(dtype {first.dtype}): {exc}"
        ) from exc
    return int(out.reshape(len(first), -1).shape[1])


def _label(target: torch.Tensor) -> int | float:
    value = target.item()
    return int(value) if isinstance(value, int | bool) else float(value)
