"""GPU benchmark: full-size VibeVoice-1.5B (random weights), the project's TensorRT and ONNX Runtime CUDA paths
against PyTorch, all measured in the same run (`make bench-gpu`).

    python benchmarks/bench_gpu.py --out benchmarks/results [--plan bench] [--batches 1,4,16] [--prompt 200]
        [--frames 48] [--repeats 3] [--sides tensorrt,ort_cuda,pytorch_reference,transformers_generate]
        [--engine-dir DIR] [--precision fp16|bf16|fp32] [--torch-dtype bf16,fp32]

Needs an NVIDIA GPU (checked first, by tools/gpu_preflight.py's device check), CUDA torch, TensorRT and
onnxruntime-gpu (`make bench-gpu` installs the pinned stack); without them it exits with status 2 and
one line.

What runs (the same prompt and frame count everywhere; every side keeps its caches on the GPU):
1. Model: a randomly initialised VibeVoice of the released 1.5B config
   (`shared/reference/vibevoice-1.5b-original-config.json`, seed 0; random weights are fine for speed),
   exported to an ENGINE_DIR (fp32 graphs; or --engine-dir), TensorRT engines built with the `bench` plan
   (trt_plans/bench.toml: one LM decode profile per measured batch size, its opt shape the measured rows).
2. Per batch size B (--batches; B scripts of a --prompt-token prompt, every step forced to
   speech_diffusion so that each step makes one frame per script, --frames steps):
   - tensorrt: `Pipeline` on `TrtBackend`: the LM cache on the GPU (DeviceKVCache, bound as past_kv in
     place), LM decode steps and the per-frame graphs replayed as CUDA graphs by the backend;
   - ort_cuda: `Pipeline` on ONNX Runtime's CUDA provider with IOBinding: the LM cache is one CUDA
     buffer (a torch tensor) bound as past_kv by address, new_kv written into a CUDA buffer and
     scattered into the cache on the GPU (`IOBindingOrtBackend` below): no host round trip;
   - pytorch_reference: benchmarks/torch_reference.py (the original loop, batch 1) on the GPU, the B
     scripts one after another (it runs one script at a time);
   - transformers_generate: transformers' `VibeVoiceForConditionalGeneration.generate` on the GPU, B
     scripts batched, a logits processor forcing the audio token (the same frames).
   The two PyTorch sides run in every --torch-dtype (default bf16 and fp32: TensorRT's bench plan is
   reduced precision, LM bf16 and the rest fp16); each figure, speed-up and goal uses the faster dtype
   and says which (`torch_dtype`, `speedup_torch_dtypes`), every dtype's figures under `by_torch_dtype`.
   After the TensorRT side's timed runs its backend's `graph_stats()` (CUDA graph captures, replays and
   plain runs per graph) and notices are recorded (`backends`); the side fails when LM decode or a
   per-frame graph never replayed a CUDA graph.
   Figures: ms per frame (steady-state wall time of one step, which makes one frame of every script),
   real-time factor per script (ms per frame / 133.3 ms of audio per frame) and aggregate x real time
   (B x 133.3 ms / ms per frame), first-chunk latency (call to first audio chunk, prompt prefill
   included), GPU memory per side (`memory`, each figure labelled in `memory_labels`): device memory in
   use (torch.cuda.mem_get_info, every allocation: TensorRT engines and activations, ONNX Runtime's
   arena, torch) before the side and after its timed runs with its backend alive, their difference,
   torch.cuda.max_memory_allocated (torch tensors only) and nvidia-smi's used memory at the same moment.
3. Speed-ups of tensorrt (and ort_cuda) over each other side at each B, each labelled with what both
   sides computed in (`speedup_precisions`: the engines' precisions by graph, the ONNX graphs' dtype, the
   torch dtype), and the goals of issue #7
   (H100, 1.5B): <= 3 ms per frame at batch 1, >= 20x the PyTorch reference, first audio <= 60 ms after
   a 200-token prompt, >= 300x real time at 16 scripts: measured value and "met" (null when not measured).

Writes `<out>/bench_gpu.json` (device, driver, CUDA, TensorRT, torch, ONNX Runtime versions, plan,
every figure) and `<out>/bench_gpu.png`. A side that fails (or a TensorRT side whose CUDA graphs did not
run) is recorded with its one-line error and the exit status is 1.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tools"))
from common import FULL_SIZE_CONFIG, ForcedDiffusion, machine_info, write_result  # noqa: E402

from vv_runtime.kv_cache import TorchKVCache  # noqa: E402 (the ORT-CUDA side's cache: torch imported when made)

RESULT_NAME = "bench_gpu.json"
PLOT_NAME = "bench_gpu.png"
SIDES = ("tensorrt", "ort_cuda", "pytorch_reference", "transformers_generate")
PIPELINE_SIDES = ("tensorrt", "ort_cuda")
TORCH_DTYPES = ("bf16", "fp32", "fp16")
# The PyTorch sides run in both: TensorRT runs the bench plan in reduced precision (LM bf16, the rest
# fp16), so comparing it with fp32 PyTorch alone would flatter it; the speed-ups use the faster dtype.
DEFAULT_TORCH_DTYPES = ("bf16", "fp32")
# issue #7's goals on an H100 for the 1.5B
GOALS = (
    {"name": "ms_per_frame_batch_1", "text": "TensorRT <= 3 ms per frame at batch 1 (RTF <= 0.025)",
     "side": "tensorrt", "batch": 1, "figure": "ms_per_frame", "op": "<=", "target": 3.0},
    {"name": "speedup_vs_pytorch_batch_1", "text": "TensorRT >= 20x the PyTorch reference (per frame, batch 1)",
     "side": "tensorrt", "batch": 1, "figure": "speedup_vs_pytorch_reference", "op": ">=", "target": 20.0},
    {"name": "first_audio_ms", "text": "first audio <= 60 ms after a 200-token prompt (TensorRT, batch 1)",
     "side": "tensorrt", "batch": 1, "figure": "first_chunk_ms", "op": "<=", "target": 60.0},
    {"name": "realtime_x_batch_16", "text": ">= 300x real time aggregate at 16 concurrent scripts (TensorRT)",
     "side": "tensorrt", "batch": 16, "figure": "realtime_x", "op": ">=", "target": 300.0},
)


class Unavailable(Exception):
    """This machine cannot run the benchmark (one line)."""


def one_line(exc: BaseException) -> str:
    return (" ".join(str(exc).split()) or type(exc).__name__)[:400]


# --- preflight and facts -------------------------------------------------------------------------

def preflight() -> dict:
    """The GPU, its driver, CUDA torch, TensorRT and ONNX Runtime's CUDA provider; else Unavailable."""
    import gpu_preflight

    try:
        gpus = gpu_preflight.find_gpus("bench_gpu")
        gpu_preflight.check_driver(gpus, "bench_gpu")
    except gpu_preflight.PreflightError as exc:
        raise Unavailable(str(exc)) from exc
    try:
        import torch
    except ImportError as exc:
        raise Unavailable("error: PyTorch is not installed (run `make bench-gpu`)") from exc
    if not torch.cuda.is_available():
        raise Unavailable(f"error: torch {torch.__version__} sees no CUDA GPU (CUDA build: {torch.version.cuda}); "
                          "run `make bench-gpu`, which installs the CUDA 12 stack")
    try:
        import tensorrt
    except Exception as exc:
        raise Unavailable(f"error: TensorRT is not installed ({type(exc).__name__}); run `make bench-gpu`") from exc
    import onnxruntime as ort

    major, minor = torch.cuda.get_device_capability(0)
    return {"device": torch.cuda.get_device_name(0), "compute_capability": f"sm{major}{minor}",
            "gpu_memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1),
            "driver": gpus[0].get("driver"), "cuda": torch.version.cuda, "tensorrt": tensorrt.__version__,
            "torch": torch.__version__, "onnxruntime": ort.__version__,
            "ort_cuda": "CUDAExecutionProvider" in ort.get_available_providers()}


