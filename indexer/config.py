"""The settings of an index build: :class:`IndexConfig`, the single source of their defaults and help.

The CLI (``infotrace-index build``) derives one option per field from this class, with the field's
``help`` metadata and default, so the two cannot drift apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

from indexer.enums import Device, Distribution, FeatureDtype, ProjectionKind, Uncovered, parse_enum
from indexer.gp.surrogate import S_FLOOR

__all__ = ["IndexConfig"]


@dataclass(frozen=True)
class IndexConfig:
    """Settings of an index build (DESIGN.md 1.1, 1.5, 2.1).

    Attributes:
        k: projected dimension of the tangent features (the Kronecker plan's total may differ slightly: at
            least one feature per side of each block; the manifest records the exact value).
        seed: projection seed (same seed and model => same features).
        projection: ``"kronecker"`` (per layer, from hooks; DESIGN.md 1.7) or ``"dense"`` (one dense R).
        distribution: ``"gaussian"`` or ``"rademacher"`` entries of the projection matrices.
        projection_layers: comma-separated fnmatch patterns of module names projected per layer (Kronecker).
        projection_dims: ``"pattern=k_rowxk_col,..."`` fixed block sizes for matching modules (Kronecker).
        small_layer_params: Kronecker: a layer whose gradient (rows x cols, bias included) has at most this
            many entries is projected whole, a count sketch of vec(G), instead of two-sided (the dense
            projection's accuracy where forming G is cheap; 0: none; :class:`~indexer.enums.BlockProjection`).
            The default is :data:`indexer.features.plan.SMALL_LAYER_PARAMS`.
        uncovered: ``"dense"`` or ``"omit"`` for parameters outside supported layers (Kronecker).
        min_coverage: warn when less than this fraction of the parameters reaches the features.
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"`` for featurization.
        prior_precision: tau; None for the mean eigenvalue of the data term (DESIGN.md 1.1).
        s_floor: floor on one minus the leverage (DESIGN.md 1.5).
        batch_size: examples per vmap call when featurizing.
        faiss_factory: FAISS ``index_factory`` string; ``"Flat"`` (the default) keeps no FAISS index: every
            score's exact top-k is one scan of the stored features. Any other string (``"IVF1024,Flat"``,
            ``"HNSW32"``, ``"IVF1024,PQ64"``, ``"SQ8"``, ...) builds an approximate index over the
            information-gain vectors whose recall@10 the build measures (DESIGN.md 2.1).
        feature_dtype: ``"float16"`` (default) or ``"float32"`` storage of phi.
        recall_queries: held-out queries on which an approximate index's recall@10 is measured (the stored
            queries first, then a seeded sample of training features).
        search_depth: candidates an approximate index returns for the exact rerank: its recall@10 is
            measured at this depth, and the service uses it when a request gives no ``candidates`` (a compact
            PQ index needs more than a flat IVF one to reach the same recall).
        nprobe: IVF lists searched by default (approximate IVF indexes; None: FAISS's default, 1).
        ef_search: HNSW search depth by default (approximate HNSW indexes; None: FAISS's default, 16).
        buffer_bytes: gradients gathered per pass over the projection's blocks, in bytes.
        shard_examples: examples per featurization shard, rounded up to whole batches and capped by
            ``buffer_bytes``: the unit of work of a Ray task and of what an interrupted build recomputes, and
            the blocks in which the surrogate's data term is summed (DESIGN.md 2.3). None: as many as
            ``buffer_bytes`` allows (a Ray build then picks a size that gives every worker several shards,
            and records it here).

    Raises:
        ValueError: a non-positive size, an unknown projection kind, a bad tau or floor.
    """

    k: int = field(default=512, metadata={"help": "projected dimension k of the tangent features"})
    seed: int = field(default=0, metadata={"help": "projection seed (same seed and model: same features)"})
    projection: ProjectionKind = field(
        default=ProjectionKind.KRONECKER,
        metadata={
            "help": "kronecker (per layer, two-sided, from hooks) or dense (one P x k matrix, small models)"
        },
    )
    distribution: Distribution = field(
        default=Distribution.GAUSSIAN,
        metadata={"help": "distribution of the entries of the projection matrices"},
    )
    projection_layers: str = field(
        default="*", metadata={"help": "comma-separated name patterns of the modules projected per layer"}
    )
    projection_dims: str = field(
        default="", metadata={"help": "fixed block sizes 'pattern=KROWxKCOL,...' (default: shared out of k)"}
    )
    small_layer_params: int = field(
        default=65_536,
        metadata={
            "help": "Kronecker: layers whose gradient has at most this many entries are projected whole "
            "(a count sketch of the gradient; 0: every layer two-sided)"
        },
    )
    uncovered: Uncovered = field(
        default=Uncovered.DENSE,
        metadata={"help": "parameters outside supported layers: dense (own gradients projected) or omit"},
    )
    min_coverage: float = field(
        default=0.9, metadata={"help": "warn when less than this fraction of the parameters is projected"}
    )
    device: Device = field(
        default=Device.AUTO, metadata={"help": "featurize on: auto (CUDA when present), cpu, cuda"}
    )
    prior_precision: float | None = field(
        default=None, metadata={"help": "prior precision tau (default: the mean eigenvalue of the data term)"}
    )
    s_floor: float = field(default=S_FLOOR, metadata={"help": "floor on s_i = 1 - leverage (DESIGN.md 1.5)"})
    batch_size: int = field(default=128, metadata={"help": "examples per forward and backward pass"})
    faiss_factory: str = field(
        default="Flat", metadata={"help": "FAISS index_factory string ('Flat' = exact search)"}
    )
    feature_dtype: FeatureDtype = field(
        default=FeatureDtype.FLOAT16, metadata={"help": "storage of the features phi: float16 or float32"}
    )
    recall_queries: int = field(
        default=200,
        metadata={"help": "held-out queries on which an approximate index's recall@10 is measured"},
    )
    search_depth: int = field(
        default=100,
        metadata={
            "help": "approximate index: candidates reranked exactly per query (recall is measured at it)"
        },
    )
    nprobe: int | None = field(
        default=None, metadata={"help": "IVF lists searched by default (approximate IVF indexes)"}
    )
    ef_search: int | None = field(
        default=None, metadata={"help": "HNSW search depth by default (approximate HNSW indexes)"}
    )
    buffer_bytes: int = field(
        default=256 * 2**20,
        metadata={"help": "dense projection: bytes of per-example gradients gathered per pass over R"},
    )
    shard_examples: int | None = field(
        default=None,
        metadata={
            "help": "examples per featurization shard (a Ray task's work; default: as buffer_bytes allows)"
        },
    )

    def __post_init__(self) -> None:
        for name, enum in (
            ("projection", ProjectionKind),
            ("distribution", Distribution),
            ("uncovered", Uncovered),
            ("device", Device),
            ("feature_dtype", FeatureDtype),
        ):
            object.__setattr__(self, name, parse_enum(enum, getattr(self, name)))
        if not 0 <= self.min_coverage <= 1:
            raise ValueError(f"min_coverage must lie in [0, 1]; got {self.min_coverage}")
        if not self.layer_patterns:
            raise ValueError("projection_layers must name at least one pattern (e.g. '*')")
        self.dims()  # refuse a malformed projection_dims now, not after featurizing
        if self.k <= 0 or self.batch_size <= 0 or self.buffer_bytes <= 0:
            raise ValueError(
                f"k, batch_size and buffer_bytes must be positive; got {self.k}, "
                f"{self.batch_size}, {self.buffer_bytes}"
            )
        if self.small_layer_params < 0:
            raise ValueError(f"small_layer_params must be 0 or more; got {self.small_layer_params}")
        if self.shard_examples is not None and self.shard_examples <= 0:
            raise ValueError(f"shard_examples must be positive; got {self.shard_examples}")
        if self.search_depth <= 0:
            raise ValueError(f"search_depth must be positive; got {self.search_depth}")
        if self.recall_queries <= 0:
            raise ValueError(f"recall_queries must be positive; got {self.recall_queries}")
        for knob in ("nprobe", "ef_search"):
            value = getattr(self, knob)
            if value is not None and value <= 0:
                raise ValueError(f"{knob} must be positive; got {value}")
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative; got {self.seed}")
        if self.prior_precision is not None and not (
            math.isfinite(self.prior_precision) and self.prior_precision > 0
        ):
            raise ValueError(f"prior_precision must be positive and finite; got {self.prior_precision}")
        if not 0 < self.s_floor < 1:
            raise ValueError(f"s_floor must lie in (0, 1); got {self.s_floor}")

    @property
    def layer_patterns(self) -> tuple[str, ...]:
        """The module-name patterns of :attr:`projection_layers`."""
        return tuple(p.strip() for p in self.projection_layers.split(",") if p.strip())

    def dims(self) -> dict[str, tuple[int, int]]:
        """:attr:`projection_dims` parsed: module-name pattern -> ``(k_row, k_col)``.

        Raises:
            ValueError: an entry that is not ``pattern=AxB`` with positive integers.
        """
        out: dict[str, tuple[int, int]] = {}
        for entry in filter(None, (e.strip() for e in self.projection_dims.split(","))):
            pattern, _, size = entry.partition("=")
            rows, _, cols = size.lower().partition("x")
            if not (pattern and rows.isdigit() and cols.isdigit() and int(rows) > 0 and int(cols) > 0):
                raise ValueError(f"projection_dims entries must look like 'layer=16x16'; got {entry!r}")
            out[pattern] = (int(rows), int(cols))
        return out

    def to_json(self) -> dict[str, Any]:
        """The manifest's ``config`` object: every field, enums as their values."""
        return {
            f.name: (value.value if isinstance(value, Enum) else value)
            for f in fields(self)
            for value in (getattr(self, f.name),)
        }
