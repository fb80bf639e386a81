"""The step-wise scheduler (vv_runtime.scheduler) measured: voice-prefix reuse, continuous batching,
and the per-step cost of long contexts. ONNX Runtime on the CPU.

    python benchmarks/bench_scheduler.py --out benchmarks/results [--models tiny,mid] [--repeats 7]
                                         [--contexts 1024,2048,4096,8192,16384,32768] [--threads N]

Models: the shared tiny fixture checkpoint and the mid-size random model of benchmarks/bench_runtime.py
(Qwen2 hidden 512, 8 layers, ~104M parameters), exported here (fp32) into a temporary directory; the
mid-size model is exported with a 64K-position context (max_position_embeddings 65536, as the 1.5B)
so that long contexts can be measured.

1. `prefix` -- time to first audio of one request at a time through `SpeechEngine` (submit -> first
   chunk), a preset voice of 10 s (75 frames: the prompt's voice section), a short and a longer text:
   - `reuse`: the preset's prompt prefix (system prompt + voice section + text header) has its LM cache
     computed once, when the voice was added; the request prefills only its text;
   - `full`: the same preset voice (already encoded), the whole prompt prefilled;
   - `raw`: the voice sent as audio with the request: encoded, then the whole prompt prefilled.
   The LM is forced to speech_diffusion (benchmarks/common.py ForcedDiffusion), so the first step makes
   the first frame in every mode: the figure is admission + prefill + one diffusion/decoder step.
   Runs of the modes are interleaved; medians over `--repeats` after a warm-up of each.
   `speedup_reuse_vs_full` = full / reuse (same run, same machine load); `request_cpu_s`: CPU seconds
   of the process for the whole one-frame request (the idle engine threads use none), which other work
   on a shared machine disturbs much less than wall time, and `cpu_ratio_full_vs_reuse`.
2. `batching` (mid only) -- N requests submitted together (forced diffusion, F frames each) to an engine
   with max_batch = N (continuous batching) and to one with max_batch = 1 (one at a time): aggregate
   seconds of audio per second and the ratio.
3. `long_context` (mid only) -- one request's scheduler step (one LM decode call over its 2 rows, then
   diffusion, decoder, semantic encoder) with its positive row's cache filled to `ctx - 1` positions
   (random values; the bucket is then exactly `ctx` slots), for each ctx of `--contexts`, in rounds over
   the contexts (so that other load on the machine hits them alike); the LM call is timed apart (a
   timing wrapper on the backend) and the step's process CPU time too. A linear fit a + b * ctx and the
   log-log slope of the upper half (1 = linear) say how the cost grows. Plotted (log-log) in
   bench_scheduler_long_context.png.

Writes `<out>/bench_scheduler.json` (+ the PNG). Every figure is measured in this run; nothing is
carried over from elsewhere.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import ForcedDiffusion, load_average, provenance, write_result  # noqa: E402

RESULT_NAME = "bench_scheduler.json"
PLOT_NAME = "bench_scheduler_long_context.png"
TEXTS = {
    "short": "Speaker 1: Hello, this is a short request.",
    "long": "Speaker 1: " + " ".join(["The service streams the first audio while it keeps writing the rest,"
                                      " so a listener hears the answer almost at once."] * 3),
}
VOICE_SECONDS = 10.0


def _cpu_s() -> float:
    """CPU seconds of this process (all threads): less sensitive than wall time to other work on the machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Timed:
    """Backend wrapper adding up the seconds spent in each graph."""

    def __init__(self, backend):
        self.backend = backend
        self.seconds: dict[str, float] = {}

    def run(self, graph, feeds):
        start = time.perf_counter()
        out = self.backend.run(graph, feeds)
        self.seconds[graph] = self.seconds.get(graph, 0.0) + time.perf_counter() - start
        return out

    def __getattr__(self, name):
        return getattr(self.backend, name)


def export_model(name: str, work: Path, log) -> tuple[Path, int]:
    from vv_export.onnx_export import export_onnx

    import bench_runtime

    t = time.perf_counter()
    if name == "tiny":
        loaded = bench_runtime.load_model("tiny")
    else:
        from vv_export.checkpoint import byte_level_tokenizer_json, perturb_, random_model

        tok = byte_level_tokenizer_json()
        vocab = json.loads(tok)
        cfg = copy.deepcopy(bench_runtime.mid_config(len(vocab["model"]["vocab"]) + len(vocab["added_tokens"])))
        cfg["decoder_config"]["max_position_embeddings"] = 65536
        loaded = random_model(cfg, seed=0, tokenizer_json=tok, source="random-mid(seed=0, 64K context)")
        perturb_(loaded.model, seed=0)
    out = work / name
    export_onnx(loaded, out, dtype="fp32", validate=False, force=True, progress=False)
    params = sum(p.numel() for p in loaded.model.parameters())
    log(f"[{name}] exported in {time.perf_counter() - t:.0f} s ({params / 1e6:.1f}M parameters)")
    del loaded
    return out, int(params)


