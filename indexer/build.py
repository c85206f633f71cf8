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
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np
import torch
from torch import nn

from indexer.config import IndexConfig
from indexer.data import Batch, Dataset, Examples
from indexer.enums import ProjectionKind
from indexer.features.factory import make_featurizer
from indexer.features.featurize import Features, Featurizer, count_parameters, model_outputs, to_device
from indexer.features.hooks import HookFeaturizer
from indexer.features.language import load_tokenizer
from indexer.features.models import ModelSpec, load_checkpoint, save_checkpoint
from indexer.features.projection import PROJECTION_BLOCK_ROWS
from indexer.features.stream import (
    check_batch,
    check_finite_inputs,
    check_targets,
    checked_batches,
    shard_rows,
    tangent_features,
)
from indexer.features.tasks import OutputFunction
from indexer.gp.surrogate import Surrogate, fit_surrogate, sharded_data_term
from indexer.store.faiss_index import check_factory
from indexer.store.hashing import sha256_file, tensor_digest
from indexer.store.layout import (
    CHECKPOINT_FILE,
    CHOLESKY_FILE,
    FAISS_FILE,
    FAISS_TRAINED_FILE,
    INDEX_NAME_PATTERN,
    KEY_PHI_NORM,
    PHI_FILE,
    QUERY_INPUTS_FILE,
    QUERY_PHI_FILE,
    SPLIT_QUERY,
    SPLIT_TRAIN,
    TOKENIZER_FILE,
    TRAIN_INPUTS_FILE,
    example_file,
    query_stats_file,
    scratch_prefix,
)
from indexer.store.records import (
    build_manifest,
    example_stats,
    keyed_files,
    metadata_rows,
    query_stats,
    stored_features,
)
from indexer.store.search import (
    Searcher,
    SearchKnobs,
    fill_approximate_index,
    measure_recall,
    recall_queries,
    search_params,
    trained_approximate_index,
    vector_scale,
)
from indexer.store.sections import EXACT_FACTORY, FaissInfo, ProjectionInfo
from indexer.store.shards import SHARD_FORMAT_VERSION, ShardStore, build_lock, remove_stale_siblings, work_key
from indexer.store.writer import write_index_dir

if TYPE_CHECKING:
    from indexer.distributed import RayOptions

__all__ = [
    "build_index",
    "assemble_index",
    "check_index_name",
    "approximate_retrieval",
    "check_finite_inputs",
    "check_targets",
    "probe_outputs",
]

log = logging.getLogger("infotrace.indexer")


