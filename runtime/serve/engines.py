"""The speech engine of an ENGINE_DIR, by the model family its manifest names: what vv-serve (and each of its
Ray replicas) serves."""

from __future__ import annotations

import vv_engine_dir

from ..errors import RuntimeInputError
from ..manifest import load_manifest
from ..realtime_engine import RealtimeEngine
from ..realtime_steps import decode_frames_not_grouped
from ..service_engine import SpeechEngine


def open_engine(engine_dir, backend: str = "auto", threads: int | None = None, max_batch: int = 8,
                max_queue: int = 64, voices_dir=None, max_voice_seconds: float | None = None,
                decode_frames: int | None = None):
    """A SpeechEngine (VibeVoice-1.5B/7B: voices from the sound files of `voices_dir`) or a RealtimeEngine
    (VibeVoice-Realtime-0.5B: voices are the presets of the ENGINE_DIR; `decode_frames`: most frames of a
    request per acoustic decoder call, None the manifest's), not started; it owns its pipeline."""
    family = vv_engine_dir.model_family(load_manifest(engine_dir)).name
    if family == RealtimeEngine.family:
        if voices_dir is not None:
            raise RuntimeInputError(f"--voices {voices_dir}: {engine_dir} holds a VibeVoice-Realtime model, whose "
                                    f"voices are the presets of its ENGINE_DIR (add them with `vv-export voices`)")
        return RealtimeEngine.from_engine_dir(engine_dir, backend=backend, threads=threads, max_batch=max_batch,
                                              max_queue=max_queue, decode_frames=decode_frames)
    if decode_frames is not None:
        raise decode_frames_not_grouped(engine_dir)
    return SpeechEngine.from_engine_dir(engine_dir, backend=backend, threads=threads, max_batch=max_batch,
                                        max_queue=max_queue, voices_dir=voices_dir, max_voice_seconds=max_voice_seconds)
