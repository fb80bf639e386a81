"""vv-serve fuzzed from its own OpenAPI document (Schemathesis, dev extra): a real keyed `vv-serve` on
127.0.0.1, requests generated from /openapi.json (valid ones, and ones that break the schema on purpose),
each answer checked: no 5xx, every status, content type, header and JSON body as the document says,
invalid input refused, the key required where the document says so. Bounded: a fixed number of examples
per operation, derandomised (the same cases every run).

Not checked: that every schema-valid request is accepted (a valid request may name a voice that does not
exist, or an empty text: the document cannot say which voices exist).
"""

from __future__ import annotations

import httpx
import pytest

from conftest import ServerProcess

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis (dev extra) is not installed")
from hypothesis import HealthCheck, settings  # noqa: E402  (comes with schemathesis)

KEY = "fuzz-key-0123456789abcdef"
EXAMPLES = 15                   # per operation and phase: the default suite's bound
MAX_FRAMES = 12                 # generated speech requests make at most this many frames


@pytest.fixture(scope="module")
def fuzz_server(random_engine_dir, presets):
    srv = ServerProcess(["--engine-dir", random_engine_dir, "--voices", presets, "--threads", "1",
                         "--api-key", KEY, "--max-voice-seconds", "10"]).start()
    yield srv
    assert srv.stop() == 0, srv.log()
    log = srv.log()
    assert "Traceback" not in log and "ERROR" not in log, log[-5000:]


SPEECH_PATHS = ("/v1/audio/speech", "/v1/speech/script")


def bounded(case) -> None:
    """A generated speech request that would run makes at most MAX_FRAMES frames (a bound that leaves an
    invalid body invalid: only a missing or too large valid count is replaced)."""
    if case.path in SPEECH_PATHS and isinstance(case.body, dict):
        frames = case.body.get("max_new_frames")
        if frames is None or (type(frames) is int and frames > MAX_FRAMES):
            case.body["max_new_frames"] = MAX_FRAMES


def test_api_holds_to_its_schema(fuzz_server):
    from hypothesis import Phase, given
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/audio/speech", "POST /v1/speech/script",
                                                "GET /v1/voices", "POST /v1/voices", "DELETE /v1/voices/{voice_id}",
                                                "GET /health", "GET /metrics"}
    headers = {"Authorization": f"Bearer {KEY}"}
    statuses: dict[str, set] = {}
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            def holds(case):
                bounded(case)
                response = case.call_and_validate(headers=headers, timeout=120,
                                                  excluded_checks=[positive_data_acceptance])
                statuses.setdefault(operation.label, set()).add(response.status_code)

            try:
                holds()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE, operation.label    # nothing of it to break
    # the document's own examples speak (a schema-valid request that names a voice that exists)
    document = httpx.get(fuzz_server.url + "/openapi.json", timeout=30).json()
    for path, model in (("/v1/audio/speech", "SpeechBody"), ("/v1/speech/script", "ScriptBody")):
        example = document["components"]["schemas"][model]["examples"][0]
        r = httpx.post(fuzz_server.url + path, json=example, headers=headers, timeout=120)
        assert r.status_code == 200 and r.headers["content-type"] == "audio/wav" and len(r.content) > 44
    assert all(status < 500 for seen in statuses.values() for status in seen), statuses
    assert any(400 <= status < 500 for status in statuses["POST /v1/audio/speech"]), statuses
