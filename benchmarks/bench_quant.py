"""fp32, int8, int4 and mixed ONNX Runtime + OpenVINO ENGINE_DIRs on the CPU side by side with PyTorch, in one run.

    python benchmarks/bench_quant.py --model tiny|mid|full [--threads 2] [--frames 16] [--repeats 3]
                                     [--rounds 1] [--modes fp32,int8,int4,int8+openvino] [--baselines ...]
                                     [--out benchmarks/results]

The model is `tiny` (the shared fixture: a quick check of the benchmark itself, its figures say nothing) or a
random one of the real architecture: `mid` is bench_runtime's 104 M-parameter model, `full` the
VibeVoice-1.5B config (`shared/reference/vibevoice-1.5b-original-config.json`, as bench_export; it needs
~16 GB of RAM for the export and 15+ minutes of two cores). It is exported once per mode (`vv-export onnx`
with `--quantize none|int8|int4`: each graph quantized only where it stays within its tolerance and is
faster here, decided at export on this CPU; mode `int8+openvino` adds `--runtimes ort,openvino`: each graph
the loop calls served by OpenVINO where that is faster here within its tolerance, the chosen mix; left out
with a note where OpenVINO is not installed). Then each side runs in its own process (its peak memory is
then its own; VmHWM of the process), the ONNX Runtime sides interleaved: --rounds rounds, each running every
mode's side once (--repeats timed generations each), in a rotated order; a side's figures are the medians
over its rounds:

- `ort-<mode>`: `vv_runtime.pipeline.Pipeline` on the ENGINE_DIR (its OpenVINO graphs included);
- `transformers`: transformers' own `VibeVoiceForConditionalGeneration.generate` (fp32 eager, the
  prompt's token ids, audio token forced; bench_gpu's helpers on the CPU) -- the issue's baseline;
- `torch`: `benchmarks/torch_reference.py`, the original generation loop on the same transformers model
  (bench_runtime's baseline; it streams, so its first audio is comparable).

Every run has the same prompt (the shared fixture's script and voice, tokenized by the model's
tokenizer), the same noise, the same cfg and the same thread count, and every step forced to
speech_diffusion (exactly --frames frames; one LM step for the positive rows, one for the negative rows,
the sampler, the decoder and the semantic encoder per frame). Figures (median of --repeats timed runs
after a warm-up run): ms per frame (steady state, between the first and last chunk), RTF (wall / audio
seconds), time to first audio (call to first chunk, voice encoding and prompt prefill included), prompt
prefill (the lm calls of more than one position), peak RSS, ENGINE_DIR size, and for ORT the time per
frame spent in each graph. Speedups are against `torch` in the same run.

Accuracy of the whole generation against fp32 for every mode (in a process of its own): token agreement,
latent and audio error of a forced and a natural generation with the same noise (`quant_report.
generation_report`: the fixture's script, voice and recorded noise for `tiny`, examples/podcast.txt and a
seeded noise table otherwise), reported as benchmarks/quant_report.py does, under `agreement`.

Writes `<out>/bench_quant_<model>.json` and `<out>/bench_quant_<model>.png`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_runtime import _timed  # noqa: E402  (drains a chunk generator with a time stamp per chunk)
from common import FULL_SIZE_CONFIG, ForcedDiffusion, export_key, load_average, provenance, write_result  # noqa: E402

SAMPLE_RATE = 24000
PROMPT_ONLY_GRAPHS = ("text_embed", "acoustic_encoder")  # run for the prompt alone, not per frame
GOAL = {"full": {"ms_per_frame_max": 125.0, "speedup_vs_transformers_min": 12.0}}
OPENVINO_SUFFIX = "+openvino"  # a mode exported with --runtimes ort,openvino
DEFAULT_MODES = "fp32,int8,int4,int8" + OPENVINO_SUFFIX


def export_options(mode: str) -> dict:
    """`export_onnx` options of a mode: fp32, int8, int4, or one of them + OPENVINO_SUFFIX."""
    base = mode[:-len(OPENVINO_SUFFIX)] if mode.endswith(OPENVINO_SUFFIX) else mode
    if base not in ("fp32", "int8", "int4"):
        raise ValueError(f"mode {mode!r}: expected fp32, int8 or int4, optionally with {OPENVINO_SUFFIX}")
    return {"quantize": "none" if base == "fp32" else base,
            "runtimes": "ort,openvino" if mode.endswith(OPENVINO_SUFFIX) else "ort"}


def openvino_installed() -> bool:
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


# --- models ---------------------------------------------------------------------------------------------

def load_model(name: str):
    if name in ("tiny", "mid"):
        from bench_runtime import load_model as bench_load

        return bench_load(name)
    if name == "full":
        from vv_export.checkpoint import byte_level_tokenizer_json, perturb_, random_model

        config = json.loads(Path(FULL_SIZE_CONFIG).read_text())
        loaded = random_model(config, seed=0, source="random-full-size(vibevoice-1.5b config, seed=0)")
        loaded.tokenizer_json = byte_level_tokenizer_json()
        perturb_(loaded.model, seed=0)  # realistic activations, as the mid-size and tiny random models
        return loaded
    raise ValueError(f"--model {name}: expected tiny, mid or full")


def describe(name: str) -> str:
    if name == "tiny":
        return "the shared tiny fixture (vibevoice-tiny-original): checks the benchmark, its timings say nothing"
    if name == "mid":
        from bench_runtime import MID_DESCRIPTION

        return MID_DESCRIPTION
    return "VibeVoice-1.5B config (Qwen2 hidden 1536, 28 layers), random weights perturbed like the tiny models"


def _peak_rss_gb() -> float:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1e6
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


# --- one side (runs in its own process) -----------------------------------------------------------------

class GraphTimer:
    """Backend wrapper: seconds spent in each graph, and in lm calls of more than one position (prefill)."""

    def __init__(self, backend):
        self.backend = backend
        self.seconds: dict[str, float] = {}
        self.prefill_s = 0.0

    def run(self, graph, feeds):
        t = time.perf_counter()
        out = self.backend.run(graph, feeds)
        dt = time.perf_counter() - t
        self.seconds[graph] = self.seconds.get(graph, 0.0) + dt
        if graph == "lm" and feeds["inputs_embeds"].shape[1] > 1:
            self.prefill_s += dt
        return out

    def reset(self):
        self.seconds, self.prefill_s = {}, 0.0

    def __getattr__(self, name):
        return getattr(self.backend, name)


def _figures(stamps, start, end, frames, hop):
    audio_s = frames * hop / SAMPLE_RATE
    return {"frames": frames, "wall_s": end - start,
            "ms_per_frame": (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3 if len(stamps) > 1 else None,
            "time_to_first_audio_s": stamps[0] - start if stamps else None,
            "rtf": (end - start) / audio_s if audio_s else None}


def _median(runs: list[dict]) -> dict:
    out = {}
    for k in runs[0]:
        values = [r[k] for r in runs if isinstance(r.get(k), (int, float))]
        out[k] = statistics.median(values) if values else None
    return out


def run_side(side: str, model: str, engine_dir: Path, threads: int, frames: int, repeats: int,
             concurrency: int = 0) -> dict:
    from bench_runtime import fixture_inputs

    script, voice, _, _ = fixture_inputs()
    manifest = json.loads((Path(engine_dir) / "manifest.json").read_text())
    hop = int(manifest["model"]["hop_length"])
    A = int(manifest["model"]["acoustic_vae_dim"])
    cfg = float(manifest["diffusion"]["default_cfg_scale"])
    noise = np.random.default_rng(1234).standard_normal((frames, 1, A)).astype(np.float32)
    runs, per_graph, per_frame, prefill = [], [], [], []
    if side == "transformers":
        import torch

        from bench_gpu import align_generation_tokens, measure_transformers
        from vv_runtime.pipeline import Pipeline

        torch.set_num_threads(threads)
        loaded = load_model(model)
        loaded.token_ids = {k: int(v) for k, v in manifest["tokens"].items()}
        align_generation_tokens(loaded.model, loaded.token_ids)
        pipe = Pipeline.from_engine_dir(engine_dir, backend="ort", threads=1)
        ids = pipe.prepare(script, [voice])[0].prompt.input_ids
        pipe.close()
        out = measure_transformers(loaded.model.eval(), ids, 1, frames, repeats, hop / SAMPLE_RATE,
                                   torch.device("cpu"), int(manifest["diffusion"]["steps"]), cfg)
        if out.get("first_chunk_ms") is not None:
            out["time_to_first_audio_s"] = out["first_chunk_ms"] / 1e3
        return {**out, "peak_rss_gb": _peak_rss_gb(),
                "note": "transformers' VibeVoiceForConditionalGeneration.generate (prompt ids, no voice "
                        "embedding), audio token forced; ms per frame = (frames run - 2-frame run) / (frames - 2); "
                        "first audio = a whole generate() of one frame (it returns audio at the end)"}
    if side == "torch":
        import torch

        from torch_reference import TorchReference
        from vv_runtime.pipeline import Pipeline

        torch.set_num_threads(threads)
        loaded = load_model(model)
        ref = TorchReference(loaded.model, loaded.token_ids, diffusion_steps=int(manifest["diffusion"]["steps"]))
        # the prompt exactly as the runtime builds it (tokenizer from the ENGINE_DIR), then the model alone
        pipe = Pipeline.from_engine_dir(engine_dir, backend="ort", threads=1)
        row = pipe.prepare(script, [voice])[0]
        pipe.close()
        speech = row.voices[0][None, :] if row.voices else None

        def once(n):
            gen = ref.stream(row.prompt.input_ids, row.prompt.speech_input_mask, speech=speech,
                             noise=lambda k: noise[k], cfg_scale=cfg, max_new_tokens=n, force_diffusion=True)
            result, stamps, start, end, _ = _timed(gen)
            return result.frames, stamps, start, end

        once(2)
        for _ in range(repeats):
            n_frames, stamps, start, end = once(frames)
            runs.append(_figures(stamps, start, end, n_frames, hop))
    else:
        from vv_runtime.pipeline import Pipeline

        pipe = Pipeline.from_engine_dir(engine_dir, backend="ort", threads=threads)
        rows = pipe.prepare(script, [voice])
        timer = GraphTimer(ForcedDiffusion(pipe.backend, manifest["control_tokens"].index("speech_diffusion")))
        pipe.backend = timer

        def once(n):
            gen = pipe.generate(rows, cfg_scale=cfg, max_new_frames=n, noise=noise, stream=True)
            result, stamps, start, end, _ = _timed(gen)
            return result.frames[0], stamps, start, end

        once(2)
        for _ in range(repeats):
            timer.reset()
            n_frames, stamps, start, end = once(frames)
            runs.append(_figures(stamps, start, end, n_frames, hop))
            per_graph.append({g: s / n_frames * 1e3 for g, s in timer.seconds.items()})
            # the steady frame: lm decode steps only (no prefill), no prompt-only graph (voice encoding)
            per_frame.append({g: (s - (timer.prefill_s if g == "lm" else 0.0)) / n_frames * 1e3
                              for g, s in timer.seconds.items() if g not in PROMPT_ONLY_GRAPHS})
            prefill.append(timer.prefill_s)
        together = concurrent_scripts(pipe, script, voice, cfg, frames, concurrency, hop,
                                      [r["wall_s"] for r in runs]) if concurrency > 1 else None
        pipe.close()
    out = {**_median(runs), "runs": len(runs), "peak_rss_gb": _peak_rss_gb()}
    if per_graph:
        out["ms_per_frame_by_graph"] = {g: statistics.median(r.get(g, 0.0) for r in per_graph) for g in per_graph[0]}
        out["ms_per_decode_frame_by_graph"] = {g: statistics.median(r.get(g, 0.0) for r in per_frame)
                                               for g in per_frame[0]}
        out["prompt_prefill_ms"] = statistics.median(prefill) * 1e3
    if side == "ort" and concurrency > 1:
        out["concurrency"] = together
    return out


def concurrent_scripts(pipe, script, voice, cfg: float, frames: int, count: int, hop: int, alone_walls) -> dict:
    """`count` copies of the script (forced, `frames` frames each, their own noise) generated together in one
    batch, against the same work one at a time (count x the median whole generation of the timed runs above,
    prefill included): aggregate seconds of audio per second."""
    rows = pipe.prepare([script] * count, [voice])
    start = time.perf_counter()
    result = pipe.generate(rows, cfg_scale=cfg, max_new_frames=frames, seed=7)
    wall = time.perf_counter() - start
    made = sum(result.frames)
    alone = statistics.median(alone_walls) * count
    audio_s = made * hop / SAMPLE_RATE
    return {"scripts": count, "frames_per_script": frames, "frames": made, "wall_s": wall,
            "audio_s_per_s": audio_s / wall, "one_at_a_time_wall_s": alone,
            "one_at_a_time_audio_s_per_s": count * frames * hop / SAMPLE_RATE / alone,
            "speedup_concurrent_vs_one_at_a_time": alone / wall * made / (count * frames),
            "note": "one at a time = scripts x the median whole generation (prefill included) of the timed runs"}


# --- the whole benchmark ----------------------------------------------------------------------------------

def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in Path(d).iterdir() if f.is_file())


def mode_key(model: str, mode: str) -> str:
    config = json.loads(Path(FULL_SIZE_CONFIG).read_text()) if model == "full" else model
    return export_key(config=config, seed=0, mode=mode)


def stale_modes(model: str, work: Path, modes: list[str]) -> list[str]:
    """The modes whose cached ENGINE_DIR under `work` is missing or was made from other code or options."""
    return [m for m in modes if not (work / m / "manifest.json").exists() or not (work / f"{m}.key").exists()
            or (work / f"{m}.key").read_text() != mode_key(model, m)]


def export_all(model: str, work: Path, modes: list[str], threads: int, log) -> dict:
    """Export `modes` into work/<mode>, each with its key file beside it (`stale_modes` reads them)."""
    import torch

    from vv_export.onnx_export import export_onnx

    torch.set_num_threads(threads)
    loaded = load_model(model)
    info = {"parameters": int(sum(p.numel() for p in loaded.model.parameters())), "export_s": {}}
    for mode in modes:
        t = time.perf_counter()
        export_onnx(loaded, work / mode, force=True, progress=False, threads=threads, **export_options(mode))
        (work / f"{mode}.key").write_text(mode_key(model, mode))
        info["export_s"][mode] = time.perf_counter() - t
        log(f"[{model}] exported {mode} in {info['export_s'][mode]:.0f} s")
    info["export_peak_rss_gb"] = _peak_rss_gb()
    return info


def _side_in_subprocess(side, model, engine_dir, threads, frames, repeats, modes=(), concurrency=0) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side", side, "--model", model,
           "--engine-dir", str(engine_dir), "--threads", str(threads), "--frames", str(frames),
           "--repeats", str(repeats), "--modes", ",".join(modes), "--concurrency", str(concurrency)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": tail}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def runtime_summary(engine_dir: Path) -> dict:
    """Which runtime serves each graph the export chose one for: name, precision, times and the reason."""
    manifest = json.loads((Path(engine_dir) / "manifest.json").read_text())
    out = {}
    for g, e in manifest["graphs"].items():
        r = e.get("runtime")
        if r:
            out[g] = {k: r.get(k) for k in ("name", "precision", "shapes", "times_ms", "speedup_vs_onnxruntime",
                                            "weight_bytes", "reason")}
            out[g]["candidates"] = [{k: c.get(k) for k in ("precision", "within_tolerance", "speedup_vs_onnxruntime",
                                                           "validated_max_abs_error", "failure", "skipped")}
                                    for c in r.get("candidates") or []]
    return out


def agreement(model: str, dirs: dict, frames: int, threads: int) -> dict:
    """Whole generations of every mode against fp32 (quant_report.generation_report): tokens, latents, audio."""
    from quant_report import generation_report

    name = "fixture" if model == "tiny" else model
    fp32_runs: dict = {}
    return {mode: generation_report(d, dirs["fp32"], name, frames, threads, fp32_runs)
            for mode, d in dirs.items() if mode != "fp32"}


def _merge_rounds(runs: list[dict]) -> dict:
    """One side's results of several rounds: numbers (and tables of numbers) as their median over the rounds."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    out = dict(ok[-1])
    for key, value in ok[-1].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values = [r[key] for r in ok if isinstance(r.get(key), (int, float))]
            out[key] = statistics.median(values)
        elif isinstance(value, dict) and value and all(isinstance(v, (int, float)) for v in value.values()):
            out[key] = {k: statistics.median([r[key][k] for r in ok if k in r.get(key, {})]) for k in value}
    for run in ok:  # figures measured in one round only (the concurrency pass)
        for key, value in run.items():
            out.setdefault(key, value)
    out["rounds"] = len(ok)
    if len(ok) < len(runs):
        out["failed_rounds"] = [r["error"] for r in runs if "error" in r]
    return out


