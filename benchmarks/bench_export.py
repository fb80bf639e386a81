"""Export a randomly initialised FULL-SIZE VibeVoice-1.5B to an ENGINE_DIR and load every graph in ONNX Runtime.

    python benchmarks/bench_export.py --out benchmarks/results [--dtype fp32|fp16|bf16] [--validate]

No weights are needed: the model is built from the released checkpoint's config
(`shared/reference/vibevoice-1.5b-original-config.json`) with random weights. The checkpoint ships no
tokenizer, so the ENGINE_DIR gets a stand-in byte-level tokenizer (`byte_level_tokenizer_json()`);
the manifest's token ids are Qwen2.5's (151643/151652/151653/151654), which the stand-in does not
have: this ENGINE_DIR is for measuring export and load, not for speaking text.

Two phases, each in its own process so that their memory is measured separately and the torch model
is gone before ONNX Runtime loads the graphs:

1. export: `random_model` + `export_onnx` (timed per graph; peak RSS per graph through VmHWM, reset
   before each graph with /proc/self/clear_refs).
2. load: for every graph in the manifest, an ONNX Runtime CPU session is created (timed), run once on
   a small input built from the manifest's I/O (timed, outputs checked finite), and dropped.

Writes `<out>/export_full_size.json`. `run_benchmark()` is the same code for `tests/test_full_size.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FULL_SIZE_CONFIG, feeds_for, load_average, provenance, write_result  # noqa: E402

DEFAULT_CONFIG = FULL_SIZE_CONFIG
RESULT_NAME = "export_full_size.json"

# dimension values of the small input each graph is run on once
SMALL_DIMS = {"batch": 1, "seq": 4, "past": 3, "total": 7, "frames": 2}


# --- memory -------------------------------------------------------------------------------------

def _status_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_gb() -> float:
    return _status_kb("VmRSS") / 1e6 if sys.platform.startswith("linux") else float("nan")


def peak_rss_gb() -> float:
    """Peak RSS since the process start or the last reset_peak() (VmHWM), else ru_maxrss."""
    if sys.platform.startswith("linux"):
        return _status_kb("VmHWM") / 1e6
    scale = 1e9 if sys.platform == "darwin" else 1e6  # ru_maxrss: bytes on macOS, kB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


_EARLIER_PEAK_GB = 0.0  # the largest peak before the last reset_peak()


def process_peak_rss_gb() -> float:
    """Peak RSS of this process over its whole life (reset_peak() does not lose it)."""
    return max(_EARLIER_PEAK_GB, peak_rss_gb())


def reset_peak() -> bool:
    """Start a new peak-RSS window (Linux: VmHWM is reset through /proc/self/clear_refs)."""
    global _EARLIER_PEAK_GB
    _EARLIER_PEAK_GB = max(_EARLIER_PEAK_GB, peak_rss_gb())
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


# --- phase 1: export ----------------------------------------------------------------------------

def export_phase(config_path: Path, engine_dir: Path, dtype: str, validate: bool, threads: int | None) -> dict:
    import torch

    from vv_export import onnx_export
    from vv_export.checkpoint import byte_level_tokenizer_json, random_model

    if threads:
        torch.set_num_threads(threads)
    config = json.loads(Path(config_path).read_text())
    t0 = time.perf_counter()
    loaded = random_model(config, seed=0, source="random-full-size(vibevoice-1.5b config, seed=0)")
    # The released checkpoint has no tokenizer (it uses Qwen2.5's); export needs one to copy. The stand-in
    # does not hold the Qwen ids that `random_model` put into token_ids (and the manifest).
    loaded.tokenizer_json = byte_level_tokenizer_json()
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in loaded.model.parameters())
    after_build = {"rss_gb": rss_gb(), "peak_rss_gb": peak_rss_gb()}

    graphs: dict[str, dict] = {}
    real_export, real_validate = onnx_export.export_graph, onnx_export.validate_graph

    def timed_export(spec, ctx, directory, dtype_):
        reset_peak()
        t = time.perf_counter()
        entry = real_export(spec, ctx, directory, dtype_)
        graphs[spec.name] = {"export_s": time.perf_counter() - t, "export_peak_rss_gb": peak_rss_gb(),
                             "rss_after_export_gb": rss_gb()}
        return entry

    def timed_validate(spec, ctx, directory, threads_=None):
        reset_peak()
        t = time.perf_counter()
        worst = real_validate(spec, ctx, directory, threads_)
        graphs[spec.name].update({"validate_s": time.perf_counter() - t, "validate_peak_rss_gb": peak_rss_gb(),
                                  "validated_max_abs_error": worst})
        return worst

    onnx_export.export_graph, onnx_export.validate_graph = timed_export, timed_validate
    try:
        t1 = time.perf_counter()
        onnx_export.export_onnx(loaded, engine_dir, dtype=dtype, validate=validate, force=True,
                                progress=False, threads=threads)
        export_s = time.perf_counter() - t1
    finally:
        onnx_export.export_graph, onnx_export.validate_graph = real_export, real_validate
    return {"build_model_s": build_s, "parameters": int(params), "after_build": after_build,
            "export_onnx_s": export_s, "graphs": graphs, "process_peak_rss_gb": process_peak_rss_gb()}


# --- phase 2: load in ONNX Runtime ----------------------------------------------------------------

def small_feeds(manifest: dict, graph: str, seed: int = 0) -> dict:
    """A small input for `graph` from the manifest's I/O alone (no torch)."""
    hop = int(manifest["model"]["hop_length"])
    return feeds_for(manifest, graph, dict(SMALL_DIMS, samples=SMALL_DIMS["frames"] * hop), seed)


