"""Slow and idle clients of vv-serve: deadlines for a request's headers and its body, a cap on open
connections, and a drain that ends the requests whose body is still coming.

uvicorn bounds neither how long a client may take over its request headers (a connection that sends
nothing, or a byte a second, is held for good) nor over its body, and at shutdown it waits for every
request in progress, one whose body never comes included. So:

- `ConnectionWatch.protocol(base)` is uvicorn's HTTP protocol class with a timer per connection: from the
  moment a connection opens, or its last request ends, the next request's headers must be complete within
  `Limits.header_timeout_s`; past that the connection is answered 408 (JSON) when part of a request came,
  and closed. Beyond `Limits.max_connections` open connections a new one is answered 503 (JSON,
  Retry-After) and closed at once, so slow clients cannot take every socket and file descriptor.
- `RequestDeadline` (ASGI middleware) bounds the body: it must be complete within
  `Limits.body_timeout_s` of the headers (else 408; the connection closes). Once the service drains
  (SIGTERM), a request whose body is still coming is answered 503 at once: a half-sent request never
  holds the shutdown. A client that leaves before its body is complete is logged at info level by the
  app (starlette's `ClientDisconnect`), not counted as an error.

The watch links a connection (its transport) to the requests the app serves on it through the peer
address, `scope["client"]`: uvicorn must run without proxy-header rewriting (`proxy_headers=False`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from http import HTTPStatus

from .errors import REQUEST_TIMEOUT, ApiError, error_body

log = logging.getLogger("vv_runtime.serve")

CONNECTION_LIMIT = "connection_limit"
CLOSE = {"connection": "close"}


def raw_error(status: int, message: str, kind: str, headers: dict | None = None) -> bytes:
    """A whole HTTP/1.1 error response with the service's JSON body, closing the connection (written
    to a transport directly, outside any request)."""
    body = json.dumps(error_body(status, message, kind)).encode()
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "content-type: application/json",
             f"content-length: {len(body)}", "connection: close",
             *(f"{name}: {value}" for name, value in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def peer_of(transport) -> tuple | None:
    """(host, port) of a transport's peer: what uvicorn puts in scope["client"]."""
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return str(peer[0]), int(peer[1])
    return None


@dataclass(eq=False)
class _Connection:
    transport: object
    active: int = 0                                # requests of this connection the app is serving
    heard: bool = False                            # bytes of a next request came
    timer: asyncio.TimerHandle | None = None


