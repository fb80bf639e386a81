"""VibeVoice-Realtime-0.5B on the CPU: ONNX Runtime fp32 and int8 side by side with the PyTorch port of the loop.

    python benchmarks/bench_realtime.py [--model full|tiny] [--threads 2] [--modes fp32,int8,int8+openvino]
                                        [--repeats 3]
                                        [--text TEXT] [--after 6] [--streams 4] [--word-ms 50] [--no-torch]
                                        [--work benchmarks/.cache/realtime] [--fresh] [--out benchmarks/results]

The model is a random one of the real architecture: `full` is VibeVoice-Realtime-0.5B (Qwen2.5-0.5B split into
a 4-layer text LM and a 20-layer TTS LM, the 1.5B's acoustic decoder, a 4-layer diffusion head; the config of
`shared/reference/vibevoice-realtime-0.5b-config.json`, embedded here as FULL_CONFIG), random weights perturbed
like the project's other random models, a byte-level tokenizer; `tiny` the architecture at toy width (tests).
It is exported once per mode (`vv-export onnx`, `--quantize none|int8`; `int8+openvino` adds `--runtimes
ort,openvino`: each graph served by OpenVINO where that was faster within its tolerance when exported here,
bench_quant's mode of the same name) into the work directory, reused while
the config, seed and exporter code stay the same (`--fresh` exports again). Voice: the real preset
`en-Davis_man.pt` (shared/reference/realtime-voices, made for exactly these dimensions) when present, else a
preset in the released format synthesized by the model's own LMs on a short prompt with the positions of the
real one (`synthesize_preset`).

Every side runs in its own worker process with the same threads; the timed runs are interleaved (one run of
each side in turn, the order rotating), with the 1-minute load average taken around each run:

- `ort-<mode>`: `vv_runtime.realtime_pipeline.RealtimePipeline` on the ENGINE_DIR;
- `torch`: `benchmarks/torch_realtime_reference.py`, the original streaming loop on the same weights in
  PyTorch (the same preset, the same text tokens, the same noise).

Every run is forced through the whole text (the end-of-speech classifier ignored): its text windows of 5 tokens
with 6 frames each, then `--after` frames. Figures (median of --repeats runs after a warm-up run):
- ms per frame, steady state (first to last chunk: text windows included, amortized) against the 133 ms of
  audio a frame holds; RTF (wall / audio); speed-up over the port;
- first audio after the first 5 text tokens arrive, with streamed input: a `TextStream` fed word by word every
  --word-ms by a producer thread, the generation started before the first word (ONNX Runtime sides);
- aggregate throughput of --streams concurrent jobs (one `Scheduler` over `RealtimeSteps`) against the same
  jobs one at a time (ONNX Runtime sides);
- the port and ort-fp32 agree on the audio (same weights): max |diff| / peak at the first frame and overall.

Goals (issue 14, full size): int8 <= 60 ms per frame (RTF <= 0.45; judged on the faster of int8 and
int8+openvino), fp32 <= 133 ms (real time), >= 5x the port, first audio <= 150 ms. Writes `<out>/bench_realtime_<model>.json` and `.png`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_quant import (OPENVINO_SUFFIX, GraphTimer, _figures, _median, export_options, openvino_installed,  # noqa: E402
                         quant_summary, runtime_summary)
from bench_runtime import _timed  # noqa: E402  (drains a chunk generator with a time stamp per chunk)
from common import SHARED, load_average, provenance, write_result  # noqa: E402
from common import export_key as common_export_key  # noqa: E402

SAMPLE_RATE = 24000
FULL_CONFIG_FILE = SHARED / "reference" / "vibevoice-realtime-0.5b-config.json"
DAVIS_PRESET = SHARED / "reference" / "realtime-voices" / "en-Davis_man.pt"
DEFAULT_WORK = HERE / ".cache" / "realtime"
SEED = 0
NOISE_SEED = 1234
TEXT = "Hello, this is a realtime speech test."  # byte-level tokens: 39 with the newline, 8 text windows
# positions (text, speech) of a synthesized preset: the real en-Davis_man.pt has 60 text LM positions and
# 183 TTS LM positions (60 text + 123 speech); the tiny fixture's preset 9 and 23
SYNTHETIC_POSITIONS = {"full": (60, 123), "tiny": (9, 14)}
SYNTHETIC_PRESET = "synthetic"
GOAL = {"full": {"int8_ms_per_frame_max": 60.0, "fp32_ms_per_frame_max": 1e3 * 3200 / SAMPLE_RATE,
                 "speedup_vs_torch_min": 5.0, "first_audio_streamed_ms_max": 150.0}}
BUSY_MACHINE = 0.2  # cores other processes may keep busy during a timed run before the figures are suspect
REPLY = "@@bench_realtime@@ "  # prefix of a worker's answer line on its stdout

# VibeVoice-Realtime-0.5B (reconstructed; shared/reference/vibevoice-realtime-0.5b-config.json is the same)
FULL_CONFIG = {
    "model_type": "vibevoice_streaming", "acoustic_vae_dim": 64, "tts_backbone_num_hidden_layers": 20,
    "torch_dtype": "bfloat16",
    "acoustic_tokenizer_config": {
        "causal": True, "channels": 1, "conv_bias": True, "conv_norm": "none", "corpus_normalize": 0.0,
        "decoder_depths": None, "decoder_n_filters": 32, "decoder_ratios": [8, 5, 5, 4, 2, 2],
        "disable_last_norm": True, "encoder_depths": "3-3-3-3-3-3-8", "encoder_n_filters": 32,
        "encoder_ratios": [8, 5, 5, 4, 2, 2], "fix_std": 0.5, "layer_scale_init_value": 1e-06,
        "layernorm": "RMSNorm", "layernorm_elementwise_affine": True, "layernorm_eps": 1e-05,
        "mixer_layer": "depthwise_conv", "model_type": "vibevoice_acoustic_tokenizer", "pad_mode": "constant",
        "std_dist_type": "gaussian", "vae_dim": 64, "weight_init_value": 0.01},
    "decoder_config": {
        "attention_dropout": 0.0, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
        "intermediate_size": 4864, "max_position_embeddings": 8192, "max_window_layers": 24, "model_type": "qwen2",
        "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936},
    "diffusion_head_config": {
        "ddpm_batch_mul": 4, "ddpm_beta_schedule": "cosine", "ddpm_num_inference_steps": 20, "ddpm_num_steps": 1000,
        "diffusion_type": "ddpm", "head_ffn_ratio": 3.0, "head_layers": 4, "hidden_size": 896, "latent_size": 64,
        "model_type": "vibevoice_diffusion_head", "prediction_type": "v_prediction", "rms_norm_eps": 1e-05,
        "speech_vae_dim": 64},
}


# --- the model, its exports and its voice ----------------------------------------------------------------

def full_config() -> dict:
    return json.loads(FULL_CONFIG_FILE.read_text()) if FULL_CONFIG_FILE.exists() else copy.deepcopy(FULL_CONFIG)


def load_model(name: str):
    """The benchmark's random model (the same weights in every process: seeded)."""
    from vv_export.checkpoint import byte_level_tokenizer_json, perturb_
    from vv_export.realtime import SPECIAL_TOKENS, random_realtime_model, tiny_random_realtime_model

    if name == "tiny":
        return tiny_random_realtime_model(seed=SEED)
    if name == "full":
        loaded = random_realtime_model(full_config(), seed=SEED,
                                       tokenizer_json=byte_level_tokenizer_json(extra_special=(SPECIAL_TOKENS["pad"],)),
                                       source=f"random-full-size(vibevoice-realtime-0.5b config, seed={SEED})")
        perturb_(loaded.model, seed=SEED)  # realistic activations, as the project's other random models
        return loaded
    raise ValueError(f"--model {name}: expected full or tiny")


