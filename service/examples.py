"""Training examples and stored queries as resources: metadata as JSON, inputs rendered as PNG images.

``GET /v1/indexes/{name}/examples/{id}`` and ``GET /v1/indexes/{name}/queries/{id}`` describe one training
example or one stored query (label, the model's prediction, metadata, input shape and, for image
datasets, the URL of its rendering); ``.../image.png`` renders the input as a grayscale PNG. The
dashboard uses these, and so can any other client.

Pixel scaling (:func:`to_gray8`): an input whose values all lie in [0, 1] maps linearly, 0 -> black and
1 -> white, so that every example of an index is drawn on the same scale; any other input is min-max
scaled per image (its minimum black, its maximum white; a constant image is black).
"""

from __future__ import annotations

import io
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, HTTPException, Path, Query, Request, Response, status
from PIL import Image
from pydantic import BaseModel, Field

from indexer.constants import KEY_H, KEY_LABEL, KEY_OUTPUT, KEY_PREDICTION, KEY_PROBABILITIES
from indexer.exceptions import UnknownExampleError
from service.deps import IndexDep
from service.engine import AttributionEngine

__all__ = [
    "router",
    "ExampleInfo",
    "to_gray8",
    "render_png",
    "SCALING_HEADER",
    "DEFAULT_SCALE",
    "MAX_SCALE",
]

router = APIRouter(tags=["examples"])

SCALING_HEADER = "X-Infotrace-Scaling"
"""Response header of an image rendering: ``unit`` ([0, 1] -> 0..255) or ``minmax`` (per image)."""

DEFAULT_SCALE = 4
"""Default nearest-neighbour upscaling factor of a rendering (28 x 28 digits become 112 x 112)."""

MAX_SCALE = 16
"""Largest upscaling factor a request may ask for."""

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


def to_gray8(values: np.ndarray) -> tuple[np.ndarray, str]:
    """Map an input to 8-bit gray levels (see the module docstring for the two scalings).

    Args:
        values: `(height, width)` input values, any real dtype.

    Returns:
        ``(pixels, scaling)``: `(height, width)` uint8 gray levels and ``"unit"`` or ``"minmax"``.
    """
    x = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if x.size == 0 or (x.min() >= 0.0 and x.max() <= 1.0):
        return np.rint(x * 255.0).astype(np.uint8), "unit"
    lo, hi = float(x.min()), float(x.max())
    scaled = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    return np.rint(scaled * 255.0).astype(np.uint8), "minmax"


def render_png(
    values: np.ndarray, image_shape: tuple[int, int], scale: int = DEFAULT_SCALE
) -> tuple[bytes, str]:
    """Render one input as a grayscale PNG, upscaled by ``scale`` with nearest-neighbour resampling.

    Args:
        values: the input, any shape with ``height * width`` elements (e.g. `(784,)` for a 28 x 28 digit).
        image_shape: ``(height, width)``.
        scale: upscaling factor, at least 1; each input value becomes a ``scale x scale`` block.

    Returns:
        ``(png, scaling)``: the PNG bytes (mode ``L``, ``(height * scale, width * scale)`` pixels) and the
        scaling used by :func:`to_gray8`.

    Raises:
        ValueError: ``values`` does not have ``height * width`` elements, or ``scale < 1``.
    """
    height, width = image_shape
    if scale < 1:
        raise ValueError(f"scale must be at least 1; got {scale}")
    x = np.asarray(values)
    if x.size != height * width:
        raise ValueError(f"an input of {x.size} values cannot be drawn as a {height} x {width} image")
    pixels, scaling = to_gray8(x.reshape(height, width))
    image = Image.fromarray(pixels)  # 2-D uint8: mode "L"
    if scale > 1:
        image = image.resize((width * scale, height * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue(), scaling


def _image_shape(engine: AttributionEngine) -> tuple[int, int] | None:
    shape = engine.data.manifest["model"].get("image_shape")
    return None if shape is None else (int(shape[0]), int(shape[1]))


def _check_id(engine: AttributionEngine, split: Split, example_id: int) -> None:
    n = engine.data.n_train if split == "train" else len(engine.data.query_phi)
    if not 0 <= example_id < n:
        what = "training example" if split == "train" else "stored query"
        valid = f"valid ids are 0..{n - 1}" if n else "the index has none"
        raise UnknownExampleError(f"no {what} with id {example_id}; {valid}")


def _inputs(engine: AttributionEngine, split: Split) -> np.ndarray:
    return engine.data.inputs if split == "train" else engine.data.query_inputs


def _python(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _info(
    request: Request, engine: AttributionEngine, split: Split, example_id: int, include_input: bool
) -> ExampleInfo:
    _check_id(engine, split, example_id)
    stats = engine.data.examples if split == "train" else engine.data.queries
    if split == "train":
        meta = dict(engine.train_metadata([example_id]).get(example_id, {}))
    else:
        meta = dict(engine.query_metadata(example_id))
    meta.pop("label", None)  # returned once, as `label`
    probabilities = stats.get(KEY_PROBABILITIES)
    h = stats.get(KEY_H) if split == "train" else None
    # the name the client used (the index's folder), which is what the routes resolve
    name = str(request.path_params["name"])
    image_shape = _image_shape(engine)
    image_url = None
    if image_shape is not None:
        route = "example_image" if split == "train" else "query_image"
        image_url = request.app.url_path_for(route, name=name, example_id=str(example_id))
    return ExampleInfo(
        index=name,
        split=split,
        id=example_id,
        label=_python(stats[KEY_LABEL][example_id]),
        prediction=_python(stats[KEY_PREDICTION][example_id]),
        probabilities=None if probabilities is None else probabilities[example_id].tolist(),
        output=float(stats[KEY_OUTPUT][example_id]),
        posterior_variance=None if h is None else float(h[example_id]),
        metadata=meta,
        input_shape=list(engine.input_shape),
        image_shape=None if image_shape is None else list(image_shape),
        image_url=image_url,
        input=np.asarray(_inputs(engine, split)[example_id]).tolist() if include_input else None,
    )


def _png(request: Request, engine: AttributionEngine, split: Split, example_id: int, scale: int) -> Response:
    image_shape = _image_shape(engine)
    if image_shape is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            detail=f"index {request.path_params['name']!r} has no image_shape in its manifest, so its "
            "inputs are not images and have no rendering; GET the example without /image.png "
            "(include_input=true for the raw input)",
        )
    _check_id(engine, split, example_id)
    png, scaling = render_png(_inputs(engine, split)[example_id], image_shape, scale)
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
