"""vv-serve fit to expose: real `vv-serve` processes on 127.0.0.1 (the tiny random ENGINE_DIR) driven over
HTTP and raw sockets, as a careless client, a browser page of another site and an attacker would.

API keys (from a keys file, the environment and --api-key), origins and Host names, voices owned by the
key that uploaded them (with a memory budget and DELETE), slow and idle clients (header and body
deadlines, the connection cap, a SIGTERM that ends half-sent requests), bad input that is never a 500,
strict request types, and OpenAI's streaming (by default, SSE events, the official SDK).
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from conftest import ServerProcess
from test_serve_browser import browser, wait_js  # noqa: F401 -- headless Chromium, as the page's own test

REPO = Path(__file__).resolve().parents[1]
KEY_A, KEY_B, KEY_C = "key-a-0123456789abcdef", "key-b-0123456789abcdef", "key-c-0123456789abcdef"
KEY_ENV = "key-env-0123456789abcdef"
APP_ORIGIN = "http://app.example:3000"
BUDGET_MIB = 0.5
LONG_TEXT = "Hello there, how are you today? " * 20


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def start(engine_dir, presets, *extra, env: dict | None = None) -> ServerProcess:
    return ServerProcess(["--engine-dir", engine_dir, "--voices", presets, "--threads", "1", *extra],
                         env=env).start()


@pytest.fixture(scope="module")
def keyed(random_engine_dir, presets, tmp_path_factory):
    """Keys A, B, C from a keys file and one from the environment; one allowed page origin and host name;
    a voice memory budget of 0.5 MiB per key."""
    keys_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys_file.write_text(f"# the service's keys\n{KEY_A}\n\n{KEY_B}\n{KEY_C}\n")
    env = {**os.environ, "VV_SERVE_API_KEYS": KEY_ENV}
    srv = start(random_engine_dir, presets, "--api-keys-file", keys_file, "--allow-origin", APP_ORIGIN,
                "--allow-host", "tts.example", "--voice-memory-budget", str(BUDGET_MIB), env=env)
    yield srv
    assert srv.stop() == 0, srv.log()
    assert "Traceback" not in srv.log(), srv.log()


@pytest.fixture(scope="module")
def open_server(random_engine_dir, presets):
    """No keys (loopback), default origins and host names."""
    srv = start(random_engine_dir, presets, "--max-voice-seconds", "12")
    yield srv
    assert srv.stop() == 0, srv.log()
    assert "Traceback" not in srv.log(), srv.log()


def assert_error(response, status: int, kind: str | None = None, words: str | None = None,
                 param: str | None = None) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    error = response.json()["error"]
    assert error["code"] == status and "\n" not in error["message"] and "Traceback" not in response.text
    if kind is not None:
        assert error["type"] == kind, error
    if words is not None:
        assert words.lower() in error["message"].lower(), error
    if param is not None:
        assert error["param"] == param, error
    return error


def metrics(url: str, key: str | None = None) -> dict:
    text = httpx.get(url + "/metrics", headers=auth(key) if key else None, timeout=30).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def tone(freq: float, seconds: float = 2.0, rate: int = 24000) -> bytes:
    buffer = io.BytesIO()
    t = np.arange(int(seconds * rate)) / rate
    sf.write(buffer, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def upload(url: str, key: str | None, data: bytes, name: str | None = None):
    return httpx.post(url + "/v1/voices", headers=auth(key) if key else None, timeout=120,
                      files={"file": ("v.wav", data, "audio/wav")}, data={"name": name} if name else None)


def voice_ids(url: str, key: str | None) -> set:
    r = httpx.get(url + "/v1/voices", headers=auth(key) if key else None, timeout=30)
    assert r.status_code == 200, r.text
    return {v["id"] for v in r.json()["data"]}


def speak(url: str, key: str | None, **body):
    payload = {"input": "Hello world.", "voice": "voice_a", "seed": 1, "max_new_frames": 3, **body}
    return httpx.post(url + "/v1/audio/speech", json=payload, headers=auth(key) if key else None, timeout=120)


def address(srv: ServerProcess) -> tuple[str, int]:
    host, port = srv.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def raw_socket(srv: ServerProcess, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(address(srv), timeout=timeout)
    return sock


def read_all(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection (or `timeout`)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            part = sock.recv(65536)
            if not part:
                break
            data += part
    except (socket.timeout, ConnectionResetError):
        pass
    return data


def parse_response(data: bytes) -> tuple[int, dict, bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
    return status, headers, body


# --- API keys -----------------------------------------------------------------------------------------

def test_keys_are_required_on_v1_and_metrics(keyed):
    url = keyed.url
    for path in ("/v1/voices", "/v1/models", "/metrics"):
        missing = httpx.get(url + path, timeout=30)
        assert_error(missing, 401, "authentication_error", "api key")
        assert missing.headers["www-authenticate"].startswith("Bearer")
        assert_error(httpx.get(url + path, headers=auth("key-z-0123456789abcdef"), timeout=30), 401,
                     "authentication_error", "not one of")
        assert_error(httpx.get(url + path, headers={"Authorization": f"Basic {KEY_A}"}, timeout=30), 401)
        assert_error(httpx.get(url + path, headers={"Authorization": "Bearer"}, timeout=30), 401)
        for key in (KEY_A, KEY_B, KEY_ENV):                        # the keys file and the environment
            assert httpx.get(url + path, headers=auth(key), timeout=30).status_code == 200, (path, key)
    # a speech request without a key makes no audio
    before = metrics(url, KEY_A)["vv_frames_total"]
    assert_error(httpx.post(url + "/v1/audio/speech", json={"input": "hi", "voice": "voice_a"}, timeout=30), 401)
    assert metrics(url, KEY_A)["vv_frames_total"] == before
    assert speak(url, KEY_B).status_code == 200
    # open: the health check, the page, the OpenAPI document (which names the bearer scheme)
    health = httpx.get(url + "/health", timeout=30)
    assert health.status_code == 200 and health.json()["api_key_required"] is True
    assert httpx.get(url + "/", timeout=30).status_code == 200
    document = httpx.get(url + "/openapi.json", timeout=30).json()
    assert document["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    assert document["paths"]["/v1/audio/speech"]["post"]["security"] == [{"apiKey": []}]
    assert "security" not in document["paths"]["/health"]["get"]
    assert "invalid_token" in httpx.get(url + "/v1/voices", headers=auth("x" * 20), timeout=30).headers[
        "www-authenticate"]
    assert KEY_A not in keyed.log() and KEY_ENV not in keyed.log()


def test_no_key_keeps_loopback_working(open_server):
    assert httpx.get(open_server.url + "/health", timeout=30).json()["api_key_required"] is False
    assert speak(open_server.url, None).status_code == 200
    # a client that sends a key anyway (e.g. an SDK that always does) is served as well
    assert speak(open_server.url, "anything-at-all-here").status_code == 200


@pytest.mark.parametrize("args, env, words", [
    (["--host", "0.0.0.0"], {}, "not a loopback address and no api key"),
    (["--host", "::"], {}, "not a loopback address"),
    (["--api-key", "short"], {}, "16 to 512"),
    (["--api-keys-file", "/nonexistent/keys.txt"], {}, "keys file"),
    (["--allow-origin", "app.example.com"], {}, "scheme://host"),
    (["--host", "0.0.0.0"], {"VV_SERVE_API_KEYS": "too short"}, "16 to 512"),
])
def test_refusals_at_start_are_one_line(random_engine_dir, args, env, words):
    result = subprocess.run([sys.executable, "-m", "vv_runtime.serve", "--engine-dir", str(random_engine_dir),
                             "--port", "0", *args], capture_output=True, text=True, timeout=120,
                            env={**os.environ, **env})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert words.lower() in lines[0].lower()
    assert "vv-serve: listening" not in result.stdout


def test_env_key_and_command_line_key(random_engine_dir, presets):
    """--api-key (repeatable) alone; the environment's keys are used when no --api-key is given."""
    srv = start(random_engine_dir, presets, "--api-key", KEY_A, "--api-key", KEY_B)
    try:
        assert speak(srv.url, KEY_A).status_code == speak(srv.url, KEY_B).status_code == 200
        assert_error(speak(srv.url, None), 401)
        assert "2 API keys" in srv.log()
    finally:
        assert srv.stop() == 0