def preset_voice() -> np.ndarray:
    """A 10 s voice: the fixture's voice recording repeated with a slow gain change (24 kHz)."""
    import bench_runtime

    _, voice, _, _ = bench_runtime.fixture_inputs()
    n = int(VOICE_SECONDS * 24000)
    tiled = np.tile(voice, n // voice.size + 1)[:n]
    gain = 0.6 + 0.4 * np.sin(np.arange(n) / 24000.0 * 1.3)
    return (tiled * gain).astype(np.float32)


def _pipeline(engine_dir: Path, threads: int | None, forced: bool):
    from vv_runtime.pipeline import Pipeline

    pipe = Pipeline.from_engine_dir(engine_dir, backend="ort", threads=threads)
    if forced:
        column = pipe.manifest["control_tokens"].index("speech_diffusion")
        pipe.backend = ForcedDiffusion(pipe.backend, column)
    return pipe


def bench_prefix(engine_dir: Path, threads: int | None, repeats: int, log) -> dict:
    from vv_runtime.service_engine import SpeechEngine, SpeechRequest, VoiceStore

    pipe = _pipeline(engine_dir, threads, forced=True)
    voice = preset_voice()
    store = VoiceStore(pipe)
    t = time.perf_counter()
    store.add(voice, name="preset")
    add_s = time.perf_counter() - t
    reuse = SpeechEngine(pipe, max_batch=1, voices=store, reuse_prefix=True).start()
    full = SpeechEngine(pipe, max_batch=1, voices=store, reuse_prefix=False).start()
    out = {"voice_seconds": VOICE_SECONDS, "voice_add_s": round(add_s, 4), "by_text": {}}
    try:
        for label, text in TEXTS.items():
            modes = {"reuse": (reuse, "preset"), "full": (full, "preset"), "raw": (full, voice)}
            times = {m: [] for m in modes}
            cpu = {m: [] for m in modes}
            for i in range(repeats + 1):
                for mode, (engine, v) in modes.items():
                    before = _cpu_s()
                    handle = engine.submit(SpeechRequest(text, voices=[v], seed=i, max_new_frames=1))
                    handle.audio(timeout=600)
                    used = _cpu_s() - before
                    if i:  # the first round warms every path up
                        times[mode].append(handle.first_audio_s)
                        cpu[mode].append(used)
            prompt = pipe.prompts.build([(0, " " + text.split(":", 1)[1].strip())], [store.get("preset").frames])
            med = {m: statistics.median(v) for m, v in times.items()}
            med_cpu = {m: statistics.median(v) for m, v in cpu.items()}
            out["by_text"][label] = {
                "prompt_tokens": int(len(prompt.input_ids)), "prefix_tokens": int(prompt.prefix_len),
                "text_tokens": int(len(prompt.input_ids) - prompt.prefix_len),
                "time_to_first_audio_s": {m: round(v, 5) for m, v in med.items()},
                "runs_s": {m: [round(x, 5) for x in v] for m, v in times.items()},
                "request_cpu_s": {m: round(v, 5) for m, v in med_cpu.items()},
                "speedup_reuse_vs_full": round(med["full"] / med["reuse"], 3),
                "cpu_ratio_full_vs_reuse": round(med_cpu["full"] / med_cpu["reuse"], 3),
                "speedup_reuse_vs_raw": round(med["raw"] / med["reuse"], 3),
            }
            log(f"  prefix/{label}: first audio reuse {med['reuse'] * 1e3:.1f} ms, full {med['full'] * 1e3:.1f} ms, "
                f"raw {med['raw'] * 1e3:.1f} ms ({med['full'] / med['reuse']:.2f}x; cpu "
                f"{med_cpu['full'] / med_cpu['reuse']:.2f}x)")
    finally:
        reuse.stop(drain=False, timeout=60)
        full.stop(drain=False, timeout=60)
        pipe.close()
    return out


def bench_batching(engine_dir: Path, threads: int | None, counts: list[int], frames: int, log) -> dict:
    from vv_runtime.service_engine import SpeechEngine, SpeechRequest

    pipe = _pipeline(engine_dir, threads, forced=True)
    hop_s = pipe.hop / pipe.sample_rate
    out = {"frames_per_request": frames, "by_concurrency": {}}
    try:
        warm = SpeechEngine(pipe, max_batch=max(counts)).start()
        for h in [warm.submit(SpeechRequest(TEXTS["short"], seed=s, max_new_frames=2)) for s in range(max(counts))]:
            h.audio(timeout=600)
        warm.stop(timeout=60)
        for n in counts:
            row = {}
            for label, max_batch in (("one_at_a_time", 1), ("batched", n)):
                engine = SpeechEngine(pipe, max_batch=max_batch, max_queue=n).start()
                start = time.perf_counter()
                handles = [engine.submit(SpeechRequest(TEXTS["short"], seed=s, max_new_frames=frames))
                           for s in range(n)]
                for h in handles:
                    h.audio(timeout=600)
                wall = time.perf_counter() - start
                engine.stop(timeout=60)
                audio_s = sum(h.frames for h in handles) * hop_s
                assert all(h.frames == frames for h in handles)
                row[label] = {"wall_s": round(wall, 4), "audio_s_per_s": round(audio_s / wall, 4),
                              "ttfa_median_s": round(statistics.median(h.first_audio_s for h in handles), 4)}
            row["throughput_ratio"] = round(row["batched"]["audio_s_per_s"] / row["one_at_a_time"]["audio_s_per_s"], 3)
            out["by_concurrency"][str(n)] = row
            log(f"  batching/{n}: {row['batched']['audio_s_per_s']:.2f} vs {row['one_at_a_time']['audio_s_per_s']:.2f} "
                f"audio s/s ({row['throughput_ratio']:.2f}x)")
    finally:
        pipe.close()
    return out


def bench_long_context(engine_dir: Path, threads: int | None, contexts: list[int], steps: int, log) -> dict:
    from vv_runtime.scheduler import Scheduler
    from vv_runtime.vibevoice_steps import VibeVoiceJob as Job

    pipe = _pipeline(engine_dir, threads, forced=True)
    timed = Timed(pipe.backend)
    pipe.backend = timed
    rng = np.random.default_rng(0)
    scheds = {}
    try:
        for ctx in contexts:
            sched = Scheduler(pipe, max_batch=1)
            job = sched.add(Job(pipe.prepare(TEXTS["short"])[0].prompt, seed=0))
            sched.step()  # admitted: prompt prefilled, first frame made
            job.limit = 10 ** 9
            kv = sched.model.kv
            pos = job.rows[0]
            kv.past(ctx - 1)  # the bucket of exactly ctx slots
            assert sched.shape[1] == ctx, sched.shape
            # the positive row attends ctx - 1 filled positions (random keys/values of a plausible scale)
            view = kv.cache.data[:, :, pos, :, : ctx - 1]
            view[...] = rng.standard_normal(view.shape, dtype=np.float32) * 0.5
            kv.mask[pos, : ctx - 1] = 1
            scheds[ctx] = (sched, job, pos)
        samples = {ctx: {"step_s": [], "lm_s": [], "cpu_s": []} for ctx in contexts}
        for i in range(steps + 1):  # rounds over the contexts, so that load changes hit them alike
            for ctx, (sched, job, pos) in scheds.items():
                job.pos_next = ctx - 1   # stay at this context: rewrite the last slot every step
                sched.model.kv.mask[pos, ctx - 1] = 0
                timed.seconds.clear()
                cpu = _cpu_s()
                start = time.perf_counter()
                sched.step()
                elapsed = time.perf_counter() - start
                if i:
                    samples[ctx]["step_s"].append(elapsed)
                    samples[ctx]["lm_s"].append(timed.seconds.get("lm", 0.0))
                    samples[ctx]["cpu_s"].append(_cpu_s() - cpu)
        rows = []
        for ctx, (sched, _, _) in scheds.items():
            row = {"context": ctx, "cache_slots": int(sched.shape[1]), "rows": int(sched.shape[0]),
                   "cache_bytes": int(sched.model.kv.cache.data.nbytes)}
            row.update({k: round(statistics.median(v), 6) for k, v in samples[ctx].items()})
            rows.append(row)
            log(f"  long_context/{ctx}: step {row['step_s'] * 1e3:.1f} ms (lm {row['lm_s'] * 1e3:.1f} ms, "
                f"cpu {row['cpu_s'] * 1e3:.1f} ms)")
    finally:
        scheds.clear()
        pipe.close()
    x = np.asarray([r["context"] for r in rows], dtype=np.float64)
    fit = {}
    for key in ("step_s", "lm_s", "cpu_s"):
        y = np.asarray([r[key] for r in rows])
        b, a = np.polyfit(x, y, 1)
        pred = a + b * x
        r2 = 1 - float(np.sum((y - pred) ** 2) / np.sum((y - y.mean()) ** 2)) if len(y) > 2 else None
        # log-log slope over the upper half: 1 = linear growth, 2 = quadratic
        upper = x >= np.median(x)
        slope = float(np.polyfit(np.log(x[upper]), np.log(y[upper]), 1)[0]) if upper.sum() >= 2 else None
        fit[key] = {"fixed_s": round(float(a), 6), "per_1k_positions_s": round(float(b) * 1000, 6),
                    "r2": None if r2 is None else round(r2, 4),
                    "loglog_slope_upper_half": None if slope is None else round(slope, 3)}
    first, last = rows[0], rows[-1]
    return {"steps_per_point": steps, "rows": rows, "linear_fit": fit,
            "step_ratio_last_vs_first": round(last["step_s"] / first["step_s"], 3),
            "lm_ratio_last_vs_first": round(last["lm_s"] / first["lm_s"], 3),
            "cpu_ratio_last_vs_first": round(last["cpu_s"] / first["cpu_s"], 3)}


def plot_long_context(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    x = np.asarray([r["context"] for r in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.plot(x, [r["step_s"] * 1e3 for r in rows], "o-", label="scheduler step, wall (LM + diffusion + codecs)")
    ax.plot(x, [r["cpu_s"] * 1e3 for r in rows], "^-", label="scheduler step, process CPU time")
    ax.plot(x, [r["lm_s"] * 1e3 for r in rows], "s--", label="LM decode call, wall")
    lm = np.asarray([r["lm_s"] * 1e3 for r in rows])
    ax.plot(x, lm[-1] * x / x[-1], ":", color="gray", label="linear growth (through the last LM point)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (cache slots of the request)")
    ax.set_ylabel("ms per step (log)")
    ax.set_title("Per-step cost vs context (mid-size 104M, ORT CPU)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_benchmark(out_dir: Path, models=("tiny", "mid"), threads=None, repeats=7,
                  contexts=(1024, 2048, 4096, 8192, 16384, 32768), batch_counts=(1, 2, 4, 8), batch_frames=12,
                  long_steps=7, parts=("prefix", "batching", "long"), log=print) -> dict:
    result = {"benchmark": "scheduler_cpu", "backend": "onnxruntime CPUExecutionProvider", "dtype": "fp32",
              "threads": threads, "repeats": repeats, "load_average_before": load_average(), "models": {}}
    with tempfile.TemporaryDirectory(prefix="vv-bench-sched-") as tmp:
        for name in models:
            engine_dir, params = export_model(name, Path(tmp), log)
            entry = {"parameters": params}
            if "prefix" in parts:
                entry["prefix"] = bench_prefix(engine_dir, threads, repeats, log)
            if name == "mid" and "batching" in parts:
                entry["batching"] = bench_batching(engine_dir, threads, list(batch_counts), batch_frames, log)
            if name == "mid" and "long" in parts:
                entry["long_context"] = bench_long_context(engine_dir, threads, list(contexts), long_steps, log)
            result["models"][name] = entry
    result["load_average_after"] = load_average()
    result.update(provenance())
    out_dir = Path(out_dir)
    path = write_result(out_dir, RESULT_NAME, result)
    if "long_context" in result["models"].get("mid", {}):
        plot_long_context(result["models"]["mid"]["long_context"], out_dir / PLOT_NAME)
    log(f"wrote {path}")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--models", default="tiny,mid")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--contexts", default="1024,2048,4096,8192,16384,32768")
    parser.add_argument("--batch-counts", default="1,2,4,8")
    parser.add_argument("--batch-frames", type=int, default=12)
    parser.add_argument("--parts", default="prefix,batching,long")
    args = parser.parse_args(argv)
    run_benchmark(Path(args.out), models=tuple(args.models.split(",")), threads=args.threads, repeats=args.repeats,
                  contexts=tuple(int(c) for c in args.contexts.split(",")),
                  batch_counts=tuple(int(c) for c in args.batch_counts.split(",")), batch_frames=args.batch_frames,
                  parts=tuple(args.parts.split(",")), log=lambda text: print(text, file=sys.stderr, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
