"""The step-wise scheduler: VibeVoice's generation loop (the original `generate`, token-exact) as a
state that a caller drives one step at a time, with requests joining and leaving between steps.

Every request (a `Job`) owns two rows of one shared LM cache [L, 2, R, KV, slots, D]: its positive
row (the prompt and what follows) and its negative CFG row (a context that restarts at every speech
start and keeps only the inputs of diffusion steps). Each row keeps its OWN next write slot and says
through its own attention-mask row which slots it attends to, so rows admitted at different times
coexist: one decode call (seq 1) serves all of them, its new key/value lands in each row's own slot.

    step():
      retire    cancelled jobs leave; their rows are free at once
      decode    ONE [lm] call (seq 1) over the rows of the running jobs; the whole cache buffer is the
                past (each row masks what it does not attend), the new input is at index `past`
      admit     waiting jobs join (up to max_batch): each prompt is prefilled ALONE ([lm] batch 1 over
                its prompt, or over its text only after a cached voice prefix, see below); its negative
                row is [speech_start] at position 0 (computed once); both rows go into free cache rows
      choose    token = argmax(control_logits) of each job's positive row, and its bookkeeping:
                  eos / step limit  -> the job is done (after this step's frame, if any)
                  speech_end        -> zero the job's decoder + semantic states
                  speech_start      -> the negative row forgets its context (mask 0, position 0)
                  not diffusion     -> the negative row drops the slot it wrote this step (and rewrites it)
                  speech_diffusion  -> the negative row keeps it and the job diffuses
      diffuse   [diffusion_sampler](noise, hidden pos, hidden neg, cfg) -> latent, acoustic embedding;
                [acoustic_decoder](latent, state) -> one hop of audio; [semantic_encoder](audio, state)
                -> semantic embedding; next input = acoustic + semantic embedding (else: the token's)
                (one call per cfg scale over every diffusing job)
      emit      the audio frames of this step, per job
      retire    finished jobs leave

Equal to alone: every computation of a job depends only on the job (its prompt prefilled alone, its
own rows, positions and mask, its own decoder/semantic states, its own noise: `noise(frame)`, by
default its own `numpy` generator from its seed, one draw per frame). Other jobs change only the
shapes of the shared calls (rows, cache slots), so a job's tokens are those it gets alone and its
audio equals its audio alone up to float reordering of the batched kernels (tests: 1e-4 of the peak).

Buckets: the row count R and the cache slots both come in powers of two (`bucket_slots`), so the
decode shapes of a TensorRT profile / CUDA graph repeat. Rows of finished jobs are reused by the next
admissions; whenever a job leaves (finished, failed or cancelled) the rows shrink to the bucket of
2 x running jobs (rows moved down), and the slots are cut when at most a quarter are in use or no
running job can reach the current bucket.

Capacity (profile-bound backends, TensorRT): a decode call must fit ONE lm decode profile in rows AND
slots (`limits()["lm_decode_profiles"]`: e.g. `decode` 32 rows x 4096 slots, `decode_long` 2 rows x
the context). A waiting job joins only when (rows after its admission, the bucket of the largest cache
any running job or it can reach = next position + remaining steps) fits some profile; otherwise it
waits, in order; it fails (CapacityError) only when it cannot run even alone. A failure while one job
is admitted fails that job only.

Voice prefix reuse: the prompt's first `prompt.prefix_len` tokens (system prompt, voice section, text
header) depend only on the voices. With `reuse_prefix`, their LM cache is computed once (keyed by the
voices' content) and kept in a `PrefixCache`; a job then prefills only its text: one [lm] call with
seq = text length and past = the prefix. Causal attention makes this the same computation (tokens
equal to the full prefill; tests/test_scheduler_*.py).
"""

from __future__ import annotations

import collections
import hashlib
import itertools
from dataclasses import dataclass, field
from typing import Callable, Hashable

import numpy as np

from .backend import bucket_slots
from .errors import CapacityError, RuntimeInputError
from .manifest import CONTROL_TOKENS
from .prompt import Prompt

MIN_ROWS = 2


