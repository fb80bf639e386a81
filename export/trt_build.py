"""`vv-export trt`: build TensorRT engines for the graphs of an ENGINE_DIR from a plan in trt_plans/.

Every engine is built through polygraphy's Python API (``NetworkFromOnnxPath`` -> ``CreateConfig`` ->
``EngineBytesFromNetwork``) and named after everything it depends on:

    trt/<graph>.<trt version>.sm<compute capability>.<onnx sha256[:12]>.<plan hash[:12]>.<precision>.engine

so an engine that exists under its expected name is up to date and is not rebuilt (unless
``force``). Each engine is written to a temporary file and renamed (an interrupted build leaves no
half-written engine); the tactic timing cache ``trt/timing.cache`` is shared by the engines of the
ENGINE_DIR and merged under a file lock; manifest.json is re-read, updated and replaced atomically
under a lock after every engine, under ``manifest["trt"]["engines"][graph]``.

Reduced precision (the plan's per-graph precision, or ``precision=`` for every graph):

* TensorRT 10.x, typing "weak"/"auto": builder fp16/bf16 flags; the layers the plan keeps in fp32
  (RMSNorm statistics by default) get layer precisions and output types, enforced by precision
  constraints ("obey"/"prefer").
* TensorRT 11+ (weak typing removed) or typing "strong": the ONNX graph is converted to mixed
  precision by ModelOpt AutoCast (the keep_fp32 op types stay fp32, I/O types kept) and built as a
  strongly typed network.
* fp8 / int8wo: built STRONGLY TYPED (as NVIDIA directs for explicitly quantized graphs; weakly typed,
  the builder may choose other precisions around the Q/DQ pairs and skip the FP8 kernels) from an
  explicitly quantized (Q/DQ) copy of the graph that vv_export.qdq makes (FP8 weights and calibrated FP8
  activations / INT8 per-channel weights, for the weight GEMMs a quantized kernel takes), typed by
  vv_export.strong_typing (bf16 everywhere but the plan's keep_fp32 nodes, which stay fp32: the very
  precisions the CPU emulation checks) and written into the build's work directory; no precision
  builder flags, TensorRT 10 and 11 alike. FP8 needs compute capability 8.9 (refused in one line before
  any build, `check_precision_supported`). Their engines record the layer information
  (ProfilingVerbosity.DETAILED), which the GPU check reads with the engine inspector to confirm the
  quantized kernels (`quantized_layers`).

The manifest is read and written through ``vv_export.engine_dir`` (the exporter's one manifest module);
the polygraphy accuracy helpers live in ``vv_export.accuracy``. Neither this module nor those import
torch or the model code: `vv-export trt` runs where only TensorRT (and polygraphy) is installed.
"""

from __future__ import annotations

import contextlib
import ctypes
import fnmatch
import io
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .engine_dir import ENGINE_FORMAT, TRT_DIR, atomic_write, file_lock, read_manifest, sha256_file, update_manifest
from .errors import ExportError, TrtUnavailable, one_line
from .graph_rules import (ACTIVATION_PRECISION, CACHE_INPUT, COMPUTE_LAYERS, FP32_LAYER_MATCH, MIN_COMPUTE_CAPABILITY,
                          QDQ_PRECISIONS, has_cache_io, with_cache_dtype)
from .plans import PRECISIONS, GraphPlan, Plan, resolve_plan
from .strong_typing import typed_qdq_graph_file

TIMING_CACHE = "timing.cache"
MIN_TRT_MAJOR = 10


# --- environment --------------------------------------------------------------------------------

@dataclass
class TrtEnv:
    trt: object  # the tensorrt module
    version: str
    major: int
    compute_capability: str  # "sm90"
    device_name: str


