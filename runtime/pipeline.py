"""The generation loop of VibeVoice (the original `generate`, token-exact) on the graphs of an ENGINE_DIR.

One batch of B scripts keeps 2B LM rows: rows 0..B-1 are the positive rows (the prompt and what
follows), rows B..2B-1 the negative CFG rows (a context that restarts at every speech start and keeps
only the inputs of diffusion steps). All rows share one slot index into a preallocated cache; each
row says through its own attention-mask row which slots it attends to.

    prompt ids ──[text_embed]──> embeds, voice placeholders <── [acoustic_encoder](voice audio)
        │
        v  step 0: [lm] B positive rows over the prompt (slots 0..S-1)
        │          [lm] negative rows: [speech_start] at position 0 -> slot S-1
        │
   ┌──> token = argmax(control_logits) of each positive row (eos forced once finished)
   │    │  eos / step limit ──> row finished
   │    │  speech_end       ──> zero the row's decoder + semantic states
   │    │  speech_start     ──> negative row forgets its context (mask 0, position 0)
   │    │  not diffusion    ──> negative row drops the slot it consumed this step (mask 0)
   │    │  speech_diffusion ──> negative row keeps it; the row joins this step's diffusion set:
   │    │        noise_k ──[diffusion_sampler](hidden pos, hidden neg, cfg)──> latent, acoustic_embed
   │    │        latent ──[acoustic_decoder](state)──> 3200 samples ──> output (streamed)
   │    │        samples ──[semantic_encoder](state)──> semantic_embed
   │    │        next embed = acoustic_embed + semantic_embed
   │    │  otherwise: next embed = embedding of the token
   │    v
   └── step s+1: ONE [lm] call over all 2B rows, seq 1, writes slot S-1+s+1;
        negative rows take the same input embedding as their positive row, at their own position.

The loop runs at most min(max_length - S, 2 S) steps (max_length = the model's context, or S plus
`max_new_frames`); a row also finishes at step min(max_length - len_i, 2 len_i), without diffusion.

Relation to the original: it runs the negative branch only at steps where some row diffuses and
removes the slot of rows that did not by shifting their cache and mask. Masking the slot here is the
same computation (a masked slot gets exactly zero attention weight, positions count kept slots only),
and batch 1 (the shared fixture) is token-exact. In batches the original has an off-by-one in that
shift (the mask is shifted but not the cache when the row's correction index is one below the cache
length, so the row loses the slot it kept instead of the one it should drop); the runtime does not
reproduce it, so a batched row equals the row generated alone (tests/test_runtime_generate.py).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .audio import prepare_voice
from .backend import Backend, select_backend
from .errors import RuntimeInputError
from .manifest import CONTROL_TOKENS, load_manifest, state_size
from .prompt import Prompt, PromptBuilder
from .script import read_script


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


def prepare_rows(prompts: PromptBuilder, scripts: str | Sequence[str], voices=None) -> list[PreparedRow]:
    """Scripts (text or .txt paths) and voices (a list shared by all scripts, or one list per script)
    -> prompt rows with their normalised voices. Needs no graph: inputs can be checked before loading."""
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
    return rows


def check_context(rows: list[PreparedRow], max_positions: int) -> None:
    """Every prompt must leave the model's context room for at least one step."""
    for i, row in enumerate(rows):
        n = len(row.prompt.input_ids)
        if n >= max_positions:
            which = f"script {i}: " if len(rows) > 1 else ""
            raise RuntimeInputError(f"{which}prompt is {n} tokens, longer than the model's context of "
                                    f"{max_positions} positions")


