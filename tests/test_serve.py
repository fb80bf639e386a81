"""vv-serve end to end: real `vv-serve` processes (uvicorn on 127.0.0.1, the real SpeechEngine over the
tiny random ENGINE_DIR) driven over HTTP. Every endpoint, every kind of bad request, concurrency,
queue full, client disconnect, per-request timeout and the SIGTERM drain.

Request lengths are set by their seed: on the tiny random model seed 2 keeps speaking up to the
step limit (2x the prompt: ~1600 frames for LONG_TEXT, several seconds), seeds 0 and 1 stop after
a few dozen frames; `max_new_frames` bounds the rest.
"""

from __future__ import annotations

import io
import json
import struct
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from conftest import ServerProcess

REPO = Path(__file__).resolve().parents[1]
HOP = 3200
LONG_TEXT = "Hello there, how are you today? " * 20
LONG = {"input": LONG_TEXT, "voice": "voice_a", "seed": 2}     # ~1600 frames unless cut short


def start(engine_dir, presets, *extra) -> ServerProcess:
    return ServerProcess(["--engine-dir", engine_dir, "--voices", presets, "--threads", "1", *extra]).start()


@pytest.fixture(scope="module")
def server(random_engine_dir, presets):
    srv = start(random_engine_dir, presets, "--max-batch", "4", "--max-queue", "8", "--max-text-chars", "2000",
                "--max-voice-seconds", "5", "--max-voice-bytes", "400000")
    yield srv
    assert srv.stop() == 0, srv.log()
    assert "Traceback" not in srv.log(), srv.log()


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def speech(client, **body):
    return client.post("/v1/audio/speech", json={"input": "Hello world.", "voice": "voice_a", **body})


def metrics(client) -> dict:
    """The Prometheus text as {sample name with labels: value}."""
    text = client.get("/metrics").text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wav_samples(data: bytes) -> np.ndarray:
    """Samples of a wav (or flac) file as int16."""
    audio, rate = sf.read(io.BytesIO(data), dtype="int16")
    assert rate == 24000
    return audio


def assert_error(response, status: int, kind: str | None = None, words: str | None = None) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and "\n" not in error["message"]
    assert "Traceback" not in response.text
    if kind is not None:
        assert error["type"] == kind, error
    if words is not None:
        assert words.lower() in error["message"].lower(), error
    return error


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not reached in time")


# --- endpoints ----------------------------------------------------------------------------------------

def test_health_models_metrics_page(client):
    health = client.get("/health")
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "ok" and body["accepting"] is True and body["voices"] >= 2
    assert body["sample_rate"] == 24000
    assert client.get("/v1/models").json()["data"][0]["id"] == "vibevoice"
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "vvState" in page.text and "/v1/speech/script" in page.text
    assert "http://" not in page.text and "https://" not in page.text and "<script src" not in page.text  # no CDN
    text = client.get("/metrics").text
    for name in ("vv_queue_depth", "vv_active_rows", "vv_frames_total", "vv_frames_per_second",
                 "vv_time_to_first_audio_seconds_bucket", "vv_http_errors_total", "vv_engine_errors_total"):
        assert f"# TYPE {name.removesuffix('_bucket')}" in text, name


