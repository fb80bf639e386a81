"""`vv-run` on a VibeVoice-Realtime ENGINE_DIR (the exported tiny realtime fixture and its preset): plain text or a
.txt file, one preset by name, the manifest's defaults, --stream, --json, batches, and one-line errors with no
output left behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from vv_runtime.cli import main
from vv_runtime.realtime_pipeline import RealtimePipeline

VOICE = "en-Tiny_man"
TEXT = "Hello world, this is the realtime model speaking through vv-run."


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def reference(realtime_voiced_engine_dir):
    """The same text spoken by the Python API (seed 5, 30 frames)."""
    pipeline = RealtimePipeline.from_engine_dir(realtime_voiced_engine_dir, backend="ort")
    try:
        return pipeline.generate(TEXT, VOICE, seed=5, max_new_frames=30)
    finally:
        pipeline.close()


def test_run_speaks_a_preset_and_reports_json(realtime_voiced_engine_dir, reference, tmp_path):
    out = tmp_path / "new" / "out.wav"
    result = invoke("--engine-dir", realtime_voiced_engine_dir, "--script", TEXT, "--voice", VOICE, "--out", out,
                    "--seed", 5, "--max-new-frames", 30, "--json", "--backend", "ort")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    audio, rate = sf.read(out, dtype="float32")
    assert rate == 24000 and audio.shape[0] == summary["frames"] * 3200 == 30 * 3200
    np.testing.assert_array_equal(audio, reference.audio)           # the Python API's audio, same seed
    assert summary["model_family"] == "vibevoice_streaming" and summary["voice"] == VOICE
    assert summary["cfg_scale"] == 1.5                               # the manifest's default for this family
    assert summary["seed"] == 5 and summary["backend"].startswith("ort") and summary["stream"] is False
    assert summary["outputs"][0]["text_tokens"] == reference.text_tokens
    assert summary["real_time_factor"] == pytest.approx(summary["wall_seconds"] / summary["audio_seconds"], rel=0.01)
    assert summary["first_chunk_seconds"] <= summary["wall_seconds"]
    assert "real-time factor" in result.stderr and "first audio after" in result.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.wav"]

    # a .txt file holds the text; --stream writes the same samples as they are made (here as 16-bit PCM)
    script = tmp_path / "text.txt"
    script.write_text(TEXT + "\n", encoding="utf-8")
    streamed = tmp_path / "streamed.wav"
    result = invoke("--engine-dir", realtime_voiced_engine_dir, "--script", script, "--voice", VOICE,
                    "--out", streamed, "--seed", 5, "--max-new-frames", 30, "--stream", "--pcm16", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["stream"] is True and sf.info(streamed).subtype == "PCM_16"
    pcm, _ = sf.read(streamed, dtype="float32")
    np.testing.assert_allclose(pcm, np.clip(audio, -1, 1), atol=1 / 32767 + 1e-6)


def test_batch_file_scripts_equal_themselves_alone(realtime_voiced_engine_dir, reference, tmp_path):
    (tmp_path / "a.txt").write_text(TEXT + "\n")
    (tmp_path / "b.txt").write_text("A second text, a little different.\n")
    batch = tmp_path / "batch.lst"
    batch.write_text("a.txt\nb.txt\n")
    out = tmp_path / "out" / "speech.wav"
    result = invoke("--engine-dir", realtime_voiced_engine_dir, "--batch-file", batch, "--voice", VOICE,
                    "--out", out, "--seed", 5, "--max-new-frames", 30, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert [Path(o["path"]).name for o in summary["outputs"]] == ["speech_0.wav", "speech_1.wav"]
    first, _ = sf.read(out.parent / "speech_0.wav", dtype="float32")   # script 0: seed 5, beside script 1
    assert first.shape == reference.audio.shape
    assert float(np.abs(first - reference.audio).max()) <= 1e-4 * float(np.abs(reference.audio).max())


def test_decode_frames_one_writes_the_same_speech(realtime_voiced_engine_dir, reference, tmp_path):
    """--decode-frames 1 (every frame decoded at once) speaks what the default groups decode, within fp32
    reordering; the option is refused, in one line, for a VibeVoice ENGINE_DIR, whose frames feed its loop."""
    out = tmp_path / "single.wav"
    result = invoke("--engine-dir", realtime_voiced_engine_dir, "--script", TEXT, "--voice", VOICE, "--out", out,
                    "--seed", 5, "--max-new-frames", 30, "--decode-frames", 1)
    assert result.exit_code == 0, result.stderr
    audio, _ = sf.read(out, dtype="float32")
    assert audio.shape == reference.audio.shape
    assert float(np.abs(audio - reference.audio).max()) <= 1e-5 * float(np.abs(reference.audio).max())


def test_decode_frames_is_refused_for_vibevoice(tiny_engine_dir, tmp_path):
    voice = tmp_path / "voice.wav"
    sf.write(voice, np.zeros(4800, dtype=np.float32), 24000)
    result = CliRunner().invoke(main, ["--engine-dir", str(tiny_engine_dir), "--script", "Speaker 1: Hi.",
                                       "--voice", str(voice), "--out", str(tmp_path / "o.wav"), "--decode-frames", "2"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--decode-frames" in lines[0] and "VibeVoice-Realtime" in lines[0], result.stderr
    assert not (tmp_path / "o.wav").exists()


def _bad_case(name, tmp: Path):
    """-> (argument overrides, expected words of the one error line)."""
    if name == "unknown preset":
        return {"--voice": "nobody"}, "voice 'nobody': not a preset of this ENGINE_DIR (presets: en-Tiny_man)"
    if name == "no voice":
        return {"--voice": None}, "give one --voice PRESET"
    if name == "two voices":
        return {"--voice": [VOICE, VOICE]}, "2 given"
    if name == "empty text":
        return {"--script": "   "}, "text is empty"
    if name == "empty text file":
        (tmp / "empty.txt").write_text("\n\n")
        return {"--script": tmp / "empty.txt"}, "empty (no text to speak)"
    if name == "missing text file":
        return {"--script": tmp / "nope.txt"}, "nope.txt: file not found"
    if name == "text beyond the context":
        return {"--script": "word " * 9000}, "longer than the model's context of 8192 positions"
    if name == "unwritable output":
        (tmp / "a-file").write_text("x")
        return {"--out": tmp / "a-file" / "out.wav"}, "cannot write"
    if name == "trt without engines":
        return {"--backend": "trt"}, "no TensorRT engines"
    raise AssertionError(name)


BAD_CASES = ["unknown preset", "no voice", "two voices", "empty text", "empty text file", "missing text file",
             "text beyond the context", "unwritable output", "trt without engines"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_user_errors_are_one_line(case, realtime_voiced_engine_dir, tmp_path):
    overrides, expected = _bad_case(case, tmp_path)
    out_dir = tmp_path / "out"
    options = {"--engine-dir": realtime_voiced_engine_dir, "--script": TEXT, "--voice": VOICE,
               "--out": out_dir / "out.wav", **overrides}
    args = []
    for key, value in options.items():
        for item in (value if isinstance(value, list) else [value]):
            if item is not None:
                args += [key, str(item)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, (result.exit_code, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.output and result.stdout == ""
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".wav", ".tmp")]
