"""Graph execution backends behind one interface.

A backend runs the graphs of an ENGINE_DIR by name:

    backend.run(graph_name, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]
    backend.close()

`OrtBackend` uses ONNX Runtime (CUDA when available, else CPU). `TrtBackend`
(`vv_runtime.trt_backend`, imported lazily) runs TensorRT engines behind the same interface:
`trt_backend.trt_engines_match(engine_dir, manifest) -> (ok, reason)` is asked first (cheap), then
the constructor `TrtBackend(engine_dir, manifest)` raises when the engines cannot run; `select_backend`
turns either into a fallback with a one-line notice (`auto`) or a one-line error (`trt`).

The LM's key/value cache is owned by the caller (docs/ENGINE_DIR.md); the loop keeps it in the object
`backend.kv_cache(shape)` returns (default: `HostKVCache`, numpy). A backend that keeps tensors on a
device can return its own cache whose `past(n)` its `run` accepts as `past_kv` and whose `write` accepts
the `new_kv` its `run` returns, so that the cache never travels through host memory.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from .errors import RuntimeInputError
from .manifest import REQUIRED_GRAPHS, io_names

BACKENDS = ("auto", "ort", "trt")


def bucket_slots(n: int, max_slots: int, minimum: int = 64) -> int:
    """Cache slots to hold n: the next power of two (at least `minimum`), capped at `max_slots`."""
    if n > max_slots:
        raise RuntimeInputError(f"the LM cache needs {n} slots but holds at most {max_slots}")
    return min(max_slots, max(minimum, 1 << max(n - 1, 0).bit_length()))


class HostKVCache:
    """The LM cache [L, 2, rows, KV, slots, D] in host memory, grown by powers of two up to shape[4].

    `past(n)` hands the whole buffer (at least n + 1 slots) to the graph as `past_kv`, without a copy;
    the caller masks slots n and above. The buffer is reallocated only when it must grow (a handful
    of times per generation), so decode steps never copy the cache, and the decode shapes come in a
    few buckets (fixed shapes for engines and CUDA graphs).
    """

    def __init__(self, shape: tuple[int, ...], dtype=np.float32):
        self.shape = tuple(int(d) for d in shape)
        self.data = np.zeros(self._with_slots(bucket_slots(1, self.shape[4])), dtype=dtype)

    def _with_slots(self, slots: int) -> tuple[int, ...]:
        return self.shape[:4] + (slots,) + self.shape[5:]

    def reserve(self, n: int) -> None:
        if n > self.data.shape[4]:
            grown = np.zeros(self._with_slots(bucket_slots(n, self.shape[4])), dtype=self.data.dtype)
            grown[:, :, :, :, : self.data.shape[4]] = self.data
            self.data = grown

    def write(self, rows: slice, start: int, new_kv) -> None:
        """new_kv [L, 2, rows, KV, seq, D] (or rows broadcast from 1) into slots start..start+seq-1."""
        new_kv = np.asarray(new_kv)
        self.reserve(start + new_kv.shape[4])
        self.data[:, :, rows, :, start:start + new_kv.shape[4]] = new_kv

    def zero(self, row: int, start: int, stop: int) -> None:
        self.data[:, :, row, :, start:stop] = 0.0

    def past(self, n: int) -> np.ndarray:
        """The whole buffer, at least n + 1 slots; slots n and above must be masked by the caller."""
        self.reserve(n + 1)
        return self.data


class Backend:
    name = "base"

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def kv_cache(self, shape: tuple[int, ...]) -> HostKVCache:
        """A preallocated LM cache of `shape` ([L, 2, rows, KV, capacity, D]) for the loop."""
        return HostKVCache(shape)

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return self.name


class OrtBackend(Backend):
    """One onnxruntime.InferenceSession per graph; the loop's graphs are opened and checked at load."""

    name = "ort"

    def __init__(self, engine_dir: str | Path, manifest: dict, providers: list[str] | None = None,
                 threads: int | None = None, graphs: tuple[str, ...] = REQUIRED_GRAPHS):
        import onnxruntime as ort

        self._ort = ort
        self.engine_dir = Path(engine_dir)
        self.manifest = manifest
        if providers is None:
            available = ort.get_available_providers()
            providers = (["CUDAExecutionProvider", "CPUExecutionProvider"]
                         if "CUDAExecutionProvider" in available else ["CPUExecutionProvider"])
        self.providers = providers
        self.threads = threads
        self.sessions: dict[str, object] = {}
        self._outputs: dict[str, list[str]] = {}
        for graph in graphs:
            self._session(graph)

    def _session(self, graph: str):
        session = self.sessions.get(graph)
        if session is not None:
            return session
        if graph not in self.manifest["graphs"]:
            raise RuntimeInputError(f"ENGINE_DIR: graph {graph!r} is not in the manifest")
        entry = self.manifest["graphs"][graph]
        path = self.engine_dir / entry.get("file", f"{graph}.onnx")
        opts = self._ort.SessionOptions()
        opts.log_severity_level = 3
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        threads = self.threads
        if not threads and entry.get("weight_bytes", 0) < SMALL_GRAPH_BYTES:
            threads = 1  # small graphs: thread hand-offs cost more than they save (6x on the tiny model)
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        try:
            session = self._ort.InferenceSession(str(path), sess_options=opts, providers=self.providers)
        except Exception as exc:
            detail = " ".join(str(exc).split())[:300]
            raise RuntimeInputError(f"{path}: onnxruntime cannot load it ({detail})") from exc
        want_in, want_out = io_names(self.manifest, graph)
        got_in = [i.name for i in session.get_inputs()]
        got_out = [o.name for o in session.get_outputs()]
        if sorted(got_in) != sorted(want_in) or sorted(got_out) != sorted(want_out):
            raise RuntimeInputError(f"{path}: I/O names {got_in} -> {got_out} differ from the manifest's "
                                    f"{want_in} -> {want_out}")
        self.sessions[graph] = session
        self._outputs[graph] = got_out
        return session

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self._session(graph)
        names = self._outputs[graph]
        values = session.run(names, {k: np.ascontiguousarray(v) for k, v in feeds.items()})
        return dict(zip(names, values))

    def close(self) -> None:
        self.sessions.clear()

    def describe(self) -> str:
        return "ort[" + ",".join(p.replace("ExecutionProvider", "") for p in self.providers) + "]"


