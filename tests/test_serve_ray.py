"""vv-serve on Ray Serve: `vv-serve --ray --replicas 2` starts a local Ray instance with two CPU replicas;
concurrent requests are served by both (X-Replica-Id), with the same audio whichever replica speaks, voice
uploads are refused (they would live on one replica), and SIGTERM shuts it all down with status 0.
Slow (Ray's start takes ~30 s); needs the `ray` extra."""

from __future__ import annotations

import collections
import concurrent.futures
import shutil
import socket
from pathlib import Path

import httpx
import pytest

from conftest import ServerProcess

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_ray_replicas_serve_requests(random_engine_dir, tmp_path):
    pytest.importorskip("ray.serve", reason="Ray Serve not installed (pip install -e '.[ray]')")
    presets = tmp_path / "presets"
    presets.mkdir()
    shutil.copy(REPO / "examples" / "voice_a.wav", presets / "voice_a.wav")
    srv = ServerProcess(["--engine-dir", random_engine_dir, "--voices", presets, "--threads", "1", "--ray",
                         "--replicas", "2", "--max-batch", "2", "--port", str(free_port())],
                        startup_timeout=300).start()
    try:
        body = {"input": "Hello from Ray.", "voice": "voice_a", "seed": 0, "max_new_frames": 10,
                "response_format": "pcm"}

        def one(i: int):
            with httpx.Client(base_url=srv.url, timeout=120) as client:
                if i % 2:
                    with client.stream("POST", "/v1/audio/speech", json={**body, "stream": True}) as r:
                        return r.status_code, r.headers.get("x-replica-id"), b"".join(r.iter_bytes())
                r = client.post("/v1/audio/speech", json=body)
                return r.status_code, r.headers.get("x-replica-id"), r.content

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(one, range(16)))
        assert all(status == 200 for status, _, _ in results), results
        replicas = collections.Counter(replica for _, replica, _ in results)
        assert len(replicas) == 2, replicas                      # both replicas served requests
        audio = {data for _, _, data in results}
        assert len(audio) == 1 and len(next(iter(audio))) > 0   # the same audio from either replica
        bad = httpx.post(srv.url + "/v1/audio/speech", json={**body, "voice": "nobody"}, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
        health = httpx.get(srv.url + "/health", timeout=60).json()
        assert health["status"] == "ok" and health["replica_id"] in replicas
        # uploads would live on one replica only: refused (501, JSON), the presets are the voices
        assert health["voice_uploads"] is False
        wav = (REPO / "examples" / "voice_a.wav").read_bytes()
        up = httpx.post(srv.url + "/v1/voices", files={"file": ("a.wav", wav, "audio/wav")}, timeout=60)
        assert up.status_code == 501 and up.json()["error"]["type"] == "not_supported"
    finally:
        code = srv.stop(timeout=180)
    assert code == 0, srv.log()[-3000:]
    assert "vv-serve: stopped" in srv.log()
