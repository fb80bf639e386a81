"""TensorRT backend: runs the engines `vv-export trt` recorded in manifest.json behind the Backend interface.

    backend = TrtBackend(engine_dir, manifest)
    outputs = backend.run("lm", {"inputs_embeds": ..., ...})   # numpy in, numpy out
    backend.close()

At load, every engine to load (listed under ``manifest["trt"]["engines"]``) is checked (file present, built from
this ENGINE_DIR's ONNX graph, with the running TensorRT version, for this GPU's compute capability),
deserialized, and its I/O tensor names are checked against the manifest's graph I/O; each problem is
one line naming both sides.

Execution (the TensorRT 10 Python API): one CUDA stream; torch CUDA tensors are
the device buffers, allocated on that stream once per binding at the largest shape of the engine's
profiles (bindings whose maximum exceeds ``buffer_budget_bytes``, e.g. the LM's KV cache at full
context, grow on demand instead); ``set_input_shape`` and ``set_tensor_address`` by name,
``execute_async_v3``.

Profiles and contexts: TensorRT lets each live execution context hold its own optimisation profile, so
every engine gets ONE EXECUTION CONTEXT PER PROFILE at load (context p: created, then
``set_optimization_profile_async(p)``; the first context has profile 0), never switched afterwards. A
call picks its profile (the one containing its shapes, nearest opt first; none: ``CapacityError``) and
runs on that profile's context. All contexts of an engine share ONE activation buffer (USER_MANAGED
memory) sized to the engine's largest need over its profiles. INVARIANT: this sharing is safe only
because every execution of the backend is enqueued on its single stream, one after another; never run
two contexts of one backend concurrently.

CUDA graphs: each context keeps at most one captured graph, keyed by its input shapes and the device
addresses it is bound at (``ContextSlot``); a call with that key replays it, a call with another key
drops it, runs plainly (warm-up, and this call's result) and captures anew, and a plain execution of
the context at another key (a call that does not use graphs, on a profile that has one) drops it too:
a graph only replays on the bindings it was captured with. The graphs whose manifest
role is "per-frame" (diffusion_sampler, acoustic_decoder, semantic_encoder) are padded: their batch is
filled with zero rows up to the chosen profile's maximum (the plans give them one profile per batch
bucket) and the outputs sliced back, so each per-frame context sees one shape and replays one graph.
LM decode steps on the device cache (seq 1, ``past_kv`` a CUDA tensor) replay the decode profile's
graph, the cache bound where it lives; a new (rows, cache bucket, cache address) re-captures (rare).
Cache buffers given up (a cache grown, closed or collected) go to the backend's ``KVBufferPool`` and the
next cache of that shape gets the same buffer back, so the next generation replays the graphs of the
last one instead of capturing them again; the graphs stay valid meanwhile because their key holds the
addresses (nothing replays them unless a call binds that very memory). Only a buffer the pool lets go
tells the backend (``forget_address``) to drop the graphs bound there. Prefill and other profiles run
plainly. When capture fails on a context, that context runs plainly from then on (one notice);
``graph_stats()`` says what ran. Device feeds are converted (dtype, layout) on the engine's stream, after
the caller's stream.

Errors: shapes beyond every profile raise ``CapacityError`` (one line naming the plan's ranges and the
fix); an execution failure (``execute_async_v3`` refused, out of GPU memory) raises ``BackendFault``;
problems of the engines at load stay ``TrtBackendError``.

By default only the engines the generation loop calls are loaded (roles "loop" and "per-frame");
``graphs=`` loads others (the GPU accuracy check asks for all). ``limits()`` / ``check_fits()`` tell
what the loaded engines' recorded profiles can run (vv_runtime.backend_base.PlanLimits), without CUDA.

The LM cache stays on the GPU: ``kv_cache(shape)`` returns a ``DeviceKVCache`` (the runtime's
vv_runtime.kv_cache.KVCache on this device and stream) whose ``past(n)`` is the whole (power-of-two
bucketed) CUDA buffer that ``run`` binds directly as ``past_kv`` (no copy, no host round trip, a few
decode shapes, each replayable). ``run("lm", ...)`` returns ``new_kv`` as a CUDA tensor when it was given
a device feed or while a device cache of this backend is open (the generation loop's: prefill and
extend results then go into it without a trip through the host), which the cache's ``write`` and
``write_rows`` (a decode step's rows, one batched index write) take. Every other output is numpy, and a
caller without a device cache that feeds numpy gets numpy (the accuracy checks, any other caller).

torch and tensorrt are imported only when the backend is constructed (or when ``trt_engines_match`` is
asked), never when a runtime module is imported.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from pathlib import Path

import numpy as np

from .backend_base import Backend, PlanLimits
from .errors import BackendFault, CapacityError, RuntimeInputError, one_line
from .kv_cache import TorchKVCache
from .manifest import graphs_with_role, required_graphs

# Outputs returned as CUDA tensors when the call was given a CUDA tensor or a device cache is open: every LM's
# new keys/values, which the loop writes into its device-resident cache (VibeVoice's lm, Realtime's two LMs).
DEVICE_OUTPUTS = {("lm", "new_kv"), ("text_lm", "new_kv"), ("tts_lm", "new_kv")}
# LM decode calls (seq 1, past_kv a CUDA tensor) replayed as CUDA graphs: the graph's input that is bound
# at the caller's device memory (its address is part of the graph's key) and the sequence input.
DECODE_GRAPH = {"graph": "lm", "device_input": "past_kv", "seq_input": "inputs_embeds", "seq_axis": 1}
# A binding whose largest profile shape needs more than this is allocated as needed (then grown by
# GROWTH) instead of at its maximum.
BUFFER_BUDGET_BYTES = 256 << 20
GROWTH = 1.5
# Device bytes of LM-cache buffers kept for reuse between caches (KVBufferPool): the buckets a generation
# grew through, for the next one (at the 1.5B a 16-script cache at the 256-slot bucket is 0.47 GB).
KV_POOL_BYTES = 2 << 30


class TrtBackendError(RuntimeInputError):
    """TensorRT engines that cannot run here (absent, stale, other TensorRT or GPU), in one line."""


# --- environment --------------------------------------------------------------------------------

def _import_trt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TrtBackendError("TensorRT is not installed (`make gpu-setup` on a machine with an NVIDIA GPU)") from exc
    except Exception as exc:
        raise TrtBackendError(f"TensorRT cannot be imported ({one_line(exc)})") from exc
    return trt


def _import_torch_cuda(device: int = 0):
    try:
        import torch
    except ImportError as exc:
        raise TrtBackendError("PyTorch is not installed (the TensorRT backend uses its CUDA tensors)") from exc
    if not torch.cuda.is_available() or torch.cuda.device_count() <= device:
        raise TrtBackendError("no CUDA GPU is visible to PyTorch (a CPU-only torch build, or no GPU): "
                              "the TensorRT backend needs one")
    return torch


def _compute_capability(torch, device: int = 0) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


def _engines(manifest: dict) -> dict:
    return ((manifest.get("trt") or {}).get("engines")) or {}


def _static_checks(engine_dir: Path, manifest: dict, graphs) -> None:
    """Checks that need neither TensorRT nor a GPU: engines listed, and for the `graphs` to load: files
    present, built from this ONNX graph."""
    records = _engines(manifest)
    if not records:
        raise TrtBackendError(f"{engine_dir} has no TensorRT engines (run `vv-export trt --engine-dir {engine_dir}`)")
    for graph in records:
        if graph not in manifest["graphs"]:
            raise TrtBackendError(f"TensorRT engine for {graph!r}, which the manifest does not list")
    for graph in graphs:
        if graph not in records:
            raise TrtBackendError(f"no TensorRT engine for graph {graph!r} in {engine_dir} "
                                  f"(run `vv-export trt --engine-dir {engine_dir}`)")
    for graph in graphs:
        rec = records[graph]
        path = engine_dir / rec.get("file", "")
        if not rec.get("file") or not path.is_file():
            raise TrtBackendError(f"{path}: TensorRT engine of {graph!r} is missing "
                                  f"(run `vv-export trt --engine-dir {engine_dir}`)")
        onnx_sha = manifest["graphs"][graph].get("sha256")
        if onnx_sha and rec.get("onnx_sha256") != onnx_sha:
            raise TrtBackendError(f"TensorRT engine of {graph!r} was built from another ONNX graph "
                                  f"({str(rec.get('onnx_sha256'))[:12]} vs {onnx_sha[:12]}): rebuild with "
                                  f"`vv-export trt --engine-dir {engine_dir}`")


def _version_checks(engine_dir: Path, manifest: dict, trt_version: str, cc: str, graphs=None) -> None:
    for graph, rec in _engines(manifest).items():
        if graphs is not None and graph not in graphs:
            continue
        built_v, built_cc = rec.get("trt_version"), rec.get("compute_capability")
        if built_v != trt_version or built_cc != cc:
            raise TrtBackendError(f"TensorRT engine of {graph!r} was built with TensorRT {built_v} for {built_cc}; "
                                  f"this machine has TensorRT {trt_version} on {cc}: rebuild with "
                                  f"`vv-export trt --engine-dir {engine_dir}`")


def trt_engines_match(engine_dir, manifest: dict, graphs=None) -> tuple[bool, str]:
    """(True, description) when the engines of `graphs` (default: the loop's, roles "loop" and
    "per-frame") can run here, else (False, one-line reason).

    Cheap (no engine is deserialized) and never raises: for `select_backend(..., "auto")`.
    """
    engine_dir = Path(engine_dir)
    try:
        graphs = list(graphs) if graphs is not None else required_graphs(manifest)
        _static_checks(engine_dir, manifest, graphs)
        trt = _import_trt()
        torch = _import_torch_cuda()
        version, cc = str(trt.__version__), _compute_capability(torch)
        _version_checks(engine_dir, manifest, version, cc, graphs)
    except TrtBackendError as exc:
        return False, str(exc)
    except Exception as exc:  # anything unexpected is a reason to fall back, not a crash
        return False, one_line(exc)
    plan = (manifest.get("trt") or {}).get("plan", "?")
    return True, f"TensorRT {version} engines for {cc} (plan {plan})"


# --- CUDA graph bookkeeping (pure: no CUDA) -------------------------------------------------------

def is_decode_call(graph: str, shapes: dict, device_inputs) -> bool:
    """Whether a call is an LM decode step on the device cache (replayed as a CUDA graph): graph lm, one
    new position (seq 1), past_kv given as a device tensor. Prefill (seq > 1) and host caches run plainly."""
    spec = DECODE_GRAPH
    if graph != spec["graph"] or spec["device_input"] not in device_inputs:
        return False
    seq_shape = shapes.get(spec["seq_input"]) or ()
    return len(seq_shape) > spec["seq_axis"] and seq_shape[spec["seq_axis"]] == 1


def graph_key(inputs, shapes: dict, addresses: dict) -> tuple:
    """Key of a captured graph: every input's shape (in input order) and the device addresses it is bound
    at (a graph replays fixed addresses)."""
    return (tuple(tuple(int(d) for d in shapes[n]) for n in inputs), tuple(sorted(addresses.items())))


def padded_shapes(shapes: dict, batched: set, profile: dict) -> dict:
    """Per-frame calls: the inputs with a leading batch axis (`batched`) padded to the profile's maximum
    batch, so that each per-frame context (one per profile) only ever sees one shape (one CUDA graph)."""
    out = {}
    for name, shape in shapes.items():
        if name in batched and shape:
            hi = profile[name][2][0]
            out[name] = (max(int(hi), int(shape[0])),) + tuple(shape[1:])
        else:
            out[name] = tuple(shape)
    return out


def pad_rows(arr: np.ndarray, rows: int) -> np.ndarray:
    """`arr` with zero rows appended along axis 0 up to `rows` (itself when it has them already)."""
    if arr.shape[0] >= rows:
        return arr
    out = np.zeros((rows,) + arr.shape[1:], dtype=arr.dtype)
    out[: arr.shape[0]] = arr
    return out


class ContextSlot:
    """One optimisation profile's execution context and its at most one captured CUDA graph.

    The graph is keyed by `graph_key` (input shapes and bound addresses): `decide(key)` says what a call
    with that key does: "replay" (the captured graph matches), "capture" (none, or another key: the old
    graph is dropped first; the caller warms up, executes and captures) or "plain" (graphs are off for
    this context, or capture failed here once). A plain execution of the context at another key (a
    one-token extend or a host-cache call on the decode profile, validation feeds) re-binds it, so it
    drops the graph (`ran_plain`): a graph is only ever replayed on the bindings it was captured with.
    Counters feed `TrtBackend.graph_stats()`."""

    def __init__(self, profile: int, context=None, graphs: bool = True):
        self.profile, self.context = profile, context
        self.graphs = graphs
        self.graph = None  # torch.cuda.CUDAGraph
        self.key = None
        self.out_shapes = None
        self.captures = self.replays = self.plain_runs = self.dropped = 0

    def decide(self, key) -> str:
        if not self.graphs:
            return "plain"
        if self.graph is not None and self.key == key:
            return "replay"
        self.drop()
        return "capture"

    def store(self, key, graph, out_shapes) -> None:
        """A capture's result; `graph` None: capture is impossible on this context (plain from now on)."""
        if graph is None:
            self.graphs = False
            self.drop()
            return
        self.graph, self.key, self.out_shapes = graph, key, out_shapes
        self.captures += 1

    def ran_plain(self, key) -> None:
        """The context executed plainly, bound at `key`: a graph captured at another key is dropped (the
        context's shapes and addresses are no longer the ones it was captured with, and replaying it would
        not re-bind them)."""
        self.plain_runs += 1
        if self.graph is not None and self.key != key:
            self.drop()

    def drop(self) -> None:
        if self.graph is not None:
            self.dropped += 1
        self.graph, self.key, self.out_shapes = None, None, None

    def forget_address(self, address: int) -> bool:
        """Drop the graph when it is bound at device memory `address` (freed, or moved)."""
        if self.graph is not None and any(a == address for _, a in self.key[1]):
            self.drop()
            return True
        return False


