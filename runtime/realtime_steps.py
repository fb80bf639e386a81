"""The model steps of VibeVoice-Realtime-0.5B (`model_family: vibevoice_streaming`): what one step of the
step-wise scheduler computes for it (Microsoft's streaming `generate`), on the graphs of an ENGINE_DIR.

A job starts from a voice preset: the prefilled caches of the lower text LM and of the TTS LM (positive and
negative). Text comes in windows of `text_window` tokens, speech in windows of `speech_window` frames:

    text window   [text_embed] -> [text_lm] on the window (the job's own text cache, alone), then [tts_lm]
                  on the same positions with the text LM's hidden states as input embeddings and input type
                  1 (text), into the job's positive row: its last hidden state is the positive condition
    speech frame  [diffusion_sampler](noise, positive condition, negative condition, cfg) -> latent and its
                  acoustic embedding (connector); next step: ONE [tts_lm] call over the positive AND negative
                  rows of every job (input: the acoustic embedding, type 0 (speech)) -> the new conditions and
                  the end-of-speech logit of the positive row: speech ends when it is above 0 (sigmoid above 0.5)
    audio         [acoustic_decoder](latents, state) -> a hop of audio per latent (emitted a frame at a time)

Joined windows: the original feeds the positive row a speech window's last frame and then the next text
window, back to back. Here both go into one [tts_lm] call (the positive row takes 1 + 5 positions, the
negative row its frame; the frame's position gives the negative condition and the end-of-speech logit, the
window's last the positive condition), so the TTS LM's weights are read once for both: on a CPU a text window
alone costs about as much as a frame step. The joined call is the job's own (its two rows alone: the same
batched or alone); only a job's first text window (no frame before it) runs without a frame. A
frame that ends a speech window is fed once its next text window is complete or the text closed, so streamed
text still gives the same calls as text given at once. Backends that keep one shape per step
(Backend.groups_steps False) and ENGINE_DIRs whose tts_lm returns only the last position run every text
window alone.

Grouped decoding: no later step needs a frame's audio, so the decoder can take several latents of a job in one
call, reading its weights once for all of them (on a CPU most of its cost at one frame). A job's n-th decoder
call takes up to min(n, decode_frames) latents (its first frame alone, for first audio; then growing groups,
so a listener's buffer fills before the groups get long), never across a speech window, and whatever is
pending when the job ends. The groups depend only on the frame count, never on timing or other jobs, so a
job's audio is the same streamed or not, batched or alone. decode_frames = 1 decodes every frame at once.

After `speech_window` frames the next text window runs; once the text is spent, speech windows go on until the
classifier ends speech. A job whose next text window is not complete yet (streaming text in, not closed)
waits: it makes no frame until the window is full or the text is closed, so streamed text gives exactly the
audio of the same text given at once. The original finishes the speech window in which speech ends (drawing
its noise, dropping its audio); here the job ends at that frame.

Scheduler phases: prefill = preset caches into the job's rows; decode = the batched [tts_lm] call of the
frames made at the previous step, with the text windows joined to them (and the end-of-speech check); choose =
a text window due with no frame before it (or waiting for text); diffuse = the frame, and the decoding of the
latents whose group is complete (or whose job ended).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .errors import CapacityError, RuntimeInputError
from .kv_rows import KVRows
from .scheduler import Job
from .speech_frame import by_cfg_scale, decode, sample


@dataclass
class RealtimeFacts:
    """What the model steps need to know of the model (from the manifest, handed down by the pipeline)."""
    hidden: int
    text_lm_layers: int
    tts_lm_layers: int
    kv_heads: int
    head_dim: int
    latent_dim: int
    max_positions: int
    text_window: int
    speech_window: int
    decoder_state: int
    decode_frames: int = 1   # most latents per decoder call (1 where the decoder takes one frame per call)
    every_position: bool = False   # tts_lm returns every new position's hidden state and end-of-speech logit

    @classmethod
    def from_manifest(cls, manifest: dict) -> "RealtimeFacts":
        from .manifest import state_size

        model = manifest["model"]
        streaming = manifest.get("streaming") or {}
        latent = next((io for io in manifest["graphs"]["acoustic_decoder"]["inputs"] if io["name"] == "latent"), {})
        grouped = isinstance((latent.get("shape") or [None, 1])[1], str)
        hidden = next((io for io in manifest["graphs"]["tts_lm"]["outputs"] if io["name"] == "hidden"), {})
        return cls(hidden=int(model["hidden_size"]), text_lm_layers=int(model["text_lm_layers"]),
                   tts_lm_layers=int(model["tts_lm_layers"]), kv_heads=int(model["num_kv_heads"]),
                   head_dim=int(model["head_dim"]), latent_dim=int(model["acoustic_vae_dim"]),
                   max_positions=int(model["max_position_embeddings"]),
                   text_window=int(streaming.get("text_window", 5)), speech_window=int(streaming.get("speech_window", 6)),
                   decoder_state=state_size(manifest, "acoustic_decoder"),
                   decode_frames=int(streaming.get("decode_frames", 1)) if grouped else 1,
                   every_position=len(hidden.get("shape") or ()) == 3)


@dataclass
class VoicePreset:
    """A voice: the prefilled caches of the prompt, float32, [layers, 2, 1, kv_heads, positions, head_dim]."""
    name: str
    text_lm_kv: np.ndarray
    tts_lm_kv: np.ndarray
    tts_lm_hidden: np.ndarray          # [H] last hidden state of the TTS LM: the first positive condition
    neg_tts_lm_kv: np.ndarray
    neg_tts_lm_hidden: np.ndarray      # [H] the first negative condition

    @property
    def positions(self) -> dict:
        return {"text_lm": int(self.text_lm_kv.shape[4]), "tts_lm": int(self.tts_lm_kv.shape[4]),
                "neg_tts_lm": int(self.neg_tts_lm_kv.shape[4])}


class TextFeed:
    """The text tokens of a job as they become final: `tokens` grows; `closed` when no more will come.

    Whoever feeds it calls `changed()` after each change; the callbacks given to `listen` run then (an engine
    whose jobs all wait for text sleeps until one of them)."""

    def __init__(self, tokens=None, closed: bool = True):
        self.tokens: list[int] = [int(t) for t in (tokens or [])]
        self.closed = bool(closed)
        self._listeners: list = []

    def available(self) -> int:
        return len(self.tokens)

    def listen(self, callback) -> None:
        self._listeners.append(callback)

    def changed(self) -> None:
        for callback in list(self._listeners):
            callback()


def _every_position(out: dict) -> tuple[np.ndarray, np.ndarray]:
    """A [tts_lm] call's (hidden [rows, seq, H], end-of-speech logits [rows, seq]); an ENGINE_DIR exported
    before the graph returned every position gives the last one only, as seq 1."""
    hidden = np.asarray(out["hidden"], dtype=np.float32)
    eos = np.asarray(out["eos_logit"], dtype=np.float32)
    if hidden.ndim == 2:
        return hidden[:, None], eos.reshape(-1, 1)
    return hidden, eos.reshape(hidden.shape[0], hidden.shape[1])


def decode_frames_not_grouped(engine_dir) -> RuntimeInputError:
    """The one-line refusal of a --decode-frames given for an ENGINE_DIR of another family (vv-run, vv-serve)."""
    return RuntimeInputError(f"--decode-frames: {engine_dir} holds a VibeVoice model, whose loop encodes each "
                             f"frame's audio before the next step (only VibeVoice-Realtime decodes frames in groups)")


def check_text_context(positions: dict, text_tokens: int, max_positions: int) -> None:
    """A text of `text_tokens` tokens after a preset of `positions` (VoicePreset.positions) must fit the model's
    context (RuntimeInputError, one line)."""
    if positions["tts_lm"] + text_tokens >= max_positions or positions["text_lm"] + text_tokens > max_positions:
        raise RuntimeInputError(f"text is {text_tokens} tokens: with the voice's {positions['tts_lm']} prompt "
                                f"positions it is longer than the model's context of {max_positions} positions")


@dataclass(eq=False)
class RealtimeJob(Job):
    """One text of the streaming model: its voice preset and text, then its state (filled by the steps)."""
    preset: VoicePreset
    text: TextFeed = field(default_factory=TextFeed)
    ignore_eos: bool = False          # run until the step limit (benchmarks: the whole text, forced)
    # --- state ---
    rows: tuple[int, int] = (-1, -1)  # (positive row, negative row) in the TTS LM cache
    text_cache: object = None         # the job's own text LM cache (backend.kv_cache, one row)
    text_used: int = 0                # text tokens fed so far
    text_next: int = 0                # position of the text LM's next input
    pos_next: int = 0                 # position (= slot) of the positive TTS row's next input
    neg_next: int = 0                 # position (= slot) of the negative TTS row's next input
    window_frames: int = 0            # frames made in the current speech window
    conditions: np.ndarray | None = None   # [2, H] positive / negative condition of the next frame
    latents: list = field(default_factory=list)   # latents [A] sampled, not decoded yet
    decodes: int = 0                  # decoder calls made for the job
    next_embed: np.ndarray | None = None   # acoustic embedding of the last frame, not yet fed to the TTS LM
    decoder_state: np.ndarray | None = None
    ready: bool = False               # a frame can be made this step (not waiting for text)
    eos_logits: list = field(default_factory=list)
    waiting_since: float | None = None
    stalled_s: float = 0.0            # time spent waiting for text after admission


class RealtimeSteps:
    """The model steps of VibeVoice-Realtime-0.5B (module docstring); one instance per scheduler."""

    decode_graph = "tts_lm"

    def __init__(self, backend, facts: RealtimeFacts, clock=time.perf_counter, decode_frames: int | None = None):
        self.backend = backend
        self.facts = facts
        self.decode_frames = self._decode_frames(facts.decode_frames if decode_frames is None else decode_frames)
        self.joins_windows = facts.every_position and getattr(backend, "groups_steps", True)
        self._ended: list[RealtimeJob] = []   # jobs ended by decode() whose pending latents diffuse() decodes
        self.max_positions = facts.max_positions
        self.latent_dim = facts.latent_dim
        self.capacity = facts.max_positions
        self.kv = KVRows(backend, facts.tts_lm_layers, facts.kv_heads, facts.head_dim, facts.max_positions)
        self.prefill_tokens = 0
        self.clock = clock

    def _decode_frames(self, wanted: int) -> int:
        """Latents per decoder call: `wanted`, at most a speech window; 1 where the graph takes one frame per
        call or the backend keeps one shape per step (Backend.groups_steps)."""
        wanted = int(wanted)
        if wanted < 1:
            raise RuntimeInputError(f"decode_frames {wanted}: must be at least 1")
        if self.facts.decode_frames == 1 or not getattr(self.backend, "groups_steps", True):
            return 1
        return min(wanted, self.facts.speech_window)

    def set_capacity(self, slots: int) -> None:
        """The engines hold `slots` positions (<= the model's context): jobs and the cache stay within them."""
        self.capacity = int(slots)
        self.kv.max_slots = int(slots)

    # --- what the scheduler asks --------------------------------------------------------------------

    def job_limit(self, job: RealtimeJob) -> int:
        """Most frames: max_new_frames, else what the TTS LM's context leaves after the preset and the text
        known now (re-bounded as text arrives)."""
        room = self.capacity - job.preset.positions["tts_lm"] - job.text.available()
        return max(0, room if job.max_new_frames is None else min(int(job.max_new_frames), room))

    def check_context(self, job: RealtimeJob, capacity: int) -> None:
        preset = job.preset.positions
        text = job.text.available()
        check_text_context(preset, text, self.max_positions)
        if preset["tts_lm"] + text >= capacity:
            raise CapacityError(f"text is {text} tokens, it leaves no room in the context of {capacity} positions "
                                f"the loaded engines hold (rebuild them with a larger plan)")

    def reach(self, job: RealtimeJob) -> int:
        """TTS LM slots the job can need before it ends."""
        start = job.pos_next if job.rows[0] >= 0 else job.preset.positions["tts_lm"]
        left_text = max(job.text.available() - job.text_used, 0)
        return min(self.capacity, start + left_text + max(job.limit - job.frames, 0) + 1)

    def compact(self, running: list[RealtimeJob]) -> None:
        if not running:
            self.kv.compact(0, 0)
            return
        self.kv.compact(max(max(j.pos_next, j.neg_next) for j in running) + 1, max(self.reach(j) for j in running))
        for job in running:
            job.rows = self.kv.rows(job)

    def release(self, job: RealtimeJob) -> None:
        self.kv.free(job)
        job.text_cache = None
        job.latents = []
        if job in self._ended:
            self._ended.remove(job)

    # --- prefill: the preset's caches (the first text window is then due: choose runs it) ---------------

    def prefill(self, job: RealtimeJob, running: int) -> None:
        preset = job.preset
        facts = self.facts
        pos_len, neg_len = preset.positions["tts_lm"], preset.positions["neg_tts_lm"]
        pos_row, neg_row = job.rows = self.kv.take(job, running, pos_len + 1)
        self.kv.write(pos_row, 0, preset.tts_lm_kv)
        self.kv.write(neg_row, 0, preset.neg_tts_lm_kv)
        self.kv.mask[pos_row, :pos_len] = 1
        self.kv.mask[neg_row, :neg_len] = 1
        job.pos_next, job.neg_next = pos_len, neg_len
        text_len = preset.positions["text_lm"]
        job.text_cache = self.backend.kv_cache((facts.text_lm_layers, 2, 1, facts.kv_heads, self.capacity,
                                                facts.head_dim))
        job.text_cache.write(slice(0, 1), 0, preset.text_lm_kv)
        job.text_next = text_len
        job.conditions = np.stack([preset.tts_lm_hidden, preset.neg_tts_lm_hidden]).astype(np.float32)
        job.decoder_state = np.zeros(facts.decoder_state, dtype=np.float32)
        job.window_frames = facts.speech_window   # the first text window is due
        job.next_embed = None

    # --- decode: the TTS LM on the frames made at the previous step ------------------------------------

    def decode(self, jobs: list[RealtimeJob]) -> list[RealtimeJob]:
        """The [tts_lm] calls of the frames made at the previous step: ONE over both rows of every job whose
        frame goes alone (seq 1) and, where a frame completes a speech window and the next text window is
        known (`joins_windows`), one of that job's rows taking the frame and the window together; returns every
        job given (the ones waiting for text are chosen again)."""
        fed = [j for j in jobs if j.next_embed is not None]
        for job in fed:
            if job.pos_next + 1 > self.capacity:   # the original stops before a frame that would pass the context
                job.next_embed = None
                job.done = True
        feeding: list[RealtimeJob] = []
        windows: dict[RealtimeJob, np.ndarray] = {}   # job -> the text LM's hidden states of its next window
        window_ends: list[RealtimeJob] = []           # jobs whose speech window ends with this frame
        for job in (j for j in fed if not j.done):
            if self.joins_windows and job.window_frames >= self.facts.speech_window:
                size = self._window_due(job, after_frame=True)
                if size is None:
                    continue                            # waits for text, its frame with it
                window_ends.append(job)
                if size:
                    windows[job] = self._text_lm(job, size)
            feeding.append(job)
        if feeding:
            self._feed_frames(feeding, windows)
        for job in window_ends:
            self._next_speech_window(job)
        self._ended += [j for j in jobs if j.done and j.latents]
        return [j for j in jobs if not j.done]

    def _feed_frames(self, jobs: list[RealtimeJob], windows: dict) -> None:
        """The [tts_lm] calls of decode(): ONE over the whole cache for the frames alone (seq 1), and one per job
        whose frame joins its text window, over that job's rows alone: its positive row takes the frame's
        embedding (input type 0) then the window's hidden states (type 1), its negative row the frame's
        embedding. (A joined call of the job's own rows is the same batched or alone.)"""
        plain = [j for j in jobs if j not in windows]
        if plain:
            pos_rows = np.asarray([j.rows[0] for j in plain])
            neg_rows = np.asarray([j.rows[1] for j in plain])
            slots = np.concatenate([[j.pos_next for j in plain], [j.neg_next for j in plain]])
            embeds = [j.next_embed for j in plain]
            out = self.kv.decode("tts_lm", np.concatenate([pos_rows, neg_rows]), slots, slots, embeds + embeds,
                                 self.facts.hidden, input_types=np.zeros((len(self.kv.owner), 1), dtype=np.int64))
            hidden, eos = _every_position(out)
            for job, pos_row, neg_row in zip(plain, pos_rows, neg_rows):
                self._frame_fed(job, hidden[pos_row, 0], hidden[neg_row, 0], eos[pos_row, 0], 0)
        for job in (j for j in jobs if j in windows):
            window = windows[job]
            types = np.zeros((2, 1 + len(window)), dtype=np.int64)
            types[0, 1:] = 1
            frame = job.next_embed.reshape(1, -1)
            out = self.kv.run_rows("tts_lm", job.rows, (job.pos_next, job.neg_next),
                                   [np.concatenate([frame, window]), frame], self.facts.hidden, input_types=types)
            hidden, eos = _every_position(out)
            self._frame_fed(job, hidden[0, -1], hidden[1, 0], eos[0, 0], len(window))

    def _frame_fed(self, job: RealtimeJob, positive, negative, eos_logit, text_tokens: int) -> None:
        """A job's frame (and `text_tokens` of text after it) went into its rows: the next conditions, the
        frame's end-of-speech check."""
        job.conditions = np.stack([positive, negative])
        job.pos_next += 1 + text_tokens
        job.neg_next += 1
        job.text_used += text_tokens
        self.prefill_tokens += text_tokens
        job.next_embed = None
        job.eos_logits.append(float(eos_logit))
        if eos_logit > 0 and not job.ignore_eos:
            job.done = True

    # --- choose: the text window, when one is due ----------------------------------------------------

    def choose(self, jobs: list[RealtimeJob]) -> None:
        for job in jobs:
            if job.done:
                continue
            job.ready = True
            if job.window_frames < self.facts.speech_window:
                continue
            if job.next_embed is not None:    # its last frame waits to be fed with the text window (decode)
                job.ready = False
                continue
            size = self._window_due(job, after_frame=False)
            if size is None:
                job.ready = False
                continue
            if size:
                self._text_window(job, size)
            self._next_speech_window(job)

    def _window_due(self, job: RealtimeJob, after_frame: bool) -> int | None:
        """Tokens of the job's next text window when it can run now (after the frame fed with it, if
        `after_frame`); 0 when the text is spent, or when the window would pass the context: the job then ends
        (the original stops before such text, after that frame). None while the window is not complete and the
        text not closed (the job waits for text; its stall is timed)."""
        # `closed` before the count: a stream releases its last tokens before it says closed, so a closed
        # text read here has all its tokens counted (read the other way round, a close landing in between
        # would make a short window of what was counted)
        closed = job.text.closed
        left = job.text.available() - job.text_used
        if not closed and left < self.facts.text_window:
            if job.waiting_since is None:
                job.waiting_since = self.clock()
            return None
        if job.waiting_since is not None:
            job.stalled_s += self.clock() - job.waiting_since
            job.waiting_since = None
        size = min(left, self.facts.text_window)
        if size and (job.pos_next + int(after_frame) + size > self.capacity or job.text_next + size > self.capacity):
            job.done = True
            return 0
        return size

    def _next_speech_window(self, job: RealtimeJob) -> None:
        """A speech window starts (its text window, if any, fed): the frame limit follows the text known now."""
        job.window_frames = 0
        if job.done:
            return
        job.limit = self.job_limit(job)
        if job.frames >= job.limit:
            job.done = True

    def _text_lm(self, job: RealtimeJob, size: int) -> np.ndarray:
        """[text_embed] and [text_lm] on the next `size` text tokens, alone, into the job's own text cache:
        the hidden states [size, H] the TTS LM takes for them."""
        ids = np.asarray(job.text.tokens[job.text_used: job.text_used + size], dtype=np.int64)[None, :]
        embeds = np.asarray(self.backend.run("text_embed", {"input_ids": ids})["inputs_embeds"], dtype=np.float32)
        start = job.text_next
        text_past = job.text_cache.data[:, :, :, :, :start]
        text_out = self.backend.run("text_lm", {
            "inputs_embeds": embeds, "attention_mask": np.ones((1, start + size), dtype=np.int64),
            "position_ids": np.arange(start, start + size, dtype=np.int64)[None, :], "past_kv": text_past})
        job.text_cache.write(slice(0, 1), start, text_out["new_kv"])
        job.text_next += size
        return np.asarray(text_out["hidden"], dtype=np.float32)[0]

    def _text_window(self, job: RealtimeJob, size: int) -> None:
        """A text window with no frame before it (a job's first; every window where the steps are not joined):
        [text_lm] then [tts_lm] on the next `size` text tokens, alone, into the job's positive row."""
        out = self.kv.run_rows("tts_lm", [job.rows[0]], [job.pos_next], [self._text_lm(job, size)],
                               self.facts.hidden, input_types=np.ones((1, size), dtype=np.int64))
        job.pos_next += size
        job.text_used += size
        job.conditions = job.conditions.copy()
        job.conditions[0] = _every_position(out)[0][0, -1]
        self.prefill_tokens += size

    # --- diffuse: one frame of every ready job --------------------------------------------------------

    def diffuse(self, jobs: list[RealtimeJob], emit=None) -> list[tuple[RealtimeJob, np.ndarray]]:
        """The frame of every ready job, then the audio of every job whose group of latents is complete."""
        for cfg_scale, group in by_cfg_scale(j for j in jobs if j.ready and not j.done).items():
            latent, acoustic_embed = sample(self.backend.run,
                                            np.stack([np.asarray(j.noise(j.frames), dtype=np.float32) for j in group]),
                                            np.stack([j.conditions[0] for j in group]),
                                            np.stack([j.conditions[1] for j in group]), cfg_scale)
            for i, job in enumerate(group):
                job.latents.append(latent[i].copy())
                job.next_embed = acoustic_embed[i].copy()
                job.frames += 1
                job.steps += 1
                job.window_frames += 1
                if job.frames >= job.limit:
                    job.done = True
        # (the jobs decode() ended are not among `jobs`: it hands the scheduler the running ones only)
        due = [j for j in self._ended + list(jobs) if self._decode_due(j)]
        self._ended = []
        return self._decode(due, emit)

    def _decode_due(self, job: RealtimeJob) -> bool:
        """Whether the job's pending latents are decoded now (module docstring: grouped decoding)."""
        pending = len(job.latents)
        return pending > 0 and (job.done or pending >= min(job.decodes + 1, self.decode_frames)
                                or job.window_frames >= self.facts.speech_window)

    def _decode(self, jobs: list[RealtimeJob], emit) -> list[tuple[RealtimeJob, np.ndarray]]:
        """[acoustic_decoder] on the pending latents of `jobs` (one call per group size, in admission order);
        each frame's hop emitted and returned."""
        chunks = []
        by_size: dict[int, list[RealtimeJob]] = {}
        for job in sorted(jobs, key=lambda j: j.index):
            by_size.setdefault(len(job.latents), []).append(job)
        for size, group in by_size.items():
            audio, state = decode(self.backend.run, np.stack([np.stack(j.latents) for j in group]),
                                  np.stack([j.decoder_state for j in group]))
            hop = audio.shape[2] // size
            for i, job in enumerate(group):
                job.decoder_state = state[i].copy()
                job.latents = []
                job.decodes += 1
                for k in range(size):
                    chunk = audio[i, 0, k * hop:(k + 1) * hop].copy()
                    if emit is not None:
                        emit(job, chunk)
                    chunks.append((job, chunk))
        return chunks