def file_sizes(engine_dir: Path, entry: dict) -> dict:
    files = [entry["file"], *entry.get("external_data", [])]
    sizes = {f: (engine_dir / f).stat().st_size for f in files}
    return {"files": sizes, "total_bytes": sum(sizes.values())}


def load_phase(engine_dir: Path, threads: int | None) -> dict:
    import numpy as np
    import onnxruntime as ort

    manifest = json.loads((engine_dir / "manifest.json").read_text())
    out = {}
    for graph, entry in manifest["graphs"].items():
        reset_peak()
        before = rss_gb()
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        t = time.perf_counter()
        session = ort.InferenceSession(str(engine_dir / entry["file"]), opts, providers=["CPUExecutionProvider"])
        load_s = time.perf_counter() - t
        loaded_rss = rss_gb()
        feeds = small_feeds(manifest, graph)
        names = [o["name"] for o in entry["outputs"]]
        t = time.perf_counter()
        result = session.run(names, feeds)
        run_s = time.perf_counter() - t
        finite = all(bool(np.isfinite(r).all()) for r in result)
        out[graph] = {"load_s": load_s, "run_s": run_s, "rss_before_gb": before, "rss_loaded_gb": loaded_rss,
                      "peak_rss_gb": peak_rss_gb(),
                      "inputs": {k: list(v.shape) for k, v in feeds.items()},
                      "outputs": {n: list(r.shape) for n, r in zip(names, result)}, "outputs_finite": finite}
        del session, result
    return {"graphs": out, "process_peak_rss_gb": process_peak_rss_gb()}


# --- orchestration --------------------------------------------------------------------------------

def _child(phase: str, args: list[str], timeout: float | None) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as handle:
        result_path = Path(handle.name)
    try:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", phase, "--phase-result", str(result_path),
               *args]
        t = time.perf_counter()
        proc = subprocess.run(cmd, timeout=timeout)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise RuntimeError(f"{phase} phase failed with exit status {proc.returncode}")
        result = json.loads(result_path.read_text())
        result["wall_s"] = wall
        return result
    finally:
        result_path.unlink(missing_ok=True)


