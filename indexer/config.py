"""The settings of an index build: :class:`IndexConfig`, the single source of their defaults and help.

The CLI (``infotrace-index build``) derives one option per field from this class, with the field's
``help`` metadata and default, so the two cannot drift apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from indexer.enums import ProjectionKind, parse_enum
from indexer.gp.surrogate import S_FLOOR

__all__ = ["IndexConfig"]


@dataclass(frozen=True)
class IndexConfig:
    """Settings of an index build (DESIGN.md 1.1, 1.5, 2.1).

    Attributes:
        k: projected dimension of the tangent features.
        seed: projection seed (same seed and model => same features).
        projection: ``"gaussian"`` or ``"rademacher"`` entries of R.
        prior_precision: tau; None for the mean eigenvalue of the data term (DESIGN.md 1.1).
        s_floor: floor on one minus the leverage (DESIGN.md 1.5).
        batch_size: examples per vmap call when featurizing.
        faiss_factory: FAISS ``index_factory`` string; ``"Flat"`` is exact inner-product search.
        buffer_bytes: gradients gathered per pass over the projection's blocks, in bytes.

    Raises:
        ValueError: a non-positive size, an unknown projection kind, a bad tau or floor.
    """

    k: int = field(default=512, metadata={"help": "projected dimension k of the tangent features"})
    seed: int = field(default=0, metadata={"help": "projection seed (same seed and model: same features)"})
    projection: ProjectionKind = field(
        default=ProjectionKind.GAUSSIAN, metadata={"help": "distribution of the entries of R"}
    )
    prior_precision: float | None = field(
        default=None, metadata={"help": "prior precision tau (default: the mean eigenvalue of the data term)"}
    )
    s_floor: float = field(default=S_FLOOR, metadata={"help": "floor on s_i = 1 - leverage (DESIGN.md 1.5)"})
    batch_size: int = field(default=128, metadata={"help": "examples per vmap call when featurizing"})
    faiss_factory: str = field(
        default="Flat", metadata={"help": "FAISS index_factory string ('Flat' = exact search)"}
    )
    buffer_bytes: int = field(
        default=256 * 2**20,
        metadata={"help": "bytes of per-example gradients gathered per pass over the projection's blocks"},
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "projection", parse_enum(ProjectionKind, self.projection))
        if self.k <= 0 or self.batch_size <= 0 or self.buffer_bytes <= 0:
            raise ValueError(
                f"k, batch_size and buffer_bytes must be positive; got {self.k}, "
                f"{self.batch_size}, {self.buffer_bytes}"
            )
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative; got {self.seed}")
        if self.prior_precision is not None and not (
            math.isfinite(self.prior_precision) and self.prior_precision > 0
        ):
            raise ValueError(f"prior_precision must be positive and finite; got {self.prior_precision}")
        if not 0 < self.s_floor < 1:
            raise ValueError(f"s_floor must lie in (0, 1); got {self.s_floor}")

    def to_json(self) -> dict[str, Any]:
        """The manifest's ``config`` object: every field, enums as their values."""
        return {
            f.name: (value.value if isinstance(value, ProjectionKind) else value)
            for f in fields(self)
            for value in (getattr(self, f.name),)
        }