def describe(name: str) -> str:
    if name == "tiny":
        return "VibeVoice-Realtime architecture at toy width (hidden 64, 2 + 2 layers), random weights"
    return ("VibeVoice-Realtime-0.5B config (Qwen2 hidden 896: text LM 4 layers, TTS LM 20 layers; the 1.5B's "
            "acoustic decoder; diffusion head 4 layers), random weights perturbed like the tiny models")


def model_dir(work: Path, model: str) -> Path:
    return Path(work) / model


def export_key(model: str, mode: str) -> str:
    config = full_config() if model == "full" else "tiny_random_realtime_model"
    return common_export_key(config=config, seed=SEED, mode=mode)


def preset_file(work: Path, model: str) -> Path:
    if model == "full" and DAVIS_PRESET.exists():
        return DAVIS_PRESET
    return model_dir(work, model) / "voices" / f"{SYNTHETIC_PRESET}.pt"


def _stale(work: Path, model: str, modes, fresh: bool) -> tuple[list[str], bool]:
    """The modes to export and whether the synthesized preset must be made."""
    base = model_dir(work, model)
    modes_due = [m for m in modes if fresh or not (base / m / "manifest.json").exists()
                 or not (base / f"{m}.key").exists() or (base / f"{m}.key").read_text() != export_key(model, m)]
    preset = preset_file(work, model)
    key = base / "voices" / f"{SYNTHETIC_PRESET}.key"
    preset_due = preset.name == f"{SYNTHETIC_PRESET}.pt" and (
        fresh or not preset.exists() or not key.exists() or key.read_text() != export_key(model, "preset"))
    return modes_due, preset_due


def _released_pickle_module(cache_lists: dict):
    """A pickle module for torch.save that writes presets in the released layout: each DynamicCache (a bare
    instance standing for one) as the `key_cache` / `value_cache` lists transformers 4.51 pickled, each model
    output as BaseModelOutputWithPast(last_hidden_state, past_key_values)."""
    import copyreg
    import pickle
    import types

    from transformers.cache_utils import DynamicCache
    from transformers.modeling_outputs import BaseModelOutputWithPast

    class Pickler(pickle.Pickler):
        def reducer_override(self, obj):
            if type(obj) is DynamicCache:
                keys, values = cache_lists[id(obj)]
                return copyreg.__newobj__, (DynamicCache,), {"key_cache": keys, "value_cache": values}
            if type(obj) is BaseModelOutputWithPast:
                return BaseModelOutputWithPast, (obj.last_hidden_state, obj.past_key_values)
            return NotImplemented

    module = types.ModuleType("released_preset_pickle")
    module.Pickler = Pickler
    return module


