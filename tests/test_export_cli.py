"""`vv-export onnx` end to end and on bad input: one-line errors, nothing left at --out."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

VV_EXPORT = Path(sys.executable).with_name("vv-export")


def run_export(*args, env=None):
    return subprocess.run([str(VV_EXPORT), "onnx", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def assert_clean_failure(proc, out: Path, needle: str):
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("error: ") and needle in last, err
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] if out.parent.exists() else []
    assert not leftovers, f"temporary directories left behind: {leftovers}"


def test_exports_the_fixture_into_a_complete_engine_dir(fixture_dir, tmp_path):
    out = tmp_path / "engines" / "tiny"
    proc = run_export("--model", fixture_dir, "--out", out)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "vibevoice-trt/engine-dir" and manifest["format_version"] == 1
    expected = {"text_embed", "lm", "acoustic_encoder", "acoustic_decoder", "semantic_encoder",
                "acoustic_connector", "semantic_connector", "diffusion_step", "diffusion_sampler"}
    assert set(manifest["graphs"]) == expected
    for name, graph in manifest["graphs"].items():
        assert (out / graph["file"]).exists()
        assert graph["validated_max_abs_error"]  # every graph was validated against PyTorch
        assert (out / "validation" / f"{name}.inputs.json").exists()
    assert (out / "tokenizer.json").exists()
    m = manifest["model"]
    assert m["hop_length"] == 3200 and m["sample_rate"] == 24000
    assert manifest["tokens"] == {"eos": 316, "speech_start": 317, "speech_end": 318, "speech_diffusion": 319,
                                  "pad": 316}
    assert manifest["diffusion"]["steps"] == 10 and len(manifest["diffusion"]["timesteps"]) == 10
    assert len(manifest["source"]["weights_sha256"]) == 64
    assert set(manifest["versions"]) >= {"torch", "onnx", "transformers", "onnxruntime"}
    lm_inputs = {i["name"]: i["shape"] for i in manifest["graphs"]["lm"]["inputs"]}
    assert lm_inputs["past_kv"] == [2, 2, "batch", 2, "past", 16]
    # existing --out without --force is refused, and left as it was
    again = run_export("--model", fixture_dir, "--out", out)
    assert again.returncode != 0 and "already exists" in again.stderr
    assert (out / "manifest.json").exists()


def test_missing_directory(tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(run_export("--model", tmp_path / "nope", "--out", out), out, "no such directory")


def test_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "ckpt").mkdir()
    out = tmp_path / "out"
    assert_clean_failure(run_export("--model", tmp_path / "ckpt", "--out", out), out, "no config.json")


def test_unknown_layout(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    out = tmp_path / "out"
    assert_clean_failure(run_export("--model", ckpt, "--out", out), out, "not a VibeVoice config")


@pytest.mark.parametrize("damage", ["truncated", "corrupt-header"])
def test_truncated_or_corrupt_safetensors(fixture_dir, tmp_path, damage):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(fixture_dir / name, ckpt / name)
    data = (fixture_dir / "model.safetensors").read_bytes()
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data = data[:8] + b"{not json" + data[17:]
    (ckpt / "model.safetensors").write_bytes(data)
    out = tmp_path / "out"
    assert_clean_failure(run_export("--model", ckpt, "--out", out), out, "corrupt or truncated safetensors")


def test_unwritable_out(fixture_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = blocker / "engines"
    proc = run_export("--model", fixture_dir, "--out", out)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --out")


def test_validation_failure_names_graph_output_and_tolerance(fixture_dir, tmp_path, monkeypatch):
    """A graph outside its tolerance fails the export with the graph, output, error and bound named."""
    from vv_export import specs as specs_module
    from vv_export.families import load_checkpoint
    from vv_export.errors import ValidationError
    from vv_export.onnx_export import export_onnx

    original = specs_module.build_specs

    def strict_specs(ctx):
        out = original(ctx)
        for spec in out:
            if spec.name == "acoustic_connector":
                spec.tolerance = {"embeds": {"atol": -1.0, "rtol": 0.0}}  # impossible to meet
        return out

    monkeypatch.setattr("vv_export.specs.build_specs", strict_specs)
    out = tmp_path / "out"
    with pytest.raises(ValidationError, match=r"graph acoustic_connector: output embeds differs from PyTorch by .* "
                                              r"\(allowed .*atol -1"):
        export_onnx(load_checkpoint(str(fixture_dir)), out, progress=False)
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_no_model_exports_a_tiny_random_vibevoice(tmp_path):
    out = tmp_path / "rand"
    proc = run_export("--out", out, "--no-validate")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["model"].startswith("random-tiny")
    assert manifest["model"]["num_layers"] == 2
