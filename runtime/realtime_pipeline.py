"""VibeVoice-Realtime-0.5B generation (Microsoft's streaming `generate`) on the graphs of an ENGINE_DIR.

`RealtimePipeline` holds the graphs (a backend), the tokenizer, the voice presets of the ENGINE_DIR and the
model facts; `generate` speaks one text with one preset voice through the step-wise scheduler and the model
steps of `vv_runtime.realtime_steps`. Text may also arrive while audio is being made (`TextStream`): tokens are
fed only once no later character can change them, so the result equals the same text given at once.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import RuntimeInputError, one_line
from .manifest import STREAMING_FAMILY
from .pipeline_base import EnginePipeline
from .realtime_steps import RealtimeFacts, RealtimeJob, RealtimeSteps, TextFeed, VoicePreset
from .scheduler import Scheduler, seeded_noise

# a point of the text no later character can move a token boundary across: a space followed by a non-space
# (the byte-level BPE pre-tokenizer never joins across it, and what precedes it is already complete)
_STABLE_BOUNDARY = re.compile(r" (?=\S)")
TEXT_WAIT_S = 0.5   # longest sleep of a job waiting for text between two looks (the feed wakes it earlier)


class TextStream:
    """Text that arrives in pieces (`append`), then `close()`: its tokens, fed to a job as they become final.

    The original tokenizes `text.strip() + "\\n"`. While the text is open, only the tokens before its last
    stable boundary are released (the tail could still merge with what comes next); at close the whole text
    is tokenized and must extend what was released (RuntimeError otherwise: a tokenizer this rule does not hold
    for). `limit(tokens)`, when set (an engine sets it from the voice and the context), raises RuntimeInputError
    for text that would pass the model's context: the piece or the close is refused and the stream is left as it
    was. The feed's listeners hear of every release and of the close."""

    def __init__(self, encode, feed: TextFeed | None = None):
        self._encode = encode
        self.feed = feed if feed is not None else TextFeed(closed=False)
        self.text = ""
        self.limit = None
        self._lock = threading.Lock()

    def append(self, piece: str) -> None:
        with self._lock:
            if self.feed.closed:
                raise RuntimeInputError("text is closed: no more text can be added")
            text = self.text + str(piece)
            body = text.lstrip()
            cut = [m.start() for m in _STABLE_BOUNDARY.finditer(body)]
            tokens = self._checked(self._encode(body[:cut[-1]])) if cut else None
            self.text = text
            released = tokens is not None and self._release(tokens)
        if released:
            self.feed.changed()

    def close(self) -> None:
        with self._lock:
            if self.feed.closed:
                return
            self._release(self._checked(self._encode(self.text.strip() + "\n")))
            self.feed.closed = True
        self.feed.changed()

    def _checked(self, tokens: list[int]) -> list[int]:
        if self.limit is not None:
            self.limit(len(tokens))
        return tokens

    def _release(self, tokens: list[int]) -> bool:
        """Feed the tokens not yet released; whether there were any."""
        have = self.feed.tokens
        if tokens[: len(have)] != have:
            raise RuntimeError("streamed text: released tokens changed; the stable-boundary rule does not hold "
                               "for this tokenizer")
        new = tokens[len(have):]
        have.extend(new)
        return bool(new)


@dataclass
class RealtimeResult:
    audio: np.ndarray                # float32 [samples]
    frames: int
    steps: int
    eos_logits: list                 # the end-of-speech logit after each frame fed
    text_tokens: int
    stalled_s: float                 # time the job waited for text after it started


