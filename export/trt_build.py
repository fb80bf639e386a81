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

The second half of this module holds the polygraphy accuracy helpers shared by the CPU tests (ONNX
Runtime against the saved PyTorch outputs), the GPU accuracy check (TensorRT against ONNX Runtime)
and the GPU benchmark.
"""

from __future__ import annotations

import contextlib
import ctypes
import fnmatch
import io
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import ExportError, TrtUnavailable
from .onnx_export import sha256_file
from .plans import KEEP_FP32_OPS, PRECISIONS, GraphPlan, Plan, resolve_plan

TRT_DIR = "trt"
TIMING_CACHE = "timing.cache"
MIN_TRT_MAJOR = 10
ENGINE_FORMAT = "vibevoice-trt/engine"

# keep_fp32 ONNX op types -> the TensorRT layers they become (layer type, operation or None)
FP32_LAYER_MATCH = {
    "Pow": ("ELEMENTWISE", "POW"),
    "Div": ("ELEMENTWISE", "DIV"),
    "Mul": ("ELEMENTWISE", "PROD"),
    "Add": ("ELEMENTWISE", "SUM"),
    "Sub": ("ELEMENTWISE", "SUB"),
    "ReduceMean": ("REDUCE", None),
    "ReduceSum": ("REDUCE", None),
    "Sqrt": ("UNARY", "SQRT"),
    "Reciprocal": ("UNARY", "RECIP"),
    "Exp": ("UNARY", "EXP"),
    "Log": ("UNARY", "LOG"),
    "Sin": ("UNARY", "SIN"),
    "Cos": ("UNARY", "COS"),
    "RMSNormalization": ("NORMALIZATION", None),
    "LayerNormalization": ("NORMALIZATION", None),
    "Softmax": ("SOFTMAX", None),
    "MatMul": ("MATRIX_MULTIPLY", None),
    "Gemm": ("MATRIX_MULTIPLY", None),
    "Conv": ("CONVOLUTION", None),
    "ConvTranspose": ("DECONVOLUTION", None),
}
assert set(FP32_LAYER_MATCH) == set(KEEP_FP32_OPS)
# Layers a name pattern (keep_fp32_names) may pin to fp32: arithmetic, not data movement or shape logic.
_COMPUTE_LAYERS = {"ELEMENTWISE", "UNARY", "REDUCE", "NORMALIZATION", "SOFTMAX", "MATRIX_MULTIPLY", "CONVOLUTION",
                   "DECONVOLUTION", "ACTIVATION", "SCALE"}


# --- environment --------------------------------------------------------------------------------

@dataclass
class TrtEnv:
    trt: object  # the tensorrt module
    version: str
    major: int
    compute_capability: str  # "sm90"
    device_name: str


def _cuda_device() -> tuple[str, int, int] | None:
    """(name, major, minor) of CUDA device 0, or None: through torch, else the CUDA runtime library."""
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            major, minor = torch.cuda.get_device_capability(0)
            return torch.cuda.get_device_name(0), int(major), int(minor)
    # torch may be a CPU build next to a pip-installed TensorRT: ask libcudart directly
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
        raise TrtUnavailable("TensorRT is not installed (pip install 'vibevoice-trt[gpu]' on a machine with an "
                             "NVIDIA GPU and CUDA); ONNX Runtime runs the graphs without it") from exc
    except Exception as exc:  # a broken install (missing CUDA libraries)
        raise TrtUnavailable(f"TensorRT cannot be imported ({_one_line(exc)})") from exc
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


# --- manifest and files -------------------------------------------------------------------------

def read_manifest(engine_dir: Path) -> dict:
    path = Path(engine_dir) / "manifest.json"
    if not Path(engine_dir).is_dir():
        raise ExportError(f"--engine-dir {engine_dir}: not a directory")
    if not path.is_file():
        raise ExportError(f"{path}: missing (run `vv-export onnx --out {engine_dir}` first)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path}: unreadable manifest ({_one_line(exc)})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != "vibevoice-trt/engine-dir":
        raise ExportError(f"{path}: not a vibevoice-trt ENGINE_DIR manifest")
    if manifest.get("format_version") != 1:
        raise ExportError(f"{path}: unsupported format_version {manifest.get('format_version')!r}")
    if not isinstance(manifest.get("graphs"), dict):
        raise ExportError(f"{path}: no graphs")
    return manifest


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _lock(path: Path, timeout: float = 600.0):
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path), timeout=timeout)


def update_manifest(engine_dir: Path, update: Callable[[dict], None]) -> dict:
    """Re-read manifest.json under a lock, apply `update(manifest)`, replace it atomically."""
    engine_dir = Path(engine_dir)
    with _lock(engine_dir / TRT_DIR / ".manifest.lock"):
        manifest = read_manifest(engine_dir)
        update(manifest)
        _atomic_write(engine_dir / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


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
    with _lock(path.with_name(path.name + ".lock")):
        on_disk = _read_timing_cache(path)
        if on_disk:
            try:
                theirs = config.create_timing_cache(on_disk)
                if not ours.combine(theirs, ignore_mismatch=True):
                    progress(f"  note: could not merge {path.name} from another build; keeping this build's")
            except Exception as exc:  # a cache from another TensorRT version / device: replace it
                progress(f"  note: {path.name} not mergeable ({_one_line(exc)}); replacing it")
        data = ours.serialize()
        _atomic_write(path, bytes(memoryview(data)))


# --- network construction -----------------------------------------------------------------------

def _typing(env: TrtEnv, gp: GraphPlan) -> str:
    """'fp32' (no reduced precision), 'weak' (builder flags) or 'strong' (AutoCast-converted ONNX)."""
    if gp.precision == "fp32":
        return "fp32"
    mode = gp.builder["typing"]
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
        hit = type_name in _COMPUTE_LAYERS and any(fnmatch.fnmatchcase(layer.name, pat) for pat in keep_names)
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
    if typing == "strong":
        path = _autocast(onnx_path, work, gp, progress)
    # TensorRT 11 builds every network strongly typed; 10.x: strongly typed only for converted graphs
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
        fp16=(typing == "weak" and gp.precision == "fp16") or None,
        bf16=(typing == "weak" and gp.precision == "bf16") or None,
        precision_constraints=constraints if (typing == "weak" and marked and constraints != "none") else None,
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
    return manifest, resolve_plan(plan, manifest, precision=precision, graphs=graphs)


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
    if int(env.compute_capability[2:]) < 80:
        bf16 = [g for g, gp in resolved.graphs.items() if gp.precision == "bf16"]
        if bf16:
            raise ExportError(f"bf16 needs compute capability 8.0 or newer, this GPU is {env.compute_capability} "
                              f"({', '.join(bf16)} ask bf16): use --plan turing or --precision fp16/fp32")
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
            _atomic_write(target, data)
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


# --- accuracy (polygraphy) ----------------------------------------------------------------------

@dataclass
class OutputError:
    output: str
    iteration: int
    max_abs_error: float
    allowed: float
    peak: float
    passed: bool


@dataclass
class AccuracyReport:
    graph: str
    test: str
    reference: str
    passed: bool
    errors: list  # of OutputError

    def worst(self) -> dict:
        """output -> the largest error over the iterations, with its allowed bound."""
        out: dict = {}
        for e in self.errors:
            w = out.get(e.output)
            if w is None or e.max_abs_error - e.allowed > w["max_abs_error"] - w["allowed"]:
                out[e.output] = {"max_abs_error": e.max_abs_error, "allowed": e.allowed, "iteration": e.iteration}
        return out

    def failures(self) -> list[str]:
        return [f"{self.graph}.{e.output} (inputs #{e.iteration}): {self.test} vs {self.reference} max |error| "
                f"{e.max_abs_error:.3g} > allowed {e.allowed:.3g}" for e in self.errors if not e.passed]

    def to_json(self) -> dict:
        return {"graph": self.graph, "test": self.test, "reference": self.reference, "passed": self.passed,
                "worst": self.worst()}


def quiet_polygraphy() -> None:
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR


def _simple_compare(atol: dict, rtol: dict):
    from polygraphy.comparator import compare as pg_compare

    cls = getattr(pg_compare, "SimpleCompareFunc", None)
    if cls is not None:
        return cls(atol=atol, rtol=rtol, check_error_stat="max", check_shapes=True)
    return pg_compare.CompareFunc.simple(atol=atol, rtol=rtol, check_error_stat="max", check_shapes=True)


def compare_outputs(graph: str, test_outputs: list[dict], reference_outputs: list[dict], tolerance: dict,
                    test_name: str = "test", reference_name: str = "reference") -> AccuracyReport:
    """Compare two runs through polygraphy's Comparator with per-output tolerances.

    The criterion is the exporter's: ``max|test - ref| <= atol + rtol * max|ref|`` per output and per
    iteration. Polygraphy's own relative check is per element, so each iteration is compared with a
    SimpleCompareFunc whose absolute bound is atol + rtol * max|ref| (check_error_stat "max").
    """
    import numpy as np
    from polygraphy.comparator import Comparator, RunResults
    from polygraphy.comparator.struct import IterationResult

    quiet_polygraphy()
    if len(test_outputs) != len(reference_outputs):
        raise ValueError(f"{graph}: {len(test_outputs)} test iterations vs {len(reference_outputs)} reference")
    errors = []
    passed = True
    for i, (got, ref) in enumerate(zip(test_outputs, reference_outputs)):
        atol, rtol = {}, {}
        peaks = {}
        for name, value in ref.items():
            arr = np.asarray(value)
            peak = float(np.max(np.abs(arr))) if arr.size else 0.0
            tol = tolerance.get(name, tolerance.get("")) or {"atol": 0.0, "rtol": 0.0}
            atol[name] = tol["atol"] + tol["rtol"] * peak
            rtol[name] = 0.0
            peaks[name] = peak
        missing = [k for k in ref if k not in got]
        if missing:
            raise ValueError(f"{graph}: {test_name} produced no output {missing[0]!r}")
        results = RunResults()
        results.append((test_name, [IterationResult({k: np.asarray(got[k]) for k in ref}, runner_name=test_name)]))
        results.append((reference_name, [IterationResult({k: np.asarray(v) for k, v in ref.items()},
                                                         runner_name=reference_name)]))
        accuracy = Comparator.compare_accuracy(results, compare_func=_simple_compare(atol, rtol))
        verdicts = list(accuracy[0].values())[0][0] if len(accuracy) else {}
        for name in ref:
            a, b = np.asarray(got[name]), np.asarray(ref[name])
            if a.shape != b.shape:
                err = float("inf")
            else:
                err = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if b.size else 0.0
            ok = bool(verdicts.get(name, False)) and np.isfinite(err)
            passed &= ok
            errors.append(OutputError(name, i, err, atol[name], peaks[name], ok))
    return AccuracyReport(graph, test_name, reference_name, passed, errors)


def run_onnxrt(engine_dir, manifest: dict, graph: str, feeds_list: list[dict], providers=None,
               name: str = "onnxrt") -> list[dict]:
    """Run one graph of an ENGINE_DIR in ONNX Runtime through polygraphy (OnnxrtRunner + Comparator.run)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator

    quiet_polygraphy()
    path = Path(engine_dir) / manifest["graphs"][graph].get("file", f"{graph}.onnx")
    runner = OnnxrtRunner(SessionFromOnnx(str(path), providers=providers or ["cpu"]), name=name)
    results = Comparator.run([runner], data_loader=list(feeds_list))
    return [{k: v for k, v in it.items()} for it in results[0][1]]


