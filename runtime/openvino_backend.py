"""OpenVINO for the graphs an ENGINE_DIR's manifest assigns to it (docs/ENGINE_DIR.md, Graph runtimes).

`vv-export onnx --runtimes ort,openvino` times OpenVINO against ONNX Runtime per graph and, where OpenVINO is
faster within the graph's tolerance, stores the graph's OpenVINO IR beside its ONNX file and names it in
``manifest["graphs"][g]["runtime"]`` (``name`` "openvino", ``file`` / ``weights_file`` the IR, ``precision``,
``inference_precision``, ``shapes``, ``warm``). `OrtBackend` (vv_runtime.backend) hands those graphs to
`OpenVinoGraphs` and runs the rest itself. OpenVINO itself is imported by `import_openvino` (the module
imports without it): its ImportError (OpenVINO not installed) is the backend's cue to run those graphs' ONNX
files on ONNX Runtime instead.

Each graph is read once (the IR's weights are mapped from the file, not copied: an IR of int8 weights stays
int8), compiled once per process and warmed at load at the shapes the exporter timed it at (``warm``). A
graph with ``shapes: "static"`` (the per-frame graphs, whose shapes are fixed for a batch size) is compiled
for exactly the shapes of ``warm`` (one frame of one row), faster there than a dynamic compilation; a call
of any other shape (more rows) runs a dynamic compilation of the same model, made on the first such call.
Every compilation holds its own copy of the weights in OpenVINO's layout. The other graphs are compiled
once with their dynamic dimensions. An infer request is not thread-safe: each graph's calls are serialized
by a lock.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from .backend_base import graph_threads
from .errors import RuntimeInputError, one_line
from .manifest import OPENVINO_RUNTIME, io_names

RUNTIME = OPENVINO_RUNTIME
# Compilation properties of every graph: one request at a time, latency first. SNIPPETS_MODE DISABLE: OpenVINO
# 2026.4's snippets JIT (fused elementwise subgraphs) crashes the process compiling the tiny fixture's sampler
# for static shapes on one thread; without it the mid-size graphs ran as fast (lm, sampler, codecs: within 5 %).
COMPILE_PROPERTIES = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "SNIPPETS_MODE": "DISABLE"}


def import_openvino():
    """The openvino module; ImportError where it is not installed."""
    import openvino  # noqa: PLC0415 (an optional extra)

    return openvino


def warm_feeds(manifest: dict, graph: str, dims: dict) -> dict[str, np.ndarray]:
    """Inputs of `graph` at the dimension sizes `dims` (every named dimension of its inputs given): zeros,
    an attention mask of ones, positions that continue the past, a cfg scale of the default."""
    feeds = {}
    for spec in manifest["graphs"][graph]["inputs"]:
        shape = [int(dims[d]) if isinstance(d, str) else int(d) for d in spec["shape"]]
        dtype = np.int64 if spec["dtype"] == "int64" else np.float32
        if spec["name"] == "attention_mask":
            value = np.ones(shape, dtype)
        elif spec["name"] == "position_ids":
            value = np.broadcast_to(np.arange(dims.get("past", 0), dims.get("past", 0) + shape[-1]), shape)
        elif spec["name"] == "cfg_scale":
            value = np.full(shape, (manifest.get("diffusion") or {}).get("default_cfg_scale", 1.0))
        else:
            value = np.zeros(shape, dtype)
        feeds[spec["name"]] = np.ascontiguousarray(value, dtype=dtype)
    return feeds


class _Compiled:
    """One compiled model and its infer request; outputs by the manifest's names."""

    def __init__(self, compiled, outputs: list[str]):
        self.request = compiled.create_infer_request()
        self.ports = []
        for name in outputs:
            port = next((p for p in compiled.outputs if name in p.get_names()), None)
            if port is None:
                raise RuntimeInputError(f"OpenVINO model has no output {name!r}")
            self.ports.append((name, port))

    def run(self, feeds: dict) -> dict[str, np.ndarray]:
        results = self.request.infer(feeds, share_inputs=True, share_outputs=False)
        return {name: results[port] for name, port in self.ports}


