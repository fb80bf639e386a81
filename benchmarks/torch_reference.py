"""PyTorch reference of VibeVoice's generation loop: the baseline of `bench_runtime.py`.

A port of the original implementation's `VibeVoiceForConditionalGenerationInference.generate`
(microsoft/VibeVoice, `vibevoice/modular/modeling_vibevoice_inference.py`), batch 1, on the exporter's
model (transformers' `VibeVoiceForConditionalGeneration`, as `vv_export.checkpoint` loads it):

- positive branch: transformers' Qwen2 (`model.model.language_model`) over the prompt, then one
  position per step, with a `DynamicCache`; the next token is the argmax of the lm_head logits
  restricted to the four control tokens (the original masks every other token with -inf, which picks
  the same token; only the 4 rows of lm_head are computed here);
- negative (CFG) branch: its own `DynamicCache` and attention mask, run only on diffusion steps. It
  starts as a single speech_start context; when the positive branch generates speech_start the
  negative context is reset to that single token (the original zeroes the attention mask but for the
  last slot); on a diffusion step it consumes the same input embedding the positive branch consumed
  in that step, at the position given by its attention mask (cumsum - 1, as
  `prepare_inputs_for_generation` computes it);
- diffusion: diffusers' `DPMSolverMultistepScheduler(num_train_timesteps=1000,
  beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")`, `steps` steps, CFG:
  `speech = noise [2n, A]`; each step evaluates the head on `[x[:n], x[:n]]` with conditions
  `[pos; neg]`, guided = neg + cfg * (pos - neg), scheduler step on `cat([guided, guided])`; the
  first half is the latent;
- streaming acoustic decoder and semantic encoder with transformers' padding caches; speech_end
  zeroes both caches;
- next input embedding = multi_modal_projector(latent) + semantic_connector(semantic features), or the
  token's embedding when the step made no audio.

The loop runs at most min(max_new_tokens, 2 * prompt length) steps and stops at eos, as the original
does for one row.

`force_diffusion=True` replaces the control-token choice by speech_diffusion on every step (the
benchmark's fixed-frame-count mode: every step then makes one frame, the same work as a natural run
whose every step is a diffusion step).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from vv_engine_dir import CONTROL_TOKENS


@dataclass
class TorchResult:
    tokens: list[int]                 # generated tokens (control tokens), up to and including eos
    audio: np.ndarray                 # float32 [frames * hop]
    frames: int
    steps: int
    latents: list[np.ndarray] = field(default_factory=list)   # per frame [A]
    first_audio_s: float | None = None                          # seconds from the call to the first chunk
    wall_s: float = 0.0


def make_scheduler(num_train_timesteps: int = 1000, beta_schedule: str = "squaredcos_cap_v2",
                   prediction_type: str = "v_prediction"):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                                       prediction_type=prediction_type)


def _new_padding_cache():
    from transformers.models.vibevoice_acoustic_tokenizer.modeling_vibevoice_acoustic_tokenizer import (
        VibeVoiceAcousticTokenizerConv1dPaddingCache,
    )

    return VibeVoiceAcousticTokenizerConv1dPaddingCache()


def _zero_padding_cache(cache) -> None:
    """The original's `cache.set_to_zero(rows)` for batch 1: a fresh stream."""
    if cache is None:
        return
    for layer in cache.layers.values():
        if getattr(layer, "cache", None) is not None:
            layer.cache.zero_()


