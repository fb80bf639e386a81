"""The HTTP application of vv-serve, built on the `SpeechEngine` interface only.

    POST /v1/audio/speech   OpenAI-compatible: {"model", "input", "voice", "response_format", "stream",
                            "seed", "speed"} -> audio (whole, or chunked as frames are made)
    POST /v1/speech/script  multi-speaker scripts: {"script": "Speaker 1: ...", "voices": [id, ...], ...}
    POST /v1/voices         upload a voice (multipart "file" [+ "name"], or the raw sound file as body)
    GET  /v1/voices         the voices known (presets from --voices DIR and uploads)
    GET  /health, /metrics, /v1/models, /  (the web page)

Every error is JSON `{"error": {"message", "type", ...}}` with a 4xx status (429/503 carry Retry-After),
or a 5xx for what is not the request's fault (503 capacity/draining, 504 timeout, 500 backend or internal
error): bad input never reaches the engine, and a failure of one request never touches another.

A speech response is produced by `AudioResponse`, a raw ASGI response: a thread per request pumps
the handle's chunks into the event loop, a watcher listens for the client's disconnect, and whatever
ends the response (done, error, disconnect, timeout) the handle is cancelled in `finally`, so an
abandoned request frees its rows at the engine's next step. Every write to the client is bounded by
`Limits.write_timeout_s`: a client that stops reading has its request cancelled and its connection
aborted (through `Service.abort_client`, set by the server), so it neither holds rows nor blocks shutdown.
Headers are sent with the first audio (or the error, as JSON, if the request fails before any audio).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Callable, Literal, Union

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import BackendFault, CapacityError, RuntimeInputError, one_line
from ..service_engine import EngineStopped, QueueFull, SpeechRequest
from . import formats
from .metrics import ServiceMetrics

log = logging.getLogger("vv_runtime.serve")

MAX_SEED = 2 ** 63 - 1


@dataclass(frozen=True)
class Limits:
    """Admission limits of the service (the engine's own: --max-batch rows, --max-queue requests)."""
    max_text_chars: int = 4096            # characters of `input` / `script`
    max_voice_seconds: float = 60.0       # seconds of an uploaded voice (enforced by the VoiceStore too)
    max_voice_bytes: int = 16 * 2 ** 20   # bytes of an uploaded sound file
    max_voices: int = 256                 # voices held (presets + uploads)
    max_speakers: int = 16                # voices per script request
    request_timeout_s: float | None = 300.0   # per request, from admission to the last frame
    write_timeout_s: float | None = 30.0      # per write to the client (one that stops reading is cut off)
    voice_uploads: bool = True            # POST /v1/voices (off under Ray: uploads live on one replica)
    retry_after_s: int = 2                # Retry-After of 429 / 503
    replica_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")

    def body_limit(self, path: str) -> int:
        """Most bytes a request body may have on `path`."""
        if path.rstrip("/") == "/v1/voices":
            return self.max_voice_bytes + 2 ** 20        # multipart framing and the name field
        return 2 ** 20 + 8 * self.max_text_chars        # JSON with escapes


class ApiError(Exception):
    """An error answered as JSON with `status`."""

    def __init__(self, status: int, message: str, kind: str, param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers


def error_response(status: int, message: str, kind: str, param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


# --- request bodies ---------------------------------------------------------------------------------

class VoiceRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")
    response_format: Literal["wav", "pcm", "flac"] = "wav"
    stream: bool = False
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    cfg_scale: float | None = Field(None, gt=0.0, le=20.0, allow_inf_nan=False)
    max_new_frames: int | None = Field(None, ge=1)


class SpeechBody(_Common):
    """OpenAI's audio.speech request (plus the `seed`, `cfg_scale`, `max_new_frames` extensions)."""
    model: str | None = None
    input: str
    voice: Union[str, VoiceRef]
    speed: float = Field(1.0, ge=0.25, le=4.0, allow_inf_nan=False)
    instructions: str | None = None      # accepted for compatibility; VibeVoice takes no instructions
    stream_format: Literal["audio"] | None = None


class ScriptBody(_Common):
    """A multi-speaker script: `Speaker N: text` lines, one voice id per speaker in order."""
    script: str
    voices: list[str] = Field(default_factory=list)


def _validation_message(errors: list[dict]) -> tuple[str, str | None]:
    first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return "request body is not valid JSON", None
    if kind == "missing":
        return f"{param}: required field missing", param
    if kind == "extra_forbidden":
        return f"{param}: unknown field", param
    if kind in ("model_type", "dict_type", "model_attributes_type") and not loc:
        return "request body must be a JSON object", None
    message = first.get("msg", "invalid value")
    return (f"{param}: {message}" if param else message), param


# --- the service ------------------------------------------------------------------------------------

class Service:
    """State shared by the routes: the engine, the limits, metrics, draining flag, preset ids."""

    def __init__(self, engine, limits: Limits):
        self.engine = engine
        self.limits = limits
        self.metrics = ServiceMetrics()
        self.draining = False
        self.presets = {v["id"] for v in engine.voices.list()}
        self.voice_lock = threading.Lock()     # upload checks and add, together
        self.uploads: dict[str, str] = {}      # sha256 of an uploaded file -> the voice id it made
        # set by the server that runs the app: aborts the connection of scope["client"] (a client that
        # stopped reading: closing it politely would wait for its unread bytes forever)
        self.abort_client: Callable[[object], None] | None = None

    def start_draining(self) -> None:
        """Stop admitting speech and voice requests (answered 503); in-flight requests go on."""
        self.draining = True

    @property
    def accepting(self) -> bool:
        fatal = getattr(self.engine, "fatal", None)
        return not self.draining and bool(self.engine.accepting) and fatal is None

    def refuse_if_draining(self) -> None:
        if not self.accepting:
            raise EngineStopped("the service is not accepting requests (draining or stopped)")


class AudioResponse(Response):
    """Speech of one admitted request, whole or streamed (see the module docstring)."""

    def __init__(self, service: Service, handle, fmt: str, stream: bool, seed: int, admitted: float):
        super().__init__(content=b"", status_code=200)
        self.service, self.handle, self.fmt, self.stream, self.seed = service, handle, fmt, stream, seed
        self.admitted = admitted

    def _headers(self, extra: dict | None = None) -> list[tuple[bytes, bytes]]:
        engine = self.service.engine
        headers = {
            "content-type": formats.MEDIA_TYPES[self.fmt],
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
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()
        handle = self.handle

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
            except BaseException as exc:  # noqa: BLE001 -- the request's own error, answered as JSON
                put(("error", exc))

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    items.put_nowait(("disconnect", None))
                    return

        limit = self.service.limits.write_timeout_s

        async def bounded_send(message) -> None:
            if limit is None:
                return await send(message)
            try:
                await asyncio.wait_for(send(message), timeout=limit)
            except asyncio.TimeoutError:
                raise _WriteTimeout() from None

        threading.Thread(target=pump, name=f"vv-pump-{handle.id}", daemon=True).start()
        watcher = asyncio.create_task(watch())
        outcome = "error"
        try:
            outcome = await self._respond(items, bounded_send)
        except _WriteTimeout:
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
                metrics.error("write_timeout")
                log.warning("request %s: the client read nothing for %g s: cancelled, connection aborted",
                            handle.id, limit)
                abort = self.service.abort_client
                if abort is not None:
                    try:
                        abort(scope.get("client"))
                    except Exception as exc:  # noqa: BLE001 -- best effort; the graceful timeout bounds it
                        log.warning("cannot abort the connection of %s: %s", scope.get("client"), exc)

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
        status, message, kind = _engine_error(exc)
        self.service.metrics.error(kind)
        headers = {"x-request-id": self.handle.id, "x-replica-id": self.service.limits.replica_id}
        if status == 503:
            headers["retry-after"] = str(self.service.limits.retry_after_s)
        response = error_response(status, message, kind, headers=headers)
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
            await send({"type": "http.response.body", "body": opening + formats.pcm16(item), "more_body": True})
            self.service.metrics.observe_ttfa(first_audio)
        elif opening:
            await send({"type": "http.response.body", "body": opening, "more_body": True})
        while kind == "chunk":
            kind, item = await self._next(items)
            if kind == "chunk":
                await send({"type": "http.response.body", "body": formats.pcm16(item), "more_body": True})
        if kind == "done":
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return "ok"
        if kind == "disconnect":
            return "disconnect"
        # failed after audio was sent: the status is out; end without completing the chunked body, so
        # the client sees a truncated response rather than a short "complete" one
        _, message, error_kind = _engine_error(item)
        self.service.metrics.error(error_kind)
        log.warning("request %s failed mid-stream (%s): %s", self.handle.id, error_kind, message)
        return "error"


class _WriteTimeout(Exception):
    """A write to the client did not complete within `Limits.write_timeout_s` (it stopped reading)."""


def _engine_error(exc: BaseException) -> tuple[int, str, str]:
    """(status, one-line message, type) of a request's error."""
    text = one_line(exc)
    if isinstance(exc, CapacityError):
        return 503, text, "capacity"
    if isinstance(exc, BackendFault):
        log.error("request failed in the backend: %s", text)
        return 500, f"backend error: {text}", "backend_error"
    if isinstance(exc, RuntimeInputError):
        return 400, text, "invalid_request_error"
    if isinstance(exc, TimeoutError):
        return 504, text, "timeout"
    if isinstance(exc, EngineStopped):
        return 503, text, "unavailable"
    if type(exc).__name__ == "Cancelled":
        return 503, text, "cancelled"
    log.error("request failed: %s: %s", type(exc).__name__, text)
    return 500, f"internal error ({type(exc).__name__})", "internal_error"


# --- the app ----------------------------------------------------------------------------------------

ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/voices", "/v1/audio/speech", "/v1/speech/script")


class BodyLimit:
    """ASGI middleware: bounds request bodies (413 as JSON) and counts responses by route and status."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        route = path if path in ROUTES else "other"
        limit = self.service.limits.body_limit(path)
        metrics = self.service.metrics

        async def counted_send(message):
            if message["type"] == "http.response.start":
                metrics.response(route, message["status"])
            await send(message)

        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > limit
            except ValueError:
                too_big = False
            if too_big:
                metrics.error("too_large")
                response = error_response(413, f"request body of {int(declared)} bytes is larger than the "
                                               f"limit of {limit} bytes on {path}", "too_large")
                return await response(scope, receive, counted_send)
        seen = 0

        async def bounded_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, f"request body larger than the limit of {limit} bytes on {path}")
            return message

        await self.app(scope, bounded_receive, counted_send)


def _sound_seconds(data: bytes) -> float:
    """Duration of an uploaded sound file from its header (400 when it is not one soundfile reads)."""
    import io

    import soundfile as sf

    try:
        info = sf.info(io.BytesIO(data))
    except Exception as exc:  # libsndfile errors of every kind
        detail = " ".join(str(exc).split(":")[-1].split()) or type(exc).__name__
        raise ApiError(400, f"file: not a sound file this service reads ({detail}); send wav, flac or ogg",
                       "invalid_request_error", "file") from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise ApiError(400, "file: contains no audio samples", "invalid_request_error", "file")
    return info.frames / info.samplerate


def _page() -> str:
    return resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")


def create_app(engine, limits: Limits | None = None) -> FastAPI:
    """The ASGI app over a started `SpeechEngine` (the caller starts and stops the engine)."""
    limits = limits or Limits()
    service = Service(engine, limits)
    app = FastAPI(title="vv-serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.add_middleware(BodyLimit, service=service)

    def fail(request: Request, status: int, message: str, kind: str, param=None, headers=None):
        service.metrics.error(kind)
        return error_response(status, message, kind, param, headers)

    retry = {"Retry-After": str(limits.retry_after_s)}

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return fail(request, exc.status, exc.message, exc.kind, exc.param, exc.headers)

    @app.exception_handler(CapacityError)
    async def _capacity(request: Request, exc: CapacityError):
        return fail(request, 503, " ".join(str(exc).split()), "capacity", headers=retry)

    @app.exception_handler(RuntimeInputError)
    async def _input_error(request: Request, exc: RuntimeInputError):
        return fail(request, 400, " ".join(str(exc).split()), "invalid_request_error")

    @app.exception_handler(BackendFault)
    async def _backend_fault(request: Request, exc: BackendFault):
        status, message, kind = _engine_error(exc)
        return fail(request, status, message, kind)

    @app.exception_handler(QueueFull)
    async def _queue_full(request: Request, exc: QueueFull):
        return fail(request, 429, f"busy: {exc}; retry later", "queue_full", headers=retry)

    @app.exception_handler(EngineStopped)
    async def _stopped(request: Request, exc: EngineStopped):
        return fail(request, 503, f"unavailable: {exc}", "unavailable", headers=retry)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc.errors())
        return fail(request, 400, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kinds = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no such route: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} not allowed on {request.url.path}"
        return fail(request, exc.status_code, message, kinds.get(exc.status_code, "invalid_request_error"),
                    headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.error("internal error on %s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return fail(request, 500, f"internal error ({type(exc).__name__})", "internal_error")

    async def read_json(request: Request, model):
        raw = await request.body()
        if not raw.strip():
            raise ApiError(400, "request body is empty: expected a JSON object", "invalid_request_error")
        try:
            data = json.loads(raw)
        except RecursionError:
            raise ApiError(400, "request body is nested too deeply", "invalid_request_error") from None
        except ValueError:  # JSONDecodeError, UnicodeDecodeError
            raise ApiError(400, "request body is not valid JSON", "invalid_request_error") from None
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JSON object", "invalid_request_error")
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            message, param = _validation_message(exc.errors())
            raise ApiError(400, message, "invalid_request_error", param) from None

    def check_text(text: str, param: str) -> None:
        if not text.strip():
            raise ApiError(400, f"{param}: empty (no text to speak)", "invalid_request_error", param)
        if len(text) > limits.max_text_chars:
            raise ApiError(400, f"{param}: {len(text)} characters, more than the limit of "
                                f"{limits.max_text_chars}", "invalid_request_error", param)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ApiError(400, f"{param}: not valid Unicode text ({exc.reason} at character {exc.start}, "
                                f"e.g. a lone surrogate escape such as \\ud800)", "invalid_request_error",
                           param) from None

    async def speak(script: str, voices: list, body: _Common) -> AudioResponse:
        if body.stream and body.response_format not in formats.STREAMABLE:
            raise ApiError(400, f"response_format {body.response_format!r} cannot be streamed (its header needs "
                                f"the total length): use 'wav' or 'pcm' with stream, or stream false",
                           "invalid_request_error", "response_format")
        service.refuse_if_draining()
        seed = body.seed if body.seed is not None else secrets.randbelow(2 ** 31)
        request = SpeechRequest(script=script, voices=voices, cfg_scale=body.cfg_scale, seed=seed,
                                max_new_frames=body.max_new_frames, timeout_s=limits.request_timeout_s)
        admitted = time.monotonic()
        handle = await run_in_threadpool(engine.submit, request)
        return AudioResponse(service, handle, body.response_format, body.stream, seed, admitted)

    @app.post("/v1/audio/speech")
    async def audio_speech(request: Request):
        body = await read_json(request, SpeechBody)
        check_text(body.input, "input")
        if body.speed != 1.0:
            raise ApiError(400, f"speed {body.speed:g}: only 1.0 is supported (VibeVoice has no speed control)",
                           "invalid_request_error", "speed")
        voice = body.voice.id if isinstance(body.voice, VoiceRef) else body.voice
        engine.voices.get(voice)  # unknown voice: RuntimeInputError -> 400
        stream = body.stream or body.stream_format == "audio"
        # `input` is plain text: every line spoken by the one voice (never a script or a file name)
        lines = [line.strip() for line in body.input.splitlines() if line.strip()]
        script = "\n".join(f"Speaker 1: {line}" for line in lines)
        return await speak(script, [voice], body.model_copy(update={"stream": stream}))

    @app.post("/v1/speech/script")
    async def speech_script(request: Request):
        body = await read_json(request, ScriptBody)
        check_text(body.script, "script")
        if len(body.voices) > limits.max_speakers:
            raise ApiError(400, f"voices: {len(body.voices)} given, more than the limit of {limits.max_speakers}",
                           "invalid_request_error", "voices")
        for voice in body.voices:
            engine.voices.get(voice)
        return await speak(body.script, list(body.voices), body)

    @app.get("/v1/voices")
    async def list_voices():
        voices = engine.voices.list()
        for voice in voices:
            voice["preset"] = voice["id"] in service.presets
        return {"object": "list", "data": voices}

    def store_voice(data: bytes, name: str | None) -> tuple[str, bool]:
        """(id, created): the checks and the add under one lock (uploads are rare; holding it through
        the encode is fine); the same file uploaded again returns its voice without encoding it again."""
        digest = hashlib.sha256(data).hexdigest()
        with service.voice_lock:
            known = {v["id"] for v in engine.voices.list()}
            existing = service.uploads.get(digest)
            if existing in known and (name is None or name == existing):
                return existing, False
            if name is not None and name in known:
                raise ApiError(409, f"voice {name!r} exists already: choose another name", "conflict", "name")
            if len(known) >= limits.max_voices:
                raise ApiError(409, f"the service holds {len(known)} voices, its limit", "voice_limit")
            voice_id = engine.voices.add(data, name)
            service.uploads[digest] = voice_id
            return voice_id, voice_id not in known

    @app.post("/v1/voices", status_code=201)
    async def add_voice(request: Request):
        service.refuse_if_draining()
        if not limits.voice_uploads:
            raise ApiError(501, "voice uploads are off on this service (Ray Serve: an upload would live on one "
                                "replica only): start it with --voices DIR, the presets every replica loads",
                           "not_supported")
        name = request.query_params.get("name") or None
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "multipart/form-data":
            form = await request.form(max_files=1, max_fields=4, max_part_size=limits.max_voice_bytes + 1)
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise ApiError(400, "multipart upload: put the sound file in a part named 'file'",
                               "invalid_request_error", "file")
            data = await upload.read()
            field_name = form.get("name")
            if isinstance(field_name, str) and field_name.strip():
                name = field_name.strip()
        elif content_type in ("application/json", "application/x-www-form-urlencoded", "text/plain"):
            raise ApiError(400, f"upload the sound file as multipart/form-data (part 'file') or as the raw body "
                                f"(e.g. audio/wav), not {content_type}", "invalid_request_error")
        else:
            data = await request.body()
        if not data:
            raise ApiError(400, "empty upload: no sound file", "invalid_request_error", "file")
        if len(data) > limits.max_voice_bytes:
            raise ApiError(413, f"voice file of {len(data)} bytes is larger than the limit of "
                                f"{limits.max_voice_bytes} bytes", "too_large", "file")
        seconds = _sound_seconds(data)
        if seconds > limits.max_voice_seconds:
            raise ApiError(413, f"voice of {seconds:.1f} s is longer than the limit of {limits.max_voice_seconds:g} s",
                           "too_large", "file")
        voice_id, created = await run_in_threadpool(store_voice, data, name)
        entry = next((v for v in engine.voices.list() if v["id"] == voice_id), {"id": voice_id})
        return JSONResponse({**entry, "preset": voice_id in service.presets, "created": created},
                            status_code=201 if created else 200)

    @app.get("/health")
    async def health():
        stats = engine.stats()
        ok = service.accepting
        body = {"status": "ok" if ok else ("draining" if service.draining or not engine.accepting else "failed"),
                "accepting": ok, "queue_depth": stats.get("queue_depth", 0),
                "active_requests": stats.get("active_requests", 0), "active_rows": stats.get("active_rows", 0),
                "voices": len(engine.voices.list()), "sample_rate": engine.sample_rate,
                "voice_uploads": limits.voice_uploads, "replica_id": limits.replica_id}
        return JSONResponse(body, status_code=200 if ok else 503, headers=None if ok else retry)

    @app.get("/metrics")
    async def metrics():
        extra = {"vv_accepting": ("gauge", "1 while the service admits requests.", int(service.accepting)),
                 "vv_voices": ("gauge", "Voices held (presets and uploads).", len(engine.voices.list()))}
        return PlainTextResponse(service.metrics.render(engine.stats(), extra),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "vibevoice", "object": "model", "owned_by": "vibevoice-trt"}]}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(_page())

    return app
