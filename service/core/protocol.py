"""uvicorn's HTTP/1.1 protocol with a time limit on request headers (a slow or stalled client is cut off)
and JSON answers to requests it cannot parse.

uvicorn times out an idle keep-alive connection, but a client that has sent part of its request headers is
waited for without end (one such connection per client costs a socket and a file descriptor: slowloris).
:func:`header_timeout_protocol` gives uvicorn a protocol class that closes a connection whose request line
and headers have not all arrived ``timeout_s`` seconds after it opened or after its previous response.
The body has its own limit (:class:`~service.core.observability.BodyGuard`).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["header_timeout_protocol"]


class _HeaderTimeoutH11(H11Protocol):
    """:class:`H11Protocol` that closes the connection when a request's headers take too long."""

    header_timeout_s: float = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.logger.info("closing a connection: request headers not in after %s s", self.header_timeout_s)
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE and self._header_timer is not None:
            self._header_timer.cancel()  # the request line and headers are in
            self._header_timer = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()  # the next request on this keep-alive connection gets the same limit

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request h11 cannot parse (a bad Content-Length, a bad chunk size, a
        header without a colon), as JSON like every other error of the service (uvicorn sends plain
        text). The app never sees such a request, so it has no request id and is not in ``/metrics``."""
        body = json.dumps({"detail": f"malformed HTTP/1.1 request: {msg}"}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        for event in (
            h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)


def header_timeout_protocol(timeout_s: float) -> type[Any]:
    """A uvicorn ``http`` protocol class whose connections get ``timeout_s`` seconds for each request's
    line and headers (``uvicorn.Config(http=...)``).

    Args:
        timeout_s: seconds, > 0.

    Raises:
        ValueError: ``timeout_s`` is not positive.
    """
    if not timeout_s > 0:
        raise ValueError(f"the header timeout must be positive seconds; got {timeout_s!r}")
    return type("HeaderTimeoutH11", (_HeaderTimeoutH11,), {"header_timeout_s": float(timeout_s)})
