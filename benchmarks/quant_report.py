"""Accuracy of int8/int4 (and mixed ONNX Runtime + OpenVINO) ENGINE_DIRs against fp32: per graph and over
whole generations.

    python benchmarks/quant_report.py --model fixture|random|mid|DIR [--tokenizer DIR] [--modes int8,int4]
                                      [--runtimes ort,openvino] [--select all|measure] [--frames 16]
                                      [--threads 2] [--out DIR]
    python benchmarks/quant_report.py --engine-dir QUANTIZED --reference-dir FP32 [--out DIR]

With --model the checkpoint (or a built-in model: the shared tiny fixture, the tiny random demo model,
the mid-size random model of bench_runtime) is exported once in fp32 and once per mode (validated; with
`--select all`, the default here, every graph is quantized wherever it stays within its tolerance,
whatever its speed, so that the report shows the accuracy of every quantized graph; `--select
measure` is what `vv-export onnx --quantize` does). `--runtimes ort,openvino` exports every mode with
OpenVINO candidates too (`vv-export onnx --runtimes`, chosen as --select says: `all` takes OpenVINO wherever
a candidate is within tolerance), the mode then named `<mode>+openvino` (`none+openvino`: fp32 ONNX graphs,
OpenVINO where it was chosen). With --engine-dir an existing quantized or mixed ENGINE_DIR is compared with
an existing fp32 one of the same checkpoint.

Reported:
- per graph: status and method (manifest), the runtime that serves it (manifest `runtime`: ONNX Runtime or
  OpenVINO, its precision and the reason), and the error of the stored graph against the fp32 PyTorch
  outputs saved at export (ENGINE_DIR/validation), for the fp32 and the quantized graph and, where OpenVINO
  serves it, for the OpenVINO IR (`served_vs_torch`): max abs error, the reference's peak, their ratio,
  and the graph's stated tolerance;
- whole generations, quantized vs fp32 ENGINE_DIR, the same prompt, voice, noise and cfg:
  `forced` (every step forced to speech_diffusion: exactly --frames frames, the latents and audio of
  the same frames compared) and `natural` (tokens chosen by the model until eos or the cap): token
  agreement (positions equal / positions compared, first divergence), frames, latent error (max abs /
  peak over the frames both made, before any token divergence) and audio error (max abs / peak, SNR in dB).

Quality of speech from REAL weights is not something random weights can show: run this on your
checkpoint (`--model /path/to/VibeVoice-1.5B --tokenizer /path/to/qwen`) and listen to both outputs.
Writes `<out>/quant_report_<name>.json` when --out is given.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import REPO, SHARED, ForcedDiffusion, provenance, write_result  # noqa: E402

FIXTURE = SHARED / "fixtures" / "vibevoice-tiny-original"


# --- models and exports -----------------------------------------------------------------------------

def load_model(name: str, tokenizer: str | None = None):
    from vv_export.checkpoint import tiny_random_model
    from vv_export.families import load_checkpoint

    if name == "fixture":
        return load_checkpoint(str(FIXTURE))
    if name == "random":
        return tiny_random_model(seed=0)
    if name == "mid":
        from bench_runtime import load_model as bench_load

        return bench_load("mid")
    return load_checkpoint(name, tokenizer_dir=tokenizer)


OPENVINO_SUFFIX = "+openvino"  # a mode exported with --runtimes ort,openvino


def mode_key(mode: str, runtimes: str = "ort") -> str:
    """The report's name of a mode: int8, int4, or int8+openvino (none+openvino) with OpenVINO candidates."""
    return mode + (OPENVINO_SUFFIX if "openvino" in runtimes.split(",") else "")