class KVBufferPool:
    """Device buffers of LM caches given back (a cache grown, closed or collected), kept for the next cache
    of the same shape, so that it gets the very buffer, at the very address, the decode CUDA graphs were
    captured on: the next generation replays them instead of capturing them again.

    `take(shape)` hands out the most recently given buffer of exactly that shape, zeroed (`zero`), else a
    new one (`allocate`); when allocating fails for lack of memory (`oom_errors`), every pooled buffer is
    released and the allocation tried once more. `give(buffer)` keeps it; beyond `max_bytes` the buffers
    given longest ago are released (`release`, which tells the backend to forget graphs bound there). Pure
    bookkeeping over the callables: no CUDA of its own."""

    def __init__(self, allocate, zero, nbytes, release=None, max_bytes: int = 2 << 30, oom_errors=(MemoryError,)):
        self.allocate, self.zero, self.nbytes, self.release = allocate, zero, nbytes, release
        self.max_bytes = int(max_bytes)
        self.oom_errors = tuple(oom_errors)
        self.free: list[tuple[tuple[int, ...], object]] = []  # (shape, buffer), oldest first
        self.reused = self.allocated = 0

    @property
    def held_bytes(self) -> int:
        return sum(self.nbytes(buffer) for _, buffer in self.free)

    def take(self, shape):
        shape = tuple(int(d) for d in shape)
        for i in range(len(self.free) - 1, -1, -1):
            if self.free[i][0] == shape:
                buffer = self.free.pop(i)[1]
                self.zero(buffer)
                self.reused += 1
                return buffer
        try:
            buffer = self.allocate(shape)
        except self.oom_errors:
            if not self.free:
                raise
            self.clear()
            buffer = self.allocate(shape)
        self.allocated += 1
        return buffer

    def give(self, buffer) -> None:
        self.free.append((tuple(int(d) for d in buffer.shape), buffer))
        while self.free and self.held_bytes > self.max_bytes:
            self._release(self.free.pop(0)[1])

    def clear(self) -> None:
        while self.free:
            self._release(self.free.pop(0)[1])

    def _release(self, buffer) -> None:
        if self.release is not None:
            self.release(buffer)


