"""The indexer's entry point: model + checkpoint + data -> index directory (DESIGN.md 2, 2.1).

featurize (torch.func) -> project (seeded, blockwise) -> fit surrogate (float64) -> score vectors ->
FAISS indexes -> write atomically.

Builds are resumable: finished featurization buffers are kept as checksummed shards in a work folder
beside the output (:mod:`indexer.shards`), so a build killed at any point and started again with the same
arguments continues where it stopped and writes the same files as an uninterrupted build.
"""

from __future__ import annotations

import logging
import math
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from torch import nn

from indexer.constants import (
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
    PROJECTION_BLOCK_ROWS,
    QUERY_INPUTS_FILE,
    QUERY_PHI_FILE,
    QUERY_STATS_FILE,
    S_FLOOR,
    SPLIT_QUERY,
    SPLIT_TRAIN,
    TRAIN_INPUTS_FILE,
    WHITENED_FILE,
)
from indexer.data import Dataset
from indexer.enums import ProjectionKind, Score, parse_enum
from indexer.featurize import Features, buffer_rows, count_parameters, tangent_features
from indexer.index_format import write_index_dir
from indexer.models import ModelSpec, load_checkpoint, save_checkpoint, sha256_file
from indexer.projection import RandomProjection
from indexer.scores import score_vectors
from indexer.shards import (
    SHARD_FORMAT_VERSION,
    ShardStore,
    build_lock,
    remove_stale_siblings,
    tensor_digest,
    work_key,
)
from indexer.surrogate import Surrogate, fit_surrogate
from indexer.tasks import OutputFunction

__all__ = ["IndexConfig", "build_index", "make_faiss_index"]

log = logging.getLogger("infotrace.indexer")