class OpenVinoGraph:
    """One graph served by OpenVINO as its manifest entry's `runtime` says."""

    def __init__(self, core, engine_dir: Path, manifest: dict, graph: str, threads: int | None):
        entry = manifest["graphs"][graph]
        self.graph = graph
        self.manifest = manifest
        self.runtime = entry["runtime"]
        self.path = engine_dir / self.runtime["file"]
        weights = engine_dir / self.runtime.get("weights_file", Path(self.runtime["file"]).with_suffix(".bin").name)
        self.core = core
        try:
            self.model = core.read_model(str(self.path), str(weights))
        except Exception as exc:
            raise RuntimeInputError(f"{self.path}: OpenVINO cannot read it ({one_line(exc)[:300]})") from exc
        want_in, self.outputs = io_names(manifest, graph)
        got_in = sorted(n for port in self.model.inputs for n in port.get_names() if n in want_in)
        got_out = sorted(n for port in self.model.outputs for n in port.get_names() if n in self.outputs)
        if got_in != sorted(want_in) or got_out != sorted(self.outputs):
            raise RuntimeInputError(f"{self.path}: I/O names {got_in} -> {got_out} differ from the manifest's "
                                    f"{want_in} -> {self.outputs}")
        self.static = self.runtime.get("shapes") == "static"
        self.properties = {**COMPILE_PROPERTIES,
                           "INFERENCE_PRECISION_HINT": self.runtime.get("inference_precision", "f32"),
                           "INFERENCE_NUM_THREADS": int(graph_threads(entry, threads) or 0)}
        if self.runtime.get("dynamic_quantization_group_size") is not None:
            self.properties["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = int(self.runtime["dynamic_quantization_group_size"])
        self._static: dict[tuple, _Compiled] = {}  # by the inputs' shapes
        self._dynamic: _Compiled | None = None
        self._lock = threading.Lock()
        if not self.static:
            self._dynamic = self._compile(self.model)
            self.model = None  # compiled once for every shape: the model is not needed again

    def _compile(self, model) -> _Compiled:
        try:
            return _Compiled(self.core.compile_model(model, "CPU", self.properties), self.outputs)
        except RuntimeInputError as exc:
            raise RuntimeInputError(f"{self.path}: {exc}") from exc
        except Exception as exc:
            raise RuntimeInputError(f"{self.path}: OpenVINO cannot compile it ({one_line(exc)[:300]})") from exc

    @staticmethod
    def _shapes(feeds: dict) -> tuple:
        return tuple(sorted((name, tuple(value.shape)) for name, value in feeds.items()))

    def _for(self, feeds: dict) -> _Compiled:
        compiled = self._static.get(self._shapes(feeds)) if self._static else None
        if compiled is None:
            if self._dynamic is None:
                self._dynamic = self._compile(self.model)
            compiled = self._dynamic
        return compiled

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {k: np.ascontiguousarray(v) for k, v in feeds.items()}
        with self._lock:
            return self._for(feeds).run(feeds)

    def warm(self) -> None:
        """One call at each shape the exporter recorded (`warm`), compiled for that shape first when the graph
        has static shapes: the compilation and the first call's set-up happen here, not in a request."""
        for dims in self.runtime.get("warm") or []:
            feeds = warm_feeds(self.manifest, self.graph, dims)
            if self.static:
                key = self._shapes(feeds)
                if key not in self._static:
                    model = self.model.clone()
                    model.reshape({name: list(shape) for name, shape in key})
                    self._static[key] = self._compile(model)
            self.run(feeds)


class OpenVinoGraphs:
    """The OpenVINO graphs of one backend: opened, compiled and warmed at construction (`graphs`), others on
    their first call."""

    def __init__(self, engine_dir: str | Path, manifest: dict, graphs, threads: int | None = None):
        self.engine_dir = Path(engine_dir)
        self.manifest = manifest
        self.threads = threads
        self.core = import_openvino().Core()
        self.graphs: dict[str, OpenVinoGraph] = {}
        for graph in graphs:
            self.open(graph).warm()

    def open(self, graph: str) -> OpenVinoGraph:
        opened = self.graphs.get(graph)
        if opened is None:
            opened = self.graphs[graph] = OpenVinoGraph(self.core, self.engine_dir, self.manifest, graph, self.threads)
        return opened

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.open(graph).run(feeds)

    def close(self) -> None:
        self.graphs.clear()