def build_index(
    model: nn.Module,
    output_fn: OutputFunction,
    train: Examples,
    out_dir: Path,
    *,
    checkpoint: Path | None = None,
    queries: Examples | None = None,
    model_spec: ModelSpec | None = None,
    config: IndexConfig | None = None,
    name: str | None = None,
    extra_manifest: dict[str, Any] | None = None,
    store_inputs: bool | None = None,
    tokenizer: Path | None = None,
    progress: bool = True,
    ray: RayOptions | None = None,
) -> Path:
    """Build an attribution index of ``train`` for ``model`` (DESIGN.md 1.1-1.3, 1.7, 2.1).

    The data are read batch by batch (a :class:`~indexer.data.StreamedDataset` is never all in memory); the
    features, outputs and targets of every example are kept, and the inputs only when ``store_inputs``.

    Resumable: each finished featurization buffer is kept as a checksummed shard in
    ``<parent>/.<name>.work-<key>/`` (:mod:`indexer.store.shards`), with the sha256 of its data. A build that
    is interrupted (an exception, Ctrl-C, SIGKILL) and started again with the same arguments reuses the
    verified shards of the same data and computes the rest; its files are byte-identical to those of an
    uninterrupted build (the manifest but for its build time and timings). The work folder is removed once
    the index is in place; other arguments give another key and never reuse these shards.

    Args:
        model: the network. Its weights are taken from ``checkpoint`` when given, else used as they are; it
            is put in eval mode (dropout off, batch norm on its running statistics).
        output_fn: the output function m (e.g. :class:`~indexer.features.tasks.ClassificationMargin`).
        train: training examples: a :class:`~indexer.data.Dataset` (inputs `(n_train, *input_shape)`,
            targets `(n_train, ...)`) or a :class:`~indexer.data.StreamedDataset`.
        out_dir: the index folder to create (replaced atomically if it exists).
        checkpoint: a ``.safetensors`` file or a weights-only ``torch.save`` state dict.
        queries: held-out examples featurized and stored as queries (e.g. the test split).
        model_spec: how to rebuild the architecture; without it the service can only answer stored or
            precomputed-feature queries, not raw inputs.
        config: :class:`IndexConfig`; defaults when None.
        name: index name; defaults to ``out_dir``'s folder name.
        extra_manifest: more JSON fields for the manifest (e.g. the demo's training settings).
        store_inputs: keep the raw inputs in the index, for rendering (None: for an in-memory
            ``Dataset`` yes, for a streamed one no).
        tokenizer: a language model's ``tokenizers`` JSON file, copied into the index as
            ``tokenizer.json`` (its sha256 in the manifest): the service then takes text queries and
            decodes tokens. Checked against an ``lm_margin``'s vocabulary before any work.
        progress: show progress bars.
        ray: featurize as Ray tasks, one per shard (:mod:`indexer.distributed`, DESIGN.md 2.3); the files are
            those of a single-process build with the same ``shard_examples`` (chosen for the cluster and
            recorded in the manifest's config when the config has none). None: in this process.

    Returns:
        ``out_dir``.

    Raises:
        FileNotFoundError, ValueError: a missing or mismatching checkpoint, empty data, a bad config, a
            model in which examples interact, targets the output function cannot explain.
        BlockingIOError: another process is building the same ``out_dir``.
        ImportError: ``ray`` given without Ray installed (the message says how to install it).
        ConnectionError, RuntimeError: no Ray cluster at the address; a Ray task that failed for good.
    """
    config = config or IndexConfig()
    out_dir = Path(out_dir)
    keep = isinstance(train, Dataset) if store_inputs is None else store_inputs
    started = time.perf_counter()
    probe = _prepare(model, output_fn, train, out_dir, checkpoint, config.batch_size)
    _check_query_probe(queries, probe)
    if tokenizer is not None:
        load_tokenizer(tokenizer, getattr(output_fn, "vocab_size", None))
    check_factory(config.k, config.faiss_factory)
    query_set: Examples = (
        queries if queries is not None else Dataset(probe.first_input[:0], probe.targets[:0])
    )
    with ExitStack() as stack:
        stack.enter_context(build_lock(out_dir))  # before a Ray instance is started for nothing
        cluster = None
        if ray is not None:
            from indexer.distributed import ray_cluster  # Ray is an optional extra

            cluster = stack.enter_context(ray_cluster(ray))
            config = cluster.configure(config, train, queries)
            cluster.put_model(model)  # before the featurizer's hooks are on it
        n_params = count_parameters(model)
        featurizer, projection = make_featurizer(model, config, probe, output_fn)
        if projection.k != config.k:  # the plan's k: the FAISS index is over vectors of this dimension
            check_factory(projection.k, config.faiss_factory)
        rows = shard_rows(featurizer, config.batch_size, config.buffer_bytes, config.shard_examples)
        # beside the output, named like write_index_dir's temporary folder: what a kill leaves behind is
        # removed by the next build that finishes
        scratch = Path(
            stack.enter_context(
                tempfile.TemporaryDirectory(prefix=scratch_prefix(out_dir), dir=out_dir.parent)
            )
        )
        stored_checkpoint = scratch / CHECKPOINT_FILE
        save_checkpoint(model, stored_checkpoint)
        checkpoint_sha256 = sha256_file(stored_checkpoint)
        material = _work_key_material(
            model, output_fn, train, query_set, checkpoint_sha256, config, featurizer, projection
        )
        store = ShardStore(out_dir, work_key(material), material)
        for other in store.others():
            log.warning("%s holds shards of a build of %s with other arguments; not reused", other, out_dir)
        n_outputs = int(probe_outputs(model, probe).shape[1])
        splits = ((SPLIT_TRAIN, train), (SPLIT_QUERY, query_set))
        summed_term = None
        if cluster is not None:  # every shard written by a Ray task; the pass below verifies and reads them
            for split, data in splits:
                term = cluster.featurize(
                    split,
                    data,
                    output_fn=output_fn,
                    config=config,
                    probe=probe,
                    projection=projection.to_json(),
                    folder=store.folder,
                    shard_rows=rows,
                    n_outputs=n_outputs,
                    progress=progress,
                )
                summed_term = term if split == SPLIT_TRAIN else summed_term
        features = {
            split: _featurize(featurizer, output_fn, data, config, store, split, progress, keep, n_outputs)
            for split, data in splits
        }
        if summed_term is not None and store.split(SPLIT_TRAIN).computed:
            # a shard the tasks wrote was not the one this pass found (data that differ between reads, a
            # corrupted file): their data term is not that of the features stored; sum it from those
            log.warning(
                "training shards were featurized again after the Ray tasks; the data term is recomputed"
            )
            summed_term = None
        if isinstance(featurizer, HookFeaturizer):
            featurizer.close()
        tangent, query_tangent = features[SPLIT_TRAIN], features[SPLIT_QUERY]
        if len(query_tangent.phi) and query_tangent.input_shape != tangent.input_shape:
            raise ValueError(
                f"query inputs have shape {list(query_tangent.input_shape)} per example; the training inputs "
                f"have {list(tangent.input_shape)}"
            )
        featurize_seconds = time.perf_counter() - started

        path = assemble_index(
            out_dir,
            tangent,
            query_tangent,
            output_fn,
            config,
            projection,
            model={
                "model_spec": model_spec,
                "checkpoint_sha256": checkpoint_sha256,
                "source_checkpoint_sha256": sha256_file(Path(checkpoint)) if checkpoint is not None else None,
                "n_params": n_params,
                "n_outputs": n_outputs,
                "image_shape": train.image_shape,
            },
            name=name or out_dir.name,
            started=started,
            timings={"featurize": featurize_seconds} | ({} if cluster is None else cluster.timings()),
            extra_manifest=extra_manifest or {},
            keep_inputs=keep,
            extra_files={CHECKPOINT_FILE: stored_checkpoint}
            | ({} if tokenizer is None else {TOKENIZER_FILE: Path(tokenizer)}),
            shard_rows=rows,
            summed_data_term=summed_term,
        )
        # the index is in place: its shards, and whatever killed writes of it left, are no longer needed
        store.remove()
        for stale in remove_stale_siblings(out_dir, keep=scratch):
            log.info("removed %s, left by an interrupted write of %s", stale, out_dir)
        return path


