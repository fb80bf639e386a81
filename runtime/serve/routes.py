"""The endpoints of vv-serve, over the `Service` in `request.app.state.service`.

    POST /v1/audio/speech   OpenAI-compatible: {"model", "input", "voice", "response_format", "stream",
                            "seed", "speed"} -> audio (whole, or chunked as frames are made)
    POST /v1/speech/script  multi-speaker scripts: {"script": "Speaker 1: ...", "voices": [id, ...], ...}
    POST /v1/voices         upload a voice (multipart "file" [+ "name"], or the raw sound file as body)
    GET  /v1/voices         the voices known (presets from --voices DIR and uploads)
    GET  /health, /metrics, /v1/models, /  (the web page)

A refusal is raised (`ApiError`, or the runtime's own exceptions); the app turns it into JSON.
"""

from __future__ import annotations

import hashlib
import io
import json
import secrets
import time
from importlib import resources
from typing import Literal, Union

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from ..service_engine import SpeechRequest
from . import formats
from .errors import ApiError, validation_message
from .service import Service
from .speech_response import AudioResponse

MAX_SEED = 2 ** 63 - 1

router = APIRouter()


# --- request bodies ---------------------------------------------------------------------------------

class VoiceRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str


class SpeechOptions(BaseModel):
    """The fields every speech request takes."""
    model_config = ConfigDict(extra="forbid")
    response_format: Literal["wav", "pcm", "flac"] = "wav"
    stream: bool = False
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    cfg_scale: float | None = Field(None, gt=0.0, le=20.0, allow_inf_nan=False)
    max_new_frames: int | None = Field(None, ge=1)


class SpeechBody(SpeechOptions):
    """OpenAI's audio.speech request (plus the `seed`, `cfg_scale`, `max_new_frames` extensions)."""
    model: str | None = None
    input: str
    voice: Union[str, VoiceRef]
    speed: float = Field(1.0, ge=0.25, le=4.0, allow_inf_nan=False)
    instructions: str | None = None      # accepted for compatibility; VibeVoice takes no instructions
    stream_format: Literal["audio"] | None = None


class ScriptBody(SpeechOptions):
    """A multi-speaker script: `Speaker N: text` lines, one voice id per speaker in order."""
    script: str
    voices: list[str] = Field(default_factory=list)


# --- request checks ---------------------------------------------------------------------------------

def service_of(request: Request) -> Service:
    return request.app.state.service


async def read_json(request: Request, model):
    raw = await request.body()
    if not raw.strip():
        raise ApiError(400, "request body is empty: expected a JSON object")
    try:
        data = json.loads(raw)
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply") from None
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        raise ApiError(400, "request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message, param = validation_message(exc.errors())
        raise ApiError(400, message, param=param) from None


def check_text(text: str, param: str, max_chars: int) -> None:
    if not text.strip():
        raise ApiError(400, f"{param}: empty (no text to speak)", param=param)
    if len(text) > max_chars:
        raise ApiError(400, f"{param}: {len(text)} characters, more than the limit of {max_chars}", param=param)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(400, f"{param}: not valid Unicode text ({exc.reason} at character {exc.start}, "
                            f"e.g. a lone surrogate escape such as \\ud800)", param=param) from None


def sound_seconds(data: bytes) -> float:
    """Duration of an uploaded sound file from its header (400 when it is not one soundfile reads)."""
    import soundfile as sf

    try:
        info = sf.info(io.BytesIO(data))
    except Exception as exc:  # libsndfile errors of every kind
        detail = " ".join(str(exc).split(":")[-1].split()) or type(exc).__name__
        raise ApiError(400, f"file: not a sound file this service reads ({detail}); send wav, flac or ogg",
                       param="file") from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise ApiError(400, "file: contains no audio samples", param="file")
    return info.frames / info.samplerate


async def speak(service: Service, script: str, voices: list, body: SpeechOptions,
                plain_text: bool = False) -> AudioResponse:
    if body.stream and body.response_format not in formats.STREAMABLE:
        raise ApiError(400, f"response_format {body.response_format!r} cannot be streamed (its header needs "
                            f"the total length): use 'wav' or 'pcm' with stream, or stream false",
                       param="response_format")
    service.refuse_if_draining()
    seed = body.seed if body.seed is not None else secrets.randbelow(2 ** 31)
    request = SpeechRequest(script=script, voices=voices, cfg_scale=body.cfg_scale, seed=seed,
                            max_new_frames=body.max_new_frames, timeout_s=service.limits.request_timeout_s,
                            plain_text=plain_text)
    admitted = time.monotonic()
    handle = await run_in_threadpool(service.engine.submit, request)
    return AudioResponse(service, handle, body.response_format, body.stream, seed, admitted)


# --- speech -----------------------------------------------------------------------------------------

@router.post("/v1/audio/speech")
async def audio_speech(request: Request):
    service = service_of(request)
    body = await read_json(request, SpeechBody)
    check_text(body.input, "input", service.limits.max_text_chars)
    if body.speed != 1.0:
        raise ApiError(400, f"speed {body.speed:g}: only 1.0 is supported (VibeVoice has no speed control)",
                       param="speed")
    voice = body.voice.id if isinstance(body.voice, VoiceRef) else body.voice
    service.engine.voices.get(voice)  # unknown voice: RuntimeInputError -> 400
    stream = body.stream or body.stream_format == "audio"
    # `input` is plain text: every line spoken by the one voice (never a script or a file name)
    return await speak(service, body.input, [voice], body.model_copy(update={"stream": stream}), plain_text=True)


@router.post("/v1/speech/script")
async def speech_script(request: Request):
    service = service_of(request)
    body = await read_json(request, ScriptBody)
    limits = service.limits
    check_text(body.script, "script", limits.max_text_chars)
    if len(body.voices) > limits.max_speakers:
        raise ApiError(400, f"voices: {len(body.voices)} given, more than the limit of {limits.max_speakers}",
                       param="voices")
    for voice in body.voices:
        service.engine.voices.get(voice)
    return await speak(service, body.script, list(body.voices), body)


# --- voices -----------------------------------------------------------------------------------------

@router.get("/v1/voices")
async def list_voices(request: Request):
    service = service_of(request)
    voices = service.engine.voices.list()
    for voice in voices:
        voice["preset"] = voice["id"] in service.presets
    return {"object": "list", "data": voices}


def store_voice(service: Service, data: bytes, name: str | None) -> tuple[str, bool]:
    """(id, created): the checks and the add under one lock (uploads are rare; holding it through
    the encode is fine); the same file uploaded again returns its voice without encoding it again."""
    voices = service.engine.voices
    digest = hashlib.sha256(data).hexdigest()
    with service.voice_lock:
        known = {v["id"] for v in voices.list()}
        existing = service.uploads.get(digest)
        if existing in known and (name is None or name == existing):
            return existing, False
        if name is not None and name in known:
            raise ApiError(409, f"voice {name!r} exists already: choose another name", "conflict", "name")
        if len(known) >= service.limits.max_voices:
            raise ApiError(409, f"the service holds {len(known)} voices, its limit", "voice_limit")
        voice_id = voices.add(data, name)
        service.uploads[digest] = voice_id
        return voice_id, voice_id not in known


async def read_upload(request: Request, max_bytes: int) -> tuple[bytes, str | None]:
    """(sound file bytes, name) of an upload: multipart ("file" [+ "name"]) or the raw body (name from
    the `name` query parameter)."""
    name = request.query_params.get("name") or None
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=4, max_part_size=max_bytes + 1)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "multipart upload: put the sound file in a part named 'file'", param="file")
        data = await upload.read()
        field_name = form.get("name")
        if isinstance(field_name, str) and field_name.strip():
            name = field_name.strip()
        return data, name
    if content_type in ("application/json", "application/x-www-form-urlencoded", "text/plain"):
        raise ApiError(400, f"upload the sound file as multipart/form-data (part 'file') or as the raw body "
                            f"(e.g. audio/wav), not {content_type}")
    return await request.body(), name


