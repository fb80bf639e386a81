"""GPU benchmark: full-size VibeVoice-1.5B (random weights) on TensorRT vs ONNX Runtime CUDA vs PyTorch.

    python benchmarks/bench_gpu.py --out benchmarks/results [--plan default] [--precision fp16|bf16|fp32]
        [--batches 1,4,16] [--engine-dir DIR] [--frames 32] [--context 1024] [--prompt 512] [--repeats 20]

Needs an NVIDIA GPU with TensorRT (and onnxruntime-gpu for the ORT-CUDA column); without a CUDA GPU
it exits with status 2 and one line saying so.

1. Model: a randomly initialised VibeVoice of the released 1.5B config
   (`shared/reference/vibevoice-1.5b-original-config.json`, seed 0), exported to an ENGINE_DIR
   (fp32 graphs; or reuse one with --engine-dir), TensorRT engines built from the plan.
2. Per graph at batch B in --batches (B requests; the LM sees 2B rows, CFG): median latency of one
   call, inputs on the host as the runtime passes them (so host<->device copies are included):
   lm prefill (B rows x --prompt tokens), lm decode (2B rows, 1 token, --context past), diffusion_sampler,
   acoustic_decoder, semantic_encoder, text_embed -- on TensorRT (`TrtBackend`), ONNX Runtime CUDA
   (`OrtBackend` with the CUDA provider) and PyTorch (the exporter's wrapper modules, the very modules
   the graphs were exported from, eager on the GPU, fp32, or bf16 with --torch-dtype bf16).
   Per-frame cost = lm decode + diffusion_sampler + acoustic_decoder + semantic_encoder.
3. End to end at batch B: `Pipeline.generate` with every step forced to speech_diffusion (--frames
   frames per row) on TensorRT and ORT-CUDA: seconds per frame, real-time factor (per row and for the
   batch), time to first audio.

Writes `<out>/bench_gpu.json` (device, versions, plan, every figure). A section that fails is recorded
with its one-line error and the exit status is 1.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import (REPO, FULL_SIZE_CONFIG, ForcedDiffusion, feeds_for, machine_info, versions,  # noqa: E402
                    write_result)

DEFAULT_CONFIG = FULL_SIZE_CONFIG
RESULT_NAME = "bench_gpu.json"
SAMPLE_RATE = 24000
FRAME_GRAPHS = ("diffusion_sampler", "acoustic_decoder", "semantic_encoder")


class Unavailable(Exception):
    """This machine cannot run the benchmark (one line)."""


def preflight() -> dict:
    """The GPU, TensorRT and ORT-CUDA, or Unavailable."""
    try:
        import torch
    except ImportError as exc:
        raise Unavailable("PyTorch is not installed") from exc
    if not torch.cuda.is_available():
        raise Unavailable("no CUDA GPU is visible (torch.cuda.is_available() is False): bench_gpu needs an "
                          "NVIDIA GPU with TensorRT")
    try:
        import tensorrt
    except Exception as exc:
        raise Unavailable(f"TensorRT is not installed ({type(exc).__name__}): pip install 'vibevoice-trt[gpu]'") from exc
    import onnxruntime as ort

    major, minor = torch.cuda.get_device_capability(0)
    return {"device": torch.cuda.get_device_name(0), "compute_capability": f"sm{major}{minor}",
            "gpu_memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1),
            "tensorrt": tensorrt.__version__, "torch": torch.__version__, "cuda": torch.version.cuda,
            "onnxruntime": ort.__version__, "ort_cuda": "CUDAExecutionProvider" in ort.get_available_providers()}


def one_line(exc: BaseException) -> str:
    return (" ".join(str(exc).split()) or type(exc).__name__)[:400]


# --- inputs ---------------------------------------------------------------------------------------

def cases(manifest: dict, batch: int, prompt: int, context: int) -> dict:
    """name -> (graph, dims) of the calls timed at one request batch size."""
    hop = int(manifest["model"]["hop_length"])
    return {
        "text_embed": ("text_embed", {"batch": batch, "seq": prompt}),
        "lm_prefill": ("lm", {"batch": batch, "seq": prompt, "past": 0, "total": prompt}),
        "lm_decode": ("lm", {"batch": 2 * batch, "seq": 1, "past": context, "total": context + 1}),
        "diffusion_sampler": ("diffusion_sampler", {"batch": batch}),
        "acoustic_decoder": ("acoustic_decoder", {"batch": batch}),
        "semantic_encoder": ("semantic_encoder", {"batch": batch}),
        "acoustic_encoder": ("acoustic_encoder", {"batch": 1, "samples": 10 * SAMPLE_RATE // hop * hop}),
    }


def timed(fn, repeats: int, warmup: int = 3, sync=None) -> dict:
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t)
    times.sort()
    return {"median_ms": statistics.median(times) * 1e3, "min_ms": times[0] * 1e3,
            "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))] * 1e3, "runs": repeats}


# --- phases ---------------------------------------------------------------------------------------

def export_model(config: Path, engine_dir: Path, dtype: str, log) -> dict:
    from vv_export.checkpoint import byte_level_tokenizer_json, random_model
    from vv_export.onnx_export import export_onnx

    t = time.perf_counter()
    loaded = random_model(json.loads(config.read_text()), seed=0, source="random-full-size(vibevoice-1.5b, seed=0)")
    loaded.tokenizer_json = byte_level_tokenizer_json()  # stand-in: the release ships none
    export_onnx(loaded, engine_dir, dtype=dtype, validate=False, force=True, progress=False)
    seconds = time.perf_counter() - t
    log(f"exported the full-size random model in {seconds:.0f} s -> {engine_dir}")
    del loaded
    gc.collect()
    return {"export_s": round(seconds, 1), "dtype": dtype}


def bench_backend(name: str, backend, manifest: dict, batches, prompt: int, context: int, repeats: int, log,
                  sync) -> dict:
    out = {}
    for b in batches:
        row = {}
        for case, (graph, dims) in cases(manifest, b, prompt, context).items():
            if case == "acoustic_encoder" and b != batches[0]:
                continue
            feeds = feeds_for(manifest, graph, dims)
            try:
                row[case] = timed(lambda: backend.run(graph, feeds), repeats if case != "lm_prefill" else
                                  max(3, repeats // 4), sync=sync)
            except Exception as exc:
                row[case] = {"error": one_line(exc)}
        frame = [row.get(c, {}).get("median_ms") for c in ("lm_decode", *FRAME_GRAPHS)]
        row["per_frame_ms"] = sum(frame) if all(v is not None for v in frame) else None
        out[str(b)] = row
        log(f"[{name}] batch {b}: per frame {row['per_frame_ms'] or float('nan'):.2f} ms "
            f"(lm decode {row.get('lm_decode', {}).get('median_ms', float('nan')):.2f} ms)")
    return out


def bench_torch(config: Path, manifest: dict, batches, prompt: int, context: int, repeats: int, dtype: str,
                log, device: str = "cuda") -> dict:
    """The exporter's wrapper modules (what the graphs were exported from), eager on the GPU."""
    import torch

    from vv_export.checkpoint import random_model
    from vv_export.specs import ExportContext, build_specs

    device = torch.device(device)
    tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    loaded = random_model(json.loads(config.read_text()), seed=0)  # the exported weights (same seed)
    loaded.token_ids = {k: int(v) for k, v in manifest["tokens"].items()}
    loaded.model.to(device)
    ctx = ExportContext(loaded, diffusion_steps=int(manifest["diffusion"]["steps"]))
    specs = {s.name: s for s in build_specs(ctx)}
    modules = {}
    out = {}
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    with torch.inference_mode():
        for b in batches:
            row = {}
            for case, (graph, dims) in cases(manifest, b, prompt, context).items():
                if case == "acoustic_encoder" and b != batches[0]:
                    continue
                try:
                    if graph not in modules:
                        modules[graph] = specs[graph].build(ctx).eval().to(device=device, dtype=tdtype)
                    module = modules[graph]
                    feeds = feeds_for(manifest, graph, dims)
                    args = []
                    for io in manifest["graphs"][graph]["inputs"]:
                        t = torch.from_numpy(feeds[io["name"]]).to(device)
                        args.append(t.to(tdtype) if t.is_floating_point() else t)

                    def call(module=module, args=args):
                        # host in, host out, like the runtime's backends
                        result = module(*args)
                        result = result if isinstance(result, tuple) else (result,)
                        return [r.float().cpu() for r in result]

                    row[case] = timed(call, repeats if case != "lm_prefill" else max(3, repeats // 4), sync=sync)
                except Exception as exc:
                    row[case] = {"error": one_line(exc)}
            frame = [row.get(c, {}).get("median_ms") for c in ("lm_decode", *FRAME_GRAPHS)]
            row["per_frame_ms"] = sum(frame) if all(v is not None for v in frame) else None
            out[str(b)] = row
            log(f"[pytorch-{dtype}] batch {b}: per frame {row['per_frame_ms'] or float('nan'):.2f} ms")
    del modules, loaded, ctx, specs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def bench_generate(name: str, engine_dir: Path, manifest: dict, backend, batches, frames: int, log) -> dict:
    """Pipeline.generate, every step forced to speech_diffusion, B copies of the demo script."""
    from vv_runtime.pipeline import Pipeline

    script = (REPO / "examples" / "podcast.txt").read_text() if (REPO / "examples" / "podcast.txt").exists() \
        else "Speaker 1: Hello there.\nSpeaker 2: Hi!"
    voices = [str(p) for p in sorted((REPO / "examples").glob("voice_*.wav"))] or None
    column = manifest["control_tokens"].index("speech_diffusion")
    pipe = Pipeline(engine_dir, manifest, ForcedDiffusion(backend, column))
    hop = int(manifest["model"]["hop_length"])
    out = {}
    for b in batches:
        try:
            rows = pipe.prepare([script] * b, voices)
            pipe.generate(rows, max_new_frames=2, seed=0)  # warm-up (CUDA graphs captured, kernels loaded)
            gen = pipe.generate(rows, max_new_frames=frames, seed=0, stream=True)
            stamps, start = [], time.perf_counter()
            while True:
                try:
                    next(gen)
                    stamps.append(time.perf_counter())
                except StopIteration as stop:
                    result = stop.value
                    break
            wall = time.perf_counter() - start
            made = max(result.frames) if result.frames else 0
            # chunks come B per step: steady-state time per step from the first to the last chunk
            steps = max(made - 1, 1)
            per_step = (stamps[-1] - stamps[b - 1]) / steps if len(stamps) > b else None
            audio_s = made * hop / SAMPLE_RATE
            out[str(b)] = {"frames_per_row": made, "prompt_tokens": len(rows[0].prompt.input_ids), "wall_s": wall,
                           "seconds_per_step": per_step, "time_to_first_audio_s": stamps[0] - start if stamps else None,
                           "rtf_per_row": wall / audio_s if audio_s else None,
                           "rtf_batch": wall / (audio_s * b) if audio_s else None}
            log(f"[{name} generate] batch {b}: {per_step * 1e3 if per_step else float('nan'):.1f} ms/step, "
                f"rtf {out[str(b)]['rtf_per_row'] or float('nan'):.3f} per row")
        except Exception as exc:
            out[str(b)] = {"error": one_line(exc)}
            log(f"[{name} generate] batch {b}: {one_line(exc)}")
    return out


def speedups(table: dict, fast: str, slow: str) -> dict:
    """batch -> case -> slow's latency / fast's latency (> 1: `fast` is faster)."""
    out = {}
    for b, row in table.get(slow, {}).items():
        ref = table.get(fast, {}).get(b, {})
        entry = {}
        for case, value in row.items():
            mine = value if case == "per_frame_ms" else (value or {}).get("median_ms") if isinstance(value, dict) else None
            theirs = ref.get(case)
            theirs = theirs if case == "per_frame_ms" else (theirs or {}).get("median_ms") if isinstance(theirs, dict) else None
            if mine and theirs:
                entry[case] = round(mine / theirs, 2)
        out[b] = entry
    return out


def run(args, log=print) -> tuple[dict, bool]:

    env = preflight()
    result = {"benchmark": "bench_gpu", "environment": env, "machine": machine_info(), "versions": versions(),
              "settings": {"plan": args.plan, "precision": args.precision, "batches": args.batches,
                           "prompt": args.prompt, "context": args.context, "frames": args.frames,
                           "repeats": args.repeats, "torch_dtype": args.torch_dtype},
              "latency": {}, "generate": {}, "errors": {}}
    ok = True
    work = Path(tempfile.mkdtemp(prefix="vv-bench-gpu-"))
    try:
        engine_dir = Path(args.engine_dir) if args.engine_dir else work / "full"
        if not (engine_dir / "manifest.json").exists():
            result["export"] = export_model(args.config, engine_dir, args.dtype, log)
        from vv_export.trt_build import build_engines
        from vv_runtime.manifest import load_manifest

        t = time.perf_counter()
        summary = build_engines(engine_dir, plan=args.plan, precision=args.precision, progress=log)
        result["trt_build"] = {"seconds": round(time.perf_counter() - t, 1), "plan_hash": summary["plan_hash"],
                               "engines": {g: {k: e.get(k) for k in ("precision", "size_bytes", "build_seconds", "status")}
                                           for g, e in summary["engines"].items()}}
        manifest = load_manifest(engine_dir)
        result["model"] = {k: manifest["model"][k] for k in ("hidden_size", "num_layers", "vocab_size",
                                                              "max_position_embeddings")}
        import torch

        sync = torch.cuda.synchronize

        sections = [("pytorch", None), ("tensorrt", "trt"), ("ort_cuda", "ort")]
        for name, kind in sections:
            try:
                if kind is None:
                    result["latency"][f"pytorch_{args.torch_dtype}"] = bench_torch(
                        args.config, manifest, args.batches, args.prompt, args.context, args.repeats,
                        args.torch_dtype, log)
                    continue
                if kind == "ort" and not env["ort_cuda"]:
                    result["errors"][name] = "onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)"
                    continue
                if kind == "trt":
                    from vv_runtime.trt_backend import TrtBackend

                    backend = TrtBackend(engine_dir, manifest, notice=log)
                else:
                    from vv_runtime.backend import OrtBackend

                    backend = OrtBackend(engine_dir, manifest, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
                try:
                    result["latency"][name] = bench_backend(name, backend, manifest, args.batches, args.prompt,
                                                            args.context, args.repeats, log, sync)
                    result["generate"][name] = bench_generate(name, engine_dir, manifest, backend, args.batches,
                                                              args.frames, log)
                finally:
                    backend.close()
                    del backend
                    gc.collect()
                    torch.cuda.empty_cache()
            except Exception as exc:
                ok = False
                result["errors"][name] = one_line(exc)
                log(f"[{name}] failed: {one_line(exc)}")
                if args.debug:
                    traceback.print_exc()
        base = f"pytorch_{args.torch_dtype}"
        result["speedup_vs_pytorch"] = {k: speedups(result["latency"], k, base)
                                        for k in ("tensorrt", "ort_cuda") if k in result["latency"]}
        if "tensorrt" in result["latency"] and "ort_cuda" in result["latency"]:
            result["speedup_trt_vs_ort_cuda"] = speedups(result["latency"], "tensorrt", "ort_cuda")
        ok = ok and not any(isinstance(v, dict) and "error" in v for side in result["generate"].values()
                            for v in side.values())
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return result, ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help=f"directory for {RESULT_NAME}")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="original-layout config (1.5B)")
    parser.add_argument("--engine-dir", default=None, help="reuse this ENGINE_DIR (exported when absent)")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="ONNX weight storage")
    parser.add_argument("--plan", default="default")
    parser.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default=None,
                        help="TensorRT precision of every graph (default: the plan's)")
    parser.add_argument("--torch-dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",") if x], default=[1, 4, 16])
    parser.add_argument("--prompt", type=int, default=512, help="prefill tokens")
    parser.add_argument("--context", type=int, default=1024, help="past positions of a decode step")
    parser.add_argument("--frames", type=int, default=32, help="frames per row in the generate runs")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--keep", action="store_true", help="keep the temporary ENGINE_DIR")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    if not args.engine_dir and not args.config.exists():
        print(f"bench_gpu: {args.config} not found (give --config or --engine-dir)", file=sys.stderr)
        return 2
    try:
        result, ok = run(args)
    except Unavailable as exc:
        print(f"bench_gpu: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if args.debug:
            raise
        print(f"bench_gpu: failed: {one_line(exc)}", file=sys.stderr)
        return 1
    if args.out is not None:
        print(f"wrote {write_result(args.out, RESULT_NAME, result)}")
    for b in map(str, args.batches):
        cols = []
        for name, table in result["latency"].items():
            v = table.get(b, {}).get("per_frame_ms")
            cols.append(f"{name} {v:.2f} ms" if v else f"{name} -")
        print(f"batch {b:>2}: per frame  " + "  ".join(cols))
    for name, err in result["errors"].items():
        print(f"{name}: {err}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
