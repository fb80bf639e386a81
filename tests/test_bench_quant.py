"""benchmarks/bench_quant.py end to end on the shared tiny fixture (real exports, real side processes): the export
cache a full-size run relies on (reused while the exporter is the same, redone when its key differs), the
concurrent-scripts figure of each ONNX Runtime side, and rounds merged without losing a one-round figure."""

from __future__ import annotations

import json

import pytest
from conftest import FIXTURE, load_benchmark

pytestmark = pytest.mark.skipif(not FIXTURE.exists(), reason="needs ../shared (the tiny fixture)")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_quant")


def run(bench, work, out, rounds=1):
    return bench.run_benchmark("tiny", out, threads=1, frames=3, repeats=1, modes=("fp32",), torch_sides=(),
                               rounds=rounds, concurrency=3, work=work, log=lambda line: None)


def test_exports_are_cached_and_concurrency_is_measured(bench, tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    first = run(bench, work, out, rounds=2)
    assert first["export_s"].keys() == {"fp32"} and first["exports_reused"] == []
    side = first["sides"]["ort-fp32"]
    assert side["rounds"] == 2
    c = side["concurrency"]  # measured in the first round only, kept through the merge of the rounds
    assert c["scripts"] == 3 and c["frames"] == 3 * 3 and c["frames_per_script"] == 3
    assert c["audio_s_per_s"] > 0 and c["one_at_a_time_audio_s_per_s"] > 0
    assert c["speedup_concurrent_vs_one_at_a_time"] == pytest.approx(c["one_at_a_time_wall_s"] / c["wall_s"])
    assert json.loads((out / "bench_quant_tiny.json").read_text())["sides"]["ort-fp32"]["concurrency"] == c
    assert (out / "bench_quant_tiny.png").stat().st_size > 0

    key = work / "tiny" / "fp32.key"
    assert key.read_text() == bench.mode_key("tiny", "fp32")
    manifest = (work / "tiny" / "fp32" / "manifest.json").stat().st_mtime_ns
    second = run(bench, work, out)  # the same exporter: the export is reused
    assert second["export_s"] == {} and second["exports_reused"] == ["fp32"]
    assert (work / "tiny" / "fp32" / "manifest.json").stat().st_mtime_ns == manifest

    assert bench.stale_modes("tiny", work / "tiny", ["fp32"]) == []
    key.write_text("another exporter")  # made by other exporter code: exported again
    assert bench.stale_modes("tiny", work / "tiny", ["fp32"]) == ["fp32"]
