"""Request and response models of the HTTP API (DESIGN.md 2.2). Separate from the engine's objects."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StrictFloat,
    StrictInt,
    Tag,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
)
from pydantic_core import PydanticCustomError, to_json
from starlette.responses import Response

from indexer.enums import Direction, Objective, Score
from service.engine.results import Label

__all__ = [
    "json_response",
    "plain_json_response",
    "CoresetRequest",
    "CoresetMember",
    "CoresetResponse",
    "QuerySpec",
    "StoredQuery",
    "InputQuery",
    "FeatureQuery",
    "TextQuery",
    "AttributionRequest",
    "SubsetRequest",
    "QueryInfo",
    "ScoreSet",
    "AttributedExample",
    "Timings",
    "AttributionResponse",
    "BatchAttributionRequest",
    "BatchAttributionResponse",
    "BatchItem",
    "BatchItemError",
    "SubsetMember",
    "SubsetResponse",
    "IndexSummary",
    "IndexList",
    "Health",
    "Readiness",
    "Split",
    "ExampleInfo",
]


MAX_TEXT_CHARS = 10_000
"""Longest text or continuation of a text query, in characters (a model's context is far shorter)."""


def _scan(number_types: tuple[type, ...], expected: str) -> WrapValidator:
    """A validator of a list of JSON numbers that answers the first wrong element with one error (pydantic's
    own check builds an error per element: a million booleans took seconds on the event loop)."""

    def check(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        if isinstance(value, list):
            for position, item in enumerate(value):
                if type(item) not in number_types:
                    shown = "true/false" if isinstance(item, bool) else type(item).__name__
                    raise PydanticCustomError(
                        "number_list",
                        "expected {expected}; position {position} holds {shown}",
                        {"expected": expected, "position": position, "shown": shown},
                    )
        return handler(value)

    return WrapValidator(check)


class StoredQuery(BaseModel):
    """A held-out example featurized at index time."""

    model_config = ConfigDict(extra="forbid")

    id: StrictInt = Field(ge=0, description="id of a stored query (see GET /v1/indexes/{name}/queries/{id})")


class InputQuery(BaseModel):
    """A raw model input, featurized with the index's model, projection and output function."""

    model_config = ConfigDict(extra="forbid")

    input: list[Any] = Field(
        min_length=1,
        description="raw model input as nested lists with the index's input_shape (e.g. 784 floats)",
    )
    target: Annotated[
        StrictInt | StrictFloat | list[StrictInt] | None,
        _scan((int,), "a number, or a list of integer token ids"),
    ] = Field(
        None,
        description="label (class index) or regression target to explain, or for a language model one token "
        "id per position (-100: not scored); default: the prediction",
    )


class FeatureQuery(BaseModel):
    """A precomputed projected tangent feature."""

    model_config = ConfigDict(extra="forbid")

    feature: Annotated[list[StrictFloat | StrictInt], _scan((float, int), "a list of numbers")] = Field(
        min_length=1, description="projected tangent feature phi_q, k floats"
    )


class TextQuery(BaseModel):
    """A text for a language-model index: the continuation's tokens explained given the text."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS, description="the prompt")
    continuation: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_TEXT_CHARS,
        description="the tokens to explain, appended to the text as written (include a leading space to "
        "start a new word); default: the model's own greedy continuation",
    )
    max_new_tokens: StrictInt = Field(
        16, ge=1, le=1024, description="length of the greedy continuation when none is given, in tokens"
    )


_QUERY_KINDS: dict[str, type[BaseModel]] = {
    "stored": StoredQuery,
    "input": InputQuery,
    "feature": FeatureQuery,
    "text": TextQuery,
}


QUERY_KEYS = ("id", "input", "feature", "text")
"""The key that names each kind of query."""


def _exactly_one_kind(value: Any) -> Any:
    # checked before the union so that the caller reads one clear message, not one error per branch
    if isinstance(value, dict):
        given = [key for key in QUERY_KEYS if key in value]
        if len(given) != 1:
            raise ValueError(f"give exactly one of 'id', 'input', 'feature' or 'text'; got {given or 'none'}")
        if "target" in value and given != ["input"]:
            raise ValueError("'target' applies only to an 'input' query")
        for option in ("continuation", "max_new_tokens"):
            if option in value and given != ["text"]:
                raise ValueError(f"'{option}' applies only to a 'text' query")
    return value


def _query_kind(value: Any) -> str | None:
    # the branch a query object is validated against, so errors come from that one branch only
    if isinstance(value, dict):
        key = next((key for key in QUERY_KEYS if key in value), None)
        return "stored" if key == "id" else key
    return next(
        (key for key, kind in _QUERY_KINDS.items() if isinstance(value, kind)), None
    )  # already a model (built in Python)


QuerySpec = Annotated[
    Annotated[StoredQuery, Tag("stored")]
    | Annotated[InputQuery, Tag("input")]
    | Annotated[FeatureQuery, Tag("feature")]
    | Annotated[TextQuery, Tag("text")],
    Discriminator(
        _query_kind,
        custom_error_type="query_kind",
        custom_error_message="expected a query object with exactly one of 'id', 'input', 'feature' or 'text'",
    ),
    BeforeValidator(_exactly_one_kind),
]
"""The query: exactly one of a stored id, a raw input (with an optional target), a feature, or a text (a
language-model index with a tokenizer)."""


class AttributionRequest(BaseModel):
    """``POST /v1/indexes/{name}/attributions``."""

    model_config = ConfigDict(extra="forbid")

    query: QuerySpec
    top_k: StrictInt = Field(10, ge=1, description="number of training examples to return")
    score: Score = Field(Score.INFORMATION_GAIN, description="ranking score (DESIGN.md 1.3)")
    direction: Direction = Field(Direction.BOTH, description="proponents, opponents or both (by magnitude)")
    candidates: StrictInt | None = Field(
        None,
        ge=1,
        description="retrieval depth before the exact rerank (default from settings; deepened as needed)",
    )
    nprobe: StrictInt | None = Field(
        None, ge=1, description="IVF lists visited (approximate IVF indexes only; default: the index's)"
    )
    ef_search: StrictInt | None = Field(
        None, ge=1, description="HNSW search depth (approximate HNSW indexes only; default: the index's)"
    )


class SubsetRequest(BaseModel):
    """``POST /v1/indexes/{name}/attributions/subset``."""

    model_config = ConfigDict(extra="forbid")

    query: QuerySpec
    size: StrictInt = Field(10, ge=1, description="number of examples m in the greedy set")
    objective: Objective = Field(
        Objective.INFORMATION_LOSS, description="joint score to maximise (DESIGN.md 1.4)"
    )
    candidates: StrictInt = Field(
        200, ge=1, description="candidate pool: top examples by the objective's single score"
    )


class CoresetRequest(BaseModel):
    """``POST /v1/indexes/{name}/coreset``."""

    model_config = ConfigDict(extra="forbid")

    size: StrictInt = Field(10, ge=1, description="number of training examples m to choose")
    query_ids: Annotated[list[StrictInt], _scan((int,), "a list of integer ids")] | None = Field(
        None,
        min_length=1,
        description="distinct stored queries forming the query set (default: all of them)",
    )

    @field_validator("query_ids")
    @classmethod
    def _distinct(cls, ids: list[int] | None) -> list[int] | None:
        if ids is not None and len(set(ids)) != len(ids):
            repeated = sorted({i for i in ids if ids.count(i) > 1})[:10]
            raise ValueError(f"query ids must be distinct (each query counts once); repeated: {repeated}")
        return ids


class CoresetMember(BaseModel):
    """One member of a coreset."""

    step: int
    id: int
    label: Label
    marginal_gain: float = Field(description="increase of the summed information gain when added, nats")
    objective: float = Field(description="sum over queries of IG(first `step` members | q), nats")


class CoresetResponse(BaseModel):
    """A greedy coreset (DESIGN.md 1.4)."""

    index: str
    size: int
    n_queries: int
    members: list[CoresetMember]
    objective: float = Field(description="summed information gain of the whole set, nats")
    timings: Timings


class QueryInfo(BaseModel):
    """What the model and the surrogate say about the query."""

    kind: str = Field(description="stored, input, feature or text")
    id: int | None = Field(description="stored query id")
    label: Label = Field(description="true label of a stored query")
    target: Label = Field(description="the label or target being explained")
    prediction: Label = Field(description="predicted class (classification) or value")
    probabilities: list[float] | None = Field(description="softmax over classes")
    output: float | None = Field(description="output function m_q (classification: the margin)")
    posterior_variance: float = Field(description="v_q, posterior variance of f_q under the surrogate")
    output_entropy: float | None = Field(
        description="differential entropy of f_q, 0.5 log(2 pi e v_q), nats; null when v_q = 0 (-infinity)"
    )
    predictive_entropy: float | None = Field(description="entropy of the predictive distribution, nats")
    metadata: dict[str, Any] | None = Field(None, description="metadata of a stored query")
    text: str | None = Field(None, description="a text query's prompt")
    continuation: str | None = Field(None, description="a text query's continuation, decoded from its tokens")
    continuation_source: Literal["given", "greedy"] | None = Field(
        None, description="whether the continuation was given or is the model's greedy one"
    )


class ScoreSet(BaseModel):
    """Every score of DESIGN.md 1.3 for one training example."""

    information_gain: float = Field(description="nats, unsigned")
    information_loss: float = Field(description="nats, unsigned")
    influence: float = Field(description="signed, output units: drop of the query's mean when removed")
    inner_product: float
    cosine: float


class AttributedExample(BaseModel):
    """One ranked training example."""

    rank: int = Field(description="1 = best")
    id: int = Field(description="training example id (row of the training set)")
    label: Label
    prediction: Label = Field(description="the model's prediction on this training example")
    sign: int = Field(description="+1 proponent, -1 opponent, 0 neither")
    signed_score: float = Field(description="the ranking score with its sign")
    scores: ScoreSet
    metadata: dict[str, Any]


class Timings(BaseModel):
    """Server-side time per stage, in milliseconds."""

    featurize_ms: float
    retrieve_ms: float
    rerank_ms: float
    total_ms: float


class AttributionResponse(BaseModel):
    """Ranked training examples for one query."""

    index: str
    score: Score
    direction: Direction
    top_k: int
    candidates_searched: int = Field(description="retrieval depth finally used (candidates reranked exactly)")
    exact: bool = Field(description="true when the result equals the brute-force top-k over all examples")
    recall_at_10: float | None = Field(
        description="approximate index: its recall@10 for this score measured at build against the exact "
        "answer (at the default depth and knobs); null when the result is exact"
    )
    query: QueryInfo
    results: list[AttributedExample]
    timings: Timings


class BatchAttributionRequest(BaseModel):
    """``POST /v1/indexes/{name}/attributions:batch``: several attribution queries answered in one pass."""

    model_config = ConfigDict(extra="forbid")

    requests: list[Any] = Field(
        min_length=1,
        description="each item exactly the body of POST .../attributions (validated item by item: a bad item "
        "gets its own error, the others are answered); at most INFOTRACE_MAX_BATCH items",
    )


class BatchItemError(BaseModel):
    """Why one item of a batch was not answered: the body the single route would have answered it with."""

    detail: Any = Field(description="a message, or validation errors located under ['body', 'requests', i]")


class BatchItem(BaseModel):
    """One item's outcome: ``status`` 200 with ``response``, or the single route's error status with
    ``error``."""

    status: int = Field(description="the HTTP status the single route would have answered this item with")
    response: AttributionResponse | None = None
    error: BatchItemError | None = None


class BatchAttributionResponse(BaseModel):
    """The outcome of every item of a batch, in order."""

    index: str
    answered: int = Field(description="items answered with status 200")
    results: list[BatchItem]
    timings: Timings = Field(
        description="the whole batch: validating and featurizing every query, the retrieval (the batched "
        "scan or search) and the reranks summed over items, and the total"
    )


class SubsetMember(BaseModel):
    """One member of a greedy subset."""

    step: int
    id: int
    label: Label
    marginal_gain: float = Field(description="increase of the joint objective when added, nats")
    joint: float = Field(description="joint objective of the first `step` members, nats")
    scores: ScoreSet
    metadata: dict[str, Any]


class SubsetResponse(BaseModel):
    """A greedy subset and its joint score."""

    index: str
    objective: Objective
    size: int
    candidates: int
    query: QueryInfo
    members: list[SubsetMember]
    joint: float = Field(description="joint objective of the whole set, nats")
    top_single_joint: float = Field(description="joint objective of the top-m single-example set, nats")
    timings: Timings


class IndexSummary(BaseModel):
    """An index as listed by the service."""

    name: str
    ready: bool
    error: str | None = None
    n_train: int | None = None
    n_query: int | None = None
    k: int | None = None
    model: dict[str, Any] | None = None
    projection: dict[str, Any] | None = None
    surrogate: dict[str, Any] | None = None
    faiss: dict[str, Any] | None = None
    raw_input_queries: bool = Field(False, description="whether the index can featurize raw inputs")
    text_queries: bool = Field(
        False, description="whether the index takes text queries (a language model with its tokenizer)"
    )


class IndexList(BaseModel):
    """``GET /v1/indexes``."""

    indexes: list[IndexSummary]


class Health(BaseModel):
    """``GET /healthz``: the process is up."""

    status: str
    pid: int = Field(description="the worker process that answered (the service runs several)")


class Readiness(BaseModel):
    """``GET /readyz``: whether indexes are loaded."""

    ready: bool
    indexes: dict[str, str] = Field(description="name -> 'ready' or the reason it is not")
    detail: str | None = Field(None, description="why the service is not ready, when no index explains it")
    missing: dict[str, dict[str, str]] = Field(
        default_factory=dict,
        description="name -> {capability: why it is missing} for a served index that lacks one: "
        "'raw_input_queries' when its model cannot be rebuilt (stored-id and feature queries still work)",
    )


Split = Literal["train", "query"]
"""A training example (``train``) or a stored query (``query``)."""


class ExampleInfo(BaseModel):
    """A training example or stored query, as ``GET .../examples/{id}`` or ``.../queries/{id}`` returns it."""

    index: str = Field(description="index name")
    split: Split = Field(description="'train' (a training example) or 'query' (a stored query)")
    id: int = Field(description="row in its split")
    label: Label = Field(description="the stored label or regression target")
    prediction: Label = Field(description="the model's prediction: class index or value")
    probabilities: list[float] | None = Field(None, description="softmax over classes (classification)")
    output: float | None = Field(None, description="output function value m (classification: the margin)")
    posterior_variance: float | None = Field(
        None, description="h_i, posterior variance of the surrogate's output on this training example"
    )
    metadata: dict[str, Any] = Field(description="everything else the indexer stored about the example")
    input_shape: list[int] = Field(description="shape of the model input")
    image_shape: list[int] | None = Field(description="(height, width) when inputs are images, else null")
    image_url: str | None = Field(description="path of the PNG rendering; null when inputs are not images")
    input: list[Any] | None = Field(None, description="the raw input (only with include_input=true)")


def json_response(model: BaseModel, status_code: int = 200) -> Response:
    """``model`` as a JSON response, serialized once by pydantic.

    A route that returns its response model object has FastAPI validate it again (in a second trip to the
    thread pool, for a sync route) before serializing it; this skips that and writes the same bytes. The
    route keeps ``response_model=`` for its OpenAPI schema.

    Args:
        model: a response model instance, built from the engine's typed results.
        status_code: the HTTP status.
    """
    return Response(model.model_dump_json(), status_code=status_code, media_type="application/json")


def _plain(value: Any) -> Any:
    """A numpy scalar or array as Python numbers (:func:`plain_json_response`'s fallback)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot serialize {type(value).__name__} as JSON")


def plain_json_response(payload: Any, status_code: int = 200) -> Response:
    """Plain data (dicts, lists, numbers, strings, enums) that has a response model's shape, serialized as
    that model serializes (pydantic's encoder: the same floats; NaN and infinity as null) without building
    the model: an attribution batch has thousands of examples, and building their models was a quarter of
    its time. The route keeps ``response_model=`` for its OpenAPI schema, and the schema tests check the
    responses against it.

    Args:
        payload: the response's content.
        status_code: the HTTP status.

    Raises:
        TypeError: a value neither JSON nor numpy.
    """
    body = to_json(payload, inf_nan_mode="null", fallback=_plain)
    return Response(body, status_code=status_code, media_type="application/json")