def synthesize_preset(loaded, path: Path, text_positions: int, speech_positions: int, seed: int = SEED) -> Path:
    """A voice preset made by the model's own LMs, written in the released `.pt` format (vv_export.voices
    reads it like Microsoft's): the text LM over `text_positions` random byte tokens, the TTS LM over their
    hidden states (type text) then `speech_positions` connector embeddings of random latents (type speech),
    and the negatives over the one pad token, as the original's prompt caches."""
    import torch
    from transformers.cache_utils import DynamicCache
    from transformers.modeling_outputs import BaseModelOutputWithPast

    body = loaded.model.model
    gen = torch.Generator().manual_seed(seed)
    cache_lists: dict = {}

    def run(decoder, embeds):
        cache = DynamicCache(config=decoder.config)
        hidden = decoder(inputs_embeds=embeds, cache=cache, use_cache=True).last_hidden_state
        stand_in = DynamicCache.__new__(DynamicCache)
        cache_lists[id(stand_in)] = ([layer.keys.clone() for layer in cache.layers],
                                     [layer.values.clone() for layer in cache.layers])
        return hidden, stand_in

    def tts(hidden, types):
        return run(body.tts_language_model, hidden + body.tts_input_types(types))

    with torch.no_grad():
        ids = torch.randint(0, 256, (1, text_positions), generator=gen)
        text_hidden, text_cache = run(body.language_model, body.language_model.embed_tokens(ids))
        latents = torch.randn(1, speech_positions, body.diffusion_head.noisy_images_proj.in_features, generator=gen)
        tts_in = torch.cat([text_hidden, body.multi_modal_projector(latents)], dim=1)
        types = torch.cat([torch.ones(1, text_positions), torch.zeros(1, speech_positions)], dim=1).long()
        tts_hidden, tts_cache = tts(tts_in, types)
        pad = torch.tensor([[int(loaded.token_ids["pad"])]])
        neg_hidden, neg_cache = run(body.language_model, body.language_model.embed_tokens(pad))
        neg_tts_hidden, neg_tts_cache = tts(neg_hidden, torch.ones(1, 1, dtype=torch.long))
    content = {name: BaseModelOutputWithPast(last_hidden_state=hidden.contiguous(), past_key_values=cache)
               for name, (hidden, cache) in {"lm": (text_hidden, text_cache), "tts_lm": (tts_hidden, tts_cache),
                                             "neg_lm": (neg_hidden, neg_cache),
                                             "neg_tts_lm": (neg_tts_hidden, neg_tts_cache)}.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(content, tmp, pickle_module=_released_pickle_module(cache_lists))
    os.replace(tmp, path)
    return path


def export_side(model: str, work: Path, modes, threads: int, fresh: bool) -> dict:
    """(In its own process: the torch model's memory is gone after it.) Export the stale modes, make the
    synthesized preset when it is due; the export times."""
    import torch

    from vv_export.onnx_export import export_onnx

    torch.set_num_threads(threads)
    modes_due, preset_due = _stale(work, model, modes, fresh)
    base = model_dir(work, model)
    loaded = load_model(model)
    info = {"parameters": int(sum(p.numel() for p in loaded.model.parameters())), "export_s": {}}
    for mode in modes_due:
        t = time.perf_counter()
        export_onnx(loaded, base / mode, force=True, progress=False, threads=threads, **export_options(mode))
        (base / f"{mode}.key").write_text(export_key(model, mode))
        info["export_s"][mode] = time.perf_counter() - t
    if preset_due:
        synthesize_preset(loaded, preset_file(work, model), *SYNTHETIC_POSITIONS[model])
        (base / "voices" / f"{SYNTHETIC_PRESET}.key").write_text(export_key(model, "preset"))
    return info


def prepare(model: str, work: Path, modes, threads: int, fresh: bool, log) -> dict:
    """The ENGINE_DIR of every mode, exported when stale, with the preset converted into it."""
    from vv_export.voices import convert_voices, read_preset

    base = model_dir(work, model)
    modes_due, preset_due = _stale(work, model, modes, fresh)
    info = {"parameters": None, "export_s": {}, "exports_reused": [m for m in modes if m not in modes_due]}
    if modes_due or preset_due:
        log(f"[{model}] exporting {', '.join(modes_due) or 'no graphs'}"
            f"{' and synthesizing the preset' if preset_due else ''} into {base}")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--side", "export", "--model", model, "--work",
               str(work), "--threads", str(threads), "--modes", ",".join(modes)] + (["--fresh"] if fresh else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        answer = _answer(proc.stdout)
        if proc.returncode != 0 or answer is None or "error" in answer:
            tail = (answer or {}).get("error") or (proc.stderr.strip().splitlines() or ["?"])[-1]
            raise RuntimeError(f"export failed: {tail}")
        info.update(answer)
        for mode, seconds in info["export_s"].items():
            log(f"[{model}] exported {mode} in {seconds:.0f} s")
    voice = preset_file(work, model)
    for mode in modes:
        convert_voices(base / mode, [voice])
    preset = read_preset(voice)
    info["preset"] = {"name": preset.name, "made": "synthesized" if voice.name == f"{SYNTHETIC_PRESET}.pt"
                      else "file", "positions": {k: c.positions for k, c in preset.caches.items()}}
    info["engine_dir_bytes"] = {m: sum(f.stat().st_size for f in (base / m).rglob("*") if f.is_file())
                                for m in modes}
    return info


# --- the sides (each in its own worker process) ------------------------------------------------------------

def noise_table(frames: int, latent_dim: int, seed: int = NOISE_SEED) -> np.ndarray:
    """The start noise of every frame [frames, A], the same on every side."""
    return np.random.default_rng(seed).standard_normal((frames, latent_dim), dtype=np.float32)


class OrtSide:
    """RealtimePipeline on an ENGINE_DIR, its graphs timed."""

    def __init__(self, engine_dir: Path, voice: str, threads: int):
        from vv_runtime.realtime_pipeline import RealtimePipeline

        self.pipe = RealtimePipeline.from_engine_dir(engine_dir, backend="ort", threads=threads)
        self.timer = GraphTimer(self.pipe.backend)
        self.pipe.backend = self.timer
        self.voice = voice
        self.info = {"hop": self.pipe.hop, "latent_dim": self.pipe.facts.latent_dim,
                     "decode_frames": self.pipe.new_steps().decode_frames}

    def tokens(self, text: str) -> dict:
        return {"tokens": self.pipe.text_tokens(text)}

    def run(self, text: str, text_ids, frames: int, save: str | None = None) -> dict:
        noise = noise_table(frames, self.pipe.facts.latent_dim)[:, None, :]
        self.timer.reset()
        gen = self.pipe.generate(text, self.voice, noise=noise, max_new_frames=frames, ignore_eos=True, stream=True)
        result, stamps, start, end, _ = _timed(gen)
        out = _figures(stamps, start, end, result.frames, self.pipe.hop)
        out["ms_per_frame_by_graph"] = {g: s / result.frames * 1e3 for g, s in self.timer.seconds.items()}
        if save:
            np.save(save, result.audio)
        return out

    def first_audio_streamed(self, text: str, word_s: float, frames: int, window: int) -> dict:
        """Text arrives word by word (one every word_s, from a producer thread) into a job started before the
        first word: seconds from the append that made the first `window` tokens final to the first chunk."""
        stream = self.pipe.text_stream()
        words = re.findall(r"\S+\s*", text)
        marks: dict[str, float] = {}

        def produce():
            for word in words:
                time.sleep(word_s)
                before = time.perf_counter()   # taken before the append: the latency is not understated
                marks.setdefault("first_word", before)
                stream.append(word)
                if len(stream.feed.tokens) >= window:
                    marks.setdefault("window", before)
            before = time.perf_counter()
            stream.close()
            marks.setdefault("window", before)

        gen = self.pipe.generate(stream, self.voice, seed=0, max_new_frames=frames, ignore_eos=True, stream=True)
        producer = threading.Thread(target=produce, daemon=True)
        start = time.perf_counter()
        producer.start()
        next(gen)
        first = time.perf_counter()
        gen.close()
        producer.join()
        return {"first_audio_after_window_s": first - marks["window"],
                "first_audio_after_first_word_s": first - marks["first_word"],
                "window_tokens_final_after_s": marks["window"] - start}

    def streams(self, text: str, frames: int, count: int) -> dict:
        """`count` forced jobs one at a time, then together in one Scheduler: aggregate throughput."""
        from vv_runtime.scheduler import Scheduler

        hop_s = self.pipe.hop / SAMPLE_RATE
        start = time.perf_counter()
        made = 0
        for i in range(count):
            made += self.pipe.generate(text, self.voice, seed=i, max_new_frames=frames, ignore_eos=True).frames
        alone_s = time.perf_counter() - start
        sched = Scheduler(self.pipe, max_batch=count)
        jobs = [sched.add(self.pipe.job(text, self.voice, seed=i, max_new_frames=frames, ignore_eos=True))
                for i in range(count)]
        start = time.perf_counter()
        while sched.busy:
            for job in sched.step().finished:
                if job.error is not None:
                    raise job.error
        together_s = time.perf_counter() - start
        together = sum(j.frames for j in jobs)

        def figures(frames_made, wall):
            return {"frames": frames_made, "wall_s": wall, "frames_per_s": frames_made / wall,
                    "audio_s_per_s": frames_made * hop_s / wall}
        out = {"streams": count, "frames_per_stream": frames, "one_at_a_time": figures(made, alone_s),
               "concurrent": figures(together, together_s)}
        out["concurrent"]["rtf_per_stream"] = together_s / (frames * hop_s)
        out["speedup_concurrent_vs_one_at_a_time"] = (out["concurrent"]["frames_per_s"]
                                                      / out["one_at_a_time"]["frames_per_s"])
        return out


class TorchSide:
    """The PyTorch port of the original loop on the same weights and preset."""

    def __init__(self, model: str, voice_file: Path, threads: int):
        import torch

        from torch_realtime_reference import TorchRealtimeReference
        from vv_export.voices import read_preset

        torch.set_num_threads(threads)
        self.port = TorchRealtimeReference.from_loaded(load_model(model))
        self.preset = read_preset(voice_file)
        self.info = {"hop": self.port.hop, "latent_dim": self.port.latent_dim}

    def run(self, text: str, text_ids, frames: int, save: str | None = None) -> dict:
        noise = noise_table(frames, self.port.latent_dim)
        gen = self.port.stream(text_ids, self.preset, noise=lambda k: noise[k], max_new_frames=frames,
                               ignore_eos=True)
        result, stamps, start, end, _ = _timed(gen)
        if save:
            np.save(save, result.audio)
        return _figures(stamps, start, end, result.frames, self.port.hop)


def serve_side(side: str, model: str, work: Path, threads: int) -> int:
    """A worker: builds its side, answers `{"op": ...}` lines from stdin with REPLY lines until `close`."""
    def reply(obj):
        print(REPLY + json.dumps(obj), flush=True)

    try:
        voice = preset_file(work, model)
        if side == "torch":
            impl = TorchSide(model, voice, threads)
        else:
            impl = OrtSide(model_dir(work, model) / side.removeprefix("ort-"), voice.stem, threads)
    except Exception as exc:  # noqa: BLE001 -- reported to the main process in one line
        reply({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    reply({"ready": True, **impl.info})
    for line in sys.stdin:
        command = json.loads(line)
        op = command.pop("op")
        if op == "close":
            reply({})
            break
        try:
            reply(getattr(impl, op)(**command))
        except Exception as exc:  # noqa: BLE001
            reply({"error": f"{type(exc).__name__}: {exc}"})
    return 0


def _answer(stdout: str) -> dict | None:
    lines = [line for line in stdout.splitlines() if line.startswith(REPLY)]
    return json.loads(lines[-1][len(REPLY):]) if lines else None


class Worker:
    """A side's worker process (serve_side), driven line by line; its stderr goes to a log file."""

    def __init__(self, side: str, model: str, work: Path, threads: int, log_dir: Path):
        self.side = side
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{side}.log"
        self._log = open(self.log_path, "w")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--side", side, "--model", model,
                                      "--work", str(work), "--threads", str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     env=env)
        self.info = self._reply()

    def _reply(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(REPLY):
                out = json.loads(line[len(REPLY):])
                if "error" in out:
                    raise RuntimeError(f"{self.side}: {out['error']}")
                return out
        self.proc.wait()
        tail = self.log_path.read_text().strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"{self.side}: the worker ended (exit {self.proc.returncode}: {tail[0]})")

    def call(self, op: str, **args) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.call("close")
                self.proc.wait(timeout=60)
        except (OSError, RuntimeError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            self._log.close()


# --- the whole benchmark -------------------------------------------------------------------------------------

def _busy_cpu_s() -> float | None:
    """CPU seconds the whole machine has been busy (all cores; /proc/stat), where the OS tells."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    guest = sum(fields[8:10]) if len(fields) > 9 else 0        # already counted in user / nice
    return (sum(fields) - idle - guest) / os.sysconf("SC_CLK_TCK")


def _process_cpu_s(pid: int) -> float | None:
    """CPU seconds of process `pid`, all its threads (/proc/<pid>/stat utime + stime)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """How much CPU everything but one worker used while it ran: the measurement's noise, per run."""

    def __init__(self, worker_pid: int):
        self.pid = worker_pid
        self.wall = time.perf_counter()
        self.busy = _busy_cpu_s()
        self.own = _process_cpu_s(worker_pid) if self.busy is not None else None
        self.load = load_average()

    def done(self) -> dict:
        wall = time.perf_counter() - self.wall
        out = {"load_average_before": self.load, "load_average_after": load_average()}
        busy, own = _busy_cpu_s(), _process_cpu_s(self.pid)
        if None not in (self.busy, self.own, busy, own):
            out["other_cores_busy"] = max(0.0, (busy - self.busy) - (own - self.own)) / wall
        return out


def _agreement(a: np.ndarray, b: np.ndarray, hop: int) -> dict:
    """max |a - b| / peak of b: at the first frame and over the run."""
    n = min(a.size, b.size) // hop * hop
    peak = float(np.abs(b[:n]).max()) or 1.0
    diff = np.abs(a[:n] - b[:n]).reshape(-1, hop).max(axis=1) / peak
    return {"first_frame": float(diff[0]), "whole_run": float(diff.max()), "frames": int(diff.size)}


def run_benchmark(model: str, out_dir: Path | None, *, work: Path = DEFAULT_WORK, threads: int = 2,
                  modes=("fp32", "int8"), repeats: int = 3, text: str = TEXT, after: int = 6, streams: int = 4,
                  word_s: float = 0.05, torch_side: bool = True, fresh: bool = False, log=print) -> dict:
    from torch_realtime_reference import whole_text_frames
    from vv_export.realtime import DEFAULT_CFG_SCALE, DEFAULT_DIFFUSION_STEPS, TEXT_WINDOW

    work = Path(work)
    modes = list(modes)
    load_before = load_average()
    info = prepare(model, work, modes, threads, fresh, log)
    names = [f"ort-{m}" for m in modes] + (["torch"] if torch_side else [])
    workers: dict[str, Worker] = {}
    runs: dict[str, list] = {n: [] for n in names}
    loads = []
    scratch = model_dir(work, model) / "runs"
    try:
        for name in names:
            workers[name] = Worker(name, model, work, threads, scratch)
        first_ort = workers[names[0]]
        text_ids = first_ort.call("tokens", text=text)["tokens"]
        frames = whole_text_frames(len(text_ids), after)
        hop = int(first_ort.info["hop"])
        log(f"[{model}] {len(text_ids)} text tokens -> {frames} frames per run, sides {', '.join(names)}")
        for name in names:  # warm-up: a text window and its speech window, one frame of the next
            workers[name].call("run", text=text, text_ids=text_ids, frames=7)
        for r in range(repeats):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                other = OtherLoad(workers[name].proc.pid)
                save = str(scratch / f"{name}.npy") if r == repeats - 1 else None
                figures = workers[name].call("run", text=text, text_ids=text_ids, frames=frames, save=save)
                runs[name].append(figures)
                loads.append({"side": name, "repeat": r, **other.done()})
                busy = loads[-1].get("other_cores_busy")
                log(f"[{model}] {name} run {r + 1}: {figures['ms_per_frame']:.1f} ms/frame, rtf {figures['rtf']:.3f}"
                    + (f" (other processes kept {busy:.2f} cores busy)" if busy is not None else ""))
        streamed = {n: [] for n in names if n.startswith("ort-")}
        for r in range(repeats):
            for name in streamed:
                streamed[name].append(workers[name].call("first_audio_streamed", text=text, word_s=word_s,
                                                         frames=frames, window=TEXT_WINDOW))
        concurrency = {}
        for name in streamed:
            concurrency[name] = workers[name].call("streams", text=text, frames=frames, count=streams)
            c = concurrency[name]
            log(f"[{model}] {name} {streams} streams: {c['concurrent']['frames_per_s']:.1f} frames/s together, "
                f"{c['one_at_a_time']['frames_per_s']:.1f} one at a time")
    finally:
        for w in workers.values():
            w.close()

    sides = {}
    for name in names:
        per_graph = [r.pop("ms_per_frame_by_graph") for r in runs[name] if "ms_per_frame_by_graph" in r]
        side = {**_median(runs[name]), "runs": runs[name]}
        if per_graph:
            side["ms_per_frame_by_graph"] = {g: statistics.median(p.get(g, 0.0) for p in per_graph)
                                             for g in per_graph[0]}
        if name in streamed:
            side["first_audio_streamed"] = {**_median(streamed[name]), "runs": streamed[name]}
            side["concurrency"] = concurrency[name]
            side["engine_dir_bytes"] = info["engine_dir_bytes"][name.removeprefix("ort-")]
            side["decode_frames"] = workers[name].info.get("decode_frames")  # latents per decoder call, at most
            engine_dir = model_dir(work, model) / name.removeprefix("ort-")
            if name != "ort-fp32":
                side["quantization"] = quant_summary(engine_dir)   # each graph's candidates, timings, errors
            if name.endswith(OPENVINO_SUFFIX):
                side["runtimes"] = runtime_summary(engine_dir)
        sides[name] = side
    if "torch" in sides and sides["torch"].get("ms_per_frame"):
        for name, side in sides.items():
            if name.startswith("ort-") and side.get("ms_per_frame"):
                side["speedup_vs_torch"] = sides["torch"]["ms_per_frame"] / side["ms_per_frame"]
                side["speedup_rtf_vs_torch"] = sides["torch"]["rtf"] / side["rtf"]
    agreement = {}
    if "torch" in sides and "ort-fp32" in sides:
        agreement["ort-fp32_vs_torch"] = _agreement(np.load(scratch / "ort-fp32.npy"), np.load(scratch / "torch.npy"),
                                                    hop)
    result = {"benchmark": "realtime_cpu", "model_name": model, "model": describe(model),
              "parameters": info.get("parameters"), "export_s": info["export_s"],
              "exports_reused": info["exports_reused"], "preset": info["preset"], "threads": threads,
              "repeats": repeats, "text": text, "text_tokens": len(text_ids), "frames": frames,
              "frames_after_text": after, "frame_ms": 1e3 * hop / SAMPLE_RATE, "hop": hop, "sample_rate": SAMPLE_RATE,
              "diffusion_steps": DEFAULT_DIFFUSION_STEPS, "cfg_scale": DEFAULT_CFG_SCALE,
              "streamed_word_ms": word_s * 1e3,
              "mode": "forced through the whole text (end-of-speech classifier ignored), then frames_after_text",
              "sides": sides, "agreement": agreement,
              "sides_note": "each side in its own worker process with the same threads; timed runs interleaved (one "
                            "run of each side in turn, the order rotating); ms_per_frame from the first to the last "
                            "chunk (text windows included). other_cores_busy: the cores other processes kept busy "
                            "during a run (/proc/stat less the worker's own CPU time); PyTorch's threads slow down "
                            "many times over when the cores are shared (ONNX Runtime's stop spinning when a call ends): trust runs where "
                            f"it stays below {BUSY_MACHINE}",
              "load_runs": loads, "machine_was_busy": busy_machine(loads),
              **provenance(load_average_1min_before=load_before, load_average_1min_after=load_average())}
    if model in GOAL:
        result["goal"] = goal_summary(GOAL[model], sides)
    if out_dir is not None:
        write_result(out_dir, f"bench_realtime_{model}.json", result)
        plot(result, Path(out_dir) / f"bench_realtime_{model}.png")
    return result


def busy_machine(loads: list[dict]) -> bool | None:
    """Whether other processes used the cores noticeably during some timed run (None: unknown here)."""
    busy = [entry["other_cores_busy"] for entry in loads if "other_cores_busy" in entry]
    return max(busy) >= BUSY_MACHINE if busy else None


def goal_summary(goal: dict, sides: dict) -> dict:
    """The int8 goal is judged on the fastest side with int8 weights (ONNX Runtime alone or the mix)."""
    int8_sides = {n: s["ms_per_frame"] for n, s in sides.items()
                  if n.startswith("ort-int8") and s.get("ms_per_frame")}
    int8_side = min(int8_sides, key=int8_sides.get, default=None)
    int8 = int8_sides.get(int8_side)
    fp32 = sides.get("ort-fp32", {}).get("ms_per_frame")
    speedup = max((s.get("speedup_vs_torch") or 0.0 for s in sides.values()), default=0.0)
    first = min((s["first_audio_streamed"]["first_audio_after_window_s"] * 1e3 for s in sides.values()
                 if s.get("first_audio_streamed")), default=None)
    met = {"int8": int8 is not None and int8 <= goal["int8_ms_per_frame_max"],
           "fp32": fp32 is not None and fp32 <= goal["fp32_ms_per_frame_max"],
           "speedup": speedup >= goal["speedup_vs_torch_min"],
           "first_audio": first is not None and first <= goal["first_audio_streamed_ms_max"]}
    return {**goal, "int8_ms_per_frame": int8, "int8_side": int8_side, "fp32_ms_per_frame": fp32, "best_speedup_vs_torch": speedup,
            "best_first_audio_streamed_ms": first, "met": met, "all_met": all(met.values())}


def plot(result: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG", file=sys.stderr)
        return None
    sides = result["sides"]
    names = [n for n in sides if sides[n].get("ms_per_frame")]
    ort = [n for n in names if n.startswith("ort-")]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.8))
    ax = axes[0]
    vals = [sides[n]["ms_per_frame"] for n in names]
    ax.bar(range(len(names)), vals, color=["seagreen" if n in ort else "dimgrey" for n in names])
    for i, v in enumerate(vals):
        label = f"{v:.0f}" + (f"\nx{sides[names[i]]['speedup_vs_torch']:.1f}" if sides[names[i]].get("speedup_vs_torch")
                              else "")
        ax.text(i, v, label, ha="center", va="bottom", fontsize=8)
    ax.axhline(result["frame_ms"], color="firebrick", ls="--", lw=1, label=f"real time ({result['frame_ms']:.0f} ms)")
    if "goal" in result:
        ax.axhline(result["goal"]["int8_ms_per_frame_max"], color="darkorange", ls=":", lw=1, label="int8 goal")
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)), names, rotation=15)
    ax.set_ylabel("ms per frame (log)")
    ax.set_title(f"per frame, steady state ({result['threads']} threads)")
    ax.legend(fontsize=7)
    ax = axes[1]
    graphs = sorted({g for n in ort for g in sides[n].get("ms_per_frame_by_graph", {})})
    for i, name in enumerate(ort):
        bottom = 0.0
        for j, g in enumerate(graphs):
            v = sides[name].get("ms_per_frame_by_graph", {}).get(g, 0.0)
            ax.bar(i, v, bottom=bottom, color=plt.cm.tab10(j % 10), label=g if i == 0 else None)
            bottom += v
        rest = sides[name]["ms_per_frame"] - bottom
        if rest > 0:
            ax.bar(i, rest, bottom=bottom, color="lightgrey", label="loop" if i == 0 else None)
    ax.set_xticks(range(len(ort)), ort, rotation=15)
    ax.set_ylabel("ms per frame")
    ax.set_title("ONNX Runtime: ms per frame by graph")
    ax.legend(fontsize=7)
    ax = axes[2]
    streamed = [sides[n].get("first_audio_streamed", {}).get("first_audio_after_window_s") or 0.0 for n in ort]
    at_once = [sides[n].get("time_to_first_audio_s") or 0.0 for n in names]
    ax.bar([i - 0.2 for i in range(len(ort))], [v * 1e3 for v in streamed], 0.4, color="steelblue",
           label="streamed text: after the first 5 tokens")
    ax.bar([i + 0.2 for i in range(len(names))], [v * 1e3 for v in at_once], 0.4, color="lightsteelblue",
           label="text at once: after the call")
    for i, v in enumerate(streamed):
        ax.text(i - 0.2, v * 1e3, f"{v * 1e3:.0f}", ha="center", va="bottom", fontsize=8)
    if "goal" in result:
        ax.axhline(result["goal"]["first_audio_streamed_ms_max"], color="firebrick", ls="--", lw=1, label="goal")
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)), names, rotation=15)
    ax.set_ylabel("ms (log)")
    ax.set_title("first audio")
    ax.legend(fontsize=7)
    ax = axes[3]
    for i, name in enumerate(ort):
        c = sides[name].get("concurrency")
        if not c:
            continue
        for dx, key, color in ((-0.2, "one_at_a_time", "silver"), (0.2, "concurrent", "seagreen")):
            v = c[key]["audio_s_per_s"]
            ax.bar(i + dx, v, 0.4, color=color, label=(f"{c['streams']} streams " + key.replace("_", " "))
                   if i == 0 else None)
            ax.text(i + dx, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    ax.axhline(1.0, color="firebrick", ls="--", lw=1)
    ax.set_xticks(range(len(ort)), ort, rotation=15)
    ax.set_ylabel("seconds of audio per second")
    ax.set_title("aggregate throughput")
    ax.legend(fontsize=7)
    fig.suptitle(f"bench_realtime, {result['model_name']} model: ONNX Runtime vs the PyTorch port of the loop "
                 f"(load average {result['machine'].get('load_average_1min_before')})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["full", "tiny"], default="full")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--modes", default=None, help="default: fp32,int8,int8+openvino (without the last where "
                                                       "OpenVINO is not installed)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--text", default=TEXT)
    parser.add_argument("--after", type=int, default=6, help="frames after the text is spent")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--word-ms", type=float, default=50.0, help="streamed text: one word every this many ms")
    parser.add_argument("--no-torch", action="store_true", help="leave out the PyTorch port")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="exports are cached here")
    parser.add_argument("--fresh", action="store_true", help="export again even where a cached export matches")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--side", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.modes is None:
        args.modes = "fp32,int8" + (f",int8{OPENVINO_SUFFIX}" if openvino_installed() else "")
    modes = [m for m in args.modes.split(",") if m]
    if args.side == "export":
        try:
            answer = export_side(args.model, args.work, modes, args.threads, args.fresh)
        except Exception as exc:  # noqa: BLE001
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        print(REPLY + json.dumps(answer), flush=True)
        return 1 if "error" in answer else 0
    if args.side:
        return serve_side(args.side, args.model, args.work, args.threads)
    if "fp32" not in modes:
        parser.error("--modes must include fp32 (the port is checked against it)")
    if args.repeats < 1 or args.streams < 1 or args.after < 0:
        parser.error("--repeats and --streams must be at least 1, --after at least 0")
    result = run_benchmark(args.model, args.out, work=args.work, threads=args.threads, modes=modes,
                           repeats=args.repeats, text=args.text, after=args.after, streams=args.streams,
                           word_s=args.word_ms / 1e3, torch_side=not args.no_torch, fresh=args.fresh,
                           log=lambda line: print(line, file=sys.stderr, flush=True))
    nan = float("nan")
    for name, r in result["sides"].items():
        streamed = (r.get("first_audio_streamed") or {}).get("first_audio_after_window_s")
        print(f"{name:9s} {r.get('ms_per_frame') or nan:8.1f} ms/frame  rtf {r.get('rtf') or nan:.3f}  "
              f"x{r.get('speedup_vs_torch') or nan:.1f} vs the port  first audio {1e3 * (streamed or nan):.0f} ms "
              f"after 5 streamed tokens")
        if r.get("concurrency"):
            c = r["concurrency"]
            print(f"{'':9s} {c['streams']} streams: {c['concurrent']['audio_s_per_s']:.2f} s of audio/s together, "
                  f"{c['one_at_a_time']['audio_s_per_s']:.2f} one at a time")
    if result["agreement"]:
        print(f"agreement: {result['agreement']}")
    if "goal" in result:
        print(f"goal: {result['goal']['met']}")
    if result["machine_was_busy"]:
        print(f"warning: other processes kept up to {max(e['other_cores_busy'] for e in result['load_runs']):.2f} "
              f"cores busy during the timed runs: run it again on an idle machine")
    if args.out is not None:
        print(f"wrote {args.out / ('bench_realtime_' + args.model + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