def quant_summary(engine_dir: Path) -> dict:
    manifest = json.loads((Path(engine_dir) / "manifest.json").read_text())
    out = {}
    for g, e in manifest["graphs"].items():
        q = e.get("quantization")
        if q:
            out[g] = {k: q.get(k) for k in ("status", "method", "bits", "nodes_quantized", "weight_bytes_before",
                                            "weight_bytes_after", "speedup", "timing", "tolerance", "reason")}
            # every candidate tried (both widths for int4): within tolerance (its errors)? how much faster than fp32?
            tried = list(q.get("candidates") or []) + list((q.get("fallback") or {}).get("candidates") or [])
            out[g]["candidates"] = [{k: c.get(k) for k in ("method", "bits", "within_tolerance",
                                                           "validated_max_abs_error", "speedup")} for c in tried]
            if (q.get("fallback") or {}).get("int4_reason"):
                out[g]["int4_reason"] = q["fallback"]["int4_reason"]
    return out


def run_benchmark(model: str, out_dir: Path | None, *, threads: int = 2, frames: int = 16, repeats: int = 3,
                  modes=tuple(DEFAULT_MODES.split(",")), torch_sides=("transformers", "torch"), rounds: int = 1,
                  concurrency: int = 8, work: Path | None = None, log=print) -> dict:
    load_before = load_average()
    modes = list(modes)
    for mode in modes:
        export_options(mode)  # a bad mode: ValueError before anything runs
    if "fp32" not in modes:
        modes.insert(0, "fp32")  # the reference of every comparison
    if not openvino_installed() and any(m.endswith(OPENVINO_SUFFIX) for m in modes):
        log(f"note: OpenVINO is not installed: no {', '.join(m for m in modes if m.endswith(OPENVINO_SUFFIX))} side")
        modes = [m for m in modes if not m.endswith(OPENVINO_SUFFIX)]
    with contextlib.ExitStack() as stack:
        if work is None:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vv-bench-quant-")))
        else:
            tmp = Path(work) / model
            tmp.mkdir(parents=True, exist_ok=True)
        # the export in its own process too: its memory (the torch model, ~16 GB at full size) is gone after it
        due = stale_modes(model, tmp, modes)
        info = {"parameters": None, "export_s": {}, "exports_reused": [m for m in modes if m not in due]}
        if info["exports_reused"]:
            log(f"[{model}] reusing the exports of {', '.join(info['exports_reused'])} in {tmp}")
        if due:
            log(f"[{model}] exporting {', '.join(due)} into {tmp}")
            exported = _side_in_subprocess("export", model, tmp, threads, frames, repeats, due)
            if "error" in exported:
                raise RuntimeError(f"export failed: {exported['error']}")
            info.update(exported)
        dirs = {mode: tmp / mode for mode in modes}
        sides = {}
        per_round: dict[str, list] = {mode: [] for mode in modes}
        for k in range(rounds):
            for mode in modes[k % len(modes):] + modes[:k % len(modes)]:  # rotated: no side always first
                r = _side_in_subprocess("ort", model, dirs[mode], threads, frames, repeats,
                                        concurrency=concurrency if k == 0 else 0)
                r["load_average_1min_after"] = load_average()  # other work on the machine during this side
                per_round[mode].append(r)
                log(f"[{model}] ort-{mode} (round {k + 1}/{rounds}): {r.get('ms_per_frame') or float('nan'):.1f} "
                    f"ms/frame, rtf {r.get('rtf') or float('nan'):.3f}, peak {r.get('peak_rss_gb') or float('nan'):.2f}"
                    f" GB {r.get('error', '')}")
        for mode in modes:
            r = _merge_rounds(per_round[mode])
            r["engine_dir_bytes"] = _dir_bytes(dirs[mode])
            if mode != "fp32":
                r["quantization"] = quant_summary(dirs[mode])
            if mode.endswith(OPENVINO_SUFFIX):
                r["runtimes"] = runtime_summary(dirs[mode])
            sides[f"ort-{mode}"] = r
        accuracy = _side_in_subprocess("agreement", model, tmp, threads, frames, repeats, modes)
        for mode, gen in accuracy.items() if "error" not in accuracy else ():
            log(f"[{model}] {mode} vs fp32: " + "; ".join(
                f"{run} tokens equal {c['tokens_equal']} (agreement {c['token_agreement']:.3f}, first divergence "
                f"{c['first_divergence']})" for run, c in gen.items()))
        for side in torch_sides:
            r = _side_in_subprocess(side, model, dirs[modes[0]], threads, frames, repeats)
            r["load_average_1min_after"] = load_average()
            sides[side] = r
            log(f"[{model}] {side}: {r.get('ms_per_frame') or float('nan'):.1f} ms/frame, "
                f"rtf {r.get('rtf') or float('nan'):.3f}, peak {r.get('peak_rss_gb') or float('nan'):.2f} GB "
                f"{r.get('error', '')}")
    for base in torch_sides:
        base_ms = sides.get(base, {}).get("ms_per_frame")
        base_first = sides.get(base, {}).get("time_to_first_audio_s")
        for name, r in sides.items():
            if name.startswith("ort-") and base_ms and r.get("ms_per_frame"):
                r[f"speedup_per_frame_vs_{base}"] = base_ms / r["ms_per_frame"]
                if base_first and r.get("time_to_first_audio_s"):
                    r[f"speedup_first_audio_vs_{base}"] = base_first / r["time_to_first_audio_s"]
    for name, r in sides.items():
        if name.startswith("ort-") and name != "ort-fp32" and sides.get("ort-fp32", {}).get("ms_per_frame") \
                and r.get("ms_per_frame"):
            r["speedup_per_frame_vs_fp32"] = sides["ort-fp32"]["ms_per_frame"] / r["ms_per_frame"]
    from bandwidth_probe import measure as weight_stream_rates

    # the ceiling of the weight-bound graphs, in this sitting (not for the fixture: its graphs are tiny)
    stream = weight_stream_rates(threads) if model != "tiny" else {}
    if stream:
        log("[weights streamed] " + ", ".join(f"{k} {v['gb_per_s']:.1f} GB/s" for k, v in stream.items()))
    result = {"benchmark": "quant_cpu", "model_name": model, "model": describe(model), **info,
              "weight_stream_gb_per_s": {k: v["gb_per_s"] for k, v in stream.items()},
              "threads": threads, "frames": frames, "repeats": repeats, "diffusion_steps": 10, "hop": 3200,
              "sample_rate": SAMPLE_RATE, "mode": "forced speech_diffusion on every step",
              "rounds": rounds, "sides": sides, "agreement": accuracy,
              "agreement_note": "whole generations of each mode against fp32 (benchmarks/quant_report.py "
                                "generation_report): forced (every step speech_diffusion) and natural (until eos), the "
                                "same noise",
              "sides_note": "each side in its own process; the ONNX Runtime sides interleaved over `rounds` rounds "
                            "(rotated order; figures: medians over the rounds), then the PyTorch baselines; "
                            "peak_rss_gb is that process's VmHWM. PyTorch eager (both baselines, transformers' "
                            "generate most) slows down far more than ONNX Runtime when other processes load the "
                            "cores: compare runs whose load averages are low",
              **provenance(load_average_1min_before=load_before)}
    if model in GOAL:
        best = min((r["ms_per_frame"] for n, r in sides.items() if n.startswith("ort-") and r.get("ms_per_frame")),
                   default=None)
        speed = max((r.get("speedup_per_frame_vs_transformers") or 0 for n, r in sides.items()
                     if n.startswith("ort-")), default=0)
        result["goal"] = {**GOAL[model], "best_ms_per_frame": best, "best_speedup_vs_transformers": speed,
                          "met": bool(best and best <= GOAL[model]["ms_per_frame_max"]
                                      and speed >= GOAL[model]["speedup_vs_transformers_min"])}
    if out_dir is not None:
        write_result(out_dir, f"bench_quant_{model}.json", result)
        plot(result, Path(out_dir) / f"bench_quant_{model}.png")
    return result


