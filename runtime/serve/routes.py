"""The endpoints of vv-serve, over the `Service` in `request.app.state.service`.

    POST   /v1/audio/speech   OpenAI-compatible: {"model", "input", "voice", "response_format", "stream",
                              "stream_format", "seed", "speed"} -> audio (whole, chunked, or SSE events)
    POST   /v1/speech/script  multi-speaker scripts: {"script": "Speaker 1: ...", "voices": [id, ...], ...}
    POST   /v1/voices         upload a voice (multipart "file" [+ "name"], or the raw sound file as body)
    GET    /v1/voices         the voices this key can use (the presets of --voices DIR and its uploads)
    DELETE /v1/voices/{id}    forget one of this key's uploads
    GET    /health, /metrics, /v1/models, /openapi.json, /  (the web page)

A refusal is raised (`ApiError`, or the runtime's own exceptions); the app turns it into JSON. Request
bodies are checked strictly: a field of the wrong JSON type is refused, never converted ("5" is no seed).
Who asks (`security.principal_of`) decides which uploaded voices a request sees.
"""

from __future__ import annotations

import io
import json
import secrets
import time
from importlib import resources
from typing import Literal, Union

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError
from starlette.concurrency import run_in_threadpool

from ..audio import check_sample_rate
from ..errors import CapacityError, RuntimeInputError
from ..service_engine import SpeechRequest
from . import formats
from .errors import UNSUPPORTED_MEDIA, ApiError, validation_message
from .security import principal_of
from .service import Service
from .speech_response import AudioResponse

MAX_SEED = 2 ** 63 - 1

router = APIRouter()


# --- request bodies ---------------------------------------------------------------------------------

class Body(BaseModel):
    # strict: JSON types as they are (no "5" -> 5, no "yes" -> True); unknown fields refused
    model_config = ConfigDict(extra="forbid", strict=True)


class VoiceRef(Body):
    id: str


class SpeechOptions(Body):
    """The fields every speech request takes."""
    response_format: Literal["wav", "pcm", "flac"] = "wav"
    stream: bool | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    cfg_scale: float | None = Field(None, gt=0.0, le=20.0, allow_inf_nan=False)
    max_new_frames: int | None = Field(None, ge=1)


class SpeechBody(SpeechOptions):
    """OpenAI's audio.speech request (plus the `stream`, `seed`, `cfg_scale`, `max_new_frames` extensions)."""
    model: str | None = None
    input: str
    voice: Union[StrictStr, VoiceRef]
    speed: float = Field(1.0, ge=0.25, le=4.0, allow_inf_nan=False)
    instructions: str | None = None      # accepted for compatibility; VibeVoice takes no instructions
    stream_format: Literal["audio", "sse"] | None = None


class ScriptBody(SpeechOptions):
    """A multi-speaker script: `Speaker N: text` lines, one voice id per speaker in order."""
    script: str
    voices: list[str] = Field(min_length=1)


BODY_MODELS = (SpeechBody, ScriptBody)

# --- what the answers look like (the OpenAPI document) -----------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: int


class ErrorBody(BaseModel):
    error: ErrorDetail


class VoiceEntry(BaseModel):
    id: str
    name: str
    seconds: float
    preset: bool
    bytes: int | None = Field(None, description="memory the upload holds (uploads only)")


class UploadedVoice(VoiceEntry):
    created: bool


class VoiceList(BaseModel):
    object: Literal["list"]
    data: list[VoiceEntry]


class DeletedVoice(BaseModel):
    id: str
    object: Literal["voice"]
    deleted: Literal[True]


class Health(BaseModel):
    status: Literal["ok", "draining", "failed"]
    accepting: bool
    queue_depth: int
    active_requests: int
    active_rows: int
    voices: int
    sample_rate: int
    voice_uploads: bool
    api_key_required: bool
    replica_id: str


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int


class SpeechAudioDelta(BaseModel):
    type: Literal["speech.audio.delta"]
    audio: str = Field(description="the next bytes of the audio, base64")


class SpeechAudioDone(BaseModel):
    type: Literal["speech.audio.done"]
    usage: Usage


class SpeechStreamError(BaseModel):
    type: Literal["error"]
    error: ErrorDetail


# models the OpenAPI document names besides those FastAPI finds on the routes (app.openapi_document)
DOC_MODELS = (ErrorBody, SpeechAudioDelta, SpeechAudioDone, SpeechStreamError)


def ref(model: type[BaseModel]) -> dict:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