def _cuda_device() -> tuple[str, int, int] | None:
    """(name, major, minor) of CUDA device 0, or None: asked from the CUDA driver (libcuda), else the CUDA
    runtime library. Never through torch: `vv-export trt` does not import it."""
    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(lib)
        except OSError:
            continue
        count, device = ctypes.c_int(0), ctypes.c_int(0)
        if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
            return None
        if cuda.cuDeviceGet(ctypes.byref(device), 0) != 0:
            return None
        major, minor = ctypes.c_int(0), ctypes.c_int(0)
        # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, ..._MINOR = 76
        if (cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, device) != 0
                or cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, device) != 0):
            return None
        name = ctypes.create_string_buffer(256)
        if cuda.cuDeviceGetName(name, 256, device) != 0:
            name.value = b"CUDA device 0"
        return name.value.decode(errors="replace") or "CUDA device 0", major.value, minor.value
    for lib in ("libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "cudart64_12.dll"):
        try:
            cudart = ctypes.CDLL(lib)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if cudart.cudaGetDeviceCount(ctypes.byref(count)) != 0 or count.value < 1:
            return None
        major, minor = ctypes.c_int(0), ctypes.c_int(0)
        # cudaDevAttrComputeCapabilityMajor = 75, ...Minor = 76
        if cudart.cudaDeviceGetAttribute(ctypes.byref(major), 75, 0) != 0:
            return None
        cudart.cudaDeviceGetAttribute(ctypes.byref(minor), 76, 0)
        return "CUDA device 0", major.value, minor.value
    return None


def trt_environment() -> TrtEnv:
    """TensorRT and the GPU it builds for, or TrtUnavailable with a one-line reason."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TrtUnavailable("TensorRT is not installed (`make gpu-setup` on a machine with an NVIDIA GPU installs "
                             "the pinned GPU stack); ONNX Runtime runs the graphs without it") from exc
    except Exception as exc:  # a broken install (missing CUDA libraries)
        raise TrtUnavailable(f"TensorRT cannot be imported ({one_line(exc)})") from exc
    version = str(getattr(trt, "__version__", "0"))
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = 0
    if major < MIN_TRT_MAJOR:
        raise TrtUnavailable(f"TensorRT {version} is too old: vibevoice-trt needs TensorRT {MIN_TRT_MAJOR} or newer")
    device = _cuda_device()
    if device is None:
        raise TrtUnavailable("no CUDA GPU is visible (TensorRT engines are built for and run on an NVIDIA GPU); "
                             "ONNX Runtime runs the graphs without one")
    name, cc_major, cc_minor = device
    return TrtEnv(trt=trt, version=version, major=major, compute_capability=f"sm{cc_major}{cc_minor}",
                  device_name=name)


def _capability(compute_capability) -> tuple[int, int]:
    """(major, minor) from (8, 9), "sm89", "89" or "8.9"."""
    if isinstance(compute_capability, (tuple, list)) and len(compute_capability) == 2:
        return int(compute_capability[0]), int(compute_capability[1])
    text = str(compute_capability).strip().lower().removeprefix("sm")
    if re.fullmatch(r"\d+\.\d+", text):
        major, minor = text.split(".")
        return int(major), int(minor)
    if re.fullmatch(r"\d{2,3}", text):
        return int(text[:-1]), int(text[-1])
    raise ValueError(f"compute capability {compute_capability!r}: expected e.g. (8, 9) or 'sm89'")


def check_precision_supported(precision: str, compute_capability, graphs: list[str] | None = None) -> None:
    """Raise a one-line ExportError when a GPU of `compute_capability` cannot run `precision` engines.

    bf16 needs 8.0 (Ampere), int8wo 8.0 too (its activations are bf16), fp8 8.9 (Ada, Hopper).
    """
    need = MIN_COMPUTE_CAPABILITY.get(precision)
    if need is None:
        return
    have = _capability(compute_capability)
    if have >= need:
        return
    asking = f" ({', '.join(graphs)} ask {precision})" if graphs else ""
    fix = {"bf16": "use --plan turing or --precision fp16/fp32",
           "int8wo": "use --plan turing (fp16/fp32)",
           "fp8": "use --plan int8wo on Ampere, or --plan default"}[precision]
    raise ExportError(f"{precision} needs compute capability {need[0]}.{need[1]} or newer, this GPU is "
                      f"sm{have[0]}{have[1]}{asking}: {fix}")


# --- names and records --------------------------------------------------------------------------

def engine_file_name(graph: str, trt_version: str, compute_capability: str, onnx_sha256: str, plan_hash: str,
                     precision: str) -> str:
    """trt/<graph>.<trt version>.sm<cc>.<onnx sha256[:12]>.<plan hash[:12]>.<precision>.engine"""
    cc = compute_capability if compute_capability.startswith("sm") else f"sm{compute_capability}"
    if not re.fullmatch(r"sm\d+", cc):
        raise ValueError(f"compute capability {compute_capability!r}: expected e.g. 'sm90' or '90'")
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {PRECISIONS}")
    if not re.fullmatch(r"[0-9A-Za-z.+_-]+", trt_version):
        raise ValueError(f"TensorRT version {trt_version!r}: unexpected characters")
    return f"{TRT_DIR}/{graph}.{trt_version}.{cc}.{onnx_sha256[:12]}.{plan_hash[:12]}.{precision}.engine"


def _external_sizes(engine_dir: Path, entry: dict) -> dict:
    sizes = {}
    for name in entry.get("external_data") or []:
        path = engine_dir / name
        sizes[name] = path.stat().st_size if path.exists() else None
    return sizes


def expected_engine(engine_dir: Path, manifest: dict, gp: GraphPlan, trt_version: str, compute_capability: str,
                    plan_name: str = "default") -> dict:
    """The manifest record an up-to-date engine of `gp` has (without build details)."""
    entry = manifest["graphs"][gp.graph]
    onnx_sha = entry.get("sha256")
    if not isinstance(onnx_sha, str) or len(onnx_sha) < 12:
        raise ExportError(f"manifest: graph {gp.graph!r} has no sha256 (re-export the ENGINE_DIR)")
    return {
        "file": engine_file_name(gp.graph, trt_version, compute_capability, onnx_sha, gp.hash, gp.precision),
        "format": ENGINE_FORMAT,
        "trt_version": trt_version,
        "compute_capability": compute_capability,
        "onnx_sha256": onnx_sha,
        "external_data": _external_sizes(Path(engine_dir), entry),
        "weights_sha256": (manifest.get("source") or {}).get("weights_sha256"),
        "plan": plan_name,
        "plan_hash": gp.hash,
        "precision": gp.precision,
        "profiles": [p.to_json() for p in gp.profiles],
        "inputs": [i["name"] for i in entry.get("inputs") or []],
        "outputs": [o["name"] for o in entry.get("outputs") or []],
        **({"cache_dtype": gp.builder["cache_dtype"]}
           if any(i["name"] == CACHE_INPUT for i in entry.get("inputs") or []) else {}),
    }


_IDENTITY_KEYS = ("file", "trt_version", "compute_capability", "onnx_sha256", "external_data", "weights_sha256",
                  "plan_hash", "precision")


def engine_is_current(engine_dir: Path, record: dict | None, expected: dict) -> tuple[bool, str]:
    """Whether a recorded engine is the expected one and its file is intact; else why not."""
    if not record:
        return False, "not built yet"
    for key in _IDENTITY_KEYS:
        if record.get(key) != expected.get(key):
            return False, f"{key} changed ({record.get(key)!r} -> {expected.get(key)!r})"
    path = Path(engine_dir) / record["file"]
    if not path.is_file():
        return False, f"{record['file']} is missing"
    size = record.get("size_bytes")
    if size is not None and path.stat().st_size != size:
        return False, f"{record['file']} has {path.stat().st_size} bytes, {size} recorded"
    return True, "up to date"


# --- files -------------------------------------------------------------------------

def _clean_stale_temp(trt_dir: Path) -> None:
    """Remove temporary files left by builds that were killed (their pid is gone)."""
    for tmp in trt_dir.glob(".*.tmp"):
        match = re.search(r"\.(\d+)\.[^.]*\.tmp$", tmp.name)
        if not match:
            continue
        pid = int(match.group(1))
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                tmp.unlink()
        except OSError:
            pass
    for work in trt_dir.glob(".work-*"):
        match = re.match(r"\.work-(\d+)-", work.name)
        if match:
            try:
                os.kill(int(match.group(1)), 0)
            except ProcessLookupError:
                shutil.rmtree(work, ignore_errors=True)
            except OSError:
                pass


# --- timing cache -------------------------------------------------------------------------------

def _read_timing_cache(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def _merge_timing_cache(path: Path, config, progress) -> None:
    """Merge the cache of a finished build into trt/timing.cache under a file lock (atomic replace)."""
    try:
        ours = config.get_timing_cache()
    except AttributeError:
        return
    if ours is None:
        return
    with file_lock(path.with_name(path.name + ".lock")):
        on_disk = _read_timing_cache(path)
        if on_disk:
            try:
                theirs = config.create_timing_cache(on_disk)
                if not ours.combine(theirs, ignore_mismatch=True):
                    progress(f"  note: could not merge {path.name} from another build; keeping this build's")
            except Exception as exc:  # a cache from another TensorRT version / device: replace it
                progress(f"  note: {path.name} not mergeable ({one_line(exc)}); replacing it")
        data = ours.serialize()
        atomic_write(path, bytes(memoryview(data)))


# --- network construction -----------------------------------------------------------------------

def _typing(env: TrtEnv, gp: GraphPlan) -> str:
    """'fp32' (no reduced precision), 'weak' (builder flags) or 'strong' (a typed ONNX graph: AutoCast's,
    or vv_export.strong_typing's for the Q/DQ precisions)."""
    if gp.precision == "fp32":
        return "fp32"
    mode = gp.builder["typing"]
    if gp.precision in QDQ_PRECISIONS:
        if mode == "weak":
            raise ExportError(f"graph {gp.graph}: {gp.precision} engines are built strongly typed (explicitly "
                              f"quantized graphs); the plan asks typing = \"weak\" (use \"auto\" or \"strong\")")
        return "strong"
    if mode == "auto":
        mode = "weak" if env.major < 11 else "strong"
    if mode == "weak" and env.major >= 11:
        raise ExportError(f"graph {gp.graph}: the plan asks typing = \"weak\", but TensorRT {env.version} only "
                          f"builds strongly typed networks (use typing = \"auto\" or \"strong\")")
    return mode


def _mark_fp32_layers(trt, network, keep_ops: list[str], keep_names: list[str]) -> int:
    """Layer precision + output types fp32 for the layers matching keep_fp32 (weak typing)."""
    from polygraphy.backend.trt import util as trt_util

    classes = trt_util.get_layer_class_mapping()
    floats = {trt.float32, trt.float16}
    if hasattr(trt, "bfloat16"):
        floats.add(trt.bfloat16)
    wanted = {}
    for op in keep_ops:
        layer_type, operation = FP32_LAYER_MATCH[op]
        wanted.setdefault(layer_type, set()).add(operation)
    marked = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        type_name = getattr(layer.type, "name", str(layer.type))
        hit = type_name in COMPUTE_LAYERS and any(fnmatch.fnmatchcase(layer.name, pat) for pat in keep_names)
        if not hit and type_name in wanted:
            ops = wanted[type_name]
            if None in ops:
                hit = True
            else:
                if layer.type in classes:
                    layer.__class__ = classes[layer.type]  # ILayer -> IElementWiseLayer etc., to read .op
                op = getattr(layer, "op", None)
                hit = op is not None and getattr(op, "name", str(op)) in ops
        if not hit:
            continue
        inputs = [layer.get_input(i) for i in range(layer.num_inputs)]
        if not any(t is not None and t.dtype in floats for t in inputs):
            continue  # shape arithmetic on integers
        layer.precision = trt.float32
        for i in range(layer.num_outputs):
            if layer.get_output(i).dtype in floats:
                layer.set_output_type(i, trt.float32)
        marked += 1
    return marked


def _autocast(onnx_path: Path, work: Path, gp: GraphPlan, progress) -> Path:
    """A mixed-precision copy of the graph for a strongly typed build (ModelOpt AutoCast)."""
    try:
        from modelopt.onnx.autocast.convert import convert_to_f16
    except ImportError as exc:
        raise ExportError(
            f"graph {gp.graph}: a {gp.precision} engine needs a strongly typed network here, converted by ModelOpt "
            f"AutoCast (pip install 'nvidia-modelopt[onnx]'), or use --precision fp32") from exc
    import onnx

    if gp.builder["keep_fp32_names"]:
        progress(f"  note: keep_fp32_names applies to weak typing only; {gp.graph} keeps op types "
                 f"{', '.join(gp.builder['keep_fp32']) or 'none'} in fp32")
    model = onnx.load(str(onnx_path), load_external_data=True)
    converted = convert_to_f16(model, low_precision_type=gp.precision, keep_io_types=True,
                               op_block_list=list(gp.builder["keep_fp32"]))
    out = work / f"{gp.graph}.{gp.precision}.onnx"
    onnx.save_model(converted, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=out.name + ".data", size_threshold=1024)
    return out


def _cache_typed(onnx_path: Path, work: Path, gp: GraphPlan) -> Path:
    """A copy of an LM graph whose cache I/O is in the plan's `cache_dtype` (graph_rules.with_cache_dtype); the
    graph itself where it has no cache I/O."""
    import onnx

    if not has_cache_io(onnx.load(str(onnx_path), load_external_data=False)):
        return onnx_path
    model = onnx.load(str(onnx_path), load_external_data=True)
    with_cache_dtype(model, gp.builder["cache_dtype"])
    out = work / f"{gp.graph}.cache-{gp.builder['cache_dtype']}.onnx"
    onnx.save_model(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=out.name + ".data", size_threshold=1024)
    return out


def _profiles(gp: GraphPlan):
    from polygraphy.backend.trt import Profile

    profiles = []
    for p in gp.profiles:
        prof = Profile()
        for name, (lo, opt, hi) in p.shapes.items():
            prof.add(name, min=list(lo), opt=list(opt), max=list(hi))
        profiles.append(prof)
    return profiles


def build_engine_bytes(env: TrtEnv, onnx_path: Path, gp: GraphPlan, cache_path: Path | None, work: Path,
                       progress=print):
    """Build one engine; returns (serialized engine, typing used, number of layers kept in fp32).

    With `cache_path`, the build starts from that timing cache and merges what it learned back into it.
    """
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath

    trt = env.trt
    typing = _typing(env, gp)
    path = onnx_path
    quantized = gp.precision in QDQ_PRECISIONS
    if quantized:
        path = work / f"{gp.graph}.{gp.precision}.onnx"
        try:
            typed_qdq_graph_file(onnx_path.parent, gp.graph, gp.precision, gp.builder, path, onnx_path=onnx_path)
        except (ExportError, KeyboardInterrupt, MemoryError):
            raise
        except Exception as exc:  # the rewrite or its check failed, not TensorRT: say so in one line
            raise ExportError(f"graph {gp.graph}: the {gp.precision} Q/DQ copy could not be made "
                              f"({_last_line(exc)})") from exc
    elif typing == "strong":
        path = _autocast(onnx_path, work, gp, progress)
    if gp.builder["cache_dtype"] != "fp32":
        path = _cache_typed(path, work, gp)
    floats = ACTIVATION_PRECISION.get(gp.precision, gp.precision)  # what the non-quantized layers run in
    # TensorRT 11 builds every network strongly typed; 10.x: strongly typed only for typed graphs
    strongly_typed = typing == "strong" or env.major >= 11
    builder, network, parser = NetworkFromOnnxPath(str(path), strongly_typed=strongly_typed or None)()
    marked = 0
    if typing == "weak" and (gp.builder["keep_fp32"] or gp.builder["keep_fp32_names"]):
        marked = _mark_fp32_layers(trt, network, gp.builder["keep_fp32"], gp.builder["keep_fp32_names"])
    constraints = gp.builder["precision_constraints"]
    timing_cache = _read_timing_cache(cache_path) if cache_path is not None else b""
    config_loader = CreateConfig(
        profiles=_profiles(gp),
        tf32=gp.builder["tf32"],
        fp16=(typing == "weak" and floats == "fp16") or None,
        bf16=(typing == "weak" and floats == "bf16") or None,
        precision_constraints=constraints if (typing == "weak" and marked and constraints != "none") else None,
        # the layer information the GPU check reads with the engine inspector (quantized kernels)
        profiling_verbosity=trt.ProfilingVerbosity.DETAILED if quantized else None,
        builder_optimization_level=gp.builder["optimization_level"],
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: gp.builder["workspace_mib"] << 20},
        load_timing_cache=io.BytesIO(timing_cache) if timing_cache else None,
    )
    config = config_loader(builder, network)
    if cache_path is not None and timing_cache and config.get_timing_cache() is None:
        # the shared cache is from another TensorRT version or GPU: start empty (the merge replaces it)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    engine = EngineBytesFromNetwork((builder, network, parser), config=config)()
    if engine is None:
        raise ExportError(f"graph {gp.graph}: TensorRT could not build an engine (see the messages above)")
    if cache_path is not None:
        _merge_timing_cache(cache_path, config, progress)  # while the builder that made the config lives
    return engine, typing, marked


# --- what an engine runs: the engine inspector ---------------------------------------------------

# Markers of the quantized type in a layer's tensor formats ("Format/Datatype") or tactic, per precision
QUANTIZED_FORMATS = {"fp8": ("fp8", "e4m3"), "int8wo": ("int8",)}


def engine_layer_information(engine_bytes) -> dict:
    """The engine inspector's report of a serialized engine, as JSON (layers with their inputs, outputs,
    formats and tactics in full for engines built with ProfilingVerbosity.DETAILED). Needs TensorRT."""
    import json

    env = trt_environment()
    trt = env.trt
    runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
    engine = runtime.deserialize_cuda_engine(bytes(engine_bytes))
    if engine is None:
        raise ExportError("the engine inspector cannot read this engine (another TensorRT or GPU)")
    inspector = engine.create_engine_inspector()
    return json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))


