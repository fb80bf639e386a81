"""VibeVoice generation (the original `generate`, token-exact) on the graphs of an ENGINE_DIR.

`Pipeline` holds the graphs (a backend) and the prompt builder; `generate` speaks one or more scripts.
The loop itself is the step-wise scheduler of `vv_runtime.scheduler` (the one loop of the runtime:
`vv-run`, `Pipeline.generate` and the speech service all drive it): every script is a job with two
rows of a shared LM cache, a positive row (the prompt and what follows) and a negative CFG row (a
context that restarts at every speech start and keeps only the inputs of diffusion steps), each with
its own write slot and attention-mask row.

    prompt ids ──[text_embed]──> embeds, voice placeholders <── [acoustic_encoder](voice audio)
        │
        v  admit: [lm] positive row over its own prompt alone (slots 0..n-1)
        │         negative row: [speech_start] at position 0 -> slot 0
        │
   ┌──> token = argmax(control_logits) of the positive row
   │    │  eos / step limit ──> the job is done
   │    │  speech_end       ──> zero its decoder + semantic states
   │    │  speech_start     ──> negative row forgets its context (mask 0, position 0)
   │    │  not diffusion    ──> negative row drops the slot it wrote this step (mask 0)
   │    │  speech_diffusion ──> negative row keeps it; the job joins this step's diffusion set:
   │    │        noise ──[diffusion_sampler](hidden pos, hidden neg, cfg)──> latent, acoustic_embed
   │    │        latent ──[acoustic_decoder](state)──> 3200 samples ──> output (streamed)
   │    │        samples ──[semantic_encoder](state)──> semantic_embed
   │    │        next embed = acoustic_embed + semantic_embed
   │    │  otherwise: next embed = embedding of the token
   │    v
   └── next step: ONE [lm] call over the rows of all running jobs, seq 1; each row writes its own slot;
        the negative row takes the same input embedding as its positive row, at its own position.

A job runs at most min(max_length - n, 2 n) steps (n its prompt length, max_length the model's
context, or n + `max_new_frames`).

Relation to the original: it runs the negative branch only at steps where some row diffuses and
removes the slot of rows that did not by shifting their cache and mask. Masking the slot here is the
same computation (a masked slot gets exactly zero attention weight, positions count kept slots only),
and batch 1 (the shared fixture) is token-exact. In batches the original left-pads the prompts and
has an off-by-one in that shift (the mask is shifted but not the cache when the row's correction
index is one below the cache length, so the row loses the slot it kept instead of the one it should
drop); the runtime prefills every prompt alone and does not reproduce the bug, so a batched row
equals the row generated alone (tests/test_runtime_generate.py, tests/test_scheduler_*.py).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .audio import prepare_voice
from .backend import Backend
from .errors import RuntimeInputError
from .pipeline_base import EnginePipeline
from .prompt import Prompt, PromptBuilder
from .scheduler import Scheduler, seeded_noise
from .script import read_script
from .vibevoice_steps import VibeVoiceFacts, VibeVoiceJob, VibeVoiceSteps, check_prompt_length, encode_voice


class RowNoise:
    """Noise keyed by (batch row, frame of that row): `fn(row, frame) -> [A]`.

    With it a row sees the same noise whether it is generated alone or in a batch.
    """

    def __init__(self, fn: Callable[[int, int], np.ndarray]):
        self.fn = fn

    def __call__(self, rows: np.ndarray, frames: np.ndarray) -> np.ndarray:
        return np.stack([np.asarray(self.fn(int(r), int(f)), dtype=np.float32) for r, f in zip(rows, frames)])


@dataclass
class PreparedRow:
    parsed: list[tuple[int, str]]
    prompt: Prompt
    voices: list[np.ndarray]       # normalised, zero-padded to a multiple of hop (used voices only)


@dataclass
class Result:
    audio: list[np.ndarray]        # per row, float32 [samples]
    tokens: list[list[int]]        # per row, generated control tokens up to and including the last one
    frames: list[int]              # audio frames per row
    steps: int                     # LM steps run
    rows: list[PreparedRow] = field(default_factory=list)


def prepare_rows(prompts: PromptBuilder, scripts: str | Sequence[str], voices=None,
                 max_positions: int | None = None) -> list[PreparedRow]:
    """Scripts (text or .txt paths) and voices (a list shared by all scripts, or one list per script)
    -> prompt rows with their normalised voices, each prompt checked against the model's context
    (`max_positions`). Needs no graph: inputs are checked before anything loads."""
    if isinstance(scripts, str):
        scripts = [scripts]
    if not scripts:
        raise RuntimeInputError("no script given")
    if voices is None or len(voices) == 0:
        per_row = [[] for _ in scripts]
    elif isinstance(voices[0], (list, tuple)):
        if len(voices) != len(scripts):
            raise RuntimeInputError(f"{len(scripts)} scripts but {len(voices)} voice lists")
        per_row = [list(v) for v in voices]
    else:
        per_row = [list(voices) for _ in scripts]
    loaded: dict[object, tuple[np.ndarray, int]] = {}
    rows = []
    for script, row_voices in zip(scripts, per_row):
        parsed = read_script(script)
        prepared = []
        for j, voice in enumerate(row_voices):
            key = str(voice) if isinstance(voice, (str, Path)) else id(voice)
            if key not in loaded:
                loaded[key] = prepare_voice(voice, label=f"voice {j}")
            prepared.append(loaded[key])
        prompt = prompts.build(parsed, [frames for _, frames in prepared])
        used = [audio for audio, _ in prepared[: len(prompt.voice_frames)]]
        rows.append(PreparedRow(parsed, prompt, used))
    if max_positions is not None:
        for i, row in enumerate(rows):
            check_prompt_length(len(row.prompt.input_ids), max_positions,
                                label=f"script {i}: " if len(rows) > 1 else "")
    return rows


class Pipeline(EnginePipeline):
    """The graphs of an ENGINE_DIR (a backend), the prompt builder and the model facts; `generate` speaks."""

    def __init__(self, engine_dir: str | Path, manifest: dict, backend: Backend,
                 prompts: PromptBuilder | None = None):
        super().__init__(engine_dir, manifest, backend)
        self.facts = VibeVoiceFacts.from_manifest(manifest)
        self.tokens = dict(manifest["tokens"])
        self.prompts = prompts if prompts is not None else PromptBuilder.from_manifest(engine_dir, manifest)
        self._control_embeds: np.ndarray | None = None

    # the model facts, as tests and tools read them
    hidden = property(lambda self: self.facts.hidden)
    layers = property(lambda self: self.facts.layers)
    kv_heads = property(lambda self: self.facts.kv_heads)
    head_dim = property(lambda self: self.facts.head_dim)
    latent_dim = property(lambda self: self.facts.latent_dim)
    max_positions = property(lambda self: self.facts.max_positions)
    control_ids = property(lambda self: self.facts.control_ids)
    decoder_state = property(lambda self: self.facts.decoder_state)
    semantic_state = property(lambda self: self.facts.semantic_state)

    # --- inputs ---------------------------------------------------------------------------------

    def prepare(self, scripts: str | Sequence[str], voices=None) -> list[PreparedRow]:
        """Scripts (text or .txt paths) and voices (shared list, or one list per script) -> rows."""
        return prepare_rows(self.prompts, scripts, voices, self.max_positions)

    def control_embeds(self) -> np.ndarray:
        """Embeddings of the 4 control tokens [4, H], computed once."""
        if self._control_embeds is None:
            out = self.backend.run("text_embed", {"input_ids": self.facts.control_ids[None, :]})
            self._control_embeds = np.asarray(out["inputs_embeds"][0], dtype=np.float32)
        return self._control_embeds

    def voice_embeds(self, audio: np.ndarray, frames: int) -> np.ndarray:
        return encode_voice(self.backend, audio, frames)

    def new_steps(self, reuse_prefix: bool = False, prefix_cache=None, batch_noise=None) -> VibeVoiceSteps:
        """Fresh model steps for a scheduler, with the facts and the control embeddings handed down."""
        return VibeVoiceSteps(self.backend, self.facts, self.control_embeds(), reuse_prefix=reuse_prefix,
                              prefix_cache=prefix_cache, batch_noise=batch_noise)

    # --- generation -----------------------------------------------------------------------------

    def generate(self, scripts, voices=None, cfg_scale: float | None = None, max_new_frames: int | None = None,
                 noise=None, seed: int | None = None, stream: bool = False,
                 on_step: Callable[[int, int], None] | None = None, reuse_prefix: bool = False):
        """Generate speech for one or more scripts (batched together) through the step-wise scheduler.

        stream=False: returns a `Result`. stream=True: returns a generator yielding `(row, chunk)`
        (chunk: float32 [hop]) as frames are produced; its return value (StopIteration.value) is the
        `Result`.

        noise: None (row i draws from its own np.random.default_rng(seed + i), one draw per frame, so a
        row equals its script generated alone with seed + i), a `RowNoise` (row, frame), an array
        [frames, >= rows, A] (diffusion call k uses noise[k][:n] for the n rows diffusing, in row
        order: the original's batch noise), or a callable `noise(k, n) -> [n, A]`.
        max_new_frames: cap on each row's generation steps (the original's max_new_tokens); each step
        makes at most one audio frame per row.
        reuse_prefix: prefill the voice prefix once per voice set and each row's text after it.
        """
        rows = scripts if scripts and isinstance(scripts, list) and isinstance(scripts[0], PreparedRow) \
            else self.prepare(scripts, voices)
        if max_new_frames is not None and int(max_new_frames) < 1:
            raise RuntimeInputError(f"--max-new-frames {max_new_frames}: must be at least 1")
        gen = self._run(rows, self.default_cfg_scale if cfg_scale is None else float(cfg_scale),
                        max_new_frames, noise, seed, on_step, reuse_prefix)
        return self.streamed_or_whole(gen, stream)

    def _run(self, rows: list[PreparedRow], cfg_scale: float, max_new_frames: int | None, noise, seed, on_step,
             reuse_prefix: bool) -> Iterator[tuple[int, np.ndarray]]:
        batch_noise = None
        if noise is not None and not isinstance(noise, RowNoise):
            if callable(noise):
                batch_noise = lambda k, idx, frames: np.asarray(noise(k, len(idx)), dtype=np.float32)  # noqa: E731
            else:
                table = np.asarray(noise, dtype=np.float32)

                def batch_noise(k, idx, frames):
                    if k >= table.shape[0]:
                        raise RuntimeInputError(f"noise table has {table.shape[0]} frames; frame {k} needed")
                    return table[k][: len(idx)]
        sched = Scheduler(self, max_batch=len(rows), reuse_prefix=reuse_prefix, batch_noise=batch_noise)
        jobs = []
        for i, row in enumerate(rows):
            if isinstance(noise, RowNoise):
                row_noise = (lambda i: lambda frame: noise.fn(i, frame))(i)
            else:
                row_noise = seeded_noise(None if seed is None else int(seed) + i, self.latent_dim)
            key = tuple(hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest() for a in row.voices)
            jobs.append(sched.add(VibeVoiceJob(prompt=row.prompt, voice_audio=row.voices, cfg_scale=cfg_scale,
                                      max_new_frames=max_new_frames, noise=row_noise, prefix_key=key)))
        total = max(job.limit for job in jobs)
        chunks: list[list[np.ndarray]] = [[] for _ in rows]
        while sched.busy:
            out = sched.step()
            for job, chunk in out.chunks:
                chunks[job.index].append(chunk)
                yield job.index, chunk
            for job in out.finished:
                if job.error is not None:
                    raise job.error
            if on_step is not None:
                on_step(sched.steps - 1, total)
        audio_out = [np.concatenate(c) if c else np.zeros(0, dtype=np.float32) for c in chunks]
        return Result(audio_out, [list(j.tokens) for j in jobs], [int(j.frames) for j in jobs], sched.steps, rows)
