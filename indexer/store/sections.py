"""The typed sections of an index manifest (DESIGN.md 2.1): the model, the projection, the surrogate, FAISS,
the counts and the file entries, each read from its JSON object with every field checked by name.
"""

from __future__ import annotations

import math
import typing
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, TypeVar

from indexer.enums import Distribution, ProjectionKind, parse_enum
from indexer.exceptions import IndexFormatError
from indexer.features.models import ModelSpec

__all__ = [
    "EXACT_FACTORY",
    "FileEntry",
    "ModelInfo",
    "ProjectionInfo",
    "SurrogateInfo",
    "FaissInfo",
    "Counts",
]
__all__ += ["JsonReader", "read_flat_section", "int_tuple"]

EXACT_FACTORY = "Flat"
"""The FAISS factory string of exact (brute-force) inner-product search."""


class JsonReader:
    """Typed access to one JSON object of the manifest; a missing or mistyped field raises
    :class:`IndexFormatError` naming the file and the field.

    Args:
        document: the object; where: its dotted path in the manifest (``""`` for the top); path: the file.

    Raises:
        IndexFormatError: ``document`` is not a JSON object.
    """

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

    def section(self, key: str) -> JsonReader:
        return JsonReader(self.get(key, dict), self._name(key), self.path)


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
        checkpoint_sha256: sha256 of the index's own copy of the weights (``model.safetensors``); None for an
            index built from precomputed features (no model).
        source_checkpoint_sha256: sha256 of the checkpoint file the build was given, if any.
        n_params: P, number of trainable parameters (the length of a tangent feature).
        output_function: registry name of the output function.
        output_params: its constructor arguments.
        input_shape: shape of one model input.
        input_dtype: torch dtype name of the inputs, e.g. ``"float32"``.
        n_outputs: width of the model's output (flattened per example: ``T * vocab`` for a language model).
        image_shape: ``(height, width)`` when inputs are images (for rendering), else None.
        input_dtypes: for a model called with keyword arguments (a mapping input: ``input_ids``,
            ``attention_mask``, ...), each keyword's torch dtype name in call order; None (absent from the
            JSON) for one tensor input, and in manifests written before it was recorded.
        target_shape: shape of one target (``()`` for a class, ``(T,)`` for token ids); None when not
            recorded.
        target_dtype: numpy dtype name of the stored targets, e.g. ``"int64"``; None when not recorded.
    """

    spec: ModelSpec | None
    checkpoint_sha256: str | None
    source_checkpoint_sha256: str | None
    n_params: int
    output_function: str
    output_params: dict[str, Any]
    input_shape: tuple[int, ...]
    input_dtype: str
    n_outputs: int
    image_shape: tuple[int, int] | None
    input_dtypes: dict[str, str] | None = None
    target_shape: tuple[int, ...] | None = None
    target_dtype: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The manifest's ``model`` object (the fields added later are left out when not recorded, so that an
        older manifest round-trips exactly)."""
        later = {
            "input_dtypes": dict(self.input_dtypes) if self.input_dtypes is not None else None,
            "target_shape": list(self.target_shape) if self.target_shape is not None else None,
            "target_dtype": self.target_dtype,
        }
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
            **{key: value for key, value in later.items() if value is not None},
        }

    @classmethod
    def _read(cls, r: JsonReader) -> ModelInfo:
        spec_json = r.get("spec", dict, optional=True)
        spec = None
        if spec_json is not None:
            s = JsonReader(spec_json, f"{r.where}.spec", r.path)
            spec = ModelSpec(s.get("factory", str), s.get("kwargs", dict, optional=True) or {})
        output = r.section("output_function")
        image_shape = r.get("image_shape", list, optional=True)
        if image_shape is not None and len(image_shape) != 2:
            raise IndexFormatError(
                f"{r.path}: 'model.image_shape' must be [height, width]; got {image_shape}"
            )
        input_dtypes = r.get("input_dtypes", dict, optional=True)
        if input_dtypes is not None and not all(isinstance(v, str) for v in input_dtypes.values()):
            raise IndexFormatError(f"{r.path}: 'model.input_dtypes' must map keywords to dtype names")
        target_shape = r.get("target_shape", list, optional=True)
        return cls(
            spec=spec,
            checkpoint_sha256=r.get("checkpoint_sha256", str, optional=True),
            source_checkpoint_sha256=r.get("source_checkpoint_sha256", str, optional=True),
            n_params=r.get("n_params", int),
            output_function=output.get("name", str),
            output_params=output.get("params", dict, optional=True) or {},
            input_shape=int_tuple(r, "input_shape"),
            input_dtype=r.get("input_dtype", str),
            n_outputs=r.get("n_outputs", int),
            image_shape=None if image_shape is None else (int(image_shape[0]), int(image_shape[1])),
            input_dtypes=None if input_dtypes is None else dict(input_dtypes),
            target_shape=None if target_shape is None else int_tuple(r, "target_shape"),
            target_dtype=r.get("target_dtype", str, optional=True),
        )


