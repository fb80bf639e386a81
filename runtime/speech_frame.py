"""One speech frame of a group of jobs, the part every model family shares: the jobs grouped by CFG scale, then
per group [diffusion_sampler] (noise, positive and negative conditions) -> a latent and its LM embedding, and
[acoustic_decoder] (the latent and each job's streaming state) -> one hop of audio per job. What a family does around it (the
semantic encoder and the next LM input of VibeVoice-1.5B, the acoustic embedding of Realtime-0.5B) stays in its
model steps."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def by_cfg_scale(jobs) -> dict[float, list]:
    """The jobs in admission order, grouped by CFG scale (the sampler takes one scale per call)."""
    groups: dict[float, list] = {}
    for job in sorted(jobs, key=lambda j: j.index):
        groups.setdefault(job.cfg_scale, []).append(job)
    return groups


@dataclass
class Frame:
    acoustic_embed: np.ndarray  # [n, H] the latent's LM input embedding (acoustic connector)
    audio: np.ndarray           # [n, 1, hop] float32
    decoder_state: np.ndarray   # [n, S] float32: each job's next decoder state


def sample_and_decode(run, noise: np.ndarray, pos_condition: np.ndarray, neg_condition: np.ndarray,
                      cfg_scale: float, decoder_state: np.ndarray) -> Frame:
    """[diffusion_sampler] then [acoustic_decoder] on one group of n jobs (`run`: a backend's run)."""
    sampled = run("diffusion_sampler", {"noise": np.asarray(noise, dtype=np.float32),
                                        "pos_condition": pos_condition, "neg_condition": neg_condition,
                                        "cfg_scale": np.asarray([cfg_scale], dtype=np.float32)})
    decoded = run("acoustic_decoder", {"latent": np.asarray(sampled["latent"])[:, None, :], "state": decoder_state})
    return Frame(np.asarray(sampled["acoustic_embed"], dtype=np.float32),
                 np.asarray(decoded["audio"], dtype=np.float32), np.asarray(decoded["new_state"], dtype=np.float32))
