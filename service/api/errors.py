"""The project's exceptions as HTTP status codes, with a ``detail`` that says what was wrong."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from indexer.exceptions import (
    IndexCorruptError,
    IndexFormatError,
    IndexNotFoundError,
    IndexNotReadyError,
    InvalidQueryError,
    ModelMismatchError,
    NotStoredError,
    UnknownExampleError,
)

__all__ = ["STATUS_OF", "ERROR_RESPONSES", "EXAMPLE_ERRORS", "PNG_RESPONSE", "install_error_handlers"]

STATUS_OF: dict[type[Exception], int] = {
    InvalidQueryError: 422,
    ValidationError: 422,  # a request model built inside a route (the GET forms) from bad parameters
    UnknownExampleError: status.HTTP_404_NOT_FOUND,
    NotStoredError: status.HTTP_404_NOT_FOUND,
    IndexNotFoundError: status.HTTP_404_NOT_FOUND,
    ModelMismatchError: status.HTTP_409_CONFLICT,
    IndexNotReadyError: status.HTTP_503_SERVICE_UNAVAILABLE,
    IndexCorruptError: status.HTTP_503_SERVICE_UNAVAILABLE,
    IndexFormatError: status.HTTP_503_SERVICE_UNAVAILABLE,
}
"""Exception type -> HTTP status of the JSON error response."""

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"description": "unknown index or example id"},
    409: {"description": "the index cannot featurize raw inputs (no model spec) or the model does not match"},
    422: {"description": "malformed query: shape, dtype, non-finite values or out-of-range options"},
    503: {"description": "the index is present but not ready (failed to load or verify)"},
}
"""The error responses of the attribution routes, for the OpenAPI schema."""

EXAMPLE_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "unknown index or id, or (for image.png) an index whose inputs are not images"},
    503: {"description": "the index is present but not ready (failed to load or verify)"},
}
"""The error responses of the example routes."""

PNG_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/png": {}}, "description": "the input rendered as a grayscale PNG"},
    **EXAMPLE_ERRORS,
}
"""The responses of an image rendering."""


def install_error_handlers(app: FastAPI) -> None:
    """Answer each exception of :data:`STATUS_OF` with its status and ``{"detail": ...}``.

    Args:
        app: the service app.
    """
    for exc_type, code in STATUS_OF.items():

        async def handler(request: Request, exc: Exception, code: int = code) -> JSONResponse:
            if isinstance(exc, ValidationError):  # the same shape as FastAPI's own 422 for a request body
                detail: Any = jsonable_encoder(exc.errors(include_url=False))
            else:
                detail = str(exc)
            return JSONResponse(status_code=code, content={"detail": detail})

        app.add_exception_handler(exc_type, handler)