class _FlatSection:
    """A manifest section of plain ints, floats and strings: its JSON object is its fields."""

    def to_json(self) -> dict[str, Any]:
        """The section's manifest object."""
        return asdict(self)  # type: ignore[call-overload]  # subclasses are dataclasses


@dataclass(frozen=True)
class ProjectionInfo(_FlatSection):
    """The seeded projection of the tangent features (DESIGN.md 1.1, 1.7).

    Attributes:
        kind: ``"kronecker"`` or ``"dense"`` (format 1 indexes wrote the dense projection's distribution
            here: ``"gaussian"`` or ``"rademacher"``).
        k: projected dimension.
        seed: projection seed.
        distribution: entries of the matrices (None in format 1 indexes: see ``kind``).
        coverage: the Kronecker plan (blocks, the rest block, the covered fraction of the parameters).
    """

    kind: str
    k: int
    seed: int
    distribution: str | None = None
    coverage: dict | None = None

    def to_json(self) -> dict[str, Any]:
        """The manifest's ``projection`` object (fields that are None are left out)."""
        return {key: value for key, value in asdict(self).items() if value is not None}

    @property
    def structure(self) -> ProjectionKind:
        """Kronecker or dense (an index of format 1 is dense)."""
        return (
            ProjectionKind.KRONECKER if self.kind == ProjectionKind.KRONECKER.value else ProjectionKind.DENSE
        )

    @property
    def entries(self) -> Distribution:
        """The distribution of the matrices' entries."""
        return parse_enum(Distribution, self.distribution or self.kind)


@dataclass(frozen=True)
class SurrogateInfo(_FlatSection):
    """The fitted surrogate's scalars (DESIGN.md 1.1, 1.5).

    Attributes:
        prior_precision: tau.
        prior_precision_source: ``"given"`` or ``"mean_eigenvalue"``.
        likelihood: the output function's name (the likelihood the beta_i come from).
        s_floor: floor on s_i = 1 - leverage.
        n_clamped: examples whose s_i was raised to the floor (an upper bound when ``leverage_bounds``).
        n_train: N, examples in the posterior.
        leverage_bounds: whether the stored h_i and s_i of some examples are those of an earlier posterior
            with fewer examples (an add keeps them instead of recomputing every example's, N k^2 float64
            operations): h from above, s from below; readers compute the exact values on demand from the
            Cholesky factor (:mod:`indexer.gp.leverage`, DESIGN.md 2.1). False: every stored value exact.
    """

    prior_precision: float
    prior_precision_source: str
    likelihood: str
    s_floor: float
    n_clamped: int
    n_train: int
    leverage_bounds: bool = False

    def to_json(self) -> dict[str, Any]:
        """The manifest's ``surrogate`` object (``leverage_bounds`` only when true, so that manifests
        written before it round-trip exactly)."""
        document = asdict(self)
        if not self.leverage_bounds:
            del document["leverage_bounds"]
        return document


