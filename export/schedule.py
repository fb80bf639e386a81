"""DPM-Solver++ (2M, midpoint) coefficients for VibeVoice's diffusion head, computed at export time.

VibeVoice samples with diffusers' `DPMSolverMultistepScheduler(num_train_timesteps=1000,
beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")` and its defaults (dpmsolver++,
order 2, midpoint, lower_order_final, final sigma zero, linspace spacing). Every step of that
scheduler is an affine combination of the current sample and the current/previous x0 predictions,
with coefficients that depend only on the step. The sampler graph bakes them in:

    v_k   = head(x_k, t_k, cond)                 CFG-combined velocity
    x0_k  = alpha_k * x_k - sigma_k * v_k        v-prediction -> data prediction
    x_k+1 = ratio_k * x_k + d0_k * x0_k + d1_k * (x0_k - x0_{k-1})

with d1_k = 0 for first-order steps (the first and, with lower_order_final, the last).
`tests/test_schedule.py` checks these numbers against diffusers itself.
"""

from __future__ import annotations

import math

import numpy as np


def _betas_cosine(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = []
    for i in range(num_train_timesteps):
        t1, t2 = i / num_train_timesteps, (i + 1) / num_train_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.asarray(betas, dtype=np.float32)


def alphas_cumprod(num_train_timesteps: int = 1000, beta_schedule: str = "squaredcos_cap_v2") -> np.ndarray:
    if beta_schedule in ("squaredcos_cap_v2", "cosine"):
        betas = _betas_cosine(num_train_timesteps)
    elif beta_schedule == "linear":
        betas = np.linspace(0.0001, 0.02, num_train_timesteps, dtype=np.float32)
    else:
        raise ValueError(f"beta schedule {beta_schedule!r} is not supported")
    # float32 cumulative product, as torch.cumprod on float32 betas does
    return np.cumprod((1.0 - betas).astype(np.float32), dtype=np.float32)


def dpm_solver_coefficients(steps: int, num_train_timesteps: int = 1000,
                            beta_schedule: str = "squaredcos_cap_v2") -> dict:
    """Timesteps and per-step coefficients of DPM-Solver++(2M) with lower-order final step."""
    if steps < 1:
        raise ValueError("diffusion steps must be >= 1")
    acp = alphas_cumprod(num_train_timesteps, beta_schedule).astype(np.float64)
    train_sigmas = np.sqrt((1 - acp) / acp)
    timesteps = np.linspace(0, num_train_timesteps - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
    sigmas = np.concatenate([sigmas, [0.0]])

    def alpha_sigma(s):
        alpha = 1.0 / math.sqrt(s * s + 1.0)
        return alpha, s * alpha

    def lam(s):
        a, sg = alpha_sigma(s)
        return math.log(a) - math.log(sg) if sg > 0 else math.inf

    alpha, sigma, ratio, d0, d1, order = [], [], [], [], [], []
    for i in range(steps):
        a_s, s_s = alpha_sigma(sigmas[i])
        alpha.append(a_s)
        sigma.append(s_s)
        a_t, s_t = alpha_sigma(sigmas[i + 1])
        first = i == 0 or i == steps - 1  # warm-up step and lower_order_final
        if s_t == 0.0:  # final sigma zero: the step returns the x0 prediction
            ratio.append(0.0)
            d0.append(a_t)
            d1.append(0.0)
            order.append(1)
            continue
        h = lam(sigmas[i + 1]) - lam(sigmas[i])
        base = -a_t * (math.exp(-h) - 1.0)
        ratio.append(s_t / s_s)
        d0.append(base)
        if first:
            d1.append(0.0)
            order.append(1)
        else:
            h0 = lam(sigmas[i]) - lam(sigmas[i - 1])
            r0 = h0 / h
            d1.append(0.5 * base / r0)
            order.append(2)
    return {
        "timesteps": [int(t) for t in timesteps],
        "alpha": alpha,
        "sigma": sigma,
        "ratio": ratio,
        "d0": d0,
        "d1": d1,
        "order": order,
    }
