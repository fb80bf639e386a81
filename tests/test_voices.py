"""`vv-export voices`: Microsoft's VibeVoice-Realtime voice presets (.pt pickles) read without running them.

The reader is checked against torch.load on the shared presets (trusted fixtures; only this test loads them with
torch), against the model dimensions of the full-size and the tiny config, and on hostile and broken files: a
pickle that would run a command is refused before it runs (the command's marker file never appears), and the
ENGINE_DIR is left exactly as it was.
"""

from __future__ import annotations

import json
import shutil
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED
from vv_export.engine_dir import FORMAT, FORMAT_VERSION
from vv_export.errors import ExportError
from vv_export.voices import (PRESET_CACHES, PresetError, check_preset_dims, convert_voices, read_preset)

REALTIME_FIXTURE = SHARED / "fixtures" / "vibevoice-realtime-tiny-original"
TINY_PRESET = REALTIME_FIXTURE / "voices" / "en-Tiny_man.pt"
REAL_PRESET = SHARED / "reference" / "realtime-voices" / "en-Davis_man.pt"
FULL_SIZE_CONFIG = SHARED / "reference" / "vibevoice-realtime-0.5b-config.json"
VV_EXPORT = Path(sys.executable).with_name("vv-export")

pytestmark = pytest.mark.skipif(not (TINY_PRESET.exists() and REAL_PRESET.exists()),
                                reason=f"shared realtime presets not found under {SHARED}")


