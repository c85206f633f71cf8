"""Loading an index directory with every checksum, shape and dtype verified (DESIGN.md 2.1).

Layout (names in :mod:`indexer.store.layout`): ``manifest.json``; ``phi.npy`` (float16 or float32, the
features stored once) and ``cholesky.npy``; ``examples.<key>.npy`` (beta, grad_term, h, s, phi_norm, output,
label, prediction, ...); ``query_phi.npy`` and ``queries.<key>.npy`` for the stored queries; ``inputs.npy``
and ``query_inputs.npy`` (the raw inputs, for rendering examples); ``faiss.index`` for an approximate index;
``metadata.sqlite``; ``model.safetensors``. Arrays are read with ``allow_pickle=False`` and memory-mapped
(read-only): loading an index does not read its features into RAM, the operating system pages in what a
query touches, and processes serving the same index share those pages.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from indexer.exceptions import IndexCorruptError, UnknownExampleError
from indexer.gp.leverage import LeverageColumn, OnDemandLeverage
from indexer.gp.surrogate import Surrogate
from indexer.segments import RowSegments, concatenated
from indexer.store.faiss_index import merged_shards, read_faiss_index
from indexer.store.hashing import sha256_file
from indexer.store.layout import (
    CHOLESKY_FILE,
    EXAMPLE_FILE_PREFIX,
    KEY_BETA,
    KEY_GRAD_TERM,
    KEY_H,
    KEY_PHI_NORM,
    KEY_S,
    LEGACY_EXAMPLE_STATS_FILE,
    LEGACY_QUERY_STATS_FILE,
    METADATA_FILE,
    QUERY_INPUTS_FILE,
    QUERY_PHI_FILE,
    QUERY_STATS_FILE_PREFIX,
    SPLIT_TRAIN,
    SQLITE_TABLE,
    TOKENIZER_FILE,
    TRAIN_INPUTS_FILE,
    example_file,
    faiss_shard_file,
    keys_of,
    phi_segment_file,
)
from indexer.store.manifest import Manifest, read_manifest

__all__ = ["IndexData", "MetadataStore", "load_index"]


class MetadataStore:
    """Read-only access to ``metadata.sqlite``: labels and metadata of training examples and stored queries.

    One read-only connection, opened at construction and shared by every thread under a lock (a lookup by
    primary key takes microseconds). Opening it here matters: an engine still answering while a new
    version of its index replaces (and deletes) the old folder keeps reading through the connection's own
    file descriptor. A connection opened later, even through ``/proc/self/fd`` of a descriptor held open,
    fails once the folder is gone (SQLite resolves the link to the deleted path): requests on the old
    engine in a thread that had not read metadata before answered 500.

    Args:
        path: the SQLite file.

    Raises:
        IndexCorruptError: the file is not a readable SQLite database.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        # immutable: every version of an index is a new file that is never written again
        uri = f"{self.path.resolve().as_uri()}?mode=ro&immutable=1"
        try:
            self._db = sqlite3.connect(uri, uri=True, check_same_thread=False)
            self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()  # the file is open from now on
        except sqlite3.DatabaseError as exc:
            raise IndexCorruptError(f"{self.path} is not a readable SQLite database: {exc}") from exc
        self._lock = threading.Lock()

    def _query(self, sql: str, params: list[Any] | tuple[Any, ...] = ()) -> list[Any]:
        """The rows of one read-only statement."""
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def get(self, split: str, rows: list[int]) -> dict[int, dict[str, Any]]:
        """Metadata of ``rows`` of ``split``.

        Returns:
            row -> ``{"label": ..., **metadata}``, the label a number or, for a sequence target (token ids),
            a list; rows that do not exist are absent.
        """
        if not rows:
            return {}
        marks = ",".join("?" * len(rows))
        found = self._query(
            f"SELECT row, label, metadata FROM {SQLITE_TABLE} WHERE split = ? AND row IN ({marks})",
            [split, *map(int, rows)],
        )
        # the writer stores a number as itself and a sequence as its JSON text: the only strings there are
        return {
            int(r): {"label": json.loads(label) if isinstance(label, str) else label, **json.loads(meta)}
            for r, label, meta in found
        }

    def all_rows(self) -> list[tuple[str, int, Any, dict[str, Any]]]:
        """Every row as ``(split, row, label, metadata)`` (an update copies them into its new version)."""
        found = self._query(f"SELECT split, row, label, metadata FROM {SQLITE_TABLE}")
        return [
            (split, int(row), json.loads(label) if isinstance(label, str) else label, json.loads(meta))
            for split, row, label, meta in found
        ]

    def get_one(self, split: str, row: int) -> dict[str, Any]:
        """Metadata of one row.

        Raises:
            UnknownExampleError: no such row in ``split``.
        """
        found = self.get(split, [row])
        if row not in found:
            raise UnknownExampleError(f"no {split} example with id {row}")
        return found[row]


