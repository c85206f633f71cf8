"""Resumable index builds: finished featurization buffers kept as checksummed shards (DESIGN.md 2.1).

Featurizing dominates a build, so :func:`~indexer.build.build_index` keeps every finished buffer of
:func:`~indexer.features.stream.tangent_features` as one shard file in a work folder beside the output,
``<parent>/.<name>.work-<key>/``. The key is a sha256 of everything that determines the features (the
stored weights, the architecture, the output function, the projection, the buffer layout, the bytes of the
train and query inputs and targets, the torch/numpy versions and the device), so a build with other
arguments never reads another build's shards.

A shard is a safetensors file (``phi``, ``outputs``, ``model_outputs``, ``beta``, ``grad_term``) written
to a temporary name and renamed into place, with its own sha256 in its name:
``train-000003-<sha256>.safetensors``. A kill at any point therefore leaves either no shard or a complete
one; a shard whose bytes no longer match its name is deleted and computed again. The work folder is
removed once the index is in place.

A per-index lock file (``<parent>/.<name>.lock``, held with ``flock`` and released by the kernel when the
process dies) keeps two builds of the same index from running at once, which makes it safe for a build
that holds it to remove what killed builds left behind (``.<name>.tmp-*``, ``.<name>.old-*``).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from indexer.features.featurize import BufferFeatures
from indexer.store.hashing import sha256_file, sha256_json, tensor_digest
from indexer.store.layout import lock_path, replaced_prefix, scratch_prefix, work_prefix

__all__ = [
    "SHARD_FORMAT_VERSION",
    "ShardStore",
    "SplitShards",
    "build_lock",
    "remove_stale_siblings",
    "tensor_digest",
    "work_key",
]

log = logging.getLogger("infotrace.indexer")

SHARD_FORMAT_VERSION = 4  # 4: model_outputs are OutputFunction.summarize summaries
"""Version of the shard layout; part of the work key, so shards of another layout are never read."""

_DATA_KEY = "data_sha256"  # shard metadata: the sha256 of the buffer's inputs and targets
_KEY_CHARS = 16  # hex characters of the key in the folder name: 64 bits, ample for one output folder
_SHARD_NAME = re.compile(r"^(?P<split>[a-z]+)-(?P<buffer>\d{6})-(?P<sha256>[0-9a-f]{64})\.safetensors$")


def work_key(material: dict[str, Any]) -> str:
    """The hex sha256 of ``material`` as canonical JSON (sorted keys, no whitespace).

    Args:
        material: everything that determines the features (see :mod:`indexer.store.shards`); JSON-able.

    Returns:
        64 hex characters.
    """
    return sha256_json(material)


class SplitShards:
    """The shards of one split (``"train"`` or ``"query"``), a :class:`~indexer.features.BufferCache`.

    Counts what it did, for the build's log.

    Args:
        folder: the work folder.
        split: the split name (lowercase letters), the prefix of its shard files.

    Attributes:
        reused: shards read back and verified.
        computed: shards written.
        corrupt: shards found whose bytes did not match their checksum (deleted, then recomputed).
    """

    def __init__(self, folder: Path, split: str) -> None:
        if not re.fullmatch(r"[a-z]+", split):
            raise ValueError(f"split must be lowercase letters; got {split!r}")
        self.folder = Path(folder)
        self.split = split
        self.reused = 0
        self.computed = 0
        self.corrupt = 0

    def load(self, buffer: int, rows: int, digest: str) -> BufferFeatures | None:
        """Buffer ``buffer`` if a shard of it exists, its bytes, keys and shapes check out, and it was made
        from the same data.

        Args:
            buffer: the buffer number.
            rows: its number of examples.
            digest: sha256 of the buffer's inputs and targets (:func:`~indexer.features.batch_digest`).

        Returns:
            :class:`~indexer.features.BufferFeatures` with `(rows, k)` ``phi``, `(rows,)` ``outputs``,
            ``beta`` and ``grad_term``, `(rows, n_summary)` ``model_outputs`` (summaries); None when there is
            no valid shard (an invalid one is deleted).
        """
        for path in sorted(self.folder.glob(f"{self.split}-{buffer:06d}-*.safetensors")):
            match = _SHARD_NAME.match(path.name)
            valid = match and sha256_file(path) == match["sha256"]
            features = _read_shard(path, rows, digest) if valid else None
            if features is not None:
                self.reused += 1
                return features
            log.warning("shard %s does not match its checksum, layout or data; computing it again", path)
            self.corrupt += 1
            path.unlink(missing_ok=True)
        return None

    def save(self, buffer: int, features: BufferFeatures, digest: str) -> None:
        """Write buffer ``buffer`` as a shard: temporary file, checksum, atomic rename.

        Args:
            buffer: the buffer number.
            features: its features (arrays of :class:`~indexer.features.featurize.BufferFeatures`).
            digest: sha256 of the buffer's inputs and targets, kept in the shard's metadata.
        """
        tmp = self.folder / f".{self.split}-{buffer:06d}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            save_file(
                {
                    "phi": np.ascontiguousarray(features.phi, dtype=np.float32),
                    "outputs": np.ascontiguousarray(features.outputs, dtype=np.float64),
                    "model_outputs": np.ascontiguousarray(features.model_outputs, dtype=np.float32),
                    "beta": np.ascontiguousarray(features.beta, dtype=np.float64),
                    "grad_term": np.ascontiguousarray(features.grad_term, dtype=np.float64),
                },
                str(tmp),
                metadata={_DATA_KEY: digest},
            )
            # no fsync: a shard that a power cut leaves incomplete fails its checksum and is recomputed
            os.replace(tmp, self.folder / f"{self.split}-{buffer:06d}-{sha256_file(tmp)}.safetensors")
        finally:
            tmp.unlink(missing_ok=True)
        self.computed += 1


def _read_shard(path: Path, rows: int, digest: str) -> BufferFeatures | None:
    try:
        with safe_open(str(path), framework="np") as shard:
            if (shard.metadata() or {}).get(_DATA_KEY) != digest:
                return None
        arrays = load_file(str(path))
    except (SafetensorError, OSError, ValueError):
        return None
    phi, outputs, raw = arrays.get("phi"), arrays.get("outputs"), arrays.get("model_outputs")
    beta, grad_term = arrays.get("beta"), arrays.get("grad_term")
    if phi is None or outputs is None or raw is None or beta is None or grad_term is None:
        return None
    if phi.ndim != 2 or len(phi) != rows or raw.ndim != 2 or len(raw) != rows:
        return None
    if any(a.shape != (rows,) for a in (outputs, beta, grad_term)):
        return None
    return BufferFeatures(phi=phi, outputs=outputs, model_outputs=raw, beta=beta, grad_term=grad_term)


class ShardStore:
    """The work folder of one build key, ``<parent>/.<name>.work-<key[:16]>/``.

    Args:
        out_dir: the index folder being built.
        key: the work key (:func:`work_key`) of the build.
        material: what the key was computed from; written to ``key.json`` for people reading the folder.
    """

    def __init__(self, out_dir: Path, key: str, material: dict[str, Any]) -> None:
        out_dir = Path(out_dir)
        self.folder = out_dir.parent / f"{work_prefix(out_dir)}{key[:_KEY_CHARS]}"
        self.folder.mkdir(parents=True, exist_ok=True)
        record = self.folder / "key.json"
        if not record.is_file():
            tmp = self.folder / f".key.json.tmp-{uuid.uuid4().hex[:8]}"
            tmp.write_text(json.dumps({"key": key, **material}, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, record)
        self.splits: dict[str, SplitShards] = {}

    def split(self, name: str) -> SplitShards:
        """The :class:`SplitShards` of split ``name`` (one object per name, so its counts add up)."""
        if name not in self.splits:
            self.splits[name] = SplitShards(self.folder, name)
        return self.splits[name]

    def others(self) -> list[Path]:
        """Work folders of the same index left by interrupted builds with other arguments (never reused)."""
        prefix = self.folder.name[:-_KEY_CHARS]
        return _siblings(self.folder.parent, (prefix,), exclude=self.folder)

    def remove(self) -> None:
        """Delete the work folder (once the index it fed is in place)."""
        shutil.rmtree(self.folder, ignore_errors=True)


@contextmanager
def build_lock(out_dir: Path) -> Iterator[Path]:
    """Hold the exclusive build lock of the index ``out_dir`` (``<parent>/.<name>.lock``).

    The lock is an ``flock`` on the file, so the kernel releases it when the holder dies, even by SIGKILL.
    The file is deleted on release, while still locked; a build that locked a file just deleted notices
    (its inode is no longer the one at the path) and locks the new one.

    Args:
        out_dir: the index folder being built; its parent is created if missing.

    Yields:
        The lock file's path.

    Raises:
        BlockingIOError: another process is building the same index.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    path = lock_path(out_dir)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise BlockingIOError(
                exc.errno, f"another process is building the index {out_dir} (it holds {path})"
            ) from exc
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def remove_stale_siblings(out_dir: Path, keep: Path | None = None) -> list[Path]:
    """Delete the temporary and replaced-index folders that killed builds of ``out_dir`` left behind.

    Only call this while holding :func:`build_lock`: then no live build but the caller's owns a
    ``.<name>.tmp-*`` or ``.<name>.old-*`` folder (see :func:`~indexer.store.writer.write_index_dir`).

    Args:
        out_dir: the index folder.
        keep: the caller's own temporary folder, left alone.

    Returns:
        The folders removed.
    """
    out_dir = Path(out_dir)
    stale = _siblings(out_dir.parent, (scratch_prefix(out_dir), replaced_prefix(out_dir)), exclude=keep)
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def _siblings(parent: Path, prefixes: tuple[str, ...], exclude: Path | None = None) -> list[Path]:
    # prefix matching rather than glob: an index name may contain glob characters
    if not parent.is_dir():
        return []
    return sorted(p for p in parent.iterdir() if p.name.startswith(prefixes) and p.is_dir() and p != exclude)
