"""Per-frame time and real-time factor of the runtime (ONNX Runtime, CPU) against a PyTorch reference.

    python benchmarks/bench_runtime.py --out benchmarks/results [--threads 1,2] [--frames N] [--repeats N]

Both sides run the same model, the same prompt, the same noise and the same number of frames, in one
process, with the same thread count (torch.set_num_threads / ORT intra_op_num_threads), for each thread
count of `--threads` (default: 1 and all cores), timed runs of the two sides interleaved so that both
see the same load on the machine:

- ORT: `vv_runtime.pipeline.Pipeline` on an ENGINE_DIR exported here (fp32, validated);
- PyTorch: `benchmarks/torch_reference.py`, a port of the original implementation's generation loop on
  transformers' VibeVoice model (the exporter's model; `tests/test_torch_reference.py` checks that it
  reproduces the shared fixture's tokens and audio).

Models: (1) the shared tiny fixture checkpoint, (2) a mid-size random model of the real architecture
(`mid_config()`: Qwen2 hidden 512, 8 layers; tokenizers with 8 filters and the real depths; 4-layer
diffusion head at hidden 512).

Runs per model:
- `natural` (fixture only): the fixture's script and voice, tokens chosen by the model until eos;
  both sides must generate the same tokens (reported as `tokens_match`).
- `forced`: every step is forced to speech_diffusion (the ORT LM's control logits / the reference's
  token choice), so every step makes one frame and both sides make exactly `--frames` frames. This is the
  per-frame cost of speech: one LM step for the positive rows, one for the negative rows, the
  DPM-Solver loop, the acoustic decoder and the semantic encoder.

Figures (median over `--repeats` timed runs after one warm-up run):
- seconds_per_frame: steady state, (time of the last chunk - time of the first chunk) / (frames - 1)
  (in natural runs this includes the steps between frames that make no audio);
- time_to_first_audio_s: from the generate call (prompt given, voice not yet encoded) to the first chunk;
- wall_s and rtf: whole call / audio seconds (frames * hop / 24 kHz); rtf < 1 is faster than real time;
- cpu_s: process CPU time (user + system) of the call, less sensitive than wall time to other work on
  the machine (but it counts ORT's and torch's spinning worker threads);
- speedup: PyTorch seconds per frame / ORT seconds per frame, at the same thread count
  (`by_threads`) and with each side at its best thread count (`best_thread_count`).

Writes `<out>/bench_runtime_cpu.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import SHARED, ForcedDiffusion, load_average, provenance, write_result  # noqa: E402
from torch_reference import TorchReference  # noqa: E402

FIXTURE = SHARED / "fixtures" / "vibevoice-tiny-original"
RESULT_NAME = "bench_runtime_cpu.json"
SAMPLE_RATE = 24000


def mid_config(vocab_size: int) -> dict:
    """An original-layout config between the tiny fixture and the 1.5B (random weights)."""
    from vv_export.checkpoint import tiny_original_config

    cfg = tiny_original_config(vocab_size)
    for key in ("acoustic_tokenizer_config", "semantic_tokenizer_config"):
        cfg[key].update({"encoder_n_filters": 8, "decoder_n_filters": 8, "encoder_depths": "3-3-3-3-3-3-8"})
    cfg["acoustic_vae_dim"] = cfg["acoustic_tokenizer_config"]["vae_dim"] = 64
    cfg["semantic_vae_dim"] = cfg["semantic_tokenizer_config"]["vae_dim"] = 128
    cfg["acoustic_tokenizer_config"]["fix_std"] = 0.5
    cfg["decoder_config"].update({"hidden_size": 512, "intermediate_size": 1536, "num_attention_heads": 8,
                                  "num_key_value_heads": 2, "num_hidden_layers": 8})
    cfg["diffusion_head_config"].update({"hidden_size": 512, "head_layers": 4, "latent_size": 64})
    return cfg


MID_DESCRIPTION = ("random weights (perturbed like the tiny random models); Qwen2 hidden 512, 8 layers (8 heads, 2 KV heads), intermediate 1536; "
                   "acoustic/semantic tokenizers 8 filters, depths 3-3-3-3-3-3-8, latents 64/128; "
                   "diffusion head hidden 512, 4 layers")


def load_model(name: str):
    from vv_export.checkpoint import byte_level_tokenizer_json, perturb_, random_model
    from vv_export.families import load_checkpoint

    if name == "tiny":
        return load_checkpoint(str(FIXTURE))
    if name == "mid":
        tok = byte_level_tokenizer_json()
        vocab = json.loads(tok)
        size = len(vocab["model"]["vocab"]) + len(vocab["added_tokens"])
        loaded = random_model(mid_config(size), seed=0, tokenizer_json=tok, source="random-mid(seed=0)")
        # as the tiny random models: move every weight off its initial value (layer scales 1e-6, zero biases)
        # so that activations and audio have realistic magnitudes (no denormals, every path matters)
        perturb_(loaded.model, seed=0)
        return loaded
    raise ValueError(name)


def fixture_inputs():
    """The fixture's script, raw voice (24 kHz), its reference.json and reference tensors."""
    from safetensors.numpy import load_file

    ref = json.loads((FIXTURE / "reference.json").read_text())
    tensors = load_file(str(FIXTURE / "reference_outputs.safetensors"))
    return ref["generate"]["script"], np.asarray(tensors["generate.voice_wav_raw"], dtype=np.float32), ref, tensors


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timed(chunks):
    """Drain a chunk generator; returns (StopIteration value, [time of each chunk], start, end, cpu seconds)."""
    stamps = []
    cpu = _cpu_s()
    start = time.perf_counter()
    while True:
        try:
            next(chunks)
            stamps.append(time.perf_counter())
        except StopIteration as stop:
            end = time.perf_counter()
            return stop.value, stamps, start, end, _cpu_s() - cpu