def test_voices_presets_and_uploads(client, tmp_path):
    listed = {v["id"]: v for v in client.get("/v1/voices").json()["data"]}
    assert listed["voice_a"]["preset"] is True and listed["voice_a"]["seconds"] == pytest.approx(2.0)
    wav = (REPO / "examples" / "voice_b.wav").read_bytes()
    up = client.post("/v1/voices", files={"file": ("b.wav", wav, "audio/wav")}, data={"name": "uploaded_b"})
    assert up.status_code == 201, up.text
    assert up.json()["id"] == "uploaded_b" and up.json()["preset"] is False
    raw = client.post("/v1/voices", content=(REPO / "examples" / "voice_a.wav").read_bytes(),
                      headers={"content-type": "audio/wav"})
    assert raw.status_code == 201, raw.text
    ids = {v["id"] for v in client.get("/v1/voices").json()["data"]}
    assert {"uploaded_b", raw.json()["id"]} <= ids
    assert up.json()["created"] is True and raw.json()["created"] is True
    # the same file again: its voice as it is (200, not encoded again), under its name or without one
    again = client.post("/v1/voices", content=(REPO / "examples" / "voice_a.wav").read_bytes(),
                        headers={"content-type": "audio/wav"})
    assert again.status_code == 200, again.text
    assert again.json()["id"] == raw.json()["id"] and again.json()["created"] is False
    again = client.post("/v1/voices", files={"file": ("b.wav", wav, "audio/wav")}, data={"name": "uploaded_b"})
    assert again.status_code == 200 and again.json()["id"] == "uploaded_b" and again.json()["created"] is False
    assert len(client.get("/v1/voices").json()["data"]) == len(ids)
    # an uploaded voice speaks like the preset with the same audio (same seed, same tokens)
    a = speech(client, voice="uploaded_b", seed=1, max_new_frames=8)
    b = speech(client, voice="voice_b", seed=1, max_new_frames=8)
    assert a.status_code == b.status_code == 200
    assert a.content == b.content
    # a name taken is refused rather than replacing another client's voice
    assert_error(client.post("/v1/voices", files={"file": ("b.wav", wav, "audio/wav")}, data={"name": "voice_a"}),
                 409, "conflict")


def test_concurrent_uploads_are_checked_and_added_together(client):
    """Uploads at once: one name is given to one voice only (the other: 409), and one file uploaded twice
    at once is encoded once (201, then 200 with the same id)."""
    import concurrent.futures

    files = [(REPO / "examples" / "voice_a.wav").read_bytes(), (REPO / "examples" / "voice_b.wav").read_bytes()]

    def upload(data, name=None):
        with httpx.Client(base_url=client.base_url, timeout=120) as c:
            return c.post("/v1/voices", files={"file": ("x.wav", data, "audio/wav")},
                          data={"name": name} if name else None)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(upload, files, ["race", "race"]))
    assert sorted(r.status_code for r in results) == [201, 409], [r.text for r in results]
    winner = next(r for r in results if r.status_code == 201)
    a = speech(client, voice="race", seed=1, max_new_frames=4)
    b = speech(client, voice="voice_a" if winner is results[0] else "voice_b", seed=1, max_new_frames=4)
    assert a.content == b.content                    # the voice named "race" is the winner's, not replaced

    fresh = _long_wav(1.0)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(upload, [fresh, fresh]))
    assert sorted(r.status_code for r in results) == [200, 201], [r.text for r in results]
    assert results[0].json()["id"] == results[1].json()["id"]


def test_formats_whole_and_streamed_are_the_same_audio(client):
    body = {"seed": 1, "max_new_frames": 12}
    wav = speech(client, response_format="wav", **body)
    assert wav.status_code == 200 and wav.headers["content-type"] == "audio/wav"
    frames = int(wav.headers["x-frames"])
    samples = wav_samples(wav.content)
    assert frames > 0 and samples.shape[0] == frames * HOP
    assert float(wav.headers["x-first-audio-seconds"]) > 0 and wav.headers["x-seed"] == "1"
    pcm = speech(client, response_format="pcm", **body)
    assert np.array_equal(np.frombuffer(pcm.content, "<i2"), samples)
    flac = speech(client, response_format="flac", **body)
    assert flac.headers["content-type"] == "audio/flac"
    assert np.array_equal(wav_samples(flac.content), samples)  # lossless
    # streamed: chunked, no length; the same samples
    for fmt in ("wav", "pcm"):
        with client.stream("POST", "/v1/audio/speech",
                           json={"input": "Hello world.", "voice": "voice_a", "response_format": fmt,
                                 "stream": True, **body}) as streamed:
            assert streamed.status_code == 200
            assert streamed.headers.get("transfer-encoding") == "chunked"
            assert "content-length" not in streamed.headers
            data = b"".join(streamed.iter_bytes())
        if fmt == "wav":
            riff, size = struct.unpack("<4sI", data[:8])
            assert riff == b"RIFF" and size == 0xFFFFFFFF    # length unknown when the header is sent
            assert np.array_equal(wav_samples(data), samples)
        else:
            assert np.array_equal(np.frombuffer(data, "<i2"), samples)
    # stream_format "audio" (OpenAI's name) streams too
    with client.stream("POST", "/v1/audio/speech", json={"input": "Hello world.", "voice": "voice_a",
                                                         "stream_format": "audio", **body}) as streamed:
        assert streamed.headers.get("transfer-encoding") == "chunked"
        assert np.array_equal(wav_samples(b"".join(streamed.iter_bytes())), samples)


