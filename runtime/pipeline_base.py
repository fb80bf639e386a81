"""What the pipelines of every model family share: the ENGINE_DIR, its manifest and backend, the audio format,
the default CFG scale, opening from an ENGINE_DIR, closing, and handing back a generation streamed or whole.

`vv_runtime.pipeline.Pipeline` (VibeVoice-1.5B / 7B) and `vv_runtime.realtime_pipeline.RealtimePipeline`
(VibeVoice-Realtime-0.5B) build on it; a new family's pipeline does too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Generator

from .backend import Backend, select_backend
from .manifest import load_manifest


class EnginePipeline:
    """The graphs of an ENGINE_DIR (a backend) and the facts every family's pipeline reads from its manifest."""

    default_cfg = 1.3  # the family's CFG scale where the manifest records none

    def __init__(self, engine_dir: str | Path, manifest: dict, backend: Backend):
        self.engine_dir = Path(engine_dir)
        self.manifest = manifest
        self.backend = backend
        model = manifest["model"]
        self.hop = int(model.get("hop_length", 3200))
        self.sample_rate = int(model.get("sample_rate", 24000))
        self.default_cfg_scale = float((manifest.get("diffusion") or {}).get("default_cfg_scale", self.default_cfg))

    @classmethod
    def from_engine_dir(cls, engine_dir: str | Path, backend: str | Backend = "auto", threads: int | None = None):
        """The pipeline of an ENGINE_DIR on the backend named (auto, ort, trt) or given."""
        manifest = load_manifest(engine_dir)
        if not isinstance(backend, Backend):
            backend = select_backend(engine_dir, manifest, backend, threads=threads)
        return cls(engine_dir, manifest, backend)

    def close(self) -> None:
        self.backend.close()

    @staticmethod
    def streamed_or_whole(gen: Generator, stream: bool):
        """`gen` itself (stream=True: the caller drains it; its return value is the result) or, drained here,
        the result it returns."""
        if stream:
            return gen
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                return stop.value
