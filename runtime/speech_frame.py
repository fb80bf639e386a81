"""One speech frame of a group of jobs, the part every model family shares: the jobs grouped by CFG scale, then
per group [diffusion_sampler] (noise, positive and negative conditions) -> a latent and its LM embedding, and
[acoustic_decoder] (latents and each job's streaming state) -> audio per job. What a family does around it (the
semantic encoder and the next LM input of VibeVoice-1.5B, the acoustic embedding and the grouped decoding of
Realtime-0.5B) stays in its model steps."""

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


def sample(run, noise: np.ndarray, pos_condition: np.ndarray, neg_condition: np.ndarray,
           cfg_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """[diffusion_sampler] on one group of n jobs (`run`: a backend's run): (latent [n, A], acoustic_embed [n, H])."""
    sampled = run("diffusion_sampler", {"noise": np.asarray(noise, dtype=np.float32),
                                        "pos_condition": pos_condition, "neg_condition": neg_condition,
                                        "cfg_scale": np.asarray([cfg_scale], dtype=np.float32)})
    return (np.asarray(sampled["latent"], dtype=np.float32),
            np.asarray(sampled["acoustic_embed"], dtype=np.float32))


def decode(run, latents: np.ndarray, decoder_state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[acoustic_decoder] on n jobs' next T latents each ([n, T, A]; T > 1 only on a grouped decoder):
    (audio [n, 1, T x hop], new decoder state [n, S])."""
    decoded = run("acoustic_decoder", {"latent": np.asarray(latents, dtype=np.float32), "state": decoder_state})
    return np.asarray(decoded["audio"], dtype=np.float32), np.asarray(decoded["new_state"], dtype=np.float32)


def sample_and_decode(run, noise: np.ndarray, pos_condition: np.ndarray, neg_condition: np.ndarray,
                      cfg_scale: float, decoder_state: np.ndarray) -> Frame:
    """[diffusion_sampler] then [acoustic_decoder] on one group of n jobs, one frame each."""
    latent, acoustic_embed = sample(run, noise, pos_condition, neg_condition, cfg_scale)
    audio, state = decode(run, latent[:, None, :], decoder_state)
    return Frame(acoustic_embed, audio, state)
