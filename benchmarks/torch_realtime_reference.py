"""PyTorch reference of VibeVoice-Realtime-0.5B's streaming loop: the baseline of `bench_realtime.py`.

A port of the original implementation's `VibeVoiceStreamingForConditionalGenerationInference.generate`
(microsoft/VibeVoice, `vibevoice/modular/modeling_vibevoice_streaming_inference.py`), batch 1, on the
exporter's model (`vv_export.realtime.RealtimeModel`, transformers' modules):

- the voice preset's four prefilled states (`vv_export.voices.Preset`: lower text LM, TTS LM, and their
  negatives, each a KV cache and last hidden states) become transformers `DynamicCache`s, fresh per call
  (the caches grow); the positions continue from the preset's (the original's attention masks are all ones,
  so its `cumsum - 1` positions are the cache lengths);
- text windows of 5 tokens: the lower text LM (`model.language_model`, no final norm) on the window's token
  embeddings, then the TTS LM (`model.tts_language_model`) on the same positions with the text LM's hidden
  states as input embeddings plus `tts_input_types(1)`; its last normed hidden state is the positive
  condition;
- then 6 speech frames, each: diffusion (diffusers' `DPMSolverMultistepScheduler` with the checkpoint's
  schedule, `steps` steps, CFG between the positive and the negative TTS LM's last hidden states, exactly as
  the original's `sample_speech_tokens`; frame k starts from `noise(k)`), the streaming acoustic decoder
  (transformers' padding cache) -> one hop of audio, the connector's embedding of the latent fed to the
  positive TTS LM and then to the negative one (`tts_input_types(0)`), and the end-of-speech classifier on
  the positive TTS LM's new hidden state: `sigmoid(logit) > 0.5` (logit > 0) ends speech;
- after the text is spent, speech windows go on until the classifier ends speech or the TTS LM reaches
  the model's context (the original's max_length).

Speech ends at the frame whose classifier fires (the original computes the rest of that 6-frame window,
drawing its noise, and drops its audio: the same audio, less work).

Forced mode (benchmarks): `ignore_eos=True` with `max_new_frames=whole_text_frames(text tokens, after)`
runs every text window and its speech frames, then `after` more frames, whatever the classifier says: the
same work as the ONNX Runtime loop's `ignore_eos` jobs of that many frames.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from torch_reference import _new_padding_cache, make_scheduler  # noqa: E402
from vv_export.realtime import (DEFAULT_CFG_SCALE, DEFAULT_DIFFUSION_STEPS, SPEECH_WINDOW, TEXT_WINDOW,  # noqa: E402
                                RealtimeModel)


def whole_text_frames(text_tokens: int, after: int = 0) -> int:
    """Frames of a run forced through the whole text: every text window's speech window, then `after`."""
    return math.ceil(int(text_tokens) / TEXT_WINDOW) * SPEECH_WINDOW + int(after)


@dataclass
class TorchRealtimeResult:
    audio: np.ndarray                  # float32 [frames * hop]
    frames: int
    text_tokens: int                   # text tokens fed
    eos_logits: list = field(default_factory=list)      # end-of-speech logit after each frame fed
    latents: list = field(default_factory=list)         # per frame [A]
    first_audio_s: float | None = None                   # seconds from the call to the first chunk
    wall_s: float = 0.0


class _Branch:
    """One decoder with its DynamicCache: the next position and the last position's hidden state."""

    def __init__(self, decoder, kv: np.ndarray, hidden: np.ndarray, dtype: torch.dtype):
        from transformers import DynamicCache

        self.decoder = decoder
        self.cache = DynamicCache(config=decoder.config)
        for layer, pair in enumerate(torch.from_numpy(np.asarray(kv)).to(dtype)):  # [L, 2, 1, KV, P, D]
            self.cache.update(pair[0].contiguous(), pair[1].contiguous(), layer)
        self.next = int(kv.shape[4])
        self.last = torch.from_numpy(np.asarray(hidden).reshape(-1, hidden.shape[-1])[-1:]).to(dtype)

    def run(self, embeds: torch.Tensor) -> torch.Tensor:
        """embeds [1, n, H] at the next n positions -> every position's hidden state [1, n, H]."""
        n = embeds.shape[1]
        out = self.decoder(inputs_embeds=embeds, attention_mask=torch.ones(1, self.next + n, dtype=torch.long),
                           position_ids=torch.arange(self.next, self.next + n)[None], cache=self.cache,
                           use_cache=True)
        self.next += n
        self.last = out.last_hidden_state[:, -1, :]
        return out.last_hidden_state