def export_set(loaded, work: Path, modes, select: str = "all", threads: int | None = None, log=print,
               runtimes: str = "ort") -> dict:
    """fp32 and one ENGINE_DIR per mode of the same loaded model: {"fp32": dir, "int8": dir, ...}; with
    `runtimes` "ort,openvino" the modes' keys are `mode_key`s (OpenVINO chosen as `select` says)."""
    from vv_export.onnx_export import export_onnx

    dirs = {}
    t = time.perf_counter()
    dirs["fp32"] = export_onnx(loaded, work / "fp32", force=True, progress=False, threads=threads)
    log(f"exported fp32 in {time.perf_counter() - t:.0f} s")
    for mode in modes:
        key = mode_key(mode, runtimes)
        t = time.perf_counter()
        dirs[key] = export_onnx(loaded, work / key, force=True, progress=False, threads=threads, quantize=mode,
                                quantize_select=select, runtimes=runtimes, runtime_select=select)
        log(f"exported {key} in {time.perf_counter() - t:.0f} s")
    return dirs


# --- per graph ----------------------------------------------------------------------------------------

def graph_errors(engine_dir: Path, graph: str, threads: int | None = None, served: bool = False) -> dict:
    """Error of the stored graph against the saved PyTorch outputs, per output: max_abs, peak, rel. The ONNX
    graph in ONNX Runtime; with `served`, the graph as the runtime serves it (its OpenVINO IR where the
    manifest names OpenVINO)."""
    import onnxruntime as ort

    from vv_export.validation_data import REFERENCE_RUNNER, load_validation_data

    manifest = json.loads((Path(engine_dir) / "manifest.json").read_text())
    names = [o["name"] for o in manifest["graphs"][graph]["outputs"]]
    if served and (manifest["graphs"][graph].get("runtime") or {}).get("name") == "openvino":
        from vv_runtime.openvino_backend import OpenVinoGraphs

        graphs = OpenVinoGraphs(engine_dir, manifest, [graph], threads=threads)
        run = lambda feeds: graphs.run(graph, feeds)  # noqa: E731
    else:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        session = ort.InferenceSession(str(Path(engine_dir) / manifest["graphs"][graph]["file"]), opts,
                                       providers=["CPUExecutionProvider"])
        run = lambda feeds: dict(zip(names, session.run(names, feeds)))  # noqa: E731
    feeds_list, results = load_validation_data(engine_dir, graph)
    refs = dict(results)[REFERENCE_RUNNER]
    out = {n: {"max_abs": 0.0, "peak": 0.0, "rel": 0.0} for n in names}
    for feeds, ref in zip(feeds_list, refs):
        got_all = run(feeds)
        for name in names:
            got = got_all[name]
            r = np.asarray(ref[name], dtype=np.float64)
            err = float(np.abs(got.astype(np.float64) - r).max()) if r.size else 0.0
            peak = float(np.abs(r).max()) if r.size else 0.0
            o = out[name]
            o["max_abs"] = max(o["max_abs"], err)
            o["peak"] = max(o["peak"], peak)
            o["rel"] = max(o["rel"], err / peak if peak else 0.0)
    return out


def graph_report(quant_dir: Path, fp32_dir: Path, threads: int | None = None) -> dict:
    mq = json.loads((Path(quant_dir) / "manifest.json").read_text())
    report = {}
    for graph, entry in mq["graphs"].items():
        q = entry.get("quantization", {})
        row = {"status": q.get("status", "fp32"), "method": q.get("method"), "bits": q.get("bits"),
               "weight_bytes_before": q.get("weight_bytes_before"), "weight_bytes_after": q.get("weight_bytes_after"),
               "tolerance": entry.get("tolerance"), "fp32_vs_torch": graph_errors(fp32_dir, graph, threads)}
        if row["status"] == "quantized":
            row["quantized_vs_torch"] = graph_errors(quant_dir, graph, threads)
        runtime = entry.get("runtime")
        if runtime:
            row["runtime"] = {k: runtime.get(k) for k in ("name", "precision", "reason", "times_ms",
                                                          "speedup_vs_onnxruntime")}
            if runtime.get("name") == "openvino":
                row["served_vs_torch"] = graph_errors(quant_dir, graph, threads, served=True)
                row["served_tolerance"] = runtime.get("tolerance")
        if q.get("reason"):
            row["reason"] = q["reason"]
        if q.get("speedup"):
            row["speedup_at_export"] = q["speedup"]
        report[graph] = row
    return report


