"""Strict request bodies: standard JSON only, and JSON only.

Python's ``json`` module accepts ``NaN``, ``Infinity`` and ``-Infinity`` (not JSON: RFC 8259 section 6) and
turns a number such as ``1e400`` into ``inf``. FastAPI then fails to serialise its own validation error for
such a value (500). Every router of the service uses :class:`StrictJSONRoute`, which refuses those bodies
with a 422 naming the field, and a body of another media type with 415, before any validation runs.
"""

from __future__ import annotations

import collections
import email.message
import json
import math
import re
import types
import typing
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request, Response, status
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

__all__ = [
    "DuplicateKeyError",
    "NonFiniteNumberError",
    "StrictJSONRoute",
    "strict_json_loads",
    "is_json_media_type",
]

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


class DuplicateKeyError(ValueError):
    """A JSON object names the same key twice (standard JSON leaves the meaning open; Python keeps the
    last, silently).

    Attributes:
        loc: the path to the repeated key, e.g. ``("query", "id")``.
    """

    def __init__(self, loc: tuple[str | int, ...]) -> None:
        super().__init__(f"{'.'.join(map(str, loc))}: the key is given more than once")
        self.loc = loc


class _Object(dict[str, Any]):
    """A parsed JSON object that remembers the first key it was given twice."""

    duplicate: str | None = None


def _object(pairs: list[tuple[str, Any]]) -> _Object:
    made = _Object(pairs)
    if len(made) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                made.duplicate = key
                break
            seen.add(key)
    return made


def _find_non_finite(value: Any, loc: tuple[str | int, ...]) -> None:
    if isinstance(value, _Object) and value.duplicate is not None:
        raise DuplicateKeyError((*loc, value.duplicate))
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
        DuplicateKeyError: an object with the same key twice.
        json.JSONDecodeError: not JSON.
    """
    text = body.decode("utf-8", errors="strict") if isinstance(body, bytes) else body
    document = json.loads(
        text,
        parse_constant=lambda token: _Token(float(token), token),
        parse_float=_parse_float,
        parse_int=_parse_int,
        object_pairs_hook=_object,
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
            except DuplicateKeyError as exc:
                detail = [
                    {
                        "type": "duplicate_key",
                        "loc": ["body", *exc.loc],
                        "msg": "the key is given more than once; expected each key once",
                    }
                ]
                raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=detail) from exc
            except RecursionError as exc:
                raise HTTPException(
                    status.HTTP_422_UNPROCESSABLE_CONTENT,
                    detail="request body nests arrays or objects too deeply to parse; expected a few levels",
                ) from exc
            except UnicodeDecodeError as exc:
                raise HTTPException(
                    status.HTTP_422_UNPROCESSABLE_CONTENT, detail=f"request body is not UTF-8 text: {exc}"
                ) from exc
        return self._json


def _invalid(kind: str, loc: list[str | int], msg: str, given: str | None = None) -> HTTPException:
    """A 422 in the shape of FastAPI's validation errors."""
    error: dict[str, Any] = {"type": kind, "loc": loc, "msg": msg}
    if given is not None:
        error["input"] = given if len(given) <= 200 else given[:200] + "..."
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=[error])


_DECIMAL_INTEGER = re.compile(r"-?[0-9]+")


def _is_int_field(field: Any) -> bool:
    annotation = field.field_info.annotation
    return annotation is int or (
        typing.get_origin(annotation) in (typing.Union, types.UnionType)
        and int in typing.get_args(annotation)
        and not {float, str} & set(typing.get_args(annotation))
    )


class StrictJSONRoute(APIRoute):
    """A route that reads its body with :class:`_StrictJSONRequest`, answers a body that is not UTF-8 JSON
    (by its Content-Type header, or without one) with 415, and refuses with 422 what FastAPI would let
    through silently: a query parameter the route does not take or one given twice, and an integer
    parameter (path or query) not written as decimal digits (``1.0``, ``+1``, ``1_0``)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        takes_body = self.body_field is not None
        query_fields, path_fields = _params(self.dependant)
        query_names = [field.alias for field in query_fields]
        int_params = [("query", f.alias) for f in query_fields if _is_int_field(f)] + [
            ("path", f.alias) for f in path_fields if _is_int_field(f)
        ]

        async def strict_handler(request: Request) -> Response:
            _check_content_type(request, takes_body)
            _check_query_names(request, query_names)
            for where, name in int_params:
                raw = (request.query_params if where == "query" else request.path_params).get(name)
                if raw is not None and not _DECIMAL_INTEGER.fullmatch(str(raw)):
                    expected = "expected an integer written in decimal digits"
                    raise _invalid("int_parsing", [where, name], expected, str(raw))
            return await handler(_StrictJSONRequest(request.scope, request.receive))

        return strict_handler


def _params(dependant: Dependant) -> tuple[list[Any], list[Any]]:
    """The query and path parameter fields of a route and of all its dependencies."""
    query, path = list(dependant.query_params), list(dependant.path_params)
    for sub in dependant.dependencies:
        sub_query, sub_path = _params(sub)
        query += [f for f in sub_query if f.alias not in {q.alias for q in query}]
        path += [f for f in sub_path if f.alias not in {p.alias for p in path}]
    return query, path


def _check_content_type(request: Request, takes_body: bool) -> None:
    """415 unless a body is declared ``application/json`` (or ``+json``) in UTF-8, by one header, and not
    compressed (``Content-Encoding``)."""
    has_body = request.headers.get("content-length", "0") != "0" or "transfer-encoding" in request.headers
    if not (takes_body and has_body):
        return
    given = request.headers.getlist("content-type")
    if len(given) > 1:
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            detail=f"request has {len(given)} Content-Type headers; expected one (application/json)",
        )
    content_type = given[0] if given else None
    if not (content_type and is_json_media_type(content_type)):
        shown = f"got {content_type!r}" if content_type else "got no Content-Type"
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            detail=f"request body must be JSON (Content-Type: application/json); {shown}",
        )
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            detail=f"Content-Encoding {encoding!r} is not supported; send the JSON body uncompressed",
        )
    message = email.message.Message()
    message["content-type"] = content_type
    charset = message.get_param("charset")
    if charset is not None and str(charset).lower() not in ("utf-8", "utf8"):
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            detail=f"JSON bodies are UTF-8 (RFC 8259 section 8.1); got charset={charset}",
        )


def _check_query_names(request: Request, names: list[str]) -> None:
    """422 for a query parameter the route does not take, or one given more than once."""
    counts = collections.Counter(key for key, _ in request.query_params.multi_items())
    for key, count in counts.items():
        if key not in names:
            takes = f"this route takes {names}" if names else "this route takes no query parameters"
            raise _invalid("extra_forbidden", ["query", key], f"unknown query parameter; {takes}")
        if count > 1:
            raise _invalid("duplicate_parameter", ["query", key], f"given {count} times; expected it once")
