"""The model steps of VibeVoice-1.5B / 7B: what one step of the step-wise scheduler computes for them (the
original `generate`, token-exact), on the graphs of an ENGINE_DIR.

Every job owns two rows of one shared LM cache [layers, 2, rows, kv_heads, slots, head_dim] (a `KVRows`):
its positive row (the prompt and what follows) and its negative CFG row (a context that restarts at every
speech start and keeps only the inputs of diffusion steps). Each row keeps its OWN next write slot and says
through its own mask row which slots it attends to.

    prefill   the job alone: [lm] batch 1 over its prompt (or over its text only, after a cached voice
              prefix, see below) into its positive row; its negative row is [speech_start] at position 0
              (computed once)
    decode    ONE [lm] call (seq 1) over the rows of the running jobs; the whole cache buffer is the past
              (each row masks what it does not attend), the new input is at index `past`
    choose    token = argmax(control_logits) of each job's positive row, and its bookkeeping:
                eos / step limit  -> the job is done (after this step's frame, if any)
                speech_end        -> zero the job's decoder + semantic states
                speech_start      -> the negative row forgets its context (mask 0, position 0)
                not diffusion     -> the negative row drops the slot it wrote this step (and rewrites it)
                speech_diffusion  -> the negative row keeps it and the job diffuses
    diffuse   [diffusion_sampler](noise, hidden pos, hidden neg, cfg) -> latent, acoustic embedding;
              [acoustic_decoder](latent, state) -> one hop of audio (emitted); [semantic_encoder](audio, state)
              -> semantic embedding; next input = acoustic + semantic embedding (else: the token's)
              (one call per cfg scale over every diffusing job)

Voice prefix reuse: the prompt's first `prompt.prefix_len` tokens (system prompt, voice section, text header)
depend only on the voices. With `reuse_prefix`, their LM cache is computed once (keyed by the voices'
content) and kept in a `PrefixCache`; a job then prefills only its text: one [lm] call with seq = text
length and past = the prefix. Causal attention makes this the same computation.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Hashable

import numpy as np

from .errors import CapacityError, RuntimeInputError
from .kv_rows import KVRows, PrefixCache
from .manifest import CONTROL_TOKENS, state_size
from .prompt import Prompt
from .scheduler import Job, job_limit
from .speech_frame import by_cfg_scale, sample_and_decode


@dataclass
class VibeVoiceFacts:
    """What the model steps need to know of the model (from the manifest, handed down by the pipeline)."""
    hidden: int
    layers: int
    kv_heads: int
    head_dim: int
    latent_dim: int
    max_positions: int
    control_ids: np.ndarray          # token ids of CONTROL_TOKENS, in that order
    decoder_state: int               # flattened streaming state sizes
    semantic_state: int

    @classmethod
    def from_manifest(cls, manifest: dict) -> "VibeVoiceFacts":
        model = manifest["model"]
        tokens = manifest["tokens"]
        return cls(hidden=int(model["hidden_size"]), layers=int(model["num_layers"]),
                   kv_heads=int(model["num_kv_heads"]), head_dim=int(model["head_dim"]),
                   latent_dim=int(model["acoustic_vae_dim"]), max_positions=int(model["max_position_embeddings"]),
                   control_ids=np.asarray([tokens[name] for name in CONTROL_TOKENS], dtype=np.int64),
                   decoder_state=state_size(manifest, "acoustic_decoder"),
                   semantic_state=state_size(manifest, "semantic_encoder"))


def check_prompt_length(tokens: int, max_positions: int, max_new_frames: int | None = None, label: str = "") -> None:
    """The one context rule of a prompt: it must leave the model's context room for at least one step
    (RuntimeInputError, one line; `label` prefixes it, e.g. "script 2: ")."""
    if tokens >= max_positions:
        raise RuntimeInputError(f"{label}prompt is {tokens} tokens, longer than the model's context of "
                                f"{max_positions} positions")
    if job_limit(tokens, max_positions, max_new_frames) < 1:
        raise RuntimeInputError(f"{label}prompt is {tokens} tokens, it leaves no room in the model's context of "
                                f"{max_positions} positions")


SPEECH_START, SPEECH_END, SPEECH_DIFFUSION, EOS = range(len(CONTROL_TOKENS))  # choice indices


@dataclass(eq=False)
class VibeVoiceJob(Job):
    """One script of the 1.5B / 7B: its prompt and voices, then its state (filled by the model steps)."""
    prompt: Prompt
    voice_audio: list = field(default_factory=list)      # normalised audio per voice placeholder group
    voice_embeds: list | None = None                     # or their acoustic_encoder embeddings [frames, H]
    prefix_key: Hashable | None = None                   # the voices' identity, for prefix reuse
    # --- state ---
    rows: tuple[int, int] = (-1, -1)  # (positive row, negative row) in the cache
    pos_next: int = 0                # position (= slot) of the positive row's next input
    neg_pos: int = 0                 # position of the negative row's next input
    neg_slot: int = 0                # slot the negative row's current input was written to
    decoder_state: np.ndarray | None = None
    semantic_state: np.ndarray | None = None
    hidden: np.ndarray | None = None  # [2, H] this step's positive / negative hidden states
    logits: np.ndarray | None = None  # [4] control logits of the positive row
    next_embed: np.ndarray | None = None
    choice: int = -1                 # index into CONTROL_TOKENS
    prefix_reused: bool = False

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, prompt={len(self.prompt.input_ids)} tokens)"


# batch_noise(diffusion call k, job indices, their frames) -> [n, latent]: one noise table for the whole
# batch, the original's batch noise (Pipeline.generate with an array or callable `noise`)
BatchNoise = Callable[[int, list, np.ndarray], np.ndarray]


class VibeVoiceSteps:
    """The model steps of VibeVoice-1.5B / 7B (module docstring); one instance per scheduler."""

    decode_graph = "lm"

    def __init__(self, backend, facts: VibeVoiceFacts, control_embeds: np.ndarray, reuse_prefix: bool = False,
                 prefix_cache: PrefixCache | None = None, batch_noise: BatchNoise | None = None):
        self.backend = backend
        self.facts = facts
        self.max_positions = facts.max_positions
        self.latent_dim = facts.latent_dim
        self.control_embeds = control_embeds       # [4, H]
        self.reuse_prefix = bool(reuse_prefix)
        self.prefix_cache = prefix_cache if prefix_cache is not None else PrefixCache()
        self.batch_noise = batch_noise
        self.capacity = facts.max_positions         # positions the loaded engines hold (set_capacity)
        self.kv = KVRows(backend, facts.layers, facts.kv_heads, facts.head_dim, facts.max_positions)
        self.diffusion_calls = 0                    # the batch noise index
        self.prefill_tokens = 0                     # positions prefilled (figures)
        self._negative_start = None                 # (hidden [H], new_kv) of [speech_start] at position 0
        self._voice_embeds_by_audio: dict[bytes, np.ndarray] = {}

    def set_capacity(self, slots: int) -> None:
        """The engines hold `slots` positions (<= the model's context): jobs and the cache stay within them."""
        self.capacity = int(slots)
        self.kv.max_slots = int(slots)

    # --- what the scheduler asks --------------------------------------------------------------------

    def job_limit(self, job: VibeVoiceJob) -> int:
        return job_limit(len(job.prompt.input_ids), self.capacity, job.max_new_frames)

    def check_context(self, job: VibeVoiceJob, capacity: int) -> None:
        """RuntimeInputError: the prompt leaves no room in the model's context; CapacityError: only in the
        (shorter) context the loaded engines hold."""
        n = len(job.prompt.input_ids)
        check_prompt_length(n, self.max_positions, job.max_new_frames)
        if n >= capacity or job.limit < 1:
            raise CapacityError(f"prompt is {n} tokens, it leaves no room in the context of {capacity} "
                                f"positions the loaded engines hold (rebuild them with a larger plan)")

    def reach(self, job: VibeVoiceJob) -> int:
        """Cache slots the job can need before it ends: its next position + its remaining steps (an upper
        bound: a waiting job's next position is its prompt length)."""
        nxt = job.pos_next if job.steps else len(job.prompt.input_ids)
        return nxt + max(job.limit - job.steps, 0)

    def compact(self, running: list[VibeVoiceJob]) -> None:
        """The cache down to the bucket of the running jobs (KVRows.compact); their rows may move."""
        if not running:
            self.kv.compact(0, 0)
            return
        self.kv.compact(max(max(j.pos_next, j.neg_slot) for j in running) + 1, max(self.reach(j) for j in running))
        for job in running:
            job.rows = self.kv.rows(job)

    def release(self, job: VibeVoiceJob) -> None:
        self.kv.free(job)

    # --- prefill ------------------------------------------------------------------------------------

    def prefill(self, job: VibeVoiceJob, running: int) -> None:
        """The job's prompt alone into its positive row; [speech_start] into its negative row."""
        n = len(job.prompt.input_ids)
        P = int(getattr(job.prompt, "prefix_len", 0) or 0)
        prefix_kv = None
        if self.reuse_prefix and 0 < P < n and self._lm_fits({"batch": 1, "seq": n - P, "past": P}):
            prefix_kv = self.prefix(job)  # else (no profile takes the extend call): a full prefill
        if prefix_kv is not None:
            out = self._lm_alone(self._embeds(job, P), P, prefix_kv)
        else:
            P = 0
            out = self._lm_alone(self._embeds(job, 0), 0, self.kv.empty_past())
        neg_hidden, neg_kv = self._negative_start_row()
        pos_row, neg_row = job.rows = self.kv.take(job, running, n + 1)
        if prefix_kv is not None:
            self.kv.write(pos_row, 0, prefix_kv)
        self.kv.write(pos_row, P, out["new_kv"])
        self.kv.write(neg_row, 0, neg_kv)
        self.kv.mask[pos_row, :n] = 1
        self.kv.mask[neg_row, 0] = 1
        job.hidden = np.stack([np.asarray(out["hidden"][0], dtype=np.float32), neg_hidden])
        job.logits = np.asarray(out["control_logits"][0], dtype=np.float32)
        job.pos_next = n
        job.neg_pos = 0
        job.neg_slot = 0
        job.decoder_state = np.zeros(self.facts.decoder_state, dtype=np.float32)
        job.semantic_state = np.zeros(self.facts.semantic_state, dtype=np.float32)

    def prefix(self, job: VibeVoiceJob, pin: bool = False):
        """The LM cache of the job's voice prefix (its first prompt.prefix_len tokens), from the prefix cache
        or computed now and kept there (`pin`: for good, never evicted: a stored voice's); None when the job
        has no reusable prefix. Sets job.prefix_reused."""
        P = int(getattr(job.prompt, "prefix_len", 0) or 0)
        if job.prefix_key is None or not 0 < P < len(job.prompt.input_ids):
            return None
        key = (job.prefix_key, P, tuple(job.prompt.voice_frames))
        kv = self.prefix_cache.get(key)
        if kv is not None:
            if pin:
                self.prefix_cache.pin(key)
            job.prefix_reused = True
            return kv
        head = VibeVoiceJob(prompt=Prompt(job.prompt.input_ids[:P], job.prompt.speech_input_mask[:P],
                                          job.prompt.voice_frames),
                            voice_audio=job.voice_audio, voice_embeds=job.voice_embeds)
        kv = self._lm_alone(self._embeds(head, 0), 0, self.kv.empty_past())["new_kv"]
        self.prefix_cache.put(key, kv, pin=pin)
        return kv

    def _embeds(self, job: VibeVoiceJob, start: int) -> np.ndarray:
        """Prompt embeddings from token `start` on [1, n - start, H], voice embeddings at the placeholders."""
        prompt = job.prompt
        ids = prompt.input_ids[start:][None, :]
        embeds = np.array(self.backend.run("text_embed", {"input_ids": ids})["inputs_embeds"], dtype=np.float32)
        speech = prompt.speech_input_mask[start:]
        if speech.any():
            embeds[0, speech] = np.concatenate(self._voice_embeds(job), axis=0)
        return embeds

    def _voice_embeds(self, job: VibeVoiceJob) -> list[np.ndarray]:
        if job.voice_embeds is not None and all(e is not None for e in job.voice_embeds):
            return [np.asarray(e, dtype=np.float32) for e in job.voice_embeds]
        parts = []
        for audio, frames in zip(job.voice_audio, job.prompt.voice_frames):
            key = hashlib.sha1(np.ascontiguousarray(audio).tobytes()).digest()
            if key not in self._voice_embeds_by_audio:
                self._voice_embeds_by_audio[key] = encode_voice(self.backend, audio, frames)
            parts.append(self._voice_embeds_by_audio[key])
        return parts

    def _negative_start_row(self):
        if self._negative_start is None:
            out = self.backend.run("lm", {"inputs_embeds": self.control_embeds[SPEECH_START][None, None, :],
                                          "attention_mask": np.ones((1, 1), dtype=np.int64),
                                          "position_ids": np.zeros((1, 1), dtype=np.int64),
                                          "past_kv": self.kv.empty_past()})
            self._negative_start = (np.asarray(out["hidden"][0], dtype=np.float32), out["new_kv"])
        return self._negative_start

    def _lm_alone(self, embeds: np.ndarray, start: int, past_kv) -> dict:
        n = embeds.shape[1]
        feeds = {"inputs_embeds": embeds, "attention_mask": np.ones((1, start + n), dtype=np.int64),
                 "position_ids": np.arange(start, start + n, dtype=np.int64)[None, :], "past_kv": past_kv}
        self._check_fits({"batch": 1, "seq": n, "past": start})
        self.prefill_tokens += n
        return self.backend.run("lm", feeds)

    def _check_fits(self, dims: dict) -> None:
        """The backend's `check_fits("lm", dims)` (TensorRT: its profiles): CapacityError when the call cannot
        run; backends without it accept everything."""
        fits = getattr(self.backend, "check_fits", None)
        if fits is not None:
            try:
                fits("lm", dims)
            except CapacityError:
                raise
            except RuntimeInputError as exc:
                raise CapacityError(str(exc)) from None

    def _lm_fits(self, dims: dict) -> bool:
        try:
            self._check_fits(dims)
        except CapacityError:
            return False
        return True

    # --- decode -------------------------------------------------------------------------------------

    def decode(self, jobs: list[VibeVoiceJob]) -> list[VibeVoiceJob]:
        """One lm call (seq 1) over the rows of every running job; returns the jobs it stepped."""
        if not jobs:
            return []
        pos_rows = np.asarray([j.rows[0] for j in jobs])
        neg_rows = np.asarray([j.rows[1] for j in jobs])
        pos_slots = np.asarray([j.pos_next for j in jobs])
        embeds = [j.next_embed for j in jobs]
        out = self.kv.decode("lm", np.concatenate([pos_rows, neg_rows]),
                             np.concatenate([pos_slots, [j.neg_slot for j in jobs]]),
                             np.concatenate([pos_slots, [j.neg_pos for j in jobs]]), embeds + embeds, self.facts.hidden)
        hidden = np.asarray(out["hidden"], dtype=np.float32)
        logits = np.asarray(out["control_logits"], dtype=np.float32)
        for job, pos_row, neg_row in zip(jobs, pos_rows, neg_rows):
            job.hidden = hidden[[pos_row, neg_row]]
            job.logits = logits[pos_row]
            job.pos_next += 1
        return list(jobs)

    # --- choose -------------------------------------------------------------------------------------

    def choose(self, jobs: list[VibeVoiceJob]) -> None:
        """Token of each job's positive row and its bookkeeping (see the module docstring)."""
        mask = self.kv.mask
        for job in jobs:
            choice = int(np.argmax(job.logits))
            job.choice = choice
            job.tokens.append(int(self.facts.control_ids[choice]))
            job.steps += 1
            finished = choice == EOS
            if choice == SPEECH_END:
                job.decoder_state[:] = 0.0
                job.semantic_state[:] = 0.0
            neg_row = job.rows[1]
            slot = job.neg_slot
            if not finished and choice == SPEECH_DIFFUSION:
                job.neg_pos += 1
                job.neg_slot = slot + 1
            elif not finished and choice == SPEECH_START:
                mask[neg_row, : slot + 1] = 0
                job.neg_pos = 0
                job.neg_slot = 0
            else:
                mask[neg_row, slot] = 0  # dropped; the next input rewrites this slot
            job.next_embed = self.control_embeds[choice].copy()
            if finished or job.steps >= job.limit:
                job.done = True

    # --- diffuse ------------------------------------------------------------------------------------

    def diffuse(self, jobs: list[VibeVoiceJob], emit=None) -> list[tuple[VibeVoiceJob, np.ndarray]]:
        """Diffusion, audio decoder and semantic encoder for the jobs whose token is speech_diffusion;
        emit(job, chunk) gets each frame between the decoder and the semantic encoder."""
        chunks = []
        run = self.backend.run
        for cfg_scale, group in by_cfg_scale(j for j in jobs if j.choice == SPEECH_DIFFUSION).items():
            frames = np.asarray([j.frames for j in group])
            if self.batch_noise is not None:
                noise = self.batch_noise(self.diffusion_calls, [j.index for j in group], frames)
            else:
                noise = np.stack([np.asarray(j.noise(j.frames), dtype=np.float32) for j in group])
            frame = sample_and_decode(run, noise, np.stack([j.hidden[0] for j in group]),
                                      np.stack([j.hidden[1] for j in group]), cfg_scale,
                                      np.stack([j.decoder_state for j in group]))
            audio = frame.audio
            group_chunks = [(job, audio[i, 0].copy()) for i, job in enumerate(group)]
            if emit is not None:
                for job, chunk in group_chunks:
                    emit(job, chunk)
            chunks += group_chunks
            semantic = run("semantic_encoder", {"audio": audio,
                                                "state": np.stack([j.semantic_state for j in group])})
            next_embed = frame.acoustic_embed + np.asarray(semantic["semantic_embed"])[:, 0]
            new_decoder_state = frame.decoder_state
            new_semantic_state = np.asarray(semantic["new_state"], dtype=np.float32)
            self.diffusion_calls += 1
            for i, job in enumerate(group):
                job.decoder_state = new_decoder_state[i].copy()
                job.semantic_state = new_semantic_state[i].copy()
                job.next_embed = next_embed[i].astype(np.float32)
                job.frames += 1
        return chunks


def encode_voice(backend, audio: np.ndarray, frames: int) -> np.ndarray:
    """[acoustic_encoder] of one normalised voice -> its embeddings [frames, H]."""
    out = backend.run("acoustic_encoder", {"audio": audio[None, None, :].astype(np.float32)})
    return out["voice_embeds"][0, :frames]
