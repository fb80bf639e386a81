"""The routes of vv-serve that only a VibeVoice-Realtime-0.5B engine has (app.py mounts them for it, before
the common ones): streaming text in over a WebSocket, and its read-only voices.

    WS   /v1/audio/speech/stream   text chunks in, PCM frames out as they are made (protocol below)
    GET  /v1/audio/speech/stream   what the WebSocket takes and sends (JSON; a page tells the family by it)
    POST /v1/voices                refused (501): the voices are the presets of the ENGINE_DIR

The protocol (every client message a JSON object in a text message):

    client -> {"type": "start", "voice": PRESET, "seed"?, "cfg_scale"?, "max_new_frames"?, "format"?: "pcm"|"f32",
               "text"?: first text}
    server <- {"type": "started", "request_id", "seed", "voice", "sample_rate", "format", "sample_format",
               "channels": 1, "frame_samples"}
    client -> {"type": "text", "text": "..."}   any number, while audio is made
    client -> {"type": "close"}                 the text is complete
    server <- binary messages: one per audio frame as it is made (pcm: s16le, f32: float32le samples)
    server <- {"type": "done", "frames", "audio_seconds", "first_audio_s", "first_audio_after_text_s",
               "stalled_s", "text_tokens", "text_chars", "elapsed_s", "request_id", "seed"}, then close 1000

The request is queued at the start message and speaks each text window as soon as it is complete; its audio
equals the same text sent at once (same seed). A bad message (not JSON, not an object, unknown type or field,
a start that is not first, a message after close, text beyond --max-text-chars or the model's context, an
unknown preset) gets `{"type": "error", "error": {"message", "type", "param", "code"}}` (the HTTP status the
same problem gets on the HTTP routes) and a close with the matching WebSocket code (CLOSE_CODES); the request
is cancelled. A client that disconnects, or reads nothing for --write-timeout, has its request cancelled.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from typing import Literal

from fastapi import APIRouter, Request, WebSocket
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocketDisconnect

from ..realtime_engine import RealtimeEngine, RealtimeRequest
from . import formats
from .errors import ApiError, error_body, validation_message
from .routes import SpeechOptions, check_text
from .security import WEBSOCKET_PROTOCOL
from .service import Service
from .speech_response import WriteTimeout, cut_off, pump_chunks, within

log = logging.getLogger("vv_runtime.serve")

FAMILY = RealtimeEngine.family
STREAM_PATH = "/v1/audio/speech/stream"
# frame encodings: format -> (sample format, encoder)
FRAME_FORMATS = {"pcm": ("s16le", formats.pcm16), "f32": ("f32le", formats.float32le)}
NORMAL_CLOSURE = 1000
# HTTP status of an error -> WebSocket close code (RFC 6455 7.4.1): bad message 1008 (policy violation),
# binary data 1003 (unsupported data), busy or unavailable 1013 (try again later), anything else 1011
CLOSE_CODES = {400: 1008, 415: 1003, 429: 1013, 503: 1013}
SERVER_ERROR_CLOSE = 1011

router = APIRouter()
OPTIONS = SpeechOptions.model_fields   # the same bounds as the HTTP speech requests


# --- messages -------------------------------------------------------------------------------------------

class StartMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["start"]
    voice: str
    text: str = ""
    format: Literal["pcm", "f32"] = "pcm"
    seed: int | None = OPTIONS["seed"]
    cfg_scale: float | None = OPTIONS["cfg_scale"]
    max_new_frames: int | None = OPTIONS["max_new_frames"]


class TextMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class CloseMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["close"]


MESSAGES = {"start": StartMessage, "text": TextMessage, "close": CloseMessage}


def parse_message(message: dict) -> BaseModel:
    """A client's WebSocket message -> its model (ApiError naming the problem)."""
    if message.get("text") is None:
        raise ApiError(415, "binary message: send JSON text messages (start, text, close)", "unsupported_data")
    try:
        data = json.loads(message["text"])
    except RecursionError:
        raise ApiError(400, "message is nested too deeply") from None
    except ValueError:
        raise ApiError(400, "message is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "a message must be a JSON object")
    kind = data.get("type")
    model = MESSAGES.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise ApiError(400, f"unknown message type {str(kind)[:40]!r}: expected one of {', '.join(MESSAGES)}",
                       param="type")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message, param = validation_message(exc.errors())
        raise ApiError(400, f"{kind} message: {message}", param=param) from None


class ClientGone(Exception):
    """The client disconnected."""


# --- one stream -----------------------------------------------------------------------------------------

class SpeechStream:
    """One WebSocket: the start, the text the client sends, the audio back (the module docstring)."""

    def __init__(self, service: Service, websocket: WebSocket):
        self.service, self.websocket = service, websocket
        self.engine = service.engine
        self.handle = None
        self.text_stream = None
        self.text = ""
        self.closed_text = False
        self.encode = None
        self.seed: int | None = None
        self.voice: str | None = None
        self.started = 0.0
        self.first_audio_s: float | None = None

    async def run(self) -> None:
        offered = [p.strip() for p in (self.websocket.headers.get("sec-websocket-protocol") or "").split(",")]
        await self.websocket.accept(subprotocol=WEBSOCKET_PROTOCOL if WEBSOCKET_PROTOCOL in offered else None)
        outcome = "error"
        try:
            outcome = await self._serve()
        except ClientGone:
            outcome = "disconnect"
        except WriteTimeout:
            outcome = "write_timeout"
        except Exception as exc:  # noqa: BLE001 -- every failure is an error message, never a traceback
            await self._refuse(exc)
        finally:
            if self.handle is not None and not self.handle.done:
                self.handle.cancel()
            metrics = self.service.metrics
            if outcome == "ok":
                metrics.speech_done()
            elif outcome in ("disconnect", "write_timeout"):
                metrics.disconnect()
            if outcome == "write_timeout":
                cut_off(self.service, self.websocket.scope, self.handle)

    async def _receive(self) -> BaseModel:
        message = await self.websocket.receive()
        if message["type"] == "websocket.disconnect":
            raise ClientGone()
        return parse_message(message)

    async def _send(self, write) -> None:
        try:
            await within(self.service.limits.write_timeout_s, write)
        except (WebSocketDisconnect, OSError, RuntimeError):
            raise ClientGone() from None

    async def _serve(self) -> str:
        start = await self._receive()
        if not isinstance(start, StartMessage):
            raise ApiError(400, f"{start.type} message before start: the first message must be "
                                f"{{\"type\": \"start\", \"voice\": ...}}", param="type")
        await self._start(start)
        reader = asyncio.create_task(self._read_text())
        writer = asyncio.create_task(self._write_audio())
        try:
            await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
            if writer.done():
                error = writer.result()   # WriteTimeout and ClientGone propagate
                if error is not None:
                    raise error
                await self._send(self.websocket.send_json(self._figures()))
                await self.websocket.close(NORMAL_CLOSURE)
                return "ok"
            reader.result()               # ApiError, RuntimeInputError or ClientGone
            raise AssertionError("the reader ends only with an exception")
        finally:
            for task in (reader, writer):
                task.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)   # both ended, their errors retrieved

    async def _start(self, start: StartMessage) -> None:
        service, engine = self.service, self.engine
        service.refuse_if_draining()
        engine.voices.get(start.voice)   # an unknown preset: RuntimeInputError (400) before anything is queued
        if start.text.strip():
            check_text(start.text, "text", service.limits.max_text_chars)
        seed = start.seed if start.seed is not None else secrets.randbelow(2 ** 31)
        self.text_stream = engine.text_stream()
        request = RealtimeRequest(self.text_stream, start.voice, cfg_scale=start.cfg_scale, seed=seed,
                                  max_new_frames=start.max_new_frames, timeout_s=service.limits.request_timeout_s)
        self.started = time.monotonic()
        self.handle = await run_in_threadpool(engine.submit, request)
        sample_format, self.encode = FRAME_FORMATS[start.format]
        self.seed, self.voice = seed, start.voice
        await self._send(self.websocket.send_json({
            "type": "started", "request_id": self.handle.id, "seed": seed, "voice": start.voice,
            "sample_rate": engine.sample_rate, "format": start.format, "sample_format": sample_format,
            "channels": 1, "frame_samples": engine.hop}))
        if start.text:
            self._append(start.text)

    def _append(self, text: str) -> None:
        total = self.text + text
        if total.strip():
            check_text(total, "text", self.service.limits.max_text_chars)
        self.text_stream.append(text)   # text beyond the model's context: RuntimeInputError, the stream unchanged
        self.text = total

    async def _read_text(self) -> None:
        """The client's text messages into the request's stream, until the client leaves or breaks the protocol
        (always ends with an exception)."""
        while True:
            message = await self._receive()
            if self.closed_text:
                raise ApiError(400, f"{message.type} message after close: the text is complete", param="type")
            if isinstance(message, StartMessage):
                raise ApiError(400, "start message: the stream has started already", param="type")
            if isinstance(message, TextMessage):
                self._append(message.text)
            else:
                check_text(self.text, "text", self.service.limits.max_text_chars)   # empty text: refused
                self.text_stream.close()
                self.closed_text = True

    async def _write_audio(self) -> BaseException | None:
        """The request's frames to the client as they are made; None when it is complete, else its error."""
        items = pump_chunks(self.handle)
        while True:
            kind, item = await items.get()
            if kind != "chunk":
                return item
            await self._send(self.websocket.send_bytes(self.encode(item)))
            if self.first_audio_s is None:
                self.first_audio_s = time.monotonic() - self.started
                self.service.metrics.observe_ttfa(self.first_audio_s)

    def _figures(self) -> dict:
        handle, engine = self.handle, self.engine
        after_text = handle.first_audio_after_text_s

        def rounded(value):
            return None if value is None else round(value, 4)
        return {"type": "done", "request_id": handle.id, "seed": self.seed, "voice": self.voice,
                "frames": handle.frames, "audio_seconds": round(handle.frames * engine.hop / engine.sample_rate, 4),
                "first_audio_s": rounded(self.first_audio_s), "first_audio_after_text_s": rounded(after_text),
                "stalled_s": rounded(handle.stalled_s), "text_tokens": handle.text_tokens,
                "text_chars": len(self.text), "elapsed_s": rounded(time.monotonic() - self.started)}

    async def _refuse(self, exc: BaseException) -> None:
        """The error message and the close of a failed stream (the client may be gone already)."""
        if isinstance(exc, ApiError):
            status, message, kind, param = exc.status, exc.message, exc.kind, exc.param
        else:
            where = f"stream {self.handle.id}" if self.handle is not None else "stream start"
            (status, message, kind), param = self.service.failure(exc, where), None
        self.service.metrics.error(kind)
        try:
            await within(self.service.limits.write_timeout_s,
                         self.websocket.send_json({"type": "error", **error_body(status, message, kind, param)}))
            await self.websocket.close(CLOSE_CODES.get(status, SERVER_ERROR_CLOSE), kind[:120])
        except (WebSocketDisconnect, OSError, RuntimeError, WriteTimeout):
            pass   # the client left first: nothing to tell


# --- routes ---------------------------------------------------------------------------------------------

@router.websocket(STREAM_PATH)
async def speech_stream(websocket: WebSocket):
    await SpeechStream(websocket.app.state.service, websocket).run()


@router.get(STREAM_PATH)
async def describe_stream(request: Request):
    service: Service = request.app.state.service
    engine = service.engine
    return {"model_family": FAMILY, "websocket": STREAM_PATH, "sample_rate": engine.sample_rate,
            "frame_samples": engine.hop, "formats": {name: fmt for name, (fmt, _) in FRAME_FORMATS.items()},
            "voices": [v["id"] for v in engine.voices.list()], "max_text_chars": service.limits.max_text_chars,
            "messages": {"start": ["voice", "text", "format", "seed", "cfg_scale", "max_new_frames"],
                         "text": ["text"], "close": []}}


@router.post("/v1/voices")
async def refuse_voice_upload():
    raise ApiError(501, "this engine's voices are the presets of its ENGINE_DIR (add one with `vv-export voices`); "
                        "uploads are not supported", "not_supported")
