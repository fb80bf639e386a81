"""The speech engine a server drives: requests in, audio chunks out, one background thread.

    engine = SpeechEngine.from_engine_dir(dir, voices_dir="voices/", max_batch=8, max_queue=64).start()
    handle = engine.submit(SpeechRequest("Speaker 1: Hello.", voices=["alice"], seed=3))
    for chunk in handle.chunks():      # float32 [hop] chunks as they are made
        ...
    engine.close()                     # drain, stop, close the pipeline

`submit` is where a request enters: it normalises and checks it (script, voices, context length) in
the caller's thread and raises `RuntimeInputError` (one line) before anything is queued; `QueueFull`
when the queue holds `max_queue` requests; `EngineStopped` when the engine does not accept requests
(not started, draining, stopped).

Voices: `VoiceStore` keeps each voice's normalised audio (exactly what the prompt encoder gets) and
its `acoustic_encoder` embeddings, computed once; requests name voices by id (or pass raw audio).

The engine thread serves the requests through the step-wise scheduler (`vv_runtime.scheduler`): up
to `max_batch` requests run together; a request joins the running batch at the next step and leaves
when it finishes, is cancelled or passes its deadline, freeing its cache rows at once. Each request's
tokens and audio equal those it gets alone with the same seed (audio up to float reordering, 1e-4 of
the peak; docs/SCHEDULER.md). A preset voice's prompt prefix (system prompt + voice section) has its
LM cache computed once, when the voice is added, and reused by every request naming that voice.

Graph calls (the engine's steps and the voice encodings of `VoiceStore.add`) are serialised by one
lock, so a backend never runs two graphs at once.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import math
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from .audio import SAMPLE_RATE, prepare_voice, read_audio, read_audio_bytes, to_mono
from .errors import BackendFault, RuntimeInputError, one_line
from .kv_rows import PrefixCache
from .prompt import Prompt
from .scheduler import Scheduler
from .script import SPEAKER_LINE, parse_script
from .vibevoice_steps import VibeVoiceJob, check_prompt_length

if TYPE_CHECKING:  # pragma: no cover
    from .pipeline import Pipeline

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif", ".au")
VOICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


# --- requests and errors ----------------------------------------------------------------------------

@dataclass
class SpeechRequest:
    script: str                      # "Speaker N: text" lines; plain text (no "Speaker N:") = one speaker
    voices: list = field(default_factory=list)  # per speaker: a VoiceStore id (str) or raw audio (float32 24 kHz)
    cfg_scale: float | None = None   # None: the manifest default
    seed: int | None = None          # same seed + same request => same tokens and audio, whatever runs beside it
    max_new_frames: int | None = None
    timeout_s: float | None = None   # per-request deadline; the engine cancels it past that
    plain_text: bool = False         # `script` is plain text: every line spoken by the first voice, even one
                                     # that starts with "Speaker N:"


class QueueFull(Exception):
    """Admission refused: the queue is full (a service answers 429)."""


class EngineStopped(Exception):
    """The engine does not accept requests: not started, draining or stopped (a service answers 503)."""


class Cancelled(Exception):
    """The request was cancelled (by its client, or because the engine stopped without draining)."""


# --- voices -----------------------------------------------------------------------------------------

@dataclass
class Voice:
    id: str
    name: str
    audio: np.ndarray                # normalised, zero-padded to a multiple of hop: the encoder's input
    frames: int                      # placeholder tokens in the prompt
    seconds: float                   # length of the audio given (before padding)
    key: str                         # sha1 of `audio`: identifies the content (prefix caches key on it)
    embeds: np.ndarray | None = None  # acoustic_encoder voice_embeds [frames, H], once encoded
    pinned: tuple = ()               # the prefix-cache keys this voice pinned when it was stored


class VoiceStore:
    """Voices encoded once and cached, by id.

    With a pipeline attached (the engine attaches its own), `add` encodes the voice right away under
    the engine's graph lock; without one the embeddings are computed at first use.
    """

    def __init__(self, pipeline: "Pipeline | None" = None, max_seconds: float | None = None):
        self.pipeline = pipeline
        self.max_seconds = max_seconds
        self.lock = threading.RLock()          # serialises graph calls (shared with the engine)
        self._voices: dict[str, Voice] = {}
        self._guard = threading.Lock()         # protects the dict
        self.prefixes = PrefixCache()          # LM caches of voice prompt prefixes (see vv_runtime.scheduler)

    # inputs -> normalised audio
    def _raw(self, audio, label: str) -> np.ndarray:
        if isinstance(audio, (bytes, bytearray, memoryview)):
            return read_audio_bytes(audio, label)
        if isinstance(audio, (str, Path)):
            return read_audio(audio)
        if isinstance(audio, np.ndarray):
            if audio.dtype.kind not in "fiu":
                raise RuntimeInputError(f"{label}: audio array of dtype {audio.dtype}")
            wav = to_mono(audio) if audio.ndim <= 2 else None
            if wav is None or wav.ndim != 1:
                raise RuntimeInputError(f"{label}: audio array of shape {audio.shape} (expected mono samples)")
            if wav.size == 0:
                raise RuntimeInputError(f"{label}: contains no audio samples")
            if not np.all(np.isfinite(wav)):
                raise RuntimeInputError(f"{label}: contains non-finite samples")
            return wav
        raise RuntimeInputError(f"{label}: expected a file path, sound file bytes or a sample array, "
                                f"not {type(audio).__name__}")

    def make_voice(self, audio, name: str | None = None, voice_id: str | None = None,
                   label: str = "voice") -> Voice:
        """A Voice (not stored, not yet encoded) from a path, sound file bytes or a 24 kHz array."""
        wav = self._raw(audio, label)
        seconds = wav.shape[0] / SAMPLE_RATE
        if self.max_seconds is not None and seconds > self.max_seconds:
            raise RuntimeInputError(f"{label}: {seconds:.1f} s of audio, more than the limit of "
                                    f"{self.max_seconds:g} s")
        if float(np.max(np.abs(wav))) == 0.0:
            raise RuntimeInputError(f"{label}: silent (all samples are zero)")
        padded, frames = prepare_voice(wav, label=label)
        key = hashlib.sha1(padded.tobytes()).hexdigest()
        vid = voice_id or ("v" + key[:12])
        return Voice(vid, name or vid, padded, frames, round(seconds, 3), key)

    def add(self, audio, name: str | None = None, label: str | None = None) -> str:
        """Store a voice (path, bytes of a sound file, or float32 24 kHz array); returns its id.

        With `name` the id is the name (letters, digits, `_.-`, at most 64); adding a name again
        replaces that voice. Without it the id is derived from the audio's content. `label` names the
        audio in errors (default: the voice).
        """
        if name is not None and not VOICE_ID.match(str(name)):
            raise RuntimeInputError(f"voice name {str(name)[:40]!r}: use 1-64 letters, digits, '_', '.', '-'")
        label = label or (f"voice {name}" if name else "voice")
        voice = self.make_voice(audio, name=name, voice_id=name, label=label)
        self.encode(voice)
        self.warm(voice)
        with self._guard:
            self._voices[voice.id] = voice
        return voice.id

    def warm(self, voice: Voice) -> None:
        """Compute the LM cache of the prompt prefix of a one-speaker request with this voice (system
        prompt, voice section, text header) now, so that such requests prefill only their text."""
        if self.pipeline is None:
            return
        prompt = self.pipeline.prompts.build([(0, " .")], [voice.frames])
        with self.lock:
            before = self.prefixes.pinned_keys()
            self.pipeline.new_steps(reuse_prefix=True, prefix_cache=self.prefixes).prefix(
                VibeVoiceJob(prompt, voice_audio=[voice.audio], voice_embeds=[voice.embeds], prefix_key=(voice.key,)),
                pin=True)  # a stored voice's prefix is kept for good (never evicted by derived entries)
            # what this voice added (nothing when a stored voice with the same audio pinned it already)
            voice.pinned = tuple(self.prefixes.pinned_keys() - before)

    def remove(self, voice_id: str) -> Voice:
        """Forget a stored voice (RuntimeInputError when unknown) and free the prefix caches it pinned,
        unless another stored voice has the same audio. Requests already admitted with it go on."""
        with self.lock:
            with self._guard:
                voice = self._voices.pop(str(voice_id), None)
                if voice is None:
                    raise RuntimeInputError(f"unknown voice {str(voice_id)[:64]!r}")
                heir = next((v for v in self._voices.values() if v.key == voice.key), None)
            if heir is not None:   # the same audio stays stored: its prefix stays too, freed with the heir
                heir.pinned = tuple(dict.fromkeys(heir.pinned + voice.pinned))
            else:
                for key in voice.pinned:
                    self.prefixes.discard(key)
        return voice

    def nbytes(self, voice: Voice) -> int:
        """Memory the stored voice holds: its audio, its embeddings and the prefix caches it pinned."""
        with self.lock:
            cached = sum(self.prefixes.nbytes(key) for key in voice.pinned)
        embeds = 0 if voice.embeds is None else int(voice.embeds.nbytes)
        return int(voice.audio.nbytes) + embeds + cached

    def known(self, voice: Voice) -> bool:
        """Whether `voice` is one of the stored voices (a preset), not a request's own audio."""
        with self._guard:
            return self._voices.get(voice.id) is voice

    def encode(self, voice: Voice) -> Voice:
        """Compute the voice's embeddings once (needs a pipeline)."""
        if voice.embeds is None and self.pipeline is not None:
            with self.lock:
                if voice.embeds is None:
                    voice.embeds = np.asarray(self.pipeline.voice_embeds(voice.audio, voice.frames),
                                              dtype=np.float32)
        return voice

    def get(self, voice_id: str) -> Voice:
        with self._guard:
            voice = self._voices.get(str(voice_id))
        if voice is None:
            raise RuntimeInputError(f"unknown voice {str(voice_id)[:64]!r}")
        return voice

    def list(self) -> list[dict]:
        with self._guard:
            return [{"id": v.id, "name": v.name, "seconds": v.seconds} for v in self._voices.values()]

    def load_dir(self, path) -> list[str]:
        """Every sound file in a directory (not recursive), id = file stem; returns the ids in name order."""
        path = Path(path)
        if not path.is_dir():
            raise RuntimeInputError(f"voices directory {path}: not a directory")
        ids = []
        for file in sorted(path.iterdir()):
            if file.is_file() and file.suffix.lower() in AUDIO_SUFFIXES:
                if not VOICE_ID.match(file.stem):
                    raise RuntimeInputError(f"voice file {file}: its name is not a valid voice id")
                ids.append(self.add(file, name=file.stem))
        return ids

    def __len__(self) -> int:
        return len(self._voices)