def run_benchmark(out_dir: Path | None = None, *, config: Path = DEFAULT_CONFIG, dtype: str = "fp32",
                  validate: bool = True, engine_dir: Path | None = None, keep: bool = False,
                  threads: int | None = None, timeout: float | None = None) -> dict:
    """Export the full-size random model, load every graph in ORT; returns (and writes) the result dict."""
    config = Path(config)
    if not config.exists():
        raise FileNotFoundError(f"full-size config not found: {config}")
    scratch = None
    if engine_dir is None:
        scratch = Path(tempfile.mkdtemp(prefix="vv-bench-export-"))
        engine_dir = scratch / "full-size"
    engine_dir = Path(engine_dir)
    load_before = load_average()
    common = ["--engine-dir", str(engine_dir)] + (["--threads", str(threads)] if threads else [])
    try:
        export = _child("export", ["--config", str(config), "--dtype", dtype,
                                   "--validate" if validate else "--no-validate", *common], timeout)
        load = _child("load", common, timeout)
        manifest = json.loads((engine_dir / "manifest.json").read_text())
        graphs = {}
        for name, entry in manifest["graphs"].items():
            graphs[name] = {**export["graphs"].get(name, {}), **file_sizes(engine_dir, entry),
                            "weight_bytes": entry.get("weight_bytes"),
                            "ort": load["graphs"][name]}
        total_bytes = sum(g["total_bytes"] for g in graphs.values())
        result = {
            "benchmark": "export_full_size",
            "model": {"config": "vibevoice-1.5b-original-config.json (released VibeVoice-1.5B)",
                      "weights": "random (seed 0)", "parameters": export["parameters"],
                      "tokens": manifest["tokens"],
                      "tokenizer": "stand-in byte-level tokenizer (the token ids in the manifest are Qwen2.5's)"},
            "dtype": dtype,
            "validated": validate,
            "threads": threads or os.cpu_count(),
            "build_model_s": export["build_model_s"],
            "export_s_total": export["export_onnx_s"],
            "export_process_wall_s": export["wall_s"],
            "export_peak_rss_gb": export["process_peak_rss_gb"],
            "rss_after_build_gb": export["after_build"]["rss_gb"],
            "ort_load_s_total": sum(g["ort"]["load_s"] for g in graphs.values()),
            "ort_peak_rss_gb": load["process_peak_rss_gb"],
            "peak_rss_gb": max(export["process_peak_rss_gb"], load["process_peak_rss_gb"]),
            "engine_dir_bytes": total_bytes,
            "graphs": graphs,
            "all_graphs_ran": all(g["ort"]["outputs_finite"] for g in graphs.values()),
            **provenance(load_average_1min_before=load_before),
        }
        if out_dir is not None:
            write_result(out_dir, RESULT_NAME, result)
        return result
    finally:
        if scratch is not None and not keep:
            shutil.rmtree(scratch, ignore_errors=True)


def _summary(result: dict) -> str:
    lines = [f"full-size export ({result['dtype']}, validated={result['validated']}): "
             f"{result['export_s_total']:.0f} s export + {result['build_model_s']:.0f} s model build, "
             f"peak RSS {result['peak_rss_gb']:.1f} GB (export {result['export_peak_rss_gb']:.1f}, "
             f"ORT {result['ort_peak_rss_gb']:.1f}), {result['engine_dir_bytes'] / 1e9:.2f} GB on disk"]
    for name, g in result["graphs"].items():
        lines.append(f"  {name:20s} export {g.get('export_s', float('nan')):7.1f} s  "
                     f"{g['total_bytes'] / 1e6:9.1f} MB  ORT load {g['ort']['load_s']:6.2f} s  "
                     f"run {g['ort']['run_s'] * 1e3:8.1f} ms")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="directory for export_full_size.json")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="original-layout config.json")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--validate", action=argparse.BooleanOptionalAction, default=True,
                        help="validate every graph against PyTorch while exporting (the LM's validation holds the "
                             "torch model and the ORT session at once: ~16 GB peak at fp32)")
    parser.add_argument("--engine-dir", type=Path, default=None, help="where to write the ENGINE_DIR "
                        "(default: a temporary directory, removed afterwards)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary ENGINE_DIR")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--phase", choices=["export", "load"], help=argparse.SUPPRESS)
    parser.add_argument("--phase-result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.phase == "export":
        result = export_phase(args.config, args.engine_dir, args.dtype, args.validate, args.threads)
        args.phase_result.write_text(json.dumps(result))
        return 0
    if args.phase == "load":
        result = load_phase(args.engine_dir, args.threads)
        args.phase_result.write_text(json.dumps(result))
        return 0
    result = run_benchmark(args.out, config=args.config, dtype=args.dtype, validate=args.validate,
                           engine_dir=args.engine_dir, keep=args.keep, threads=args.threads)
    print(_summary(result))
    if args.out is not None:
        print(f"wrote {args.out / RESULT_NAME}")
    return 0 if result["all_graphs_ran"] else 1


if __name__ == "__main__":
    sys.exit(main())