SMALL_GRAPH_BYTES = 64 << 20  # below this many weight bytes a graph runs on one intra-op thread by default


def select_backend(engine_dir: str | Path, manifest: dict, name: str = "auto", threads: int | None = None,
                   notice=None) -> Backend:
    """`ort`, `trt` or `auto` (TensorRT when the manifest lists engines and they load, else ORT).

    `notice(text)` receives the one-line reason when `auto` falls back to ORT (default: stderr).
    """
    if name not in BACKENDS:
        raise RuntimeInputError(f"--backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if notice is None:
        def notice(text: str) -> None:
            print(f"note: {text}", file=sys.stderr)
    if name == "ort":
        return OrtBackend(engine_dir, manifest, threads=threads)
    engines = (manifest.get("trt") or {}).get("engines")
    if not engines:
        if name == "trt":
            raise RuntimeInputError(f"--backend trt: {engine_dir} has no TensorRT engines "
                                    f"(run `vv-export trt --engine-dir {engine_dir}`)")
        return OrtBackend(engine_dir, manifest, threads=threads)
    try:
        from . import trt_backend  # noqa: PLC0415 (TensorRT is optional)

        match = getattr(trt_backend, "trt_engines_match", None)
        if match is not None:  # cheap check first: no engine deserialized
            ok, reason = match(engine_dir, manifest)
            if not ok:
                raise RuntimeInputError(reason)
        return trt_backend.TrtBackend(engine_dir, manifest)
    except Exception as exc:  # ImportError (no tensorrt / no GPU), mismatched or stale engines
        reason = " ".join(str(exc).split()) or type(exc).__name__
        if name == "trt":
            raise RuntimeInputError(f"--backend trt: TensorRT unavailable ({reason})") from exc
        notice(f"TensorRT unavailable ({reason}); using ONNX Runtime")
        return OrtBackend(engine_dir, manifest, threads=threads)