@dataclass(frozen=True)
class IndexData:
    """A loaded, verified index.

    Attributes:
        path: the index folder.
        manifest: the typed :class:`~indexer.store.manifest.Manifest`.
        surrogate: the :class:`~indexer.gp.surrogate.Surrogate` rebuilt from the stored arrays (no refit);
            its ``phi`` are the `(n_train, k)` stored features (float16 or float32, memory-mapped).
        examples: per-example arrays ``examples.<key>.npy``, each `(n_train, ...)` (memory-mapped).
        query_phi: `(n_query, k)` stored query features (phi's dtype, memory-mapped).
        inputs: `(n_train, *input_shape)` training inputs (memory-mapped, read-only), or None when the
            index was built without them (``store_inputs=False``).
        query_inputs: `(n_query, *input_shape)` stored queries' inputs (memory-mapped, read-only), or None.
        queries: per-query arrays ``queries.<key>.npy``, each `(n_query, ...)` (memory-mapped).
        faiss_index: the approximate FAISS index over the information-gain vectors, or None (exact scan).
        metadata: the :class:`MetadataStore`.
    """

    path: Path
    manifest: Manifest
    surrogate: Surrogate
    examples: dict[str, np.ndarray]
    query_phi: np.ndarray
    inputs: np.ndarray | None
    query_inputs: np.ndarray | None
    queries: dict[str, np.ndarray]
    faiss_index: faiss.Index | None
    metadata: MetadataStore

    @property
    def name(self) -> str:
        """The index name: its folder's name, under which the service serves it (``manifest.name``
        records what it was built as)."""
        return self.path.name

    @property
    def phi(self) -> np.ndarray | RowSegments:
        """`(n_train, k)` stored training features (the surrogate's; float16 or float32, memory-mapped; in
        segments after an add)."""
        return self.surrogate.phi

    @property
    def tokenizer_path(self) -> Path | None:
        """The index's tokenizer (``tokenizer.json``, verified with the other files), or None."""
        return self.path / TOKENIZER_FILE if TOKENIZER_FILE in self.manifest.files else None

    @property
    def n_train(self) -> int:
        """Number of indexed training examples."""
        return self.surrogate.n_train

    @property
    def n_query(self) -> int:
        """Number of stored queries."""
        return int(self.query_phi.shape[0])

    @property
    def k(self) -> int:
        """Projected dimension."""
        return self.surrogate.k

    def split_size(self, split: str) -> int:
        """Rows of ``split`` (``"train"`` or ``"query"``)."""
        return self.n_train if split == SPLIT_TRAIN else self.n_query

    def check_ids(self, split: str, ids: list[int]) -> None:
        """Refuse ids outside ``0 .. split_size - 1``.

        Args:
            split: ``"train"`` (training examples) or ``"query"`` (stored queries).
            ids: the ids asked for.

        Raises:
            UnknownExampleError: an id out of range (the message names up to five and the valid range), or
                a split with no rows at all.
        """
        n = self.split_size(split)
        singular, plural = ("training example", "training examples")
        if split != SPLIT_TRAIN:
            singular, plural = ("stored query", "stored queries")
        if n == 0:
            hint = "; query by input or feature" if split != SPLIT_TRAIN else ""
            raise UnknownExampleError(f"index {self.name!r} has no {plural}{hint}")
        bad = [i for i in ids if not 0 <= i < n]
        if len(bad) == 1:
            raise UnknownExampleError(f"no {singular} with id {bad[0]}; valid ids are 0..{n - 1}")
        if bad:
            shown = ", ".join(str(i) for i in bad[:5])
            raise UnknownExampleError(f"no {plural} with ids {shown}; valid ids are 0..{n - 1}")