@dataclass(frozen=True)
class IndexConfig:
    """Settings of an index build.

    Attributes:
        k: projected dimension of the tangent features.
        seed: projection seed (same seed and model => same features).
        projection: ``"gaussian"`` or ``"rademacher"`` entries of R.
        prior_precision: tau; None for the mean eigenvalue of the data term (DESIGN.md 1.1).
        s_floor: floor on one minus the leverage (DESIGN.md 1.5).
        batch_size: examples per vmap call when featurizing.
        faiss_factory: FAISS ``index_factory`` string; ``"Flat"`` is exact inner-product search.
        buffer_bytes: gradients gathered per pass over the projection's blocks, in bytes.

    Raises:
        ValueError: a non-positive size, an unknown projection kind, a bad tau or floor.
    """

    k: int = field(default=512, metadata={"help": "projected dimension"})
    seed: int = field(default=0, metadata={"help": "projection seed"})
    projection: ProjectionKind = field(default=ProjectionKind.GAUSSIAN, metadata={"help": "entries of R"})
    prior_precision: float | None = field(default=None, metadata={"help": "tau; None = mean eigenvalue"})
    s_floor: float = field(default=S_FLOOR, metadata={"help": "floor on 1 - leverage"})
    batch_size: int = field(default=128, metadata={"help": "examples per vmap call"})
    faiss_factory: str = field(default="Flat", metadata={"help": "FAISS index_factory string"})
    buffer_bytes: int = field(default=256 * 2**20, metadata={"help": "gradient buffer per projection pass"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "projection", parse_enum(ProjectionKind, self.projection))
        if self.k <= 0 or self.batch_size <= 0 or self.buffer_bytes <= 0:
            raise ValueError(
                f"k, batch_size and buffer_bytes must be positive; got {self.k}, "
                f"{self.batch_size}, {self.buffer_bytes}"
            )
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative; got {self.seed}")
        if self.prior_precision is not None and not (
            math.isfinite(self.prior_precision) and self.prior_precision > 0
        ):
            raise ValueError(f"prior_precision must be positive and finite; got {self.prior_precision}")
        if not 0 < self.s_floor < 1:
            raise ValueError(f"s_floor must lie in (0, 1); got {self.s_floor}")


def make_faiss_index(vectors: np.ndarray, factory: str) -> faiss.Index:
    """A FAISS inner-product index over ``vectors``.

    Args:
        vectors: `(n, k)` vectors (stored as float32).
        factory: ``faiss.index_factory`` string, e.g. ``"Flat"`` (exact) or ``"IVF64,Flat"``.

    Returns:
        The trained, filled index (metric: inner product).

    Raises:
        ValueError: FAISS rejects the factory string.
    """
    z = np.ascontiguousarray(vectors, dtype=np.float32)
    try:
        index = faiss.index_factory(z.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"FAISS rejects the factory string {factory!r}: {exc}") from exc
    if not index.is_trained:
        index.train(z)
    index.add(z)
    return index


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
    ``<parent>/.<name>.work-<key>/`` (:mod:`indexer.shards`). A build that is interrupted (an exception,
    Ctrl-C, SIGKILL) and started again with the same arguments reuses the verified shards and computes
    the rest; its files are byte-identical to those of an uninterrupted build. The work folder is removed
    once the index is in place; other arguments give another key and never reuse these shards.

    Args:
        model: the network. Its weights are taken from ``checkpoint`` when given, else used as they are.
        output_fn: the output function m (e.g. :class:`~indexer.tasks.ClassificationMargin`).
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
    if not re.fullmatch(INDEX_NAME_PATTERN, out_dir.name):
        raise ValueError(
            f"index folder name {out_dir.name!r} must match {INDEX_NAME_PATTERN} (letters, digits, '_', '.', "
            "'-'): the service serves an index under its folder name"
        )
    if len(train) == 0:
        raise ValueError("the training set is empty")
    started = time.perf_counter()
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
    n_params = count_parameters(model)
    projection = RandomProjection(n_params, config.k, config.seed, config.projection)
    query_set = queries if queries is not None else Dataset(train.inputs[:0], train.targets[:0])
    with (
        build_lock(out_dir),
        # beside the output, named like write_index_dir's temporary folder: what a kill leaves behind is
        # removed by the next build that finishes
        tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent) as scratch,
    ):
        stored_checkpoint = Path(scratch) / CHECKPOINT_FILE
        save_checkpoint(model, stored_checkpoint)
        checkpoint_sha256 = sha256_file(stored_checkpoint)
        material = _work_key_material(model, output_fn, train, query_set, checkpoint_sha256, config)
        store = ShardStore(out_dir, work_key(material), material)
        for other in store.others():
            log.warning("%s holds shards of a build of %s with other arguments; not reused", other, out_dir)
        features = {}
        for split, data in ((SPLIT_TRAIN, train), (SPLIT_QUERY, query_set)):
            shards = store.split(split)
            features[split] = tangent_features(
                model,
                output_fn,
                data.inputs,
                data.targets,
                projection,
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
        tangent, query_tangent = features[SPLIT_TRAIN], features[SPLIT_QUERY]
        featurize_seconds = time.perf_counter() - started

        beta = output_fn.likelihood_weight(tangent.outputs, tangent.targets)
        grad_term = output_fn.grad_term(tangent.outputs, tangent.targets)
        surrogate: Surrogate = fit_surrogate(
            tangent.phi, beta, grad_term, config.prior_precision, config.s_floor
        )
        vectors = {
            score: score_vectors(
                score,
                tangent.phi,
                surrogate.whitened,
                beta,
                grad_term,
                surrogate.s,
                surrogate.prior_precision,
            )
            for score in Score
        }
        faiss_indexes = {score: make_faiss_index(z, config.faiss_factory) for score, z in vectors.items()}

        example_stats = {
            **_stats(tangent, output_fn),
            KEY_BETA: beta,
            KEY_GRAD_TERM: grad_term,
            KEY_H: surrogate.h,
            KEY_S: surrogate.s,
        }
        query_stats = (
            _stats(query_tangent, output_fn)
            if len(query_set)
            else {
                KEY_OUTPUT: np.zeros(0),
                KEY_LABEL: np.zeros(0),
                KEY_PREDICTION: np.zeros(0),
                KEY_PHI_NORM: np.zeros(0),
            }
        )
        metadata_rows = [
            (split, row, _label(data.targets[row]), data.metadata[row] if data.metadata else {})
            for split, data in ((SPLIT_TRAIN, train), (SPLIT_QUERY, query_set))
            for row in range(len(data))
        ]
        manifest = {
            "name": name or out_dir.name,
            "created_unix": time.time(),
            "model": {
                "spec": model_spec.to_json() if model_spec is not None else None,
                "checkpoint_sha256": checkpoint_sha256,
                "source_checkpoint_sha256": sha256_file(Path(checkpoint)) if checkpoint is not None else None,
                "n_params": n_params,
                "output_function": {"name": output_fn.name, "params": output_fn.params()},
                "input_shape": list(train.inputs.shape[1:]),
                "input_dtype": str(train.inputs.dtype).removeprefix("torch."),
                "n_outputs": int(tangent.model_outputs.shape[1]),
                "image_shape": list(train.image_shape) if train.image_shape else None,
            },
            "projection": {"kind": config.projection.value, "k": config.k, "seed": config.seed},
            "surrogate": {
                "prior_precision": surrogate.prior_precision,
                "prior_precision_source": "given"
                if config.prior_precision is not None
                else "mean_eigenvalue",
                "likelihood": output_fn.name,
                "s_floor": surrogate.s_floor,
                "n_clamped": surrogate.n_clamped,
                "n_train": len(train),
            },
            "faiss": {
                "factory": config.faiss_factory,
                "metric": "inner_product",
                "exact": config.faiss_factory == "Flat",
            },
            "counts": {"n_train": len(train), "n_query": len(query_set), "k": config.k},
            "config": {
                key: (value.value if hasattr(value, "value") else value)
                for key, value in asdict(config).items()
            },
            "timings_seconds": {"featurize": featurize_seconds, "total": time.perf_counter() - started},
            **(extra_manifest or {}),
        }
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
            npz={EXAMPLE_STATS_FILE: example_stats, QUERY_STATS_FILE: query_stats},
            faiss_indexes=faiss_indexes,
            metadata_rows=metadata_rows,
            extra_files={CHECKPOINT_FILE: stored_checkpoint},
        )
        # the index is in place: its shards, and whatever killed writes of it left, are no longer needed
        store.remove()
        for stale in remove_stale_siblings(out_dir, keep=Path(scratch)):
            log.info("removed %s, left by an interrupted write of %s", stale, out_dir)
        return path