class ConnectionWatch:
    """The open connections of one server: header deadlines and the connection cap (module docstring).
    Every method runs in the server's event loop."""

    def __init__(self, limits, metrics):
        self.header_timeout_s = limits.header_timeout_s
        self.max_connections = limits.max_connections
        self.retry_after_s = limits.retry_after_s
        self.metrics = metrics
        self._open: dict[tuple, _Connection] = {}

    def __len__(self) -> int:
        return len(self._open)

    def protocol(self, base: type) -> type:
        """uvicorn's HTTP protocol class `base`, its connections watched."""
        watch = self

        class WatchedProtocol(base):
            def connection_made(self, transport):
                super().connection_made(transport)
                self._watched = transport
                watch.opened(transport)

            def data_received(self, data):
                watch.received(self._watched)
                super().data_received(data)

            def connection_lost(self, exc):
                watch.closed(self._watched)
                super().connection_lost(exc)

        WatchedProtocol.__name__ = WatchedProtocol.__qualname__ = f"Watched{base.__name__}"
        return WatchedProtocol

    # --- the transport's side ----------------------------------------------------------------------

    def opened(self, transport) -> None:
        key = peer_of(transport)
        if key is None:
            return
        if self.max_connections is not None and len(self._open) >= self.max_connections:
            for stale in [k for k, c in self._open.items() if c.transport.is_closing()]:
                self._drop(stale)
            if len(self._open) >= self.max_connections:
                self.metrics.error(CONNECTION_LIMIT)
                log.warning("connection from %s:%s refused: %d connections open, the limit", *key,
                            self.max_connections)
                transport.write(raw_error(503, f"the service holds {self.max_connections} open connections, its "
                                               f"limit: retry later", CONNECTION_LIMIT,
                                          {"retry-after": str(self.retry_after_s)}))
                transport.close()
                return
        connection = _Connection(transport)
        self._open[key] = connection
        self._arm(connection)

    def received(self, transport) -> None:
        connection = self._find(transport)
        if connection is not None and connection.active == 0:
            connection.heard = True

    def closed(self, transport) -> None:
        key = peer_of(transport)
        connection = self._open.get(key)
        if connection is not None and connection.transport is transport:
            self._drop(key)

    # --- the app's side ------------------------------------------------------------------------------

    def request_started(self, client) -> None:
        connection = self._open.get(tuple(client)) if client else None
        if connection is not None:
            connection.active += 1
            if connection.timer is not None:
                connection.timer.cancel()
                connection.timer = None

    def request_ended(self, client) -> None:
        connection = self._open.get(tuple(client)) if client else None
        if connection is not None:
            connection.active = max(0, connection.active - 1)
            if connection.active == 0:
                connection.heard = False
                self._arm(connection)

    # --- deadlines -----------------------------------------------------------------------------------

    def _find(self, transport) -> _Connection | None:
        connection = self._open.get(peer_of(transport))
        return connection if connection is not None and connection.transport is transport else None

    def _arm(self, connection: _Connection) -> None:
        if self.header_timeout_s is None:
            return
        if connection.timer is not None:
            connection.timer.cancel()
        connection.timer = asyncio.get_running_loop().call_later(self.header_timeout_s, self._expire, connection)

    def _expire(self, connection: _Connection) -> None:
        connection.timer = None
        transport = connection.transport
        if transport.is_closing():
            key = peer_of(transport)
            if self._open.get(key) is connection:
                self._drop(key)
            return
        if connection.active:
            return
        if connection.heard:
            self.metrics.error(REQUEST_TIMEOUT)
            log.info("connection from %s: request headers not complete within %g s: closed",
                     peer_of(transport), self.header_timeout_s)
            transport.write(raw_error(408, f"request headers not complete within {self.header_timeout_s:g} s",
                                      REQUEST_TIMEOUT))
        transport.close()

    def _drop(self, key) -> None:
        connection = self._open.pop(key, None)
        if connection is not None and connection.timer is not None:
            connection.timer.cancel()


class RequestDeadline:
    """ASGI middleware: the body deadline and the drain's end of half-sent requests (module docstring);
    tells the service's `ConnectionWatch` (where the server has one) when a request starts and ends."""

    def __init__(self, app, service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        watch, client = self.service.connections, scope.get("client")
        if watch is not None:
            watch.request_started(client)
        try:
            if scope["type"] == "http":
                receive = self._bounded(receive)
            await self.app(scope, receive, send)
        finally:
            if watch is not None:
                watch.request_ended(client)

    def _bounded(self, receive):
        limit = self.service.limits.body_timeout_s
        deadline = None if limit is None else time.monotonic() + limit
        complete = False

        async def receive_body():
            nonlocal complete
            if complete:                              # after the body: only the disconnect is left to hear
                return await receive()
            message = await self._next(receive, deadline, limit)
            if message["type"] != "http.request" or not message.get("more_body", False):
                complete = True
            return message

        return receive_body

    async def _next(self, receive, deadline: float | None, limit: float | None):
        if self.service.draining:
            raise _draining()
        incoming = asyncio.ensure_future(receive())
        drain = asyncio.ensure_future(self.service.drained())
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            done, _ = await asyncio.wait({incoming, drain}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            drain.cancel()
        if incoming in done:
            return incoming.result()
        incoming.cancel()
        if drain in done:
            raise _draining()
        raise ApiError(408, f"request body not complete within {limit:g} s", REQUEST_TIMEOUT, headers=CLOSE)


def _draining() -> ApiError:
    return ApiError(503, "the service is shutting down: the request's body was not complete", "unavailable",
                    headers=CLOSE)