class TorchReference:
    """The original generation loop on a transformers VibeVoice model (batch 1)."""

    def __init__(self, model, token_ids: dict, diffusion_steps: int = 10, scheduler=None):
        self.model = model.eval()
        self.net = model.model
        self.lm = self.net.language_model
        self.token_ids = dict(token_ids)
        self.control_ids = [int(self.token_ids[k]) for k in CONTROL_TOKENS]
        self.control_weight = model.lm_head.weight.detach()[self.control_ids].clone()
        self.steps = diffusion_steps
        self.scheduler = scheduler if scheduler is not None else make_scheduler()
        self.latent_dim = model.config.audio_config.hidden_size
        self.hop = int(np.prod(model.config.audio_config.downsampling_ratios))

    # --- pieces ---------------------------------------------------------------------------------

    @torch.no_grad()
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.embed_tokens(ids)

    @torch.no_grad()
    def voice_embeds(self, speech: torch.Tensor) -> torch.Tensor:
        """speech [1, samples] (normalised, a multiple of hop) -> acoustic connector embeddings [1, frames, H].

        Voice latents are the encoder mean (the original adds sigma-VAE noise there)."""
        mean = self.net.audio_tower.encode(speech[:, None, :], sample=False).latents
        return self.net.multi_modal_projector((mean + self.net.latent_bias_factor) * self.net.latent_scaling_factor)

    @torch.no_grad()
    def sample_latent(self, pos: torch.Tensor, neg: torch.Tensor, noise: torch.Tensor, cfg_scale: float):
        """The original `sample_speech_tokens`: noise [2n, A] (only the first n rows matter) -> latent [n, A]."""
        condition = torch.cat([pos, neg], dim=0)
        speech = noise.to(condition)
        self.scheduler.set_timesteps(self.steps)
        head = self.net.diffusion_head
        for t in self.scheduler.timesteps:
            half = speech[: len(speech) // 2]
            combined = torch.cat([half, half], dim=0)
            eps = head(combined, t.repeat(combined.shape[0]).to(combined), condition)
            cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
            half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
            eps = torch.cat([half_eps, half_eps], dim=0)
            speech = self.scheduler.step(eps, t, speech).prev_sample
        return speech[: len(speech) // 2]

    def _lm(self, embeds, mask, position_ids, cache):
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                      past_key_values=cache, use_cache=True)
        return out.last_hidden_state[:, -1, :]

    # --- the loop -------------------------------------------------------------------------------

    @torch.no_grad()
    def stream(self, input_ids, speech_input_mask=None, speech: torch.Tensor | None = None,
               voice_embeds: torch.Tensor | None = None, noise: Callable[[int], torch.Tensor] | None = None,
               cfg_scale: float = 1.3, max_new_tokens: int = 40, force_diffusion: bool = False,
               seed: int = 0) -> Iterator[np.ndarray]:
        """Yields each audio chunk [hop] as it is decoded; returns (StopIteration.value) a TorchResult.

        input_ids [1, S]; speech_input_mask [1, S] (positions that take the voice embeddings);
        speech [1, samples] (normalised voice audio) or precomputed voice_embeds [1, frames, H];
        noise(k) -> [n, A] or [2n, A]: the start noise of frame k (default: torch.randn with `seed`).
        """
        from transformers import DynamicCache

        t_start = time.perf_counter()
        ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long).reshape(1, -1)
        if ids.shape[0] != 1:
            raise ValueError("the PyTorch reference runs batch 1")
        S = ids.shape[1]
        s_id, e_id, d_id, eos_id = self.control_ids
        gen = torch.Generator().manual_seed(seed)

        # prefill embeddings: tokens, with the voice prompt's acoustic embeddings at the speech mask
        embeds = self.embed_tokens(ids)
        if speech_input_mask is not None and (speech is not None or voice_embeds is not None):
            smask = torch.as_tensor(np.asarray(speech_input_mask)).reshape(1, -1).bool()
            if voice_embeds is None:
                speech = torch.as_tensor(np.asarray(speech), dtype=torch.float32).reshape(1, -1)
                voice_embeds = self.voice_embeds(speech)
            n = int(smask.sum())
            embeds[smask] = voice_embeds.reshape(-1, voice_embeds.shape[-1])[:n].to(embeds)

        max_steps = min(int(max_new_tokens), 2 * S)
        pos_cache = DynamicCache(config=self.lm.config)
        neg_cache = DynamicCache(config=self.lm.config)
        pos_mask = torch.ones(1, S, dtype=torch.long)
        neg_mask = torch.ones(1, 1, dtype=torch.long)       # the speech_start context, not yet run
        acoustic_cache = semantic_cache = None
        inputs_embeds = embeds
        position_ids = torch.arange(S)[None]
        tokens: list[int] = []
        chunks: list[np.ndarray] = []
        latents: list[np.ndarray] = []
        first_audio = None
        steps = 0
        k = 0

        for step in range(max_steps):
            hidden = self._lm(inputs_embeds, pos_mask, position_ids, pos_cache)
            steps += 1
            if force_diffusion:
                token = d_id
            else:
                logits = hidden @ self.control_weight.t()
                token = self.control_ids[int(torch.argmax(logits[0]))]
            tokens.append(token)
            if token == eos_id:
                break
            if token == e_id:
                _zero_padding_cache(acoustic_cache)
                _zero_padding_cache(semantic_cache)
            if token == s_id:
                # negative context back to the single speech_start token (zero mask but the last slot)
                neg_mask = torch.zeros_like(neg_mask)
                neg_mask[:, -1] = 1

            next_embed = self.embed_tokens(torch.tensor([[token]]))
            if token == d_id:
                # negative pass: the embedding the positive branch consumed in this step
                neg_in = inputs_embeds[:, -1:, :]
                neg_pos = (neg_mask.cumsum(-1) - 1)[:, -1:]
                neg_hidden = self._lm(neg_in, neg_mask, neg_pos, neg_cache)
                neg_mask = torch.cat([neg_mask, torch.ones(1, 1, dtype=torch.long)], dim=-1)

                if noise is None:
                    z = torch.randn(2, self.latent_dim, generator=gen)
                else:
                    z = torch.as_tensor(np.asarray(noise(k)), dtype=torch.float32).reshape(-1, self.latent_dim)
                    if z.shape[0] == 1:
                        z = torch.cat([z, z], dim=0)
                latent = self.sample_latent(hidden, neg_hidden, z, cfg_scale)          # [1, A]
                scaled = latent[:, None, :] / self.net.latent_scaling_factor - self.net.latent_bias_factor
                dec = self.net.audio_tower.decode(scaled, padding_cache=acoustic_cache, use_cache=True)
                acoustic_cache = dec.padding_cache
                audio = dec.audio                                                          # [1, 1, hop]
                sem = self.net.semantic_tokenizer_encoder(audio, padding_cache=semantic_cache, use_cache=True)
                semantic_cache = sem.padding_cache
                next_embed = (self.net.multi_modal_projector(latent[:, None, :])
                              + self.net.semantic_connector(sem.latents))
                chunk = audio[0, 0].float().cpu().numpy().astype(np.float32)
                chunks.append(chunk)
                latents.append(latent[0].float().cpu().numpy())
                if first_audio is None:
                    first_audio = time.perf_counter() - t_start
                k += 1
                yield chunk

            pos_mask = torch.cat([pos_mask, torch.ones(1, 1, dtype=torch.long)], dim=-1)
            position_ids = torch.tensor([[S + step]])
            inputs_embeds = next_embed

        audio = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
        return TorchResult(tokens=tokens, audio=audio, frames=len(chunks), steps=steps, latents=latents,
                           first_audio_s=first_audio, wall_s=time.perf_counter() - t_start)

    def generate(self, *args, **kwargs) -> TorchResult:
        gen = self.stream(*args, **kwargs)
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                return stop.value