def assemble_index(
    out_dir: Path,
    tangent: Features,
    query_tangent: Features,
    output_fn: OutputFunction,
    config: IndexConfig,
    projection: ProjectionInfo,
    *,
    model: dict[str, Any],
    name: str,
    started: float,
    timings: dict[str, float],
    extra_manifest: dict[str, Any],
    keep_inputs: bool,
    extra_files: dict[str, Path],
    shard_rows: int | None = None,
    summed_data_term: np.ndarray | None = None,
) -> Path:
    """Features in, index directory out: store the features in the configured dtype, fit the surrogate on
    the stored values, build and measure the approximate index when asked for, write atomically
    (DESIGN.md 1.2, 2.1). Shared by :func:`build_index` and
    :func:`~indexer.precomputed.build_from_features`.

    Args:
        out_dir: the index folder; tangent, query_tangent: the training and stored-query features;
        output_fn: the output function; config: the build settings; projection: the manifest's projection;
        model: :func:`~indexer.store.records.build_manifest`'s model fields (``model_spec``,
            ``checkpoint_sha256``, ``source_checkpoint_sha256``, ``n_params``, ``n_outputs``,
            ``image_shape``);
        name: the index name; started: ``time.perf_counter()`` at the build's start; timings: stages so far
            (seconds); extra_manifest: more manifest fields; keep_inputs: store the raw inputs;
        extra_files: file name -> source path copied in (the checkpoint, the tokenizer).
        shard_rows: sum the data term in blocks of this many examples, the featurization shards
            (:func:`~indexer.gp.surrogate.sharded_data_term`; None: in one pass);
        summed_data_term: `(k, k)` float64 data term of the stored features summed elsewhere (a Ray build's
            tasks, DESIGN.md 2.3), used instead.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: a feature beyond float16's range (use ``feature_dtype="float32"``), a degenerate data
            term, or a FAISS factory that cannot be trained on these vectors.
    """
    dtype = config.feature_dtype.value
    tangent = replace(tangent, phi=stored_features(tangent.phi, dtype, SPLIT_TRAIN))
    query_tangent = replace(query_tangent, phi=stored_features(query_tangent.phi, dtype, SPLIT_QUERY))
    t0 = time.perf_counter()
    # beta_i and beta_i r_i come from the featurizer's forward pass (per-token margins, DESIGN.md 1.8)
    if summed_data_term is None and shard_rows is not None:
        summed_data_term = sharded_data_term(tangent.phi, tangent.beta, shard_rows)
    surrogate = fit_surrogate(
        tangent.phi,
        tangent.beta,
        tangent.grad_term,
        config.prior_precision,
        config.s_floor,
        summed_data_term=summed_data_term,
    )
    timings = {**timings, "fit": time.perf_counter() - t0}
    train_stats = example_stats(tangent, output_fn, surrogate)
    t0 = time.perf_counter()
    faiss_index, faiss_info = approximate_retrieval(
        surrogate, train_stats[KEY_PHI_NORM], query_tangent.phi, config
    )
    timings = {**timings, "faiss": time.perf_counter() - t0, "total": time.perf_counter() - started}
    manifest = build_manifest(
        name,
        model["model_spec"],
        model["checkpoint_sha256"],
        model["source_checkpoint_sha256"],
        model["n_params"],
        model["n_outputs"],
        output_fn,
        model["image_shape"],
        tangent,
        surrogate,
        config,
        projection,
        faiss_info,
        n_query=len(query_tangent.phi),
        timings=timings,
        extra=extra_manifest,
    )
    arrays = {
        PHI_FILE: tangent.phi,
        CHOLESKY_FILE: surrogate.cholesky,
        QUERY_PHI_FILE: query_tangent.phi,
        **keyed_files(train_stats, example_file),
        **keyed_files(query_stats(query_tangent, output_fn), query_stats_file),
    }
    if keep_inputs:
        assert tangent.inputs is not None  # kept by tangent_features
        arrays[TRAIN_INPUTS_FILE] = tangent.inputs
        arrays[QUERY_INPUTS_FILE] = (
            query_tangent.inputs
            if query_tangent.inputs is not None
            else np.zeros((0, *tangent.input_shape), dtype=tangent.inputs.dtype)
        )
    return write_index_dir(
        out_dir,
        manifest,
        arrays=arrays,
        faiss_index=faiss_index,
        metadata_rows=metadata_rows(tangent, query_tangent),
        extra_files=extra_files,
    )