def test_script_endpoint_two_speakers(client):
    script = "Speaker 1: Hello there.\nSpeaker 2: Hi, nice to meet you."
    r = client.post("/v1/speech/script", json={"script": script, "voices": ["voice_a", "voice_b"], "seed": 1,
                                               "max_new_frames": 10})
    assert r.status_code == 200, r.text
    assert wav_samples(r.content).shape[0] == int(r.headers["x-frames"]) * HOP > 0
    # plain text = one speaker; a text ending in .txt is text, not a file on the server
    r = client.post("/v1/speech/script", json={"script": "read /etc/hosts.txt", "voices": ["voice_a"],
                                               "seed": 1, "max_new_frames": 4, "response_format": "pcm"})
    assert r.status_code == 200, r.text
    assert_error(client.post("/v1/speech/script", json={"script": script, "voices": ["voice_a"]}), 400,
                 "invalid_request_error", "2 speakers")


# --- bad requests -------------------------------------------------------------------------------------

def _not_audio() -> bytes:
    return b"this is not a sound file at all" * 10


def _long_wav(seconds: float) -> bytes:
    buffer = io.BytesIO()
    t = np.arange(int(seconds * 24000)) / 24000
    sf.write(buffer, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 24000, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


BAD = {
    "bad json": (lambda c: c.post("/v1/audio/speech", content=b'{"input": "hi", ', headers={"content-type": "application/json"}),
                 400, "invalid_request_error", "not valid JSON"),
    "not an object": (lambda c: c.post("/v1/audio/speech", json=["hi"]), 400, "invalid_request_error", "JSON object"),
    "empty body": (lambda c: c.post("/v1/audio/speech", content=b""), 400, "invalid_request_error", "empty"),
    "missing input": (lambda c: c.post("/v1/audio/speech", json={"voice": "voice_a"}), 400, "invalid_request_error",
                      "input: required"),
    "unknown voice": (lambda c: speech(c, voice="nobody"), 400, "invalid_request_error", "unknown voice"),
    "empty input": (lambda c: speech(c, input="   "), 400, "invalid_request_error", "empty"),
    "too long input": (lambda c: speech(c, input="word " * 500), 400, "invalid_request_error", "limit of 2000"),
    "bad format": (lambda c: speech(c, response_format="mp3"), 400, "invalid_request_error", "response_format"),
    "streamed flac": (lambda c: speech(c, response_format="flac", stream=True), 400, "invalid_request_error",
                      "cannot be streamed"),
    "unknown field": (lambda c: speech(c, temperature=0.5), 400, "invalid_request_error", "unknown field"),
    "speed": (lambda c: speech(c, speed=1.5), 400, "invalid_request_error", "speed"),
    "speed out of range": (lambda c: speech(c, speed=9), 400, "invalid_request_error", "speed"),
    "negative seed": (lambda c: speech(c, seed=-1), 400, "invalid_request_error", "seed"),
    "bad cfg": (lambda c: speech(c, cfg_scale=0), 400, "invalid_request_error", "cfg_scale"),
    "bad max frames": (lambda c: speech(c, max_new_frames=0), 400, "invalid_request_error", "max_new_frames"),
    "script not text": (lambda c: c.post("/v1/speech/script", json={"script": 5, "voices": []}), 400,
                        "invalid_request_error", "script"),
    "script bad line": (lambda c: c.post("/v1/speech/script", json={"script": "Speaker 1: hi\nnot a speaker line",
                                                                     "voices": ["voice_a"]}),
                        400, "invalid_request_error", "Speaker N"),
    "script unknown voice": (lambda c: c.post("/v1/speech/script", json={"script": "Speaker 1: hi",
                                                                          "voices": ["nobody"]}),
                             400, "invalid_request_error", "unknown voice"),
    "unknown route": (lambda c: c.get("/v2/everything"), 404, "not_found", "no such route"),
    "wrong method": (lambda c: c.get("/v1/audio/speech"), 405, "method_not_allowed", None),
    "voice not audio": (lambda c: c.post("/v1/voices", files={"file": ("x.wav", _not_audio(), "audio/wav")}),
                        400, "invalid_request_error", "not a sound file"),
    "voice raw not audio": (lambda c: c.post("/v1/voices", content=_not_audio(), headers={"content-type": "audio/wav"}),
                            400, "invalid_request_error", "not a sound file"),
    "voice empty": (lambda c: c.post("/v1/voices", content=b"", headers={"content-type": "audio/wav"}),
                    400, "invalid_request_error", "empty"),
    "voice too many bytes": (lambda c: c.post("/v1/voices", content=b"\0" * 400_001,
                                              headers={"content-type": "audio/wav"}), 413, "too_large", "limit"),
    "voice too large multipart": (lambda c: c.post("/v1/voices", files={"file": ("x.wav", b"\0" * 1_500_000)}),
                                  413, "too_large", "limit"),
    "voice too long": (lambda c: c.post("/v1/voices", files={"file": ("long.wav", _long_wav(6.0), "audio/wav")}),
                       413, "too_large", "longer than the limit of 5 s"),
    "voice no file part": (lambda c: c.post("/v1/voices", files={"other": ("x.wav", b"abc")}), 400,
                           "invalid_request_error", "'file'"),
    "voice bad name": (lambda c: c.post("/v1/voices", files={"file": ("b.wav", (REPO / "examples" / "voice_b.wav")
                                                                      .read_bytes(), "audio/wav")},
                                        data={"name": "../../etc/x"}), 400, "invalid_request_error", "voice name"),
    "voice json": (lambda c: c.post("/v1/voices", json={"file": "x"}), 400, "invalid_request_error", "multipart"),
    "deeply nested json": (lambda c: raw_json(c, "/v1/audio/speech", b'{"input": ' + b"[" * 100_000 + b"]" * 100_000
                                              + b', "voice": "voice_a"}'), 400, "invalid_request_error", "nested"),
    "deeply nested object": (lambda c: raw_json(c, "/v1/speech/script", b'{"a":' * 50_000 + b"1" + b"}" * 50_000),
                             400, "invalid_request_error", "nested"),
    "lone surrogate input": (lambda c: raw_json(c, "/v1/audio/speech", rb'{"input": "hi \ud800", "voice": "voice_a"}'),
                             400, "invalid_request_error", "input: not valid unicode"),
    "lone surrogate script": (lambda c: raw_json(c, "/v1/speech/script",
                                                 rb'{"script": "Speaker 1: \udfff", "voices": ["voice_a"]}'),
                              400, "invalid_request_error", "script: not valid unicode"),
    "lone surrogate voice": (lambda c: raw_json(c, "/v1/audio/speech", rb'{"input": "hi", "voice": "\ud800"}'),
                             400, "invalid_request_error", "unknown voice"),
}


def raw_json(client, path: str, body: bytes):
    return client.post(path, content=body, headers={"content-type": "application/json"})


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_request_is_a_json_4xx(client, server, case):
    send, status, kind, words = BAD[case]
    assert_error(send(client), status, kind, words)
    assert "Traceback" not in server.log(), server.log()[-3000:]


def test_engine_errors_map_to_statuses():
    """The request errors the engine raises, by class: capacity before the generic input error."""
    from vv_runtime.errors import BackendFault, CapacityError, RuntimeInputError
    from vv_runtime.serve.errors import http_error as _engine_error
    from vv_runtime.service_engine import EngineStopped

    assert _engine_error(CapacityError("prompt is 9000 tokens,\n longer than the context")) == (
        503, "prompt is 9000 tokens, longer than the context", "capacity")
    status, message, kind = _engine_error(BackendFault("TensorRT execution failed: out of memory"))
    assert (status, kind) == (500, "backend_error") and "out of memory" in message and "\n" not in message
    assert _engine_error(RuntimeInputError("bad line")) == (400, "bad line", "invalid_request_error")
    assert _engine_error(TimeoutError("late"))[:3:2] == (504, "timeout")
    assert _engine_error(EngineStopped("stopped"))[::2] == (503, "unavailable")
    assert _engine_error(ValueError("x")) == (500, "internal error (ValueError)", "internal_error")


def test_one_table_from_exception_to_status():
    """Every row of the table can answer (none comes after one of its base classes), and the refusals
    of admission have their status and type."""
    from vv_runtime.serve.errors import ERRORS_BY_EXCEPTION, http_error
    from vv_runtime.service_engine import Cancelled, QueueFull

    classes = [row[0] for row in ERRORS_BY_EXCEPTION]
    for i, error_class in enumerate(classes):
        assert not any(issubclass(error_class, earlier) for earlier in classes[:i]), error_class
    assert http_error(QueueFull("the queue holds 8 requests")) == (
        429, "busy: the queue holds 8 requests; retry later", "queue_full")
    assert http_error(Cancelled("request req-1 cancelled")) == (503, "request req-1 cancelled", "cancelled")


def test_bad_requests_do_not_disturb_others(client):
    """Bad requests sent while good ones stream: the good ones complete with the same audio as alone."""
    body = {"seed": 0, "max_new_frames": 30, "response_format": "pcm"}
    alone = speech(client, **body).content
    results, bad = [], []

    def good():
        with httpx.Client(base_url=client.base_url, timeout=120) as c:
            results.append(speech(c, **body).content)

    threads = [threading.Thread(target=good) for _ in range(2)]
    for t in threads:
        t.start()
    for case in ("bad json", "unknown voice", "too long input", "voice not audio"):
        send, status, _, _ = BAD[case]
        bad.append(send(client).status_code)
    for t in threads:
        t.join(120)
    assert bad == [400, 400, 400, 400]
    assert results == [alone, alone]
    assert client.get("/health").json()["status"] == "ok"


# --- concurrency --------------------------------------------------------------------------------------

def test_concurrent_requests_all_complete(client):
    """Six requests at once (streamed and whole, two endpoints): each is complete and equals itself alone."""
    jobs = []
    for i in range(6):
        body = {"input": f"Request number {i}.", "voice": "voice_a" if i % 2 else "voice_b", "seed": i % 2,
                "max_new_frames": 10 + 4 * i, "response_format": "pcm", "stream": i % 3 == 0}
        jobs.append(body)
    out: dict[int, tuple] = {}

    def run(i):
        with httpx.Client(base_url=client.base_url, timeout=120) as c:
            if jobs[i]["stream"]:
                with c.stream("POST", "/v1/audio/speech", json=jobs[i]) as r:
                    out[i] = (r.status_code, b"".join(r.iter_bytes()), None)
            else:
                r = c.post("/v1/audio/speech", json=jobs[i])
                out[i] = (r.status_code, r.content, int(r.headers["x-frames"]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert sorted(out) == list(range(6))
    for i, (status, data, frames) in out.items():
        assert status == 200
        assert len(data) % (2 * HOP) == 0 and len(data) > 0
        if frames is not None:
            assert len(data) == frames * HOP * 2
        alone = client.post("/v1/audio/speech", json={**jobs[i], "stream": False})
        assert alone.content == data, f"request {i} differs from the same request alone"
        assert len(data) // (2 * HOP) <= jobs[i]["max_new_frames"]


# --- disconnect, queue, timeout, drain ----------------------------------------------------------------

def test_client_disconnect_frees_its_rows(client):
    before = metrics(client)
    with httpx.Client(base_url=client.base_url, timeout=120) as c:
        with c.stream("POST", "/v1/audio/speech", json={**LONG, "stream": True, "response_format": "pcm"}) as r:
            assert r.status_code == 200
            chunks = r.iter_raw()          # (an iterator dropped unfinished closes the connection)
            assert len(next(chunks)) > 0
            assert metrics(client)["vv_active_requests"] == 1
        # leaving the blocks closes the connection mid-stream
    wait_for(lambda: metrics(client)["vv_active_requests"] == 0, timeout=20)
    after = metrics(client)
    assert after["vv_client_disconnects_total"] == before["vv_client_disconnects_total"] + 1
    assert after['vv_engine_errors_total{kind="cancelled"}'] == before.get('vv_engine_errors_total{kind="cancelled"}',
                                                                          0) + 1
    made = after["vv_frames_total"] - before["vv_frames_total"]
    assert made < 800, f"{made} frames made for a request abandoned after its first (it would make ~1600)"
    time.sleep(0.5)
    assert metrics(client)["vv_frames_total"] == after["vv_frames_total"]   # nothing runs any more


def test_queue_full_gets_429(random_engine_dir, presets):
    srv = start(random_engine_dir, presets, "--max-batch", "1", "--max-queue", "1")
    try:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            long = {**LONG, "stream": True, "response_format": "pcm"}
            with c.stream("POST", "/v1/audio/speech", json=long) as active:
                chunks = active.iter_raw()
                next(chunks)                                         # A generates
                queued = {}

                def second():
                    with httpx.Client(base_url=srv.url, timeout=120) as c2:
                        with c2.stream("POST", "/v1/audio/speech", json=long) as r:
                            queued["status"] = r.status_code     # B waits in the queue, then is dropped
                worker = threading.Thread(target=second)
                worker.start()
                wait_for(lambda: metrics(c)["vv_queue_depth"] == 1)
                refused = speech(c, seed=0, max_new_frames=2)         # C: the queue is full
                error = assert_error(refused, 429, "queue_full", "retry")
                assert int(refused.headers["retry-after"]) >= 1
                assert "queue" in error["message"]
                # leaving closes A; B then starts and is closed by its thread once its first audio comes
            worker.join(120)
            assert queued["status"] == 200
            wait_for(lambda: metrics(c)["vv_active_requests"] + metrics(c)["vv_queue_depth"] == 0, timeout=60)
            ok = speech(c, seed=0, max_new_frames=2)
            assert ok.status_code == 200
    finally:
        assert srv.stop() == 0
    assert "Traceback" not in srv.log(), srv.log()


def test_timeout_and_sigterm_drain(random_engine_dir, presets):
    srv = start(random_engine_dir, presets, "--request-timeout", "4")
    try:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            # past its timeout a whole request is a JSON 504; the engine cancels it
            started = time.monotonic()
            late = c.post("/v1/audio/speech", json=LONG)
            assert_error(late, 504, "timeout", "timeout")
            assert time.monotonic() - started < 60
            assert metrics(c)['vv_engine_errors_total{kind="timeout"}'] == 1
            # streamed, the audio flows until the deadline, then the connection is cut without the final
            # chunk: the client sees a truncated response, never a short one that looks complete
            received = 0
            with c.stream("POST", "/v1/audio/speech", json={**LONG, "stream": True, "response_format": "pcm"}) as r:
                assert r.status_code == 200
                with pytest.raises(httpx.RemoteProtocolError):
                    for data in r.iter_bytes():
                        received += len(data)
            assert received > 0 and received % (2 * HOP) == 0
            assert metrics(c)['vv_engine_errors_total{kind="timeout"}'] == 2
            assert metrics(c)['vv_http_errors_total{type="timeout"}'] == 2
        assert srv.stop() == 0
    finally:
        srv.kill()
    assert "Traceback" not in srv.log(), srv.log()

    # SIGTERM while a request streams: it completes, new requests are refused, exit 0 (a server without the
    # short deadline above: the request in flight must not meet it however slow the machine)
    srv = start(random_engine_dir, presets)
    try:
        got: dict = {}
        body = {"input": LONG_TEXT, "voice": "voice_a", "seed": 2, "max_new_frames": 150,
                "stream": True, "response_format": "pcm"}

        def in_flight():
            with httpx.Client(base_url=srv.url, timeout=120) as c2:
                with c2.stream("POST", "/v1/audio/speech", json=body) as r:
                    chunks = r.iter_raw()
                    got["first"] = next(chunks)
                    got["rest"] = b"".join(chunks)
                    got["status"] = r.status_code

        worker = threading.Thread(target=in_flight)
        worker.start()
        wait_for(lambda: "first" in got, timeout=60)
        srv.terminate()
        wait_for(lambda: "draining" in srv.log() or srv.proc.poll() is not None, timeout=10)
        try:
            refused = httpx.post(srv.url + "/v1/audio/speech",
                                 json={"input": "hi", "voice": "voice_a", "max_new_frames": 2}, timeout=30)
            assert_error(refused, 503, "unavailable")
            assert refused.headers["retry-after"]
        except httpx.ConnectError:
            pass                                              # the socket is closed already: refused too
        worker.join(120)
        assert got["status"] == 200
        data = got["first"] + got["rest"]
        alone_frames = 150
        assert 0 < len(data) <= alone_frames * HOP * 2 and len(data) % (2 * HOP) == 0
        assert srv.wait(60) == 0
    finally:
        srv.kill()
    log = srv.log()
    assert "Traceback" not in log, log
    assert "vv-serve: stopped" in log


def test_client_that_stops_reading_is_cut_off(random_engine_dir, presets):
    """A client that sends a streamed request and never reads: once a write blocks for --write-timeout
    its request is cancelled (rows freed) and its connection aborted; others are served, and SIGTERM
    then exits at once (nothing waits on the stuck connection)."""
    import socket

    srv = start(random_engine_dir, presets, "--write-timeout", "0.5", "--request-timeout", "600")
    stuck = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)     # a tiny window: writes block soon
        host, port = srv.url.removeprefix("http://").rsplit(":", 1)
        stuck.connect((host, int(port)))
        body = json.dumps({**LONG, "stream": True, "response_format": "pcm"}).encode()
        stuck.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body) + body)       # ~10 MB of audio, never read
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            wait_for(lambda: metrics(c).get('vv_http_errors_total{type="write_timeout"}') == 1, timeout=120)
            wait_for(lambda: metrics(c)["vv_active_rows"] == metrics(c)["vv_active_requests"] == 0, timeout=20)
            after = metrics(c)
            assert after["vv_client_disconnects_total"] == 1
            assert after["vv_frames_total"] < 1500          # cut short, not generated to its end
            assert c.get("/health").json()["active_rows"] == 0
            assert speech(c, seed=0, max_new_frames=2).status_code == 200      # the others go on
        started = time.monotonic()
        srv.terminate()
        assert srv.wait(30) == 0
        assert time.monotonic() - started < 15, "shutdown waited on the client that stopped reading"
    finally:
        stuck.close()
        srv.kill()
    log = srv.log()
    assert "Traceback" not in log, log
    assert "vv-serve: stopped" in log