def _work_key_material(
    model: nn.Module,
    output_fn: OutputFunction,
    train: Dataset,
    queries: Dataset,
    checkpoint_sha256: str,
    config: IndexConfig,
) -> dict[str, Any]:
    """Everything that determines the featurization shards (see :mod:`indexer.shards`)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return {
        "shard_format_version": SHARD_FORMAT_VERSION,
        # the weights, and the architecture they are used in (repr names the layers and activations)
        "checkpoint_sha256": checkpoint_sha256,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "model_repr": repr(model),
        "output_function": {"name": output_fn.name, "params": output_fn.params()},
        "projection": {
            "kind": config.projection.value,
            "k": config.k,
            "seed": config.seed,
            "block_rows": PROJECTION_BLOCK_ROWS,
        },
        # shard boundaries, and the batch shapes the gradients were computed in
        "batch_size": config.batch_size,
        "buffer_rows": buffer_rows(count_parameters(model), config.batch_size, config.buffer_bytes),
        "train": {"inputs": tensor_digest(train.inputs), "targets": tensor_digest(train.targets)},
        "query": {"inputs": tensor_digest(queries.inputs), "targets": tensor_digest(queries.targets)},
        # other kernels may round differently
        "torch": torch.__version__,
        "numpy": np.__version__,
        "device": str(device),
    }


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