# --- whole generations --------------------------------------------------------------------------------

class Recorder:
    """Backend wrapper keeping every diffusion_sampler latent (the frames' latents, in order)."""

    def __init__(self, backend):
        self.backend = backend
        self.latents = []

    def run(self, graph, feeds):
        out = self.backend.run(graph, feeds)
        if graph == "diffusion_sampler":
            self.latents.append(np.array(out["latent"], dtype=np.float32, copy=True))
        return out

    def __getattr__(self, name):
        return getattr(self.backend, name)


def run_generation(engine_dir: Path, script: str, voices, noise, max_new_frames: int, forced: bool,
                   cfg_scale: float = 1.3, threads: int | None = None) -> dict:
    from vv_runtime.pipeline import Pipeline

    pipe = Pipeline.from_engine_dir(engine_dir, backend="ort", threads=threads)
    try:
        inner = pipe.backend
        if forced:
            inner = ForcedDiffusion(inner, pipe.manifest["control_tokens"].index("speech_diffusion"))
        recorder = Recorder(inner)
        pipe.backend = recorder
        t = time.perf_counter()
        result = pipe.generate(script, voices, cfg_scale=cfg_scale, max_new_frames=max_new_frames, noise=noise)
        wall = time.perf_counter() - t
    finally:
        pipe.close()
    latents = np.concatenate(recorder.latents, axis=0) if recorder.latents else np.zeros((0, 0), np.float32)
    return {"tokens": list(result.tokens[0]), "frames": int(result.frames[0]), "audio": result.audio[0],
            "latents": latents, "wall_s": wall}


def compare_runs(ref: dict, got: dict, hop: int, diffusion_token: int) -> dict:
    """Token agreement, latent and audio error of `got` against `ref` (both run_generation results)."""
    t_ref, t_got = ref["tokens"], got["tokens"]
    n = min(len(t_ref), len(t_got))
    equal = [a == b for a, b in zip(t_ref, t_got)]
    first = next((i for i, e in enumerate(equal) if not e), None)
    agreement = (sum(equal) / max(len(t_ref), len(t_got))) if max(len(t_ref), len(t_got)) else 1.0
    # frames made before the first divergence are the same frames in both runs
    frames_ref = ref["frames"]
    if first is None:
        common = min(frames_ref, got["frames"])
    else:
        common = sum(1 for tok in t_ref[:first] if tok == diffusion_token)
        common = min(common, frames_ref, got["frames"])
    out = {"tokens_equal": t_ref == t_got, "token_agreement": agreement, "first_divergence": first,
           "tokens_compared": n, "steps": [len(t_ref), len(t_got)], "frames": [frames_ref, got["frames"]],
           "frames_compared": int(common)}
    if common:
        lr, lg = ref["latents"][:common], got["latents"][:common]
        peak = float(np.abs(lr).max())
        out["latent_max_abs"] = float(np.abs(lr - lg).max())
        out["latent_rel_peak"] = out["latent_max_abs"] / peak if peak else None
        out["latent_rel_peak_per_frame"] = [float(v) for v in np.abs(lr - lg).reshape(common, -1).max(1) / peak] if peak else None
        out["latent_rel_rms"] = float(np.sqrt(np.mean((lr - lg) ** 2)) / max(np.sqrt(np.mean(lr ** 2)), 1e-30))
        ar, ag = ref["audio"][: common * hop], got["audio"][: common * hop]
        peak = float(np.abs(ar).max())
        diff = ar.astype(np.float64) - ag.astype(np.float64)
        out["audio_max_abs"] = float(np.abs(diff).max())
        out["audio_rel_peak"] = out["audio_max_abs"] / peak if peak else None
        energy = float(np.sum(diff ** 2))
        out["audio_snr_db"] = float(10 * np.log10(np.sum(ar.astype(np.float64) ** 2) / energy)) if energy else None
    return out