def _verify(index_dir: Path, manifest: Manifest, unverified: Collection[str] = ()) -> None:
    for name, entry in manifest.files.items():
        path = index_dir / name
        if not path.is_file():
            raise IndexCorruptError(f"{path} is listed in the manifest but missing")
        if path.stat().st_size != entry.bytes:
            raise IndexCorruptError(
                f"{path} has {path.stat().st_size} bytes; the manifest expects {entry.bytes}"
            )
        if name not in unverified and sha256_file(path) != entry.sha256:
            raise IndexCorruptError(
                f"{path} does not match its sha256 in the manifest (altered or corrupted)"
            )


def _mmap(path: Path) -> np.ndarray:
    """A read-only memory map of a plain ``.npy`` file (an empty array is read: numpy cannot map 0 bytes).

    Raises:
        IndexCorruptError: not a plain ``.npy`` array (a pickled object array included).
    """
    try:
        array = np.load(path, allow_pickle=False, mmap_mode="r")
    except ValueError as exc:
        if "empty" in str(exc) or "cannot mmap" in str(exc):
            return np.load(path, allow_pickle=False)
        raise IndexCorruptError(f"{path} is not a plain .npy array: {exc}") from exc
    if array.dtype.hasobject:
        raise IndexCorruptError(f"{path} holds Python objects; an index holds numbers only")
    # a plain ndarray over the same mapping (it keeps the map open): np.memmap's subclass hooks run on every
    # slice and fancy index, a tenth of a small query's time in the service (measured)
    return array.view(np.ndarray)


def _load_npy(path: Path, shape: tuple[int, ...], dtype: type | str | None = None) -> np.ndarray:
    array = _mmap(path)
    if array.shape != shape or (dtype is not None and array.dtype != np.dtype(dtype)):
        want = np.dtype(dtype) if dtype is not None else ""
        raise IndexCorruptError(f"{path} holds {array.dtype}{array.shape}; expected {want}{shape}")
    return array