def seeded_noise(seed: int | None, size: int) -> Callable[[int], np.ndarray]:
    """A job's own noise: its numpy generator from `seed`, one draw of `size` per frame, in frame order."""
    rng = np.random.default_rng(seed)
    drawn = [0]

    def draw(frame: int) -> np.ndarray:
        if frame != drawn[0]:
            raise RuntimeError(f"noise drawn for frame {frame}, expected frame {drawn[0]}")
        drawn[0] += 1
        return rng.standard_normal(size, dtype=np.float32)
    return draw


def job_limit(prompt_len: int, max_positions: int, max_new_frames: int | None) -> int:
    """Most steps of a job: the original's min(max_length - len, 2 len), max_length = the model's context
    or len + max_new_frames."""
    max_length = max_positions if max_new_frames is None else min(prompt_len + int(max_new_frames), max_positions)
    return max(0, min(max_length - prompt_len, 2 * prompt_len))


@dataclass(eq=False)
class Job:
    """One request in the scheduler: its inputs, then its state (filled by the scheduler)."""
    prompt: Prompt
    voice_audio: list = field(default_factory=list)      # normalised audio per voice placeholder group
    voice_embeds: list | None = None                     # or their acoustic_encoder embeddings [frames, H]
    cfg_scale: float = 1.3
    max_new_frames: int | None = None
    noise: Callable[[int], np.ndarray] | None = None      # frame -> [A]; None: seeded_noise(seed)
    seed: int | None = None
    prefix_key: Hashable | None = None                   # voices' identity, for prefix reuse
    tag: object = None                                   # the caller's
    # --- state ---
    index: int = -1                  # admission order (the row order of batch noise tables)
    rows: tuple[int, int] = (-1, -1)  # (positive row, negative row) in the cache
    limit: int = 0
    steps: int = 0
    frames: int = 0
    tokens: list = field(default_factory=list)
    pos_next: int = 0                # position (= slot) of the positive row's next input
    neg_pos: int = 0                 # position of the negative row's next input
    neg_slot: int = 0                # slot the negative row's current input was written to
    dec_state: np.ndarray | None = None
    sem_state: np.ndarray | None = None
    hidden: np.ndarray | None = None  # [2, H] this step's positive / negative hidden states
    logits: np.ndarray | None = None
    next_embed: np.ndarray | None = None
    choice: int = -1
    done: bool = False
    cancelled: bool = False
    error: BaseException | None = None
    prefix_reused: bool = False

    def __repr__(self) -> str:
        return (f"Job(index={self.index}, prompt={len(self.prompt.input_ids)} tokens, rows={self.rows}, "
                f"steps={self.steps}, frames={self.frames}, done={self.done}, cancelled={self.cancelled}, "
                f"error={self.error!r}, tag={self.tag!r})")


class PrefixCache:
    """LM caches of voice prefixes: key -> new_kv [L, 2, 1, KV, P, D].

    Pinned entries (the stored voices' prefixes, computed once when the voice is added) are never
    evicted; the other entries are LRU, evicted while the whole cache is over `max_bytes`."""

    def __init__(self, max_bytes: int = 256 << 20):
        self.max_bytes = int(max_bytes)
        self._items: collections.OrderedDict = collections.OrderedDict()
        self._pinned: set = set()
        self.hits = 0
        self.misses = 0

    def get(self, key):
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
            self.hits += 1
        else:
            self.misses += 1
        return item

    def put(self, key, kv, pin: bool = False) -> None:
        self._items[key] = kv
        self._items.move_to_end(key)
        if pin:
            self._pinned.add(key)
        while sum(_nbytes(v) for v in self._items.values()) > self.max_bytes:
            victim = next((k for k in self._items if k not in self._pinned and k != key), None)
            if victim is None:
                break
            del self._items[victim]

    def pin(self, key) -> None:
        """Keep `key` (when present) for good: it is no longer evicted."""
        if key in self._items:
            self._pinned.add(key)

    def unpin(self, key) -> None:
        self._pinned.discard(key)

    @property
    def pinned(self) -> int:
        return sum(1 for k in self._items if k in self._pinned)

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()
        self._pinned.clear()


