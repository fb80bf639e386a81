"""Graph execution backends behind one interface.

A backend runs the graphs of an ENGINE_DIR by name:

    backend.run(graph_name, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]
    backend.close()

`OrtBackend` uses ONNX Runtime (CUDA when available, else CPU), and OpenVINO for the graphs whose manifest
entry names it (`runtime`, chosen per graph at export: `vv-export onnx --runtimes ort,openvino`; served by
`vv_runtime.openvino_backend`, which imports OpenVINO only then). Where OpenVINO is not installed those
graphs run their ONNX files on ONNX Runtime, and the backend says so in one line (`notice`). `TrtBackend`
(`vv_runtime.trt_backend`, imported lazily) runs TensorRT engines behind the same interface:
`trt_backend.trt_engines_match(engine_dir, manifest) -> (ok, reason)` is asked first (cheap), then
the constructor `TrtBackend(engine_dir, manifest)` raises when the engines cannot run; `select_backend`
turns either into a fallback with a one-line notice (`auto`) or a one-line error (`trt`).

`Backend` and `PlanLimits` live in `vv_runtime.backend_base` (which both backends import, so neither
imports the other at module level); `KVCache`, `HostKVCache` and `bucket_slots` in `vv_runtime.kv_cache`.
All are re-exported here. A backend states what it can run with `limits()` / `check_fits(graph, shapes)`
(ORT: no limits; TensorRT: its engines' optimisation profiles).

The LM's key/value cache is owned by the caller (docs/ENGINE_DIR.md); the loop keeps it in the `KVCache`
`backend.kv_cache(shape)` returns (default: `HostKVCache`, numpy). A backend that keeps tensors on a
device returns a cache of the same interface on that device (the TensorRT backend's `DeviceKVCache`),
whose `past(n)` its `run` accepts as `past_kv` and whose `write` accepts the `new_kv` its `run` returns,
so that the cache never travels through host memory.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from .backend_base import SMALL_GRAPH_BYTES, Backend, PlanLimits, graph_threads
from .errors import RuntimeInputError, one_line
from .kv_cache import HostKVCache, KVCache, bucket_slots
from .manifest import GRAPH_RUNTIMES, OPENVINO_RUNTIME, RUNTIME_INSTALL, graph_runtime, io_names, required_graphs
from .openvino_backend import OpenVinoGraphs, import_openvino

__all__ = ["BACKENDS", "SMALL_GRAPH_BYTES", "Backend", "HostKVCache", "KVCache", "OrtBackend", "PlanLimits",
           "bucket_slots", "select_backend"]

BACKENDS = ("auto", "ort", "trt")


def _stderr_notice(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


def session_options(threads: int | None):
    """The onnxruntime.SessionOptions of a graph as the runtime runs it, `threads` intra-op threads (None: one per
    core). The exporter times its candidates with the same options.

    The loop calls several sessions in turn, each with a thread pool of its own. Its workers spin between the
    operators of a call (woken for every operator instead, they cost 15 % on the full-size Realtime-0.5B in int8)
    and stop spinning when the call ends (spinning on, they would take the cores from the next session: 1.5x
    slower)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # the graphs' shapes change from call to call (batch rows, prompt length, cache slots): a memory
    # pattern is planned and kept for every new combination of input shapes, a cache that only grows
    # (~17 MB more resident memory on the tiny model after 120 requests, no faster)
    opts.enable_mem_pattern = False
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    return opts