def quantized_layers(info: dict, precision: str) -> list[str]:
    """Names of the layers of an engine-inspector report (`engine_layer_information`) that read or write
    the quantized type of `precision` (FP8 for fp8, INT8 for int8wo) or run a tactic named after it: the
    kernels the Q/DQ graph was built for. Empty when the builder folded the quantization away (e.g. INT8
    weights dequantized into a bf16 GEMM's constant)."""
    markers = QUANTIZED_FORMATS[precision]
    found = []
    for layer in info.get("Layers") or []:
        if not isinstance(layer, dict):
            continue  # LAYER_NAMES_ONLY: no formats to read
        texts = [str(t.get("Format/Datatype", "")) for t in (layer.get("Inputs") or []) + (layer.get("Outputs") or [])
                 if isinstance(t, dict)]
        texts.append(str(layer.get("TacticName", "")))
        if any(marker in text.lower() for text in texts for marker in markers):
            found.append(str(layer.get("Name", "")))
    return found


# --- the command --------------------------------------------------------------------------------

def _check_onnx(engine_dir: Path, graph: str, entry: dict) -> Path:
    path = engine_dir / entry.get("file", f"{graph}.onnx")
    if not path.is_file():
        raise ExportError(f"{path}: graph file of {graph!r} is missing")
    for name in entry.get("external_data") or []:
        if not (engine_dir / name).is_file():
            raise ExportError(f"{engine_dir / name}: external data of {graph!r} is missing")
    if entry.get("sha256") and sha256_file(path) != entry["sha256"]:
        raise ExportError(f"{path}: changed since export (sha256 differs from the manifest); re-export the ENGINE_DIR")
    return path


