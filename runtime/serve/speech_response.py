"""The response of a speech request: the audio of one admitted request, whole or streamed.

A thread per request pumps the handle's chunks into the event loop, a watcher listens for the
client's disconnect, and whatever ends the response (done, error, disconnect, timeout) the handle is
cancelled in `finally`, so an abandoned request frees its rows at the engine's next step. Every write
to the client is bounded by `Limits.write_timeout_s`: a client that stops reading has its request
cancelled and its connection aborted (through `Service.abort_client`, set by the server), so it
neither holds rows nor blocks shutdown. Headers are sent with the first audio (or the error, as JSON,
if the request fails before any audio).

With `events` the stream is Server-Sent Events as OpenAI sends them for `stream_format: "sse"`: one
`speech.audio.delta` event per frame (`audio`: the bytes of the format, base64; the first carries a
streamed wav's header), then `speech.audio.done` with the usage (prompt tokens in, frames out); a
failure after audio was sent is an `error` event in place of the done event.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
import time

import numpy as np
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from . import formats
from .service import Service

log = logging.getLogger("vv_runtime.serve")


class AudioResponse(Response):
    """The audio of one admitted request, whole or streamed (see the module docstring)."""

    def __init__(self, service: Service, handle, fmt: str, stream: bool, seed: int, admitted: float,
                 events: bool = False):
        super().__init__(content=b"", status_code=200)
        self.service, self.handle, self.fmt, self.seed = service, handle, fmt, seed
        self.stream = stream or events
        self.events = events
        self.admitted = admitted

    def _headers(self, extra: dict | None = None) -> list[tuple[bytes, bytes]]:
        engine = self.service.engine
        headers = {
            "content-type": "text/event-stream" if self.events else formats.MEDIA_TYPES[self.fmt],
            "x-request-id": self.handle.id,
            "x-seed": str(self.seed),
            "x-sample-rate": str(engine.sample_rate),
            "x-replica-id": self.service.limits.replica_id,
            "cache-control": "no-store",
        }
        if self.fmt == "pcm":
            headers["x-sample-format"] = "s16le"
            headers["x-channels"] = "1"
        headers.update(extra or {})
        return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]

    async def __call__(self, scope, receive, send) -> None:
        handle = self.handle
        items = pump_chunks(handle)

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    items.put_nowait(("disconnect", None))
                    return

        limit = self.service.limits.write_timeout_s

        async def bounded_send(message) -> None:
            await within(limit, send(message))

        watcher = asyncio.create_task(watch())
        outcome = "error"
        try:
            outcome = await self._respond(items, bounded_send)
        except WriteTimeout:
            outcome = "write_timeout"
        finally:
            watcher.cancel()
            if not handle.done:
                handle.cancel()
            metrics = self.service.metrics
            if outcome == "ok":
                metrics.speech_done()
            elif outcome in ("disconnect", "write_timeout"):
                metrics.disconnect()
            if outcome == "write_timeout":
                cut_off(self.service, scope, handle)

    async def _next(self, items: asyncio.Queue):
        limit = self.service.limits.request_timeout_s
        if limit is None:
            return await items.get()
        # the engine enforces the deadline; this is a safety net should it not answer at all
        remaining = self.admitted + limit + 30.0 - time.monotonic()
        try:
            return await asyncio.wait_for(items.get(), timeout=max(remaining, 0.001))
        except asyncio.TimeoutError:
            self.handle.cancel()
            return "error", TimeoutError(f"request {self.handle.id}: past its timeout of {limit:g} s")

    async def _send_error(self, send, exc: BaseException) -> None:
        status, message, kind = self.service.failure(exc, f"request {self.handle.id}")
        headers = {"x-request-id": self.handle.id, "x-replica-id": self.service.limits.replica_id}
        response = self.service.error(status, message, kind, headers=headers)
        await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})

    async def _respond(self, items: asyncio.Queue, send) -> str:
        sample_rate = self.service.engine.sample_rate
        kind, item = await self._next(items)
        if kind == "disconnect":
            return "disconnect"
        if kind == "error":
            await self._send_error(send, item)
            return "error"
        first_audio = time.monotonic() - self.admitted if kind == "chunk" else None

        if not self.stream:
            parts = []
            while kind == "chunk":
                parts.append(item)
                kind, item = await self._next(items)
            if kind == "disconnect":
                return "disconnect"
            if kind == "error":
                await self._send_error(send, item)
                return "error"
            audio = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
            body = await run_in_threadpool(formats.encode_whole, audio, self.fmt, sample_rate)
            extra = {"content-length": str(len(body)), "x-frames": str(len(parts)),
                     "x-audio-seconds": f"{audio.shape[0] / sample_rate:.4f}"}
            if first_audio is not None:
                extra["x-first-audio-seconds"] = f"{first_audio:.4f}"
            await send({"type": "http.response.start", "status": 200, "headers": self._headers(extra)})
            await send({"type": "http.response.body", "body": body})
            if first_audio is not None:
                self.service.metrics.observe_ttfa(first_audio)
            return "ok"

        await send({"type": "http.response.start", "status": 200, "headers": self._headers()})
        opening = formats.stream_start(self.fmt, sample_rate)
        if kind == "chunk":
            await send({"type": "http.response.body", "body": self._frame(opening + formats.pcm16(item)),
                        "more_body": True})
            self.service.metrics.observe_ttfa(first_audio)
        elif opening:
            await send({"type": "http.response.body", "body": self._frame(opening), "more_body": True})
        while kind == "chunk":
            kind, item = await self._next(items)
            if kind == "chunk":
                await send({"type": "http.response.body", "body": self._frame(formats.pcm16(item)),
                            "more_body": True})
        if kind == "done":
            await send({"type": "http.response.body", "body": self._done(), "more_body": False})
            return "ok"
        if kind == "disconnect":
            return "disconnect"
        status, message, error_kind = self.service.failure(item, f"request {self.handle.id}")
        self.service.metrics.error(error_kind)
        log.warning("request %s failed mid-stream (%s): %s", self.handle.id, error_kind, message)
        if self.events:   # events frame the stream: the failure is an event of its own
            await send({"type": "http.response.body", "more_body": False, "body": _event(
                {"type": "error", "error": {"message": message, "type": error_kind, "param": None, "code": status}})})
        # else the status is out: end without completing the chunked body, so the client sees a
        # truncated response rather than a short "complete" one
        return "error"

    def _frame(self, audio: bytes) -> bytes:
        """Audio bytes as they go out: as they are, or as a speech.audio.delta event."""
        if not self.events:
            return audio
        return _event({"type": "speech.audio.delta", "audio": base64.b64encode(audio).decode("ascii")})

    def _done(self) -> bytes:
        if not self.events:
            return b""
        prompt = len(self.handle.prepared.prompt.input_ids)
        frames = int(self.handle.frames)
        return _event({"type": "speech.audio.done",
                       "usage": {"input_tokens": prompt, "output_tokens": frames, "total_tokens": prompt + frames}})


def _event(data: dict) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


class WriteTimeout(Exception):
    """A write to the client did not complete within `Limits.write_timeout_s` (it stopped reading)."""


async def within(limit: float | None, write) -> None:
    """Await the write `write`, at most `limit` seconds (None: no limit); WriteTimeout past that."""
    if limit is None:
        return await write
    try:
        await asyncio.wait_for(write, timeout=limit)
    except asyncio.TimeoutError:
        raise WriteTimeout() from None


def cut_off(service: Service, scope, handle) -> None:
    """A client that read nothing for the write timeout: counted, its request cancelled, its connection aborted
    (through `Service.abort_client`, set by the server: closing it politely would wait for its unread bytes)."""
    handle.cancel()
    service.metrics.error("write_timeout")
    log.warning("request %s: the client read nothing for %g s: cancelled, connection aborted",
                handle.id, service.limits.write_timeout_s)
    abort = service.abort_client
    if abort is not None:
        try:
            abort(scope.get("client"))
        except Exception as exc:  # noqa: BLE001 -- best effort; the graceful timeout bounds it
            log.warning("cannot abort the connection of %s: %s", scope.get("client"), exc)


def pump_chunks(handle) -> asyncio.Queue:
    """A queue of the running loop that receives the handle's chunks as they are made, from a thread:
    ("chunk", float32 [hop]) ..., then ("done", None) or ("error", the request's exception)."""
    loop = asyncio.get_running_loop()
    items: asyncio.Queue = asyncio.Queue()

    def put(item) -> None:
        try:
            loop.call_soon_threadsafe(items.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            handle.cancel()

    def pump() -> None:
        try:
            for chunk in handle.chunks():
                put(("chunk", chunk))
            put(("done", None))
        except BaseException as exc:  # noqa: BLE001 -- the request's own error, answered by the caller
            put(("error", exc))

    threading.Thread(target=pump, name=f"vv-pump-{handle.id}", daemon=True).start()
    return items
