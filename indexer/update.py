"""Adding and removing training examples (DESIGN.md 2.1): an update of the posterior plus the appended or
dropped rows, written as a new version of the index folder.

The posterior precision is ``A = tau I + sum_i beta_i phi_i phi_i^T`` with tau kept at the recorded value, so
adding examples adds their data term and removing examples subtracts theirs (the downdate: the surrogate as
if they had never been there); A is re-factored (k x k, float64). The information-gain vectors depend on
tau only, so an approximate FAISS index gets the new vectors appended (removal rebuilds its lists from the
kept vectors with the trained quantizer) and its recall is measured again. The result equals a fresh build
on the resulting set with the same tau.

An add costs what it adds, not what the index holds (the 1M x 512 scale benchmark: docs/SCALE.md):
- h_i and s_i of the examples already there change with the posterior, but only one way (more data: h
  falls, s rises), so their stored values are kept as bounds and the exact values are computed on demand
  (:mod:`indexer.gp.leverage`; recomputing all is N k^2 float64 operations, like a fit);
- the added features are a new file (``phi.<j>.npy``, :mod:`indexer.segments`) and the unchanged files
  (earlier feature segments, stored queries, checkpoint, tokenizer) are hard-linked into the new version
  with their recorded checksums; after :data:`MAX_PHI_SEGMENTS` files the features are compacted into one;
- an approximate index's new vectors fill a shard of their own (``faiss.<j>.index``), started from the
  trained, empty copy the build saved (``faiss.trained.index``); the earlier shards are linked, and
  searches merge the shards (an IVF index's shards share the quantizer, so they answer as one index
  would); after :data:`MAX_FAISS_SHARDS` shards the index is refilled as one file;
- the metadata table is copied as a file and the new rows inserted.
A removal rewrites the features without the removed rows and recomputes every h_i and s_i (a downdate
raises them, so the stored values bound nothing); every stored value is then exact again.

The new version is written into a temporary sibling folder and renamed into place under the build lock
(:func:`~indexer.store.writer.write_index_dir`): a crash at any point leaves the old version served and
intact. Example ids are positions: after a removal the kept examples are renumbered in order (as a fresh
build would number them); each keeps its metadata.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
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
from indexer.gp.leverage import LeverageColumn, OnDemandLeverage
from indexer.gp.surrogate import Surrogate, whiten
from indexer.segments import RowSegments
from indexer.store.faiss_index import merged_shards, read_faiss_index, shards_of
from indexer.store.layout import (
    CHECKPOINT_FILE,
    CHOLESKY_FILE,
    FAISS_FILE,
    FAISS_TRAINED_FILE,
    FORMAT_VERSION,
    KEY_BETA,
    KEY_GRAD_TERM,
    KEY_H,
    KEY_PHI_NORM,
    KEY_S,
    METADATA_FILE,
    PHI_FILE,
    QUERY_INPUTS_FILE,
    QUERY_PHI_FILE,
    QUERY_STATS_FILE_PREFIX,
    SPLIT_TRAIN,
    SQLITE_TABLE,
    TOKENIZER_FILE,
    TRAIN_INPUTS_FILE,
    example_file,
    faiss_shard_file,
    phi_segment_file,
    query_stats_file,
)
from indexer.store.manifest import Manifest, read_manifest
from indexer.store.reader import IndexData, load_index
from indexer.store.records import example_stats, keyed_files, model_stats, stored_features
from indexer.store.search import (
    Searcher,
    SearchKnobs,
    fill_approximate_index,
    measure_recall,
    recall_queries,
)
from indexer.store.sections import EXACT_FACTORY, FaissInfo, FileEntry
from indexer.store.shards import build_lock, remove_stale_siblings
from indexer.store.writer import METADATA_SCHEMA, MetadataRow, metadata_values, write_index_dir

__all__ = ["add_examples", "add_features", "remove_examples", "index_featurizer"]

log = logging.getLogger("infotrace.indexer")

_CHUNK = 65536

MAX_PHI_SEGMENTS = 16
"""Feature files an index may hold: the add that would make one more writes them as one instead."""

MAX_FAISS_SHARDS = 16
"""Files of an approximate index: the add that would make one more refills the index as one file."""


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


def _added_rows(added: Features, start: int) -> list[MetadataRow]:
    """The metadata rows of the added examples, numbered from ``start``."""
    out: list[MetadataRow] = []
    for i in range(len(added.phi)):
        target = added.targets[i]
        label: Any = np.asarray(target).tolist() if np.ndim(target) else np.asarray(target).item()
        out.append((SPLIT_TRAIN, start + i, label, added.metadata[i] if added.metadata else {}))
    return out


def _metadata(data: IndexData, keep: np.ndarray, added: Features | None) -> Callable[[Path], None]:
    """Writes the new ``metadata.sqlite``: kept training rows renumbered, the added ones after them, the
    stored queries as they were. Rows are copied as SQLite holds them (no JSON decoded or encoded again);
    with every training row kept, the file itself is copied and the added rows inserted."""
    source = data.path / METADATA_FILE
    n = data.n_train
    insert = f"INSERT INTO {SQLITE_TABLE} VALUES (?, ?, ?, ?)"

    def write(path: Path) -> None:
        if len(keep) == n:
            shutil.copyfile(source, path)
            with sqlite3.connect(path) as db:
                if added is not None:
                    db.executemany(insert, metadata_values(_added_rows(added, n)))
        else:
            with sqlite3.connect(f"file:{source}?mode=ro&immutable=1", uri=True) as old:
                rows = old.execute(f"SELECT split, row, label, metadata FROM {SQLITE_TABLE}").fetchall()
            renumbered = np.full(n, -1, dtype=np.int64)
            renumbered[keep] = np.arange(len(keep))
            with sqlite3.connect(path) as db:
                db.execute(METADATA_SCHEMA)
                db.executemany(
                    insert,
                    [
                        (split, int(renumbered[row]) if split == SPLIT_TRAIN else row, label, meta)
                        for split, row, label, meta in rows
                        if split != SPLIT_TRAIN or renumbered[row] >= 0
                    ],
                )
                if added is not None:
                    db.executemany(insert, metadata_values(_added_rows(added, len(keep))))
        sqlite3.connect(path).close()  # rollback-journal mode: one self-contained file

    return write


@dataclass(frozen=True)
class _FaissVersion:
    """The approximate index of a new version: ``search`` (every vector, for the recall measurement),
    ``files`` to write, old ``linked`` files kept, and the vectors per shard (None: one file)."""

    search: faiss.Index | None = None
    files: dict[str, faiss.Index] = field(default_factory=dict)
    linked: list[str] = field(default_factory=list)
    shards: list[int] | None = None


def _faiss_shards(data: IndexData) -> list[int]:
    info = data.manifest.faiss
    return list(info.shards or [data.n_train])


def _trained(data: IndexData) -> tuple[faiss.Index, bool]:
    """The trained, empty approximate index, and whether it was read from its file (an index built before
    the file was saved: its first file read whole and emptied)."""
    info, k = data.manifest.faiss, data.k
    if FAISS_TRAINED_FILE in data.manifest.files:
        return read_faiss_index(data.path / FAISS_TRAINED_FILE, 0, k, info.factory, memory_map=False), True
    count = _faiss_shards(data)[0]
    index = read_faiss_index(data.path / FAISS_FILE, count, k, info.factory, memory_map=False)
    index.reset()
    return index, False


def _faiss(data: IndexData, surrogate: Surrogate, appended_from: int | None) -> _FaissVersion:
    """The approximate index of the new version: after an add, a new shard holding the new vectors (or,
    at :data:`MAX_FAISS_SHARDS`, and after a removal, one index refilled from every kept vector)."""
    if data.faiss_index is None:
        return _FaissVersion()
    scale = data.manifest.faiss.vector_scale  # the constant the build scaled the vectors by
    trained, saved = _trained(data)
    # the loaded index is memory-mapped read-only: FAISS aborts on adding to it, so shards start from copies
    files = {} if saved else {FAISS_TRAINED_FILE: trained}
    linked = [FAISS_TRAINED_FILE] if saved else []
    counts = _faiss_shards(data)
    if appended_from is not None and len(counts) < MAX_FAISS_SHARDS:
        shard = fill_approximate_index(faiss.clone_index(trained), surrogate, appended_from, scale)
        files[faiss_shard_file(len(counts))] = shard
        linked += [faiss_shard_file(j) for j in range(len(counts))]
        parts = shards_of(data.faiss_index)
        counts.append(surrogate.n_train - appended_from)
        return _FaissVersion(merged_shards([*parts, shard]), files, linked, counts)
    index = fill_approximate_index(faiss.clone_index(trained), surrogate, 0, scale)
    files[FAISS_FILE] = index
    return _FaissVersion(index, files, linked, None)


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
    stats |= {
        KEY_BETA: beta,
        KEY_GRAD_TERM: grad_term,
        KEY_H: np.asarray(surrogate.h),
        KEY_S: np.asarray(surrogate.s),
    }
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
    faiss_version = _faiss(data, surrogate, None if len(removed) else n)
    linked = _linked(
        data, [name for name in (CHECKPOINT_FILE, TOKENIZER_FILE) if name in data.manifest.files]
    )
    return _write_version(
        index_dir, data, surrogate, arrays, faiss_version, stats[KEY_PHI_NORM], operation, started,
        keep=keep, added=added, linked=linked, phi_segments=None,
    )  # fmt: skip


def _write_version(
    index_dir: Path,
    data: IndexData,
    surrogate: Surrogate,
    arrays: dict[str, np.ndarray],
    faiss_version: _FaissVersion,
    phi_norm: np.ndarray,
    operation: dict[str, Any],
    started: float,
    *,
    keep: np.ndarray,
    added: Features | None,
    linked: dict[str, tuple[Path, FileEntry]],
    phi_segments: list[int] | None,
) -> Path:
    """Write the new version of ``index_dir`` atomically (:func:`~indexer.store.writer.write_index_dir`)
    in today's format, with the recall remeasured and the operation recorded in the history, then clear
    what killed updates left beside it. An add (``phi_segments`` given) keeps the old examples' h and s as
    bounds (``leverage_bounds``); every other update stores exact values.

    Returns:
        the index directory.
    """
    m = data.manifest
    manifest = replace(
        m,
        format_version=FORMAT_VERSION,  # a format-1 index is rewritten in today's layout
        surrogate=replace(
            m.surrogate,
            n_train=surrogate.n_train,
            n_clamped=surrogate.n_clamped,
            leverage_bounds=phi_segments is not None,
        ),
        counts=replace(
            m.counts,
            n_train=surrogate.n_train,
            phi_segments=phi_segments if phi_segments is not None and len(phi_segments) > 1 else None,
        ),
        faiss=replace(
            _remeasured(data, surrogate, faiss_version.search, phi_norm), shards=faiss_version.shards
        ),
        created_unix=time.time(),
        extra=_history(m, operation, surrogate.n_train, started),
        files={},
    )
    path = write_index_dir(
        index_dir,
        manifest,
        arrays=arrays,
        faiss_index=faiss_version.files or None,
        metadata_rows=_metadata(data, keep, added),
        extra_files={},
        linked_files={**linked, **_linked(data, faiss_version.linked)},
    )
    for stale in remove_stale_siblings(index_dir):  # under the lock: what killed updates left behind
        log.info("removed %s, left by an interrupted write of %s", stale, index_dir)
    return path


def _linked(data: IndexData, names: list[str]) -> dict[str, tuple[Path, FileEntry]]:
    """``names`` of the old version as :func:`~indexer.store.writer.write_index_dir`'s linked files."""
    return {name: (data.path / name, data.manifest.files[name]) for name in names}