def generation_inputs(model: str, acoustic_dim: int, frames: int):
    """(script, voices, forced noise table, natural noise table, natural cap)."""
    import soundfile

    rng = np.random.default_rng(1234)
    forced_noise = rng.standard_normal((frames, 1, acoustic_dim)).astype(np.float32)
    if model == "fixture" and FIXTURE.exists():
        from safetensors.numpy import load_file

        meta = json.loads((FIXTURE / "reference.json").read_text())
        ref = load_file(str(FIXTURE / "reference_outputs.safetensors"))
        voice = np.asarray(ref["generate.voice_wav_raw"], dtype=np.float32)
        cap = int(meta["generate"]["max_new_tokens"])
        noise = np.asarray(ref["generate.noise"][:, :1], dtype=np.float32)
        # the fixture's own noise for its frames; a quantized run may make more frames before eos
        extra = rng.standard_normal((max(cap - noise.shape[0], 0), 1, acoustic_dim)).astype(np.float32)
        return meta["generate"]["script"], [voice], forced_noise, np.concatenate([noise, extra]), cap
    script = (REPO / "examples" / "podcast.txt").read_text()
    voices = [soundfile.read(str(REPO / "examples" / f"voice_{v}.wav"), dtype="float32")[0] for v in "ab"]
    speakers = sorted({line.split(":", 1)[0] for line in script.splitlines() if line.strip()})
    cap = 4 * frames
    natural_noise = np.random.default_rng(99).standard_normal((cap, 1, acoustic_dim)).astype(np.float32)
    return script, voices[: len(speakers)], forced_noise, natural_noise, cap


def generation_report(quant_dir: Path, fp32_dir: Path, model: str, frames: int = 16,
                      threads: int | None = None, fp32_runs: dict | None = None) -> dict:
    manifest = json.loads((Path(fp32_dir) / "manifest.json").read_text())
    hop = int(manifest["model"]["hop_length"])
    script, voices, forced_noise, natural_noise, cap = generation_inputs(model, int(manifest["model"]["acoustic_vae_dim"]),
                                                                         frames)
    cfg = float(manifest["diffusion"]["default_cfg_scale"])
    out = {}
    for mode, noise, n, forced in (("forced", forced_noise, frames, True), ("natural", natural_noise, cap, False)):
        key = (mode, n)
        if fp32_runs is not None and key in fp32_runs:
            ref = fp32_runs[key]
        else:
            ref = run_generation(fp32_dir, script, voices, noise, n, forced, cfg, threads)
            if fp32_runs is not None:
                fp32_runs[key] = ref
        got = run_generation(quant_dir, script, voices, noise, n, forced, cfg, threads)
        out[mode] = {**compare_runs(ref, got, hop, int(manifest["tokens"]["speech_diffusion"])), "max_new_frames": n}
    return out


# --- the command ----------------------------------------------------------------------------------------

def report(quant_dirs: dict, fp32_dir: Path, model: str, frames: int, threads: int | None) -> dict:
    fp32_runs = {}
    modes = {}
    for mode, qdir in quant_dirs.items():
        manifest = json.loads((Path(qdir) / "manifest.json").read_text())
        modes[mode] = {"graphs": graph_report(qdir, fp32_dir, threads),
                       "generation": generation_report(qdir, fp32_dir, model, frames, threads, fp32_runs),
                       "engine_dir_bytes": sum(f.stat().st_size for f in Path(qdir).iterdir() if f.is_file()),
                       "quantize": manifest.get("quantize"), "runtimes": manifest.get("runtimes")}
    return {"benchmark": "quant_report", "model": model, "frames": frames, "modes": modes,
            "fp32_engine_dir_bytes": sum(f.stat().st_size for f in Path(fp32_dir).iterdir() if f.is_file()),
            **provenance()}