def _figures(stamps, start, end, cpu, frames, hop):
    audio_s = frames * hop / SAMPLE_RATE
    wall = end - start
    return {"frames": frames, "wall_s": wall, "cpu_s": cpu,
            "seconds_per_frame": (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else None,
            "wall_per_frame_s": wall / frames if frames else None,
            "time_to_first_audio_s": stamps[0] - start if stamps else None,
            "rtf": wall / audio_s if audio_s else None}


def _median(runs: list[dict]) -> dict:
    out = {}
    for k in runs[0]:
        values = [r[k] for r in runs if isinstance(r[k], (int, float))]
        if not values:
            out[k] = None
        elif all(isinstance(v, int) for v in values):
            out[k] = statistics.median_low(values)
        else:
            out[k] = statistics.median(values)
    out["runs"] = len(runs)
    return out


def _ratio(sides: dict, key: str) -> float | None:
    """PyTorch / ORT for one figure (> 1: ORT is faster)."""
    a, b = sides["torch"].get(key), sides["ort"].get(key)
    return a / b if a is not None and b else None


def bench_model(name: str, thread_counts: list[int], frames: int, repeats: int, work: Path, log) -> dict:
    import torch

    from vv_export.onnx_export import export_onnx
    from vv_runtime.pipeline import Pipeline

    t = time.perf_counter()
    loaded = load_model(name)
    engine_dir = work / name
    export_onnx(loaded, engine_dir, dtype="fp32", validate=True, force=True, progress=False)
    log(f"[{name}] exported and validated in {time.perf_counter() - t:.0f} s")
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    hop = int(manifest["model"]["hop_length"])
    params = sum(p.numel() for p in loaded.model.parameters())
    diffusion_column = manifest["control_tokens"].index("speech_diffusion")

    ref = TorchReference(loaded.model, loaded.token_ids, diffusion_steps=int(manifest["diffusion"]["steps"]))
    script, voice, fixture_ref, fixture_tensors = fixture_inputs()
    A = int(manifest["model"]["acoustic_vae_dim"])
    forced_noise = np.random.default_rng(1234).standard_normal((frames, 1, A)).astype(np.float32)
    # natural runs (fixture only): the fixture's own noise and settings, so both sides should make its tokens
    natural_noise = fixture_tensors["generate.noise"][:, :1]
    natural_cap = int(fixture_ref["generate"]["max_new_tokens"])
    cfg = float(manifest["diffusion"]["default_cfg_scale"])
    modes = [("forced", frames)] + ([("natural", natural_cap)] if name == "tiny" else [])

    out = {"parameters": int(params),
           "engine_dir_bytes": sum(f.stat().st_size for f in engine_dir.iterdir() if f.is_file()),
           "by_threads": {}}
    for threads in thread_counts:
        torch.set_num_threads(threads)
        pipe = Pipeline.from_engine_dir(engine_dir, backend="ort", threads=threads)
        row = pipe.prepare(script, [voice])
        prompt = row[0].prompt
        speech = row[0].voices[0][None, :] if row[0].voices else None
        out.update({"prompt_tokens": int(len(prompt.input_ids)), "voice_frames": list(prompt.voice_frames)})

        def run_ort(n_frames, forced):
            table = forced_noise if forced else natural_noise
            natural_backend = pipe.backend
            if forced:
                pipe.backend = ForcedDiffusion(natural_backend, diffusion_column)
            try:
                gen = pipe.generate(row, cfg_scale=cfg, max_new_frames=n_frames, noise=table, stream=True)
                result, stamps, start, end, cpu = _timed(gen)
            finally:
                pipe.backend = natural_backend
            return result.tokens[0], result.frames[0], (stamps, start, end, cpu), result.audio[0]

        def run_torch(n_frames, forced):
            table = forced_noise if forced else natural_noise
            gen = ref.stream(prompt.input_ids, prompt.speech_input_mask, speech=speech, noise=lambda k: table[k],
                             cfg_scale=cfg, max_new_tokens=n_frames, force_diffusion=forced)
            result, stamps, start, end, cpu = _timed(gen)
            return result.tokens, result.frames, (stamps, start, end, cpu), result.audio

        per_mode = {}
        for mode, n in modes:
            forced = mode == "forced"
            runners = {"ort": run_ort, "torch": run_torch}
            for runner in runners.values():
                runner(min(n, 2), forced)  # warm-up
            runs = {side: [] for side in runners}
            last = {}
            for _ in range(repeats):  # interleaved, so that both sides see the same machine load
                for side, runner in runners.items():
                    tokens, n_frames, timing, audio = runner(n, forced)
                    runs[side].append(_figures(*timing, n_frames, hop))
                    last[side] = (tokens, n_frames, audio)
            sides = {side: {**_median(runs[side]), "tokens": last[side][0], "steps": len(last[side][0])}
                     for side in runners}
            (t_ort, f_ort, a_ort), (t_pt, f_pt, a_pt) = last["ort"], last["torch"]
            entry = {"ort": sides["ort"], "torch": sides["torch"], "tokens_match": t_ort == t_pt,
                     "frames_match": f_ort == f_pt,
                     "speedup_per_frame": _ratio(sides, "seconds_per_frame"),
                     "speedup_wall": _ratio(sides, "wall_s"),
                     "speedup_first_audio": _ratio(sides, "time_to_first_audio_s")}
            if not forced:
                expected = fixture_ref["generate"]["generated_tokens"]
                entry["prompt_matches_fixture"] = (prompt.input_ids.tolist()
                                                   == fixture_tensors["generate.input_ids"][0].tolist())
                entry["tokens_match_fixture"] = {"ort": t_ort == expected, "torch": t_pt == expected}
            if a_ort.shape == a_pt.shape and a_pt.size:
                entry["audio_max_abs_diff"] = float(np.abs(a_ort - a_pt).max())
                entry["audio_peak"] = float(np.abs(a_pt).max())
            per_mode[mode] = entry
            spf = {side: (sides[side]["seconds_per_frame"] or float("nan")) * 1e3 for side in sides}
            log(f"[{name}/{mode}/{threads} thread(s)] ORT {spf['ort']:.1f} ms/frame, PyTorch {spf['torch']:.1f} "
                f"ms/frame ({entry['speedup_per_frame'] or float('nan'):.2f}x), {sides['ort']['frames']} frames in "
                f"{sides['ort']['steps']} steps, tokens match: {entry['tokens_match']}")
        out["by_threads"][str(threads)] = per_mode
        if hasattr(os, "getloadavg"):  # other work on the machine while measuring
            out.setdefault("load_average_1min_after", {})[str(threads)] = round(os.getloadavg()[0], 2)
        pipe.close()

    # each side at its best thread count
    best = {}
    for mode, _ in modes:
        pick = {}
        for side in ("ort", "torch"):
            t_best = min(out["by_threads"], key=lambda t: out["by_threads"][t][mode][side]["seconds_per_frame"] or 1e9)
            pick[side] = {"threads": int(t_best), **{k: out["by_threads"][t_best][mode][side][k] for k in
                          ("seconds_per_frame", "rtf", "time_to_first_audio_s", "wall_s")}}
        best[mode] = {**pick, "speedup_per_frame": _ratio(pick, "seconds_per_frame"),
                      "speedup_wall": _ratio(pick, "wall_s")}
    out["best_thread_count"] = best
    return out


def run_benchmark(out_dir: Path | None = None, *, models=("tiny", "mid"), thread_counts=None,
                  frames: int = 24, repeats: int = 5, log=print) -> dict:
    cores = os.cpu_count() or 1
    thread_counts = list(thread_counts or sorted({1, cores}))
    load_before = load_average()
    results = {}
    with tempfile.TemporaryDirectory(prefix="vv-bench-runtime-") as tmp:
        for name in models:
            results[name] = bench_model(name, thread_counts, frames, repeats, Path(tmp), log)
    descriptions = {"tiny": "shared fixture vibevoice-tiny-original (Qwen2 hidden 64, 2 layers)", "mid": MID_DESCRIPTION}
    for name in results:
        results[name]["model"] = descriptions[name]
    tiny = results.get("tiny", {})
    same_threads = {t: tiny["by_threads"][t]["forced"]["speedup_per_frame"] for t in tiny.get("by_threads", {})}
    result = {
        "benchmark": "runtime_cpu",
        "backend": "onnxruntime CPUExecutionProvider (vv_runtime.pipeline.Pipeline) vs PyTorch eager "
                   "(benchmarks/torch_reference.py)",
        "dtype": "fp32",
        "thread_counts": thread_counts,
        "threads_note": "both sides get the same count: torch.set_num_threads(n) and "
                        "Pipeline.from_engine_dir(threads=n) (ORT intra_op_num_threads=n, inter_op 1)",
        "frames": frames,
        "repeats": repeats,
        "hop": 3200,
        "sample_rate": SAMPLE_RATE,
        "diffusion_steps": 10,
        "goal": ">= 3x faster per frame than PyTorch at tiny size on this CPU",
        "goal_tiny_speedup_per_frame_same_threads": same_threads,
        "goal_met": bool(same_threads) and all((v or 0) >= 3.0 for v in same_threads.values()),
        "models": results,
        **provenance(load_average_1min_before=load_before),
    }
    if out_dir is not None:
        write_result(out_dir, RESULT_NAME, result)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="directory for bench_runtime_cpu.json")
    parser.add_argument("--threads", default=None,
                        help="comma-separated thread counts, each given to both sides (default: 1 and all cores)")
    parser.add_argument("--frames", type=int, default=24, help="frames per forced run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per side (after one warm-up)")
    parser.add_argument("--models", default="tiny,mid", help="comma-separated: tiny, mid")
    args = parser.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")] if args.threads else None
    result = run_benchmark(args.out, models=tuple(m for m in args.models.split(",") if m), thread_counts=threads,
                           frames=args.frames, repeats=args.repeats)
    for name, r in result["models"].items():
        for t, modes in r["by_threads"].items():
            for mode, e in modes.items():
                ms = {side: (e[side]["seconds_per_frame"] or float("nan")) * 1e3 for side in ("ort", "torch")}
                print(f"{name:5s} {mode:8s} {t} thread(s): ORT {ms['ort']:7.1f} ms/frame (rtf {e['ort']['rtf']:.3f})  "
                      f"PyTorch {ms['torch']:7.1f} ms/frame (rtf {e['torch']['rtf']:.3f})  "
                      f"speedup {e['speedup_per_frame'] or float('nan'):.2f}x  tokens match: {e['tokens_match']}")
    if args.out is not None:
        print(f"wrote {args.out / RESULT_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
