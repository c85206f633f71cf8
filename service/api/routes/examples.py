"""Training examples and stored queries as resources: metadata as JSON, inputs rendered as PNG images.

``GET /v1/indexes/{name}/examples/{id}`` and ``GET /v1/indexes/{name}/queries/{id}`` describe one training
example or one stored query (label, the model's prediction, metadata, input shape and, for image
datasets, the URL of its rendering); ``.../image.png`` renders the input as a grayscale PNG
(:mod:`service.render`). The dashboard uses these, and so can any other client.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response

from indexer.store.layout import SPLIT_QUERY, SPLIT_TRAIN
from service.api.deps import IndexDep
from service.api.errors import EXAMPLE_ERRORS, PNG_RESPONSE
from service.api.schemas import ExampleInfo, Split
from service.api.strict import StrictJSONRoute
from service.engine.engine import AttributionEngine
from service.render import DEFAULT_SCALE, MAX_SCALE

__all__ = ["router", "SCALING_HEADER"]

router = APIRouter(tags=["examples"], route_class=StrictJSONRoute)

SCALING_HEADER = "X-Infotrace-Scaling"
"""Response header of an image rendering: ``unit`` ([0, 1] -> 0..255) or ``minmax`` (per image)."""

ExampleId = Annotated[int, Path(description="row of the training set (examples) or of the stored queries")]
Scale = Annotated[
    int, Query(ge=1, le=MAX_SCALE, description="nearest-neighbour upscaling factor of the rendering")
]
IncludeInput = Annotated[
    bool, Query(description="also return the raw input as nested lists (input_shape)", alias="include_input")
]


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


def _png(engine: AttributionEngine, split: Split, example_id: int, scale: int) -> Response:
    png, scaling = engine.render(SPLIT_TRAIN if split == "train" else SPLIT_QUERY, example_id, scale)
    # an index is immutable while it is served, but it may be rebuilt under the same name and restarted
    headers = {SCALING_HEADER: scaling, "Cache-Control": "public, max-age=300"}
    return Response(content=png, media_type="image/png", headers=headers)


@router.get(
    "/v1/indexes/{name}/examples/{example_id}",
    response_model=ExampleInfo,
    responses=EXAMPLE_ERRORS,
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
    return _png(engine, "train", example_id, scale)


@router.get(
    "/v1/indexes/{name}/queries/{example_id}",
    response_model=ExampleInfo,
    responses=EXAMPLE_ERRORS,
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
    return _png(engine, "query", example_id, scale)