class RealtimePipeline(EnginePipeline):
    family = STREAMING_FAMILY
    default_cfg = 1.5

    def __init__(self, engine_dir: str | Path, manifest: dict, backend):
        from tokenizers import Tokenizer

        super().__init__(engine_dir, manifest, backend)
        self.facts = RealtimeFacts.from_manifest(manifest)
        self.max_positions = self.facts.max_positions
        self.tokenizer = Tokenizer.from_file(str(self.engine_dir / manifest.get("tokenizer", "tokenizer.json")))
        # latents per acoustic_decoder call at most (RealtimeSteps: grouped decoding); None: the manifest's
        self.decode_frames: int | None = None
        self._presets: dict[str, VoicePreset] = {}
        self._preset_lock = threading.Lock()

    # --- inputs ---------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def text_tokens(self, text: str) -> list[int]:
        """The original processor's text tokens: `text.strip() + "\\n"`."""
        if not isinstance(text, str) or not text.strip():
            raise RuntimeInputError("text is empty")
        return self.encode(text.strip() + "\n")

    def text_stream(self) -> TextStream:
        return TextStream(self.encode)

    @property
    def voices(self) -> list[str]:
        return sorted((self.manifest.get("voices") or {}).keys())

    def preset(self, name: str) -> VoicePreset:
        """The voice preset `name` of the ENGINE_DIR, loaded once (its caches are shared by every job)."""
        with self._preset_lock:
            if name in self._presets:
                return self._presets[name]
            entry = (self.manifest.get("voices") or {}).get(name) if isinstance(name, str) else None
            if entry is None:
                known = ", ".join(self.voices) or "none: add some with `vv-export voices`"
                raise RuntimeInputError(f"voice {name!r}: not a preset of this ENGINE_DIR (presets: {known})")
            preset = load_preset(self.engine_dir / entry["file"], name, self.facts)
            self._presets[name] = preset
            return preset

    # --- generation -----------------------------------------------------------------------------------

    def new_steps(self) -> RealtimeSteps:
        return RealtimeSteps(self.backend, self.facts, decode_frames=self.decode_frames)

    def job(self, text: str | TextStream, voice: str | VoicePreset, cfg_scale: float | None = None,
            seed: int | None = None, noise=None, max_new_frames: int | None = None, ignore_eos: bool = False,
            tag=None) -> RealtimeJob:
        """A scheduler job. noise: None (its own generator from `seed`), an array [frames, >= 1, A] (frame k
        starts from noise[k][0]: the original's draws) or a callable frame -> [A]."""
        if max_new_frames is not None and int(max_new_frames) < 1:
            raise RuntimeInputError(f"max_new_frames {max_new_frames}: must be at least 1")
        preset = voice if isinstance(voice, VoicePreset) else self.preset(voice)
        feed = text.feed if isinstance(text, TextStream) else TextFeed(self.text_tokens(text), closed=True)
        if noise is None:
            draw = seeded_noise(seed, self.facts.latent_dim)
        elif callable(noise):
            draw = noise
        else:
            table = np.asarray(noise, dtype=np.float32)

            def draw(frame: int) -> np.ndarray:
                if frame >= table.shape[0]:
                    raise RuntimeInputError(f"noise table has {table.shape[0]} frames; frame {frame} needed")
                return table[frame].reshape(-1, self.facts.latent_dim)[0]
        return RealtimeJob(preset=preset, text=feed, cfg_scale=self.default_cfg_scale if cfg_scale is None
                           else float(cfg_scale), max_new_frames=max_new_frames, noise=draw, seed=seed,
                           ignore_eos=ignore_eos, tag=tag)

    def generate(self, text: str | TextStream, voice: str | VoicePreset, stream: bool = False, on_step=None,
                 **options):
        """Speak `text` (or a `TextStream` fed by another thread) with the preset `voice`.

        stream=False: a `RealtimeResult`; stream=True: a generator of float32 [hop] chunks whose return value
        (StopIteration.value) is the result. options: those of `job`."""
        return self.streamed_or_whole(self._run(self.job(text, voice, **options), on_step), stream)

    def _run(self, job: RealtimeJob, on_step) -> Iterator[np.ndarray]:
        sched = Scheduler(self.new_steps(), max_batch=1)
        sched.add(job)
        arrived = threading.Event()      # set by the feed when text arrives (from the producer's thread)
        job.text.listen(arrived.set)
        chunks = []
        while sched.busy:
            arrived.clear()
            out = sched.step()
            for _, chunk in out.chunks:
                chunks.append(chunk)
                yield chunk
            for left in out.finished:
                if left.error is not None:
                    raise left.error
            if on_step is not None:
                on_step(sched.steps - 1, job)
            if out.idle and not job.done and not job.text.closed:
                arrived.wait(TEXT_WAIT_S)  # the job waits for its next text window
        audio = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
        return RealtimeResult(audio, job.frames, sched.steps, list(job.eos_logits), len(job.text.tokens),
                              job.stalled_s)


PRESET_TENSORS = ("text_lm.kv", "tts_lm.kv", "tts_lm.hidden", "neg_tts_lm.kv", "neg_tts_lm.hidden")


def load_preset(path: Path, name: str, facts: RealtimeFacts) -> VoicePreset:
    """voices/<name>.safetensors of an ENGINE_DIR (written by `vv-export voices`) -> a VoicePreset, its shapes
    checked against the model."""
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 -- any unreadable file is one line
        raise RuntimeInputError(f"voice {name!r}: {path} is unreadable ({one_line(exc)})") from exc
    missing = [k for k in PRESET_TENSORS if k not in tensors]
    if missing:
        raise RuntimeInputError(f"voice {name!r}: {path} lacks {', '.join(missing)}")
    want = {"text_lm.kv": facts.text_lm_layers, "tts_lm.kv": facts.tts_lm_layers, "neg_tts_lm.kv": facts.tts_lm_layers}
    for key, layers in want.items():
        shape = tensors[key].shape
        if len(shape) != 6 or shape[0] != layers or shape[1] != 2 or shape[2] != 1 or shape[3] != facts.kv_heads \
                or shape[5] != facts.head_dim:
            raise RuntimeInputError(f"voice {name!r}: {key} has shape {list(shape)}, the model needs "
                                    f"[{layers}, 2, 1, {facts.kv_heads}, positions, {facts.head_dim}]")
    for key in ("tts_lm.hidden", "neg_tts_lm.hidden"):
        if tensors[key].shape[-1] != facts.hidden:
            raise RuntimeInputError(f"voice {name!r}: {key} has width {tensors[key].shape[-1]}, the model's hidden "
                                    f"size is {facts.hidden}")

    def f32(key):
        return np.ascontiguousarray(tensors[key], dtype=np.float32)
    return VoicePreset(name, f32("text_lm.kv"), f32("tts_lm.kv"), f32("tts_lm.hidden").reshape(-1, facts.hidden)[-1],
                       f32("neg_tts_lm.kv"), f32("neg_tts_lm.hidden").reshape(-1, facts.hidden)[-1])