@router.post("/v1/voices", status_code=201)
async def add_voice(request: Request):
    service = service_of(request)
    limits = service.limits
    service.refuse_if_draining()
    if not limits.voice_uploads:
        raise ApiError(501, "voice uploads are off on this service (Ray Serve: an upload would live on one "
                            "replica only): start it with --voices DIR, the presets every replica loads",
                       "not_supported")
    data, name = await read_upload(request, limits.max_voice_bytes)
    if not data:
        raise ApiError(400, "empty upload: no sound file", param="file")
    if len(data) > limits.max_voice_bytes:
        raise ApiError(413, f"voice file of {len(data)} bytes is larger than the limit of "
                            f"{limits.max_voice_bytes} bytes", "too_large", "file")
    seconds = sound_seconds(data)
    if seconds > limits.max_voice_seconds:
        raise ApiError(413, f"voice of {seconds:.1f} s is longer than the limit of {limits.max_voice_seconds:g} s",
                       "too_large", "file")
    voice_id, created = await run_in_threadpool(store_voice, service, data, name)
    entry = next((v for v in service.engine.voices.list() if v["id"] == voice_id), {"id": voice_id})
    return JSONResponse({**entry, "preset": voice_id in service.presets, "created": created},
                        status_code=201 if created else 200)


# --- the service ------------------------------------------------------------------------------------

@router.get("/health")
async def health(request: Request):
    service = service_of(request)
    engine, limits = service.engine, service.limits
    stats = engine.stats()
    ok = service.accepting
    body = {"status": "ok" if ok else ("draining" if service.draining or not engine.accepting else "failed"),
            "accepting": ok, "queue_depth": stats.get("queue_depth", 0),
            "active_requests": stats.get("active_requests", 0), "active_rows": stats.get("active_rows", 0),
            "voices": len(engine.voices.list()), "sample_rate": engine.sample_rate,
            "voice_uploads": limits.voice_uploads, "replica_id": limits.replica_id}
    headers = None if ok else {"Retry-After": str(limits.retry_after_s)}
    return JSONResponse(body, status_code=200 if ok else 503, headers=headers)


@router.get("/metrics")
async def metrics(request: Request):
    service = service_of(request)
    engine = service.engine
    extra = {"vv_accepting": ("gauge", "1 while the service admits requests.", int(service.accepting)),
             "vv_voices": ("gauge", "Voices held (presets and uploads).", len(engine.voices.list()))}
    return PlainTextResponse(service.metrics.render(engine.stats(), extra),
                             media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/models")
async def models():
    return {"object": "list", "data": [{"id": "vibevoice", "object": "model", "owned_by": "vibevoice-trt"}]}


@router.get("/", response_class=HTMLResponse)
async def page():
    return HTMLResponse(resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8"))