class TorchRealtimeReference:
    """The original streaming loop on a `RealtimeModel` (batch 1), in the model's dtype (float32; a float64
    copy of the model gives the loop with far smaller rounding errors).

    attention: the decoders' attention implementation, set on the model's configs (the model is changed):
    "sdpa", the original's choice on the CPU (its demo loads the model with it), or transformers' "eager"
    (the exporter's); the same values up to float rounding."""

    def __init__(self, model: RealtimeModel, diffusion_steps: int = DEFAULT_DIFFUSION_STEPS,
                 diffusion_settings: dict | None = None, scheduler=None, attention: str = "sdpa"):
        self.model = model.eval()
        self.net = model.model
        self.dtype = next(model.parameters()).dtype
        for decoder in (self.net.language_model, self.net.tts_language_model):
            decoder.config._attn_implementation = attention
        self.steps = int(diffusion_steps)
        self.scheduler = scheduler if scheduler is not None else make_scheduler(**(diffusion_settings or {}))
        decoder_config = self.net.audio_tower.decoder.config
        self.latent_dim = int(decoder_config.hidden_size)
        self.hop = int(np.prod(decoder_config.downsampling_ratios))
        self.max_positions = int(self.net.tts_language_model.config.max_position_embeddings)

    @classmethod
    def from_loaded(cls, loaded, diffusion_steps: int = DEFAULT_DIFFUSION_STEPS, **options) -> "TorchRealtimeReference":
        """From a `vv_export` LoadedModel of the realtime family (its checkpoint's noise schedule)."""
        return cls(loaded.model, diffusion_steps, diffusion_settings=loaded.diffusion, **options)

    # --- pieces ---------------------------------------------------------------------------------

    @torch.no_grad()
    def sample_latent(self, pos: torch.Tensor, neg: torch.Tensor, noise: torch.Tensor, cfg_scale: float):
        """The original `sample_speech_tokens`: noise [2, A] (the first row matters) -> latent [1, A]."""
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

    def _tts_step(self, branch: _Branch, embeds: torch.Tensor, input_type: int) -> torch.Tensor:
        types = torch.full(embeds.shape[:2], input_type, dtype=torch.long)
        return branch.run(embeds + self.net.tts_input_types(types))

    def _noise(self, noise, k: int, gen: torch.Generator) -> torch.Tensor:
        if noise is None:
            return torch.randn(2, self.latent_dim, generator=gen).to(self.dtype)
        z = torch.as_tensor(np.asarray(noise(k))).to(self.dtype).reshape(-1, self.latent_dim)
        return torch.cat([z[:1], z[:1]], dim=0)

    # --- the loop -------------------------------------------------------------------------------

    @torch.no_grad()
    def stream(self, text_ids, preset, noise: Callable[[int], np.ndarray] | None = None,
               cfg_scale: float = DEFAULT_CFG_SCALE, max_new_frames: int | None = None, ignore_eos: bool = False,
               seed: int = 0) -> Iterator[np.ndarray]:
        """Yields each audio chunk [hop] as it is decoded; returns (StopIteration.value) a TorchRealtimeResult.

        text_ids: the text's tokens (the original processor's `text.strip() + "\\n"`); preset: a
        `vv_export.voices.Preset`; noise(k) -> [A], [1, A] or [2, A]: the start noise of frame k (default:
        torch.randn with `seed`, as the original draws it); ignore_eos: run to max_new_frames (or the context).
        """
        t_start = time.perf_counter()
        ids = torch.as_tensor(np.asarray(text_ids), dtype=torch.long).reshape(1, -1)
        gen = torch.Generator().manual_seed(seed)
        caches = preset.caches
        text, pos, neg = (_Branch(decoder, caches[name].kv, caches[name].hidden, self.dtype) for decoder, name in
                          ((self.net.language_model, "text_lm"), (self.net.tts_language_model, "tts_lm"),
                           (self.net.tts_language_model, "neg_tts_lm")))
        decoder_cache = _new_padding_cache()
        limit = max_new_frames if max_new_frames is not None else math.inf
        chunks, latents, eos_logits = [], [], []
        first_audio = None
        used = 0
        done = False
        while not done:
            window = ids[:, used: used + TEXT_WINDOW]
            if window.shape[1]:
                if pos.next + window.shape[1] > self.max_positions:
                    break                       # the original stops at its max_length
                hidden = text.run(self.net.language_model.embed_tokens(window))
                self._tts_step(pos, hidden, 1)
                used += window.shape[1]
            for _ in range(SPEECH_WINDOW):
                k = len(chunks)
                latent = self.sample_latent(pos.last, neg.last, self._noise(noise, k, gen), cfg_scale)  # [1, A]
                scaled = latent[:, :, None] / self.net.latent_scaling_factor - self.net.latent_bias_factor
                dec = self.net.audio_tower.decoder(scaled, padding_cache=decoder_cache, use_cache=True)
                decoder_cache = dec.padding_cache
                chunk = dec.audio[0, 0].float().numpy()
                chunks.append(chunk)
                latents.append(latent[0].float().numpy())
                if first_audio is None:
                    first_audio = time.perf_counter() - t_start
                yield chunk
                if len(chunks) >= limit or pos.next + 1 > self.max_positions:
                    done = True
                    break
                embed = self.net.multi_modal_projector(latent[:, None, :])   # [1, 1, H]
                self._tts_step(pos, embed, 0)
                self._tts_step(neg, embed, 0)
                logit = float(self.model.tts_eos_classifier(pos.last)[0, 0])
                eos_logits.append(logit)
                if logit > 0 and not ignore_eos:
                    done = True
                    break
        audio = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
        return TorchRealtimeResult(audio=audio, frames=len(chunks), text_tokens=used, eos_logits=eos_logits,
                                   latents=latents, first_audio_s=first_audio, wall_s=time.perf_counter() - t_start)

    def generate(self, *args, **kwargs) -> TorchRealtimeResult:
        gen = self.stream(*args, **kwargs)
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                return stop.value