def test_uploads_off(random_engine_dir, presets):
    """--no-voice-uploads (always so under --ray): POST /v1/voices is a JSON 501, /health says so, presets speak."""
    srv = start(random_engine_dir, presets, "--no-voice-uploads")
    try:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            wav = (REPO / "examples" / "voice_b.wav").read_bytes()
            assert_error(c.post("/v1/voices", files={"file": ("b.wav", wav, "audio/wav")}), 501, "not_supported",
                         "--voices DIR")
            health = c.get("/health").json()
            assert health["voice_uploads"] is False and health["voices"] == 2
            assert speech(c, seed=0, max_new_frames=2).status_code == 200
    finally:
        assert srv.stop() == 0
    assert "Traceback" not in srv.log()


def test_graceful_timeout_and_abort_helpers():
    from types import SimpleNamespace

    from vv_runtime.serve.app import Limits
    from vv_runtime.serve.cli import abort_connection, graceful_timeout

    assert graceful_timeout(Limits(request_timeout_s=300.0, write_timeout_s=30.0)) == 370
    assert graceful_timeout(Limits(request_timeout_s=None)) is None
    aborted = []
    transport = SimpleNamespace(abort=lambda: aborted.append(1))
    server = SimpleNamespace(server_state=SimpleNamespace(connections=[
        SimpleNamespace(client=("127.0.0.1", 5000), transport=transport)]))
    assert abort_connection(server, ("127.0.0.1", 4999)) is False and not aborted
    assert abort_connection(server, None) is False
    assert abort_connection(server, ["127.0.0.1", 5000]) is True and aborted == [1]


