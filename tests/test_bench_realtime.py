"""benchmarks/bench_realtime.py end to end on the tiny random VibeVoice-Realtime (real exports, real worker
processes, a preset synthesized by the model's LMs in the released format): the result's fields, and the
pieces the full-size run relies on (export cache, preset, config)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import REFERENCE, load_benchmark

pytest.importorskip("diffusers")

TEXT = "Hi there, tiny."  # 16 byte-level tokens with the newline: 4 text windows


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_realtime")


@pytest.fixture(scope="module")
def tiny_run(bench, tmp_path_factory):
    work = tmp_path_factory.mktemp("bench-realtime-work")
    out = tmp_path_factory.mktemp("bench-realtime-out")
    result = bench.run_benchmark("tiny", out, work=work, threads=2, modes=("fp32", "int8"), repeats=1, text=TEXT,
                                 after=2, streams=2, word_s=0.01, log=lambda line: None)
    return result, work, out


def test_result_fields(bench, tiny_run):
    result, _, out = tiny_run

    assert json.loads((out / "bench_realtime_tiny.json").read_text()) == result
    assert (out / "bench_realtime_tiny.png").stat().st_size > 0
    assert result["text_tokens"] == 16 and result["frames"] == 4 * 6 + 2
    assert result["preset"]["made"] == "synthesized"
    assert result["preset"]["positions"] == {"text_lm": 9, "tts_lm": 23, "neg_text_lm": 1, "neg_tts_lm": 1}
    assert set(result["sides"]) == {"ort-fp32", "ort-int8", "torch"}
    loads = result["load_runs"]  # one per timed run, interleaved in that order
    assert [run["side"] for run in loads] == ["ort-fp32", "ort-int8", "torch"]
    assert all(run["load_average_before"] is not None and run["other_cores_busy"] >= 0 for run in loads)
    assert result["machine_was_busy"] == (max(run["other_cores_busy"] for run in loads) >= bench.BUSY_MACHINE)
    for name, side in result["sides"].items():
        assert side["frames"] == result["frames"], name        # forced through the whole text, every side
        assert side["ms_per_frame"] > 0 and side["rtf"] > 0 and side["time_to_first_audio_s"] > 0
        if name == "torch":
            continue
        torch_ms = result["sides"]["torch"]["ms_per_frame"]
        assert side["speedup_vs_torch"] == pytest.approx(torch_ms / side["ms_per_frame"])
        assert {"text_lm", "tts_lm", "diffusion_sampler", "acoustic_decoder"} <= set(side["ms_per_frame_by_graph"])
        streamed = side["first_audio_streamed"]
        # the first audio comes after the first text window is final, and before the text is all there
        assert 0 < streamed["first_audio_after_window_s"] < streamed["first_audio_after_first_word_s"]
        c = side["concurrency"]
        assert c["streams"] == 2
        assert c["one_at_a_time"]["frames"] == c["concurrent"]["frames"] == 2 * result["frames"]
        assert c["concurrent"]["audio_s_per_s"] > 0 and c["speedup_concurrent_vs_one_at_a_time"] > 0
    # the int8 export's choice per graph, with every candidate's timings and validation errors
    assert "quantization" not in result["sides"]["ort-fp32"]
    decoder = result["sides"]["ort-int8"]["quantization"]["acoustic_decoder"]
    assert decoder["status"] == "quantized" and set(decoder["timing"]) == {"frame", "first frame"}
    assert all(c["validated_max_abs_error"] and c["method"] for c in decoder["candidates"])
    # the port and ONNX Runtime run the same weights, preset, tokens and noise: the same audio at the first frame
    agreement = result["agreement"]["ort-fp32_vs_torch"]
    assert agreement["frames"] == result["frames"] and agreement["first_frame"] < 1e-4
    assert "goal" not in result  # goals are the full-size model's


def test_exports_are_reused(bench, tiny_run):
    _, work, _ = tiny_run
    info = bench.prepare("tiny", work, ["fp32", "int8"], 2, fresh=False, log=lambda line: None)
    assert info["exports_reused"] == ["fp32", "int8"] and info["export_s"] == {}


def test_synthesized_preset_is_a_released_format_preset(bench, tiny_run):
    from vv_export.voices import check_preset_dims, read_preset

    _, work, _ = tiny_run
    preset = read_preset(bench.preset_file(work, "tiny"))
    manifest = json.loads((work / "tiny" / "fp32" / "manifest.json").read_text())
    check_preset_dims(preset, manifest["model"])
    tts = preset.caches["tts_lm"]
    assert np.isfinite(tts.kv).all() and float(np.abs(tts.kv).max()) > 0
    assert manifest["voices"]["synthetic"]["positions"]["tts_lm"] == 23


def test_embedded_full_config_is_the_reference_config(bench):
    path = REFERENCE / "vibevoice-realtime-0.5b-config.json"
    if not path.exists():
        pytest.skip(f"{path} not found")
    assert bench.FULL_CONFIG == json.loads(path.read_text())