class OrtBackend(Backend):
    """One onnxruntime.InferenceSession per graph, except the graphs whose manifest entry names OpenVINO as
    their runtime (`OpenVinoGraphs`, when `openvino` and OpenVINO is installed); the loop's graphs are opened,
    checked and (OpenVINO) warmed at load.

    `notice(text)` gets the one line that says an ENGINE_DIR's OpenVINO graphs run on ONNX Runtime because
    OpenVINO is not installed (default: stderr). `openvino=False` runs every graph on ONNX Runtime, and so does
    ONNX Runtime on a GPU (the exporter chose OpenVINO against ONNX Runtime on the CPU)."""

    name = "ort"

    def __init__(self, engine_dir: str | Path, manifest: dict, providers: list[str] | None = None,
                 threads: int | None = None, graphs: tuple[str, ...] | None = None, notice=None,
                 openvino: bool = True):
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
        load = required_graphs(manifest) if graphs is None else list(graphs)
        notice = notice or _stderr_notice
        self.openvino = None  # OpenVinoGraphs of the graphs OpenVINO serves
        self.openvino_served: tuple[str, ...] = ()
        named = [g for g in manifest["graphs"] if graph_runtime(manifest, g) == OPENVINO_RUNTIME]
        if named and openvino and providers == ["CPUExecutionProvider"]:  # measured against ONNX Runtime's CPU
            try:
                import_openvino()
            except ImportError as exc:
                notice(
                    f"{engine_dir}: {', '.join(named)} chosen for OpenVINO, which is not installed "
                    f"({one_line(exc)}); running them on ONNX Runtime ({RUNTIME_INSTALL[OPENVINO_RUNTIME]} to use it)")
            else:
                self.openvino_served = tuple(named)
                self.openvino = OpenVinoGraphs(engine_dir, manifest, [g for g in load if g in named], threads)
        unknown = [f"{g} ({graph_runtime(manifest, g)})" for g in load
                   if graph_runtime(manifest, g) not in GRAPH_RUNTIMES]
        if unknown:
            notice(f"{engine_dir}: {', '.join(unknown)}: runtime unknown to this version; running ONNX Runtime")
        for graph in load:
            if graph not in self.openvino_served:
                self._session(graph)

    def _session(self, graph: str):
        session = self.sessions.get(graph)
        if session is not None:
            return session
        if graph not in self.manifest["graphs"]:
            raise RuntimeInputError(f"ENGINE_DIR: graph {graph!r} is not in the manifest")
        entry = self.manifest["graphs"][graph]
        path = self.engine_dir / entry.get("file", f"{graph}.onnx")
        opts = session_options(graph_threads(entry, self.threads))
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
        if graph in self.openvino_served:
            return self.openvino.run(graph, feeds)
        session = self._session(graph)
        names = self._outputs[graph]
        values = session.run(names, {k: np.ascontiguousarray(v) for k, v in feeds.items()})
        return dict(zip(names, values))

    def close(self) -> None:
        self.sessions.clear()
        if self.openvino is not None:
            self.openvino.close()

    def describe(self) -> str:
        ort = "ort[" + ",".join(p.replace("ExecutionProvider", "") for p in self.providers) + "]"
        return ort + (f"+openvino[{','.join(self.openvino_served)}]" if self.openvino_served else "")


def select_backend(engine_dir: str | Path, manifest: dict, name: str = "auto", threads: int | None = None,
                   notice=None) -> Backend:
    """`ort`, `trt` or `auto` (TensorRT when the manifest lists engines and they load, else ORT).

    `notice(text)` receives the one-line reason when `auto` falls back to ORT (default: stderr).
    """
    if name not in BACKENDS:
        raise RuntimeInputError(f"--backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if notice is None:
        notice = _stderr_notice
    if name == "ort":
        return OrtBackend(engine_dir, manifest, threads=threads, notice=notice)
    engines = (manifest.get("trt") or {}).get("engines")
    if not engines:
        if name == "trt":
            raise RuntimeInputError(f"--backend trt: {engine_dir} has no TensorRT engines "
                                    f"(run `vv-export trt --engine-dir {engine_dir}`)")
        return OrtBackend(engine_dir, manifest, threads=threads, notice=notice)
    try:
        from . import trt_backend  # noqa: PLC0415 (TensorRT is optional)

        match = getattr(trt_backend, "trt_engines_match", None)
        if match is not None:  # cheap check first: no engine deserialized
            ok, reason = match(engine_dir, manifest)
            if not ok:
                raise RuntimeInputError(reason)
        return trt_backend.TrtBackend(engine_dir, manifest)
    except Exception as exc:  # ImportError (no tensorrt / no GPU), mismatched or stale engines
        reason = one_line(exc)
        if name == "trt":
            raise RuntimeInputError(f"--backend trt: TensorRT unavailable ({reason})") from exc
        notice(f"TensorRT unavailable ({reason}); using ONNX Runtime")
        return OrtBackend(engine_dir, manifest, threads=threads, notice=notice)