def print_report(result: dict) -> None:
    for mode, r in result["modes"].items():
        print(f"== {mode} ({result['model']}): ENGINE_DIR {r['engine_dir_bytes'] / 1e6:.1f} MB "
              f"(fp32 {result['fp32_engine_dir_bytes'] / 1e6:.1f} MB)")
        for graph, g in r["graphs"].items():
            errs = g.get("served_vs_torch") or g.get("quantized_vs_torch") or {}
            worst = max((e["rel"] for e in errs.values()), default=None)
            base = max((e["rel"] for e in g["fp32_vs_torch"].values()), default=0.0)
            text = f"worst err/peak {worst:.4f} (fp32 {base:.1e})" if worst is not None else g.get("reason", "")
            served = g.get("runtime") or {}
            how = (f"openvino {served['precision']}" if served.get("name") == "openvino"
                   else f"{g['status']} {g['method'] or ''}")
            print(f"  {graph:20s} {how:34s} {text}")
        for run, c in r["generation"].items():
            extra = ""
            if c.get("frames_compared"):
                extra = (f", latent err/peak {c['latent_rel_peak']:.4f}, audio err/peak {c['audio_rel_peak']:.4f}"
                         f" (SNR {c['audio_snr_db'] if c['audio_snr_db'] is not None else float('inf'):.1f} dB)")
            print(f"  generation {run:8s} tokens equal: {c['tokens_equal']} (agreement {c['token_agreement']:.3f}, "
                  f"first divergence at step {c['first_divergence']}), frames {c['frames']}{extra}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="fixture, random, mid, or a checkpoint directory / hub id")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory for original checkpoints")
    parser.add_argument("--modes", default="int8,int4")
    parser.add_argument("--runtimes", default="ort", help="ort or ort,openvino (OpenVINO candidates per graph)")
    parser.add_argument("--select", choices=["all", "measure"], default="all")
    parser.add_argument("--engine-dir", type=Path, default=None, help="an existing quantized ENGINE_DIR")
    parser.add_argument("--reference-dir", type=Path, default=None, help="the fp32 ENGINE_DIR of the same model")
    parser.add_argument("--frames", type=int, default=16, help="frames of the forced run (natural: up to 4x)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    from vv_export.errors import ExportError

    try:
        if args.engine_dir is not None:
            if args.reference_dir is None:
                raise SystemExit("error: --engine-dir needs --reference-dir (the fp32 ENGINE_DIR)")
            manifest = json.loads((args.engine_dir / "manifest.json").read_text())
            tried = (manifest.get("runtimes") or {}).get("tried", [])
            mode = mode_key(manifest.get("quantize", "none"), ",".join(tried))
            result = report({mode: args.engine_dir}, args.reference_dir, args.model or "checkpoint",
                            args.frames, args.threads)
            name = args.engine_dir.name
        else:
            if args.model is None:
                raise SystemExit("error: give --model or --engine-dir")
            modes = [m for m in args.modes.split(",") if m]
            with tempfile.TemporaryDirectory(prefix="vv-quant-report-") as tmp:
                dirs = export_set(load_model(args.model, args.tokenizer), Path(tmp), modes, args.select, args.threads,
                                  runtimes=args.runtimes)
                keys = [mode_key(m, args.runtimes) for m in modes]
                result = report({k: dirs[k] for k in keys}, dirs["fp32"], args.model, args.frames, args.threads)
            result["select"] = args.select
            name = Path(args.model).name if args.model not in ("fixture", "random", "mid") else args.model
    except (OSError, ValueError, ExportError) as exc:
        print(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 1
    print_report(result)
    if args.out is not None:
        path = write_result(args.out, f"quant_report_{name}.json", result)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
