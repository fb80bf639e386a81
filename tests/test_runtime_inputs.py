"""vv_runtime pieces that need no graphs: audio, script parsing, prompt layout, manifest checks, wav output."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import soundfile as sf

from vv_runtime.audio import HOP, WavWriter, normalize, prepare_voice, read_audio, write_wav
from vv_runtime.errors import RuntimeInputError
from vv_runtime.manifest import load_manifest
from vv_runtime.prompt import PromptBuilder
from vv_runtime.script import load_script, parse_script, read_script, speakers

FIXTURE_TOKENS = {"speech_start": 317, "speech_end": 318, "speech_diffusion": 319, "eos": 316, "pad": 316}


# --- audio -------------------------------------------------------------------------------------

def test_normalised_voice_matches_original_processor(fixture_reference):
    _, ref = fixture_reference
    padded, frames = prepare_voice(ref["generate.voice_wav_raw"])
    assert frames == math.ceil(ref["generate.voice_wav_raw"].shape[0] / HOP) == 3
    assert padded.shape == ref["generate.speech_tensors"][0].shape
    np.testing.assert_allclose(padded, ref["generate.speech_tensors"][0], rtol=0, atol=1e-6)


def test_normalise_clips_loud_audio():
    x = np.zeros(1000, dtype=np.float32)
    x[0] = 1.0  # a single spike: RMS normalisation pushes it far above 1
    y = normalize(x)
    assert y.dtype == np.float32
    assert np.max(np.abs(y)) <= 1.0


def test_read_audio_stereo_and_resampling(tmp_path):
    t = np.arange(16000) / 16000
    left, right = np.sin(2 * np.pi * 220 * t), 0.5 * np.sin(2 * np.pi * 220 * t)
    path = tmp_path / "stereo16k.flac"
    sf.write(path, np.stack([left, right], 1).astype(np.float32), 16000)
    wav = read_audio(path)
    assert wav.dtype == np.float32
    assert abs(wav.shape[0] - 24000) <= 1
    assert np.max(np.abs(wav)) == pytest.approx(0.75, abs=0.02)  # mean of the two channels


@pytest.mark.parametrize("content", [b"", b"this is not audio at all"])
def test_unreadable_voice_is_one_line_error(tmp_path, content):
    path = tmp_path / "voice.wav"
    path.write_bytes(content)
    with pytest.raises(RuntimeInputError, match="voice file .*voice.wav") as err:
        prepare_voice(str(path))
    assert "\n" not in str(err.value)


def test_empty_wav_is_rejected(tmp_path):
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0, dtype=np.float32), 24000)
    with pytest.raises(RuntimeInputError, match="no audio samples"):
        prepare_voice(str(path))


def test_live_wav_writer_grows_the_output_and_removes_it_on_failure(tmp_path):
    out = tmp_path / "live.wav"
    writer = WavWriter(out, live=True)
    writer.write(np.ones(3200, dtype=np.float32) * 0.1)
    first = out.stat().st_size
    writer.write(np.ones(3200, dtype=np.float32) * 0.1)
    assert out.stat().st_size >= first + 3200 * 4  # a listener sees the frames as they come
    writer.commit()
    assert sf.read(out, dtype="float32")[0].shape == (6400,)
    with pytest.raises(ValueError):
        with WavWriter(out, live=True) as failing:
            failing.write(np.ones(10, dtype=np.float32))
            raise ValueError("boom")
    assert not out.exists()


def test_wav_writer_is_atomic(tmp_path):
    out = tmp_path / "sub" / "out.wav"
    with pytest.raises(ValueError):
        with WavWriter(out) as writer:
            writer.write(np.ones(10, dtype=np.float32) * 0.1)
            raise ValueError("boom")
    assert not out.exists() and list(out.parent.iterdir()) == []
    with WavWriter(out) as writer:
        writer.write(np.ones(10, dtype=np.float32) * 0.1)
        writer.write(np.ones(5, dtype=np.float32) * 0.2)
        assert not out.exists()
    data, rate = sf.read(out, dtype="float32")
    assert rate == 24000 and data.shape == (15,)
    write_wav(out, np.zeros(3, dtype=np.float32), subtype="PCM_16")
    assert sf.info(out).subtype == "PCM_16"
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.wav"]


def test_wav_writer_unwritable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RuntimeInputError, match="cannot write"):
        WavWriter(blocker / "out.wav")


# --- scripts -----------------------------------------------------------------------------------

def test_parse_script_like_original():
    parsed = parse_script("Speaker 1: Hello world.\n\n  speaker 2 :  Hi there.  \nSpeaker 1: Bye: now")
    assert parsed == [(0, " Hello world."), (1, " Hi there."), (0, " Bye: now")]
    # ids are kept when one is already 0
    assert parse_script("Speaker 0: a\nSpeaker 3: b") == [(0, " a"), (3, " b")]
    assert speakers(parse_script("Speaker 2: a\nSpeaker 1: b\nSpeaker 2: c")) == [1, 0]


def test_text_file_script(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("Plain first line.\n\nSpeaker 2: Second.\nSpeaker 3:\n  more plain  \n", encoding="utf-8")
    assert load_script(str(path)) == "Speaker 1: Plain first line.\nSpeaker 2: Second.\nSpeaker 1: more plain"
    assert read_script(str(path)) == [(0, " Plain first line."), (1, " Second."), (0, " more plain")]


@pytest.mark.parametrize("script, message", [
    ("", "script is empty"),
    ("  \n \n", "script is empty"),
    ("Speaker 1: fine\nno prefix here", "line 2 has no 'Speaker N:' prefix"),
])
def test_bad_literal_scripts(script, message):
    with pytest.raises(RuntimeInputError, match=message):
        read_script(script)


def test_empty_and_missing_script_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(RuntimeInputError, match="empty"):
        read_script(str(empty))
    with pytest.raises(RuntimeInputError, match="not found"):
        read_script(str(tmp_path / "missing.txt"))


# --- prompt ------------------------------------------------------------------------------------

def test_prompt_matches_fixture(fixture_dir, fixture_reference):
    meta, ref = fixture_reference
    builder = PromptBuilder(fixture_dir / "tokenizer.json", FIXTURE_TOKENS)
    _, frames = prepare_voice(ref["generate.voice_wav_raw"])
    prompt = builder.build(parse_script(meta["generate"]["script"]), [frames])
    np.testing.assert_array_equal(prompt.input_ids, ref["generate.input_ids"][0])
    np.testing.assert_array_equal(prompt.speech_input_mask, ref["generate.speech_input_mask"][0].astype(bool))


def test_prompt_voices(fixture_dir):
    builder = PromptBuilder(fixture_dir / "tokenizer.json", FIXTURE_TOKENS)
    parsed = parse_script("Speaker 1: a\nSpeaker 2: b")
    with pytest.raises(RuntimeInputError, match="script has 2 speakers but 1 voices"):
        builder.build(parsed, [3])
    extra = builder.build(parsed, [2, 3, 4])  # the third voice is dropped, as the original does
    assert extra.voice_frames == [2, 3] and int(extra.speech_input_mask.sum()) == 5
    no_voice = builder.build(parsed)
    assert not no_voice.speech_input_mask.any()
    assert FIXTURE_TOKENS["speech_diffusion"] not in no_voice.input_ids.tolist()
    assert no_voice.input_ids[-1] == FIXTURE_TOKENS["speech_start"]


# --- manifest ----------------------------------------------------------------------------------

def _fake_engine_dir(tmp_path, **changes):
    graphs = {name: {"file": f"{name}.onnx", "inputs": [], "outputs": []}
              for name in ("text_embed", "lm", "acoustic_encoder", "acoustic_decoder", "semantic_encoder",
                           "diffusion_sampler")}
    manifest = {"format": "vibevoice-trt/engine-dir", "format_version": 1, "model": {}, "tokens": FIXTURE_TOKENS,
                "control_tokens": ["speech_start", "speech_end", "speech_diffusion", "eos"], "prompt": {},
                "graphs": graphs, "tokenizer": "tokenizer.json"}
    manifest.update(changes)
    for graph in graphs.values():
        (tmp_path / graph["file"]).write_bytes(b"")
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path


def test_manifest_ok(tmp_path):
    assert load_manifest(_fake_engine_dir(tmp_path))["format_version"] == 1


@pytest.mark.parametrize("change, message", [
    ({"format": "something/else"}, "unknown format"),
    ({"format_version": 2}, "unsupported format_version 2"),
    ({"control_tokens": ["eos", "speech_start", "speech_end", "speech_diffusion"]}, "control_tokens"),
])
def test_manifest_rejected(tmp_path, change, message):
    with pytest.raises(RuntimeInputError, match=message):
        load_manifest(_fake_engine_dir(tmp_path, **change))


def test_manifest_missing_pieces(tmp_path):
    engine_dir = _fake_engine_dir(tmp_path)
    (engine_dir / "lm.onnx").unlink()
    with pytest.raises(RuntimeInputError, match="lm.onnx: graph file of 'lm' is missing"):
        load_manifest(engine_dir)
    with pytest.raises(RuntimeInputError, match="not a directory"):
        load_manifest(tmp_path / "nowhere")
    (engine_dir / "manifest.json").write_text("{ not json")
    with pytest.raises(RuntimeInputError, match="unreadable manifest"):
        load_manifest(engine_dir)