def resolve_for_engine_dir(engine_dir, plan: str = "default", precision: str | None = None,
                           graphs: list[str] | None = None) -> tuple[dict, Plan]:
    """(manifest, resolved plan) of an ENGINE_DIR, validating both; needs neither TensorRT nor a GPU."""
    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir)
    resolved = resolve_plan(plan, manifest, precision=precision, graphs=graphs)
    quantized = [g for g in resolved.graphs
                 if ((manifest["graphs"][g].get("quantization") or {}).get("status")) == "quantized"]
    if quantized:
        raise ExportError(f"{engine_dir}: graphs {', '.join(quantized)} hold ONNX Runtime int8/int4 weights "
                          f"(MatMulNBits), which TensorRT cannot parse; build engines from an ENGINE_DIR "
                          f"exported without --quantize")
    return manifest, resolved


def build_engines(engine_dir, plan: str = "default", precision: str | None = None, force: bool = False,
                  progress: Callable[[str], None] = print, graphs: list[str] | None = None) -> dict:
    """Build (or keep, when up to date) one TensorRT engine per graph of ENGINE_DIR.

    Returns {"plan", "plan_hash", "trt_version", "compute_capability", "engines": {graph: record +
    "status" ("built" | "up to date" | "recorded")}}. Raises TrtUnavailable without TensorRT or a GPU,
    PlanError / ExportError (one line) for a bad plan or ENGINE_DIR.
    """
    engine_dir = Path(engine_dir)
    manifest, resolved = resolve_for_engine_dir(engine_dir, plan, precision, graphs)
    env = trt_environment()
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.WARNING  # TensorRT's warnings and errors; our progress lines
    for prec in dict.fromkeys(gp.precision for gp in resolved.graphs.values()):  # before any build
        check_precision_supported(prec, env.compute_capability,
                                  [g for g, gp in resolved.graphs.items() if gp.precision == prec])
    for gp in resolved.graphs.values():
        _typing(env, gp)  # a typing this TensorRT cannot build: one line now, not after other engines
    trt_dir = engine_dir / TRT_DIR
    trt_dir.mkdir(exist_ok=True)
    _clean_stale_temp(trt_dir)
    cache_path = trt_dir / TIMING_CACHE
    for note in resolved.notes:
        progress(f"plan {resolved.name}: {note}")
    progress(f"TensorRT {env.version} on {env.device_name} ({env.compute_capability}); plan {resolved.name} "
             f"[{resolved.hash[:12]}], {len(resolved.graphs)} engines")

    result = {"plan": resolved.name, "plan_hash": resolved.hash, "trt_version": env.version,
              "compute_capability": env.compute_capability, "engines": {}}
    total = len(resolved.graphs)
    for n, (graph, gp) in enumerate(resolved.graphs.items(), start=1):
        tag = f"[{n}/{total}] {graph}"
        entry = manifest["graphs"][graph]
        onnx_path = _check_onnx(engine_dir, graph, entry)
        expected = expected_engine(engine_dir, manifest, gp, env.version, env.compute_capability, resolved.name)
        record = ((manifest.get("trt") or {}).get("engines") or {}).get(graph)
        current, why = engine_is_current(engine_dir, record, expected)
        if current and not force:
            progress(f"{tag}: up to date ({record['file']})")
            result["engines"][graph] = {**record, "status": "up to date"}
            continue
        target = engine_dir / expected["file"]
        if target.is_file() and not force and record is None:
            # built by an earlier run that stopped before recording it (the rename is atomic: complete)
            new = {**expected, "size_bytes": target.stat().st_size, "built": None}
            _record(engine_dir, graph, new, resolved, record)
            progress(f"{tag}: found {expected['file']}, recorded")
            result["engines"][graph] = {**new, "status": "recorded"}
            continue
        names = ", ".join(p.name for p in gp.profiles)
        progress(f"{tag}: building {gp.precision} engine (profiles {names}; {why if not force else 'forced'})")
        start = time.time()
        work = Path(tempfile.mkdtemp(prefix=f".work-{os.getpid()}-", dir=trt_dir))
        try:
            try:
                engine, typing, marked = build_engine_bytes(
                    env, onnx_path, gp, cache_path if gp.builder["timing_cache"] else None, work, progress)
            except (ExportError, KeyboardInterrupt, MemoryError):
                raise
            except Exception as exc:  # polygraphy / TensorRT failures: multi-line, keep the gist
                raise ExportError(f"graph {graph}: TensorRT build failed ({_last_line(exc)})") from exc
            data = memoryview(engine)
            atomic_write(target, data)
            size = data.nbytes
            del data, engine
        finally:
            shutil.rmtree(work, ignore_errors=True)
        seconds = time.time() - start
        new = {**expected, "size_bytes": size, "typing": typing, "fp32_layers": marked,
               "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "build_seconds": round(seconds, 1),
               "device": env.device_name}
        _record(engine_dir, graph, new, resolved, record)
        progress(f"{tag}: built in {seconds:.1f} s -> {expected['file']} ({size / 2**20:.1f} MiB)")
        result["engines"][graph] = {**new, "status": "built"}
    return result


def _record(engine_dir: Path, graph: str, new: dict, resolved: Plan, old: dict | None) -> None:
    def update(manifest: dict) -> None:
        trt_section = manifest.setdefault("trt", {})
        engines = trt_section.setdefault("engines", {})
        previous = engines.get(graph)
        engines[graph] = new
        trt_section["plan"] = resolved.name
        trt_section["plan_hash"] = resolved.hash
        trt_section["timing_cache"] = f"{TRT_DIR}/{TIMING_CACHE}"
        for stale in (previous, old):
            if stale and stale.get("file") and stale["file"] != new["file"]:
                still_used = any(e.get("file") == stale["file"] for e in engines.values())
                if not still_used:
                    with contextlib.suppress(OSError):
                        (engine_dir / stale["file"]).unlink()

    update_manifest(engine_dir, update)


def _last_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:300]
