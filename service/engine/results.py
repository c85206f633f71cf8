"""The engine's typed results: everything a response needs, as plain dataclasses (no HTTP, no pydantic)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from indexer.enums import Direction, Objective, Score

Label = int | float | list[int] | None
"""A label, target or prediction: a class index, a value, or a token id per position (a language model,
-100 where a position is not scored)."""

__all__ = [
    "Label",
    "Attribution",
    "Coreset",
    "CoresetMember",
    "ExampleRecord",
    "QueryDescription",
    "RankedExample",
    "SubsetAttribution",
    "SubsetMember",
    "Timings",
]


@dataclass(frozen=True)
class Timings:
    """Time per stage, in milliseconds (the route adds the total)."""

    featurize_ms: float = 0.0
    retrieve_ms: float = 0.0
    rerank_ms: float = 0.0


@dataclass(frozen=True)
class QueryDescription:
    """What the model and the surrogate say about a query.

    Attributes:
        kind, id, label, target, prediction, probabilities, output: as in :class:`~service.engine.Query`.
        posterior_variance: v_q, posterior variance of f_q (output units squared).
        output_entropy: differential entropy of f_q, 0.5 log(2 pi e v_q), nats (None when v_q = 0: -inf).
        predictive_entropy: entropy of the label's predictive distribution by the output function, nats; None
            for a bare feature.
        metadata: a stored query's metadata (without its label), else None.
        text, continuation, continuation_source: a text query's prompt, the continuation explained and
            whether it was ``"given"`` or ``"greedy"``; None for other queries.
    """

    kind: str
    id: int | None
    label: Label
    target: Label
    prediction: Label
    probabilities: list[float] | None
    output: float | None
    posterior_variance: float
    output_entropy: float | None
    predictive_entropy: float | None
    metadata: dict[str, Any] | None
    text: str | None = None
    continuation: str | None = None
    continuation_source: str | None = None


@dataclass(frozen=True)
class RankedExample:
    """One ranked training example: rank (1 = best), id, label, the model's prediction on it, the sign and
    value of the ranking score, every score of DESIGN.md 1.3, and its metadata (without the label)."""

    rank: int
    id: int
    label: Label
    prediction: Label
    sign: int
    signed_score: float
    scores: dict[Score, float]
    metadata: dict[str, Any]


@dataclass(frozen=True)
class Attribution:
    """The answer to one attribution query: ranked examples, the query's description, the retrieval depth
    used, whether the result is provably the exact top-k (else the recall@10 recorded at build for the
    score), and timings."""

    score: Score
    direction: Direction
    top_k: int
    depth: int
    exact: bool
    recall_at_10: float | None
    query: QueryDescription
    examples: list[RankedExample]
    timings: Timings


@dataclass(frozen=True)
class SubsetMember:
    """One member of a greedy subset: its step (1-based), id, label, marginal gain and joint objective after
    it (nats), every single-example score, and metadata."""

    step: int
    id: int
    label: Label
    marginal_gain: float
    joint: float
    scores: dict[Score, float]
    metadata: dict[str, Any]


@dataclass(frozen=True)
class SubsetAttribution:
    """A greedy subset (DESIGN.md 1.4): members in order, the joint objective of the whole set and of the
    top-m single-example set (nats), the candidate pool size, and timings."""

    objective: Objective
    size: int
    candidates: int
    query: QueryDescription
    members: list[SubsetMember]
    joint: float
    top_single_joint: float
    timings: Timings


@dataclass(frozen=True)
class CoresetMember:
    """One coreset member: step (1-based), id, label, marginal gain and summed objective after it (nats)."""

    step: int
    id: int
    label: Label
    marginal_gain: float
    objective: float


@dataclass(frozen=True)
class Coreset:
    """A greedy coreset over ``n_queries`` stored queries; ``objective`` is the whole set's, in nats."""

    size: int
    n_queries: int
    members: list[CoresetMember]
    objective: float


@dataclass(frozen=True)
class ExampleRecord:
    """A training example or stored query as stored in the index.

    Attributes:
        split: ``"train"`` or ``"query"``; id: its row.
        label, prediction, probabilities, output: the stored label and what the model said of it.
        posterior_variance: h_i for a training example, else None.
        metadata: everything else the indexer stored (without the label).
        input_shape: shape of the model input; image_shape: ``(height, width)`` for image data, else None.
    """

    split: str
    id: int
    label: Label
    prediction: Label
    probabilities: list[float] | None
    output: float | None
    posterior_variance: float | None
    metadata: dict[str, Any]
    input_shape: tuple[int, ...]
    image_shape: tuple[int, int] | None