def config_dims(config_path: Path) -> dict:
    """The preset-relevant dimensions of an original VibeVoice-Realtime config.json."""
    config = json.loads(config_path.read_text())
    decoder, tts_layers = config["decoder_config"], config["tts_backbone_num_hidden_layers"]
    return {"hidden_size": decoder["hidden_size"], "text_lm_layers": decoder["num_hidden_layers"] - tts_layers,
            "tts_lm_layers": tts_layers, "num_kv_heads": decoder["num_key_value_heads"],
            "head_dim": decoder.get("head_dim") or decoder["hidden_size"] // decoder["num_attention_heads"]}


def engine_copy(root: Path, source: Path, dtype: str | None = None) -> Path:
    """A copy of an exported ENGINE_DIR to convert voices into (`dtype`: the manifest's, rewritten)."""
    engine = root / "engine"
    shutil.copytree(source, engine)
    if dtype is not None:
        manifest = json.loads((engine / "manifest.json").read_text())
        manifest["dtype"] = dtype
        (engine / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return engine


def snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None
            for p in sorted(directory.rglob("*")) if not p.name.endswith(".lock")}


def run_voices(engine: Path, *files, importtime: bool = False):
    prefix = [sys.executable, "-X", "importtime"] if importtime else []
    return subprocess.run([*prefix, str(VV_EXPORT), "voices", "--engine-dir", str(engine), *map(str, files)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def assert_refused(proc, needle: str) -> str:
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    return lines[0]


def write_archive(path: Path, data_pkl: bytes, records: dict[str, bytes] | None = None) -> Path:
    """A torch.save-style zip archive: <stem>/data.pkl, <stem>/byteorder and <stem>/data/<key> records."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{path.stem}/data.pkl", data_pkl)
        archive.writestr(f"{path.stem}/byteorder", "little")
        for key, data in (records or {}).items():
            archive.writestr(f"{path.stem}/data/{key}", data)
    return path


# ---- the reader ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset_path", [TINY_PRESET, REAL_PRESET], ids=["tiny", "en-Davis_man"])
def test_reader_equals_torch_load(preset_path):
    torch = pytest.importorskip("torch")
    trusted = torch.load(preset_path, map_location="cpu", weights_only=False)  # trusted shared fixture
    preset = read_preset(preset_path)
    assert set(preset.caches) == {name for name, _ in PRESET_CACHES.values()}
    for key, (name, _) in PRESET_CACHES.items():
        original, cache = trusted[key], preset.caches[name]
        assert original.last_hidden_state.dtype == torch.bfloat16  # the bf16 -> float32 path is exercised
        assert cache.hidden.dtype == np.float32
        np.testing.assert_array_equal(cache.hidden, original.last_hidden_state[0].float().numpy())
        state = vars(original.past_key_values)  # the released DynamicCache layout: key_cache, value_cache
        assert cache.kv.shape[0] == len(state["key_cache"]) == len(state["value_cache"])
        for layer, (k, v) in enumerate(zip(state["key_cache"], state["value_cache"])):
            np.testing.assert_array_equal(cache.kv[layer, 0], k.float().numpy())
            np.testing.assert_array_equal(cache.kv[layer, 1], v.float().numpy())
        assert cache.positions == state["_seen_tokens"]


def test_reader_follows_strides():
    """The tiny preset's caches are transposed views ([1, KV, P, D] with P-major storage): a reader that ignored
    strides would scramble them, and the comparison with torch above would fail."""
    torch = pytest.importorskip("torch")
    trusted = torch.load(TINY_PRESET, map_location="cpu", weights_only=False)
    key = vars(trusted["tts_lm"].past_key_values)["key_cache"][0]
    assert not key.is_contiguous()
    flat = np.asarray(key.float().contiguous().view(-1))
    storage = np.asarray(torch.tensor([], dtype=torch.bfloat16).set_(key.untyped_storage()).float())
    assert not np.array_equal(flat, storage)  # storage order differs from the tensor's order
    np.testing.assert_array_equal(read_preset(TINY_PRESET).caches["tts_lm"].kv[0, 0], key.float().numpy())


def test_real_preset_fits_the_full_size_model_and_not_the_tiny_one():
    preset = read_preset(REAL_PRESET)
    full = config_dims(FULL_SIZE_CONFIG)
    assert full == {"hidden_size": 896, "text_lm_layers": 4, "tts_lm_layers": 20, "num_kv_heads": 2, "head_dim": 64}
    check_preset_dims(preset, full)
    assert {n: c.positions for n, c in preset.caches.items()} == {"text_lm": 60, "tts_lm": 183, "neg_text_lm": 1,
                                                                  "neg_tts_lm": 1}
    tiny = config_dims(REALTIME_FIXTURE / "config.json")
    reference = json.loads((REALTIME_FIXTURE / "reference.json").read_text())
    assert (tiny["text_lm_layers"], tiny["tts_lm_layers"]) == (reference["layers"]["lower"], reference["layers"]["tts"])
    with pytest.raises(PresetError) as refused:
        check_preset_dims(preset, tiny)
    message = str(refused.value)
    assert "\n" not in message and message.startswith("en-Davis_man.pt was made for another model")
    for part in ("text LM layers 4 (engine: 2)", "TTS LM layers 20 (engine: 2)", "head size 64 (engine: 16)",
                 "hidden size 896 (engine: 64)"):
        assert part in message
    assert "KV heads" not in message  # both have 2: only mismatches are named
    check_preset_dims(read_preset(TINY_PRESET), tiny)
    with pytest.raises(PresetError, match="text LM layers 2 .engine: 4."):
        check_preset_dims(read_preset(TINY_PRESET), {**tiny, "text_lm_layers": 4})


# ---- hostile pickles -----------------------------------------------------------------------------------------

class _Reduce:
    """Pickles as a call of `function(*args)`, which a plain unpickler runs."""

    def __init__(self, function, args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def _os_system(marker: Path) -> bytes:  # a hand-written protocol-0 GLOBAL
    return b"cos\nsystem\n(V" + f"touch '{marker}'".encode() + b"\ntR."


def _builtins_eval(marker: Path) -> bytes:  # inside a dict shaped like a preset
    import builtins

    payload = _Reduce(builtins.eval, (f"open({str(marker)!r}, 'w').close()",))
    return pickle.dumps({"lm": payload, "tts_lm": None, "neg_lm": None, "neg_tts_lm": None}, protocol=3)


def _subprocess_run(marker: Path) -> bytes:  # protocol 4: STACK_GLOBAL
    import subprocess as sp

    return pickle.dumps(_Reduce(sp.run, (["touch", str(marker)],)), protocol=4)


HOSTILE = {"os.system": _os_system, "builtins.eval": _builtins_eval, "subprocess.run": _subprocess_run}


@pytest.mark.parametrize("refused_name", list(HOSTILE))
def test_hostile_pickle_is_refused_before_it_runs(refused_name, tmp_path, realtime_engine_dir):
    make = HOSTILE[refused_name]
    # the payload is live: a plain unpickler runs it
    control = tmp_path / "control-marker"
    pickle.loads(make(control))
    assert control.exists()

    marker = tmp_path / "marker"
    hostile = write_archive(tmp_path / "evil.pt", make(marker))
    with pytest.raises(PresetError) as refused:
        read_preset(hostile)
    assert refused_name in str(refused.value) and "refused" in str(refused.value)
    assert not marker.exists()

    engine = engine_copy(tmp_path, realtime_engine_dir)
    before = snapshot(engine)
    line = assert_refused(run_voices(engine, TINY_PRESET, hostile), refused_name)
    assert "evil.pt" in line
    assert not marker.exists()
    assert snapshot(engine) == before  # the valid preset given with it was not written either


def test_other_torch_globals_are_refused(tmp_path):
    """Only the few globals the released presets name are resolved, not whole modules."""
    for module, name in (("torch._utils", "_rebuild_parameter"), ("torch", "load"), ("collections", "Counter"),
                         ("transformers.cache_utils", "StaticCache"), ("__builtin__", "eval")):
        path = write_archive(tmp_path / "other.pt", f"c{module}\n{name}\n)R.".encode())
        with pytest.raises(PresetError, match=f"names {module}.{name};"):
            read_preset(path)


# ---- broken files --------------------------------------------------------------------------------------------

def _save_with_torch(path: Path, content) -> Path:
    torch = pytest.importorskip("torch")
    torch.save(content, path)
    return path


def test_broken_files_are_refused_in_one_line(tmp_path, realtime_engine_dir):
    torch = pytest.importorskip("torch")
    original = TINY_PRESET.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(original[: len(original) // 2])
    corrupt = bytearray(original)
    with zipfile.ZipFile(TINY_PRESET) as archive:
        info = archive.getinfo("en-Tiny_man/data/5")
    data_start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    corrupt[data_start + 100] ^= 0xFF
    (tmp_path / "corrupt.pt").write_bytes(bytes(corrupt))
    (tmp_path / "plain-pickle.pt").write_bytes(pickle.dumps({"lm": 1}))
    _save_with_torch(tmp_path / "missing-keys.pt", {"lm": torch.zeros(2), "tts_lm": torch.zeros(2)})
    _save_with_torch(tmp_path / "tensors.pt", {key: torch.zeros(1, 3, 4) for key in PRESET_CACHES})
    _save_with_torch(tmp_path / "list.pt", [torch.zeros(2)])
    # tensors that reach past their storage or repeat it: refused, never read out of bounds or expanded
    _save_with_torch(tmp_path / "small.pt", {"lm": torch.zeros(2, 3)})
    with zipfile.ZipFile(tmp_path / "small.pt") as archive:
        data_pkl, record = archive.read("small/data.pkl"), archive.read("small/data/0")
    offset_and_size = b"QK\x00K\x02K\x03\x86"  # BINPERSID, offset 0, size (2, 3)
    assert data_pkl.count(offset_and_size) == 1
    write_archive(tmp_path / "overreach.pt", data_pkl.replace(offset_and_size, b"QK\x01K\x02K\x03\x86"),
                  {"0": record})
    write_archive(tmp_path / "expanded.pt", data_pkl.replace(offset_and_size, b"QK\x00K\x02K\x09\x86"),
                  {"0": record})
    write_archive(tmp_path / "short-record.pt", data_pkl, {"0": record[:-4]})
    write_archive(tmp_path / "no-record.pt", data_pkl)

    expected = {
        "missing.pt": "no such file",
        "truncated.pt": "corrupt or not a torch.save archive",
        "corrupt.pt": "corrupt or not a torch.save archive (Bad CRC-32",
        "plain-pickle.pt": "corrupt or not a torch.save archive",
        "missing-keys.pt": "not a voice preset (missing neg_lm, neg_tts_lm)",
        "tensors.pt": "not a voice preset (lm is a tensor [1, 3, 4], not a model output)",
        "list.pt": "not a voice preset (the pickle holds a list",
        "overreach.pt": "reaches element 6 of a 6-element storage",
        "expanded.pt": "has more elements than its storage",
        "short-record.pt": "storage record data/0 holds 20 bytes, expected 24",
        "no-record.pt": "storage record data/0 is missing",
    }
    for name, needle in expected.items():
        with pytest.raises(PresetError) as refused:
            read_preset(tmp_path / name)
        message = str(refused.value)
        assert "\n" not in message and message.startswith(str(tmp_path / name)) and needle in message, message

    engine = engine_copy(tmp_path, realtime_engine_dir)
    before = snapshot(engine)
    assert_refused(run_voices(engine, TINY_PRESET, tmp_path / "corrupt.pt"), "Bad CRC-32")
    assert_refused(run_voices(engine, tmp_path / "missing-keys.pt"), "missing neg_lm, neg_tts_lm")
    assert snapshot(engine) == before


# ---- the command ---------------------------------------------------------------------------------------------

def test_cli_converts_a_preset_into_the_engine_dir(tmp_path, realtime_engine_dir):
    engine = engine_copy(tmp_path, realtime_engine_dir)
    proc = run_voices(engine, TINY_PRESET, importtime=True)
    assert proc.returncode == 0, proc.stderr
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in proc.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    assert "numpy" in imported and not imported & {"torch", "transformers"}

    from safetensors import safe_open
    from safetensors.numpy import load_file

    from vv_export.engine_dir import sha256_file

    manifest = json.loads((engine / "manifest.json").read_text())
    entry = manifest["voices"]["en-Tiny_man"]
    assert entry["file"] == "voices/en-Tiny_man.safetensors" and entry["source"] == "en-Tiny_man.pt"
    assert entry["positions"] == {"text_lm": 9, "tts_lm": 23, "neg_text_lm": 1, "neg_tts_lm": 1}
    voice_file = engine / entry["file"]
    assert entry["sha256"] == sha256_file(voice_file)
    tensors = load_file(str(voice_file))
    assert {k: v.shape for k, v in tensors.items()} == {
        "text_lm.kv": (2, 2, 1, 2, 9, 16), "text_lm.hidden": (9, 64),
        "tts_lm.kv": (2, 2, 1, 2, 23, 16), "tts_lm.hidden": (23, 64),
        "neg_text_lm.kv": (2, 2, 1, 2, 1, 16), "neg_text_lm.hidden": (1, 64),
        "neg_tts_lm.kv": (2, 2, 1, 2, 1, 16), "neg_tts_lm.hidden": (1, 64)}
    preset = read_preset(TINY_PRESET)
    for name, cache in preset.caches.items():
        assert tensors[f"{name}.kv"].dtype == np.float32
        np.testing.assert_array_equal(tensors[f"{name}.kv"], cache.kv)
        np.testing.assert_array_equal(tensors[f"{name}.hidden"], cache.hidden)
    with safe_open(str(voice_file), "np") as handle:
        assert handle.metadata() == {"format": "vibevoice-trt/voice"}
    assert not [p.name for p in (engine / "voices").iterdir() if p.name.startswith(".")]  # no temporary left

    # converting again (another process) replaces the voice with the same bytes, one entry
    first = voice_file.read_bytes()
    assert run_voices(engine, TINY_PRESET).returncode == 0
    assert voice_file.read_bytes() == first
    assert json.loads((engine / "manifest.json").read_text())["voices"] == manifest["voices"]


def test_cli_refuses_a_preset_of_another_model_size(tmp_path, realtime_engine_dir):
    engine = engine_copy(tmp_path, realtime_engine_dir)
    before = snapshot(engine)
    line = assert_refused(run_voices(engine, TINY_PRESET, REAL_PRESET), "en-Davis_man.pt was made for another model")
    assert "text LM layers 4 (engine: 2)" in line and "hidden size 896 (engine: 64)" in line
    assert snapshot(engine) == before  # the tiny preset, which fits, was not written alone


def test_cli_refuses_an_engine_dir_of_another_family(tmp_path, tiny_engine_dir):
    engine = engine_copy(tmp_path, tiny_engine_dir)
    before = snapshot(engine)
    assert_refused(run_voices(engine, TINY_PRESET), "holds a vibevoice model; voice presets are for "
                                                    "vibevoice_streaming")
    assert_refused(run_voices(tmp_path / "nowhere", TINY_PRESET), "not a directory")
    assert snapshot(engine) == before


def test_voice_names_and_fp16_engines(tmp_path, realtime_engine_dir):
    engine = engine_copy(tmp_path, realtime_engine_dir, dtype="fp16")
    (tmp_path / "a b.pt").write_bytes(TINY_PRESET.read_bytes())
    with pytest.raises(PresetError, match="the voice name 'a b'"):
        convert_voices(engine, [tmp_path / "a b.pt"])
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "en-Tiny_man.pt").write_bytes(TINY_PRESET.read_bytes())
    with pytest.raises(PresetError, match="two presets named 'en-Tiny_man'"):
        convert_voices(engine, [TINY_PRESET, tmp_path / "copy" / "en-Tiny_man.pt"])
    with pytest.raises(ExportError, match="model section lacks head_dim"):
        manifest = json.loads((engine / "manifest.json").read_text())
        del manifest["model"]["head_dim"]
        broken = tmp_path / "broken"
        shutil.copytree(engine, broken)
        (broken / "manifest.json").write_text(json.dumps(manifest))
        convert_voices(broken, [TINY_PRESET])
    assert not (engine / "voices").exists()

    (written,) = convert_voices(engine, [TINY_PRESET])
    from safetensors.numpy import load_file

    tensors = load_file(str(written))
    assert all(t.dtype == np.float16 for t in tensors.values())
    np.testing.assert_array_equal(tensors["tts_lm.kv"], read_preset(TINY_PRESET).caches["tts_lm"].kv.astype(np.float16))
