"""Strict request bodies: standard JSON only, and JSON only.

Python's ``json`` module accepts ``NaN``, ``Infinity`` and ``-Infinity`` (not JSON: RFC 8259 section 6) and
turns a number such as ``1e400`` into ``inf``. FastAPI then fails to serialise its own validation error for
such a value (500). Every router of the service uses :class:`StrictJSONRoute`, which refuses those bodies
with a 422 naming the field, and a body of another media type with 415, before any validation runs.
"""

from __future__ import annotations

import email.message
import json
import math
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request, Response, status
from fastapi.routing import APIRoute

__all__ = ["NonFiniteNumberError", "StrictJSONRoute", "strict_json_loads", "is_json_media_type"]

NON_FINITE_MESSAGE = (
    "is not a finite JSON number (NaN, Infinity or beyond float64's range); expected a finite number"
)


class NonFiniteNumberError(ValueError):
    """A JSON document holds a non-finite number.

    Attributes:
        loc: the path to the value, e.g. ``("query", "input", 3)``.
        token: the number as it was written, e.g. ``"NaN"`` or ``"1e400"``.
    """

    def __init__(self, loc: tuple[str | int, ...], token: str) -> None:
        super().__init__(f"{'.'.join(map(str, loc)) or 'body'}: {token} {NON_FINITE_MESSAGE}")
        self.loc = loc
        self.token = token


class _Token(float):
    """A parsed non-finite number that remembers how it was written (for the error message)."""

    token: str

    def __new__(cls, value: float, token: str) -> _Token:
        made = super().__new__(cls, value)
        made.token = token
        return made


def _parse_float(text: str) -> float:
    value = float(text)
    return value if math.isfinite(value) else _Token(value, text)


def _parse_int(text: str) -> int | float:
    # beyond float64 anyway, and beyond the 4,300 digits int() converts: refused with its location
    digits = len(text.lstrip("-"))
    if digits > 309:
        return _Token(math.inf, f"an integer of {digits} digits")
    return int(text)


class InvalidTextError(ValueError):
    """A JSON string (or key) holds a lone UTF-16 surrogate (``"\\ud800"``): valid JSON, not Unicode text."""

    def __init__(self, loc: tuple[str | int, ...]) -> None:
        super().__init__(f"{'.'.join(map(str, loc)) or 'body'}: a string holds a lone UTF-16 surrogate")
        self.loc = loc


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _find_non_finite(value: Any, loc: tuple[str | int, ...]) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise NonFiniteNumberError(loc, getattr(value, "token", repr(value)))
    if isinstance(value, str) and not _is_text(value):
        raise InvalidTextError(loc)
    if isinstance(value, dict):
        for key, item in value.items():
            if not _is_text(key):
                raise InvalidTextError(loc)
            _find_non_finite(item, (*loc, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _find_non_finite(item, (*loc, i))


def strict_json_loads(body: bytes) -> Any:
    """Parse a request body as standard JSON.

    Args:
        body: the raw bytes (UTF-8).

    Returns:
        The parsed document (dicts, lists, str, int, finite float, bool, None).

    Raises:
        NonFiniteNumberError: ``NaN``, ``Infinity``, ``-Infinity`` or a number beyond float64 anywhere
            (an integer of more than 309 digits included).
        InvalidTextError: a string or key with a lone UTF-16 surrogate.
        json.JSONDecodeError: not JSON.
    """
    text = body.decode("utf-8", errors="strict") if isinstance(body, bytes) else body
    document = json.loads(
        text,
        parse_constant=lambda token: _Token(float(token), token),
        parse_float=_parse_float,
        parse_int=_parse_int,
    )
    _find_non_finite(document, ())
    return document


def is_json_media_type(content_type: str) -> bool:
    """Whether a Content-Type header names JSON (``application/json`` or ``application/*+json``)."""
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    is_json = subtype == "json" or subtype.endswith("+json")
    return message.get_content_maintype() == "application" and is_json


class _StrictJSONRequest(Request):
    """A request whose ``json()`` is :func:`strict_json_loads`, non-finite numbers answered with 422."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = strict_json_loads(body)
            except NonFiniteNumberError as exc:
                detail = [
                    {
                        "type": "finite_number",
                        "loc": ["body", *exc.loc],
                        "msg": f"{exc.token} {NON_FINITE_MESSAGE}",
                        "input": exc.token,
                    }
                ]
                raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=detail) from exc
            except InvalidTextError as exc:
                detail = [
                    {
                        "type": "unicode_text",
                        "loc": ["body", *exc.loc],
                        "msg": "a string holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape); "
                        "expected Unicode text",
                    }
                ]
                raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=detail) from exc
            except UnicodeDecodeError as exc:
                raise HTTPException(
                    status.HTTP_422_UNPROCESSABLE_CONTENT, detail=f"request body is not UTF-8 text: {exc}"
                ) from exc
        return self._json


class StrictJSONRoute(APIRoute):
    """A route that reads its body with :class:`_StrictJSONRequest` and answers a body that is not JSON
    (by its Content-Type header, or without one) with 415."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        takes_body = self.body_field is not None

        async def strict_handler(request: Request) -> Response:
            content_type = request.headers.get("content-type")
            has_body = (
                request.headers.get("content-length", "0") != "0" or "transfer-encoding" in request.headers
            )
            if takes_body and has_body and not (content_type and is_json_media_type(content_type)):
                given = f"got {content_type!r}" if content_type else "got no Content-Type"
                raise HTTPException(
                    status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                    detail=f"request body must be JSON (Content-Type: application/json); {given}",
                )
            return await handler(_StrictJSONRequest(request.scope, request.receive))

        return strict_handler
