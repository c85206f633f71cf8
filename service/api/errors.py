"""The project's exceptions as HTTP status codes, with a ``detail`` that says what was wrong."""

from __future__ import annotations

import math
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
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

__all__ = [
    "STATUS_OF",
    "ERROR_RESPONSES",
    "EXAMPLE_ERRORS",
    "PNG_RESPONSE",
    "error_outcome",
    "install_error_handlers",
    "shown_errors",
]

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


def _json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by its name (``"nan"``, ``"inf"``): JSON has none."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


MAX_ERRORS = 20
"""Validation errors returned at most (a 50,000-element list of the wrong type makes 50,000 of them)."""


_QUERY_TAGS = frozenset({"stored", "input", "feature", "text"})  # schemas.QuerySpec's discriminator tags


def _body_path(loc: Any) -> list[Any]:
    """An error location as a path into the request body: pydantic inserts the query union's tag after
    ``query`` (``body.query.stored.id``), which names no key of the body; it is dropped."""
    path = list(loc)
    for i in range(len(path) - 1):
        if path[i] == "query" and path[i + 1] in _QUERY_TAGS and i + 2 < len(path):
            return path[: i + 1] + path[i + 2 :]
    return path


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 for a request that fails validation, serialisable whatever value it quotes: at most
    :data:`MAX_ERRORS` errors, and only scalar inputs echoed (a list or object is described, not copied)."""
    errors = list(exc.errors()) if isinstance(exc, RequestValidationError) else []
    return JSONResponse(status_code=422, content={"detail": shown_errors(errors)})


def shown_errors(errors: list[Any], prefix: tuple[Any, ...] = ()) -> list[Any]:
    """Validation errors as the service answers them (:data:`MAX_ERRORS` at most, large inputs described,
    JSON-safe), each located at ``prefix`` + its own location in the body."""
    shown = []
    for error in errors[:MAX_ERRORS]:
        error = dict(error)
        error.pop("url", None)
        error["loc"] = [*prefix, *_body_path(error.get("loc", ()))]
        given = error.get("input")
        if isinstance(given, dict | list | tuple) and not given:
            error.pop("input")  # FastAPI's JSON-decode errors carry an empty placeholder
        elif isinstance(given, dict):
            error["input"] = f"<object of {len(given)} keys, not echoed>"
        elif isinstance(given, list | tuple):
            error["input"] = f"<array of {len(given)} items, not echoed>"
        elif isinstance(given, str) and len(given) > 200:
            error["input"] = f"<string of {len(given)} characters, not echoed>"
        shown.append(error)
    if len(errors) > MAX_ERRORS:
        where = [*prefix] or ["body"]
        shown.append({"type": "truncated", "loc": where, "msg": f"{len(errors) - MAX_ERRORS} more errors"})
    result: list[Any] = _json_safe(jsonable_encoder(shown))
    return result


def error_outcome(exc: Exception, prefix: tuple[Any, ...] = ()) -> tuple[int, Any] | None:
    """``(status, detail)`` the service answers ``exc`` with (:data:`STATUS_OF`; validation errors located
    under ``prefix``), or None for an exception that is not the client's (a bug: a 500)."""
    code = next((c for t, c in STATUS_OF.items() if isinstance(exc, t)), None)
    if code is None:
        return None
    if isinstance(exc, ValidationError):
        return code, shown_errors(list(exc.errors(include_url=False)), prefix)
    return code, str(exc)


def install_error_handlers(app: FastAPI) -> None:
    """Answer each exception of :data:`STATUS_OF` with its status and ``{"detail": ...}``, and a request that
    fails validation with FastAPI's usual 422 (made JSON-safe: FastAPI's own handler fails on a NaN).

    Args:
        app: the service app.
    """
    app.add_exception_handler(RequestValidationError, _validation_error)
    for exc_type, code in STATUS_OF.items():

        async def handler(request: Request, exc: Exception, code: int = code) -> JSONResponse:
            if isinstance(exc, ValidationError):  # the same shape as FastAPI's own 422 for a request body
                errors = [{**e, "loc": _body_path(e["loc"])} for e in exc.errors(include_url=False)]
                detail: Any = _json_safe(jsonable_encoder(errors))
            else:
                detail = str(exc)
            return JSONResponse(status_code=code, content={"detail": detail})

        app.add_exception_handler(exc_type, handler)