# --- origins, content types, hosts --------------------------------------------------------------------

def test_cross_origin_requests_are_refused(open_server, keyed):
    url = open_server.url
    evil = {"Origin": "http://evil.example"}
    before = metrics(url)
    # a "simple request" a page anywhere could send without a preflight: text/plain POST, multipart upload
    simple = httpx.post(url + "/v1/audio/speech", headers={**evil, "Content-Type": "text/plain"}, timeout=30,
                        content=json.dumps({"input": "hi", "voice": "voice_a"}))
    assert_error(simple, 403, "permission_error", "origin 'http://evil.example'")
    assert simple.headers.get("connection") == "close" and "access-control-allow-origin" not in simple.headers
    ids = voice_ids(url, None)
    assert_error(httpx.post(url + "/v1/voices", headers=evil, timeout=30,
                            files={"file": ("x.wav", tone(500), "audio/wav")}, data={"name": "planted"}), 403)
    assert_error(httpx.delete(url + "/v1/voices/x", headers=evil, timeout=30), 403)
    assert_error(httpx.get(url + "/v1/voices", headers={"Origin": "null"}, timeout=30), 403)   # sandboxed page
    assert voice_ids(url, None) == ids
    after = metrics(url)
    assert after["vv_frames_total"] == before["vv_frames_total"]
    assert after['vv_http_errors_total{type="permission_error"}'] >= before.get(
        'vv_http_errors_total{type="permission_error"}', 0) + 4
    # the service's own page (same host and port) is served
    own = {"Origin": url}
    assert httpx.post(url + "/v1/audio/speech", headers=own, timeout=120,
                      json={"input": "hi", "voice": "voice_a", "seed": 1, "max_new_frames": 2}).status_code == 200
    # a JSON endpoint takes JSON only (no text/plain "simple request", no form, no content type at all)
    body = json.dumps({"input": "hi", "voice": "voice_a"})
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"Content-Type": content_type} if content_type else {}
        assert_error(httpx.post(url + "/v1/audio/speech", content=body, headers=headers, timeout=30), 415,
                     "unsupported_media_type", "application/json")
    assert_error(httpx.post(url + "/v1/speech/script", content=body, timeout=30), 415)