# --- handles ----------------------------------------------------------------------------------------

_END = object()


class RequestHandle:
    """One submitted request: its chunks as they are made, its tokens and figures, cancel()."""

    def __init__(self, request_id: str, request: SpeechRequest, prepared: "Admitted"):
        self.id = request_id
        self.request = request
        self.prepared = prepared
        self.done = False
        self.tokens: list[int] = []
        self.frames = 0
        self.first_audio_s: float | None = None
        self.error: BaseException | None = None
        self.submitted = time.monotonic()
        self.deadline = None if request.timeout_s is None else self.submitted + float(request.timeout_s)
        self._chunks: queue.Queue = queue.Queue()
        self._cancel = threading.Event()
        self._finished = threading.Event()

    # engine side
    def _emit(self, chunk: np.ndarray) -> None:
        if self.first_audio_s is None:
            self.first_audio_s = time.monotonic() - self.submitted
        self.frames += 1
        self._chunks.put(chunk)

    def _finish(self, error: BaseException | None = None) -> None:
        if self.done:
            return
        self.error = error
        self.done = True
        self._chunks.put(_END)
        self._finished.set()

    # client side
    def chunks(self, timeout: float | None = None) -> Iterator[np.ndarray]:
        """float32 [hop] chunks as they are made; ends when the request is done, raising its error if it
        failed. `timeout`: most seconds to wait for the next chunk (TimeoutError past that)."""
        while True:
            try:
                item = self._chunks.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"request {self.id}: no audio within {timeout:g} s") from None
            if item is _END:
                self._chunks.put(_END)  # a second iteration ends too
                if self.error is not None:
                    raise self.error
                return
            yield item

    def audio(self, timeout: float | None = None) -> np.ndarray:
        """Wait for the whole request; its audio (raises its error)."""
        parts = list(self.chunks(timeout=timeout))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)

    def wait(self, timeout: float | None = None) -> bool:
        return self._finished.wait(timeout)

    def cancel(self) -> None:
        """Stop the request; its rows are freed at the engine's next step."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()


@dataclass
class Admitted:
    """A checked request, ready for the scheduler."""
    parsed: list[tuple[int, str]]
    prompt: Prompt
    voices: list[Voice]
    cfg_scale: float
    seed: int | None
    max_new_frames: int | None


# --- the engine -------------------------------------------------------------------------------------

class SpeechEngine:
    """Serves SpeechRequests on one Pipeline from a background thread (see the module docstring)."""

    def __init__(self, pipeline: "Pipeline", max_batch: int = 8, max_queue: int = 64,
                 voices: VoiceStore | None = None, reuse_prefix: bool = True):
        if int(max_batch) < 1:
            raise RuntimeInputError(f"max_batch {max_batch}: must be at least 1")
        if int(max_queue) < 0:
            raise RuntimeInputError(f"max_queue {max_queue}: must be at least 0")
        self.pipeline = pipeline
        self.max_batch = int(max_batch)
        self.max_queue = int(max_queue)
        self.reuse_prefix = bool(reuse_prefix)  # preset voices: their prompt prefix's LM cache is reused
        self.voices = voices if voices is not None else VoiceStore(pipeline)
        if self.voices.pipeline is None:
            self.voices.pipeline = pipeline
        self.sample_rate = pipeline.sample_rate
        self.hop = pipeline.hop
        self.accepting = False
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: collections.deque[RequestHandle] = collections.deque()
        self._active: list[RequestHandle] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._drain = True
        self._ids = itertools.count(1)
        self._stats = {"frames_total": 0, "requests_total": 0, "audio_seconds_total": 0.0}
        self._errors: collections.Counter = collections.Counter()
        self._ttfa: collections.deque = collections.deque(maxlen=256)
        self._active_rows = 0
        self.fatal: BaseException | None = None

    @classmethod
    def from_engine_dir(cls, engine_dir, backend: str = "auto", threads: int | None = None, max_batch: int = 8,
                        max_queue: int = 64, voices_dir=None, max_voice_seconds: float | None = None
                        ) -> "SpeechEngine":
        """An engine (not started) over the Pipeline of an ENGINE_DIR, with every sound file of
        `voices_dir` loaded as a preset voice. It owns the pipeline: `close()` closes it."""
        from .pipeline import Pipeline

        pipeline = Pipeline.from_engine_dir(engine_dir, backend=backend, threads=threads)
        try:
            voices = VoiceStore(pipeline, max_seconds=max_voice_seconds)
            if voices_dir is not None:
                voices.load_dir(voices_dir)
            return cls(pipeline, max_batch=max_batch, max_queue=max_queue, voices=voices)
        except BaseException:
            pipeline.close()
            raise

    # --- control --------------------------------------------------------------------------------

    def start(self) -> "SpeechEngine":
        with self._lock:
            if self._thread is not None:
                return self
            self._stopping = False
            self.accepting = True
            self._thread = threading.Thread(target=self._run, name="vv-speech-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop admission; with drain, let queued and in-flight requests finish, else cancel them."""
        with self._lock:
            self.accepting = False
            self._stopping = True
            self._drain = self._drain and drain
            self._wake.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                return
        with self._lock:
            pending = list(self._queue) + list(self._active)
            self._queue.clear()
            self._active.clear()
        for handle in pending:
            handle._finish(EngineStopped("the engine stopped"))

    def close(self, timeout: float | None = 60) -> None:
        """Stop with drain (queued and in-flight requests finish), then close the pipeline."""
        self.stop(drain=True, timeout=timeout)
        self.pipeline.close()

    # --- admission ------------------------------------------------------------------------------

    def check(self, request: SpeechRequest) -> Admitted:
        """Normalise and validate a request (raises RuntimeInputError, one line); needs no graph except
        for raw voices. This is where a served request is checked against the model's context."""
        pipe = self.pipeline
        if not isinstance(request, SpeechRequest):
            raise RuntimeInputError("expected a SpeechRequest")
        parsed = parse_request_script(request.script, plain_text=request.plain_text)
        voices_in = list(request.voices or [])
        voices: list[Voice] = []
        for j, voice in enumerate(voices_in):
            if isinstance(voice, Voice):
                voices.append(voice)
            elif isinstance(voice, str):
                voices.append(self.voices.get(voice))
            else:
                voices.append(self.voices.make_voice(voice, label=f"voice {j}"))
        prompt = pipe.prompts.build(parsed, [v.frames for v in voices])
        voices = voices[: len(prompt.voice_frames)]
        tokens = len(prompt.input_ids)
        check_prompt_length(tokens, pipe.max_positions)
        cfg = pipe.default_cfg_scale if request.cfg_scale is None else request.cfg_scale
        try:
            cfg = float(cfg)
        except (TypeError, ValueError):
            raise RuntimeInputError(f"cfg_scale {request.cfg_scale!r}: not a number") from None
        if not math.isfinite(cfg):
            raise RuntimeInputError(f"cfg_scale {request.cfg_scale!r}: not a finite number")
        frames = request.max_new_frames
        if frames is not None and (isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or frames < 1):
            raise RuntimeInputError(f"max_new_frames {frames!r}: must be an integer of at least 1")
        seed = request.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
            raise RuntimeInputError(f"seed {seed!r}: must be a non-negative integer")
        timeout = request.timeout_s
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not timeout > 0):
            raise RuntimeInputError(f"timeout_s {timeout!r}: must be a positive number of seconds")
        return Admitted(parsed, prompt, voices, cfg, None if seed is None else int(seed),
                        None if frames is None else int(frames))

    def submit(self, request: SpeechRequest) -> RequestHandle:
        if not self.accepting:
            raise EngineStopped("the engine is not accepting requests")
        prepared = self.check(request)
        with self._lock:
            if not self.accepting:
                raise EngineStopped("the engine is not accepting requests")
            # requests about to start (free places in the batch) do not count against max_queue
            if len(self._queue) >= self.max_queue + max(0, self.max_batch - len(self._active)):
                raise QueueFull(f"the queue holds {self.max_queue} requests")
            handle = RequestHandle(f"req-{next(self._ids)}", request, prepared)
            self._queue.append(handle)
            self._wake.notify_all()
        return handle

    # --- figures --------------------------------------------------------------------------------

    def stats(self) -> dict:
        with self._lock:
            return {
                "queue_depth": len(self._queue),
                "active_requests": len(self._active),
                "active_rows": self._active_rows,
                "frames_total": self._stats["frames_total"],
                "audio_seconds_total": self._stats["audio_seconds_total"],
                "requests_total": self._stats["requests_total"],
                "errors": dict(self._errors),
                "ttfa_seconds": list(self._ttfa),
                "prefix_cache": {"entries": len(self.voices.prefixes), "hits": self.voices.prefixes.hits,
                                 "misses": self.voices.prefixes.misses},
            }

    def _count_frame(self, handle: RequestHandle) -> None:
        with self._lock:
            self._stats["frames_total"] += 1
            self._stats["audio_seconds_total"] += self.hop / self.sample_rate
            if handle.frames == 1 and handle.first_audio_s is not None:
                self._ttfa.append(handle.first_audio_s)

    def _retire(self, handle: RequestHandle, error: BaseException | None) -> None:
        with self._lock:
            if handle in self._active:
                self._active.remove(handle)
            self._stats["requests_total"] += 1
            if error is not None:
                self._errors[error_kind(error)] += 1
        handle._finish(error)

    # --- the engine thread: the step-wise scheduler ----------------------------------------------

    def _job(self, handle: RequestHandle):
        """The scheduler job of a request (raw voices are encoded here, in the engine thread)."""
        admitted = handle.prepared
        voices = admitted.voices
        for voice in voices:
            self.voices.encode(voice)
        preset = all(self.voices.known(v) for v in voices)
        return VibeVoiceJob(admitted.prompt, voice_audio=[v.audio for v in voices], voice_embeds=[v.embeds for v in voices],
                   cfg_scale=admitted.cfg_scale, max_new_frames=admitted.max_new_frames, seed=admitted.seed,
                   prefix_key=tuple(v.key for v in voices) if preset else None, tag=handle)

    def _new_scheduler(self):
        return Scheduler(self.pipeline, max_batch=self.max_batch, reuse_prefix=self.reuse_prefix,
                         prefix_cache=self.voices.prefixes)

    def _run(self) -> None:
        sched = self._new_scheduler()
        # why a running job was cancelled (its request cancelled or past its deadline) is kept on the job
        # itself (job.error), so no table can outlive its job
        try:
            while True:
                with self._lock:
                    while not self._queue and not sched.busy and not self._stopping:
                        self._wake.wait(0.5)
                    if self._stopping and not self._drain:
                        break
                    if self._stopping and not self._queue and not sched.busy:
                        break
                    now = time.monotonic()
                    # queued requests cancelled or past their deadline leave the queue at once
                    expired = [h for h in self._queue
                               if h.cancelled or (h.deadline is not None and now > h.deadline)]
                    for handle in expired:
                        self._queue.remove(handle)
                    moved = []
                    while self._queue and len(sched.jobs) + len(sched.waiting) < self.max_batch:
                        moved.append(self._queue.popleft())
                    self._active.extend(moved + expired)
                for handle in expired:
                    self._retire(handle, self._placeholder(handle).error)
                for handle in moved:
                    if handle.cancelled or (handle.deadline is not None and now > handle.deadline):
                        sched.add(self._placeholder(handle))  # leaves at once, through the same path
                    else:
                        try:
                            with self.voices.lock:
                                sched.add(self._job(handle))
                        except Exception as exc:  # noqa: BLE001 -- one bad request fails alone
                            self._retire(handle, _request_error(exc, "voice encoding"))
                for job in list(sched.jobs) + list(sched.waiting):
                    handle = job.tag
                    if job.cancelled:
                        continue
                    if handle.cancelled:
                        job.error = job.error or Cancelled(f"request {handle.id} cancelled")
                        sched.cancel(job)
                    elif handle.deadline is not None and now > handle.deadline:
                        job.error = job.error or TimeoutError(f"request {handle.id}: past its timeout of "
                                                              f"{handle.request.timeout_s:g} s")
                        sched.cancel(job)
                try:
                    with self.voices.lock:
                        out = sched.step(emit=self._deliver)
                except Exception as exc:  # noqa: BLE001 -- a failed shared call fails the requests in it
                    # every active request belonged to the broken scheduler (running, waiting, or left in
                    # this very step: cancelled, timed out, failed at admission): finish them all
                    known = {id(j.tag): j for j in list(sched.jobs) + list(sched.waiting) + list(sched.failed)}
                    sched = self._new_scheduler()
                    self._active_rows = 0
                    with self._lock:
                        failed = list(self._active)
                    error = _request_error(exc, "a batch step")
                    for handle in failed:
                        job = known.get(id(handle))
                        own = job.error if job is not None and job.error is not None else None
                        if own is None and handle.cancelled:
                            own = Cancelled(f"request {handle.id} cancelled")
                        self._retire(handle, _request_error(own, "admission") if own is not None else error)
                    continue
                self._active_rows = sched.rows_in_use
                for job in out.finished:
                    handle = job.tag
                    handle.tokens = list(job.tokens)
                    error = None if job.error is None else _request_error(job.error, "admission")
                    if error is None and job.cancelled:
                        error = Cancelled(f"request {handle.id} cancelled")
                    self._retire(handle, error)
        except BaseException as exc:  # noqa: BLE001 -- the engine itself broke: fail every request, once
            self.fatal = exc
            raise
        finally:
            with self._lock:
                self.accepting = False
                pending = list(self._queue) + [h for h in self._active]
                self._queue.clear()
            self._active_rows = 0
            for handle in pending:
                error = self.fatal if self.fatal is not None else Cancelled("the engine stopped without draining")
                self._retire(handle, error)

    def _deliver(self, job, chunk: np.ndarray) -> None:
        """A frame, to its client as soon as the decoder made it (see Scheduler.step)."""
        job.tag._emit(chunk)
        self._count_frame(job.tag)

    def _placeholder(self, handle: RequestHandle):
        """A job that is cancelled before it starts (its request was cancelled or timed out in the queue)."""
        job = VibeVoiceJob(handle.prepared.prompt, tag=handle)
        job.cancelled = True
        if handle.cancelled:
            job.error = Cancelled(f"request {handle.id} cancelled")
        else:
            job.error = TimeoutError(f"request {handle.id}: past its timeout of {handle.request.timeout_s:g} s "
                                     f"(still queued)")
        return job


