"""vv-serve on a VibeVoice-Realtime ENGINE_DIR end to end: a real `vv-serve` process (uvicorn on 127.0.0.1, the
real RealtimeEngine over the exported tiny realtime fixture and its preset `en-Tiny_man`), driven by a real
WebSocket client (the `websockets` package) and over HTTP: streaming text in equals the same text at once,
audio while text still streams, the figures, concurrent streams equal to alone, every bad message refused with
an error message and a clean close, a client that leaves, and the HTTP routes with preset voices."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import wave
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest

from conftest import REPO, ServerProcess

websockets = pytest.importorskip("websockets", reason="websockets not installed (serve extra)")

VOICE = "en-Tiny_man"
PATH = "/v1/audio/speech/stream"
HOP = 3200
TEXT = ("Hello there, this is a streamed test of the realtime model, spoken while an LLM is still writing "
        "the rest of its answer, a few tokens at a time.")
TEXTS = ["Hello world, one two three four five six.", "A second voice speaks here, a little longer text.",
         "Short one, but not too short."]
MAX_CHARS = 50000


@pytest.fixture(scope="module")
def server(realtime_voiced_engine_dir):
    srv = ServerProcess(["--engine-dir", realtime_voiced_engine_dir, "--threads", "1", "--max-batch", "4",
                         "--max-text-chars", MAX_CHARS]).start()
    yield srv
    assert srv.stop() == 0, srv.log()
    assert "Traceback" not in srv.log(), srv.log()


@dataclass
class Stream:
    started: dict
    frames: list = field(default_factory=list)    # the binary messages
    final: dict | None = None
    close_code: int | None = None
    first_audio: float | None = None               # time.monotonic() of the first binary message
    close_sent: float | None = None                # ... of the close message

    def audio(self, fmt: str = "pcm") -> np.ndarray:
        return np.frombuffer(b"".join(self.frames), dtype="<i2" if fmt == "pcm" else "<f4")


def ws_url(server) -> str:
    return server.url.replace("http://", "ws://") + PATH


async def stream(server, start: dict, pieces: list[str], pause: float = 0.0) -> Stream:
    """Start a request, send `pieces` one every `pause` s then close, while receiving everything."""
    async with websockets.connect(ws_url(server)) as ws:
        await ws.send(json.dumps({"type": "start", "voice": VOICE, **start}))
        result = Stream(json.loads(await ws.recv()))
        assert result.started["type"] == "started", result.started

        async def produce():
            try:
                for piece in pieces:
                    await ws.send(json.dumps({"type": "text", "text": piece}))
                    if pause:
                        await asyncio.sleep(pause)
                await ws.send(json.dumps({"type": "close"}))
                result.close_sent = time.monotonic()
            except websockets.ConnectionClosedOK:
                pass   # the request ended first (max_new_frames, or the model ended speech)

        producer = asyncio.create_task(produce())
        async for message in ws:
            if isinstance(message, bytes):
                if result.first_audio is None:
                    result.first_audio = time.monotonic()
                result.frames.append(message)
            else:
                result.final = json.loads(message)
        await producer
        result.close_code = ws.close_code
    return result


def llm_pieces(text: str, words: int = 2) -> list[str]:
    """The text as an LLM would send it: a few tokens (here `words` words) per piece."""
    parts = text.split(" ")
    return [" ".join(parts[i:i + words]) + (" " if i + words < len(parts) else "") for i in range(0, len(parts), words)]


def test_llm_like_producer_equals_text_at_once(server):
    # 101 text tokens: 20 full windows (120 frames) before the last one, which runs at the close
    options = {"seed": 4, "max_new_frames": 130}
    at_once = asyncio.run(stream(server, {**options, "text": TEXT}, []))
    pieces = llm_pieces(TEXT)
    assert "".join(pieces) == TEXT and len(pieces) > 10
    streamed = asyncio.run(stream(server, options, pieces, pause=0.05))
    for result in (at_once, streamed):
        assert result.close_code == 1000 and result.final["type"] == "done"
        assert result.started["sample_rate"] == 24000 and result.started["sample_format"] == "s16le"
        assert result.started["seed"] == 4 and result.started["frame_samples"] == HOP
        assert all(len(frame) == 2 * HOP for frame in result.frames)
        final = result.final
        assert final["frames"] == len(result.frames) == 130
        assert final["audio_seconds"] == pytest.approx(130 * HOP / 24000, abs=1e-4)
        assert 0 < final["first_audio_s"] <= final["elapsed_s"]
        assert final["first_audio_after_text_s"] >= 0 and final["text_chars"] == len(TEXT)
    assert b"".join(streamed.frames) == b"".join(at_once.frames)        # the same audio bytes
    assert streamed.final["text_tokens"] == at_once.final["text_tokens"] == 101
    assert streamed.first_audio < streamed.close_sent                    # audio while the text still streamed
    # the streamed request waited for its text (at once: only for the close message, at the last window)
    assert streamed.final["stalled_s"] > at_once.final["stalled_s"] >= 0
    assert streamed.final["first_audio_s"] < streamed.final["elapsed_s"] - 0.3


def test_concurrent_streams_equal_themselves_alone(server):
    def start(i):
        return {"seed": 10 + i, "max_new_frames": 25 + 5 * i, "format": "f32"}

    alone = [asyncio.run(stream(server, {**start(i), "text": text}, [])) for i, text in enumerate(TEXTS)]

    async def together():
        return await asyncio.gather(*(stream(server, start(i), llm_pieces(text, 1), pause=0.02)
                                      for i, text in enumerate(TEXTS)))

    for i, (got, want) in enumerate(zip(asyncio.run(together()), alone)):
        assert got.close_code == 1000 and got.started["sample_format"] == "f32le"
        assert got.final["frames"] == want.final["frames"] == 25 + 5 * i
        a, b = got.audio("f32"), want.audio("f32")
        assert a.shape == b.shape and float(np.abs(a - b).max()) <= 1e-4 * float(np.abs(b).max())


async def refused(server, messages: list) -> tuple[dict, int, list]:
    """Send `messages` (dicts as JSON, str and bytes as they are); the error message, the close code and
    everything else received."""
    others, errors = [], []
    async with websockets.connect(ws_url(server)) as ws:
        for message in messages:
            await ws.send(json.dumps(message) if isinstance(message, dict) else message)
        try:
            async for message in ws:
                item = message if isinstance(message, bytes) else json.loads(message)
                (errors if isinstance(item, dict) and item.get("type") == "error" else others).append(item)
        except websockets.ConnectionClosed:
            pass
        code = ws.close_code
    assert len(errors) == 1, (errors, others)
    return errors[0]["error"], code, others


START = {"type": "start", "voice": VOICE, "seed": 1}
BAD = {
    "not json": (["{oops"], 1008, 400, "not valid JSON"),
    "not an object": (["[1, 2]"], 1008, 400, "JSON object"),
    "unknown type": ([{"type": "speak"}], 1008, 400, "unknown message type 'speak'"),
    "no type": ([{"voice": VOICE}], 1008, 400, "unknown message type"),
    "binary": ([b"\x00\x01"], 1003, 415, "binary message"),
    "text before start": ([{"type": "text", "text": "hi"}], 1008, 400, "before start"),
    "unknown preset": ([{**START, "voice": "nobody"}], 1008, 400, "voice 'nobody': not a preset"),
    "unknown field": ([{**START, "speed": 2}], 1008, 400, "start message: speed: unknown field"),
    "bad seed": ([{**START, "seed": -3}], 1008, 400, "seed"),
    "bad format": ([{**START, "format": "mp3"}], 1008, 400, "format"),
    "text not a string": ([START, {"type": "text", "text": 5}], 1008, 400, "text message: text"),
    "start twice": ([START, START], 1008, 400, "started already"),
    "text after close": ([{**START, "text": "Hello there.", "max_new_frames": 500}, {"type": "close"},
                          {"type": "text", "text": "more"}], 1008, 400, "text message after close"),
    "empty text": ([START, {"type": "close"}], 1008, 400, "empty"),
    "oversize text": ([START, {"type": "text", "text": "a" * (MAX_CHARS + 1)}], 1008, 400,
                      f"more than the limit of {MAX_CHARS}"),
    "beyond the context": ([START, {"type": "text", "text": "word " * 9000}], 1008, 400,
                           "longer than the model's context of 8192 positions"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_messages_get_an_error_and_a_clean_close(server, case):
    messages, close_code, status, words = BAD[case]
    error, code, others = asyncio.run(refused(server, messages))
    assert code == close_code, (error, code)
    assert error["code"] == status and words.lower() in error["message"].lower(), error
    assert "\n" not in error["message"] and "Traceback" not in error["message"]
    assert not any(isinstance(item, dict) and item.get("type") == "done" for item in others)
    with httpx.Client(base_url=server.url, timeout=30) as client:   # nothing left running
        deadline = time.monotonic() + 10
        while client.get("/health").json()["active_requests"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/health").json()["active_requests"] == 0


def test_a_client_that_leaves_cancels_its_job(server):
    def cancelled() -> float:
        text = httpx.get(server.url + "/metrics", timeout=30).text
        line = next((ln for ln in text.splitlines() if ln.startswith('vv_engine_errors_total{kind="cancelled"}')), None)
        return 0.0 if line is None else float(line.rsplit(" ", 1)[1])

    before = cancelled()

    async def leave():
        async with websockets.connect(ws_url(server)) as ws:
            await ws.send(json.dumps({**START, "text": "Hello there, and then a very long pause "}))
            await ws.recv()                     # started: the request runs, waiting for the rest of its text

            async def read_all():
                async for _ in ws:
                    pass

            with pytest.raises(asyncio.TimeoutError):  # reads what comes for a while (its first frames)
                await asyncio.wait_for(read_all(), 0.3)
        # the client is gone without closing its text

    asyncio.run(leave())
    deadline = time.monotonic() + 10
    while cancelled() < before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cancelled() == before + 1
    assert httpx.get(server.url + "/health", timeout=30).json()["active_requests"] == 0


def test_http_routes_with_preset_voices(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        body = {"input": "Hello there, general.", "voice": VOICE, "seed": 7, "max_new_frames": 15,
                "response_format": "pcm"}
        spoken = client.post("/v1/audio/speech", json=body)
        assert spoken.status_code == 200 and spoken.headers["x-seed"] == "7"
        assert len(spoken.content) == 15 * HOP * 2
        socket = asyncio.run(stream(server, {"seed": 7, "max_new_frames": 15, "text": body["input"]}, []))
        assert b"".join(socket.frames) == spoken.content     # the same request over the WebSocket

        unknown = client.post("/v1/audio/speech", json={**body, "voice": "nobody"})
        assert unknown.status_code == 400 and unknown.headers["content-type"].startswith("application/json")
        assert "unknown voice 'nobody'" in unknown.json()["error"]["message"]
        two = client.post("/v1/speech/script", json={"script": "Speaker 1: Hi.\nSpeaker 2: Hello.",
                                                     "voices": [VOICE, VOICE]})
        assert two.status_code == 400 and "one preset voice" in two.json()["error"]["message"]

        voices = client.get("/v1/voices").json()["data"]
        assert [(v["id"], v["preset"]) for v in voices] == [(VOICE, True)]
        upload = client.post("/v1/voices", content=b"RIFF", headers={"content-type": "audio/wav"})
        assert upload.status_code == 501 and "vv-export voices" in upload.json()["error"]["message"]
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["voices"] == 1 and health["voice_uploads"] is False
        described = client.get(PATH).json()
        assert described["model_family"] == "vibevoice_streaming" and described["voices"] == [VOICE]
        metrics = client.get("/metrics").text
        assert "vv_time_to_first_audio_seconds_count" in metrics and "vv_frames_total" in metrics


def test_voices_dir_is_refused_for_a_realtime_engine(realtime_voiced_engine_dir, tmp_path):
    srv = ServerProcess(["--engine-dir", realtime_voiced_engine_dir, "--voices", tmp_path])
    with pytest.raises(RuntimeError, match="exited with 1"):
        srv.start()
    lines = [ln for ln in srv.log().splitlines() if ln.strip()]
    assert lines[-1].startswith("error: --voices") and "vv-export voices" in lines[-1]
    assert "Traceback" not in srv.log()


def test_decode_frames_reaches_the_realtime_engine_and_is_refused_for_vibevoice(realtime_voiced_engine_dir,
                                                                                 tiny_engine_dir):
    """vv-serve --decode-frames: the realtime engine's jobs decode in groups of at most that many frames; a
    VibeVoice ENGINE_DIR refuses the option in one line, before serving."""
    from vv_runtime.serve.engines import open_engine

    engine = open_engine(realtime_voiced_engine_dir, backend="ort", decode_frames=2)
    try:
        assert engine.pipeline.decode_frames == 2 and engine.pipeline.new_steps().decode_frames == 2
    finally:
        engine.close()
    srv = ServerProcess(["--engine-dir", tiny_engine_dir, "--decode-frames", "2"])
    with pytest.raises(RuntimeError, match="exited with 1"):
        srv.start()
    lines = [ln for ln in srv.log().splitlines() if ln.strip()]
    assert lines[-1].startswith("error: --decode-frames") and "VibeVoice-Realtime" in lines[-1]
    assert "Traceback" not in srv.log()


def test_the_example_client_streams_text_and_writes_the_wav(server, tmp_path):
    out = tmp_path / "streamed.wav"
    run = subprocess.run([sys.executable, str(REPO / "examples" / "stream_client.py"), "--url", ws_url(server),
                          "--voice", VOICE, "--text", TEXTS[1], "--seed", "3", "--max-frames", "24", "--words", "2",
                          "--every", "0.02", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "first audio" in run.stderr and "wrote" in run.stderr
    with wave.open(str(out)) as wav:
        assert wav.getframerate() == 24000 and wav.getnchannels() == 1 and wav.getsampwidth() == 2
        samples = wav.readframes(wav.getnframes())
    at_once = asyncio.run(stream(server, {"seed": 3, "max_new_frames": 24, "text": TEXTS[1]}, []))
    assert samples == b"".join(at_once.frames) and len(samples) == 24 * HOP * 2


def test_websocket_on_a_keyed_server_needs_the_key_as_header_or_subprotocol(realtime_voiced_engine_dir):
    """With --api-key, a handshake without the key is refused; the key works as `Authorization: Bearer` and, for
    browsers (which cannot set that header on a WebSocket), as the subprotocol entry `bearer.<base64url key>`
    beside `vv-stream`, which the server selects."""
    import base64

    key = "k-" + "x" * 30 + "/+?~"
    srv = ServerProcess(["--engine-dir", realtime_voiced_engine_dir, "--threads", "1", "--api-key", key]).start()
    try:
        url = ws_url(srv)

        async def speak(**connect) -> tuple[str | None, int]:
            async with websockets.connect(url, **connect) as ws:
                await ws.send(json.dumps({"type": "start", "voice": VOICE, "seed": 1, "max_new_frames": 2}))
                assert json.loads(await ws.recv())["type"] == "started"
                await ws.send(json.dumps({"type": "text", "text": "Hello there, a keyed stream."}))
                await ws.send(json.dumps({"type": "close"}))
                frames = [m async for m in ws if isinstance(m, bytes)]
                return ws.subprotocol, len(frames)

        with pytest.raises(websockets.InvalidStatus) as refused:
            asyncio.run(speak())
        assert refused.value.response.status_code == 401
        with pytest.raises(websockets.InvalidStatus):
            asyncio.run(speak(subprotocols=["vv-stream", "bearer." + base64.urlsafe_b64encode(b"wrong-key").decode().rstrip("=")]))
        protocol, frames = asyncio.run(speak(additional_headers={"Authorization": f"Bearer {key}"}))
        assert frames == 2
        token = base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")
        protocol, frames = asyncio.run(speak(subprotocols=["vv-stream", f"bearer.{token}"]))
        assert protocol == "vv-stream" and frames == 2
    finally:
        assert srv.stop() == 0, srv.log()
    assert "Traceback" not in srv.log(), srv.log()