@dataclass(frozen=True)
class FaissInfo(_FlatSection):
    """Retrieval (DESIGN.md 1.3 vector form, 2.1): the exact scan of the stored features, or an approximate
    FAISS index over the information-gain vectors with its measured recall.

    Attributes:
        factory: ``faiss.index_factory`` string; ``"Flat"``: no FAISS index, the exact scan.
        metric: always ``"inner_product"``.
        recall_at_10: score -> mean recall@10 (direction ``both``) of the approximate index against the exact
            answer, measured at build on ``recall_queries`` held-out queries with the default knobs below;
            None for the exact scan.
        recall_queries: how many queries the recall was measured on (0 for the exact scan).
        recall_candidates: the retrieval depth (candidates reranked) the recall was measured at.
        nprobe: default IVF lists searched (None: not an IVF index, or FAISS's default).
        ef_search: default HNSW depth (None: not an HNSW index, or FAISS's default).
        vector_scale: the positive constant the information-gain vectors are multiplied by before FAISS
            trains on and stores them (a power of two near 1 / their median norm): ranking by inner product
            with a unit query does not depend on it, but product quantisers lose their codes on vectors
            of norm ~0.02 (IVF1024,PQ64 at N = 1,000,000: recall@10 0.05 unscaled, see
            :func:`~indexer.store.search.vector_scale`); appended vectors get the same constant. 1.0 in
            indexes built before it.
        shards: vectors in each file of the approximate index, in order (``faiss.index``,
            ``faiss.1.index``, ...: an add appends its vectors as a shard, trained like the first, and
            searches merge the shards' results); None: one file.
        exact: whether retrieval is the exact scan (the factory is ``"Flat"``), so that results are the
            brute-force top-k.
    """

    factory: str
    metric: str = "inner_product"
    recall_at_10: dict | None = None
    recall_queries: int = 0
    recall_candidates: int = 0
    nprobe: int | None = None
    ef_search: int | None = None
    vector_scale: float = 1.0
    shards: list | None = None

    def __post_init__(self) -> None:
        """Refuse a scale that is not a positive finite number, and shard sizes that are not a list of at
        least two non-negative integers.

        Raises:
            IndexFormatError: ``vector_scale`` is zero, negative, infinite or NaN; bad ``shards``.
        """
        if not (math.isfinite(self.vector_scale) and self.vector_scale > 0):
            raise IndexFormatError(f"faiss.vector_scale must be positive and finite; got {self.vector_scale}")
        shards = self.shards
        if shards is not None and (
            len(shards) < 2
            or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in shards)
        ):
            raise IndexFormatError(f"faiss.shards must list two or more vector counts; got {shards}")

    @property
    def exact(self) -> bool:
        """True for the flat (brute-force) index; derived from the factory, never stored separately."""
        return self.factory == EXACT_FACTORY

    def to_json(self) -> dict[str, Any]:
        """The manifest's ``faiss`` object (``exact`` is written for readers of the file; the fields of an
        approximate index only when set, so that an older manifest round-trips exactly)."""
        later = ("recall_at_10", "recall_queries", "recall_candidates", "nprobe", "ef_search", "shards")
        document = {key: value for key, value in asdict(self).items() if key not in later or value}
        if self.vector_scale == 1.0:
            del document["vector_scale"]
        return {**document, "exact": self.exact}


@dataclass(frozen=True)
class Counts(_FlatSection):
    """Sizes and storage of the index.

    Attributes:
        n_train: training examples N; n_query: stored queries; k: projected dimension.
        feature_dtype: numpy dtype name of the stored features ``phi.npy`` and ``query_phi.npy``
            (``"float16"`` or ``"float32"``).
        phi_segments: rows in each file of the training features, in order (``phi.npy``, ``phi.1.npy``,
            ...: an add appends its rows as a new file and links the others unchanged into the new version);
            None: one file, ``phi.npy``.
    """

    n_train: int
    n_query: int
    k: int
    feature_dtype: str = "float32"
    phi_segments: list | None = None

    def __post_init__(self) -> None:
        """Refuse segment sizes that are not non-negative integers summing to ``n_train``.

        Raises:
            IndexFormatError: bad ``phi_segments``.
        """
        seg = self.phi_segments
        if seg is not None and (
            not seg
            or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in seg)
            or sum(seg) != self.n_train
        ):
            raise IndexFormatError(
                f"counts.phi_segments must be a non-empty list of row counts summing to n_train "
                f"({self.n_train}); got {seg}"
            )

    def to_json(self) -> dict[str, Any]:
        """The manifest's ``counts`` object (``feature_dtype`` left out when it is the default, float32, as
        manifests written before it was recorded have it; ``phi_segments`` when there are several)."""
        document = asdict(self)
        if self.feature_dtype == "float32":
            del document["feature_dtype"]
        if self.phi_segments is None:
            del document["phi_segments"]
        return document


Section = TypeVar("Section")


def read_flat_section(cls: type[Section], r: JsonReader) -> Section:
    """Read a section whose fields are plain ints, floats and strings (JSON numbers: an int is a float)."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]  # every section is a dataclass
        kind = hints[f.name]
        value = r.get(f.name, (int, float) if kind is float else kind, optional=f.default is not MISSING)
        values[f.name] = f.default if value is None else (float(value) if kind is float else value)
    return cls(**values)


def int_tuple(r: JsonReader, key: str) -> tuple[int, ...]:
    """The list of integers at ``key`` as a tuple.

    Raises:
        IndexFormatError: not a list of integers (names the field).
    """
    values = r.get(key, list)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise IndexFormatError(f"{r.path}: {r._name(key)!r} must be a list of integers; got {values}")
    return tuple(values)