def plot(result: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG", file=sys.stderr)
        return None
    sides = {k: v for k, v in result["sides"].items() if v.get("ms_per_frame")}
    names = list(sides)
    together = [n for n in names if sides[n].get("concurrency")]
    fig, axes = plt.subplots(1, 5 if together else 4, figsize=(24 if together else 19, 4.8))
    # ms per frame of every side (log scale: PyTorch eager can be 100x slower)
    ax = axes[0]
    vals = [sides[n]["ms_per_frame"] for n in names]
    ax.bar(range(len(names)), vals, color=["seagreen" if n.startswith("ort-") else "dimgrey" for n in names])
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_ylabel("ms per frame (log)")
    ax.set_title(f"per frame, all sides ({result['threads']} threads)")
    # ORT sides: where the time of a (steady, decode) frame goes, stacked per graph
    ax = axes[1]
    key = "ms_per_decode_frame_by_graph" if any(v.get("ms_per_decode_frame_by_graph") for v in sides.values()) \
        else "ms_per_frame_by_graph"
    names_ort = [n for n in names if sides[n].get(key)]
    graphs = sorted({g for v in sides.values() for g in v.get(key, {})})
    for i, name in enumerate(names_ort):
        v = sides[name]
        by = v[key]
        if by:
            bottom = 0.0
            for j, g in enumerate(graphs):
                ax.bar(i, by.get(g, 0.0), bottom=bottom, color=plt.cm.tab10(j % 10), label=g if i == 0 else None)
                bottom += by.get(g, 0.0)
            rest = v["ms_per_frame"] - bottom
            if rest > 0:
                ax.bar(i, rest, bottom=bottom, color="lightgrey", label="loop" if i == 0 else None)
        ax.text(i, v["ms_per_frame"], f"{v['ms_per_frame']:.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names_ort)), names_ort, rotation=20)
    ax.set_ylabel("ms per frame")
    ax.set_title("ONNX Runtime: ms per frame by graph")
    ax.legend(fontsize=7)
    for ax, key, label in ((axes[2], "time_to_first_audio_s", "time to first audio (s)"),
                           (axes[3], "peak_rss_gb", "peak RSS (GB)")):
        vals = [sides[n].get(key) or 0.0 for n in names]
        ax.bar(range(len(names)), vals, color="steelblue")
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=20)
        ax.set_title(label)
    if together:
        ax = axes[4]
        for i, name in enumerate(together):
            c = sides[name]["concurrency"]
            for dx, key, color, label in ((-0.2, "one_at_a_time_audio_s_per_s", "silver", "one at a time"),
                                          (0.2, "audio_s_per_s", "seagreen", f"{c['scripts']} scripts together")):
                ax.bar(i + dx, c[key], 0.4, color=color, label=label if i == 0 else None)
                ax.text(i + dx, c[key], f"{c[key]:.2f}", ha="center", va="bottom", fontsize=8)
        ax.axhline(1.0, color="firebrick", ls="--", lw=1)
        ax.set_xticks(range(len(together)), together, rotation=20)
        ax.set_ylabel("seconds of audio per second")
        ax.set_title("aggregate throughput")
        ax.legend(fontsize=7)
    fig.suptitle(f"bench_quant, {result['model_name']} model: fp32 / int8 / int4 ONNX Runtime (+ OpenVINO) vs PyTorch")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "mid", "full"], default="mid")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default=DEFAULT_MODES)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds of the ONNX Runtime sides")
    parser.add_argument("--baselines", default="transformers,torch",
                        help="PyTorch sides: transformers (its generate), torch (the original loop port); '' for none")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="scripts generated together once per ONNX Runtime side (aggregate throughput); 0: none")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep the exports here and reuse them while the exporter and options are the same "
                             "(default: a temporary directory)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--side", choices=["ort", "torch", "transformers", "export", "agreement"], default=None,
                        help=argparse.SUPPRESS)
    parser.add_argument("--engine-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side == "export":
        info = export_all(args.model, args.engine_dir, [m for m in args.modes.split(",") if m], args.threads,
                          lambda line: print(line, file=sys.stderr))
        print(json.dumps(info))
        return 0
    if args.side == "agreement":
        modes = [m for m in args.modes.split(",") if m]
        print(json.dumps(agreement(args.model, {m: args.engine_dir / m for m in modes}, args.frames, args.threads)))
        return 0
    if args.side:
        print(json.dumps(run_side(args.side, args.model, args.engine_dir, args.threads, args.frames, args.repeats,
                                  args.concurrency)))
        return 0
    result = run_benchmark(args.model, args.out, threads=args.threads, frames=args.frames, repeats=args.repeats,
                           modes=[m for m in args.modes.split(",") if m], rounds=args.rounds,
                           concurrency=args.concurrency, work=args.work,
                           torch_sides=tuple(b for b in args.baselines.split(",") if b))
    for name, r in result["sides"].items():
        if "error" in r:
            print(f"{name:10s} error: {r['error']}")
            continue
        nan = float("nan")
        print(f"{name:18s} {r.get('ms_per_frame') or nan:8.1f} ms/frame  rtf {r.get('rtf') or nan:.3f}  first audio "
              f"{r.get('time_to_first_audio_s') or nan:.2f} s  prefill {r.get('prompt_prefill_ms') or nan:.0f} ms  "
              f"peak {r.get('peak_rss_gb') or nan:.2f} GB  x{r.get('speedup_per_frame_vs_transformers') or nan:.1f} "
              f"vs transformers, x{r.get('speedup_per_frame_vs_torch') or nan:.1f} vs the loop port")
    if "goal" in result:
        print(f"goal: {result['goal']}")
    if args.out is not None:
        print(f"wrote {args.out / ('bench_quant_' + args.model + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