ERRORS = {"default": {"description": "an error: JSON, its type and the field at fault",
                      "content": {"application/json": {"schema": ref(ErrorBody)}}}}
BINARY = {"schema": {"type": "string", "format": "binary"}}
# an event of `stream_format: "sse"`: its data is one JSON object
SPEECH_EVENT = {"schema": {"type": "object", "required": ["data"], "properties": {
    "event": {"type": "string"}, "id": {"type": "string"},
    "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": {
        "anyOf": [ref(SpeechAudioDelta), ref(SpeechAudioDone), ref(SpeechStreamError)]}}}}}
AUDIO_ANSWER = {200: {"description": "the audio: whole, chunked as frames are made, or SSE events",
                      "content": {**{media: BINARY for media in formats.MEDIA_TYPES.values()},
                                  "text/event-stream": SPEECH_EVENT}}, **ERRORS}


def json_request(model: type[BaseModel]) -> dict:
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


# --- request checks ---------------------------------------------------------------------------------

def service_of(request: Request) -> Service:
    return request.app.state.service


def is_json(content_type: str) -> bool:
    media = content_type.split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def read_json(request: Request, model):
    raw = await request.body()
    if not raw.strip():
        raise ApiError(400, "request body is empty: expected a JSON object")
    content_type = request.headers.get("content-type", "")
    if not is_json(content_type):
        raise ApiError(415, f"send the request body as JSON with 'content-type: application/json', not "
                            f"{content_type.split(';')[0].strip()[:60] or 'no content type'}", UNSUPPORTED_MEDIA)
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
    try:
        check_sample_rate(info.samplerate, "file")
    except RuntimeInputError as exc:
        raise ApiError(400, str(exc), param="file") from None
    if info.frames <= 0:
        raise ApiError(400, "file: contains no audio samples", param="file")
    return info.frames / info.samplerate


def speech_mode(body: SpeechOptions, openai_default: bool = False) -> str:
    """How the audio goes out: "whole", "stream" (chunked) or "sse" (events). `stream` left out: streamed
    for an OpenAI request (`openai_default`: OpenAI streams its audio by default) where the format can be
    streamed, whole otherwise."""
    fmt = body.response_format
    stream_format = getattr(body, "stream_format", None)      # OpenAI's field (the script endpoint has none)
    if stream_format == "sse":
        if body.stream is False:
            raise ApiError(400, "stream_format 'sse' streams events: leave out stream, or set it true",
                           param="stream")
        mode = "sse"
    elif body.stream is not None:
        mode = "stream" if body.stream else "whole"
    elif stream_format == "audio":
        mode = "stream"
    else:
        mode = "stream" if openai_default and fmt in formats.STREAMABLE else "whole"
    if mode != "whole" and fmt not in formats.STREAMABLE:      # streaming asked for in so many words
        raise ApiError(400, f"response_format {fmt!r} cannot be streamed (its header needs the total length): "
                            f"use 'wav' or 'pcm' to stream, or set stream false", param="response_format")
    return mode


async def speak(service: Service, script: str, voices: list, body: SpeechOptions, mode: str, text_param: str,
                plain_text: bool = False) -> AudioResponse:
    service.refuse_if_draining()
    seed = body.seed if body.seed is not None else secrets.randbelow(2 ** 31)
    request = SpeechRequest(script=script, voices=voices, cfg_scale=body.cfg_scale, seed=seed,
                            max_new_frames=body.max_new_frames, timeout_s=service.limits.request_timeout_s,
                            plain_text=plain_text)
    admitted = time.monotonic()
    try:
        handle = await run_in_threadpool(service.engine.submit, request)
    except RuntimeInputError as exc:
        if isinstance(exc, CapacityError):
            raise
        raise ApiError(400, str(exc), param=text_param) from None   # the text: its lines, speakers, length
    return AudioResponse(service, handle, body.response_format, mode != "whole", seed, admitted,
                         events=mode == "sse")


# --- speech -----------------------------------------------------------------------------------------

@router.post("/v1/audio/speech", response_class=Response, responses=AUDIO_ANSWER,
             openapi_extra=json_request(SpeechBody))
async def audio_speech(request: Request):
    service = service_of(request)
    body = await read_json(request, SpeechBody)
    check_text(body.input, "input", service.limits.max_text_chars)
    if body.speed != 1.0:
        raise ApiError(400, f"speed {body.speed:g}: only 1.0 is supported (VibeVoice has no speed control)",
                       param="speed")
    mode = speech_mode(body, openai_default=body.model is not None)
    voice_id = body.voice.id if isinstance(body.voice, VoiceRef) else body.voice
    voice = service.voices.resolve(principal_of(request).owner, voice_id, "voice")
    # `input` is plain text: every line spoken by the one voice (never a script or a file name)
    return await speak(service, body.input, [voice], body, mode, "input", plain_text=True)


