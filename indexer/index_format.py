"""The index directory of DESIGN.md 2.1: writing it atomically and loading it with checksums verified.

Layout (names in :mod:`indexer.constants`): ``manifest.json``; ``phi.npy``, ``whitened.npy``,
``cholesky.npy``; ``examples.npz`` (beta, grad_term, h, s, phi_norm, output, label, prediction);
``query_phi.npy`` and ``queries.npz`` for the stored queries; ``inputs.npy`` and ``query_inputs.npy``
(the raw inputs, for rendering examples); one FAISS index per score;
``metadata.sqlite``; ``model.safetensors``. Arrays are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from indexer.constants import (
    CHOLESKY_FILE,
    EXAMPLE_STATS_FILE,
    FAISS_FILE_TEMPLATE,
    FORMAT_VERSION,
    KEY_BETA,
    KEY_GRAD_TERM,
    KEY_S,
    MANIFEST_CHECKSUM_FIELD,
    MANIFEST_FILE,
    METADATA_FILE,
    PHI_FILE,
    QUERY_INPUTS_FILE,
    QUERY_PHI_FILE,
    QUERY_STATS_FILE,
    SQLITE_TABLE,
    TRAIN_INPUTS_FILE,
    WHITENED_FILE,
)
from indexer.enums import Score
from indexer.exceptions import IndexCorruptError, IndexFormatError, IndexNotFoundError, UnknownExampleError
from indexer.models import sha256_file
from indexer.surrogate import Surrogate

__all__ = ["IndexData", "write_index_dir", "load_index", "read_manifest", "MetadataStore"]

REQUIRED_MANIFEST_FIELDS = (
    "format_version",
    "name",
    "model",
    "projection",
    "surrogate",
    "faiss",
    "counts",
    "files",
)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_index_dir(
    out_dir: Path,
    manifest: dict[str, Any],
    arrays: dict[str, np.ndarray],
    npz: dict[str, dict[str, np.ndarray]],
    faiss_indexes: dict[Score, faiss.Index],
    metadata_rows: list[tuple[str, int, int | float, dict[str, Any]]],
    extra_files: dict[str, Path],
) -> Path:
    """Write an index into a temporary sibling folder, checksum every file, then rename it into place.

    A crash at any point leaves at most a ``.<name>.tmp-*`` folder, never a half index under ``out_dir``.
    An existing index at ``out_dir`` is replaced only after the new one is complete.

    Args:
        out_dir: final index folder.
        manifest: manifest fields; ``files`` (name -> sha256 and bytes) and ``format_version`` are added.
        arrays: file name -> array, each saved with ``np.save``.
        npz: file name -> {key: array}, each saved with ``np.savez``.
        faiss_indexes: score -> FAISS index, saved as ``faiss_<score>.index``.
        metadata_rows: ``(split, row, label, metadata)`` rows for the SQLite table.
        extra_files: file name -> source path, copied in (the checkpoint).

    Returns:
        ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for name, array in arrays.items():
            np.save(tmp / name, array, allow_pickle=False)
        for name, members in npz.items():
            # byte-deterministic: savez adds members via ZipFile.open(name, "w"), whose ZipInfo carries the
            # fixed date 1980-01-01, not the clock; a resumed build's checksums rely on it
            with open(tmp / name, "wb") as fh:
                np.savez(fh, **members)  # type: ignore[arg-type]  # numpy's stub mistypes **kwds
        for score, index in faiss_indexes.items():
            faiss.write_index(index, str(tmp / FAISS_FILE_TEMPLATE.format(score=score.value)))
        _write_metadata(tmp / METADATA_FILE, metadata_rows)
        for name, source in extra_files.items():
            shutil.copyfile(source, tmp / name)
        files = {
            p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(tmp.iterdir())
            if p.is_file()
        }
        body = {**manifest, "format_version": FORMAT_VERSION, "files": files}
        _write_json(tmp / MANIFEST_FILE, {**body, MANIFEST_CHECKSUM_FIELD: manifest_checksum(body)})
        for p in tmp.iterdir():  # data on disk before the rename makes it visible
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_metadata(path: Path, rows: list[tuple[str, int, int | float, dict[str, Any]]]) -> None:
    with sqlite3.connect(path) as db:
        db.execute(
            f"CREATE TABLE {SQLITE_TABLE} (split TEXT NOT NULL, row INTEGER NOT NULL, label, "
            "metadata TEXT NOT NULL, PRIMARY KEY (split, row))"
        )
        db.executemany(
            f"INSERT INTO {SQLITE_TABLE} VALUES (?, ?, ?, ?)",
            [(split, row, label, json.dumps(meta, sort_keys=True)) for split, row, label, meta in rows],
        )
    # a closed connection in rollback-journal mode leaves one self-contained file
    sqlite3.connect(path).close()