class Pipeline:
    def __init__(self, engine_dir: str | Path, manifest: dict, backend: Backend):
        self.engine_dir = Path(engine_dir)
        self.manifest = manifest
        self.backend = backend
        model = manifest["model"]
        self.hidden = int(model["hidden_size"])
        self.layers = int(model["num_layers"])
        self.kv_heads = int(model["num_kv_heads"])
        self.head_dim = int(model["head_dim"])
        self.latent_dim = int(model["acoustic_vae_dim"])
        self.max_positions = int(model["max_position_embeddings"])
        self.hop = int(model.get("hop_length", 3200))
        self.sample_rate = int(model.get("sample_rate", 24000))
        self.tokens = dict(manifest["tokens"])
        self.control_ids = np.asarray([self.tokens[name] for name in CONTROL_TOKENS], dtype=np.int64)
        self.idx = {name: i for i, name in enumerate(CONTROL_TOKENS)}
        self.decoder_state = state_size(manifest, "acoustic_decoder")
        self.semantic_state = state_size(manifest, "semantic_encoder")
        self.default_cfg_scale = float((manifest.get("diffusion") or {}).get("default_cfg_scale", 1.3))
        self.prompts = PromptBuilder.from_manifest(engine_dir, manifest)
        self._control_embeds: np.ndarray | None = None

    @classmethod
    def from_engine_dir(cls, engine_dir: str | Path, backend: str | Backend = "auto",
                        threads: int | None = None) -> "Pipeline":
        manifest = load_manifest(engine_dir)
        if not isinstance(backend, Backend):
            backend = select_backend(engine_dir, manifest, backend, threads=threads)
        return cls(engine_dir, manifest, backend)

    def close(self) -> None:
        self.backend.close()

    # --- inputs ---------------------------------------------------------------------------------

    def prepare(self, scripts: str | Sequence[str], voices=None) -> list[PreparedRow]:
        """Scripts (text or .txt paths) and voices (shared list, or one list per script) -> rows."""
        rows = prepare_rows(self.prompts, scripts, voices)
        check_context(rows, self.max_positions)
        return rows

    def control_embeds(self) -> np.ndarray:
        """Embeddings of the 4 control tokens [4, H], computed once."""
        if self._control_embeds is None:
            out = self.backend.run("text_embed", {"input_ids": self.control_ids[None, :]})
            self._control_embeds = np.asarray(out["inputs_embeds"][0], dtype=np.float32)
        return self._control_embeds

    def voice_embeds(self, audio: np.ndarray, frames: int) -> np.ndarray:
        out = self.backend.run("acoustic_encoder", {"audio": audio[None, None, :].astype(np.float32)})
        return out["voice_embeds"][0, :frames]

    # --- generation -----------------------------------------------------------------------------

    def generate(self, scripts, voices=None, cfg_scale: float | None = None, max_new_frames: int | None = None,
                 noise=None, seed: int | None = None, stream: bool = False,
                 on_step: Callable[[int, int], None] | None = None):
        """Generate speech for one or more scripts (batched together).

        stream=False: returns a `Result`. stream=True: returns a generator yielding `(row, chunk)`
        (chunk: float32 [hop]) as frames are produced; its return value (StopIteration.value) is the
        `Result`.

        noise: None (np.random.default_rng(seed).standard_normal per diffusion call), an array
        [frames, >= rows, A] (diffusion call k uses noise[k][:n]), a callable `noise(k, n) -> [n, A]`,
        or a `RowNoise`.
        max_new_frames: cap on generation steps (the original's max_new_tokens); each step makes at
        most one audio frame per row.
        """
        rows = scripts if scripts and isinstance(scripts, list) and isinstance(scripts[0], PreparedRow) \
            else self.prepare(scripts, voices)
        check_context(rows, self.max_positions)
        gen = self._loop(rows, self.default_cfg_scale if cfg_scale is None else float(cfg_scale),
                         max_new_frames, noise, seed, on_step)
        if stream:
            return gen
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                return stop.value

    def _noise_source(self, noise, seed):
        A = self.latent_dim
        if noise is None:
            rng = np.random.default_rng(seed)
            return lambda k, rows, frames: rng.standard_normal((len(rows), A), dtype=np.float32)
        if isinstance(noise, RowNoise):
            return lambda k, rows, frames: noise(rows, frames)
        if callable(noise):
            return lambda k, rows, frames: np.asarray(noise(k, len(rows)), dtype=np.float32)
        table = np.asarray(noise, dtype=np.float32)

        def from_table(k, rows, frames):
            if k >= table.shape[0]:
                raise RuntimeInputError(f"noise table has {table.shape[0]} frames; frame {k} needed")
            return table[k][: len(rows)]
        return from_table

    def _loop(self, rows: list[PreparedRow], cfg_scale: float, max_new_frames: int | None, noise, seed,
              on_step) -> Iterator[tuple[int, np.ndarray]]:
        run = self.backend.run
        B = len(rows)
        R = 2 * B
        H, L, KV, D = self.hidden, self.layers, self.kv_heads, self.head_dim
        i_start, i_end, i_diff, i_eos = (self.idx[n] for n in CONTROL_TOKENS)
        draw = self._noise_source(noise, seed)

        lens = np.asarray([len(r.prompt.input_ids) for r in rows], dtype=np.int64)
        S = int(lens.max())
        if max_new_frames is not None:
            if int(max_new_frames) < 1:
                raise RuntimeInputError(f"--max-new-frames {max_new_frames}: must be at least 1")
            max_length = min(S + int(max_new_frames), self.max_positions)
        else:
            max_length = self.max_positions
        max_steps = min(max_length - S, 2 * S)
        max_step_row = np.minimum(max_length - lens, 2 * lens)
        capacity = S + max_steps

        # 1. prompt: left-padded ids, embeddings with the voice embeddings at the placeholders
        ids = np.full((B, S), self.tokens["pad"], dtype=np.int64)
        attn = np.zeros((B, S), dtype=np.int64)
        speech = np.zeros((B, S), dtype=bool)
        for b, row in enumerate(rows):
            n = lens[b]
            ids[b, S - n:] = row.prompt.input_ids
            attn[b, S - n:] = 1
            speech[b, S - n:] = row.prompt.speech_input_mask
        embeds = np.array(run("text_embed", {"input_ids": ids})["inputs_embeds"], dtype=np.float32)
        encoded: dict[bytes, np.ndarray] = {}
        for b, row in enumerate(rows):
            if not row.voices:
                continue
            parts = []
            for audio, frames in zip(row.voices, row.prompt.voice_frames):
                key = hashlib.sha1(audio.tobytes()).digest()
                if key not in encoded:
                    encoded[key] = self.voice_embeds(audio, frames)
                parts.append(encoded[key])
            embeds[b, speech[b]] = np.concatenate(parts, axis=0)
        positions = np.cumsum(attn, axis=1) - 1
        positions[attn == 0] = 1

        ctrl = self.control_embeds()
        kv = self.backend.kv_cache((L, 2, R, KV, capacity, D))
        mask = np.zeros((R, capacity), dtype=np.int64)
        feed_mask = np.zeros((R, 0), dtype=np.int64)

        # 2. step 0: positive rows over the prompt; negative rows over [speech_start] at position 0
        out = run("lm", {"inputs_embeds": embeds, "attention_mask": attn, "position_ids": positions,
                         "past_kv": np.zeros((L, 2, B, KV, 0, D), dtype=np.float32)})
        kv.write(slice(0, B), 0, out["new_kv"])
        for b in range(B):
            if lens[b] < S:
                kv.zero(b, 0, S - lens[b])  # padding: never attended; keep it clean
        mask[:B, :S] = attn
        neg = run("lm", {"inputs_embeds": ctrl[i_start][None, None, :],
                         "attention_mask": np.ones((1, 1), dtype=np.int64),
                         "position_ids": np.zeros((1, 1), dtype=np.int64),
                         "past_kv": np.zeros((L, 2, 1, KV, 0, D), dtype=np.float32)})
        kv.write(slice(B, R), S - 1, neg["new_kv"])  # one row, broadcast to the B negative rows
        mask[B:, S - 1] = 1
        hidden = np.concatenate([out["hidden"], np.repeat(neg["hidden"], B, axis=0)], axis=0)
        logits = out["control_logits"]

        pos_next = lens.copy()                      # position of each positive row's next input
        neg_pos = np.zeros(B, dtype=np.int64)       # valid slots of each negative row
        finished = np.zeros(B, dtype=bool)
        tokens: list[list[int]] = [[] for _ in range(B)]
        chunks: list[list[np.ndarray]] = [[] for _ in range(B)]
        row_frames = np.zeros(B, dtype=np.int64)
        dec_state = np.zeros((B, self.decoder_state), dtype=np.float32)
        sem_state = np.zeros((B, self.semantic_state), dtype=np.float32)
        next_embed = np.zeros((R, 1, H), dtype=np.float32)
        position_ids = np.zeros((R, 1), dtype=np.int64)
        cfg = np.asarray([cfg_scale], dtype=np.float32)
        k = 0
        steps = 0

        for step in range(max_steps):
            if finished.all():
                break
            slot = S - 1 + step
            if step > 0:
                # 5. one decode call over all 2B rows; the new input is attended by every row. The cache
                # buffer goes in whole (slots >= slot masked) and the new key/value lands in `slot`.
                position_ids[:B, 0] = pos_next
                position_ids[B:, 0] = neg_pos
                past = kv.past(slot)
                slots = past.shape[4]
                if feed_mask.shape[1] != slots + 1:
                    feed_mask = np.zeros((R, slots + 1), dtype=np.int64)
                    feed_mask[:, slots] = 1
                feed_mask[:, :slots] = mask[:, :slots]
                out = run("lm", {"inputs_embeds": next_embed, "attention_mask": feed_mask,
                                 "position_ids": position_ids, "past_kv": past})
                kv.write(slice(0, R), slot, out["new_kv"])
                mask[:, slot] = 1
                hidden = out["hidden"]
                logits = out["control_logits"][:B]
                pos_next += 1
            steps += 1

            # 3. token of each positive row
            choice = np.argmax(logits, axis=1)
            choice[finished] = i_eos
            tok = self.control_ids[choice]
            for b in np.flatnonzero(~finished):
                tokens[b].append(int(tok[b]))

            # 4. bookkeeping
            finished |= choice == i_eos
            finished |= step >= max_step_row
            ended = choice == i_end
            if ended.any():
                dec_state[ended] = 0.0
                sem_state[ended] = 0.0
            diffusing = ~finished & (choice == i_diff)
            starting = ~finished & (choice == i_start)
            mask[B + np.flatnonzero(~diffusing), slot] = 0
            neg_pos[diffusing] += 1
            if starting.any():
                mask[B + np.flatnonzero(starting), : slot + 1] = 0
                neg_pos[starting] = 0
            next_embed[:B, 0] = ctrl[choice]

            diff_rows = np.flatnonzero(diffusing)
            if diff_rows.size:
                z = draw(k, diff_rows, row_frames[diff_rows])
                sampled = run("diffusion_sampler", {"noise": z, "pos_condition": hidden[diff_rows],
                                                     "neg_condition": hidden[B + diff_rows], "cfg_scale": cfg})
                latent = sampled["latent"]
                dec = run("acoustic_decoder", {"latent": latent[:, None, :], "state": dec_state[diff_rows]})
                dec_state[diff_rows] = dec["new_state"]
                audio = np.asarray(dec["audio"], dtype=np.float32)
                sem = run("semantic_encoder", {"audio": audio, "state": sem_state[diff_rows]})
                sem_state[diff_rows] = sem["new_state"]
                next_embed[diff_rows, 0] = sampled["acoustic_embed"] + sem["semantic_embed"][:, 0]
                k += 1
                row_frames[diff_rows] += 1
                for j, b in enumerate(diff_rows):
                    chunk = audio[j, 0]
                    chunks[b].append(chunk)
                    yield int(b), chunk
            next_embed[B:] = next_embed[:B]
            if on_step is not None:
                on_step(step, max_steps)

        audio_out = [np.concatenate(c) if c else np.zeros(0, dtype=np.float32) for c in chunks]
        return Result(audio_out, tokens, [int(f) for f in row_frames], steps, rows)
