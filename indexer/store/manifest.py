"""The manifest of an index directory as one typed class (DESIGN.md 2.1).

``manifest.json`` is the index's self-description: format version, model, projection, surrogate, FAISS
settings, counts, the sha256 of every other file and its own checksum. :class:`Manifest` is the only code
that knows its JSON layout: :meth:`Manifest.to_json` writes it, :meth:`Manifest.from_json` reads it back
with every required field checked, and everyone else reads typed attributes.
"""

from __future__ import annotations

import json
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from indexer.exceptions import IndexCorruptError, IndexFormatError, IndexNotFoundError
from indexer.features.models import ModelSpec
from indexer.store.hashing import sha256_json
from indexer.store.layout import FORMAT_VERSION, MANIFEST_CHECKSUM_FIELD, MANIFEST_FILE

__all__ = ["FileEntry", "ModelInfo", "ProjectionInfo", "SurrogateInfo", "FaissInfo", "Counts", "Manifest"]
__all__ += ["manifest_checksum", "read_manifest"]

EXACT_FACTORY = "Flat"
"""The FAISS factory string of exact (brute-force) inner-product search."""


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


class _Reader:
    """Typed access to one JSON object of the manifest; a missing or mistyped field raises
    :class:`IndexFormatError` naming the file and the field."""

    def __init__(self, document: Any, where: str, path: str) -> None:
        if not isinstance(document, dict):
            raise IndexFormatError(f"{path}: {where or 'the manifest'} must be a JSON object")
        self.document = document
        self.where = where
        self.path = path

    def _name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, types: type | tuple[type, ...], optional: bool = False) -> Any:
        if key not in self.document:
            if optional:
                return None
            raise IndexFormatError(f"{self.path} lacks the field {self._name(key)!r}")
        value = self.document[key]
        if value is None and optional:
            return None
        # JSON has one number type: an int is a valid float; a bool is neither
        if not isinstance(value, types) or (isinstance(value, bool) and types is not bool):
            raise IndexFormatError(f"{self.path}: {self._name(key)!r} must be {types}; got {value!r}")
        return value

    def section(self, key: str) -> _Reader:
        return _Reader(self.get(key, dict), self._name(key), self.path)


@dataclass(frozen=True)
class FileEntry:
    """One file of the index: its checksum and size.

    Attributes:
        sha256: hex sha256 of the file's bytes.
        bytes: its size in bytes.
    """

    sha256: str
    bytes: int


@dataclass(frozen=True)
class ModelInfo:
    """The model the features were taken from.

    Attributes:
        spec: how to rebuild the architecture, or None (then raw-input queries cannot be served).
        checkpoint_sha256: sha256 of the index's own copy of the weights (``model.safetensors``).
        source_checkpoint_sha256: sha256 of the checkpoint file the build was given, if any.
        n_params: P, number of trainable parameters (the length of a tangent feature).
        output_function: registry name of the output function.
        output_params: its constructor arguments.
        input_shape: shape of one model input.
        input_dtype: torch dtype name of the inputs, e.g. ``"float32"``.
        n_outputs: width of the model's output.
        image_shape: ``(height, width)`` when inputs are images (for rendering), else None.
    """

    spec: ModelSpec | None
    checkpoint_sha256: str
    source_checkpoint_sha256: str | None
    n_params: int
    output_function: str
    output_params: dict[str, Any]
    input_shape: tuple[int, ...]
    input_dtype: str
    n_outputs: int
    image_shape: tuple[int, int] | None

    def to_json(self) -> dict[str, Any]:
        """The manifest's ``model`` object."""
        return {
            "spec": self.spec.to_json() if self.spec is not None else None,
            "checkpoint_sha256": self.checkpoint_sha256,
            "source_checkpoint_sha256": self.source_checkpoint_sha256,
            "n_params": self.n_params,
            "output_function": {"name": self.output_function, "params": dict(self.output_params)},
            "input_shape": list(self.input_shape),
            "input_dtype": self.input_dtype,
            "n_outputs": self.n_outputs,
            "image_shape": list(self.image_shape) if self.image_shape is not None else None,
        }

    @classmethod
    def _read(cls, r: _Reader) -> ModelInfo:
        spec_json = r.get("spec", dict, optional=True)
        spec = None
        if spec_json is not None:
            s = _Reader(spec_json, f"{r.where}.spec", r.path)
            spec = ModelSpec(s.get("factory", str), s.get("kwargs", dict, optional=True) or {})
        output = r.section("output_function")
        image_shape = r.get("image_shape", list, optional=True)
        if image_shape is not None and len(image_shape) != 2:
            raise IndexFormatError(
                f"{r.path}: 'model.image_shape' must be [height, width]; got {image_shape}"
            )
        return cls(
            spec=spec,
            checkpoint_sha256=r.get("checkpoint_sha256", str),
            source_checkpoint_sha256=r.get("source_checkpoint_sha256", str, optional=True),
            n_params=r.get("n_params", int),
            output_function=output.get("name", str),
            output_params=output.get("params", dict, optional=True) or {},
            input_shape=_int_tuple(r, "input_shape"),
            input_dtype=r.get("input_dtype", str),
            n_outputs=r.get("n_outputs", int),
            image_shape=None if image_shape is None else (int(image_shape[0]), int(image_shape[1])),
        )


