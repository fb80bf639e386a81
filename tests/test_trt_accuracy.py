"""TensorRT accuracy (GPU; `make check-accuracy`): engines against ONNX Runtime, then whole generations.

1. Per graph and per precision (fp32, fp16, bf16): the shared fixture's ENGINE_DIR is built with the
   plan ``$VV_TRT_PLAN`` (default "ci") at that precision, and every graph runs on the TensorRT backend
   through polygraphy on the saved validation inputs (ENGINE_DIR/validation/, the same data the CPU
   suite compares against PyTorch); polygraphy's comparator checks it against ONNX Runtime (fp32, CPU)
   with the plan's tolerance for that precision.
2. End to end: the fixture's generation (Microsoft's original loop, batch 1) on TensorRT fp32 must
   reproduce its tokens; fp16 and bf16 report their token and audio drift.

The plan ("ci" by default) covers every validation shape, the {batch 3, seq 3, past 5} lm call included
(its extend profile), and the fixture's generation: tests/test_trt_plans.py proves that on the CPU.

Results (errors per output, token agreement, audio SNR) go to benchmarks/results/trt_accuracy.json.
Skipped, with the reason, where TensorRT or a CUDA GPU is missing; `make check-accuracy` sets
VV_REQUIRE_GPU=1, which turns every such skip into a failure and fails a run in which no test ran
(tests/conftest.py), so the check cannot pass having tested nothing. The one allowed skip, bf16 on a
GPU without bf16, says "not applicable".
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import tensorrt_gpu_unavailable

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "trt_accuracy.json"
PLAN = os.environ.get("VV_TRT_PLAN", "ci")
PRECISIONS = ("fp32", "fp16", "bf16")
GRAPHS = ("text_embed", "lm", "acoustic_encoder", "acoustic_decoder", "semantic_encoder", "acoustic_connector",
          "semantic_connector", "diffusion_step", "diffusion_sampler")
# TensorRT fp32 (TF32 off) against the original loop's audio: same order as ONNX Runtime's differences
FP32_AUDIO_RTOL_OF_PEAK = 1e-3


_REASON = tensorrt_gpu_unavailable()  # checked at collection
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]


@pytest.fixture(scope="module")
def torch_cuda():
    import torch

    return torch


@pytest.fixture(scope="module")
def results():
    data = {"plan": PLAN, "graphs": {}, "generation": {}}
    yield data
    if data["graphs"] or data["generation"]:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        previous = {}
        if RESULTS.exists():
            try:
                previous = json.loads(RESULTS.read_text())
            except ValueError:
                previous = {}
        merged = {**previous, **{k: v for k, v in data.items() if k not in ("graphs", "generation")}}
        for key in ("graphs", "generation"):
            merged[key] = {**previous.get(key, {}), **data[key]}
        merged["written"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        tmp = RESULTS.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(merged, indent=2) + "\n")
        os.replace(tmp, RESULTS)


@pytest.fixture(scope="module")
def built(torch_cuda, tiny_engine_dir, tmp_path_factory, results):
    """precision -> (ENGINE_DIR copy with engines of that precision, its manifest, a TrtBackend)."""
    from vv_export.trt_build import build_engines
    from vv_runtime.manifest import load_manifest
    from vv_runtime.trt_backend import TrtBackend

    cache: dict = {}
    major, minor = torch_cuda.cuda.get_device_capability(0)
    results["device"] = torch_cuda.cuda.get_device_name(0)
    results["compute_capability"] = f"sm{major}{minor}"

    def get(precision):
        if precision == "bf16" and major < 8:
            pytest.skip(f"not applicable: bf16 needs compute capability 8.0+, this GPU is sm{major}{minor}")
        if precision not in cache:
            out = tmp_path_factory.mktemp(f"trt-{precision}") / "tiny"
            shutil.copytree(tiny_engine_dir, out)
            start = time.time()
            # TensorRT 10 (requirements-gpu.txt): weak typing, no ModelOpt; any build error fails the test
            summary = build_engines(out, plan=PLAN, precision=precision, progress=print)
            results["trt_version"] = summary["trt_version"]
            results.setdefault("build_seconds", {})[precision] = round(time.time() - start, 1)
            manifest = load_manifest(out)
            notes = []
            backend = TrtBackend(out, manifest, graphs=GRAPHS, notice=notes.append)  # every engine
            cache[precision] = (out, manifest, backend, notes)
        return cache[precision]

    yield get
    for _, _, backend, _ in cache.values():
        backend.close()


@pytest.fixture(scope="module")
def onnxrt(tiny_engine_dir):
    """graph -> (validation feeds, ONNX Runtime fp32 outputs, PyTorch outputs)."""
    from vv_export.accuracy import reference_outputs, run_onnxrt
    from vv_export.validation_data import load_validation_data

    manifest = json.loads((tiny_engine_dir / "manifest.json").read_text())
    cache = {}

    def get(graph):
        if graph not in cache:
            feeds, saved = load_validation_data(tiny_engine_dir, graph)
            cache[graph] = (feeds, run_onnxrt(tiny_engine_dir, manifest, graph, feeds), reference_outputs(saved))
        return cache[graph]

    return get


# --- 1. per graph ---------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("graph", GRAPHS)
def test_engine_matches_onnxrt(graph, precision, built, onnxrt, results):
    from vv_export.plans import resolve_plan
    from vv_export.accuracy import compare_outputs, run_backend

    out, manifest, backend, _ = built(precision)
    feeds, ort_outputs, torch_outputs = onnxrt(graph)
    plan = resolve_plan(PLAN, manifest, precision=precision)
    tolerance = plan.graphs[graph].tolerance_for(precision)
    got = run_backend(backend, manifest, graph, feeds, name=f"tensorrt-{precision}")
    report = compare_outputs(graph, got, ort_outputs, tolerance, f"tensorrt-{precision}", "onnxrt")
    vs_torch = compare_outputs(graph, got, torch_outputs, manifest["graphs"][graph]["tolerance"],
                               f"tensorrt-{precision}", "pytorch")
    entry = report.to_json()
    entry["tolerance"] = tolerance
    entry["vs_pytorch_worst"] = vs_torch.worst()
    results["graphs"].setdefault(precision, {})[graph] = entry
    assert report.passed, "; ".join(report.failures())


@pytest.mark.parametrize("precision", PRECISIONS)
def test_lm_cache_binding_type(precision, built):
    """A bf16 LM engine binds its cache in bf16 (plan builder cache_dtype; graph_rules.with_cache_dtype), the
    backend's device cache with it; fp32 and fp16 engines keep an fp32 cache."""
    out, manifest, backend, _ = built(precision)
    want = "bfloat16" if precision == "bf16" else "float32"
    assert manifest["trt"]["engines"]["lm"]["cache_dtype"] == ("bf16" if precision == "bf16" else "fp32")
    engine = backend.engines["lm"].engine
    assert [backend.np_name(engine.get_tensor_dtype(n)) for n in ("past_kv", "new_kv")] == [want, want]
    assert str(backend.kv_cache((1, 2, 2, 1, 64, 4)).data.dtype) == f"torch.{want}"