def manifest_checksum(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no whitespace), without its own checksum field.

    The files' checksums live in the manifest; this one covers the manifest itself (projection seed, tau,
    output function, model spec), so that an edit to it is caught like an edit to any other file.
    """
    body = {key: value for key, value in manifest.items() if key != MANIFEST_CHECKSUM_FIELD}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_manifest(index_dir: Path) -> dict[str, Any]:
    """Read and check ``manifest.json`` of an index directory.

    Raises:
        IndexNotFoundError: no such folder or no manifest in it.
        IndexFormatError: not JSON, a missing field, or a format version other than FORMAT_VERSION.
        IndexCorruptError: the manifest was edited after it was written (its own checksum differs).
    """
    path = Path(index_dir) / MANIFEST_FILE
    if not path.is_file():
        raise IndexNotFoundError(f"{path} does not exist; an index directory must hold {MANIFEST_FILE}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IndexFormatError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise IndexFormatError(f"{path} must hold a JSON object")
    missing = [f for f in REQUIRED_MANIFEST_FIELDS if f not in manifest]
    if missing:
        raise IndexFormatError(f"{path} lacks the field(s) {missing}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise IndexFormatError(
            f"{path}: format_version is {manifest['format_version']!r}; "
            f"this infotrace reads version {FORMAT_VERSION}"
        )
    if manifest.get(MANIFEST_CHECKSUM_FIELD) != manifest_checksum(manifest):
        raise IndexCorruptError(
            f"{path} was edited after the index was written: its content does not match its "
            f"{MANIFEST_CHECKSUM_FIELD}; rebuild the index rather than editing its manifest"
        )
    return manifest


class MetadataStore:
    """Read-only access to ``metadata.sqlite``: labels and metadata of training examples and stored queries.

    One read-only connection per thread: safe under concurrent requests without a lock, and without the
    cost of opening the file on every call.

    Args:
        path: the SQLite file.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._local = threading.local()

    def _connect(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
            self._local.db = db
        return db

    def get(self, split: str, rows: list[int]) -> dict[int, dict[str, Any]]:
        """Metadata of ``rows`` of ``split``.

        Returns:
            row -> ``{"label": ..., **metadata}``; rows that do not exist are absent.
        """
        if not rows:
            return {}
        marks = ",".join("?" * len(rows))
        found = (
            self._connect()
            .execute(
                f"SELECT row, label, metadata FROM {SQLITE_TABLE} WHERE split = ? AND row IN ({marks})",
                [split, *map(int, rows)],
            )
            .fetchall()
        )
        return {int(r): {"label": label, **json.loads(meta)} for r, label, meta in found}

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
        manifest: the manifest.
        phi: `(n_train, k)` float32 features.
        surrogate: the :class:`Surrogate` rebuilt from the stored arrays (no refit).
        examples: per-example vectors of ``examples.npz``, each `(n_train,)`.
        query_phi: `(n_query, k)` float32 stored query features.
        inputs: `(n_train, *input_shape)` training inputs (memory-mapped, read-only).
        query_inputs: `(n_query, *input_shape)` stored queries' inputs (memory-mapped, read-only).
        queries: per-query vectors of ``queries.npz``.
        faiss_indexes: score -> FAISS index over the vectors z_i of DESIGN.md 1.3.
        metadata: the :class:`MetadataStore`.
    """

    path: Path
    manifest: dict[str, Any]
    phi: np.ndarray
    surrogate: Surrogate
    examples: dict[str, np.ndarray]
    query_phi: np.ndarray
    inputs: np.ndarray
    query_inputs: np.ndarray
    queries: dict[str, np.ndarray]
    faiss_indexes: dict[Score, faiss.Index]
    metadata: MetadataStore

    @property
    def name(self) -> str:
        """The index name: its folder's name, under which the service serves it (the manifest's ``name``
        records what it was built as)."""
        return self.path.name

    @property
    def n_train(self) -> int:
        """Number of indexed training examples."""
        return int(self.phi.shape[0])

    @property
    def k(self) -> int:
        """Projected dimension."""
        return int(self.phi.shape[1])


def _verify(index_dir: Path, manifest: dict[str, Any]) -> None:
    files = manifest["files"]
    if not isinstance(files, dict):
        raise IndexFormatError(f"{index_dir / MANIFEST_FILE}: 'files' must map file names to checksums")
    for name, entry in files.items():
        path = index_dir / name
        if Path(name).name != name:
            raise IndexFormatError(f"{index_dir / MANIFEST_FILE}: file name {name!r} must not contain a path")
        if not path.is_file():
            raise IndexCorruptError(f"{path} is listed in the manifest but missing")
        if path.stat().st_size != entry.get("bytes"):
            raise IndexCorruptError(
                f"{path} has {path.stat().st_size} bytes; the manifest expects {entry.get('bytes')}"
            )
        if sha256_file(path) != entry.get("sha256"):
            raise IndexCorruptError(
                f"{path} does not match its sha256 in the manifest (altered or corrupted)"
            )


def _load_npy(path: Path, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise IndexCorruptError(f"{path} is not a plain .npy array: {exc}") from exc
    if array.shape != shape or array.dtype != np.dtype(dtype):
        raise IndexCorruptError(f"{path} holds {array.dtype}{array.shape}; expected {np.dtype(dtype)}{shape}")
    return array


def _load_inputs(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    # memory-mapped: inputs are only read to render single examples, never all at once
    try:
        array = np.load(path, allow_pickle=False, mmap_mode="r")
    except ValueError as exc:
        raise IndexCorruptError(f"{path} is not a plain .npy array: {exc}") from exc
    if array.shape != shape:
        raise IndexCorruptError(f"{path} has shape {array.shape}; expected {shape}")
    return array


def _load_npz(path: Path, n: int) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            out = {key: npz[key] for key in npz.files}
    except ValueError as exc:
        raise IndexCorruptError(f"{path} is not a plain .npz archive: {exc}") from exc
    for key, array in out.items():
        if array.shape[:1] != (n,):
            raise IndexCorruptError(f"{path}: {key!r} has shape {array.shape}; expected first dimension {n}")
    return out


def load_index(index_dir: Path) -> IndexData:
    """Load an index directory, verifying the format version, every checksum and every shape.

    Args:
        index_dir: the folder written by :func:`write_index_dir`.

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
    _verify(index_dir, manifest)
    n, n_query, k = (int(manifest["counts"][key]) for key in ("n_train", "n_query", "k"))
    phi = _load_npy(index_dir / PHI_FILE, (n, k), np.float32)
    whitened = _load_npy(index_dir / WHITENED_FILE, (n, k), np.float64)
    cholesky = _load_npy(index_dir / CHOLESKY_FILE, (k, k), np.float64)
    examples = _load_npz(index_dir / EXAMPLE_STATS_FILE, n)
    query_phi = _load_npy(index_dir / QUERY_PHI_FILE, (n_query, k), np.float32)
    input_shape = tuple(int(d) for d in manifest["model"]["input_shape"])
    inputs = _load_inputs(index_dir / TRAIN_INPUTS_FILE, (n, *input_shape))
    query_inputs = _load_inputs(index_dir / QUERY_INPUTS_FILE, (n_query, *input_shape))
    queries = _load_npz(index_dir / QUERY_STATS_FILE, n_query)
    faiss_indexes = {}
    for score in Score:
        path = index_dir / FAISS_FILE_TEMPLATE.format(score=score.value)
        index = faiss.read_index(str(path))
        if index.d != k or index.ntotal != n:
            raise IndexCorruptError(
                f"{path} holds {index.ntotal} vectors of dimension {index.d}; expected {n} x {k}"
            )
        faiss_indexes[score] = index
    surrogate_fields = manifest["surrogate"]
    surrogate = Surrogate(
        prior_precision=float(surrogate_fields["prior_precision"]),
        cholesky=cholesky,
        whitened=whitened,
        beta=examples[KEY_BETA],
        grad_term=examples[KEY_GRAD_TERM],
        h=examples["h"],
        s=examples[KEY_S],
        s_floor=float(surrogate_fields["s_floor"]),
        n_clamped=int(surrogate_fields["n_clamped"]),
    )
    return IndexData(
        path=index_dir,
        manifest=manifest,
        phi=phi,
        surrogate=surrogate,
        examples=examples,
        query_phi=query_phi,
        inputs=inputs,
        query_inputs=query_inputs,
        queries=queries,
        faiss_indexes=faiss_indexes,
        metadata=MetadataStore(index_dir / METADATA_FILE),
    )