def _kept_files(manifest: Manifest) -> list[str]:
    """Files an add links unchanged into the new version: the feature segments and the approximate index's
    shards (unless the add compacts them), its trained copy, the stored queries' files, the checkpoint and
    the tokenizer."""
    segments = manifest.counts.phi_segments or [manifest.counts.n_train]
    names = [phi_segment_file(j) for j in range(len(segments))] if len(segments) < MAX_PHI_SEGMENTS else []
    shards = manifest.faiss.shards or [manifest.counts.n_train]
    if not manifest.faiss.exact and len(shards) < MAX_FAISS_SHARDS:
        names += [faiss_shard_file(j) for j in range(len(shards))]
    names += [FAISS_TRAINED_FILE, QUERY_PHI_FILE, CHECKPOINT_FILE, TOKENIZER_FILE, QUERY_INPUTS_FILE]
    names += [name for name in manifest.files if name.startswith(QUERY_STATS_FILE_PREFIX)]
    return [name for name in names if name in manifest.files]


def _append(index_dir: Path, data: IndexData, added: Features, started: float) -> Path:
    """The new version with ``added`` appended (module docstring: what it keeps, links and bounds)."""
    m = data.manifest
    n, ex, old = data.n_train, data.examples, data.surrogate
    # the precision only grows: positive definite plus positive semi-definite, no downdate to fail
    cholesky = np.linalg.cholesky(old.cholesky @ old.cholesky.T + _data_term(added.phi, added.beta))
    u = whiten(cholesky, added.phi)
    h_added = np.einsum("nk,nk->n", u, u)
    s_raw = 1.0 - added.beta * h_added
    floor = m.surrogate.s_floor
    beta = np.concatenate([ex[KEY_BETA], added.beta])
    grad_term = np.concatenate([ex[KEY_GRAD_TERM], added.grad_term])
    # stored h, s of the examples already there: exact for the old posterior, bounds for the new one
    h_bound = np.concatenate([ex[KEY_H], h_added])
    s_bound = np.concatenate([ex[KEY_S], np.maximum(s_raw, floor)])
    linked = _linked(data, _kept_files(m))
    segments = list(m.counts.phi_segments or [n])
    arrays: dict[str, np.ndarray] = {CHOLESKY_FILE: cholesky}
    if phi_segment_file(0) in linked:  # append a segment
        phi: np.ndarray | RowSegments = RowSegments(
            [*(data.phi.parts if isinstance(data.phi, RowSegments) else [data.phi]), added.phi]
        )
        arrays[phi_segment_file(len(segments))] = added.phi
        segments.append(len(added.phi))
    else:  # compact every segment into one file
        phi = np.concatenate([np.asarray(data.phi), added.phi])
        arrays[PHI_FILE] = phi
        segments = [n + len(added.phi)]
    leverage = OnDemandLeverage(cholesky, phi, beta, h_bound, s_bound, floor)
    leverage.h(np.arange(n, n + len(added.phi)))  # the added rows' exact values, known already
    surrogate = Surrogate(
        prior_precision=old.prior_precision,
        cholesky=cholesky,
        phi=phi,
        beta=beta,
        grad_term=grad_term,
        h=LeverageColumn(leverage, "h"),
        s=LeverageColumn(leverage, "s"),
        s_floor=floor,
        n_clamped=m.surrogate.n_clamped + int(np.sum(s_raw < floor)),  # an upper bound
    )
    output_fn = output_function_from_spec(m.model.output_function, m.model.output_params)
    new_stats = model_stats(added, output_fn)
    missing = sorted(set(ex) - set(new_stats) - {KEY_H, KEY_S, KEY_BETA, KEY_GRAD_TERM})
    if missing:
        raise ValueError(f"the added examples lack {missing}, which the index keeps for every example")
    stats = {
        key: np.concatenate([np.asarray(values), new_stats[key].astype(values.dtype)])
        for key, values in ex.items()
        if key not in (KEY_BETA, KEY_GRAD_TERM, KEY_H, KEY_S)
    }
    stats |= {KEY_BETA: beta, KEY_GRAD_TERM: grad_term, KEY_H: h_bound, KEY_S: s_bound}
    arrays |= keyed_files(stats, example_file)
    if data.inputs is not None:
        if added.inputs is None:
            raise ValueError("the index keeps its training inputs; give the added examples' inputs too")
        inputs = np.asarray(data.inputs)
        arrays[TRAIN_INPUTS_FILE] = np.concatenate([inputs, np.asarray(added.inputs, inputs.dtype)])
    return _write_version(
        index_dir, data, surrogate, arrays, _faiss(data, surrogate, n), stats[KEY_PHI_NORM],
        {"op": "add", "count": len(added.phi)}, started,
        keep=np.arange(n), added=added, linked=linked, phi_segments=segments,
    )  # fmt: skip


