"""The benchmark's PyTorch baseline (benchmarks/torch_reference.py) reproduces the original implementation's run."""

from __future__ import annotations


import numpy as np
import pytest
from conftest import load_benchmark

pytest.importorskip("diffusers")



def _torch_reference():
    return load_benchmark("torch_reference")


@pytest.fixture(scope="module")
def reference_run(fixture_dir, fixture_reference):
    from vv_export.families import load_checkpoint

    ref, out = fixture_reference
    gen = ref["generate"]
    loaded = load_checkpoint(str(fixture_dir))
    runner = _torch_reference().TorchReference(loaded.model, loaded.token_ids, diffusion_steps=gen["diffusion_steps"])
    noise = out["generate.noise"]
    result = runner.generate(out["generate.input_ids"], out["generate.speech_input_mask"],
                             speech=out["generate.speech_tensors"], noise=lambda k: noise[k][:1],
                             cfg_scale=gen["cfg_scale"], max_new_tokens=gen["max_new_tokens"])
    return ref, out, result


def test_reproduces_generated_tokens(reference_run):
    ref, out, result = reference_run
    expected = ref["generate"]["generated_tokens"]
    assert result.tokens == expected
    prompt = out["generate.input_ids"][0].tolist()
    assert prompt + result.tokens == out["generate.sequences"][0].tolist()
    assert result.frames == expected.count(ref["special_tokens"]["speech_diffusion"]) == out["generate.noise"].shape[0]


def test_reproduces_audio(reference_run):
    _, out, result = reference_run
    expected = out["generate.audio"][0]
    assert result.audio.shape == expected.shape
    peak = float(np.abs(expected).max())
    assert float(np.abs(result.audio - expected).max()) <= 1e-4 * peak + 1e-5
    assert result.first_audio_s is not None and result.first_audio_s <= result.wall_s


def test_forced_diffusion_makes_one_frame_per_step(fixture_dir, fixture_reference):
    from vv_export.families import load_checkpoint

    _, out = fixture_reference
    loaded = load_checkpoint(str(fixture_dir))
    runner = _torch_reference().TorchReference(loaded.model, loaded.token_ids)
    result = runner.generate(out["generate.input_ids"][:, :20], max_new_tokens=3, force_diffusion=True, seed=1)
    assert result.frames == result.steps == 3
    assert result.audio.shape == (3 * runner.hop,) and np.isfinite(result.audio).all()