def approximate_retrieval(
    surrogate: Surrogate, phi_norm: np.ndarray, query_phi: np.ndarray, config: IndexConfig
) -> tuple[dict[str, faiss.Index] | None, FaissInfo]:
    """The approximate FAISS index of ``config.faiss_factory`` with its recall@10 measured against the exact
    scan on held-out queries (DESIGN.md 2.1); ``(None, exact info)`` for ``"Flat"``. The index is returned
    with its trained, empty copy, which adds fill shards from.

    Args:
        surrogate: the fitted surrogate; phi_norm: `(n_train,)` |phi_i|; query_phi: `(n_query, k)` stored
            query features (the held-out queries, topped up with training features); config: the settings.

    Returns:
        ``({FAISS_FILE: index, FAISS_TRAINED_FILE: trained} or None, FaissInfo)``.

    Raises:
        ValueError: FAISS cannot build or train the factory on these vectors, or a knob the index does not
            take.
    """
    if config.faiss_factory == EXACT_FACTORY:
        return None, FaissInfo(factory=EXACT_FACTORY)
    scale = vector_scale(surrogate, seed=config.seed)
    trained = trained_approximate_index(surrogate, config.faiss_factory, seed=config.seed, scale=scale)
    index = fill_approximate_index(faiss.clone_index(trained), surrogate, 0, scale)
    knobs = SearchKnobs(nprobe=config.nprobe, ef_search=config.ef_search)
    search_params(index, knobs)  # refuse a knob this index does not take
    queries = recall_queries(surrogate, query_phi, config.recall_queries, seed=config.seed)
    exact = Searcher(surrogate, phi_norm)
    approximate = Searcher(surrogate, phi_norm, index, knobs)
    recall = measure_recall(exact, approximate, queries, config.search_depth)
    log.info("approximate index %s: recall@10 %s", config.faiss_factory, recall)
    return {FAISS_FILE: index, FAISS_TRAINED_FILE: trained}, FaissInfo(
        factory=config.faiss_factory,
        recall_at_10=recall,
        recall_queries=len(queries),
        recall_candidates=config.search_depth,
        nprobe=config.nprobe,
        ef_search=config.ef_search,
        vector_scale=scale,
    )


def _check_query_probe(queries: Examples | None, probe: Batch) -> None:
    """Refuse stored queries whose inputs or targets differ in shape per example from the training
    examples' before the training set is featurized (their first batch is read; the rest are checked as
    they are featurized).

    Raises:
        ValueError: names the query arrays' shapes.
    """
    if queries is None or (isinstance(queries, Dataset) and len(queries) == 0):
        return
    first = next(iter(queries.batches(1)), None)
    if first is None:
        return
    try:
        check_batch(first, probe)
    except ValueError as exc:
        why = str(exc).replace("the first batch's", "the training examples'")
        raise ValueError(f"query examples do not match the training examples: {why}") from exc