def _remeasured(
    data: IndexData, surrogate: Surrogate, faiss_index: faiss.Index | None, norms: np.ndarray
) -> FaissInfo:
    """The manifest's retrieval section for the new version: an approximate index's recall measured again
    (the exact scan's format-1 predecessor, per-score flat files, becomes the exact scan)."""
    info = data.manifest.faiss
    if faiss_index is not None:
        knobs = SearchKnobs(nprobe=info.nprobe, ef_search=info.ef_search)
        seed = int(data.manifest.config.get("seed", 0))
        queries = recall_queries(surrogate, data.query_phi, info.recall_queries, seed=seed)
        recall = measure_recall(
            Searcher(surrogate, norms),
            Searcher(surrogate, norms, faiss_index, knobs),
            queries,
            info.recall_candidates,
        )
        return replace(info, recall_at_10=recall, recall_queries=len(queries))
    return info if info.exact else FaissInfo(factory=EXACT_FACTORY)


def _history(manifest: Manifest, operation: dict[str, Any], n_train: int, started: float) -> dict[str, Any]:
    """The manifest's ``extra`` with the version counted up and the update listed."""
    history = list(manifest.extra.get("updates", []))
    history.append({**operation, "n_train": n_train, "seconds": time.perf_counter() - started})
    return {**manifest.extra, "version": int(manifest.extra.get("version", 1)) + 1, "updates": history}


def _add(index_dir: Path, data: IndexData, added: Features, started: float) -> Path:
    """Append ``added``: a format-1 index is rewritten in today's layout, any other gets the new rows."""
    if data.manifest.format_version == 1:
        removed = np.zeros(0, dtype=np.int64)
        return _update(index_dir, data, added, removed, {"op": "add", "count": len(added.phi)}, started)
    return _append(index_dir, data, added, started)


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
        data = load_index(index_dir, unverified=_kept_files(read_manifest(index_dir)))
        output_fn = output_function_from_spec(
            data.manifest.model.output_function, data.manifest.model.output_params
        )
        added = _check_added(
            data, precomputed_features(phi, outputs, targets, output_fn, beta, grad_term, metadata, "added")
        )
        return _add(Path(index_dir), data, added, started)


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
        data = load_index(index_dir, unverified=_kept_files(read_manifest(index_dir)))
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
        return _add(Path(index_dir), data, added, started)


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