def test_rebuild_is_a_no_op(built):
    from vv_export.trt_build import build_engines

    out, manifest, _, _ = built("fp32")
    start = time.time()
    summary = build_engines(out, plan=PLAN, precision="fp32", progress=print)
    assert all(e["status"] == "up to date" for e in summary["engines"].values())
    assert time.time() - start < 60
    assert (out / "trt" / "timing.cache").is_file()


def test_lm_switches_profiles(built, onnxrt):
    """prefill -> decode -> extend -> prefill on one context: each call picks its profile and still matches
    ONNX Runtime (the validation's lm calls: {1, 6, 0} prefill, {2, 1, 7} decode, {3, 3, 5} extend)."""
    from vv_export.accuracy import compare_outputs
    from vv_export.plans import resolve_plan

    out, manifest, backend, _ = built("fp32")
    feeds, ort_outputs, _ = onnxrt("lm")
    lm = backend.engines["lm"]
    plan = resolve_plan(PLAN, manifest, precision="fp32")
    assert lm.num_profiles == len(plan.graphs["lm"].profiles)
    assert lm.profile_names == [p.name for p in plan.graphs["lm"].profiles]
    order = sorted(range(len(feeds)),
                   key=lambda i: (feeds[i]["past_kv"].shape[4] > 0, feeds[i]["inputs_embeds"].shape[1] > 1))
    order = order + order[:1]
    tol = {"": {"atol": 1e-4, "rtol": 1e-3}}
    used = []
    for i in order:
        shapes = {n: tuple(feeds[i][n].shape) for n in lm.inputs}
        used.append(lm.profile_names[lm.pick_profile(shapes)])
        got = backend.run("lm", feeds[i])
        report = compare_outputs("lm", [got], [ort_outputs[i]], tol, "tensorrt-fp32", "onnxrt")
        assert report.passed, "; ".join(report.failures())
    assert used == ["prefill", "decode", "extend", "prefill"], used


