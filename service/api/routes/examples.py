"""Training examples and stored queries as resources: metadata as JSON, inputs rendered as PNG images.

``GET /v1/indexes/{name}/examples/{id}`` and ``GET /v1/indexes/{name}/queries/{id}`` describe one training
example or one stored query (label, the model's prediction, metadata, input shape and, for image
datasets, the URL of its rendering); ``.../image.png`` renders the input as a grayscale PNG
(:mod:`service.render`). The dashboard uses these, and so can any other client.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Path, Query, Request, Response, status
from pydantic import BaseModel, Field

from indexer.store.layout import SPLIT_QUERY, SPLIT_TRAIN
from service.api.deps import IndexDep
from service.engine.engine import AttributionEngine
from service.render import DEFAULT_SCALE, MAX_SCALE, render_png

__all__ = ["router", "ExampleInfo", "SCALING_HEADER"]

router = APIRouter(tags=["examples"])

SCALING_HEADER = "X-Infotrace-Scaling"
"""Response header of an image rendering: ``unit`` ([0, 1] -> 0..255) or ``minmax`` (per image)."""

Split = Literal["train", "query"]

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"description": "unknown index or id, or (for image.png) an index whose inputs are not images"},
    503: {"description": "the index is present but not ready (failed to load or verify)"},
}
PNG_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/png": {}}, "description": "the input rendered as a grayscale PNG"},
    **ERROR_RESPONSES,
}

ExampleId = Annotated[int, Path(description="row of the training set (examples) or of the stored queries")]
Scale = Annotated[
    int, Query(ge=1, le=MAX_SCALE, description="nearest-neighbour upscaling factor of the rendering")
]
IncludeInput = Annotated[
    bool, Query(description="also return the raw input as nested lists (input_shape)", alias="include_input")
]


class ExampleInfo(BaseModel):
    """A training example or stored query, as ``GET .../examples/{id}`` or ``.../queries/{id}`` returns it."""

    index: str = Field(description="index name")
    split: Split = Field(description="'train' (a training example) or 'query' (a stored query)")
    id: int = Field(description="row in its split")
    label: int | float | None = Field(description="the stored label or regression target")
    prediction: int | float | None = Field(description="the model's prediction: class index or value")
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


def _info(
    request: Request, engine: AttributionEngine, split: Split, example_id: int, include_input: bool
) -> ExampleInfo:
    record = engine.example(SPLIT_TRAIN if split == "train" else SPLIT_QUERY, example_id)
    # the name the client used (the index's folder), which is what the routes resolve
    name = str(request.path_params["name"])
    image_url = None
    if record.image_shape is not None:
        route = "example_image" if split == "train" else "query_image"
        image_url = request.app.url_path_for(route, name=name, example_id=str(example_id))
    return ExampleInfo(
        index=name,
        split=split,
        id=example_id,
        label=record.label,
        prediction=record.prediction,
        probabilities=record.probabilities,
        output=record.output,
        posterior_variance=record.posterior_variance,
        metadata=record.metadata,
        input_shape=list(record.input_shape),
        image_shape=None if record.image_shape is None else list(record.image_shape),
        image_url=image_url,
        input=engine.example_input(record.split, example_id).tolist() if include_input else None,
    )


def _png(request: Request, engine: AttributionEngine, split: Split, example_id: int, scale: int) -> Response:
    image_shape = engine.data.manifest.model.image_shape
    if image_shape is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            detail=f"index {request.path_params['name']!r} has no image_shape in its manifest, so its "
            "inputs are not images and have no rendering; GET the example without /image.png "
            "(include_input=true for the raw input)",
        )
    values = engine.example_input(SPLIT_TRAIN if split == "train" else SPLIT_QUERY, example_id)
    png, scaling = render_png(values, image_shape, scale)
    # an index is immutable while it is served, but it may be rebuilt under the same name and restarted
    headers = {SCALING_HEADER: scaling, "Cache-Control": "public, max-age=300"}
    return Response(content=png, media_type="image/png", headers=headers)


@router.get(
    "/v1/indexes/{name}/examples/{example_id}",
    response_model=ExampleInfo,
    responses=ERROR_RESPONSES,
    name="example_info",
)
def example_info(
    example_id: ExampleId, engine: IndexDep, request: Request, include_input: IncludeInput = False
) -> ExampleInfo:
    """One training example: label, the model's prediction, metadata and (image data) its image URL."""
    return _info(request, engine, "train", example_id, include_input)


@router.get(
    "/v1/indexes/{name}/examples/{example_id}/image.png",
    response_class=Response,
    responses=PNG_RESPONSE,
    name="example_image",
)
def example_image(
    example_id: ExampleId, engine: IndexDep, request: Request, scale: Scale = DEFAULT_SCALE
) -> Response:
    """One training example's input as a grayscale PNG (image datasets only; scaling in the header)."""
    return _png(request, engine, "train", example_id, scale)


@router.get(
    "/v1/indexes/{name}/queries/{example_id}",
    response_model=ExampleInfo,
    responses=ERROR_RESPONSES,
    name="query_info",
)
def query_info(
    example_id: ExampleId, engine: IndexDep, request: Request, include_input: IncludeInput = False
) -> ExampleInfo:
    """One stored query (held-out example): label, the model's prediction, metadata, image URL."""
    return _info(request, engine, "query", example_id, include_input)


@router.get(
    "/v1/indexes/{name}/queries/{example_id}/image.png",
    response_class=Response,
    responses=PNG_RESPONSE,
    name="query_image",
)
def query_image(
    example_id: ExampleId, engine: IndexDep, request: Request, scale: Scale = DEFAULT_SCALE
) -> Response:
    """One stored query's input as a grayscale PNG (image datasets only; scaling in the header)."""
    return _png(request, engine, "query", example_id, scale)
