"""Adding and removing training examples (DESIGN.md 2.1): an update of the posterior plus the appended or
dropped rows, written as a new version of the index folder.

The posterior precision is ``A = tau I + sum_i beta_i phi_i phi_i^T`` with tau kept at the recorded value, so
adding examples adds their data term and removing examples subtracts theirs (the downdate: the surrogate as
if they had never been there); A is re-factored (k x k, float64) and h_i, s_i of every example are
recomputed from the stored features a chunk at a time (they all change with the posterior). The
information-gain vectors depend on tau only, so an approximate FAISS index gets the new vectors appended
(removal rebuilds its lists from the kept vectors with the trained quantizer) and its recall is measured
again. The result equals a fresh build on the resulting set with the same tau.

The new version is written into a temporary sibling folder and renamed into place under the build lock
(:func:`~indexer.store.writer.write_index_dir`): a crash at any point leaves the old version served and
intact. Example ids are positions: after a removal the kept examples are renumbered in order (as a fresh
build would number them); each keeps its metadata.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from indexer.data import Dataset, Examples
from indexer.features.featurize import DenseFeaturizer, Features, Featurizer, count_parameters
from indexer.features.hooks import HookFeaturizer
from indexer.features.models import build_model, load_checkpoint
from indexer.features.projection import DenseProjection, KroneckerProjection
from indexer.features.stream import check_finite_inputs, check_targets, tangent_features
from indexer.features.tasks import OutputFunction, output_function_from_spec
from indexer.gp.surrogate import Surrogate, whiten
from indexer.store.layout import (
    CHECKPOINT_FILE,
    CHOLESKY_FILE,
    FORMAT_VERSION,
    KEY_BETA,
    KEY_GRAD_TERM,
    KEY_H,
    KEY_PHI_NORM,
    KEY_S,
    PHI_FILE,
    QUERY_INPUTS_FILE,
    QUERY_PHI_FILE,
    SPLIT_QUERY,
    SPLIT_TRAIN,
    TOKENIZER_FILE,
    TRAIN_INPUTS_FILE,
    example_file,
    query_stats_file,
)
from indexer.store.reader import IndexData, load_index
from indexer.store.records import example_stats, keyed_files, stored_features
from indexer.store.search import (
    Searcher,
    SearchKnobs,
    information_gain_vectors,
    measure_recall,
    recall_queries,
)
from indexer.store.sections import EXACT_FACTORY, FaissInfo
from indexer.store.shards import build_lock, remove_stale_siblings
from indexer.store.writer import MetadataRow, write_index_dir

__all__ = ["add_examples", "add_features", "remove_examples", "index_featurizer"]

log = logging.getLogger("infotrace.indexer")

_CHUNK = 65536


def index_featurizer(data: IndexData) -> tuple[Featurizer, OutputFunction]:
    """The index's own model and projection, rebuilt from its manifest and checkpoint, as a featurizer.

    Raises:
        ValueError: the index has no model (built from precomputed features) or its model cannot be rebuilt.
    """
    info = data.manifest.model
    if info.spec is None or CHECKPOINT_FILE not in data.manifest.files:
        raise ValueError(
            f"index {data.name!r} has no model (built from precomputed features): add features with "
            "add_features / infotrace-index add-features"
        )
    model = build_model(info.spec)
    load_checkpoint(model, data.path / CHECKPOINT_FILE)
    model.eval()
    output_fn = output_function_from_spec(info.output_function, info.output_params)
    proj = data.manifest.projection
    if proj.kind == "kronecker":
        plan = KroneckerProjection.from_coverage_json(proj.seed, proj.entries, proj.coverage or {})
        return HookFeaturizer(model, plan), output_fn
    return DenseFeaturizer(
        model, DenseProjection(count_parameters(model), proj.k, proj.seed, proj.entries)
    ), output_fn


def _data_term(phi: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """sum_i beta_i phi_i phi_i^T in float64, a chunk of rows at a time."""
    k = phi.shape[1]
    term = np.zeros((k, k))
    for start in range(0, len(phi), _CHUNK):
        chunk = np.asarray(phi[start : start + _CHUNK], dtype=np.float64)
        term += (chunk * beta[start : start + _CHUNK, None]).T @ chunk
    return term


def _refit(
    data: IndexData, phi: np.ndarray, beta: np.ndarray, grad_term: np.ndarray, delta: np.ndarray
) -> Surrogate:
    """The surrogate on ``phi`` whose precision is the old one plus ``delta`` (tau unchanged)."""
    old = data.surrogate
    precision = old.cholesky @ old.cholesky.T + delta
    try:
        cholesky = np.linalg.cholesky(precision)
    except np.linalg.LinAlgError as exc:
        raise ValueError(
            "the posterior precision is no longer positive definite after the downdate (float rounding with "
            "examples that dominate it): rebuild the index from its remaining examples instead"
        ) from exc
    h = np.empty(len(phi))
    for start in range(0, len(phi), _CHUNK):
        u = whiten(cholesky, phi[start : start + _CHUNK])
        h[start : start + _CHUNK] = np.einsum("nk,nk->n", u, u)
    floor = data.manifest.surrogate.s_floor
    s_raw = 1.0 - beta * h
    return Surrogate(
        prior_precision=old.prior_precision,
        cholesky=cholesky,
        phi=phi,
        beta=beta,
        grad_term=grad_term,
        h=h,
        s=np.maximum(s_raw, floor),
        s_floor=floor,
        n_clamped=int(np.sum(s_raw < floor)),
    )


def _metadata_rows(data: IndexData, keep: np.ndarray, added: Features | None) -> list[MetadataRow]:
    """Every row of the new ``metadata.sqlite``: kept training rows renumbered, the added ones after them,
    the stored queries as they were."""
    rows = data.metadata.all_rows()
    train = {row: (label, meta) for split, row, label, meta in rows if split == SPLIT_TRAIN}
    out: list[MetadataRow] = [
        (SPLIT_TRAIN, new, *train[int(old)])
        for new, old in enumerate(keep)  # type: ignore[misc]
    ]
    if added is not None:
        start = len(keep)
        for i in range(len(added.phi)):
            target = added.targets[i]
            label: Any = np.asarray(target).tolist() if np.ndim(target) else np.asarray(target).item()
            out.append((SPLIT_TRAIN, start + i, label, added.metadata[i] if added.metadata else {}))
    out += [(split, row, label, meta) for split, row, label, meta in rows if split == SPLIT_QUERY]
    return out


def _faiss(data: IndexData, surrogate: Surrogate, appended_from: int | None) -> faiss.Index | None:
    """The approximate index of the new version: the old one with the new vectors appended, or (after a
    removal) its lists refilled from the kept vectors with the trained quantizer."""
    if data.faiss_index is None:
        return None
    index = faiss.clone_index(data.faiss_index)
    start = appended_from
    if start is None:
        index.reset()
        start = 0
    scale = data.manifest.faiss.vector_scale  # the constant the build scaled the vectors by
    for lo in range(start, surrogate.n_train, _CHUNK):
        index.add(information_gain_vectors(surrogate, slice(lo, min(lo + _CHUNK, surrogate.n_train)), scale))
    return index


def _update(
    index_dir: Path,
    data: IndexData,
    added: Features | None,
    removed: np.ndarray,
    operation: dict[str, Any],
    started: float,
) -> Path:
    n = data.n_train
    keep = np.setdiff1d(np.arange(n), removed)
    ex = data.examples
    dtype = data.manifest.counts.feature_dtype
    delta = np.zeros((data.k, data.k))
    parts_phi = [np.asarray(data.phi[keep]) if len(removed) else np.asarray(data.phi)]
    beta, grad_term = np.asarray(ex[KEY_BETA])[keep], np.asarray(ex[KEY_GRAD_TERM])[keep]
    if len(removed):
        delta -= _data_term(data.phi[removed], np.asarray(ex[KEY_BETA])[removed])
    if added is not None:
        delta += _data_term(added.phi, added.beta)
        parts_phi.append(added.phi)
        beta, grad_term = np.concatenate([beta, added.beta]), np.concatenate([grad_term, added.grad_term])
    phi = np.concatenate(parts_phi) if len(parts_phi) > 1 else parts_phi[0]
    surrogate = _refit(data, phi, beta, grad_term, delta)
    stats: dict[str, np.ndarray] = {}
    new_stats = None
    if added is not None:
        output_fn = output_function_from_spec(
            data.manifest.model.output_function, data.manifest.model.output_params
        )
        new_stats = example_stats(added, output_fn, surrogate)
        missing = sorted(set(ex) - set(new_stats) - {KEY_H, KEY_S, KEY_BETA, KEY_GRAD_TERM})
        if missing:
            raise ValueError(f"the added examples lack {missing}, which the index keeps for every example")
    for key, values in ex.items():
        if key in (KEY_BETA, KEY_GRAD_TERM, KEY_H, KEY_S):
            continue
        kept = np.asarray(values)[keep]
        stats[key] = kept if new_stats is None else np.concatenate([kept, new_stats[key].astype(kept.dtype)])
    stats |= {KEY_BETA: beta, KEY_GRAD_TERM: grad_term, KEY_H: surrogate.h, KEY_S: surrogate.s}
    arrays = {
        PHI_FILE: phi.astype(dtype, copy=False),
        CHOLESKY_FILE: surrogate.cholesky,
        QUERY_PHI_FILE: np.asarray(data.query_phi),
        **keyed_files(stats, example_file),
        **keyed_files({key: np.asarray(v) for key, v in data.queries.items()}, query_stats_file),
    }
    if data.inputs is not None:
        if added is not None and added.inputs is None:
            raise ValueError("the index keeps its training inputs; give the added examples' inputs too")
        kept_inputs = np.asarray(data.inputs)[keep]
        arrays[TRAIN_INPUTS_FILE] = (
            kept_inputs
            if added is None
            else np.concatenate([kept_inputs, np.asarray(added.inputs, kept_inputs.dtype)])
        )
        assert data.query_inputs is not None
        arrays[QUERY_INPUTS_FILE] = np.asarray(data.query_inputs)
    faiss_index = _faiss(data, surrogate, None if len(removed) else n)
    info = data.manifest.faiss
    if faiss_index is not None:
        knobs = SearchKnobs(nprobe=info.nprobe, ef_search=info.ef_search)
        seed = int(data.manifest.config.get("seed", 0))
        queries = recall_queries(surrogate, data.query_phi, info.recall_queries, seed=seed)
        norms = stats[KEY_PHI_NORM]
        recall = measure_recall(
            Searcher(surrogate, norms),
            Searcher(surrogate, norms, faiss_index, knobs),
            queries,
            info.recall_candidates,
        )
        info = replace(info, recall_at_10=recall, recall_queries=len(queries))
    m = data.manifest
    history = list(m.extra.get("updates", []))
    history.append({**operation, "n_train": surrogate.n_train, "seconds": time.perf_counter() - started})
    if faiss_index is None and not info.exact:  # a format-1 index's per-score flat files: the exact scan now
        info = FaissInfo(factory=EXACT_FACTORY)
    manifest = replace(
        m,
        format_version=FORMAT_VERSION,  # a format-1 index is rewritten in today's layout
        surrogate=replace(m.surrogate, n_train=surrogate.n_train, n_clamped=surrogate.n_clamped),
        counts=replace(m.counts, n_train=surrogate.n_train),
        faiss=info,
        created_unix=time.time(),
        extra={**m.extra, "version": int(m.extra.get("version", 1)) + 1, "updates": history},
        files={},
    )
    extra_files = {name: data.path / name for name in (CHECKPOINT_FILE, TOKENIZER_FILE) if name in m.files}
    path = write_index_dir(
        index_dir,
        manifest,
        arrays=arrays,
        faiss_index=faiss_index,
        metadata_rows=_metadata_rows(data, keep, added),
        extra_files=extra_files,
    )
    for stale in remove_stale_siblings(index_dir):  # under the lock: what killed updates left behind
        log.info("removed %s, left by an interrupted write of %s", stale, index_dir)
    return path


def _check_added(data: IndexData, features: Features) -> Features:
    if features.phi.ndim != 2 or features.phi.shape[1] != data.k:
        raise ValueError(f"added features must have shape (m, {data.k}); got {list(features.phi.shape)}")
    if len(features.phi) == 0:
        raise ValueError("nothing to add: no examples given")
    return replace(features, phi=stored_features(features.phi, data.manifest.counts.feature_dtype, "added"))


def add_features(
    index_dir: Path,
    phi: np.ndarray,
    *,
    outputs: np.ndarray,
    targets: np.ndarray,
    beta: np.ndarray | None = None,
    grad_term: np.ndarray | None = None,
    metadata: list[dict[str, Any]] | None = None,
) -> Path:
    """Append training examples given by their projected features (an index built from precomputed
    features, or features made with the index's own projection).

    Args:
        index_dir: the index folder (replaced by its new version).
        phi: `(m, k)` features; outputs: `(m,)` m_i; targets: `(m,)`; beta, grad_term: `(m,)` overrides (both
            or neither); metadata: m dicts.

    Returns:
        ``index_dir``.

    Raises:
        ValueError: shapes, non-finite values, an index that keeps inputs or predictions the features lack.
        BlockingIOError: another build or update of the index is running.
    """
    from indexer.precomputed import precomputed_features  # the precomputed module imports the build

    started = time.perf_counter()
    with build_lock(Path(index_dir)):
        data = load_index(index_dir)
        output_fn = output_function_from_spec(
            data.manifest.model.output_function, data.manifest.model.output_params
        )
        added = _check_added(
            data, precomputed_features(phi, outputs, targets, output_fn, beta, grad_term, metadata, "added")
        )
        return _update(
            Path(index_dir),
            data,
            added,
            np.zeros(0, dtype=np.int64),
            {"op": "add", "count": len(added.phi)},
            started,
        )


def add_examples(index_dir: Path, examples: Examples, batch_size: int = 128, progress: bool = False) -> Path:
    """Append training examples, featurized with the index's own model and projection (its checkpoint and
    manifest), tau kept at the recorded value.

    Args:
        index_dir: the index folder (replaced by its new version).
        examples: the new examples (inputs and targets as at build; a :class:`~indexer.data.Dataset` keeps
            its inputs for rendering when the index does).
        batch_size: examples per forward and backward pass.
        progress: show a progress bar.

    Returns:
        ``index_dir``.

    Raises:
        ValueError: the index has no model, the examples do not fit it, NaN inputs, bad targets.
        BlockingIOError: another build or update of the index is running.
    """
    started = time.perf_counter()
    with build_lock(Path(index_dir)):
        data = load_index(index_dir)
        featurizer, output_fn = index_featurizer(data)

        def checked():
            start = 0
            for batch in examples.batches(batch_size):
                check_finite_inputs(batch, "added", start)
                check_targets(output_fn, batch.targets, data.manifest.model.n_outputs, "added", start)
                start += len(batch)
                yield batch

        try:
            features = tangent_features(
                featurizer,
                output_fn,
                checked(),
                batch_size=batch_size,
                progress="featurize added" if progress else None,
                keep_inputs=data.inputs is not None,
                total=len(examples) if isinstance(examples, Dataset) else None,
            )
        finally:
            if isinstance(featurizer, HookFeaturizer):
                featurizer.close()
        added = _check_added(data, features)
        return _update(
            Path(index_dir),
            data,
            added,
            np.zeros(0, dtype=np.int64),
            {"op": "add", "count": len(added.phi)},
            started,
        )


def remove_examples(index_dir: Path, ids: list[int] | np.ndarray) -> Path:
    """Remove training examples: the posterior downdate, the surrogate as if they had never been there.

    Args:
        index_dir: the index folder (replaced by its new version).
        ids: training example ids (current positions); the kept examples are renumbered in order.

    Returns:
        ``index_dir``.

    Raises:
        ValueError: no ids, repeated ids, ids out of range, or every example removed.
        BlockingIOError: another build or update of the index is running.
    """
    started = time.perf_counter()
    removed = np.asarray(ids, dtype=np.int64).reshape(-1)
    if len(removed) == 0:
        raise ValueError("nothing to remove: no ids given")
    if len(np.unique(removed)) != len(removed):
        raise ValueError("ids to remove must be distinct")
    with build_lock(Path(index_dir)):
        data = load_index(index_dir)
        bad = removed[(removed < 0) | (removed >= data.n_train)]
        if len(bad):
            raise ValueError(
                f"no training examples with ids {bad[:5].tolist()}; valid ids are 0..{data.n_train - 1}"
            )
        if len(removed) == data.n_train:
            raise ValueError("cannot remove every training example; delete the index folder instead")
        return _update(
            Path(index_dir), data, None, np.sort(removed), {"op": "remove", "count": len(removed)}, started
        )