@pytest.mark.parametrize("graph", ["diffusion_sampler", "acoustic_decoder", "semantic_encoder"])
def test_cuda_graph_replay(graph, built, onnxrt):
    out, manifest, backend, notes = built("fp32")
    feeds, _, _ = onnxrt(graph)
    first = backend.run(graph, feeds[0])   # warm-up + capture
    second = backend.run(graph, feeds[0])  # replay
    other = backend.run(graph, feeds[1])   # another shape: its own graph
    third = backend.run(graph, feeds[0])   # back to the first graph
    engine = backend.engines[graph]
    key = tuple(tuple(feeds[0][n].shape) for n in engine.inputs)
    assert engine.graph_contexts[key][1] is not None, f"no CUDA graph captured: {notes}"
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])
        np.testing.assert_array_equal(first[name], third[name])
    assert len(engine.graph_contexts) >= 2 and other


# --- 2. whole generations -------------------------------------------------------------------------

def _audio_drift(audio: np.ndarray, reference: np.ndarray) -> dict:
    n = min(audio.shape[0], reference.shape[0])
    if n == 0:
        return {"compared_samples": 0}
    a, r = audio[:n].astype(np.float64), reference[:n].astype(np.float64)
    err = a - r
    peak = float(np.max(np.abs(r)))
    snr = 10 * np.log10(float(np.sum(r * r)) / max(float(np.sum(err * err)), 1e-30))
    return {"compared_samples": int(n), "length": int(audio.shape[0]), "reference_length": int(reference.shape[0]),
            "max_abs_error": float(np.max(np.abs(err))), "peak": peak,
            "max_error_of_peak": float(np.max(np.abs(err))) / peak if peak else None, "snr_db": round(snr, 2)}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_fixture_generation(precision, built, fixture_reference, results):
    from vv_runtime.pipeline import Pipeline

    meta, ref = fixture_reference
    gen = meta["generate"]
    out, manifest, backend, notes = built(precision)
    pipe = Pipeline(out, manifest, backend)
    rows = pipe.prepare(gen["script"], [ref["generate.voice_wav_raw"]])
    start = time.time()
    result = pipe.generate(rows, cfg_scale=gen["cfg_scale"], max_new_frames=gen["max_new_tokens"],
                           noise=ref["generate.noise"])
    seconds = time.time() - start
    tokens, expected = result.tokens[0], gen["generated_tokens"]
    first_diff = next((i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b),
                      None if len(tokens) == len(expected) else min(len(tokens), len(expected)))
    audio = result.audio[0]
    entry = {"tokens_match": tokens == expected, "first_token_difference": first_diff,
             "tokens": tokens, "reference_tokens": expected, "frames": result.frames[0],
             "reference_frames": int(ref["generate.audio"].shape[1] // 3200),
             "audio": _audio_drift(audio, ref["generate.audio"][0]), "seconds": round(seconds, 3),
             "notes": notes, "backend": backend.describe()}
    results["generation"][precision] = entry
    assert np.all(np.isfinite(audio))
    if precision == "fp32":
        assert tokens == expected
        drift = entry["audio"]
        assert drift["length"] == drift["reference_length"]
        assert drift["max_abs_error"] <= FP32_AUDIO_RTOL_OF_PEAK * drift["peak"], drift


def test_device_cache_matches_host_cache(built, fixture_reference):
    """The LM cache kept on the GPU gives the very tokens and audio of the host cache (fp32 engines)."""
    from vv_runtime.pipeline import Pipeline
    from vv_runtime.trt_backend import DeviceKVCache, TrtBackend

    meta, ref = fixture_reference
    gen = meta["generate"]
    out, manifest, backend, _ = built("fp32")
    host_backend = TrtBackend(out, manifest, device_kv_cache=False)
    try:
        outputs = []
        for b in (backend, host_backend):
            pipe = Pipeline(out, manifest, b)
            rows = pipe.prepare(gen["script"], [ref["generate.voice_wav_raw"]])
            outputs.append(pipe.generate(rows, cfg_scale=gen["cfg_scale"], max_new_frames=gen["max_new_tokens"],
                                         noise=ref["generate.noise"]))
        assert isinstance(backend.kv_cache((1, 2, 2, 1, 4, 1)), DeviceKVCache)
        device, host = outputs
        assert device.tokens == host.tokens
        np.testing.assert_allclose(device.audio[0], host.audio[0], rtol=0, atol=1e-6)
    finally:
        host_backend.close()
