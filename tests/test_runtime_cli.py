"""`vv-run`: outputs, batch files, JSON figures, and one-line errors with no output left behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from vv_runtime.cli import main

SCRIPT = "Speaker 1: Hello world.\nSpeaker 1: This is a tiny test."


@pytest.fixture(scope="module")
def voice_file(fixture_reference, tmp_path_factory) -> Path:
    _, ref = fixture_reference
    path = tmp_path_factory.mktemp("voices") / "voice.wav"
    sf.write(path, ref["generate.voice_wav_raw"], 24000, subtype="FLOAT")
    return path


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def outputs_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_run_writes_wav_and_json(tiny_engine_dir, voice_file, tmp_path):
    out = tmp_path / "new" / "out.wav"
    result = invoke("--engine-dir", tiny_engine_dir, "--script", SCRIPT, "--voice", voice_file, "--out", out,
                    "--seed", 1, "--json", "--backend", "ort")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    audio, rate = sf.read(out, dtype="float32")
    assert rate == 24000 and audio.shape[0] == summary["frames"] * 3200 > 0
    assert summary["audio_seconds"] == pytest.approx(audio.shape[0] / 24000, abs=1e-3)
    assert summary["real_time_factor"] == pytest.approx(summary["wall_seconds"] / summary["audio_seconds"], rel=0.01)
    assert summary["first_chunk_seconds"] <= summary["wall_seconds"]
    assert summary["seed"] == 1 and summary["backend"].startswith("ort")
    assert "real-time factor" in result.stderr and "first audio after" in result.stderr
    assert outputs_in(out.parent) == ["out.wav"]

    # streaming writes the same samples (same seed), here as 16-bit PCM
    streamed = tmp_path / "streamed.wav"
    result = invoke("--engine-dir", tiny_engine_dir, "--script", SCRIPT, "--voice", voice_file, "--out", streamed,
                    "--seed", 1, "--stream", "--pcm16")
    assert result.exit_code == 0, result.stderr
    assert sf.info(streamed).subtype == "PCM_16"
    pcm, _ = sf.read(streamed, dtype="float32")
    assert pcm.shape == audio.shape
    np.testing.assert_allclose(pcm, np.clip(audio, -1, 1), atol=1 / 32767 + 1e-6)


def test_batch_file(tiny_engine_dir, voice_file, tmp_path):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "a.txt").write_text(SCRIPT + "\n")
    (scripts / "b.txt").write_text("Just one plain line of text.\n")
    batch = scripts / "batch.lst"
    batch.write_text("# two scripts\na.txt\n\nb.txt\n")
    out = tmp_path / "out" / "speech.wav"
    result = invoke("--engine-dir", tiny_engine_dir, "--batch-file", batch, "--voice", voice_file, "--out", out,
                    "--seed", 3, "--json", "--max-new-frames", 30)
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert outputs_in(out.parent) == ["speech_0.wav", "speech_1.wav"]
    assert [Path(o["path"]).name for o in summary["outputs"]] == ["speech_0.wav", "speech_1.wav"]
    for entry in summary["outputs"]:
        assert sf.info(entry["path"]).frames == entry["frames"] * 3200
        assert entry["steps"] <= 30


def _engine_copy(src: Path, dst: Path) -> Path:
    """A copy of an ENGINE_DIR whose graphs are links (cheap); the manifest is a real, editable copy."""
    dst.mkdir()
    for item in src.iterdir():
        if item.name == "manifest.json":
            shutil.copy(item, dst / item.name)
        else:
            (dst / item.name).symlink_to(item)
    return dst


def _edit_manifest(engine_dir: Path, edit) -> None:
    path = engine_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def _rename_input(manifest):
    manifest["graphs"]["semantic_encoder"]["inputs"][1]["name"] = "context"


def _bad_case(name, tiny_engine_dir, voice_file, tmp: Path):
    """-> (argument overrides, expected words of the message)."""
    if name == "empty script":
        return {"--script": ""}, "script is empty"
    if name == "empty script file":
        (tmp / "empty.txt").write_text("\n\n")
        return {"--script": tmp / "empty.txt"}, "empty"
    if name == "line without speaker":
        return {"--script": "Speaker 1: Hello.\nwho says this?"}, "line 2 has no 'Speaker N:' prefix"
    if name == "more speakers than voices":
        return {"--script": "Speaker 1: Hi.\nSpeaker 2: Hello."}, "script has 2 speakers but 1 voices"
    if name == "unreadable audio":
        (tmp / "noise.wav").write_bytes(b"RIFF but not really a wav file")
        return {"--voice": tmp / "noise.wav"}, "unreadable audio"
    if name == "empty audio file":
        (tmp / "empty.wav").write_bytes(b"")
        return {"--voice": tmp / "empty.wav"}, "voice file"
    if name == "audio without samples":
        sf.write(tmp / "silent.wav", np.zeros(0, dtype=np.float32), 24000)
        return {"--voice": tmp / "silent.wav"}, "no audio samples"
    if name == "missing voice":
        return {"--voice": tmp / "nope.wav"}, "nope.wav: file not found"
    if name == "prompt too long":
        return {"--script": "Speaker 1: " + "hello world " * 3000}, "longer than the model's context"
    if name == "missing engine dir":
        return {"--engine-dir": tmp / "no-engines"}, "not a directory"
    if name == "missing graph file":
        engine = _engine_copy(tiny_engine_dir, tmp / "engines")
        (engine / "diffusion_sampler.onnx").unlink()
        return {"--engine-dir": engine}, "diffusion_sampler.onnx: graph file of 'diffusion_sampler' is missing"
    if name == "format version":
        engine = _engine_copy(tiny_engine_dir, tmp / "engines")
        _edit_manifest(engine, lambda m: m.update(format_version=2))
        return {"--engine-dir": engine}, "unsupported format_version 2"
    if name == "io name mismatch":
        engine = _engine_copy(tiny_engine_dir, tmp / "engines")
        _edit_manifest(engine, _rename_input)
        return {"--engine-dir": engine}, "semantic_encoder.onnx: I/O names"
    if name == "unwritable output":
        (tmp / "a-file").write_text("x")
        return {"--out": tmp / "a-file" / "out.wav"}, "cannot write"
    if name == "output is a directory":
        (tmp / "dir.wav").mkdir()
        return {"--out": tmp / "dir.wav"}, "is a directory"
    if name == "not a wav":
        return {"--out": tmp / "out.mp3"}, "must be a .wav file"
    if name == "trt without engines":
        return {"--backend": "trt"}, "no TensorRT engines"
    if name == "bad batch file":
        (tmp / "batch.lst").write_text("missing.txt\n")
        return {"--script": None, "--batch-file": tmp / "batch.lst"}, "line 1: script missing.txt not found"
    raise AssertionError(name)


BAD_CASES = ["empty script", "empty script file", "line without speaker", "more speakers than voices",
             "unreadable audio", "empty audio file", "audio without samples", "missing voice", "prompt too long",
             "missing engine dir", "missing graph file", "format version", "io name mismatch",
             "unwritable output", "output is a directory", "not a wav", "trt without engines", "bad batch file"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_user_errors_are_one_line(case, tiny_engine_dir, voice_file, tmp_path):
    overrides, expected = _bad_case(case, tiny_engine_dir, voice_file, tmp_path)
    out_dir = tmp_path / "out"
    options = {"--engine-dir": tiny_engine_dir, "--script": SCRIPT, "--voice": voice_file,
               "--out": out_dir / "out.wav", **overrides}
    args = [str(x) for key, value in options.items() if value is not None for x in (key, value)]
    before = outputs_in(tmp_path)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, (result.exit_code, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.output
    assert result.stdout == ""
    assert not any(p.suffix in (".wav", ".tmp") for p in tmp_path.rglob("*") if p.is_file() and
                   p.name not in ("noise.wav", "empty.wav", "silent.wav")), outputs_in(tmp_path)
    assert not [p for p in outputs_in(tmp_path) if p not in before and p != "out"]
    assert outputs_in(out_dir) == []


def test_usage_error_is_one_line(tiny_engine_dir, tmp_path):
    result = CliRunner().invoke(main, ["--engine-dir", str(tiny_engine_dir), "--script", SCRIPT])
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--out" in lines[0]


def test_entry_point_debug_shows_traceback(tiny_engine_dir, tmp_path):
    exe = Path(sys.executable).with_name("vv-run")
    if not exe.exists():
        pytest.skip("vv-run is not installed beside this interpreter")
    engine = _engine_copy(tiny_engine_dir, tmp_path / "engines")
    (engine / "lm.onnx").unlink()
    args = [str(exe), "--engine-dir", str(engine), "--script", SCRIPT, "--out", str(tmp_path / "o.wav")]
    plain = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 1
    assert plain.stderr.strip().count("\n") == 0 and "graph file of 'lm' is missing" in plain.stderr
    debug = subprocess.run(args + ["--debug"], capture_output=True, text=True, timeout=120)
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    assert not (tmp_path / "o.wav").exists()
