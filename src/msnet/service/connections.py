"""Connection handling of `msnet serve`: slow clients cannot lock the service out.

uvicorn waits for a request's headers without a time limit, and its ``limit_concurrency``
answers 503 to *every* request, ``/health`` included, once enough connections are open: a few
dozen clients that each send one header line and then nothing lock the service out (slowloris).
Here instead:

- every connection must deliver its request headers within ``header_timeout_s`` (counted from
  the connection or from the end of the previous response, not reset by each byte); past it the
  server answers 408 and closes;
- when more than ``max_connections`` are open, the connection that has waited longest for its
  headers is closed with 503 and ``Retry-After`` to make room; a client that sent its request is
  never dropped;
- while more than ``max_connections`` connections are busy with requests, new requests get 503
  with ``Retry-After``, except ``GET /health``, which is always answered.

Uploads that stall after the headers are cut by the app's ``read_timeout_s`` (408).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

RETRY_AFTER_S = 5
LINGER_S = 1.0  # after answering a connection it closes, what the client still sends is read and dropped
EXEMPT_PATHS = ("/health",)


def _plain_response(status: int, reason: str, text: str, retry_after: int | None = None) -> bytes:
    body = (text + "\n").encode()
    head = [f"HTTP/1.1 {status} {reason}", "content-type: text/plain; charset=utf-8",
            f"content-length: {len(body)}", "connection: close"]
    if retry_after is not None:
        head.append(f"retry-after: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class ConnectionGuard:
    """Open connections of one server, the limits on them, and what was done (counters for /health).

    >>> guard = ConnectionGuard(max_connections=64, header_timeout_s=10.0)
    >>> guard.overloaded(), guard.protocol_class().__name__
    (False, 'GuardedH11Protocol')
    """

    def __init__(self, max_connections: int, header_timeout_s: float):
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.open: set[GuardedH11Protocol] = set()
        self.waiting: dict[GuardedH11Protocol, float] = {}  # protocol -> since when it waits for headers
        self.timed_out = 0
        self.evicted = 0

    def overloaded(self) -> bool:
        """More connections busy with requests than the limit allows."""
        return len(self.open) - len(self.waiting) > self.max_connections

    def stats(self) -> dict:
        return {"open": len(self.open), "waiting_for_headers": len(self.waiting),
                "closed_slow_headers": self.timed_out, "closed_to_make_room": self.evicted}

    def admit(self, proto: GuardedH11Protocol) -> None:
        """Register a new connection; over the limit, close the one that has waited longest for headers."""
        self.open.add(proto)
        while len(self.open) > self.max_connections:
            idle = [(since, p) for p, since in self.waiting.items() if p is not proto]
            if not idle:
                return
            _, oldest = min(idle, key=lambda item: item[0])
            self.evicted += 1
            oldest.close_with(503, "Service Unavailable", "too many open connections: retry later", RETRY_AFTER_S)

    def protocol_class(self) -> type:
        """The uvicorn ``http`` protocol class bound to this guard."""
        return type("GuardedH11Protocol", (GuardedH11Protocol,), {"guard": self})


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline and room-making eviction (see the module doc)."""

    guard: ConnectionGuard

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        self._lingering = False
        super().connection_made(transport)
        self._wait_for_headers()
        self.guard.admit(self)

    def _wait_for_headers(self) -> None:
        self.guard.waiting[self] = time.monotonic()
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.guard.header_timeout_s, self._headers_too_slow)

    def _headers_received(self) -> None:
        self.guard.waiting.pop(self, None)
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def data_received(self, data: bytes) -> None:
        if not self._lingering:
            super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self in self.guard.waiting and self.conn.their_state is not h11.IDLE:
            self._headers_received()  # a request's headers are complete

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._wait_for_headers()  # the next request on this keep-alive connection has the same deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._headers_received()
        self.guard.open.discard(self)
        super().connection_lost(exc)

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self in self.guard.waiting and not self.transport.is_closing():
            self.guard.timed_out += 1
            self.close_with(408, "Request Timeout",
                            f"request headers not received within {self.guard.header_timeout_s:g} s")

    def close_with(self, status: int, reason: str, text: str, retry_after: int | None = None) -> None:
        """Answer a connection that has not sent a complete request, and close it.

        A lingering close: our side is shut for writing at once, what the client still sends is read
        and dropped for ``LINGER_S``, then the socket is closed. Closing with unread data would send
        a reset, and the client could lose the answer.
        """
        self._headers_received()
        self.guard.open.discard(self)
        if self.transport.is_closing() or self._lingering:
            return
        self._lingering = True
        self.transport.write(_plain_response(status, reason, text, retry_after))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)


class OverloadMiddleware:
    """ASGI middleware: 503 with ``Retry-After`` while the guard is overloaded; /health always passes."""

    def __init__(self, app: Any, guard: ConnectionGuard):
        self.app, self.guard = app, guard

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") in EXEMPT_PATHS or not self.guard.overloaded():
            await self.app(scope, receive, send)
            return
        body = json.dumps({"detail": "too many requests in progress: retry later"}).encode()
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"retry-after", str(RETRY_AFTER_S).encode())]})
        await send({"type": "http.response.body", "body": body})