# --- one engine ---------------------------------------------------------------------------------

class _Buffer:
    """A flat device tensor of one binding; grows (never shrinks) up to the binding's maximum.

    Allocated (and re-allocated) on `stream`, the engine's: the caching allocator then reuses a freed
    block only in order with the engine work queued on it."""

    def __init__(self, torch, device, dtype, max_elems: int, budget_bytes: int, stream=None):
        self.torch, self.device, self.dtype, self.stream = torch, device, dtype, stream
        self.max_elems = max(1, int(max_elems))
        itemsize = torch.empty((), dtype=dtype).element_size()
        initial = self.max_elems if self.max_elems * itemsize <= budget_bytes else 1
        with self._on_stream():
            self.tensor = torch.empty(initial, dtype=dtype, device=device)

    def _on_stream(self):
        return self.torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    @property
    def capacity(self) -> int:
        return self.tensor.numel()

    def ensure(self, elems: int) -> bool:
        """Make room for `elems` elements; True when the buffer moved (its address changed)."""
        if elems <= self.capacity:
            return False
        new = min(self.max_elems, max(elems, int(self.capacity * GROWTH)))
        new = max(new, elems)  # a shape beyond the recorded maximum still runs (TensorRT then rejects it)
        with self._on_stream():
            self.tensor = None
            self.tensor = self.torch.empty(new, dtype=self.dtype, device=self.device)
        return True

    def view(self, shape):
        n = math.prod(shape)
        return self.tensor[:n].view(tuple(shape))

    @property
    def ptr(self) -> int:
        return self.tensor.data_ptr()


