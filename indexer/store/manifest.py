"""The manifest of an index directory as one typed class (DESIGN.md 2.1).

``manifest.json`` is the index's self-description: format version, model, projection, surrogate, FAISS
settings, counts, the sha256 of every other file and its own checksum. :class:`Manifest` is the only code
that knows its JSON layout: :meth:`Manifest.to_json` writes it, :meth:`Manifest.from_json` reads it back
with every required field checked, and everyone else reads typed attributes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from indexer.exceptions import IndexCorruptError, IndexFormatError, IndexNotFoundError
from indexer.store.hashing import sha256_json
from indexer.store.layout import (
    FORMAT_VERSION,
    MANIFEST_CHECKSUM_FIELD,
    MANIFEST_FILE,
    READABLE_FORMAT_VERSIONS,
)
from indexer.store.sections import (
    Counts,
    FaissInfo,
    FileEntry,
    JsonReader,
    ModelInfo,
    ProjectionInfo,
    SurrogateInfo,
    read_flat_section,
)

__all__ = ["Manifest", "manifest_checksum", "read_manifest"]


def manifest_checksum(document: dict[str, Any]) -> str:
    """sha256 of a manifest's canonical JSON without its own checksum field.

    The files' checksums live in the manifest; this one covers the manifest itself (projection seed, tau,
    output function, model spec), so that an edit to it is caught like an edit to any other file.

    Args:
        document: the manifest as a JSON object (with or without ``manifest_sha256``).

    Returns:
        64 hex characters.
    """
    return sha256_json({key: value for key, value in document.items() if key != MANIFEST_CHECKSUM_FIELD})


_SECTIONS = ("name", "model", "projection", "surrogate", "faiss", "counts", "files", "format_version")
_OPTIONAL = ("created_unix", "config", "timings_seconds")


@dataclass(frozen=True)
class Manifest:
    """The whole manifest (DESIGN.md 2.1).

    Attributes:
        name: the name the index was built as (the service serves it under its folder's name).
        model, projection, surrogate, faiss, counts: the typed sections.
        files: file name -> :class:`FileEntry` of every other file of the index (empty before writing).
        format_version: layout version (:data:`~indexer.store.layout.FORMAT_VERSION`).
        created_unix: build time, seconds since the epoch.
        config: the build's :class:`~indexer.config.IndexConfig` as JSON.
        timings_seconds: build stage -> seconds.
        extra: any other top-level fields (e.g. the demo's training settings), kept as they are.
    """

    name: str
    model: ModelInfo
    projection: ProjectionInfo
    surrogate: SurrogateInfo
    faiss: FaissInfo
    counts: Counts
    files: dict[str, FileEntry] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    created_unix: float | None = None
    config: dict[str, Any] = field(default_factory=dict)
    timings_seconds: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def with_files(self, files: dict[str, FileEntry]) -> Manifest:
        """A copy listing ``files`` (the writer adds them once every file is on disk)."""
        return replace(self, files=dict(files))

    def to_json(self) -> dict[str, Any]:
        """The manifest as a JSON object, without its own checksum (see :meth:`to_file_json`)."""
        clash = sorted(set(self.extra) & {*_SECTIONS, *_OPTIONAL, MANIFEST_CHECKSUM_FIELD})
        if clash:
            raise ValueError(f"extra manifest fields {clash} would overwrite the manifest's own fields")
        document: dict[str, Any] = {
            "name": self.name,
            "model": self.model.to_json(),
            "projection": self.projection.to_json(),
            "surrogate": self.surrogate.to_json(),
            "faiss": self.faiss.to_json(),
            "counts": self.counts.to_json(),
            "files": {name: {"sha256": f.sha256, "bytes": f.bytes} for name, f in sorted(self.files.items())},
            "format_version": self.format_version,
        }
        if self.created_unix is not None:
            document["created_unix"] = self.created_unix
        if self.config:
            document["config"] = dict(self.config)
        if self.timings_seconds:
            document["timings_seconds"] = dict(self.timings_seconds)
        return {**document, **self.extra}

    def to_file_json(self) -> dict[str, Any]:
        """What ``manifest.json`` holds: :meth:`to_json` plus its own checksum."""
        document = self.to_json()
        return {**document, MANIFEST_CHECKSUM_FIELD: manifest_checksum(document)}

    @classmethod
    def from_json(cls, document: Any, path: str = MANIFEST_FILE) -> Manifest:
        """Parse and check a manifest (the checksum is checked by :func:`read_manifest`, not here).

        Args:
            document: the parsed JSON of ``manifest.json``.
            path: the file, for error messages.

        Returns:
            The :class:`Manifest`.

        Raises:
            IndexFormatError: not an object, a missing or mistyped field, or a format version outside
                :data:`~indexer.store.layout.READABLE_FORMAT_VERSIONS`; the message names the file and the
                field.
        """
        r = JsonReader(document, "", path)
        missing = [key for key in _SECTIONS if key not in document]
        if missing:
            raise IndexFormatError(f"{path} lacks the field(s) {missing}")
        version = document["format_version"]
        if version not in READABLE_FORMAT_VERSIONS or isinstance(version, bool):
            readable = ", ".join(map(str, READABLE_FORMAT_VERSIONS))
            raise IndexFormatError(
                f"{path}: format_version is {version!r}; this infotrace reads versions {readable}: "
                "rebuild the index with this version's infotrace-index"
            )
        files_reader = r.section("files")
        files = {}
        for name in files_reader.document:
            entry = files_reader.section(name)
            if Path(name).name != name:
                raise IndexFormatError(f"{path}: file name {name!r} must not contain a path")
            files[name] = FileEntry(sha256=entry.get("sha256", str), bytes=entry.get("bytes", int))
        if not files:
            raise IndexFormatError(
                f"{path}: 'files' lists no file, so nothing of the index could be verified"
            )
        known = {*_SECTIONS, *_OPTIONAL, MANIFEST_CHECKSUM_FIELD}
        manifest = cls(
            name=r.get("name", str),
            model=ModelInfo._read(r.section("model")),
            projection=read_flat_section(ProjectionInfo, r.section("projection")),
            surrogate=read_flat_section(SurrogateInfo, r.section("surrogate")),
            faiss=read_flat_section(FaissInfo, r.section("faiss")),
            counts=read_flat_section(Counts, r.section("counts")),
            files=files,
            format_version=version,
            created_unix=r.get("created_unix", (int, float), optional=True),
            config=r.get("config", dict, optional=True) or {},
            timings_seconds=r.get("timings_seconds", dict, optional=True) or {},
            extra={key: value for key, value in document.items() if key not in known},
        )
        manifest._check_ranges(path)
        return manifest

    def _check_ranges(self, path: str) -> None:
        """Refuse values no build writes: they would fail later, inside a query."""
        s = self.surrogate
        problems = [
            (
                not (s.prior_precision > 0 and s.prior_precision < float("inf")),
                "surrogate.prior_precision > 0",
            ),
            (not 0 < s.s_floor < 1, "0 < surrogate.s_floor < 1"),
            (min(self.counts.n_train, self.projection.k, self.counts.k) < 1, "counts.n_train and k >= 1"),
            (self.counts.n_query < 0 or s.n_clamped < 0, "counts.n_query and surrogate.n_clamped >= 0"),
            (self.model.n_params < 0, "model.n_params >= 0"),
            (
                self.counts.feature_dtype not in ("float16", "float32"),
                "counts.feature_dtype float16 or float32",
            ),
            (
                self.model.image_shape is not None
                and self.model.image_shape[0] * self.model.image_shape[1]
                != math.prod(self.model.input_shape),
                "model.image_shape has one pixel per input value",
            ),
        ]
        for bad, rule in problems:
            if bad:
                raise IndexFormatError(f"{path}: the manifest breaks the rule {rule}")


def read_manifest(index_dir: Path) -> Manifest:
    """Read, check and parse ``manifest.json`` of an index directory.

    Args:
        index_dir: the index folder.

    Returns:
        The :class:`Manifest`.

    Raises:
        IndexNotFoundError: no such folder or no manifest in it.
        IndexFormatError: not JSON, a missing or mistyped field, or another format version.
        IndexCorruptError: the manifest was edited after it was written (its own checksum differs).
    """
    path = Path(index_dir) / MANIFEST_FILE
    if not path.is_file():
        raise IndexNotFoundError(f"{path} does not exist; an index directory must hold {MANIFEST_FILE}")
    try:
        document = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IndexFormatError(f"{path} is not valid JSON: {exc}") from exc
    manifest = Manifest.from_json(document, str(path))
    if document.get(MANIFEST_CHECKSUM_FIELD) != manifest_checksum(document):
        raise IndexCorruptError(
            f"{path} was edited after the index was written: its content does not match its "
            f"{MANIFEST_CHECKSUM_FIELD}; rebuild the index rather than editing its manifest"
        )
    return manifest