def _nbytes(kv) -> int:
    return int(getattr(kv, "nbytes", 0) or (kv.numel() * kv.element_size()))


@dataclass
class StepOutput:
    chunks: list                     # [(job, float32 [hop])] in job admission order
    finished: list                   # jobs that left at this step (done, cancelled or failed)
    admitted: list                   # jobs that joined at this step


class Scheduler:
    """The generation state of a set of jobs, advanced by `step()` (see the module docstring)."""

    def __init__(self, pipeline, max_batch: int = 8, reuse_prefix: bool = False,
                 prefix_cache: PrefixCache | None = None,
                 batch_noise: Callable | None = None):
        self.pipe = pipeline
        self.backend = pipeline.backend
        self.max_batch = int(max_batch)
        self.reuse_prefix = bool(reuse_prefix)
        self.prefix_cache = prefix_cache if prefix_cache is not None else PrefixCache()
        # legacy noise of Pipeline.generate: batch_noise(k, job indices, frames) -> [n, A] for diffusion call k
        self.batch_noise = batch_noise
        p = pipeline
        self.L, self.KV, self.D, self.H = p.layers, p.kv_heads, p.head_dim, p.hidden
        self.A = p.latent_dim
        self.cap = p.max_positions
        limits = getattr(self.backend, "limits", None)
        limits = limits() if limits is not None else None
        # (rows, past) maxima of each lm decode profile (TensorRT); None: any decode shape runs
        self.decode_profiles: list[tuple[int, int]] | None = None
        if isinstance(limits, dict):  # a profile-bound backend (TensorRT): stay inside its engines
            profiles = limits.get("lm_decode_profiles")
            if isinstance(profiles, list):
                self.decode_profiles = [(int(p["rows"]), int(p["past"])) for p in profiles
                                        if isinstance(p, dict) and isinstance(p.get("rows"), int)
                                        and isinstance(p.get("past"), int)]
            if self.decode_profiles is not None and self.decode_profiles:
                self.cap = min(self.cap, max(past for _, past in self.decode_profiles))
                self.max_batch = max(1, min(self.max_batch, max(rows for rows, _ in self.decode_profiles) // 2))
            else:
                if isinstance(limits.get("lm_decode_past"), int):
                    self.cap = min(self.cap, int(limits["lm_decode_past"]))
                if isinstance(limits.get("lm_decode_rows"), int):
                    self.max_batch = max(1, min(self.max_batch, int(limits["lm_decode_rows"]) // 2))
        self.i_start, self.i_end, self.i_diff, self.i_eos = (p.idx[n] for n in CONTROL_TOKENS)
        self.waiting: collections.deque[Job] = collections.deque()
        self.jobs: list[Job] = []      # running, in admission order
        self.row_owner: list[Job | None] = []
        self.kv = None
        self.feed: np.ndarray | None = None  # [R, slots + 1] attention mask of the decode call
        self.k = 0                     # diffusion calls so far (batch noise index)
        self.steps = 0
        self._indices = itertools.count()
        self._neg_start = None         # (hidden [H], new_kv [L, 2, 1, KV, 1, D]) of [speech_start] at position 0
        self._encoded: dict[bytes, np.ndarray] = {}
        self._failed: list[Job] = []
        self.mask: np.ndarray | None = None   # a view of feed[:, :slots]
        self.prefill_tokens = 0        # positions prefilled (figures)

    # --- the caller's interface -----------------------------------------------------------------

    def add(self, job: Job) -> Job:
        """Queue a job; it joins at the next step with room (at most max_batch jobs run together)."""
        job.index = next(self._indices)
        job.limit = job_limit(len(job.prompt.input_ids), self.cap, job.max_new_frames)
        if job.noise is None:
            job.noise = seeded_noise(job.seed, self.A)
        self.waiting.append(job)
        return job

    def cancel(self, job: Job) -> None:
        """The job leaves at the next step (its rows are freed then)."""
        job.cancelled = True

    @property
    def busy(self) -> bool:
        return bool(self.jobs or self.waiting)

    @property
    def rows_in_use(self) -> int:
        return 2 * len(self.jobs)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, slots) of the cache buffer now (0, 0 before the first admission)."""
        if self.kv is None:
            return 0, 0
        return len(self.row_owner), int(self.kv.data.shape[4])

    def step(self, emit: Callable[[Job, np.ndarray], None] | None = None) -> StepOutput:
        """One step of every running job (and the admission of waiting ones).

        emit(job, chunk), when given, receives each frame as soon as the acoustic decoder made it, before
        the semantic encoder runs for the next step's input (earlier first audio for a streaming caller);
        the frames are in the returned StepOutput too."""
        left = self.retire_cancelled()
        stepped = self.decode()
        admitted = self.admit()
        stepped += admitted
        self.choose(stepped)
        chunks = self.diffuse(stepped, emit)
        left += self.retire_finished()
        self.steps += 1
        return StepOutput(chunks, left, admitted)

    # --- phases ---------------------------------------------------------------------------------

    def retire_cancelled(self) -> list[Job]:
        left = []
        for job in list(self.waiting):
            if job.cancelled:
                self.waiting.remove(job)
                job.done = True
                left.append(job)
        running = False
        for job in list(self.jobs):
            if job.cancelled:
                self._free(job)
                left.append(job)
                running = True
        if running:
            self._compact()
        return left

    def retire_finished(self) -> list[Job]:
        left = [job for job in self.jobs if job.done]
        for job in left:
            self._free(job)
        left, self._failed = self._failed + left, []
        if left:
            self._compact()
        return left

    def decode(self) -> list[Job]:
        """One lm call (seq 1) over the rows of every running job; returns the jobs it stepped."""
        jobs = [job for job in self.jobs if not job.done]
        if not jobs:
            return []
        R = len(self.row_owner)
        pos_rows = np.asarray([j.rows[0] for j in jobs])
        neg_rows = np.asarray([j.rows[1] for j in jobs])
        pos_slots = np.asarray([j.pos_next for j in jobs])
        neg_slots = np.asarray([j.neg_slot for j in jobs])
        top = int(max(pos_slots.max(), neg_slots.max()))
        past = self._past(top)
        embeds = np.zeros((R, 1, self.H), dtype=np.float32)
        positions = np.zeros((R, 1), dtype=np.int64)
        for j in jobs:
            embeds[j.rows[0], 0] = j.next_embed
            embeds[j.rows[1], 0] = j.next_embed
        positions[pos_rows, 0] = pos_slots
        positions[neg_rows, 0] = [j.neg_pos for j in jobs]
        out = self.backend.run("lm", {"inputs_embeds": embeds, "attention_mask": self.feed,
                                      "position_ids": positions, "past_kv": past})
        new_kv = out["new_kv"]
        self._write_rows(new_kv, np.concatenate([pos_rows, neg_rows]), np.concatenate([pos_slots, neg_slots]))
        self.mask[pos_rows, pos_slots] = 1
        self.mask[neg_rows, neg_slots] = 1
        hidden = np.asarray(out["hidden"], dtype=np.float32)
        logits = np.asarray(out["control_logits"], dtype=np.float32)
        for j in jobs:
            j.hidden = hidden[list(j.rows)]
            j.logits = logits[j.rows[0]]
            j.pos_next += 1
        return jobs

    def admit(self) -> list[Job]:
        """Prefill waiting jobs alone, up to max_batch running; place their rows into the cache."""
        admitted = []
        while self.waiting and len(self.jobs) < self.max_batch:
            job = self.waiting[0]
            try:
                if not self._room_for(job):
                    break  # fits alone, not beside the running jobs: it waits (in order) for them to leave
                self.waiting.popleft()
                self._prefill(job)
            except Exception as exc:  # noqa: BLE001 -- one job's failure fails that job only
                if self.waiting and self.waiting[0] is job:
                    self.waiting.popleft()
                self._drop(job, exc)
                continue
            admitted.append(job)
        return admitted

    def _drop(self, job: Job, exc: BaseException) -> None:
        """A job that failed at admission leaves (its rows, if it took any, are freed)."""
        if job in self.jobs or any(owner is job for owner in self.row_owner):
            self._free(job)
        job.error = exc
        job.done = True
        self._failed.append(job)  # reported by retire_finished()

    # --- capacity (the decode profiles of a profile-bound backend) -------------------------------

    @staticmethod
    def rows_for(jobs: int) -> int:
        """The cache rows bucket of `jobs` jobs: the next power of two of 2 * jobs (at least MIN_ROWS)."""
        return max(MIN_ROWS, 1 << (2 * max(jobs, 1) - 1).bit_length())

    @staticmethod
    def reach(job: Job) -> int:
        """Cache slots the job can need before it ends: its next position + its remaining steps (an upper
        bound: a waiting job's next position is its prompt length)."""
        nxt = job.pos_next if job.steps else len(job.prompt.input_ids)
        return nxt + max(job.limit - job.steps, 0)

    def decode_fits(self, rows: int, slots: int) -> bool:
        """Whether a decode call of `rows` rows over `slots` cache slots fits one lm decode profile
        (always true on a backend without profiles)."""
        if self.decode_profiles is not None and not any(rows <= r and slots <= p for r, p in self.decode_profiles):
            return False
        fits = getattr(self.backend, "check_fits", None)
        if fits is None:
            return True
        try:
            fits("lm", {"batch": int(rows), "seq": 1, "past": int(slots)})
        except RuntimeInputError:
            return False
        return True

    def _room_for(self, job: Job) -> bool:
        """True: the job can join now (rows after its admission and the largest cache any running job,
        or it, can reach fit one decode profile). False: it fits alone but not now (it waits).
        CapacityError: it cannot run even alone. RuntimeInputError: a prompt beyond the context."""
        n = len(job.prompt.input_ids)
        self._check_context(job)
        own = bucket_slots(self.reach(job), self.cap)
        if not self.decode_fits(MIN_ROWS, own):
            raise CapacityError(f"a request of {n} prompt tokens and up to {job.limit} steps needs an LM cache of "
                                f"{own} slots, beyond every decode profile of the loaded engines "
                                f"({self._profiles_text()}); rebuild the engines with a larger plan or ask for "
                                f"fewer frames (max_new_frames)")
        if not self.jobs:
            return True
        free = sum(o is None for o in self.row_owner)
        rows = len(self.row_owner) if free >= 2 else self.rows_for(len(self.jobs) + 1)
        need = max([self.reach(j) for j in self.jobs] + [self.reach(job), self.shape[1]])
        return self.decode_fits(rows, bucket_slots(need, self.cap))

    def _check_context(self, job: Job) -> None:
        """RuntimeInputError: the prompt leaves no room in the model's context; CapacityError: only in the
        (shorter) context the loaded engines hold."""
        n = len(job.prompt.input_ids)
        model = int(self.pipe.max_positions)
        if n >= model:
            raise RuntimeInputError(f"prompt is {n} tokens, longer than the model's context of {model} positions")
        if job_limit(n, model, job.max_new_frames) < 1:
            raise RuntimeInputError(f"prompt is {n} tokens, it leaves no room in the model's context of "
                                    f"{model} positions")
        if n >= self.cap or job.limit < 1:
            raise CapacityError(f"prompt is {n} tokens, it leaves no room in the context of {self.cap} "
                                f"positions the loaded engines hold (rebuild them with a larger plan)")

    def _profiles_text(self) -> str:
        if not self.decode_profiles:
            return "no decode profile"
        return ", ".join(f"{r} rows x {p} slots" for r, p in self.decode_profiles)

    def choose(self, jobs: list[Job]) -> None:
        """Token of each job's positive row and its bookkeeping (see the module docstring)."""
        ctrl = self.pipe.control_embeds()
        for job in jobs:
            choice = int(np.argmax(job.logits))
            job.choice = choice
            job.tokens.append(int(self.pipe.control_ids[choice]))
            job.steps += 1
            finished = choice == self.i_eos
            if choice == self.i_end:
                job.dec_state[:] = 0.0
                job.sem_state[:] = 0.0
            neg = job.rows[1]
            cur = job.neg_slot
            if not finished and choice == self.i_diff:
                job.neg_pos += 1
                job.neg_slot = cur + 1
            elif not finished and choice == self.i_start:
                self.mask[neg, : cur + 1] = 0
                job.neg_pos = 0
                job.neg_slot = 0
            else:
                self.mask[neg, cur] = 0  # dropped; the next input rewrites this slot
            job.next_embed = ctrl[choice].copy()
            if finished or job.steps >= job.limit:
                job.done = True
            if finished:
                job.choice = self.i_eos

    def diffuse(self, jobs: list[Job], emit=None) -> list[tuple[Job, np.ndarray]]:
        """Diffusion, audio decoder and semantic encoder for the jobs whose token is speech_diffusion;
        emit (see step) gets each frame between the decoder and the semantic encoder."""
        diffusing = sorted((j for j in jobs if j.choice == self.i_diff), key=lambda j: j.index)
        chunks = []
        by_cfg: dict[float, list[Job]] = {}
        for job in diffusing:
            by_cfg.setdefault(job.cfg_scale, []).append(job)
        run = self.backend.run
        for cfg_scale, group in by_cfg.items():
            frames = np.asarray([j.frames for j in group])
            if self.batch_noise is not None:
                z = np.asarray(self.batch_noise(self.k, [j.index for j in group], frames), dtype=np.float32)
            else:
                z = np.stack([np.asarray(j.noise(j.frames), dtype=np.float32) for j in group])
            pos = np.stack([j.hidden[0] for j in group])
            neg = np.stack([j.hidden[1] for j in group])
            sampled = run("diffusion_sampler", {"noise": z, "pos_condition": pos, "neg_condition": neg,
                                                 "cfg_scale": np.asarray([cfg_scale], dtype=np.float32)})
            dec = run("acoustic_decoder", {"latent": np.asarray(sampled["latent"])[:, None, :],
                                           "state": np.stack([j.dec_state for j in group])})
            audio = np.asarray(dec["audio"], dtype=np.float32)
            group_chunks = [(job, audio[i, 0].copy()) for i, job in enumerate(group)]
            if emit is not None:
                for job, chunk in group_chunks:
                    emit(job, chunk)
            chunks += group_chunks
            sem = run("semantic_encoder", {"audio": audio, "state": np.stack([j.sem_state for j in group])})
            next_embed = np.asarray(sampled["acoustic_embed"]) + np.asarray(sem["semantic_embed"])[:, 0]
            new_dec = np.asarray(dec["new_state"], dtype=np.float32)
            new_sem = np.asarray(sem["new_state"], dtype=np.float32)
            self.k += 1
            for i, job in enumerate(group):
                job.dec_state = new_dec[i].copy()
                job.sem_state = new_sem[i].copy()
                job.next_embed = next_embed[i].astype(np.float32)
                job.frames += 1
        chunks.sort(key=lambda item: item[0].index)
        return chunks

    # --- admission internals --------------------------------------------------------------------

    def _embeds(self, job: Job, start: int) -> np.ndarray:
        """Prompt embeddings from token `start` on [1, n - start, H], voice embeddings at the placeholders."""
        prompt = job.prompt
        ids = prompt.input_ids[start:][None, :]
        embeds = np.array(self.backend.run("text_embed", {"input_ids": ids})["inputs_embeds"], dtype=np.float32)
        speech = prompt.speech_input_mask[start:]
        if speech.any():
            embeds[0, speech] = np.concatenate(self._voice_embeds(job), axis=0)
        return embeds

    def _voice_embeds(self, job: Job) -> list[np.ndarray]:
        if job.voice_embeds is not None and all(e is not None for e in job.voice_embeds):
            return [np.asarray(e, dtype=np.float32) for e in job.voice_embeds]
        parts = []
        for audio, frames in zip(job.voice_audio, job.prompt.voice_frames):
            key = hashlib.sha1(np.ascontiguousarray(audio).tobytes()).digest()
            if key not in self._encoded:
                self._encoded[key] = self.pipe.voice_embeds(audio, frames)
            parts.append(self._encoded[key])
        return parts

    def _neg_start_row(self):
        if self._neg_start is None:
            ctrl = self.pipe.control_embeds()
            out = self.backend.run("lm", {"inputs_embeds": ctrl[self.i_start][None, None, :],
                                          "attention_mask": np.ones((1, 1), dtype=np.int64),
                                          "position_ids": np.zeros((1, 1), dtype=np.int64),
                                          "past_kv": np.zeros((self.L, 2, 1, self.KV, 0, self.D), np.float32)})
            self._neg_start = (np.asarray(out["hidden"][0], dtype=np.float32), out["new_kv"])
        return self._neg_start

    def _lm_alone(self, embeds: np.ndarray, start: int, past_kv) -> dict:
        n = embeds.shape[1]
        feeds = {"inputs_embeds": embeds, "attention_mask": np.ones((1, start + n), dtype=np.int64),
                 "position_ids": np.arange(start, start + n, dtype=np.int64)[None, :], "past_kv": past_kv}
        self._check_fits({"batch": 1, "seq": n, "past": start})
        self.prefill_tokens += n
        return self.backend.run("lm", feeds)

    def prefix(self, job: Job, pin: bool = False):
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
        head = Job(Prompt(job.prompt.input_ids[:P], job.prompt.speech_input_mask[:P], job.prompt.voice_frames),
                   job.voice_audio, job.voice_embeds)
        empty = np.zeros((self.L, 2, 1, self.KV, 0, self.D), dtype=np.float32)
        kv = self._lm_alone(self._embeds(head, 0), 0, empty)["new_kv"]
        self.prefix_cache.put(key, kv, pin=pin)
        return kv

    def _prefill(self, job: Job) -> None:
        n = len(job.prompt.input_ids)
        self._check_context(job)
        empty = np.zeros((self.L, 2, 1, self.KV, 0, self.D), dtype=np.float32)
        P = int(getattr(job.prompt, "prefix_len", 0) or 0)
        prefix_kv = None
        if self.reuse_prefix and 0 < P < n and self._lm_fits({"batch": 1, "seq": n - P, "past": P}):
            prefix_kv = self.prefix(job)  # else (no profile takes the extend call): a full prefill
        if prefix_kv is not None:
            out = self._lm_alone(self._embeds(job, P), P, prefix_kv)
        else:
            P = 0
            out = self._lm_alone(self._embeds(job, 0), 0, empty)
        neg_hidden, neg_kv = self._neg_start_row()
        pos_row, neg_row = self._take_rows(job, n)
        if prefix_kv is not None:
            self.kv.write(slice(pos_row, pos_row + 1), 0, prefix_kv)
        self.kv.write(slice(pos_row, pos_row + 1), P, out["new_kv"])
        self.kv.write(slice(neg_row, neg_row + 1), 0, neg_kv)
        self.mask[pos_row, :n] = 1
        self.mask[neg_row, 0] = 1
        job.hidden = np.stack([np.asarray(out["hidden"][0], dtype=np.float32), neg_hidden])
        job.logits = np.asarray(out["control_logits"][0], dtype=np.float32)
        job.pos_next = n
        job.neg_pos = 0
        job.neg_slot = 0
        job.dec_state = np.zeros(self.pipe.decoder_state, dtype=np.float32)
        job.sem_state = np.zeros(self.pipe.semantic_state, dtype=np.float32)
        self.jobs.append(job)

    # --- the shared cache -----------------------------------------------------------------------

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

    def _new_cache(self, rows: int, slots: int):
        kv = self.backend.kv_cache((self.L, 2, rows, self.KV, self.cap, self.D))
        kv.reserve(slots)
        return kv

    def _resize(self, rows: int, slots: int, moves: list[tuple[int, int]] | None = None) -> None:
        """A cache of `rows` rows and at least `slots` slots holding the live rows (moved by `moves`)."""
        old, old_feed = self.kv, self.feed
        new = self._new_cache(rows, slots)
        have = int(new.data.shape[4])
        feed = np.zeros((rows, have + 1), dtype=np.int64)
        feed[:, have] = 1
        if old is not None:
            keep = min(have, int(old.data.shape[4]))
            pairs = moves if moves is not None else [(r, r) for r in range(min(rows, len(self.row_owner)))]
            for src, dst in pairs:
                new.write(slice(dst, dst + 1), 0, old.data[:, :, src:src + 1, :, :keep])
                feed[dst, :keep] = old_feed[src, :keep]
        self.kv, self.feed = new, feed
        self.mask = feed[:, :have]

    def _past(self, top: int):
        """The cache buffer as past_kv, with room to write slot `top`; keeps feed/mask in step with it."""
        before = int(self.kv.data.shape[4])
        past = self.kv.past(top)
        have = int(past.shape[4])
        if have != before:
            feed = np.zeros((self.feed.shape[0], have + 1), dtype=np.int64)
            feed[:, :before] = self.feed[:, :before]
            feed[:, have] = 1
            self.feed, self.mask = feed, feed[:, :have]
        return past

    def _take_rows(self, job: Job, prompt_len: int) -> tuple[int, int]:
        free = [r for r, owner in enumerate(self.row_owner) if owner is None]
        need_slots = prompt_len + 1
        if len(free) < 2 or self.kv is None:
            rows = max(MIN_ROWS, 1 << (2 * (len(self.jobs) + 1) - 1).bit_length())
            slots = max(need_slots, self.shape[1])
            self._resize(rows, slots)
            self.row_owner += [None] * (rows - len(self.row_owner))
            free = [r for r, owner in enumerate(self.row_owner) if owner is None]
        elif need_slots > self.shape[1]:
            self._past(need_slots)
        pos_row, neg_row = free[0], free[1]
        self.row_owner[pos_row] = job
        self.row_owner[neg_row] = job
        self.mask[pos_row] = 0
        self.mask[neg_row] = 0
        job.rows = (pos_row, neg_row)
        return pos_row, neg_row

    def _free(self, job: Job) -> None:
        if job in self.jobs:
            self.jobs.remove(job)
        for r in job.rows:
            if 0 <= r < len(self.row_owner) and self.row_owner[r] is job:
                self.row_owner[r] = None
                self.mask[r] = 0
        job.done = True

    def _compact(self) -> None:
        """Move to a smaller bucket: rows to the bucket of the running jobs whenever it is smaller; slots
        when at most a quarter are in use or when no running job can reach the current bucket."""
        if self.kv is None:
            return
        rows, slots = self.shape
        used = [r for r, owner in enumerate(self.row_owner) if owner is not None]
        if not used or not self.jobs:
            self.kv, self.feed, self.mask, self.row_owner = None, None, None, []
            return
        need_slots = max(max(j.pos_next, j.neg_slot) for j in self.jobs) + 1
        reach = bucket_slots(max(max(self.reach(j) for j in self.jobs), need_slots), self.cap)
        want_rows = min(rows, max(MIN_ROWS, 1 << (len(used) - 1).bit_length()))
        want_slots = bucket_slots(need_slots, self.cap) if 4 * need_slots <= slots or reach < slots else slots
        if want_rows >= rows and want_slots >= slots:
            return
        moves = list(zip(used, range(len(used)))) if want_rows < rows else [(r, r) for r in used]
        where = dict(moves)
        owners = [None] * want_rows
        for src, dst in moves:
            owners[dst] = self.row_owner[src]
        for job in self.jobs:
            job.rows = (where[job.rows[0]], where[job.rows[1]])
        self._resize(want_rows, want_slots, moves)
        self.row_owner = owners

    def _write_rows(self, new_kv, rows: np.ndarray, slots: np.ndarray) -> None:
        """new_kv [L, 2, R, KV, 1, D] of a decode call: row r's key/value into its own slot."""
        data = self.kv.data
        if isinstance(data, np.ndarray) and isinstance(new_kv, np.ndarray):
            # one scatter: data[l, t, r, h, s, d] = new_kv[l, t, r, h, 0, d] for each (r, s); the two index
            # arrays are apart, so numpy puts their dimension first on the left side
            data[:, :, rows, :, slots, :] = np.moveaxis(new_kv[:, :, :, :, 0, :][:, :, rows], 2, 0)
            return
        for r, s in zip(rows.tolist(), slots.tolist()):
            self.kv.write(slice(r, r + 1), s, new_kv[:, :, r:r + 1])