def test_drained_request_is_complete(random_engine_dir, presets):
    """The request in flight at SIGTERM gets all its audio: the same bytes as without the SIGTERM."""
    body = {"input": "Hello world.", "voice": "voice_a", "seed": 2, "max_new_frames": 120, "response_format": "pcm",
            "stream": True}
    srv = start(random_engine_dir, presets)
    try:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            with c.stream("POST", "/v1/audio/speech", json=body) as r:
                reference = b"".join(r.iter_bytes())
            with c.stream("POST", "/v1/audio/speech", json=body) as r:
                chunks = r.iter_bytes()
                first = next(chunks)
                srv.terminate()
                drained = first + b"".join(chunks)
        assert drained == reference and len(reference) > 0
        assert srv.wait(60) == 0
    finally:
        srv.kill()
    assert "Traceback" not in srv.log()


# --- the command line ---------------------------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["--engine-dir", "/nonexistent/engines"], "not a directory"),
    (["--engine-dir", "{engine}", "--voices", "/nonexistent/voices"], "not a directory"),
    (["--engine-dir", "{engine}", "--max-batch", "0"], "max-batch"),
    (["--engine-dir", "{engine}", "--port", "70000"], "port"),
    (["--engine-dir", "{engine}", "--replicas", "2"], "--ray"),
    (["--engine-dir", "{engine}", "--voices", "{bad_voices}"], "voice"),
])
def test_cli_errors_are_one_line(random_engine_dir, tmp_path, args, words):
    import subprocess
    import sys

    bad_voices = tmp_path / "bad_voices"
    bad_voices.mkdir()
    (bad_voices / "broken.wav").write_bytes(b"not audio")
    args = [a.format(engine=random_engine_dir, bad_voices=bad_voices) for a in args]
    result = subprocess.run([sys.executable, "-m", "vv_runtime.serve", *args, "--port", "0"] if "--port" not in args
                            else [sys.executable, "-m", "vv_runtime.serve", *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert words.lower() in lines[0].lower()
    assert "Traceback" not in result.stderr


def test_port_in_use_is_one_line(random_engine_dir, server):
    import subprocess
    import sys

    port = server.url.rsplit(":", 1)[1]
    result = subprocess.run([sys.executable, "-m", "vv_runtime.serve", "--engine-dir", str(random_engine_dir),
                             "--port", port], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: cannot listen on 127.0.0.1:" + port)
    assert len(result.stderr.strip().splitlines()) == 1


# --- the load test ------------------------------------------------------------------------------------

def test_bench_serve_small_run(random_engine_dir, presets):
    """benchmarks/bench_serve.py against a real server, briefly: every request complete, figures present."""
    from conftest import load_benchmark

    bench = load_benchmark("bench_serve")
    lines = []
    model = bench.bench_model("tiny", random_engine_dir, [1, 2], 1, 4, 1, presets, lines.append)
    assert model["server_exit_status"] == 0
    assert [e["clients"] for e in model["levels"]] == [1, 2]
    for entry in model["levels"]:
        assert entry["failed"] == entry["lost"] == entry["incomplete"] == entry["differ_from_alone"] == 0
        assert entry["requests"] == entry["clients"] and entry["audio_seconds"] > 0
        assert 0 < entry["ttfa_p50_s"] <= entry["ttfa_p95_s"]
        assert entry["server"]["engine_errors"] == {} and entry["server"]["ttfa_observed"] == entry["requests"]
    assert model["levels"][0]["ratio_to_one_at_a_time"] == 1.0
    assert bench.percentile([3.0, 1.0, 2.0], 50) == 2.0 and bench.percentile([], 95) is None


def test_serve_package_imports_no_exporter_or_torch():
    import subprocess
    import sys

    code = ("import sys, vv_runtime.serve, vv_runtime.serve.cli, vv_runtime.pipeline; "
            "print(sorted(m for m in ('torch', 'transformers', 'vv_export') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
