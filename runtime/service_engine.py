"""The speech engine of VibeVoice-1.5B/7B a server drives: requests in, audio chunks out, one background thread.

    engine = SpeechEngine.from_engine_dir(dir, voices_dir="voices/", max_batch=8, max_queue=64).start()
    handle = engine.submit(SpeechRequest("Speaker 1: Hello.", voices=["alice"], seed=3))
    for chunk in handle.chunks():      # float32 [hop] chunks as they are made
        ...
    engine.close()                     # drain, stop, close the pipeline

The queue, the engine thread, handles, deadlines and figures are those every family's engine shares
(`vv_runtime.request_engine`, whose names `Cancelled`, `EngineStopped`, `QueueFull` and `RequestHandle` this
module re-exports). `submit` checks a request (script, voices, context length) in the caller's thread and
raises `RuntimeInputError` (one line) before anything is queued.

Voices: `VoiceStore` keeps each voice's normalised audio (exactly what the prompt encoder gets) and
its `acoustic_encoder` embeddings, computed once; requests name voices by id (or pass raw audio).

Each request's tokens and audio equal those it gets alone with the same seed (audio up to float reordering,
1e-4 of the peak; docs/SCHEDULER.md). A preset voice's prompt prefix (system prompt + voice section) has its
LM cache computed once, when the voice is added, and reused by every request naming that voice.

Graph calls (the engine's steps and the voice encodings of `VoiceStore.add`) are serialised by one
lock (the voice store's), so a backend never runs two graphs at once.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .audio import SAMPLE_RATE, prepare_voice, read_audio, read_audio_bytes, to_mono
from .errors import RuntimeInputError
from .kv_rows import PrefixCache
from .prompt import Prompt
from .request_engine import (Cancelled, EngineStopped, QueueFull, RequestEngine, RequestHandle, check_options,
                             error_kind)
from .scheduler import Scheduler
from .script import SPEAKER_LINE, parse_script
from .vibevoice_steps import VibeVoiceJob, check_prompt_length

if TYPE_CHECKING:  # pragma: no cover
    from .pipeline import Pipeline

__all__ = ["Admitted", "Cancelled", "EngineStopped", "QueueFull", "RequestHandle", "SpeechEngine", "SpeechRequest",
           "Voice", "VoiceStore", "error_kind", "parse_request_script"]

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif", ".au")
VOICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


# --- requests -------------------------------------------------------------------------------------

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

class SpeechEngine(RequestEngine):
    """Serves SpeechRequests on one Pipeline from a background thread (see the module docstring)."""

    family = "vibevoice"
    job_stage = "voice encoding"

    def __init__(self, pipeline: "Pipeline", max_batch: int = 8, max_queue: int = 64,
                 voices: VoiceStore | None = None, reuse_prefix: bool = True):
        self.reuse_prefix = bool(reuse_prefix)  # preset voices: their prompt prefix's LM cache is reused
        self.voices = voices if voices is not None else VoiceStore(pipeline)
        if self.voices.pipeline is None:
            self.voices.pipeline = pipeline
        # the voice store's lock serialises every graph call: the engine's steps and the voice encodings
        super().__init__(pipeline, max_batch=max_batch, max_queue=max_queue, graph_lock=self.voices.lock)

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
        options = check_options(request, pipe.default_cfg_scale)
        return Admitted(parsed, prompt, voices, options.cfg_scale, options.seed, options.max_new_frames)

    def _extra_stats(self) -> dict:
        return {"prefix_cache": {"entries": len(self.voices.prefixes), "hits": self.voices.prefixes.hits,
                                 "misses": self.voices.prefixes.misses}}

    # --- the jobs of the engine thread -------------------------------------------------------------

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

    def _unstarted_job(self, handle: RequestHandle):
        return VibeVoiceJob(handle.prepared.prompt, tag=handle)

    def _new_scheduler(self):
        return Scheduler(self.pipeline, max_batch=self.max_batch, reuse_prefix=self.reuse_prefix,
                         prefix_cache=self.voices.prefixes)


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