class _FlatSection:
    """A manifest section of plain ints, floats and strings: its JSON object is its fields."""

    def to_json(self) -> dict[str, Any]:
        """The section's manifest object."""
        return asdict(self)  # type: ignore[call-overload]  # subclasses are dataclasses


@dataclass(frozen=True)
class ProjectionInfo(_FlatSection):
    """The seeded projection R (DESIGN.md 1.1).

    Attributes:
        kind: entries of R (``"gaussian"`` or ``"rademacher"``).
        k: projected dimension.
        seed: projection seed.
    """

    kind: str
    k: int
    seed: int


@dataclass(frozen=True)
class SurrogateInfo(_FlatSection):
    """The fitted surrogate's scalars (DESIGN.md 1.1, 1.5).

    Attributes:
        prior_precision: tau.
        prior_precision_source: ``"given"`` or ``"mean_eigenvalue"``.
        likelihood: the output function's name (the likelihood the beta_i come from).
        s_floor: floor on s_i = 1 - leverage.
        n_clamped: examples whose s_i was raised to the floor.
        n_train: N, examples in the posterior.
    """

    prior_precision: float
    prior_precision_source: str
    likelihood: str
    s_floor: float
    n_clamped: int
    n_train: int


@dataclass(frozen=True)
class FaissInfo(_FlatSection):
    """The FAISS indexes over the score vectors (DESIGN.md 1.3, vector form).

    Attributes:
        factory: ``faiss.index_factory`` string.
        metric: always ``"inner_product"``.
        exact: whether search is exhaustive (the factory is ``"Flat"``), so that results can be proved
            equal to the brute-force top-k.
    """

    factory: str
    metric: str = "inner_product"

    @property
    def exact(self) -> bool:
        """True for the flat (brute-force) index; derived from the factory, never stored separately."""
        return self.factory == EXACT_FACTORY

    def to_json(self) -> dict[str, Any]:
        """The manifest's ``faiss`` object (``exact`` is written for readers of the file)."""
        return {**asdict(self), "exact": self.exact}


@dataclass(frozen=True)
class Counts(_FlatSection):
    """Sizes of the index.

    Attributes:
        n_train: training examples N; n_query: stored queries; k: projected dimension.
    """

    n_train: int
    n_query: int
    k: int


Section = TypeVar("Section")


def _flat_section(cls: type[Section], r: _Reader) -> Section:
    """Read a section whose fields are plain ints, floats and strings (JSON numbers: an int is a float)."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]  # every section is a dataclass
        kind = hints[f.name]
        value = r.get(f.name, (int, float) if kind is float else kind, optional=f.default is not MISSING)
        values[f.name] = f.default if value is None else (float(value) if kind is float else value)
    return cls(**values)


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
            IndexFormatError: not an object, a missing or mistyped field, or a format version other than
                :data:`~indexer.store.layout.FORMAT_VERSION`; the message names the file and the field.
        """
        r = _Reader(document, "", path)
        missing = [key for key in _SECTIONS if key not in document]
        if missing:
            raise IndexFormatError(f"{path} lacks the field(s) {missing}")
        version = document["format_version"]
        if version != FORMAT_VERSION:
            raise IndexFormatError(
                f"{path}: format_version is {version!r}; this infotrace reads version {FORMAT_VERSION}: "
                "rebuild the index with this version's infotrace-index"
            )
        files_reader = r.section("files")
        files = {}
        for name in files_reader.document:
            entry = files_reader.section(name)
            if Path(name).name != name:
                raise IndexFormatError(f"{path}: file name {name!r} must not contain a path")
            files[name] = FileEntry(sha256=entry.get("sha256", str), bytes=entry.get("bytes", int))
        known = {*_SECTIONS, *_OPTIONAL, MANIFEST_CHECKSUM_FIELD}
        return cls(
            name=r.get("name", str),
            model=ModelInfo._read(r.section("model")),
            projection=_flat_section(ProjectionInfo, r.section("projection")),
            surrogate=_flat_section(SurrogateInfo, r.section("surrogate")),
            faiss=_flat_section(FaissInfo, r.section("faiss")),
            counts=_flat_section(Counts, r.section("counts")),
            files=files,
            format_version=version,
            created_unix=r.get("created_unix", (int, float), optional=True),
            config=r.get("config", dict, optional=True) or {},
            timings_seconds=r.get("timings_seconds", dict, optional=True) or {},
            extra={key: value for key, value in document.items() if key not in known},
        )


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


def _int_tuple(r: _Reader, key: str) -> tuple[int, ...]:
    values = r.get(key, list)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise IndexFormatError(f"{r.path}: {r._name(key)!r} must be a list of integers; got {values}")
    return tuple(values)
