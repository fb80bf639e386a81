"""What the routes of vv-serve share: the admission limits and the service state over the engine."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Callable

from fastapi.responses import JSONResponse

from ..errors import one_line
from ..request_engine import EngineStopped
from .connections import ConnectionWatch
from .errors import RETRY_STATUSES, error_response, http_error
from .metrics import ServiceMetrics
from .owned_voices import OwnedVoices
from .security import Access

log = logging.getLogger("vv_runtime.serve")


@dataclass(frozen=True)
class Limits:
    """Admission limits of the service (the engine's own: --max-batch rows, --max-queue requests)."""
    max_text_chars: int = 4096            # characters of `input` / `script`
    max_voice_seconds: float = 60.0       # seconds of an uploaded voice (enforced by the VoiceStore too)
    max_voice_bytes: int = 16 * 2 ** 20   # bytes of an uploaded sound file
    max_voices: int = 256                 # uploaded voices per owner (API key)
    voice_memory_budget: int = 256 * 2 ** 20  # bytes the uploaded voices of one owner may hold in memory
    max_speakers: int = 16                # voices per script request
    request_timeout_s: float | None = 300.0   # per request, from admission to the last frame
    write_timeout_s: float | None = 30.0      # per write to the client (one that stops reading is cut off)
    header_timeout_s: float | None = 10.0     # for a request's headers, from the connection's start or last response
    body_timeout_s: float | None = 60.0       # for a request's body, from its headers
    max_connections: int | None = 512         # open connections (beyond: 503 and closed)
    voice_uploads: bool = True            # POST /v1/voices (off under Ray: uploads live on one replica)
    retry_after_s: int = 2                # Retry-After of 429 / 503
    replica_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")

    def body_limit(self, path: str) -> int:
        """Most bytes a request body may have on `path`."""
        if path.rstrip("/") == "/v1/voices":
            return self.max_voice_bytes + 2 ** 20        # multipart framing and the name field
        return 2 ** 20 + 8 * self.max_text_chars        # JSON with escapes


class Service:
    """State shared by the routes: the engine, the limits, metrics, the voices by owner, draining."""

    def __init__(self, engine, limits: Limits, access: Access | None = None):
        self.engine = engine
        self.limits = limits
        self.access = access or Access()
        self.metrics = ServiceMetrics()
        self.voices = OwnedVoices(engine.voices, limits)
        self.draining = False
        self._drain_loop: asyncio.AbstractEventLoop | None = None
        self._drain_event: asyncio.Event | None = None
        # set by the server that runs the app: aborts the connection of scope["client"] (a client that
        # stopped reading: closing it politely would wait for its unread bytes forever)
        self.abort_client: Callable[[object], None] | None = None
        # set by the server that runs the app: its open connections (header deadlines, cap)
        self.connections: ConnectionWatch | None = None

    def start_draining(self) -> None:
        """Stop admitting speech and voice requests (answered 503); in-flight requests go on, except those
        whose body is still coming (answered 503 at once). Callable from any thread and from a signal
        handler (so no lock: `drained` sets the loop before the event, and looks at `draining` after)."""
        self.draining = True
        event = self._drain_event
        if event is not None:
            self._drain_loop.call_soon_threadsafe(event.set)

    async def drained(self) -> None:
        """Returns once the service drains (in the event loop that serves the app)."""
        if self._drain_event is None:
            self._drain_loop = asyncio.get_running_loop()
            self._drain_event = asyncio.Event()
        if self.draining:
            self._drain_event.set()
        await self._drain_event.wait()

    @property
    def accepting(self) -> bool:
        fatal = getattr(self.engine, "fatal", None)
        return not self.draining and bool(self.engine.accepting) and fatal is None

    def refuse_if_draining(self) -> None:
        if not self.accepting:
            raise EngineStopped("the service is not accepting requests (draining or stopped)")

    def failure(self, exc: BaseException, where: str) -> tuple[int, str, str]:
        """(HTTP status, message, error type) of the exception a request failed with; a server fault
        (500) is logged with `where`."""
        status, message, kind = http_error(exc)
        if status == 500:
            log.error("%s failed: %s: %s", where, type(exc).__name__, one_line(exc))
        return status, message, kind

    def error(self, status: int, message: str, kind: str, param: str | None = None,
              headers: dict | None = None) -> JSONResponse:
        """The JSON error answer, counted by type; a 429 or 503 carries Retry-After."""
        self.metrics.error(kind)
        if status in RETRY_STATUSES:
            headers = {"retry-after": str(self.limits.retry_after_s), **(headers or {})}
        return error_response(status, message, kind, param, headers)