def _load_npz(path: Path, n: int) -> dict[str, np.ndarray]:
    """A format-1 ``.npz`` of per-row arrays, each with ``n`` rows (read whole: such indexes are small)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            out = {key: npz[key] for key in npz.files}
    except ValueError as exc:
        raise IndexCorruptError(f"{path} is not a plain .npz archive: {exc}") from exc
    for key, array in out.items():
        if array.shape[:1] != (n,):
            raise IndexCorruptError(f"{path}: {key!r} has shape {array.shape}; expected first dimension {n}")
    return out


def _load_keyed(index_dir: Path, files: list[str], prefix: str, n: int) -> dict[str, np.ndarray]:
    """The per-row arrays ``<prefix><key>.npy`` listed in the manifest, each with ``n`` rows."""
    out = {}
    for key in keys_of(files, prefix):
        path = index_dir / f"{prefix}{key}.npy"
        array = _mmap(path)
        if array.shape[:1] != (n,):
            raise IndexCorruptError(f"{path} has shape {array.shape}; expected first dimension {n}")
        out[key] = array
    return out


def _load_phi(index_dir: Path, manifest: Manifest) -> np.ndarray | RowSegments:
    """The training features: ``phi.npy`` memory-mapped, or its segments (``counts.phi_segments``)."""
    counts = manifest.counts
    rows = counts.phi_segments or [counts.n_train]
    parts = [
        _load_npy(index_dir / phi_segment_file(j), (r, counts.k), counts.feature_dtype)
        for j, r in enumerate(rows)
    ]
    return concatenated(parts)


def _read_faiss_shards(index_dir: Path, manifest: Manifest) -> faiss.Index:
    """The approximate index, memory-mapped: its one file, or its shards merged (``faiss.shards``)."""
    n, k, info = manifest.counts.n_train, manifest.counts.k, manifest.faiss
    counts = info.shards or [n]
    if sum(counts) != n:
        raise IndexCorruptError(
            f"{index_dir}: the manifest's faiss.shards {counts} hold {sum(counts)} vectors; n_train is {n}"
        )
    shards = []
    for j, count in enumerate(counts):
        name = faiss_shard_file(j)
        if name not in manifest.files:
            raise IndexCorruptError(
                f"{index_dir}: the manifest names the approximate factory {info.factory!r} but lists no "
                f"{name}"
            )
        shards.append(read_faiss_index(index_dir / name, count, k, info.factory))
    return merged_shards(shards)


def load_index(index_dir: Path, unverified: Collection[str] = ()) -> IndexData:
    """Load an index directory, verifying the format version, every checksum and every shape.

    Args:
        index_dir: the folder written by :func:`~indexer.store.writer.write_index_dir`.
        unverified: files whose checksum is not computed (their size and shape still are): an add links
            the existing feature segments and stored-query files unchanged into its new version with their
            recorded checksums, so it need not read them (a damaged file stays detectably damaged).

    Returns:
        :class:`IndexData`.

    Raises:
        IndexNotFoundError: no such folder or manifest.
        IndexFormatError: bad manifest or format version.
        IndexCorruptError: a file missing, altered, truncated, or with a shape or dtype that disagrees with
            the manifest; the message names the file.
    """
    index_dir = Path(index_dir)
    manifest = read_manifest(index_dir)
    _verify(index_dir, manifest, unverified)
    n, n_query, k = manifest.counts.n_train, manifest.counts.n_query, manifest.counts.k
    dtype = manifest.counts.feature_dtype
    phi = _load_phi(index_dir, manifest)
    cholesky = np.array(_load_npy(index_dir / CHOLESKY_FILE, (k, k), np.float64))
    files = list(manifest.files)
    legacy = manifest.format_version == 1
    if legacy:
        examples = _load_npz(index_dir / LEGACY_EXAMPLE_STATS_FILE, n)
    else:
        examples = _load_keyed(index_dir, files, EXAMPLE_FILE_PREFIX, n)
    for key in (KEY_BETA, KEY_GRAD_TERM, KEY_H, KEY_S, KEY_PHI_NORM):
        if key not in examples:
            raise IndexCorruptError(f"{index_dir / example_file(key)} is missing from the manifest")
        if examples[key].shape != (n,) or examples[key].dtype != np.float64:
            raise IndexCorruptError(f"{index_dir / example_file(key)} must hold float64 ({n},)")
    query_phi = _load_npy(index_dir / QUERY_PHI_FILE, (n_query, k), dtype)
    input_shape = manifest.model.input_shape
    stored = TRAIN_INPUTS_FILE in manifest.files
    inputs = _load_npy(index_dir / TRAIN_INPUTS_FILE, (n, *input_shape)) if stored else None
    query_inputs = _load_npy(index_dir / QUERY_INPUTS_FILE, (n_query, *input_shape)) if stored else None
    if legacy:
        queries = _load_npz(index_dir / LEGACY_QUERY_STATS_FILE, n_query)
    else:
        queries = _load_keyed(index_dir, files, QUERY_STATS_FILE_PREFIX, n_query)
    faiss_index = None
    if not manifest.faiss.exact and not legacy:
        faiss_index = _read_faiss_shards(index_dir, manifest)
    h: np.ndarray | LeverageColumn = examples[KEY_H]
    s: np.ndarray | LeverageColumn = examples[KEY_S]
    if manifest.surrogate.leverage_bounds:  # stored bounds (an add kept them): exact values on demand
        leverage = OnDemandLeverage(
            cholesky, phi, examples[KEY_BETA], examples[KEY_H], examples[KEY_S], manifest.surrogate.s_floor
        )
        h, s = LeverageColumn(leverage, "h"), LeverageColumn(leverage, "s")
    surrogate = Surrogate(
        prior_precision=manifest.surrogate.prior_precision,
        cholesky=cholesky,
        phi=phi,
        beta=examples[KEY_BETA],
        grad_term=examples[KEY_GRAD_TERM],
        h=h,
        s=s,
        s_floor=manifest.surrogate.s_floor,
        n_clamped=manifest.surrogate.n_clamped,
    )
    return IndexData(
        path=index_dir,
        manifest=manifest,
        surrogate=surrogate,
        examples=examples,
        query_phi=query_phi,
        inputs=inputs,
        query_inputs=query_inputs,
        queries=queries,
        faiss_index=faiss_index,
        metadata=MetadataStore(index_dir / METADATA_FILE),
    )