def _host_dtype(torch_dtype) -> np.dtype:
    """The numpy type of a binding's host arrays: its own, float32 for bfloat16 (numpy has none)."""
    name = str(torch_dtype).replace("torch.", "")
    return np.dtype(np.float32 if name == "bfloat16" else name)


class _Engine:
    """One engine: one execution context per optimisation profile (context p set to profile p at load,
    never switched), all on ONE activation ("scratch") buffer of the engine's largest size. Sharing it is
    safe because every execution of the backend is enqueued on its single stream, one after the other
    (no two contexts ever run concurrently); keep it that way."""

    def __init__(self, owner: "TrtBackend", graph: str, engine, record: dict, entry: dict):
        self.owner, self.graph, self.engine, self.record = owner, graph, engine, record
        self.inputs = [i["name"] for i in entry["inputs"]]
        self.outputs = [o["name"] for o in entry["outputs"]]
        self._check_io(entry)
        self.torch_dtypes = {n: owner.torch_dtype(engine.get_tensor_dtype(n)) for n in self.inputs + self.outputs}
        # host arrays of a bf16 binding (the LM cache, `cache_dtype`) are float32, converted on the device
        self.np_dtypes = {n: _host_dtype(self.torch_dtypes[n]) for n in self.inputs}
        self.num_profiles = int(engine.num_optimization_profiles)
        names = [p.get("name", f"profile{i}") for i, p in enumerate(record.get("profiles") or [])]
        self.profile_names = names + [f"profile{i}" for i in range(len(names), self.num_profiles)]
        # (min, opt, max) per input per profile, as recorded in the engine itself
        self.profiles = []
        for p in range(self.num_profiles):
            shapes = {}
            for name in self.inputs:
                lo, opt, hi = engine.get_tensor_profile_shape(name, p)
                shapes[name] = (tuple(lo), tuple(opt), tuple(hi))
            self.profiles.append(shapes)
        # per-frame graphs: the batch padded to the profile's maximum, every call replayed as a CUDA graph
        self.per_frame = graph in owner.per_frame
        self.batched_inputs = {io["name"] for io in entry["inputs"] if (io.get("shape") or [None])[0] == "batch"}
        self.batched_outputs = {io["name"] for io in entry["outputs"] if (io.get("shape") or [None])[0] == "batch"}
        self.notes: list[str] = []
        self.scratch = None
        self.slots = self._create_contexts()
        self.max_elems = self._max_elements()
        self.buffers = {n: _Buffer(owner.torch, owner.device, self.torch_dtypes[n], self.max_elems[n],
                                   owner.buffer_budget, owner.stream)
                        for n in self.inputs + self.outputs}

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.owner.note(text)

    def _create_contexts(self) -> list:
        """One context per profile, all on one user-managed scratch buffer (when TensorRT lets us manage it;
        else each context allocates its own). A profile TensorRT refuses here is a load-time error."""
        owner = self.owner
        stream = owner.stream
        size = _max_device_memory_size(self.engine, self.num_profiles)
        slots = []
        for p in range(self.num_profiles):
            context, managed = owner.create_context(self.engine, user_managed=True)
            if p > 0:
                refused = ""
                try:
                    accepted = context.set_optimization_profile_async(p, stream.cuda_stream)
                except Exception as exc:  # the bindings raise where the C++ API returns false
                    accepted, refused = False, f": {one_line(exc)}"
                if not accepted:
                    raise TrtBackendError(f"{self.graph}: TensorRT refuses an execution context for optimisation "
                                          f"profile {self.profile_names[p]} ({p} of {self.num_profiles}){refused}")
            if managed:
                if self.scratch is None:
                    with owner.torch.cuda.stream(stream):
                        self.scratch = owner.torch.empty(max(size, 1), dtype=owner.torch.uint8, device=owner.device)
                _set_device_memory(context, self.scratch.data_ptr(), self.scratch.numel())
            elif p == 0 and self.num_profiles > 1:
                self.note(f"{self.graph}: TensorRT here cannot share activation memory between contexts; each of "
                          f"its {self.num_profiles} profile contexts allocates its own")
            slot_graphs = owner.cuda_graphs and (self.per_frame or self.graph == DECODE_GRAPH["graph"])
            slots.append(ContextSlot(p, context, slot_graphs))
        stream.synchronize()
        return slots

    def _check_io(self, entry: dict) -> None:
        trt = self.owner.trt
        got_in, got_out = [], []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            (got_in if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else got_out).append(name)
        if sorted(got_in) != sorted(self.inputs) or sorted(got_out) != sorted(self.outputs):
            raise TrtBackendError(f"{self.record.get('file')}: engine I/O {got_in} -> {got_out} differs from the "
                                  f"manifest's {self.inputs} -> {self.outputs} for graph {self.graph!r}")
        want = {io["name"]: io.get("dtype") for io in entry["inputs"] + entry["outputs"]}
        if self.record.get("cache_dtype") == "bf16":  # the cache I/O built in bf16 (graph_rules.with_cache_dtype)
            want.update({name: "bfloat16" for name in ("past_kv", "new_kv") if name in want})
        for name, dtype in want.items():
            got = self.owner.np_name(self.engine.get_tensor_dtype(name))
            if dtype and got != dtype:
                raise TrtBackendError(f"{self.record.get('file')}: tensor {name!r} is {got} in the engine, "
                                      f"{dtype} in the manifest")

    def _max_elements(self) -> dict:
        """Largest element count of every binding over the profiles (outputs through shape inference on
        each profile's own context)."""
        out = {n: 1 for n in self.inputs + self.outputs}
        for slot, shapes in zip(self.slots, self.profiles):
            context = slot.context
            for name in self.inputs:
                hi = shapes[name][2]
                out[name] = max(out[name], math.prod(hi))
                context.set_input_shape(name, hi)
            for name in self.outputs:
                shape = tuple(context.get_tensor_shape(name))
                if shape and all(d >= 0 for d in shape):
                    out[name] = max(out[name], math.prod(shape))
        return out

    def pick_profile(self, shapes: dict) -> int:
        best, best_cost = None, None
        for p, prof in enumerate(self.profiles):
            ok = all(len(shapes[n]) == len(prof[n][0]) and
                     all(a <= s <= b for a, s, b in zip(prof[n][0], shapes[n], prof[n][2])) for n in self.inputs)
            if not ok:
                continue
            cost = sum(abs(math.log1p(s) - math.log1p(o)) for n in self.inputs for s, o in zip(shapes[n], prof[n][1]))
            if best is None or cost < best_cost:
                best, best_cost = p, cost
        if best is None:
            ranges = "; ".join(
                f"{self.profile_names[p]}: " + ", ".join(f"{n} {list(prof[n][0])}..{list(prof[n][2])}" for n in self.inputs)
                for p, prof in enumerate(self.profiles))
            got = ", ".join(f"{n} {list(shapes[n])}" for n in self.inputs)
            raise CapacityError(f"{self.graph}: shapes {got} lie outside every optimisation profile of its engine "
                                f"({ranges}); rebuild the engines with a plan that covers them "
                                f"(`vv-export trt --plan <plan>` with larger settings) or make the request smaller")
        return best

    # --- execution ------------------------------------------------------------------------------

    def run(self, feeds: dict) -> dict:
        torch = self.owner.torch
        missing = [n for n in self.inputs if n not in feeds]
        extra = [n for n in feeds if n not in self.inputs]
        if missing or extra:
            raise TrtBackendError(f"{self.graph}: feeds {sorted(feeds)} do not match its inputs {self.inputs}")
        arrays, device_feeds = {}, {}
        for name in self.inputs:
            value = feeds[name]
            if isinstance(value, torch.Tensor):
                if value.device != self.owner.device:
                    raise TrtBackendError(f"{self.graph}: input {name!r} is on {value.device}, the engines on "
                                          f"{self.owner.device}")
                device_feeds[name] = value  # converted on the engine's stream below
                continue
            arr = np.ascontiguousarray(value, dtype=self.np_dtypes[name])
            if not arr.flags.writeable:
                arr = arr.copy()
            arrays[name] = arr
        shapes = {n: tuple(int(d) for d in a.shape) for n, a in {**arrays, **device_feeds}.items()}
        profile = self.pick_profile(shapes)
        try:
            return self._run(profile, shapes, arrays, device_feeds)
        except (CapacityError, BackendFault):
            raise
        except Exception as exc:
            oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
            if isinstance(exc, oom) or "out of memory" in str(exc).lower():
                raise BackendFault(f"{self.graph}: out of GPU memory during TensorRT execution "
                                   f"({one_line(exc)})") from exc
            raise BackendFault(f"{self.graph}: TensorRT execution failed ({one_line(exc)})") from exc

    def _run(self, profile: int, shapes: dict, arrays: dict, device_feeds: dict) -> dict:
        torch = self.owner.torch
        slot = self.slots[profile]
        stream = self.owner.stream
        rows = None
        pad = self.per_frame and slot.graphs  # plain per-frame runs (graphs off) need no fixed shape
        if pad:
            run_shapes = padded_shapes(shapes, self.batched_inputs, self.profiles[profile])
            for name in self.batched_inputs:
                if name in shapes and shapes[name]:
                    rows = shapes[name][0]
        else:
            run_shapes = shapes
        if device_feeds:
            stream.wait_stream(torch.cuda.current_stream(self.owner.device))  # the feeds' producer first
        with torch.cuda.device(self.owner.device), torch.cuda.stream(stream):
            # dtype/layout conversion on the engine's stream, in order with the copies and the execution
            given = {n: t.data_ptr() for n, t in device_feeds.items()}
            device_feeds = {n: t.to(self.torch_dtypes[n]).contiguous() for n, t in device_feeds.items()}
            in_place = all(t.data_ptr() == given[n] for n, t in device_feeds.items())
            decode = (in_place and is_decode_call(self.graph, shapes, device_feeds)
                      and all(t.numel() for t in device_feeds.values()))
            use_graph = slot.graphs and (self.per_frame or decode)
            if self.per_frame or not use_graph:
                # per-frame: everything staged into the fixed buffers (padded); plain: device feeds bound as they are
                staged_dev = {n: t for n, t in device_feeds.items() if self.per_frame}
                direct = {n: t for n, t in device_feeds.items() if n not in staged_dev and t.numel()}
            else:
                staged_dev, direct = {}, dict(device_feeds)  # decode: the cache bound where it lives
            self._stage(arrays, staged_dev, run_shapes)
            if use_graph:
                out_shapes = self._run_graph(slot, run_shapes, direct)
            else:
                out_shapes = self._bind(slot.context, run_shapes, direct)
                self._execute(slot.context)
                slot.ran_plain(graph_key(self.inputs, run_shapes, self._addresses(direct)))
            results = {}
            for name in self.outputs:
                shape = out_shapes[name]
                view = self.buffers[name].view(shape)
                if rows is not None and name in self.batched_outputs and shape and shape[0] > rows:
                    view, shape = view[:rows], (rows,) + tuple(shape[1:])  # the padding rows back off
                if (self.graph, name) in DEVICE_OUTPUTS and (device_feeds or self.owner.cache_on_device):
                    results[name] = view.clone()  # stays on the device (the LM cache's write takes it)
                elif math.prod(shape):
                    results[name] = (view.float() if view.dtype == torch.bfloat16 else view).cpu().numpy()
                else:
                    results[name] = np.zeros(shape, dtype=_host_dtype(self.torch_dtypes[name]))
        return results

    def _stage(self, arrays: dict, device_feeds: dict, shapes: dict) -> None:
        """Copy host arrays (and device feeds) into the binding buffers at `shapes` (zero rows past the
        given ones: per-frame padding)."""
        torch = self.owner.torch
        for name, arr in arrays.items():
            shape = shapes[name]
            self.buffers[name].ensure(math.prod(shape))
            if math.prod(shape):
                self.buffers[name].view(shape).copy_(torch.from_numpy(pad_rows(arr, shape[0]) if arr.ndim else arr))
        for name, tensor in device_feeds.items():
            shape = shapes[name]
            self.buffers[name].ensure(math.prod(shape))
            if math.prod(shape):
                view = self.buffers[name].view(shape)
                n = tensor.shape[0] if tensor.dim() else None
                if n is not None and n < shape[0]:
                    view[n:].zero_()
                    view[:n].copy_(tensor)
                else:
                    view.copy_(tensor)

    def _addresses(self, direct: dict) -> dict:
        return {n: (direct[n].data_ptr() if n in direct else self.buffers[n].ptr) for n in self.inputs + self.outputs}

    def _bind(self, context, shapes: dict, direct: dict | None = None) -> dict:
        """Set input shapes and every tensor address on `context` (`direct`: inputs bound at their own
        device memory, the others and the outputs at the engine's buffers); returns the output shapes."""
        direct = direct or {}
        for name in self.inputs:
            if not context.set_input_shape(name, shapes[name]):
                raise BackendFault(f"{self.graph}: TensorRT rejects input {name!r} of shape {list(shapes[name])} "
                                   "within its own profile")
        out_shapes = {}
        for name in self.outputs:
            shape = tuple(context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise BackendFault(f"{self.graph}: TensorRT cannot infer the shape of output {name!r}")
            out_shapes[name] = shape
            self.buffers[name].ensure(math.prod(shape))
        for name, ptr in self._addresses(direct).items():
            if not context.set_tensor_address(name, ptr):
                raise BackendFault(f"{self.graph}: TensorRT refuses the device address of {name!r} "
                                   f"(0x{ptr:x}; a misaligned or foreign pointer)")
        return out_shapes

    def _execute(self, context) -> None:
        if not context.execute_async_v3(self.owner.stream.cuda_stream):
            raise BackendFault(f"{self.graph}: TensorRT execution failed (see the TensorRT messages above)")

    def _run_graph(self, slot: ContextSlot, shapes: dict, direct: dict) -> dict:
        """Replay the profile context's graph when its key (shapes, bound addresses) matches; else drop it,
        bind, execute (warm-up and this call's result) and capture for the next calls."""
        key = graph_key(self.inputs, shapes, self._addresses(direct))
        if slot.decide(key) == "replay":
            slot.graph.replay()
            slot.replays += 1
            return slot.out_shapes
        out_shapes = self._bind(slot.context, shapes, direct)  # may grow (move) an output buffer
        key = graph_key(self.inputs, shapes, self._addresses(direct))
        self._execute(slot.context)
        slot.ran_plain(key)
        slot.store(key, self._capture(slot.context, key), out_shapes)
        return out_shapes

    def _capture(self, context, key) -> object | None:
        """Capture one execute_async_v3 of `context` (bound, warmed up) as a CUDA graph; None when it cannot
        be captured here (one notice; the context then runs plainly)."""
        torch = self.owner.torch
        try:
            stream = self.owner.stream
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                if not context.execute_async_v3(stream.cuda_stream):
                    raise RuntimeError("execute_async_v3 refused to run under stream capture")
            return graph
        except Exception as exc:  # a layer TensorRT cannot capture: this profile runs without a graph
            self.note(f"{self.graph}: CUDA graph capture failed at {list(key[0])} ({one_line(exc)}); "
                      "this profile runs without CUDA graphs")
            with contextlib.suppress(Exception):
                torch.cuda.synchronize(self.owner.device)
            return None

    def forget_address(self, address: int) -> int:
        """Drop the captured graphs bound to device memory at `address` (freed or moved)."""
        return sum(slot.forget_address(address) for slot in self.slots)

    def stats(self) -> dict:
        return {"profile_contexts": len(self.slots),
                "captures": sum(s.captures for s in self.slots),
                "replays": sum(s.replays for s in self.slots),
                "plain_runs": sum(s.plain_runs for s in self.slots),
                "notes": list(self.notes)}

    def close(self) -> None:
        for slot in self.slots:
            slot.drop()
            slot.context = None
        self.slots = []
        self.buffers.clear()
        self.scratch = None
        self.engine = None


def _max_device_memory_size(engine, num_profiles: int) -> int:
    """Activation memory for every profile's context: the engine's size (TensorRT: the largest over its
    profiles) and, where TensorRT (10.1+) tells it, the largest per-profile size."""
    sizes = [0]
    for attr in ("device_memory_size_v2", "device_memory_size"):
        size = getattr(engine, attr, None)
        if size is not None:
            sizes.append(int(size))
            break
    for attr in ("get_device_memory_size_for_profile_v2", "get_device_memory_size_for_profile"):
        getter = getattr(engine, attr, None)
        if getter is not None:
            sizes.extend(int(getter(p)) for p in range(num_profiles))
            break
    return max(sizes)


def _set_device_memory(context, ptr: int, size: int) -> None:
    setter = getattr(context, "set_device_memory", None)
    if setter is not None:
        setter(ptr, size)
    else:
        context.device_memory = ptr


# --- the LM cache on the GPU ---------------------------------------------------------------------

class DeviceKVCache(TorchKVCache):
    """The LM cache as one CUDA tensor of the backend's device (a `TorchKVCache`), every operation on the
    backend's stream, in order with the engines.

    `past(n)` is bound as `past_kv` where it lives; decode shapes come in a few buckets, so each bucket's
    engine context and CUDA graph are reused. Buffers come from the backend's `KVBufferPool` and go back to
    it when the cache grows into a new one, is closed or is garbage-collected: the next cache of the same
    shape (the next generation's) gets the same buffer at the same address, and the decode graph captured
    on it replays (a graph's key holds the addresses it is bound at, so it only ever replays on them). A
    backend without a pool is told (`forget_address`) that the buffer is given up instead.
    """

    def __init__(self, backend: "TrtBackend", shape: tuple[int, ...]):
        self.backend = backend
        self._finalizer = None
        super().__init__(shape, backend.device, getattr(backend, "cache_dtype", None))
        register = getattr(backend, "register_cache", None)
        if register is not None:
            register(self)

    @contextlib.contextmanager
    def _scope(self):
        torch = self.backend.torch
        with torch.cuda.device(self.backend.device), torch.cuda.stream(self.backend.stream):
            yield

    def _zeros(self, slots: int):
        pool = getattr(self.backend, "kv_pool", None)
        if pool is None:
            return super()._zeros(slots)
        with self._scope():
            return pool.take(self._with_slots(slots))

    def _hold(self, data) -> None:
        """Hold `data` as the buffer; the old one is given back now (its graphs are not replayed until a
        cache binds that buffer again), this one when the cache is closed or garbage-collected."""
        old = self.data
        if self._finalizer is not None:
            self._finalizer.detach()
        self.data = data
        give_back = self._give_back_function()
        if old is not None and give_back is not None:
            give_back(old)
        self._finalizer = weakref.finalize(self, give_back, data) if give_back is not None else None
        if self._finalizer is not None:
            self._finalizer.atexit = False

    def _give_back_function(self):
        pool = getattr(self.backend, "kv_pool", None)
        if pool is not None:
            return pool.give
        forget = getattr(self.backend, "forget_address", None)
        return (lambda buffer: forget(buffer.data_ptr())) if forget is not None else None

    def close(self) -> None:
        """Give the buffer back (to the pool; without one, the graphs bound to it are dropped)."""
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        self.data = None


# --- the backend --------------------------------------------------------------------------------

class TrtBackend(Backend):
    """Runs the graphs of an ENGINE_DIR on their TensorRT engines (same interface as OrtBackend)."""

    name = "trt"
    groups_steps = False  # contexts replay one CUDA graph per shape, in the plans' profiles (Backend.groups_steps)

    def __init__(self, engine_dir, manifest: dict, graphs=None, device: int = 0, cuda_graphs: bool = True,
                 buffer_budget_bytes: int = BUFFER_BUDGET_BYTES, notice=None, device_kv_cache: bool = True,
                 kv_pool_bytes: int = KV_POOL_BYTES):
        self.engine_dir = Path(engine_dir)
        self.manifest = manifest
        records = _engines(manifest)
        # the loop's engines (roles loop + per-frame) unless `graphs` asks for others (the accuracy check: all)
        wanted = list(graphs) if graphs is not None else required_graphs(manifest)
        self.per_frame = tuple(graphs_with_role(manifest, "per-frame"))
        _static_checks(self.engine_dir, manifest, wanted)
        self.plan_limits = PlanLimits({g: records[g] for g in wanted}, (manifest.get("trt") or {}).get("plan"),
                                      self.engine_dir, [g for g in self.per_frame if g in wanted])
        self.trt = _import_trt()
        self.torch = _import_torch_cuda(device)
        self.device = self.torch.device("cuda", device)
        self.trt_version = str(self.trt.__version__)
        self.compute_capability = _compute_capability(self.torch, device)
        _version_checks(self.engine_dir, manifest, self.trt_version, self.compute_capability, wanted)
        self.cuda_graphs = cuda_graphs
        self.device_kv_cache = device_kv_cache
        self.buffer_budget = int(buffer_budget_bytes)
        self._notice = notice
        self._dtype_map = self._dtypes()
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.trt.init_libnvinfer_plugins(self.logger, "")
        self.runtime = self.trt.Runtime(self.logger)
        with self.torch.cuda.device(self.device):
            self.stream = self.torch.cuda.Stream(self.device)
        torch = self.torch
        oom = tuple(e for e in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None),
                                MemoryError) if isinstance(e, type))
        self.cache_dtype = self._cache_dtype({g: records[g] for g in wanted})
        self.kv_pool = KVBufferPool(
            allocate=lambda shape: torch.zeros(shape, dtype=self.cache_dtype, device=self.device),
            zero=lambda buffer: buffer.zero_(), nbytes=lambda buffer: buffer.numel() * buffer.element_size(),
            release=lambda buffer: self.forget_address(buffer.data_ptr()), max_bytes=kv_pool_bytes, oom_errors=oom)
        self._caches = weakref.WeakSet()  # the device caches handed out (DeviceKVCache registers itself)
        self.engines: dict[str, _Engine] = {}
        try:
            with self.torch.cuda.device(self.device):
                for graph in wanted:
                    self.engines[graph] = self._load(graph, records[graph])
        except BaseException:
            self.close()
            raise

    def _dtypes(self) -> dict:
        trt, torch = self.trt, self.torch
        pairs = [("float32", torch.float32, "float32"), ("float16", torch.float16, "float16"),
                 ("int32", torch.int32, "int32"), ("int64", torch.int64, "int64"), ("int8", torch.int8, "int8"),
                 ("uint8", torch.uint8, "uint8"), ("bool", torch.bool, "bool"),
                 ("bfloat16", torch.bfloat16, "bfloat16")]
        table = {}
        for attr, tdtype, npname in pairs:
            tdt = getattr(trt, attr, None)
            if tdt is not None:
                table[tdt] = (tdtype, npname)
        return table

    def _cache_dtype(self, records: dict):
        """The torch type of the LM cache: the `cache_dtype` the LM engines were built with (vv-export trt:
        the plan's builder setting; fp32 where none is recorded). Every LM engine binds the one cache type."""
        kinds = {str(r.get("cache_dtype", "fp32")) for r in records.values() if "past_kv" in (r.get("inputs") or [])}
        if len(kinds) > 1:
            raise TrtBackendError(f"the LM engines were built with different cache types ({', '.join(sorted(kinds))}); "
                                  f"give their plan sections one builder cache_dtype and rebuild (vv-export trt)")
        return {"bf16": self.torch.bfloat16}.get(kinds.pop() if kinds else "fp32", self.torch.float32)

    def torch_dtype(self, trt_dtype):
        try:
            return self._dtype_map[trt_dtype][0]
        except KeyError:
            raise TrtBackendError(f"TensorRT tensor type {trt_dtype} is not supported at the graph boundary") from None

    def np_name(self, trt_dtype) -> str:
        entry = self._dtype_map.get(trt_dtype)
        return entry[1] if entry else str(trt_dtype)

    def note(self, text: str) -> None:
        if self._notice is not None:
            self._notice(text)

    def create_context(self, engine, multi_profile: bool = False, user_managed: bool = False):
        """(execution context, whether its activation memory is user managed).

        USER_MANAGED memory where asked (and available: the engine's contexts then share one scratch
        buffer); ON_PROFILE_CHANGE for `multi_profile`; else STATIC (TensorRT's default)."""
        trt = self.trt
        strategies = getattr(trt, "ExecutionContextAllocationStrategy", None)
        name = "USER_MANAGED" if user_managed else ("ON_PROFILE_CHANGE" if multi_profile else None)
        context = None
        if strategies is not None and name is not None and hasattr(strategies, name):
            strategy = getattr(strategies, name)
            try:
                context = engine.create_execution_context(strategy)
            except TypeError:
                make_rc = getattr(engine, "create_runtime_config", None)
                if make_rc is not None:
                    rc = make_rc()
                    rc.set_execution_context_allocation_strategy(strategy)
                    context = engine.create_execution_context(rc)
        managed = context is not None and user_managed
        if context is None:
            context = engine.create_execution_context()
        if context is None:
            raise TrtBackendError("TensorRT could not create an execution context (out of GPU memory?)")
        return context, managed

    def _load(self, graph: str, record: dict) -> _Engine:
        path = self.engine_dir / record["file"]
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise TrtBackendError(f"{path}: unreadable ({one_line(exc)})") from exc
        engine = self.runtime.deserialize_cuda_engine(data)
        del data
        if engine is None:
            raise TrtBackendError(f"{path}: TensorRT {self.trt_version} cannot deserialize it (corrupt, or built by "
                                  f"another version): rebuild with `vv-export trt --engine-dir {self.engine_dir}`")
        return _Engine(self, graph, engine, record, self.manifest["graphs"][graph])

    def kv_cache(self, shape: tuple[int, ...]) -> DeviceKVCache:
        """The LM cache on the GPU (see DeviceKVCache): decode steps never copy it through the host."""
        if not self.device_kv_cache:
            return super().kv_cache(shape)
        return DeviceKVCache(self, shape)

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        engine = self.engines.get(graph)
        if engine is None:
            raise TrtBackendError(f"no TensorRT engine loaded for graph {graph!r}")
        return engine.run(feeds)

    def limits(self) -> dict:
        """The largest calls the loaded engines' optimisation profiles take (PlanLimits.limits)."""
        return self.plan_limits.limits()

    def check_fits(self, graph: str, shapes: dict) -> None:
        """RuntimeInputError naming the plan's limit and the fix when no profile of `graph`'s engine takes
        these dimensions / input shapes (PlanLimits.fitting_profile)."""
        self.plan_limits.check_fits(graph, shapes)

    def register_cache(self, cache: DeviceKVCache) -> None:
        self._caches.add(cache)

    @property
    def cache_on_device(self) -> bool:
        """Whether a device cache of this backend is open: then an lm call's new_kv stays on the device
        (the loop writes it into that cache), whatever the call was fed."""
        return any(cache.data is not None for cache in list(getattr(self, "_caches", ())))

    def forget_address(self, address: int) -> None:
        """Device memory at `address` is released (the KV pool let a buffer go): drop the CUDA graphs bound
        to it."""
        for engine in list((getattr(self, "engines", None) or {}).values()):
            engine.forget_address(address)

    def graph_stats(self) -> dict:
        """What ran, per loaded graph: {"profile_contexts": execution contexts (one per optimisation
        profile), "captures": CUDA graphs captured, "replays": calls replayed from one, "plain_runs": plain
        executions (including each capture's warm-up run), "notes": why graphs were not used, if so}."""
        return {graph: engine.stats() for graph, engine in self.engines.items()}

    def close(self) -> None:
        # the work queued on the stream uses the contexts, their scratch and the buffers: let it finish first
        if getattr(self, "torch", None) is not None and getattr(self, "stream", None) is not None:
            with contextlib.suppress(Exception):
                self.stream.synchronize()
        engines = getattr(self, "engines", {})
        for engine in engines.values():
            engine.close()
        engines.clear()
        pool = getattr(self, "kv_pool", None)
        if pool is not None:
            pool.clear()
            pool.max_bytes = 0  # a cache closed after the backend gives its buffer straight back
        self.runtime = None
        self.stream = None

    def describe(self) -> str:
        precisions = ",".join(f"{g}:{e.record.get('precision')}" for g, e in self.engines.items())
        return f"trt[TensorRT {self.trt_version} {self.compute_capability}; {precisions}]"
