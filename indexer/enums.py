"""Choices, as `str` enums with one docstring per member, and a parser that lists allowed values."""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

__all__ = [
    "Score",
    "Direction",
    "ProjectionKind",
    "BlockProjection",
    "Distribution",
    "FeatureDtype",
    "Uncovered",
    "Device",
    "OutputKind",
    "Objective",
    "parse_enum",
]

E = TypeVar("E", bound=Enum)


class Score(str, Enum):
    """Single-example attribution scores (DESIGN.md 1.3)."""

    INFORMATION_GAIN = "information_gain"
    """Information y_i alone carries about f_q under the prior, with the variance correction (nats)."""
    INFORMATION_LOSS = "information_loss"
    """Exact entropy increase of f_q when example i is removed from the surrogate (nats)."""
    INFLUENCE = "influence"
    """Signed: how much removing i lowers the posterior mean at q (exact leave-one-out, output units)."""
    INNER_PRODUCT = "inner_product"
    """Baseline phi_q . phi_i (grad-dot, TracIn with one checkpoint)."""
    COSINE = "cosine"
    """Baseline cosine similarity of the projected tangent features."""

    @property
    def signed(self) -> bool:
        """Whether the score carries its own sign (the information scores are unsigned)."""
        return self not in (Score.INFORMATION_GAIN, Score.INFORMATION_LOSS)


class Direction(str, Enum):
    """Which side of the signed score to return."""

    PROPONENTS = "proponents"
    """Examples whose signed score is positive (removing them lowers the query output), largest first."""
    OPPONENTS = "opponents"
    """Examples whose signed score is negative, most negative first."""
    BOTH = "both"
    """Both sides, ranked by the magnitude of the score."""


class ProjectionKind(str, Enum):
    """Structure of the random projection R of the tangent features (DESIGN.md 1.1, 1.7)."""

    KRONECKER = "kronecker"
    """Per layer, two-sided: R_l = S (x) Q, computed from hooks in one forward and backward pass per batch;
    neither R nor the per-example gradient is ever formed (DESIGN.md 1.7). The default."""
    DENSE = "dense"
    """One dense `(P, k)` matrix applied to whole per-example gradients: the reference, for small models."""


class BlockProjection(str, Enum):
    """How one layer's gradient G `(rows, cols)` is projected inside the per-layer projection (DESIGN.md 1.7;
    :class:`~indexer.features.projection.LayerBlock`)."""

    KRONECKER = "kronecker"
    """Two-sided: ``R_row^T G R_col``, from the hooks' projected sides; G is never formed."""
    COUNT_SKETCH = "count_sketch"
    """Whole: ``R^T vec(G)`` with R a count sketch (one +-1 per gradient entry, in a seeded one of the
    block's k columns): G is formed per example, the product costs one add per entry whatever k. The
    default for small layers."""
    DENSE = "dense"
    """Whole: ``R^T vec(G)`` with a seeded Gaussian (or Rademacher) `(rows * cols, k)` R: what small layers
    got before count sketches (indexes built then keep it)."""


class FeatureDtype(str, Enum):
    """How the index stores its features phi (DESIGN.md 2.1); the surrogate is fitted on the stored values,
    so every score is exact for what is stored."""

    FLOAT16 = "float16"
    """Half precision: 2 bytes per coordinate (the default; values beyond 65504 are refused at build)."""
    FLOAT32 = "float32"
    """Single precision: 4 bytes per coordinate."""


class Distribution(str, Enum):
    """Distribution of the entries of the projection matrices (DESIGN.md 1.1, 1.7)."""

    GAUSSIAN = "gaussian"
    """i.i.d. N(0, 1/k) entries (k: the matrix's number of columns)."""
    RADEMACHER = "rademacher"
    """i.i.d. +-1/sqrt(k) entries."""


class Uncovered(str, Enum):
    """What the Kronecker projection does with parameters outside supported layers (DESIGN.md 1.7)."""

    DENSE = "dense"
    """Their own (small) per-example gradients, projected by a seeded dense matrix into one more block."""
    OMIT = "omit"
    """Left out of the features (the manifest's coverage record lists them)."""


class Device(str, Enum):
    """Where featurization runs."""

    AUTO = "auto"
    """CUDA when torch sees a GPU, else the CPU."""
    CPU = "cpu"
    """The CPU."""
    CUDA = "cuda"
    """The first CUDA device (an error when there is none)."""


class OutputKind(str, Enum):
    """Built-in output functions (DESIGN.md 1.1, 1.8)."""

    CLASSIFICATION_MARGIN = "classification_margin"
    """m = z_y - logsumexp_{c != y} z_c, so sigmoid(m) is the softmax probability of the label."""
    REGRESSION = "regression"
    """The scalar model output itself, Gaussian likelihood with noise variance sigma^2."""
    LM_MARGIN = "lm_margin"
    """Language models: the sum of the target tokens' margins over the vocabulary, with `(T, vocab)` logits
    per example aligned with `(T,)` target token ids (DESIGN.md 1.8)."""


class Objective(str, Enum):
    """Subset objectives (DESIGN.md 1.4)."""

    INFORMATION_LOSS = "information_loss"
    """Joint entropy increase of f_q when the whole subset is removed (nats)."""
    INFORMATION_GAIN = "information_gain"
    """Joint information the subset's labels carry about f_q under the prior (nats)."""


def parse_enum(enum_type: type[E], value: E | str) -> E:
    """Convert ``value`` to ``enum_type``.

    Args:
        enum_type: the target ``str`` enum class.
        value: a member or its string value.

    Returns:
        The enum member.

    Raises:
        ValueError: ``value`` is not one of the allowed values; the message lists them.
    """
    if isinstance(value, enum_type):
        return value
    if isinstance(value, str):
        for member in enum_type:
            if member.value == value:  # type: ignore[attr-defined]
                return member
    allowed = ", ".join(repr(m.value) for m in enum_type)  # type: ignore[attr-defined]
    raise ValueError(f"{enum_type.__name__} must be one of {allowed}; got {value!r}")
