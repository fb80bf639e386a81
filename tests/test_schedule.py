"""DPM-Solver++ coefficients and the exported sampler against diffusers' scheduler configured as VibeVoice's."""

import numpy as np
import pytest
import torch

from vv_export.schedule import dpm_solver_coefficients

diffusers = pytest.importorskip("diffusers")


def _scheduler(steps):
    sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
        algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True)
    sched.set_timesteps(steps)
    return sched


@pytest.mark.parametrize("steps", [5, 10, 20])
def test_coefficients_reproduce_diffusers_steps(steps):
    coef = dpm_solver_coefficients(steps)
    sched = _scheduler(steps)
    assert coef["timesteps"] == sched.timesteps.tolist()
    gen = torch.Generator().manual_seed(steps)
    x = torch.randn(4, 64, generator=gen)
    mine, prev = x.double().numpy(), None
    for i, t in enumerate(sched.timesteps):
        v = torch.randn(4, 64, generator=gen)
        x = sched.step(v, t, x).prev_sample
        x0 = coef["alpha"][i] * mine - coef["sigma"][i] * v.double().numpy()
        new = coef["ratio"][i] * mine + coef["d0"][i] * x0
        if coef["d1"][i]:
            new = new + coef["d1"][i] * (x0 - prev)
        prev, mine = x0, new
    # diffusers runs in fp32; ours in fp64: differences are fp32 rounding (~1e-6 relative per step)
    np.testing.assert_allclose(mine, x.numpy(), atol=5e-5, rtol=1e-4)
    assert coef["d1"][0] == 0 and coef["d1"][-1] == 0  # first order warm-up and lower_order_final


def test_exported_sampler_matches_diffusers_loop(tiny_engine_dir, fixture_dir):
    """The one-graph sampler (ORT) == diffusers' scheduler driving the PyTorch head with CFG, 10 steps."""
    import onnxruntime as ort

    from vv_export.families import load_checkpoint

    net = load_checkpoint(str(fixture_dir)).model
    head, projector = net.model.diffusion_head, net.model.multi_modal_projector
    gen = torch.Generator().manual_seed(3)
    n, hidden, latent = 2, net.config.text_config.hidden_size, net.config.audio_config.hidden_size
    noise = torch.randn(n, latent, generator=gen)
    pos, neg = torch.randn(n, hidden, generator=gen), torch.randn(n, hidden, generator=gen)
    cfg = 1.3
    sched = _scheduler(10)
    speech = torch.cat([noise, torch.randn(n, latent, generator=gen)])  # 2n rows, first half used
    cond = torch.cat([pos, neg])
    with torch.no_grad():
        for t in sched.timesteps:
            half = speech[:n]
            v = head(torch.cat([half, half]), t.repeat(2 * n).float(), cond)
            guided = v[n:] + cfg * (v[:n] - v[n:])
            speech = sched.step(torch.cat([guided, guided]), t, speech).prev_sample
        expected = speech[:n].numpy()
        expected_embed = projector(speech[:n]).numpy()
    session = ort.InferenceSession(str(tiny_engine_dir / "diffusion_sampler.onnx"), providers=["CPUExecutionProvider"])
    latent_out, embed_out = session.run(None, {"noise": noise.numpy(), "pos_condition": pos.numpy(),
                                              "neg_condition": neg.numpy(),
                                              "cfg_scale": np.array([cfg], np.float32)})
    # fp32 on both sides; the x0 conversions amplify rounding at small sigma: 1e-4 of the peak
    peak = np.abs(expected).max()
    assert np.abs(latent_out - expected).max() <= 1e-4 * peak + 1e-5
    assert np.abs(embed_out - expected_embed).max() <= 1e-4 * np.abs(expected_embed).max() + 1e-5