def parse_request_script(script, plain_text: bool = False) -> list[tuple[int, str]]:
    """A request's script: `Speaker N: text` lines, or plain text (every line spoken by one speaker).

    A script without any `Speaker N:` line is plain text; with `plain_text` every line is, whatever it
    starts with, and any line break (as `str.splitlines` sees them) ends a line. Unlike
    `vv-run --script`, a text ending in `.txt` is text, never a file to read."""
    if not isinstance(script, str):
        raise RuntimeInputError("script: expected text")
    lines = script.splitlines() if plain_text else script.split("\n")
    lines = [line.strip() for line in lines if line.strip()]
    if not lines:
        raise RuntimeInputError("script is empty (no text to speak)")
    if plain_text or not any(SPEAKER_LINE.match(line) for line in lines):
        lines = [f"Speaker 1: {line}" for line in lines]
    return parse_script("\n".join(lines))


def _request_error(exc: BaseException, where: str) -> BaseException:
    """The error a request fails with: input errors (CapacityError included) as they are, anything else
    as a one-line BackendFault (not the request's fault; the engine goes on)."""
    if isinstance(exc, (RuntimeInputError, BackendFault, Cancelled, TimeoutError, EngineStopped)):
        return exc
    fault = BackendFault(f"{where} failed: {type(exc).__name__}: {one_line(exc)}")
    fault.__cause__ = exc
    return fault


def error_kind(error: BaseException) -> str:
    if isinstance(error, Cancelled):
        return "cancelled"
    if isinstance(error, TimeoutError):
        return "timeout"
    if isinstance(error, RuntimeInputError):
        return "input"
    if isinstance(error, EngineStopped):
        return "stopped"
    return "internal"
