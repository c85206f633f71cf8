"""Writing an index directory atomically (DESIGN.md 2.1).

Every file is written into a temporary sibling folder (``.<name>.tmp-*``), checksummed into the manifest,
flushed to disk, and the folder is renamed into place; an existing index is moved aside first
(``.<name>.old-*``) and deleted after. A crash at any point leaves at most those sibling folders, never a
half index under the final name. Names come from :mod:`indexer.store.layout`.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from indexer.store.faiss_index import write_faiss_index
from indexer.store.hashing import sha256_file
from indexer.store.layout import (
    FAISS_FILE,
    MANIFEST_FILE,
    METADATA_FILE,
    SQLITE_TABLE,
    replaced_prefix,
    scratch_prefix,
)
from indexer.store.manifest import Manifest
from indexer.store.sections import FileEntry

__all__ = ["METADATA_SCHEMA", "MetadataRow", "metadata_values", "write_index_dir"]

MetadataRow = tuple[str, int, int | float | list, dict[str, Any]]
"""One row of ``metadata.sqlite``: ``(split, row, label, metadata)``."""


def write_index_dir(
    out_dir: Path,
    manifest: Manifest,
    arrays: dict[str, np.ndarray],
    faiss_index: faiss.Index | dict[str, faiss.Index] | None,
    metadata_rows: list[MetadataRow] | Callable[[Path], None],
    extra_files: dict[str, Path],
    linked_files: dict[str, tuple[Path, FileEntry]] | None = None,
) -> Path:
    """Write an index into a temporary sibling folder, checksum every file, then rename it into place.

    Args:
        out_dir: final index folder; an existing index there is replaced only once the new one is complete.
        manifest: the manifest; its ``files`` are filled in here.
        arrays: file name -> array, each saved with ``np.save`` (no pickle; memory-mappable by the reader).
        faiss_index: the approximate FAISS index, saved as :data:`~indexer.store.layout.FAISS_FILE`, or file
            name -> FAISS index (the index with its trained copy, or an add's new shard); None for the exact
            scan.
        metadata_rows: the rows of the SQLite table, or a function that writes the SQLite file at the path
            it is given (an update that copies the previous version's table and changes it).
        extra_files: file name -> source path, copied in (the checkpoint).
        linked_files: file name -> (source path, its manifest entry): files of the previous version that an
            update keeps unchanged, hard-linked in (copied where the file system has no hard links) with
            their recorded checksum, not read again (a damaged source stays detectably damaged).

    Returns:
        ``out_dir``.

    Raises:
        OSError: the folder cannot be written (nothing is left under ``out_dir`` then).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f"{scratch_prefix(out_dir)}{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for name, array in arrays.items():
            np.save(tmp / name, array, allow_pickle=False)
        faiss_files = faiss_index if isinstance(faiss_index, dict) else {FAISS_FILE: faiss_index}
        for name, index in faiss_files.items():
            if index is not None:
                write_faiss_index(index, tmp / name)
        if callable(metadata_rows):
            metadata_rows(tmp / METADATA_FILE)
        else:
            _write_metadata(tmp / METADATA_FILE, metadata_rows)
        for name, source in extra_files.items():
            shutil.copyfile(source, tmp / name)
        linked = linked_files or {}
        for name, (source, _) in linked.items():
            try:
                os.link(source, tmp / name)
            except OSError:  # no hard links here (another file system, or none): a copy
                shutil.copyfile(source, tmp / name)
        files = {
            p.name: linked[p.name][1]
            if p.name in linked
            else FileEntry(sha256=sha256_file(p), bytes=p.stat().st_size)
            for p in sorted(tmp.iterdir())
            if p.is_file()
        }
        document = manifest.with_files(files).to_file_json()
        (tmp / MANIFEST_FILE).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
        for p in tmp.iterdir():  # data on disk before the rename makes it visible
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if out_dir.exists():
            old = out_dir.parent / f"{replaced_prefix(out_dir)}{uuid.uuid4().hex[:8]}"
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


METADATA_SCHEMA = (
    f"CREATE TABLE {SQLITE_TABLE} (split TEXT NOT NULL, row INTEGER NOT NULL, label, "
    "metadata TEXT NOT NULL, PRIMARY KEY (split, row))"
)
"""The table of ``metadata.sqlite``: one row per training example and stored query."""


def metadata_values(rows: list[MetadataRow]) -> list[tuple[str, int, Any, str]]:
    """The SQLite values of ``rows``: a sequence label (token ids) as its JSON text, metadata as JSON."""
    return [
        (
            split,
            row,
            json.dumps(label) if isinstance(label, list) else label,
            json.dumps(meta, sort_keys=True),
        )
        for split, row, label, meta in rows
    ]


def _write_metadata(path: Path, rows: list[MetadataRow]) -> None:
    with sqlite3.connect(path) as db:
        db.execute(METADATA_SCHEMA)
        db.executemany(f"INSERT INTO {SQLITE_TABLE} VALUES (?, ?, ?, ?)", metadata_values(rows))
    # a closed connection in rollback-journal mode leaves one self-contained file
    sqlite3.connect(path).close()
