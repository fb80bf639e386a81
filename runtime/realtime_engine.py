"""The speech engine of VibeVoice-Realtime-0.5B a server drives: text in (at once or streamed), audio out.

    engine = RealtimeEngine.from_engine_dir(dir, max_batch=8, max_queue=64).start()
    handle = engine.submit(RealtimeRequest("Hello there.", voice="en-Carter_man", seed=3))
    stream = engine.text_stream()                   # or text that arrives while audio is made
    handle = engine.submit(RealtimeRequest(stream, voice="en-Carter_man", seed=3))
    stream.append("Hello, ")  ...  stream.close()   # from any thread
    for chunk in handle.chunks():                   # float32 [hop] chunks as they are made
        ...
    engine.close()

The queue, the engine thread, handles, deadlines and figures are those of every family's engine
(`vv_runtime.request_engine`); this module gives what is the streaming model's own: the request check, the
jobs (`RealtimePipeline.job` over the step-wise scheduler's `RealtimeSteps`), the voices (the presets of the
ENGINE_DIR, loaded once at start and shared by every job) and the wait for text.

Streamed text: a job whose next text window is not complete makes no frame (the scheduler's step skips it)
while the others go on; when every running job waits for text the engine thread sleeps until a stream
releases tokens or closes (each job's text feed wakes it), a request arrives or is cancelled, or a deadline
passes. A request's audio equals the same text given at once, and equals itself run alone (same seed).

`submit` refuses in one line (RuntimeInputError) before anything is queued: an unknown preset, a text that is
not a str or a TextStream, text beyond the model's context (a stream's later pieces are checked as they come:
`TextStream.append` / `close` raise), bad options. A `SpeechRequest` (the service's `/v1/audio/speech`: plain
text, one voice) is taken too: its one voice names a preset.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

from .errors import RuntimeInputError
from .manifest import STREAMING_FAMILY
from .realtime_pipeline import RealtimePipeline, TextStream
from .realtime_steps import RealtimeJob, TextFeed, VoicePreset, check_text_context
from .request_engine import RequestEngine, RequestHandle, check_options
from .scheduler import Scheduler
from .script import SPEAKER_LINE
from .service_engine import SpeechRequest

__all__ = ["PresetVoices", "RealtimeEngine", "RealtimeHandle", "RealtimeRequest", "realtime_request"]


@dataclass
class RealtimeRequest:
    text: str | TextStream           # the whole text, or a stream fed while audio is made (engine.text_stream())
    voice: str                       # a voice preset of the ENGINE_DIR
    cfg_scale: float | None = None   # None: the manifest's default
    seed: int | None = None          # same seed + same text => same audio, whatever runs beside it
    max_new_frames: int | None = None
    timeout_s: float | None = None   # per-request deadline (waiting for text included)


def realtime_request(request: SpeechRequest) -> RealtimeRequest:
    """A SpeechRequest (plain text, one voice: the service's speech routes) as a request of the realtime model."""
    voices = list(request.voices or [])
    if len(voices) != 1:
        raise RuntimeInputError(f"the realtime model speaks with one preset voice; {len(voices)} given")
    script = request.script
    if not isinstance(script, str):
        raise RuntimeInputError("script: expected text")
    if not request.plain_text and any(SPEAKER_LINE.match(line.strip()) for line in script.splitlines()):
        raise RuntimeInputError("the realtime model speaks plain text with one voice: no 'Speaker N:' lines")
    return RealtimeRequest(script, voices[0], cfg_scale=request.cfg_scale, seed=request.seed,
                           max_new_frames=request.max_new_frames, timeout_s=request.timeout_s)


class PresetVoices:
    """The voices of a realtime engine: the presets of its ENGINE_DIR (`vv-export voices`), every one loaded
    at start (an unreadable preset fails there, in one line) and shared by every job; read-only."""

    def __init__(self, pipeline: RealtimePipeline):
        self.pipeline = pipeline
        for name in pipeline.voices:
            pipeline.preset(name)

    def get(self, name) -> VoicePreset:
        """The preset `name` (a preset already resolved, e.g. by the service's voice table, is itself)."""
        if isinstance(name, VoicePreset):
            return name
        if not isinstance(name, str):
            raise RuntimeInputError(f"voice: expected a preset name, not {type(name).__name__}")
        return self.pipeline.preset(name)

    def list(self) -> list[dict]:
        entries = self.pipeline.manifest.get("voices") or {}
        return [{"id": name, "name": name, "source": entries[name].get("source"),
                 "prompt_positions": self.pipeline.preset(name).positions["tts_lm"]} for name in self.pipeline.voices]

    def __len__(self) -> int:
        return len(self.pipeline.voices)


class _TextReady:
    """When a job's first text window was complete (time.monotonic()), heard from its feed."""

    def __init__(self, feed: TextFeed, window: int):
        self.feed, self.window = feed, window
        self.at: float | None = None
        self()

    def __call__(self) -> None:
        if self.at is None and (self.feed.available() >= self.window or self.feed.closed):
            self.at = time.monotonic()


@dataclass
class Prepared:
    """A checked request: its scheduler job and when its first text window was complete."""
    job: RealtimeJob
    text_ready: _TextReady


class RealtimeHandle(RequestHandle):
    """A request of the realtime engine: its chunks and cancel() (RequestHandle), and the streaming figures."""

    @property
    def text_tokens(self) -> int:
        """Text tokens received (released by the stream) so far."""
        return self.prepared.job.text.available()

    @property
    def stalled_s(self) -> float:
        """Seconds the job waited for text after it started (text slower than speech)."""
        return self.prepared.job.stalled_s

    @property
    def first_audio_after_text_s(self) -> float | None:
        """Seconds from the moment the first text window was complete (5 tokens, or the whole text) to the
        first audio."""
        ready = self.prepared.text_ready.at
        if self.first_audio_s is None or ready is None:
            return None
        return max(0.0, self.submitted + self.first_audio_s - ready)


class RealtimeEngine(RequestEngine):
    """Serves RealtimeRequests (or one-voice SpeechRequests) on one RealtimePipeline (module docstring)."""

    family = STREAMING_FAMILY
    handle_class = RealtimeHandle
    thread_name = "vv-realtime-engine"

    def __init__(self, pipeline: RealtimePipeline, max_batch: int = 8, max_queue: int = 64):
        super().__init__(pipeline, max_batch=max_batch, max_queue=max_queue)
        self.voices = PresetVoices(pipeline)
        self._stalled_total = 0.0

    @classmethod
    def from_engine_dir(cls, engine_dir, backend: str = "auto", threads: int | None = None, max_batch: int = 8,
                        max_queue: int = 64, decode_frames: int | None = None) -> "RealtimeEngine":
        """An engine (not started) over the RealtimePipeline of an ENGINE_DIR, its presets loaded. It owns the
        pipeline: `close()` closes it. `decode_frames`: RealtimePipeline.decode_frames."""
        pipeline = RealtimePipeline.from_engine_dir(engine_dir, backend=backend, threads=threads)
        pipeline.decode_frames = decode_frames
        try:
            return cls(pipeline, max_batch=max_batch, max_queue=max_queue)
        except BaseException:
            pipeline.close()
            raise

    def text_stream(self) -> TextStream:
        """A stream to give as a request's text and feed (append, close) while its audio is made."""
        return self.pipeline.text_stream()

    # --- admission ----------------------------------------------------------------------------------

    def check(self, request) -> Prepared:
        """Validate a request (RuntimeInputError, one line) and make its job; no graph is called."""
        if isinstance(request, SpeechRequest):
            request = realtime_request(request)
        if not isinstance(request, RealtimeRequest):
            raise RuntimeInputError("expected a RealtimeRequest")
        preset = self.voices.get(request.voice)
        options = check_options(request, self.pipeline.default_cfg_scale)
        text = request.text
        if not isinstance(text, (str, TextStream)):
            raise RuntimeInputError(f"text: expected a str or a TextStream, not {type(text).__name__}")
        limit = functools.partial(check_text_context, preset.positions, max_positions=self.pipeline.max_positions)
        job = self.pipeline.job(text, preset, cfg_scale=options.cfg_scale, seed=options.seed,
                                max_new_frames=options.max_new_frames)
        limit(job.text.available())
        if isinstance(text, TextStream):
            text.limit = limit
        ready = _TextReady(job.text, self.pipeline.facts.text_window)
        job.text.listen(ready)
        job.text.listen(self._nudge)
        return Prepared(job, ready)

    # --- the jobs of the engine thread ----------------------------------------------------------------

    def _job(self, handle: RealtimeHandle) -> RealtimeJob:
        job = handle.prepared.job
        job.tag = handle
        return job

    _unstarted_job = _job

    def _new_scheduler(self):
        return Scheduler(self.pipeline, max_batch=self.max_batch)

    def _record(self, handle: RealtimeHandle, job: RealtimeJob) -> None:
        super()._record(handle, job)
        with self._lock:
            self._stalled_total += job.stalled_s

    def _waits_for_input(self, sched, out) -> bool:
        # a step in which no job made a frame, left or joined: every running job waits for its next text window
        return out.idle

    def _extra_stats(self) -> dict:
        with self._lock:
            return {"stalled_seconds_total": self._stalled_total, "presets": len(self.voices)}