def make_backend_runner(backend, manifest: dict, graph: str, name: str):
    """A polygraphy runner over any runtime backend (``backend.run(graph, feeds)``), e.g. TrtBackend."""
    from collections import OrderedDict

    import numpy as np
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class BackendRunner(BaseRunner):
        def __init__(self):
            super().__init__(name=name, prefix="backend")

        def get_input_metadata_impl(self):
            meta = TensorMetadata()
            for io_spec in manifest["graphs"][graph]["inputs"]:
                shape = [d if isinstance(d, int) else None for d in io_spec["shape"]]
                meta.add(io_spec["name"], np.dtype(io_spec["dtype"]), shape)
            return meta

        def infer_impl(self, feed_dict):
            start = time.perf_counter()
            out = backend.run(graph, dict(feed_dict))
            self.inference_time = time.perf_counter() - start
            return OrderedDict((k, np.array(v, copy=True)) for k, v in out.items())

    return BackendRunner()


def run_backend(backend, manifest: dict, graph: str, feeds_list: list[dict], name: str = "backend") -> list[dict]:
    """Run one graph on a runtime backend through polygraphy's Comparator.run."""
    from polygraphy.comparator import Comparator

    quiet_polygraphy()
    runner = make_backend_runner(backend, manifest, graph, name)
    results = Comparator.run([runner], data_loader=list(feeds_list))
    return [{k: v for k, v in it.items()} for it in results[0][1]]


def reference_outputs(run_results) -> list[dict]:
    """The iterations of the (single) runner of saved RunResults, as dicts of arrays."""
    _, iterations = run_results[0]
    return [{k: v for k, v in it.items()} for it in iterations]


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _last_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:300]