def test_allowed_origin_gets_cors(keyed):
    url = keyed.url
    preflight = httpx.options(url + "/v1/audio/speech", timeout=30, headers={
        "Origin": APP_ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 204, preflight.text
    assert preflight.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "authorization" in preflight.headers["access-control-allow-headers"]
    assert "POST" in preflight.headers["access-control-allow-methods"]
    r = httpx.post(url + "/v1/audio/speech", headers={**auth(KEY_A), "Origin": APP_ORIGIN}, timeout=120,
                   json={"input": "hi", "voice": "voice_a", "seed": 1, "max_new_frames": 2})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "x-request-id" in r.headers["access-control-expose-headers"]
    # the allowed page without a key: a 401 it can read
    denied = httpx.get(url + "/v1/voices", headers={"Origin": APP_ORIGIN}, timeout=30)
    assert_error(denied, 401)
    assert denied.headers["access-control-allow-origin"] == APP_ORIGIN
    # another origin still is not
    assert_error(httpx.options(url + "/v1/audio/speech", timeout=30, headers={
        "Origin": "https://app.example:3000", "Access-Control-Request-Method": "POST"}), 403)


def test_host_header_must_be_ours(open_server, keyed):
    for srv, key in ((open_server, None), (keyed, KEY_A)):
        headers = auth(key) if key else {}
        # DNS rebinding: a page of evil.example whose name now points at 127.0.0.1
        rebound = httpx.get(srv.url + "/v1/voices", timeout=30,
                            headers={**headers, "Host": "evil.example", "Origin": "http://evil.example"})
        assert_error(rebound, 421, "misdirected_request", "evil.example")
        assert_error(httpx.get(srv.url + "/health", headers={"Host": "evil.example:8000"}, timeout=30), 421)
        port = address(srv)[1]
        for host in (f"localhost:{port}", "127.0.0.1", f"[::1]:{port}", "api.localhost", "LOCALHOST."):
            assert httpx.get(srv.url + "/v1/voices", headers={**headers, "Host": host}, timeout=30).status_code == 200
    assert httpx.get(keyed.url + "/v1/voices", headers={**auth(KEY_A), "Host": "tts.example"}, timeout=30
                     ).status_code == 200                               # --allow-host
    assert_error(httpx.get(open_server.url + "/health", headers={"Host": "tts.example"}, timeout=30), 421)


# --- owned voices ---------------------------------------------------------------------------------------

def test_uploads_belong_to_their_key(keyed):
    url = keyed.url
    a = upload(url, KEY_A, (REPO / "examples" / "voice_b.wav").read_bytes(), "alice")
    assert a.status_code == 201 and a.json()["id"] == "alice" and a.json()["preset"] is False
    assert "alice" in voice_ids(url, KEY_A) and "alice" not in voice_ids(url, KEY_B)
    assert {"voice_a", "voice_b"} <= voice_ids(url, KEY_B)                 # presets: shared
    # B can neither use nor delete A's voice: to B it does not exist
    assert_error(speak(url, KEY_B, voice="alice"), 400, "invalid_request_error", "unknown voice", "voice")
    script = {"script": "Speaker 1: hi\nSpeaker 2: hello", "voices": ["voice_a", "alice"], "max_new_frames": 2}
    assert_error(httpx.post(url + "/v1/speech/script", json=script, headers=auth(KEY_B), timeout=60), 400,
                 param="voices.1")
    assert_error(httpx.delete(url + "/v1/voices/alice", headers=auth(KEY_B), timeout=30), 404, "not_found")
    # B's own "alice" (another voice): no collision, each key speaks with its own
    b = upload(url, KEY_B, (REPO / "examples" / "voice_a.wav").read_bytes(), "alice")
    assert b.status_code == 201, b.text
    assert speak(url, KEY_A, voice="alice").content == speak(url, KEY_A, voice="voice_b").content
    assert speak(url, KEY_B, voice="alice").content == speak(url, KEY_B, voice="voice_a").content
    # the same file uploaded by two keys: a voice for each
    same = tone(330)
    ra, rb = upload(url, KEY_A, same), upload(url, KEY_B, same)
    assert ra.status_code == rb.status_code == 201 and ra.json()["id"] == rb.json()["id"]
    assert upload(url, KEY_A, same).status_code == 200                      # again: the voice as it is
    # presets are read-only
    assert_error(httpx.delete(url + "/v1/voices/voice_a", headers=auth(KEY_A), timeout=30), 403,
                 "permission_error", "preset")
    assert_error(upload(url, KEY_A, tone(440), "voice_a"), 409, "conflict")
    # A deletes its alice: gone for A (list, use), B's alice untouched
    deleted = httpx.delete(url + "/v1/voices/alice", headers=auth(KEY_A), timeout=30)
    assert deleted.status_code == 200 and deleted.json() == {"id": "alice", "object": "voice", "deleted": True}
    assert "alice" not in voice_ids(url, KEY_A) and "alice" in voice_ids(url, KEY_B)
    assert_error(speak(url, KEY_A, voice="alice"), 400, param="voice")
    assert_error(httpx.delete(url + "/v1/voices/alice", headers=auth(KEY_A), timeout=30), 404)
    assert speak(url, KEY_B, voice="alice").status_code == 200
    for key, voice in ((KEY_A, ra.json()["id"]), (KEY_B, rb.json()["id"]), (KEY_B, "alice")):
        assert httpx.delete(f"{url}/v1/voices/{voice}", headers=auth(key), timeout=30).status_code == 200


def test_upload_memory_budget_per_key(keyed):
    url = keyed.url
    kept, refusal = [], None
    for i in range(8):
        r = upload(url, KEY_C, tone(200 + 37 * i))
        if r.status_code != 201:
            refusal = r
            break
        kept.append(r.json())
    assert kept and refusal is not None, "the budget never refused an upload"
    error = assert_error(refusal, 409, "voice_budget", f"budget of {BUDGET_MIB:g} MiB")
    assert "--voice-memory-budget" in error["message"]
    assert sum(v["bytes"] for v in kept) <= BUDGET_MIB * 2 ** 20 and all(v["bytes"] > 0 for v in kept)
    held = metrics(url, KEY_C)["vv_voice_upload_bytes"]
    assert held >= sum(v["bytes"] for v in kept)
    # one key at its budget leaves the others theirs
    other = upload(url, KEY_A, tone(900))
    assert other.status_code == 201, other.text
    # a delete frees room: the refused voice now fits
    assert httpx.delete(f"{url}/v1/voices/{kept[0]['id']}", headers=auth(KEY_C), timeout=30).status_code == 200
    assert metrics(url, KEY_C)["vv_voice_upload_bytes"] < held + other.json()["bytes"]
    again = upload(url, KEY_C, tone(200 + 37 * len(kept)))
    assert again.status_code == 201, again.text
    for key, voice in [(KEY_C, v["id"]) for v in kept[1:]] + [(KEY_C, again.json()["id"]),
                                                               (KEY_A, other.json()["id"])]:
        assert httpx.delete(f"{url}/v1/voices/{voice}", headers=auth(key), timeout=30).status_code == 200


# --- slow and idle clients ------------------------------------------------------------------------------

def test_slow_clients_are_cut_off_while_health_stays_fast(random_engine_dir, presets):
    """Three sockets (one silent, one dribbling its headers, one dribbling its body) are answered 408 (the
    silent one closed) at their deadlines; /health answers at once all along; beyond --max-connections a
    connection is answered 503 and closed."""
    srv = start(random_engine_dir, presets, "--header-timeout", "1", "--body-timeout", "2",
                "--max-connections", "6")
    try:
        silent, headers_slow, body_slow = raw_socket(srv), raw_socket(srv), raw_socket(srv)
        body_slow.sendall(b"POST /v1/voices HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: audio/wav\r\n"
                          b"Content-Length: 100000\r\n\r\n")
        header_bytes = iter(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 10_000)
        ended: dict[str, tuple[float, bytes]] = {}
        received = {name: b"" for name in ("silent", "headers", "body")}
        health = []
        started = time.monotonic()
        while time.monotonic() - started < 5.0 and len(ended) < 3:
            for name, sock in (("silent", silent), ("headers", headers_slow), ("body", body_slow)):
                if name in ended:
                    continue
                try:
                    if name == "headers":
                        sock.sendall(bytes([next(header_bytes)]))
                    elif name == "body":
                        sock.sendall(b"\0")
                    sock.settimeout(0.001)
                    part = sock.recv(65536)
                    received[name] += part
                    if not part:
                        ended[name] = (time.monotonic() - started, received[name])
                except socket.timeout:
                    pass
                except (BrokenPipeError, ConnectionResetError):
                    ended[name] = (time.monotonic() - started, received[name])
            t0 = time.monotonic()
            assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
            health.append(time.monotonic() - t0)
            time.sleep(0.1)
        assert set(ended) == {"silent", "headers", "body"}, ended
        assert max(health) < 1.0, f"/health took up to {max(health):.2f} s during the slow clients"
        assert 0.8 < ended["silent"][0] < 3.5 and ended["silent"][1] == b""       # idle: closed quietly
        status, headers, body = parse_response(ended["headers"][1])
        assert status == 408 and headers["connection"] == "close" and 0.8 < ended["headers"][0] < 3.5
        assert json.loads(body)["error"]["type"] == "request_timeout"
        status, headers, body = parse_response(ended["body"][1])
        assert status == 408 and 1.8 < ended["body"][0] < 4.5, ended["body"]
        assert "request body not complete within 2 s" in json.loads(body)["error"]["message"]
        for sock in (silent, headers_slow, body_slow):
            sock.close()

        # the connection cap: 6 open (idle) connections, the 7th is answered 503 and closed
        time.sleep(0.3)
        idle = [raw_socket(srv) for _ in range(6)]
        time.sleep(0.2)
        extra = raw_socket(srv)
        extra.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, headers, body = parse_response(read_all(extra))
        assert status == 503 and int(headers["retry-after"]) >= 1
        assert json.loads(body)["error"]["type"] == "connection_limit"
        for sock in idle + [extra]:
            sock.close()
        time.sleep(0.3)
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
        counted = metrics(srv.url)
        assert counted['vv_http_errors_total{type="request_timeout"}'] >= 2
        assert counted['vv_http_errors_total{type="connection_limit"}'] == 1
    finally:
        assert srv.stop() == 0
    log = srv.log()
    assert "Traceback" not in log and "ERROR" not in log, log


def test_sigterm_ends_half_sent_requests(random_engine_dir, presets):
    """SIGTERM while one client is half-way through its body, one through its headers and one idles on a
    kept-alive connection: the half-sent body is answered 503 at once and the process exits within
    seconds (the deadlines are left at their defaults, 10 s and 60 s, so they play no part)."""
    srv = start(random_engine_dir, presets)
    try:
        body_half = raw_socket(srv)
        body_half.sendall(b"POST /v1/voices HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: audio/wav\r\n"
                          b"Content-Length: 100000\r\n\r\n" + b"\0" * 1000)
        headers_half = raw_socket(srv)
        headers_half.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
        kept = raw_socket(srv)
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        kept.settimeout(10)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < int(
                parse_response(answer)[1]["content-length"]):
            answer += kept.recv(65536)
        assert parse_response(answer)[0] == 200                  # the connection stays open (kept alive)
        time.sleep(0.5)
        started = time.monotonic()
        srv.terminate()
        assert srv.wait(60) == 0
        took = time.monotonic() - started
        assert took < 10, f"SIGTERM took {took:.1f} s with half-sent requests open"
        status, headers, body = parse_response(read_all(body_half))
        assert status == 503 and json.loads(body)["error"]["type"] == "unavailable"
        assert "shutting down" in json.loads(body)["error"]["message"]
        assert read_all(headers_half) == b"" and read_all(kept) == b""
    finally:
        srv.kill()
    log = srv.log()
    assert "Traceback" not in log and "vv-serve: stopped" in log, log


# --- bad input is never a 500 -----------------------------------------------------------------------------

def wav_declaring(rate: int) -> bytes:
    data = bytearray(tone(220, 1.0))
    struct.pack_into("<II", data, 24, rate, min(rate * 2, 2 ** 32 - 1))
    return bytes(data)


@pytest.mark.parametrize("rate", [2_000_000_000, 1, 1_000_000])
def test_wav_with_an_impossible_sample_rate_is_a_400(open_server, rate):
    for send in (lambda: upload(open_server.url, None, wav_declaring(rate)),
                 lambda: httpx.post(open_server.url + "/v1/voices", content=wav_declaring(rate), timeout=60,
                                    headers={"Content-Type": "audio/wav"})):
        assert_error(send(), 400, "invalid_request_error", f"sample rate of {rate} Hz", "file")
    assert "Traceback" not in open_server.log()


def test_disconnect_mid_body_is_no_error(open_server):
    before = metrics(open_server.url)
    errors_before = open_server.log().count("ERROR")
    for head in (b"POST /v1/voices HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: audio/wav\r\n",
                 b"POST /v1/audio/speech HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"):
        sock = raw_socket(open_server)
        sock.sendall(head + b"Content-Length: 100000\r\n\r\n" + b"{" * 3000)
        time.sleep(0.3)
        sock.close()
    deadline = time.monotonic() + 10
    while open_server.log().count("disconnected before sending its whole request") < 2:
        assert time.monotonic() < deadline, open_server.log()[-2000:]
        time.sleep(0.1)
    after = metrics(open_server.url)
    errors = {k: v for k, v in after.items() if k.startswith("vv_http_errors_total") and v != before.get(k, 0)}
    assert errors == {}, errors
    log = open_server.log()
    assert log.count("ERROR") == errors_before and "Traceback" not in log
    assert "INFO:     vv_runtime.serve: POST /v1/voices: the client disconnected" in log


# --- strict request types ---------------------------------------------------------------------------------

@pytest.mark.parametrize("body, param, words", [
    ({"stream": "yes"}, "stream", "boolean"),
    ({"stream": 1}, "stream", "boolean"),
    ({"seed": "5"}, "seed", "integer"),
    ({"seed": 5.0}, "seed", "integer"),
    ({"max_new_frames": True}, "max_new_frames", "integer"),
    ({"cfg_scale": "1.5"}, "cfg_scale", "number"),
    ({"input": 5}, "input", "string"),
    ({"voice": 7}, "voice", None),
    ({"voice": "nobody"}, "voice", "unknown voice"),
    ({"voice": {"id": "nobody"}}, "voice", "unknown voice"),
    ({"stream_format": "sse", "stream": False}, "stream", "sse"),
    ({"stream_format": "sse", "response_format": "flac"}, "response_format", "cannot be streamed"),
])
def test_strict_types_name_the_field(open_server, body, param, words):
    error = assert_error(speak(open_server.url, None, **body), 400, "invalid_request_error", words)
    assert error["param"] is not None and error["param"].split(".")[0] == param, error


@pytest.mark.parametrize("body, param", [
    ({"script": "Speaker 1: hi", "voices": []}, "voices"),
    ({"script": "Speaker 1: hi", "voices": "voice_a"}, "voices"),
    ({"script": "Speaker 1: hi", "voices": [1]}, "voices.0"),
    ({"script": "Speaker 1: hi", "voices": ["voice_a"], "stream": "no"}, "stream"),
    ({"script": "Speaker 1: hi\nSpeaker 2: yes", "voices": ["voice_a"]}, "script"),
])
def test_script_endpoint_strict(open_server, body, param):
    r = httpx.post(open_server.url + "/v1/speech/script", json=body, timeout=60)
    assert_error(r, 400, "invalid_request_error", param=param)


# --- OpenAI's streaming -------------------------------------------------------------------------------------

def test_openai_requests_stream_by_default(open_server):
    url = open_server.url
    body = {"model": "vibevoice", "input": "Hello world.", "voice": "voice_a", "seed": 1, "max_new_frames": 6,
            "response_format": "pcm"}
    whole = httpx.post(url + "/v1/audio/speech", json={**body, "stream": False}, timeout=120)
    assert whole.status_code == 200 and int(whole.headers["content-length"]) == len(whole.content) > 0
    with httpx.stream("POST", url + "/v1/audio/speech", json=body, timeout=120) as streamed:
        assert streamed.headers.get("transfer-encoding") == "chunked" and "content-length" not in streamed.headers
        assert b"".join(streamed.iter_bytes()) == whole.content
    # flac cannot stream: whole by default, refused when streaming is asked for
    flac = httpx.post(url + "/v1/audio/speech", json={**body, "response_format": "flac"}, timeout=120)
    assert flac.status_code == 200 and flac.headers["content-type"] == "audio/flac" and "content-length" in flac.headers
    # without a model (the native use) the default stays a whole body
    native = httpx.post(url + "/v1/audio/speech", json={k: v for k, v in body.items() if k != "model"}, timeout=120)
    assert native.headers["content-length"] and native.content == whole.content


def sse_events(lines) -> list[dict]:
    events = []
    for line in lines:
        line = line.decode() if isinstance(line, bytes) else line
        if line.startswith("data: "):
            events.append(json.loads(line[len("data: "):]))
    return events


def test_sse_events(open_server):
    url = open_server.url
    body = {"input": "Hello world.", "voice": "voice_a", "seed": 1, "max_new_frames": 6, "response_format": "pcm"}
    whole = httpx.post(url + "/v1/audio/speech", json=body, timeout=120)
    with httpx.stream("POST", url + "/v1/audio/speech", json={**body, "stream_format": "sse"}, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    deltas, done = events[:-1], events[-1]
    assert deltas and all(e["type"] == "speech.audio.delta" for e in deltas)
    assert b"".join(base64.b64decode(e["audio"]) for e in deltas) == whole.content
    assert done["type"] == "speech.audio.done"
    usage = done["usage"]
    assert usage["output_tokens"] == int(whole.headers["x-frames"]) and usage["input_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    # wav events carry the streamed wav: its header first
    with httpx.stream("POST", url + "/v1/audio/speech", timeout=120,
                      json={**body, "response_format": "wav", "stream_format": "sse"}) as r:
        audio = b"".join(base64.b64decode(e["audio"]) for e in sse_events(r.iter_lines())[:-1])
    assert audio[:4] == b"RIFF" and audio[44:] == whole.content


def test_openai_sdk_streams(keyed):
    openai = pytest.importorskip("openai", reason="the openai package (dev extra) is not installed")
    client = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY_A, max_retries=0)
    extra = {"seed": 2, "max_new_frames": 300}
    # the SDK's default streaming call: audio arrives while the request is still generating
    with client.audio.speech.with_streaming_response.create(model="vibevoice", voice="voice_a", input=LONG_TEXT,
                                                            response_format="pcm", extra_body=extra) as response:
        chunks = response.iter_bytes()
        first = next(chunks)
        generating = metrics(keyed.url, KEY_A)["vv_active_requests"]
        streamed = first + b"".join(chunks)
    assert first and generating == 1, "the first audio came only once the request was complete"
    whole = client.audio.speech.create(model="vibevoice", voice="voice_a", input=LONG_TEXT, response_format="pcm",
                                       extra_body=extra)
    assert whole.content == streamed and len(streamed) > 0 and len(streamed) % (3200 * 2) == 0
    # SSE through the SDK
    small = {"seed": 1, "max_new_frames": 5}
    with client.audio.speech.with_streaming_response.create(model="vibevoice", voice="voice_a", input="Hello.",
                                                            response_format="pcm", stream_format="sse",
                                                            extra_body=small) as response:
        events = sse_events(response.iter_lines())
    reference = client.audio.speech.create(model="vibevoice", voice="voice_a", input="Hello.", response_format="pcm",
                                           extra_body=small).content
    assert events[-1]["type"] == "speech.audio.done"
    assert b"".join(base64.b64decode(e["audio"]) for e in events[:-1]) == reference
    # a wrong key: the SDK's own AuthenticationError
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed.url + "/v1", api_key="wrong-key-0123456789", max_retries=0).audio.speech.create(
            model="vibevoice", voice="voice_a", input="hi")


# --- the web page with a key --------------------------------------------------------------------------------

def test_page_works_with_a_key(keyed, browser):  # noqa: F811 -- the fixture imported above
    """The page of a keyed service asks for the key, refuses a wrong one, then lists, uploads and speaks
    with it (headless Chromium, as tests/test_serve_browser.py)."""
    from selenium.webdriver.common.by import By

    browser.get(keyed.url + "/")
    wait_js(browser, "window.vvState && window.vvState.keyRequired === true", 30)
    assert browser.find_element(By.ID, "key-row").is_displayed()
    wait_js(browser, "document.getElementById('key-status').textContent === 'enter the API key'", 30)
    assert browser.execute_script("return window.vvState.voices.length") == 0
    browser.find_element(By.ID, "api-key").send_keys("wrong-key-0123456789")
    browser.find_element(By.ID, "use-key").click()
    wait_js(browser, "document.getElementById('key-status').textContent.startsWith('key refused')", 30)
    key = browser.find_element(By.ID, "api-key")
    key.clear()
    key.send_keys(KEY_B)
    browser.find_element(By.ID, "use-key").click()
    wait_js(browser, "window.vvState.voices.length >= 2", 30)
    browser.find_element(By.ID, "upload-file").send_keys(str(REPO / "examples" / "voice_b.wav"))
    browser.find_element(By.ID, "upload-name").send_keys("page_voice")
    browser.find_element(By.ID, "upload").click()
    wait_js(browser, "window.vvState.voices.some(v => v.id === 'page_voice')", 60)
    assert "page_voice" in voice_ids(keyed.url, KEY_B) and "page_voice" not in voice_ids(keyed.url, KEY_A)
    script = browser.find_element(By.ID, "script")
    script.clear()
    script.send_keys("Speaker 1: Hello there.")
    browser.find_element(By.ID, "seed").send_keys("1")
    browser.find_element(By.ID, "speak").click()
    wait_js(browser, "['done', 'error'].includes(window.vvState.state)", 120)
    state = browser.execute_script("return window.vvState")
    assert state["state"] == "done" and state["error"] is None and state["bytes"] > 0, state
    assert httpx.delete(keyed.url + "/v1/voices/page_voice", headers=auth(KEY_B), timeout=30).status_code == 200


# --- memory over many requests ---------------------------------------------------------------------------------

def test_bench_serve_soak_small_run(random_engine_dir, presets, tmp_path):
    """The soak of `make bench-serve`, briefly: RSS sampled against requests served, the plot written."""
    from conftest import load_benchmark

    bench = load_benchmark("bench_serve")
    entry = bench.soak(random_engine_dir, presets, 24, 2, 6, 8, 1, lambda line: None)
    assert entry["failed"] == 0 and entry["server_exit_status"] == 0
    assert [s[0] for s in entry["samples"]] == [0, 6, 12, 18, 24]
    assert all(50 < s[1] < 2000 for s in entry["samples"])
    assert entry["rss_end_mb"] == entry["samples"][-1][1] and entry["rss_warm_mb"] == entry["samples"][1][1]
    assert entry["growth_kb_per_request_second_half"] is not None
    assert bench.growth_kb_per_request([[0, 100.0], [10, 101.0], [20, 102.0]]) == pytest.approx(102.4)
    assert bench.plot_soak(entry, tmp_path / "soak.png").stat().st_size > 1000


# --- WebSocket routes ------------------------------------------------------------------------------------------

def test_websocket_routes_are_guarded_alike(random_engine_dir, presets):
    """A WebSocket route mounted on the app (as a realtime route is) meets the same host, origin and key
    checks before it runs, and reads who asks with `principal_of` (the app in process, over the real
    engine, through starlette's test client: its WebSocket needs no server library)."""
    from starlette.routing import WebSocketRoute
    from starlette.testclient import TestClient, WebSocketDenialResponse

    from vv_runtime.serve import create_app
    from vv_runtime.serve.security import Access, principal_of
    from vv_runtime.service_engine import SpeechEngine

    engine = SpeechEngine.from_engine_dir(random_engine_dir, threads=1, voices_dir=presets)
    try:
        app = create_app(engine, access=Access(keys=[KEY_A, KEY_B]))

        async def probe(websocket):
            await websocket.accept()
            await websocket.send_json({"owner": principal_of(websocket).owner})
            await websocket.close()

        app.router.routes.append(WebSocketRoute("/v1/probe", probe))
        url = "ws://127.0.0.1/v1/probe"
        with TestClient(app, base_url="http://127.0.0.1") as client:
            owners = set()
            for key in (KEY_A, KEY_B):
                with client.websocket_connect(url, headers=auth(key)) as ws:
                    owners.add(ws.receive_json()["owner"])
            assert len(owners) == 2 and all(o.startswith("key-") for o in owners)
            for headers, status in (({}, 401), (auth("wrong-key-0123456789"), 401),
                                    ({**auth(KEY_A), "Origin": "http://evil.example"}, 403),
                                    ({**auth(KEY_A), "Host": "evil.example"}, 421)):
                with pytest.raises(WebSocketDenialResponse) as denied:
                    with client.websocket_connect(url, headers=headers):
                        pass
                assert denied.value.status_code == status
                assert denied.value.json()["error"]["code"] == status
    finally:
        engine.close()