def check_index_name(out_dir: Path) -> None:
    """Refuse an index folder name the service could not serve (it serves an index under its folder name).

    Raises:
        ValueError: the name does not match :data:`~indexer.store.layout.INDEX_NAME_PATTERN`.
    """
    if not re.fullmatch(INDEX_NAME_PATTERN, Path(out_dir).name):
        raise ValueError(
            f"index folder name {Path(out_dir).name!r} must match {INDEX_NAME_PATTERN} (letters, digits, "
            "'_', '.', '-'): the service serves an index under its folder name"
        )


def _prepare(
    model: nn.Module,
    output_fn: OutputFunction,
    train: Examples,
    out_dir: Path,
    checkpoint: Path | None,
    batch_size: int,
) -> Batch:
    """Refuse a bad folder name, empty data, a model whose examples interact or unexplainable targets
    before any work; load the weights and switch to eval mode.

    Returns:
        The first training batch (the probe).
    """
    check_index_name(out_dir)
    if checkpoint is not None:
        load_checkpoint(model, Path(checkpoint))
    model.eval()
    probe = next(iter(train.batches(batch_size)), None)
    if probe is None or len(probe) == 0:
        raise ValueError("the training set is empty")
    check_targets(output_fn, probe.targets, int(probe_outputs(model, probe).shape[1]), SPLIT_TRAIN, 0)
    _check_independent(model, probe)
    return probe


def _check_independent(model: nn.Module, probe: Batch) -> None:
    """Refuse a model whose outputs for one example change with the other examples of its batch."""
    if len(probe) < 2 or isinstance(probe.inputs, dict):
        return
    interacting = ValueError(
        "the model's output for an example changes with the other examples in its batch (batch "
        "statistics or cross-example attention): per-example tangent features would be wrong; make each "
        "output depend on its own input alone"
    )
    with torch.no_grad():
        together = probe_outputs(model, Batch(probe.inputs[:2], probe.targets[:2]))
        try:
            alone = torch.cat(
                [probe_outputs(model, Batch(probe.inputs[i : i + 1], probe.targets[:1])) for i in (0, 1)]
            )
        except ValueError as exc:  # e.g. batch norm on batch statistics refuses a batch of one
            raise interacting from exc
    if not torch.allclose(together, alone, rtol=1e-4, atol=1e-5 * float(alone.abs().max()) + 1e-12):
        raise interacting


def _featurize(
    featurizer: Featurizer,
    output_fn: OutputFunction,
    data: Examples,
    config: IndexConfig,
    store: ShardStore,
    split: str,
    progress: bool,
    keep_inputs: bool,
    n_outputs: int,
) -> Features:
    """Projected tangent features of one split, reusing and filling its shards; every batch's targets are
    checked before it is featurized."""
    shards = store.split(split)
    total = len(data) if isinstance(data, Dataset) else None
    features = tangent_features(
        featurizer,
        output_fn,
        checked_batches(data, config.batch_size, output_fn, n_outputs, split),
        batch_size=config.batch_size,
        buffer_bytes=config.buffer_bytes,
        progress=f"featurize {split}" if progress else None,
        cache=shards,
        keep_inputs=keep_inputs,
        total=total,
        shard_examples=config.shard_examples,
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
    train: Examples,
    queries: Examples,
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
        "buffer_rows": shard_rows(featurizer, config.batch_size, config.buffer_bytes, config.shard_examples),
        # in-memory data by content; a streamed source by name (each shard also records its data's sha256)
        "train": _data_key(train),
        "query": _data_key(queries),
        # other kernels may round differently
        "torch": torch.__version__,
        "numpy": np.__version__,
        "device": str(device),
    }


def _data_key(data: Examples) -> dict[str, Any]:
    if isinstance(data, Dataset):
        return {"inputs": tensor_digest(data.inputs), "targets": tensor_digest(data.targets)}
    return {"source": f"{type(data.source).__module__}.{type(data.source).__qualname__}"}


def probe_outputs(model: nn.Module, batch: Batch) -> torch.Tensor:
    """`(B, n_outputs)` the model's raw outputs on one batch, without gradients.

    Raises:
        ValueError: the model rejects the batch (the message names its input shape and dtype).
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    first = batch.first_input
    try:
        with torch.no_grad():
            out = model_outputs(model, to_device(batch.inputs, device))
    except (RuntimeError, TypeError, IndexError) as exc:  # e.g. "mat1 and mat2 shapes cannot be multiplied"
        raise ValueError(
            f"the model rejects inputs of shape {list(first.shape[1:])} per example "
            f"(dtype {first.dtype}): {exc} (give inputs of the shape and dtype the model takes: floats for a "
            "model whose first layer is Linear or Conv, integer token ids for an Embedding)"
        ) from exc
    return out.reshape(len(batch), -1).float().cpu()