def versions() -> dict:
    import onnx
    import onnxruntime
    import torch
    import transformers

    import vv_export

    return {"vibevoice_trt": vv_export.__version__, "torch": torch.__version__, "cuda": torch.version.cuda,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__}


def nvidia_smi_used_mib(device: int = 0) -> int | None:
    """Device memory in use (all processes) as nvidia-smi reports it, or None."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i",
                              str(device)], capture_output=True, text=True, timeout=20)
        return int(float(out.stdout.strip().splitlines()[0])) if out.returncode == 0 else None
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


# --- ONNX Runtime with the LM cache on the device ---------------------------------------------------

def _ort_backend_class():
    from vv_runtime.backend import OrtBackend

    class IOBindingOrtBackend(OrtBackend):
        """ONNX Runtime with IOBinding for the LM: the cache stays where `device` is (CUDA on the GPU).

        `kv_cache` returns a TorchKVCache on `device`; an lm call whose past_kv is that tensor binds it by
        address, writes new_kv into a tensor on `device` (returned as such, for the cache's `write`), and
        copies only hidden and control_logits to the host. Every other call runs as in OrtBackend.
        """

        name = "ort-iobinding"

        def __init__(self, engine_dir, manifest, device: str = "cuda", **kw):
            import torch

            self.torch = torch
            self.device = torch.device(device)
            if "providers" not in kw:
                kw["providers"] = (["CUDAExecutionProvider", "CPUExecutionProvider"] if self.device.type == "cuda"
                                   else ["CPUExecutionProvider"])
            super().__init__(engine_dir, manifest, **kw)
            self._ort_device = ("cuda", self.device.index or 0) if self.device.type == "cuda" else ("cpu", 0)
            lm = manifest["graphs"]["lm"]
            self._kv_out = next(o for o in lm["outputs"] if o["name"] == "new_kv")
            self.bound_calls = 0  # lm calls that ran with the cache bound in place

        def kv_cache(self, shape):
            return TorchKVCache(shape, self.device)

        def run(self, graph, feeds):
            torch = self.torch
            if graph != "lm" or not isinstance(feeds.get("past_kv"), torch.Tensor):
                return super().run(graph, feeds)
            session = self._session(graph)
            binding = session.io_binding()
            kind, index = self._ort_device
            past = feeds["past_kv"].contiguous()
            for name, value in feeds.items():
                if name == "past_kv":
                    binding.bind_input(name, kind, index, np.float32, list(past.shape), past.data_ptr())
                else:
                    binding.bind_cpu_input(name, np.ascontiguousarray(value))
            rows, seq = feeds["inputs_embeds"].shape[:2]
            dims = {"batch": rows, "seq": seq}
            shape = [dims[d] if isinstance(d, str) else int(d) for d in self._kv_out["shape"]]
            new_kv = torch.empty(shape, dtype=torch.float32, device=self.device)
            names = self._outputs[graph]
            for name in names:
                if name == "new_kv":
                    binding.bind_output(name, kind, index, np.float32, shape, new_kv.data_ptr())
                else:
                    binding.bind_output(name, "cpu")
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()  # the cache writes before ORT reads it
            session.run_with_iobinding(binding)
            self.bound_calls += 1
            values = binding.get_outputs()
            out = {}
            for name, value in zip(names, values):
                out[name] = new_kv if name == "new_kv" else value.numpy()
            return out

        def describe(self) -> str:
            return f"ort-iobinding[{self.device}]"

    return IOBindingOrtBackend


def IOBindingOrtBackend(engine_dir, manifest, device: str = "cuda", **kw):  # noqa: N802 (a class, built lazily)
    return _ort_backend_class()(engine_dir, manifest, device=device, **kw)


# --- CUDA graphs of the TensorRT side ---------------------------------------------------------------

# the per-frame graphs TrtBackend replays as CUDA graphs (its `per_frame`, where it says)
PER_FRAME_GRAPHS = ("diffusion_sampler", "acoustic_decoder", "semantic_encoder")


def graph_replay_failures(stats: dict | None, per_frame=PER_FRAME_GRAPHS) -> list[str]:
    """What says that TensorRT's CUDA graphs did not run: LM decode ("lm") or a per-frame graph with no
    replay in TrtBackend.graph_stats() ({graph: {"captures", "replays", "plain_runs", "notes", ...}}).
    Empty when every one of them replayed at least one graph."""
    if stats is None:
        return ["TrtBackend.graph_stats() is not available: whether CUDA graphs ran is unknown"]
    failures = []
    for graph in ("lm", *per_frame):
        entry = stats.get(graph)
        if entry is None:
            failures.append(f"{graph}: no graph statistics")
            continue
        if int(entry.get("replays") or 0) > 0:
            continue
        notes = entry.get("notes") or []
        notes = [notes] if isinstance(notes, str) else list(notes)
        failures.append(f"{graph}: no CUDA graph replayed (captures {entry.get('captures', 0)}, plain runs "
                        f"{entry.get('plain_runs', 0)}" + (f"; {' '.join(str(notes[0]).split())[:160]}" if notes
                                                            else "") + ")")
    return failures


def backend_report(backend, notices: list[str]) -> dict:
    """What the benchmark records of a side's backend after its timed runs: its description, its notices,
    and (TensorRT) its CUDA graph statistics."""
    out = {"backend": backend.describe() if hasattr(backend, "describe") else type(backend).__name__,
           "notices": list(notices)}
    stats = getattr(backend, "graph_stats", None)
    if callable(stats):
        out["graph_stats"] = stats()
    return out


# --- prompt -----------------------------------------------------------------------------------------

def fit_script(prepare, tokens: int) -> str:
    """A one-speaker script whose prompt (`prepare([script])[0].prompt`) is the shortest one of at least
    `tokens` ids: a binary search over the number of words."""
    words = ("the quick brown fox jumps over the lazy dog " * (tokens // 4 + 8)).split()

    def length(k: int) -> int:
        return len(prepare(["Speaker 1: " + " ".join(words[:k])])[0].prompt.input_ids)

    lo, hi = 1, len(words)
    while lo < hi:
        mid = (lo + hi) // 2
        if length(mid) < tokens:
            lo = mid + 1
        else:
            hi = mid
    return "Speaker 1: " + " ".join(words[:lo])


def prompt_script(engine_dir, manifest: dict, tokens: int) -> tuple[str, list[int]]:
    """(script, its prompt ids) of about `tokens` ids, with the ENGINE_DIR's tokenizer and prompt template."""
    from vv_runtime.pipeline import prepare_rows
    from vv_runtime.prompt import PromptBuilder

    builder = PromptBuilder.from_manifest(engine_dir, manifest)

    def prepare(scripts):
        return prepare_rows(builder, scripts)

    script = fit_script(prepare, tokens)
    return script, [int(i) for i in prepare([script])[0].prompt.input_ids]


# --- timing -----------------------------------------------------------------------------------------

def figures_from_stamps(start: float, stamps: list[tuple[int, float]], batch: int, frame_s: float) -> dict:
    """Figures of one generation from (row, time) of every chunk: the first chunk's latency and the
    steady-state time of one step (each step makes one chunk per script): from the first step's last
    chunk to the last step's last chunk, over the steps between."""
    if not stamps:
        return {"error": "no audio chunk"}
    per_row: dict[int, list[float]] = {}
    for row, t in stamps:
        per_row.setdefault(row, []).append(t)
    steps = min(len(v) for v in per_row.values())
    step_end = [max(per_row[r][k] for r in per_row) for k in range(steps)]
    out = {"first_chunk_ms": (stamps[0][1] - start) * 1e3, "frames_per_script": steps, "scripts": len(per_row),
           "wall_s": step_end[-1] - start}
    if steps >= 2:
        ms = (step_end[-1] - step_end[0]) / (steps - 1) * 1e3
        out.update(derived(ms, batch, frame_s))
    return out


def derived(ms_per_frame: float, batch: int, frame_s: float) -> dict:
    return {"ms_per_frame": ms_per_frame, "rtf": ms_per_frame / (frame_s * 1e3),
            "realtime_x": batch * frame_s * 1e3 / ms_per_frame}


def median_figures(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1] if runs else {"error": "no run"}
    out = {}
    for key in ok[0]:
        values = [r[key] for r in ok if isinstance(r.get(key), (int, float))]
        if values:
            out[key] = statistics.median(values)
    out["runs"] = len(ok)
    return out


GB = 1e9
MIB = 1 << 20


def memory_figures(before: tuple[int, int] | None, at_peak: tuple[int, int] | None, torch_max_allocated: int | None,
                   smi_used_mib: int | None) -> dict:
    """A side's GPU memory figures, each labelled by how it was measured (bytes in, GB out, 1 GB = 1e9 B).

    before / at_peak: torch.cuda.mem_get_info() (free, total) before the side started and after its timed
    runs with its backend still alive; device_used = total - free counts every allocation on the device
    (TensorRT engines and activations, ONNX Runtime's arena, torch's cache, other processes)."""
    out = {}
    used_before = used_peak = None
    if before is not None:
        used_before = before[1] - before[0]
        out["device_used_before_side_gb"] = round(used_before / GB, 3)
        out["device_total_gb"] = round(before[1] / GB, 3)
    if at_peak is not None:
        used_peak = at_peak[1] - at_peak[0]
        out["device_used_after_timed_runs_gb"] = round(used_peak / GB, 3)
    if used_before is not None and used_peak is not None:
        out["side_device_gb"] = round((used_peak - used_before) / GB, 3)
    if torch_max_allocated is not None:
        out["torch_max_allocated_gb"] = round(torch_max_allocated / GB, 3)
    if smi_used_mib is not None:
        out["nvidia_smi_used_after_timed_runs_gb"] = round(smi_used_mib * MIB / GB, 3)
    return out


MEMORY_LABELS = {
    "device_used_before_side_gb": "torch.cuda.mem_get_info() total - free before the side started (every "
                                  "process; earlier sides' leftovers included)",
    "device_used_after_timed_runs_gb": "torch.cuda.mem_get_info() total - free after the side's timed runs, its "
                                       "backend (engines, execution contexts, CUDA graphs, caches, ONNX Runtime "
                                       "arena) still alive: the side's resident peak, sampled once",
    "side_device_gb": "device_used_after_timed_runs_gb - device_used_before_side_gb: what the side holds",
    "torch_max_allocated_gb": "torch.cuda.max_memory_allocated() during the side: torch tensors only (not "
                              "TensorRT engine weights/activations, not ONNX Runtime's arena)",
    "nvidia_smi_used_after_timed_runs_gb": "nvidia-smi memory.used (every process) at the same moment as "
                                           "device_used_after_timed_runs_gb",
    "device_total_gb": "torch.cuda.mem_get_info() total",
}


class GpuMemory:
    """A side's GPU memory (memory_figures): device use before it, and after its timed runs (`sample`,
    called with the backend alive), torch's peak allocation during it, nvidia-smi at the sample."""

    def __init__(self, torch, device):
        self.torch, self.device = torch, device
        self.before = None
        self.figures = {}

    def __enter__(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats(self.device)
            self.before = self.torch.cuda.mem_get_info(self.device)
        self.figures = {}
        return self

    def sample(self) -> dict:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)
            at_peak = self.torch.cuda.mem_get_info(self.device)
            self.figures = memory_figures(self.before, at_peak, self.torch.cuda.max_memory_allocated(self.device),
                                          nvidia_smi_used_mib(self.device.index or 0))
        return self.figures

    def __exit__(self, *exc):
        return False


def measure_pipeline(pipe, script: str, batch: int, frames: int, repeats: int, frame_s: float, seed: int = 0) -> dict:
    """Pipeline.generate (forced diffusion) of `batch` copies of `script`: median figures over `repeats` runs."""
    rows = pipe.prepare([script] * batch)
    pipe.generate(rows, max_new_frames=frames, seed=seed)  # warm-up: engines, CUDA graphs of every bucket
    runs = []
    for _ in range(repeats):
        stamps = []
        start = time.perf_counter()
        gen = pipe.generate(rows, max_new_frames=frames, seed=seed, stream=True)
        for row, _chunk in gen:
            stamps.append((row, time.perf_counter()))
        runs.append(figures_from_stamps(start, stamps, batch, frame_s))
    out = median_figures(runs)
    out["prompt_tokens"] = len(rows[0].prompt.input_ids)
    return out


def measure_reference(ref, input_ids, batch: int, frames: int, repeats: int, frame_s: float, device,
                      latent_dim: int, cfg: float = 1.3) -> dict:
    """The PyTorch reference loop (batch 1) on `device`, the `batch` scripts one after another: one step of
    the batch (a frame of every script) costs the sum of the scripts' steady-state times per frame."""
    import torch

    rng = np.random.default_rng(0)
    table = rng.standard_normal((frames + 1, 2, latent_dim)).astype(np.float32)
    ids = np.asarray(input_ids, dtype=np.int64)[None, :]

    def one(n_frames: int) -> tuple[float, list[float]]:
        stamps = []
        start = time.perf_counter()
        with torch.device(device):  # the loop's own tensors (masks, positions, noise) on the device too
            gen = ref.stream(ids, noise=lambda k: table[k], cfg_scale=cfg, max_new_tokens=n_frames,
                             force_diffusion=True)
            while True:
                try:
                    next(gen)  # each chunk comes back to the host: the step is complete
                except StopIteration:
                    break
                stamps.append(time.perf_counter())
        return start, stamps

    one(2)  # warm-up
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        first, per_frame, steps = None, 0.0, []
        for _b in range(batch):
            start, stamps = one(frames)
            if first is None and stamps:
                first = (stamps[0] - start) * 1e3
            steps.append(len(stamps))
            if len(stamps) >= 2:
                per_frame += (stamps[-1] - stamps[0]) / (len(stamps) - 1)
        entry = {"first_chunk_ms": first, "frames_per_script": min(steps), "scripts": batch,
                 "wall_s": time.perf_counter() - t0}
        if min(steps) >= 2:
            entry.update(derived(per_frame * 1e3, batch, frame_s))
        runs.append(entry)
    out = median_figures(runs)
    out["prompt_tokens"] = int(ids.shape[1])
    out["note"] = "batch 1 loop: the scripts run one after another"
    return out


def force_token_processor(token_id: int):
    from transformers import LogitsProcessor

    class ForceToken(LogitsProcessor):
        """Every step picks `token_id` (the audio token: one frame per step, like ForcedDiffusion)."""

        def __call__(self, input_ids, scores):
            forced = scores.new_full(scores.shape, float("-inf"))
            forced[:, token_id] = 0.0
            return forced

    return ForceToken()


def align_generation_tokens(model, token_ids: dict) -> None:
    """transformers' generate reads the control tokens from the config: use the manifest's (the exported ones)."""
    for attr, key in (("audio_bos_token_id", "speech_start"), ("audio_eos_token_id", "speech_end"),
                      ("audio_token_id", "speech_diffusion")):
        setattr(model.config, attr, int(token_ids[key]))
    if "eos" in token_ids:
        model.config.eos_token_id = model.generation_config.eos_token_id = int(token_ids["eos"])
    if "pad" in token_ids:
        model.generation_config.pad_token_id = int(token_ids["pad"])


def measure_transformers(model, input_ids, batch: int, frames: int, repeats: int, frame_s: float, device,
                         diffusion_steps: int = 10, cfg: float = 1.3) -> dict:
    """transformers' VibeVoiceForConditionalGeneration.generate, `batch` scripts batched, forced audio token.

    It returns the audio only at the end, so the first chunk's latency is a whole generate() of one
    frame, and ms per frame is (frames-step run - 2-step run) / (frames - 2)."""
    import torch
    from transformers import LogitsProcessorList
    from torch_reference import make_scheduler

    ids = torch.as_tensor(np.tile(np.asarray(input_ids, dtype=np.int64)[None, :], (batch, 1)), device=device)
    mask = torch.ones_like(ids)
    processors = LogitsProcessorList([force_token_processor(int(model.config.audio_token_id))])

    def call(n: int) -> tuple[float, int]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 logits_processor=processors, noise_scheduler=make_scheduler(),
                                 num_diffusion_steps=diffusion_steps, guidance_scale=cfg, do_sample=False,
                                 return_dict_in_generate=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        audio = getattr(out, "audio", None)
        made = int(audio[0].shape[-1]) if audio is not None and len(audio) and audio[0] is not None else 0
        return time.perf_counter() - start, made

    call(2)  # warm-up
    runs = []
    for _ in range(repeats):
        first, _ = call(1)
        short, _ = call(2)
        long, samples = call(frames)
        entry = {"first_chunk_ms": first * 1e3, "frames_per_script": frames, "scripts": batch, "wall_s": long,
                 "audio_samples_per_script": samples}
        if long > short:  # else timing noise swamped the difference: no figure from this run
            entry.update(derived((long - short) / (frames - 2) * 1e3, batch, frame_s))
        runs.append(entry)
    out = median_figures(runs)
    out["prompt_tokens"] = int(len(input_ids))
    out["note"] = "first_chunk_ms: a whole generate() of one frame (it returns audio at the end)"
    return out


# --- summary, goals, plot -------------------------------------------------------------------------

def summarize(result: dict) -> dict:
    """Speed-ups (per frame) between the sides at each batch size, and the goals (measured, met)."""
    table = result.get("results", {})
    speedups = {}
    for b, sides in table.items():
        entry = {}
        for fast in PIPELINE_SIDES:
            mine = (sides.get(fast) or {}).get("ms_per_frame")
            for slow in SIDES:
                theirs = (sides.get(slow) or {}).get("ms_per_frame")
                if slow != fast and mine and theirs:
                    entry[f"{fast}_vs_{slow}"] = round(theirs / mine, 2)
        speedups[b] = entry
    # which dtype each PyTorch side's figure (the faster of those run) was measured in
    basis = {b: {side: (sides.get(side) or {}).get("torch_dtype") for side in SIDES
                 if side not in PIPELINE_SIDES and (sides.get(side) or {}).get("torch_dtype")}
             for b, sides in table.items()}
    goals = []
    for goal in GOALS:
        b = str(goal["batch"])
        if goal["figure"] == "speedup_vs_pytorch_reference":
            value = speedups.get(b, {}).get(f"{goal['side']}_vs_pytorch_reference")
        else:
            value = ((table.get(b) or {}).get(goal["side"]) or {}).get(goal["figure"])
        met = None if value is None else (value <= goal["target"] if goal["op"] == "<=" else value >= goal["target"])
        entry = {"name": goal["name"], "goal": goal["text"], "target": goal["target"], "op": goal["op"],
                 "measured": None if value is None else round(float(value), 4), "met": met}
        if goal["figure"] == "speedup_vs_pytorch_reference":
            entry["pytorch_dtype"] = basis.get(b, {}).get("pytorch_reference")
        failed = (result.get("errors") or {}).get(goal["side"])
        if failed and value is not None:  # measured, but the side failed (e.g. CUDA graphs did not run)
            entry["side_error"] = failed
        goals.append(entry)
    result["speedups"] = speedups
    result["speedup_torch_dtypes"] = {b: v for b, v in basis.items() if v}
    result["speedup_precisions"] = {b: {pair: _pair_precision(result, b, pair) for pair in pairs}
                                    for b, pairs in speedups.items()}
    result["goals"] = goals
    return result


def side_precision(result: dict, side: str, batch: str) -> str:
    """What a side computed in: the TensorRT engines' precisions by graph (`side_precisions.tensorrt`), the
    ONNX graphs' dtype for ONNX Runtime, the torch dtype of a PyTorch side's figure at that batch."""
    recorded = (result.get("side_precisions") or {}).get(side)
    if side == "tensorrt" and isinstance(recorded, dict) and recorded:
        by_precision: dict[str, list[str]] = {}
        for graph, precision in sorted(recorded.items()):
            by_precision.setdefault(str(precision), []).append(graph)
        return "; ".join(f"{p}: {', '.join(graphs)}" for p, graphs in sorted(by_precision.items()))
    if side in PIPELINE_SIDES:
        return str(recorded) if recorded else "unknown"
    return str(((result.get("results") or {}).get(batch, {}).get(side) or {}).get("torch_dtype") or "unknown")


def _pair_precision(result: dict, batch: str, pair: str) -> str:
    fast, slow = pair.split("_vs_", 1)
    return f"{fast} ({side_precision(result, fast, batch)}) over {slow} ({side_precision(result, slow, batch)})"


def plot(result: dict, path: Path) -> Path | None:
    """ms per frame per side and batch size (log scale) with the 3 ms goal, and aggregate x real time."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    table = result.get("results", {})
    batches = sorted(table, key=int)
    sides = [s for s in SIDES if any((table[b].get(s) or {}).get("ms_per_frame") for b in batches)]
    if not batches or not sides:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(sides)
    x = np.arange(len(batches))
    for i, side in enumerate(sides):
        dtype = next(((table[b].get(side) or {}).get("torch_dtype") for b in batches
                      if (table[b].get(side) or {}).get("torch_dtype")), None)
        label = f"{side} ({dtype})" if dtype else side
        ms = [(table[b].get(side) or {}).get("ms_per_frame") or np.nan for b in batches]
        rt = [(table[b].get(side) or {}).get("realtime_x") or np.nan for b in batches]
        ax1.bar(x + i * width - 0.4 + width / 2, ms, width, label=label)
        ax2.bar(x + i * width - 0.4 + width / 2, rt, width, label=label)
    ax1.axhline(3.0, color="k", linestyle="--", linewidth=1, label="goal: 3 ms at batch 1")
    ax2.axhline(300.0, color="k", linestyle="--", linewidth=1, label="goal: 300x at 16")
    for ax, title, label in ((ax1, "ms per frame (one step: a frame of every script)", "ms"),
                             (ax2, "aggregate x real time", "x real time")):
        ax.set_xticks(x, [f"batch {b}" for b in batches])
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    env = result.get("environment", {})
    fig.suptitle(f"VibeVoice-1.5B (random weights) on {env.get('device', '?')}, TensorRT {env.get('tensorrt', '?')}, "
                 f"plan {result.get('settings', {}).get('plan', '?')}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_outputs(result: dict, out_dir) -> list[Path]:
    paths = [write_result(out_dir, RESULT_NAME, result)]
    png = plot(result, Path(out_dir) / PLOT_NAME)
    if png is not None:
        paths.append(png)
    return paths


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


def torch_model(config: Path, manifest: dict, device, dtype: str):
    """The exported model's weights (random_model, seed 0) as transformers' model on `device`."""
    import torch

    from vv_export.checkpoint import random_model

    loaded = random_model(json.loads(config.read_text()), seed=0)
    loaded.token_ids = {k: int(v) for k, v in manifest["tokens"].items()}
    tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    loaded.model.to(device=device, dtype=tdtype).eval()
    align_generation_tokens(loaded.model, loaded.token_ids)
    return loaded


class GraphCheckFailed(Exception):
    """The TensorRT side ran, but LM decode or a per-frame graph never replayed a CUDA graph."""


def fastest(entries: dict) -> dict | None:
    """Of {torch dtype: figures}, the entry with the lowest ms per frame (labelled with its dtype), the
    others under `by_torch_dtype`; None when none has a figure."""
    timed = {d: e for d, e in entries.items() if e.get("ms_per_frame")}
    if not timed:
        return None
    best = min(timed, key=lambda d: timed[d]["ms_per_frame"])
    out = dict(timed[best], torch_dtype=best)
    if len(entries) > 1:
        out["by_torch_dtype"] = {d: dict(e) for d, e in entries.items()}
    return out


def run_sides(args, engine_dir: Path, manifest: dict, device, log) -> tuple[dict, dict, dict, dict]:
    """results[batch][side], memory[label], errors[label], backends[side] for the sides asked for.

    The PyTorch sides run once per --torch-dtype; results[batch][side] is the fastest dtype's figures
    (`torch_dtype` says which; every dtype's under `by_torch_dtype` when there are several), memory and
    errors are keyed "side (dtype)". The TensorRT side fails (errors) when graph_stats() shows that LM
    decode or a per-frame graph never replayed a CUDA graph."""
    import torch

    from vv_runtime.pipeline import Pipeline

    hop, sr = int(manifest["model"]["hop_length"]), int(manifest["model"]["sample_rate"])
    frame_s = hop / sr
    column = manifest["control_tokens"].index("speech_diffusion")
    results = {str(b): {} for b in args.batches}
    memory, errors, backends, shared = {}, {}, {}, {}
    torch_entries: dict[str, dict[str, dict]] = {}  # batch -> dtype -> figures, per PyTorch side
    script, input_ids = prompt_script(engine_dir, manifest, args.prompt)
    torch_sides = [s for s in args.sides if s not in PIPELINE_SIDES]
    runs = [(side, None) for side in args.sides if side in PIPELINE_SIDES]
    runs += [(side, dtype) for dtype in args.torch_dtype for side in torch_sides]  # one model load per dtype
    for index, (side, dtype) in enumerate(runs):
        label = side if dtype is None else f"{side} ({dtype})"
        mem = GpuMemory(torch, device)
        try:
            with mem:
                if dtype is None:
                    notices: list[str] = []

                    def notice(text, notices=notices):
                        notices.append(str(text))
                        log(text)

                    if side == "tensorrt":
                        from vv_runtime.trt_backend import TrtBackend

                        backend = TrtBackend(engine_dir, manifest, notice=notice)
                    else:
                        backend = IOBindingOrtBackend(engine_dir, manifest, device=str(device))
                    try:
                        pipe = Pipeline(engine_dir, manifest, ForcedDiffusion(backend, column))
                        for b in args.batches:
                            results[str(b)][side] = measure_pipeline(pipe, script, b, args.frames, args.repeats,
                                                                     frame_s)
                            log(f"[{side}] batch {b}: {_fmt(results[str(b)][side])}")
                        mem.sample()  # the backend alive: its engines, contexts, graphs and caches count
                        report = backends[side] = backend_report(backend, notices)
                        if hasattr(backend, "bound_calls"):
                            report["bound_calls"] = int(backend.bound_calls)
                        if side == "tensorrt":
                            per_frame = sorted(getattr(backend, "per_frame", None) or PER_FRAME_GRAPHS)
                            failures = graph_replay_failures(report.get("graph_stats"), per_frame)
                            report["cuda_graphs_replayed"] = not failures
                            if failures:
                                raise GraphCheckFailed("CUDA graphs did not run: " + "; ".join(failures))
                    finally:
                        backend.close()
                        del backend
                else:
                    if dtype not in shared:  # one copy for both PyTorch sides
                        shared.clear()
                        gc.collect()
                        shared[dtype] = torch_model(args.config, manifest, device, dtype)
                    loaded = shared[dtype]
                    try:
                        for b in args.batches:
                            if side == "pytorch_reference":
                                from torch_reference import TorchReference

                                ref = TorchReference(loaded.model, loaded.token_ids,
                                                     diffusion_steps=int(manifest["diffusion"]["steps"]))
                                entry = measure_reference(
                                    ref, input_ids, b, args.frames, args.repeats, frame_s, device,
                                    int(manifest["model"]["acoustic_vae_dim"]))
                            else:
                                entry = measure_transformers(
                                    loaded.model, input_ids, b, args.frames, args.repeats, frame_s, device,
                                    diffusion_steps=int(manifest["diffusion"]["steps"]))
                            torch_entries.setdefault(side, {}).setdefault(str(b), {})[dtype] = entry
                            log(f"[{label}] batch {b}: {_fmt(entry)}")
                        mem.sample()
                    finally:
                        del loaded
                        if not any(d == dtype for _s, d in runs[index + 1:]):
                            shared.clear()  # the last PyTorch side of this dtype: free the model
        except Exception as exc:
            errors[label] = one_line(exc)
            log(f"[{label}] failed: {errors[label]}")
            if args.debug:
                traceback.print_exc()
        finally:
            if mem.figures:
                memory[label] = mem.figures
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for side, per_batch in torch_entries.items():
        for b, entries in per_batch.items():
            best = fastest(entries)
            results[b][side] = best if best is not None else dict(next(iter(entries.values())),
                                                                  torch_dtype=next(iter(entries)))
    return results, memory, errors, backends


def _fmt(entry: dict) -> str:
    if "error" in entry:
        return entry["error"]
    ms = entry.get("ms_per_frame")
    return (f"{ms:.2f} ms/frame, {entry.get('realtime_x', float('nan')):.1f}x real time, first chunk "
            f"{entry.get('first_chunk_ms', float('nan')):.1f} ms" if ms else "no steady-state figure")


def run(args, log=print) -> tuple[dict, bool]:
    env = preflight()
    import torch

    device = torch.device("cuda", 0)
    result = {"benchmark": "bench_gpu", "environment": env, "machine": machine_info(), "versions": versions(),
              "settings": {"plan": args.plan, "precision": args.precision, "batches": args.batches,
                           "prompt_tokens": args.prompt, "frames": args.frames, "repeats": args.repeats,
                           "torch_dtype": args.torch_dtype, "sides": args.sides},
              "results": {}, "memory": {}, "errors": {}}
    work = Path(tempfile.mkdtemp(prefix="vv-bench-gpu-"))
    try:
        engine_dir = Path(args.engine_dir) if args.engine_dir else work / "full"
        if not (engine_dir / "manifest.json").exists():
            result["export"] = export_model(args.config, engine_dir, args.dtype, log)
        from vv_runtime.manifest import load_manifest

        if "tensorrt" in args.sides:
            from vv_export.trt_build import build_engines

            t = time.perf_counter()
            summary = build_engines(engine_dir, plan=args.plan, precision=args.precision, progress=log)
            result["trt_build"] = {"seconds": round(time.perf_counter() - t, 1), "plan_hash": summary["plan_hash"],
                                   "engines": {g: {k: e.get(k) for k in ("precision", "size_bytes", "build_seconds",
                                                                          "status")}
                                               for g, e in summary["engines"].items()}}
        manifest = load_manifest(engine_dir)
        result["model"] = {k: manifest["model"][k] for k in ("hidden_size", "num_layers", "vocab_size",
                                                              "max_position_embeddings")}
        # what each side computes in, for the speed-up labels (speedup_precisions)
        result["side_precisions"] = {
            "tensorrt": {g: e.get("precision") for g, e in ((manifest.get("trt") or {}).get("engines") or {}).items()},
            "ort_cuda": f"{manifest.get('dtype', 'fp32')} ONNX graphs"}
        results, memory, errors, backends = run_sides(args, engine_dir, manifest, device, log)
        result.update(results=results, memory=memory, errors=errors, backends=backends)
        result["memory_labels"] = MEMORY_LABELS
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    summarize(result)
    result["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return result, not result["errors"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help=f"directory for {RESULT_NAME} and {PLOT_NAME}")
    parser.add_argument("--config", type=Path, default=FULL_SIZE_CONFIG, help="original-layout config (1.5B)")
    parser.add_argument("--engine-dir", default=None, help="reuse this ENGINE_DIR (exported when absent)")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="ONNX weight storage")
    parser.add_argument("--plan", default="bench", help="TensorRT plan (default: bench, sized to what this measures)")
    parser.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default=None,
                        help="TensorRT precision of every graph (default: the plan's)")
    def dtype_list(text):
        values = [x.strip() for x in text.split(",") if x.strip()]
        bad = [v for v in values if v not in TORCH_DTYPES]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"unknown dtype {bad[0] if bad else text!r} "
                                             f"(known: {', '.join(TORCH_DTYPES)})")
        return list(dict.fromkeys(values))

    parser.add_argument("--torch-dtype", type=dtype_list, default=list(DEFAULT_TORCH_DTYPES),
                        help="dtypes of the PyTorch sides, comma-separated (default bf16,fp32: each side runs in "
                             "both, and the speed-ups and goals use the faster one)")

    def int_list(text):
        try:
            values = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
        if not values or any(v < 1 for v in values):
            raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
        return values

    def side_list(text):
        values = [x.strip() for x in text.split(",") if x.strip()]
        bad = [v for v in values if v not in SIDES]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"unknown side {bad[0] if bad else text!r} (known: {', '.join(SIDES)})")
        return values

    parser.add_argument("--batches", type=int_list, default=[1, 4, 16])
    parser.add_argument("--sides", type=side_list, default=list(SIDES))
    parser.add_argument("--prompt", type=int, default=200, help="prompt tokens (the first-chunk goal: 200)")
    parser.add_argument("--frames", type=int, default=48, help="frames (steps) per script")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the temporary ENGINE_DIR")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    if args.frames < 3:
        parser.error("--frames must be at least 3 (steady-state figures need steps after the first)")
    if args.prompt < 8:
        parser.error("--prompt must be at least 8 tokens")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        # the GPU first: on a machine without one, say so before anything else is looked at
        if not args.engine_dir and not args.config.exists():
            preflight()
            print(f"bench_gpu: {args.config} not found (give --config or --engine-dir)", file=sys.stderr)
            return 2
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
        for path in write_outputs(result, args.out):
            print(f"wrote {path}")
    for b in map(str, args.batches):
        cols = [f"{side} {(result['results'].get(b, {}).get(side) or {}).get('ms_per_frame') or float('nan'):.2f} ms"
                for side in args.sides]
        print(f"batch {b:>2}: per frame  " + "  ".join(cols))
    for goal in result["goals"]:
        print(f"goal {goal['name']}: measured {goal['measured']} (target {goal['op']} {goal['target']}): "
              f"{'met' if goal['met'] else 'not met' if goal['met'] is False else 'not measured'}")
    for name, err in result["errors"].items():
        print(f"{name}: {err}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