@router.post("/v1/speech/script", response_class=Response, responses=AUDIO_ANSWER,
             openapi_extra=json_request(ScriptBody))
async def speech_script(request: Request):
    service = service_of(request)
    body = await read_json(request, ScriptBody)
    limits = service.limits
    check_text(body.script, "script", limits.max_text_chars)
    if len(body.voices) > limits.max_speakers:
        raise ApiError(400, f"voices: {len(body.voices)} given, more than the limit of {limits.max_speakers}",
                       param="voices")
    mode = speech_mode(body)
    owner = principal_of(request).owner
    voices = [service.voices.resolve(owner, voice_id, f"voices.{i}") for i, voice_id in enumerate(body.voices)]
    return await speak(service, body.script, voices, body, mode, "script")


# --- voices -----------------------------------------------------------------------------------------

@router.get("/v1/voices", responses={200: {"model": VoiceList}, **ERRORS})
async def list_voices(request: Request):
    service = service_of(request)
    return {"object": "list", "data": service.voices.list(principal_of(request).owner)}


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


UPLOAD_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary"}, "name": {"type": "string"}}}},
    "audio/*": BINARY}}}


@router.post("/v1/voices", status_code=201, openapi_extra=UPLOAD_BODY,
             responses={201: {"model": UploadedVoice, "description": "a new voice"},
                        200: {"model": UploadedVoice, "description": "the voice this file made already"}, **ERRORS})
async def add_voice(request: Request, name: str | None = Query(None, description="the voice's id (raw body uploads)")):
    service = service_of(request)
    limits = service.limits
    service.refuse_if_draining()
    owner = principal_of(request).owner
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
    voice_id, created = await run_in_threadpool(service.voices.add, owner, data, name)
    entry = service.voices.entry(owner, voice_id)
    if entry is None:        # deleted by a request of the same key in the meantime
        raise ApiError(404, f"voice {voice_id!r} was deleted while it was being added", "not_found", "id")
    return JSONResponse({**entry, "created": created}, status_code=201 if created else 200)


@router.delete("/v1/voices/{voice_id}", responses={200: {"model": DeletedVoice}, **ERRORS})
async def delete_voice(request: Request, voice_id: str):
    service = service_of(request)
    await run_in_threadpool(service.voices.delete, principal_of(request).owner, voice_id)
    return {"id": voice_id, "object": "voice", "deleted": True}


# --- the service ------------------------------------------------------------------------------------

@router.get("/health", responses={200: {"model": Health}, 503: {"model": Health, "description": "not accepting"},
                                  **ERRORS})
async def health(request: Request):
    service = service_of(request)
    engine, limits = service.engine, service.limits
    stats = engine.stats()
    ok = service.accepting
    body = {"status": "ok" if ok else ("draining" if service.draining or not engine.accepting else "failed"),
            "accepting": ok, "queue_depth": stats.get("queue_depth", 0),
            "active_requests": stats.get("active_requests", 0), "active_rows": stats.get("active_rows", 0),
            "voices": len(engine.voices.list()), "sample_rate": engine.sample_rate,
            "voice_uploads": limits.voice_uploads, "api_key_required": service.access.keys_required,
            "replica_id": limits.replica_id}
    headers = None if ok else {"Retry-After": str(limits.retry_after_s)}
    return JSONResponse(body, status_code=200 if ok else 503, headers=headers)


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, **ERRORS})
async def metrics(request: Request):
    service = service_of(request)
    engine = service.engine
    extra = {"vv_accepting": ("gauge", "1 while the service admits requests.", int(service.accepting)),
             "vv_voices": ("gauge", "Voices held (presets and uploads).", len(engine.voices.list())),
             "vv_voice_upload_bytes": ("gauge", "Memory held by uploaded voices (audio, embeddings, prefix caches).",
                                       service.voices.held_total())}
    if service.connections is not None:
        extra["vv_open_connections"] = ("gauge", "HTTP connections open.", len(service.connections))
    return PlainTextResponse(service.metrics.render(engine.stats(), extra),
                             media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/models", responses=ERRORS)
async def models():
    return {"object": "list", "data": [{"id": "vibevoice", "object": "model", "owned_by": "vibevoice-trt"}]}


@router.get("/", response_class=HTMLResponse)
async def page():
    return HTMLResponse(resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8"))
