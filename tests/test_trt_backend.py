"""The TensorRT backend's CPU-checkable parts: refusals (one line, naming both sides), `trt_engines_match`,
the `auto` fallback, profile choice, buffer growth, and that nothing imports torch/tensorrt eagerly.

Running engines needs a GPU: tests/test_trt_accuracy.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import tensorrt_gpu_unavailable
from vv_runtime import trt_backend
from vv_runtime.backend import OrtBackend, select_backend
from vv_runtime.errors import BackendFault, CapacityError, RuntimeInputError
from vv_runtime.trt_backend import TrtBackend, TrtBackendError, trt_engines_match


@pytest.fixture()
def manifest(tiny_engine_dir):
    return json.loads((tiny_engine_dir / "manifest.json").read_text())


@pytest.fixture()
def cpu_torch(monkeypatch):
    """torch, with CPU tensors standing in for CUDA memory: the backend's device and stream contexts do nothing."""
    import contextlib

    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    return torch


def _forgetting_slot():
    """A context slot and the backend's forget_address for it, recording every address forgotten."""
    slot = trt_backend.ContextSlot(1)
    forgotten = []

    def forget(address):
        forgotten.append(address)
        slot.forget_address(address)

    return slot, forgotten, forget


def _with_engines(manifest, engine_dir, write=True, **overrides):
    engines = {}
    if write:
        (engine_dir / "trt").mkdir(exist_ok=True)
    for graph, entry in manifest["graphs"].items():
        rec = {"file": f"trt/{graph}.10.8.0.43.sm90.{entry['sha256'][:12]}.0123456789ab.fp32.engine",
               "trt_version": "10.8.0.43", "compute_capability": "sm90", "onnx_sha256": entry["sha256"],
               "precision": "fp32", "profiles": []}
        rec.update(overrides)
        engines[graph] = rec
    return {**manifest, "trt": {"engines": engines, "plan": "default"}}


def test_runtime_modules_do_not_import_torch_or_tensorrt():
    code = ("import sys, vv_runtime.backend, vv_runtime.pipeline, vv_runtime.trt_backend;"
            "print(sorted(m for m in ('torch', 'tensorrt') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_engines(tiny_engine_dir, manifest):
    ok, reason = trt_engines_match(tiny_engine_dir, manifest)
    assert not ok and "has no TensorRT engines" in reason and "vv-export trt" in reason
    with pytest.raises(TrtBackendError, match="has no TensorRT engines"):
        TrtBackend(tiny_engine_dir, manifest)


def test_missing_engine_file(tiny_engine_dir, manifest):
    m = _with_engines(manifest, tiny_engine_dir, write=False)
    ok, reason = trt_engines_match(tiny_engine_dir, m)
    assert not ok and "is missing" in reason and "\n" not in reason


def test_engine_of_another_onnx(tmp_path, manifest):
    m = _with_engines(manifest, tmp_path, onnx_sha256="f" * 64)
    for rec in m["trt"]["engines"].values():
        (tmp_path / rec["file"]).write_bytes(b"x")
    ok, reason = trt_engines_match(tmp_path, m)
    assert not ok and "built from another ONNX graph" in reason


def test_required_graph_without_engine(tmp_path, manifest):
    m = _with_engines(manifest, tmp_path)
    del m["trt"]["engines"]["lm"]
    for rec in m["trt"]["engines"].values():
        (tmp_path / rec["file"]).write_bytes(b"x")
    ok, reason = trt_engines_match(tmp_path, m)
    assert not ok and "no TensorRT engine for graph 'lm'" in reason


def test_version_and_gpu_mismatch_names_both(tmp_path, manifest):
    m = _with_engines(manifest, tmp_path)
    with pytest.raises(TrtBackendError) as info:
        trt_backend._version_checks(tmp_path, m, "10.9.0.34", "sm89")
    msg = str(info.value)
    assert "TensorRT 10.8.0.43 for sm90" in msg and "TensorRT 10.9.0.34 on sm89" in msg and "\n" not in msg
    trt_backend._version_checks(tmp_path, m, "10.8.0.43", "sm90")  # matching: no error


def test_this_machine_cannot_run_engines(tmp_path, manifest):
    """Files in place, but here there is no TensorRT or no CUDA GPU: a reason, never an exception."""
    m = _with_engines(manifest, tmp_path)
    for rec in m["trt"]["engines"].values():
        (tmp_path / rec["file"]).write_bytes(b"x")
    ok, reason = trt_engines_match(tmp_path, m)
    if ok:
        pytest.skip("this machine has TensorRT and a GPU")
    assert "TensorRT is not installed" in reason or "no CUDA GPU" in reason or "TensorRT" in reason


def test_select_backend_falls_back(tiny_engine_dir, manifest):
    m = _with_engines(manifest, tiny_engine_dir, write=False)
    notes = []
    backend = select_backend(tiny_engine_dir, m, "auto", notice=notes.append)
    try:
        assert isinstance(backend, OrtBackend)
        assert len(notes) == 1 and "TensorRT unavailable" in notes[0]
    finally:
        backend.close()
    with pytest.raises(RuntimeInputError, match="--backend trt: TensorRT unavailable"):
        select_backend(tiny_engine_dir, m, "trt")


# --- profile choice and buffers (pure logic, CPU tensors) -----------------------------------------

def _engine_stub(profiles, inputs):
    eng = object.__new__(trt_backend._Engine)
    eng.graph = "lm"
    eng.inputs = inputs
    eng.profiles = profiles
    eng.profile_names = ["prefill", "decode"][: len(profiles)]
    return eng


def test_lm_profile_choice():
    # prefill: seq 1..64 past 0; decode: seq 1 past 1..127 (shapes trimmed to the named dims)
    prefill = {"x": ((1, 1), (2, 16), (8, 64)), "kv": ((1, 0), (2, 0), (8, 0))}
    decode = {"x": ((1, 1), (2, 1), (8, 1)), "kv": ((1, 1), (2, 32), (8, 127))}
    eng = _engine_stub([prefill, decode], ["x", "kv"])
    assert eng.pick_profile({"x": (2, 30), "kv": (2, 0)}) == 0   # prompt
    assert eng.pick_profile({"x": (1, 1), "kv": (1, 0)}) == 0    # one-token prompt: no past
    assert eng.pick_profile({"x": (4, 1), "kv": (4, 50)}) == 1   # decode step
    with pytest.raises(CapacityError) as info:
        eng.pick_profile({"x": (2, 3), "kv": (2, 5)})            # chunked prefill: not planned
    msg = str(info.value)
    assert "outside every optimisation profile" in msg and "prefill" in msg and "decode" in msg
    assert "\n" not in msg and "vv-export trt --plan" in msg
    assert not isinstance(info.value, TrtBackendError)           # the request's size, not a broken ENGINE_DIR
    with pytest.raises(CapacityError):
        eng.pick_profile({"x": (16, 1), "kv": (16, 5)})          # batch beyond the plan


def test_overlapping_profiles_prefer_the_nearest_opt():
    wide = {"x": ((1, 1), (4, 256), (8, 512))}
    step = {"x": ((1, 1), (4, 1), (8, 1))}
    eng = _engine_stub([wide, step], ["x"])
    assert eng.pick_profile({"x": (4, 1)}) == 1
    assert eng.pick_profile({"x": (4, 200)}) == 0


def test_buffers_allocate_at_max_or_grow():
    torch = pytest.importorskip("torch")
    small = trt_backend._Buffer(torch, "cpu", torch.float32, max_elems=1000, budget_bytes=1 << 20)
    assert small.capacity == 1000 and small.ensure(1000) is False
    big = trt_backend._Buffer(torch, "cpu", torch.float32, max_elems=10_000_000, budget_bytes=1 << 20)
    assert big.capacity == 1  # over the budget: allocated on demand
    assert big.ensure(100) is True and big.capacity == 100
    assert big.ensure(120) is True and big.capacity == 150  # grows by 1.5x
    assert big.ensure(150) is False
    assert big.ensure(20_000_000) is True and big.capacity == 20_000_000  # beyond max: TensorRT will say no
    v = small.view((10, 5))
    assert v.shape == (10, 5) and v.data_ptr() == small.ptr
    empty = trt_backend._Buffer(torch, "cpu", torch.int64, max_elems=0, budget_bytes=1)
    assert empty.capacity == 1 and empty.view((2, 0)).numel() == 0


def test_device_kv_cache_behaves_like_the_host_cache(cpu_torch):
    """DeviceKVCache's indexing (rows broadcast, slots, zeroing, past) equals HostKVCache's, here on CPU tensors."""
    import types

    import numpy as np

    torch = cpu_torch
    from vv_runtime.backend import HostKVCache

    fake = types.SimpleNamespace(torch=torch, device=torch.device("cpu"), stream=None)
    shape = (2, 2, 4, 2, 6, 3)  # L, 2, rows (2 positive + 2 negative), KV, capacity, D
    dev, host = trt_backend.DeviceKVCache(fake, shape), HostKVCache(shape)
    rng = np.random.default_rng(0)
    prompt = rng.standard_normal((2, 2, 2, 2, 4, 3)).astype(np.float32)
    neg = rng.standard_normal((2, 2, 1, 2, 1, 3)).astype(np.float32)
    step = rng.standard_normal((2, 2, 4, 2, 1, 3)).astype(np.float32)
    for cache, as_input in ((host, lambda a: a), (dev, torch.from_numpy)):
        cache.write(slice(0, 2), 0, as_input(prompt))
        cache.zero(1, 0, 2)
        cache.write(slice(2, 4), 3, as_input(neg))      # one row broadcast to both negative rows
        cache.write(slice(0, 4), 4, as_input(step))
    np.testing.assert_array_equal(dev.numpy(), host.data)
    past = dev.past(5)  # the whole buffer: capacity 6 caps the first bucket
    assert past.is_contiguous() and tuple(past.shape) == (2, 2, 4, 2, 6, 3)
    np.testing.assert_array_equal(past.numpy(), host.past(5))


def test_device_kv_cache_in_bf16_holds_the_rounded_values(cpu_torch):
    """A bf16 device cache (the LM engines built with cache_dtype bf16) holds every written value rounded to
    bf16, through the same indexing as the host cache, and reads back as float32."""
    import types

    import ml_dtypes
    import numpy as np

    torch = cpu_torch
    from vv_runtime.backend import HostKVCache

    fake = types.SimpleNamespace(torch=torch, device=torch.device("cpu"), stream=None, cache_dtype=torch.bfloat16)
    shape = (2, 2, 4, 2, 6, 3)
    dev, host = trt_backend.DeviceKVCache(fake, shape), HostKVCache(shape)
    assert dev.data.dtype == torch.bfloat16
    rng = np.random.default_rng(1)
    prompt = rng.standard_normal((2, 2, 2, 2, 4, 3)).astype(np.float32)
    step = rng.standard_normal((2, 2, 4, 2, 1, 3)).astype(np.float32)
    rounded = lambda a: a.astype(ml_dtypes.bfloat16).astype(np.float32)  # noqa: E731
    dev.write(slice(0, 2), 0, prompt)
    host.write(slice(0, 2), 0, rounded(prompt))
    dev.write_rows(torch.from_numpy(step), [0, 1, 2, 3], [4, 5, 0, 1])
    host.write_rows(rounded(step), [0, 1, 2, 3], [4, 5, 0, 1])
    got = dev.numpy()
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, host.data)
    assert not np.array_equal(got[:, :, 0:2, :, 0:4], prompt)  # rounded: bf16 holds 8 bits of mantissa


def test_one_cache_type_for_every_lm_engine(cpu_torch):
    """The LM cache's type comes from the engines' records (fp32 where none is recorded); LM engines built
    with different cache types are refused in one line; a bf16 binding's host arrays are float32."""
    import types

    import numpy as np

    torch = cpu_torch
    me = types.SimpleNamespace(torch=torch)
    lm = {"inputs": ["inputs_embeds", "attention_mask", "position_ids", "past_kv"]}
    other = {"inputs": ["latent", "state"], "cache_dtype": "fp32"}
    assert TrtBackend._cache_dtype(me, {"lm": {**lm, "cache_dtype": "bf16"}, "acoustic_decoder": other}) == torch.bfloat16
    assert TrtBackend._cache_dtype(me, {"lm": dict(lm), "acoustic_decoder": other}) == torch.float32
    assert TrtBackend._cache_dtype(me, {"tts_lm": {**lm, "cache_dtype": "bf16"},
                                        "text_lm": {**lm, "cache_dtype": "bf16"}}) == torch.bfloat16
    with pytest.raises(TrtBackendError, match="different cache types .bf16, fp32.*cache_dtype"):
        TrtBackend._cache_dtype(me, {"tts_lm": {**lm, "cache_dtype": "bf16"}, "text_lm": {**lm, "cache_dtype": "fp32"}})
    assert trt_backend._host_dtype(torch.bfloat16) == np.float32
    assert trt_backend._host_dtype(torch.int64) == np.int64


# --- what the engines can run: PlanLimits over recorded profiles (pure, no CUDA) -------------------

# A plan with known numbers (independent of the shipped plans): two decode profiles of different shapes.
LIMITS_PLAN = {
    "name": "limits-test",
    "settings": {"max_rows": 3, "max_prompt": 100, "max_context": 2000, "max_voice_seconds": 2},
    "dims": {"batch": [1, 1, "max_rows"], "samples": ["hop", "hop", "max_voice_seconds * sample_rate // hop * hop"],
             "frames": [1, 1, "max_voice_seconds * sample_rate // hop"]},
    "graphs": {
        "text_embed": {"profiles": [{"name": "all", "batch": [1, 2, "2 * max_rows"], "seq": [1, 16, "max_prompt"]}]},
        "lm": {"profiles": [
            {"name": "prefill", "batch": [1, 2, "2 * max_rows"], "seq": [1, 16, "max_prompt"], "past": [0, 0, 0]},
            {"name": "decode-long", "batch": [1, 2, 2], "seq": [1, 1, 1], "past": [1, 64, "max_context - 1"]},
            {"name": "decode", "batch": [1, 4, "2 * max_rows"], "seq": [1, 1, 1], "past": [1, 64, 1023]}]},
        "acoustic_encoder": {"profiles": [{"name": "voice"}]},
        "acoustic_decoder": {"profiles": [{"name": "frame", "batch": [1, 1, 4]}]},
        "semantic_encoder": {"profiles": [{"name": "frame"}]},
        "diffusion_sampler": {"profiles": [{"name": "frame", "batch": [1, 1, 5]}]},
        "acoustic_connector": {"profiles": [{"name": "all"}]},
        "semantic_connector": {"profiles": [{"name": "all"}]},
        "diffusion_step": {"profiles": [{"name": "all"}]},
    },
}


@pytest.fixture()
def plan_limits(tiny_engine_dir, manifest):
    """PlanLimits over engine records exactly as `vv-export trt` writes them for LIMITS_PLAN."""
    from vv_export.plans import resolve_plan
    from vv_export.trt_build import expected_engine
    from vv_runtime.backend_base import PlanLimits
    from vv_runtime.manifest import graphs_with_role, required_graphs

    resolved = resolve_plan(LIMITS_PLAN, manifest)
    records = {g: expected_engine(tiny_engine_dir, manifest, gp, "10.8.0.43", "sm90", resolved.name)
               for g, gp in resolved.graphs.items()}
    loaded = required_graphs(manifest)
    return PlanLimits({g: records[g] for g in loaded}, resolved.name, tiny_engine_dir,
                      graphs_with_role(manifest, "per-frame"))


def test_plan_limits(plan_limits):
    assert plan_limits.limits() == {
        "plan": "limits-test",
        "lm_prefill_rows": 6, "lm_prefill_seq": 100,
        "lm_decode_rows": 6, "lm_decode_past": 1999,  # the largest over both decode profiles
        "lm_decode_profiles": [{"name": "decode-long", "rows": 2, "past": 1999},
                               {"name": "decode", "rows": 6, "past": 1023}],
        "max_context": 2000,
        "text_embed_rows": 6, "text_embed_seq": 100,
        "acoustic_encoder_rows": 3, "acoustic_encoder_samples": 2 * 24000 // 3200 * 3200,
        "per_frame_rows": 3,  # the smallest maximum of the per-frame graphs (semantic_encoder: [dims] batch)
    }


def test_check_fits_by_dimensions(plan_limits, tiny_engine_dir):
    fit = plan_limits.fitting_profile
    assert fit("lm", {"batch": 6, "seq": 100, "past": 0}) == 0
    assert fit("lm", {"batch": 2, "seq": 1, "past": 1999}) == 1           # only the long decode profile
    assert fit("lm", {"batch": 6, "seq": 1, "past": 1000}) == 2           # only the wide one
    plan_limits.check_fits("acoustic_encoder", {"batch": 3, "samples": 48000})
    for graph, dims, named in [
        ("lm", {"batch": 6, "seq": 1, "past": 1500}, "past 1500"),         # wide and long: no profile
        ("lm", {"batch": 7, "seq": 1, "past": 10}, "batch 7"),
        ("lm", {"batch": 2, "seq": 3, "past": 5}, "seq 3"),                # chunked prefill: not planned
        ("lm", {"batch": 1, "seq": 101, "past": 0}, "seq 101"),
        ("acoustic_encoder", {"batch": 1, "samples": 48000 + 3200}, "samples 51200"),
        ("acoustic_decoder", {"batch": 5}, "batch 5"),
    ]:
        with pytest.raises(RuntimeInputError) as info:
            plan_limits.check_fits(graph, dims)
        msg = str(info.value)
        assert "\n" not in msg and msg.startswith(f"{graph}: ") and named in msg, msg
        assert "plan 'limits-test'" in msg and f"vv-export trt --engine-dir {tiny_engine_dir}" in msg
    with pytest.raises(RuntimeInputError) as info:
        plan_limits.check_fits("lm", {"batch": 6, "seq": 1, "past": 1500})
    msg = str(info.value)
    assert "decode-long: batch 1..2" in msg and "decode: batch 1..6" in msg and "past 1..1023" in msg


def test_check_fits_by_input_shapes(plan_limits, manifest):
    m = manifest["model"]
    L, KV, D, H = m["num_layers"], m["num_kv_heads"], m["head_dim"], m["hidden_size"]

    def lm(rows, seq, past):
        return {"inputs_embeds": (rows, seq, H), "attention_mask": (rows, past + seq),
                "position_ids": (rows, seq), "past_kv": (L, 2, rows, KV, past, D)}

    assert plan_limits.fitting_profile("lm", lm(6, 1, 1023)) == 2
    assert plan_limits.fitting_profile("lm", lm(2, 40, 0)) == 0
    with pytest.raises(RuntimeInputError, match="past_kv"):
        plan_limits.check_fits("lm", lm(6, 1, 1024))
    with pytest.raises(ValueError, match="not an input"):
        plan_limits.check_fits("lm", {"hidden": (1, H)})
    with pytest.raises(ValueError, match="not one of its engine's"):
        plan_limits.check_fits("lm", {"frames": 3})
    with pytest.raises(RuntimeInputError, match="no TensorRT engine is loaded for graph 'diffusion_step'"):
        plan_limits.check_fits("diffusion_step", {"batch": 1})  # auxiliary: not loaded


def test_ort_backend_has_no_limits(tiny_engine_dir, manifest):
    backend = OrtBackend(tiny_engine_dir, manifest, providers=["CPUExecutionProvider"])
    try:
        assert backend.limits() is None
        assert backend.check_fits("lm", {"batch": 10_000, "seq": 1, "past": 10**6}) is None
        from vv_runtime.manifest import required_graphs

        assert sorted(backend.sessions) == sorted(required_graphs(manifest))  # the loop's graphs only
    finally:
        backend.close()


# --- which engines TrtBackend loads -----------------------------------------------------------------

def test_auxiliary_engines_are_not_needed(tmp_path, manifest):
    """Without `graphs=`, TrtBackend needs only the loop's engines: missing auxiliary engine files do not
    stop it (here it then stops at TensorRT itself); asked for every graph, it names the missing one."""
    from vv_runtime.manifest import graphs_with_role

    m = _with_engines(manifest, tmp_path)
    auxiliary = graphs_with_role(m, "auxiliary")
    assert sorted(auxiliary) == ["acoustic_connector", "diffusion_step", "semantic_connector"]
    for graph, rec in m["trt"]["engines"].items():
        if graph not in auxiliary:
            (tmp_path / rec["file"]).write_bytes(b"x")
    ok, reason = trt_engines_match(tmp_path, m)
    assert "is missing" not in reason
    with pytest.raises(TrtBackendError) as info:
        TrtBackend(tmp_path, m)
    assert "is missing" not in str(info.value)
    ok, reason = trt_engines_match(tmp_path, m, graphs=list(m["graphs"]))
    assert not ok and "is missing" in reason and "acoustic_connector" in reason
    with pytest.raises(TrtBackendError, match="acoustic_connector.* is missing"):
        TrtBackend(tmp_path, m, graphs=list(m["graphs"]))


# --- LM decode CUDA graphs: which calls, keys, stale graphs (pure) -----------------------------------

def test_decode_calls_are_recognised():
    lm_decode = {"inputs_embeds": (4, 1, 64), "attention_mask": (4, 129), "position_ids": (4, 1),
                 "past_kv": (2, 2, 4, 2, 128, 16)}
    prefill = {**lm_decode, "inputs_embeds": (4, 7, 64), "position_ids": (4, 7)}
    assert trt_backend.is_decode_call("lm", lm_decode, {"past_kv": object()})
    assert not trt_backend.is_decode_call("lm", lm_decode, {})                  # host cache: plain runs
    assert not trt_backend.is_decode_call("lm", prefill, {"past_kv": object()})  # prefill: plain
    assert not trt_backend.is_decode_call("acoustic_decoder", {"latent": (1, 1, 16)}, {"past_kv": object()})


def test_graph_keys():
    inputs = ["inputs_embeds", "past_kv"]
    key = trt_backend.graph_key(inputs, {"inputs_embeds": (4, 1, 64), "past_kv": (2, 2, 4, 2, 128, 16)},
                                {"past_kv": 0x7000})
    assert key == (((4, 1, 64), (2, 2, 4, 2, 128, 16)), (("past_kv", 0x7000),))
    # same shapes, the cache at another address (another request's cache, or grown): another graph
    moved = trt_backend.graph_key(inputs, {"inputs_embeds": (4, 1, 64), "past_kv": (2, 2, 4, 2, 128, 16)},
                                  {"past_kv": 0x9000})
    bucket = trt_backend.graph_key(inputs, {"inputs_embeds": (4, 1, 64), "past_kv": (2, 2, 4, 2, 256, 16)},
                                   {"past_kv": 0x9000})
    assert len({key, moved, bucket}) == 3


def test_one_graph_per_context_recaptured_on_a_new_key():
    """ContextSlot: at most one graph per profile context; a new key drops it and captures again, a
    failed capture leaves the context plain, stale addresses drop the graph."""
    shapes = {"x": (4, 1, 64), "past_kv": (2, 2, 4, 2, 128, 16)}
    k1 = trt_backend.graph_key(["x", "past_kv"], shapes, {"past_kv": 0x7000, "x": 0x100})
    k2 = trt_backend.graph_key(["x", "past_kv"], {**shapes, "past_kv": (2, 2, 4, 2, 256, 16)},
                               {"past_kv": 0x9000, "x": 0x100})
    slot = trt_backend.ContextSlot(1, context="ctx")
    assert slot.decide(k1) == "capture"
    slot.store(k1, "graph-1", {"y": (4, 1)})
    assert slot.decide(k1) == "replay" and slot.out_shapes == {"y": (4, 1)} and slot.captures == 1
    assert slot.decide(k2) == "capture" and slot.graph is None and slot.dropped == 1  # old one dropped first
    slot.store(k2, "graph-2", {"y": (4, 1)})
    assert slot.decide(k1) == "capture"                  # back to k1: one graph per context, so re-capture
    slot.store(k1, "graph-1b", {"y": (4, 1)})
    assert slot.forget_address(0x9000) is False          # not bound there (k2's graph is gone already)
    assert slot.forget_address(0x7000) is True and slot.graph is None and slot.key is None
    assert slot.decide(k1) == "capture"
    slot.store(k1, None, None)                           # capture impossible here: plain from now on
    assert slot.graphs is False and slot.decide(k1) == "plain" and slot.captures == 3
    assert trt_backend.ContextSlot(0, graphs=False).decide(k1) == "plain"


def test_per_frame_padding_to_the_profile_maximum():
    """Per-frame calls are padded to the chosen profile's maximum batch (one shape per profile context):
    batched inputs only (cfg_scale [1] stays), zero rows appended."""
    import numpy as np

    profiles = [{"noise": ((b0, 16), (b1, 16), (b1, 16)), "cfg_scale": ((1,), (1,), (1,))}
                for b0, b1 in ((1, 1), (2, 2), (3, 4), (5, 8), (9, 16))]
    eng = _engine_stub(profiles, ["noise", "cfg_scale"])
    eng.profile_names = [f"rows{p['noise'][2][0]}" for p in profiles]
    for rows, profile, padded in ((1, 0, 1), (2, 1, 2), (3, 2, 4), (4, 2, 4), (5, 3, 8), (11, 4, 16), (16, 4, 16)):
        shapes = {"noise": (rows, 16), "cfg_scale": (1,)}
        p = eng.pick_profile(shapes)
        assert p == profile, rows
        assert trt_backend.padded_shapes(shapes, {"noise"}, profiles[p]) == {"noise": (padded, 16), "cfg_scale": (1,)}
    with pytest.raises(CapacityError):
        eng.pick_profile({"noise": (17, 16), "cfg_scale": (1,)})
    a = np.arange(6, dtype=np.float32).reshape(3, 2)
    padded = trt_backend.pad_rows(a, 4)
    assert padded.shape == (4, 2) and (padded[:3] == a).all() and (padded[3] == 0).all()
    assert trt_backend.pad_rows(a, 3) is a


def test_staging_pads_with_zero_rows_in_the_fixed_buffers():
    """_stage writes the caller's rows and zeros beyond them into the binding buffers (CPU tensors stand
    in for device memory), host arrays and device feeds alike, at a fixed address."""
    import types

    import numpy as np

    torch = pytest.importorskip("torch")
    eng = object.__new__(trt_backend._Engine)
    eng.owner = types.SimpleNamespace(torch=torch)
    eng.buffers = {n: trt_backend._Buffer(torch, "cpu", torch.float32, 64, 1 << 20) for n in ("a", "b")}
    before = {n: b.ptr for n, b in eng.buffers.items()}
    eng.buffers["a"].tensor.fill_(7.0)
    eng.buffers["b"].tensor.fill_(7.0)
    eng._stage({"a": np.ones((3, 2), np.float32)}, {"b": torch.full((1, 2), 2.0)}, {"a": (4, 2), "b": (4, 2)})
    assert eng.buffers["a"].view((4, 2)).tolist() == [[1, 1]] * 3 + [[0, 0]]
    assert eng.buffers["b"].view((4, 2)).tolist() == [[2, 2]] + [[0, 0]] * 3
    assert {n: b.ptr for n, b in eng.buffers.items()} == before


def test_one_context_per_profile_sharing_one_scratch(cpu_torch):
    """_create_contexts: context p holds profile p (set explicitly for p > 0, never switched), every context
    is given the same scratch buffer, sized to the largest of the engine's and the per-profile sizes.
    The stand-in engine only records the TensorRT calls (no execution)."""
    import types

    torch = cpu_torch
    calls = []

    class Context:
        def __init__(self, i):
            self.i, self.profile, self.memory = i, 0 if i == 0 else None, None

        def set_optimization_profile_async(self, p, stream):
            calls.append((self.i, p))
            self.profile = p
            return True

        def set_device_memory(self, ptr, size):
            self.memory = (ptr, size)

    class Engine:
        device_memory_size_v2 = 1000
        created = []

        def get_device_memory_size_for_profile_v2(self, p):
            return [300, 1500, 800][p]

    def create_context(engine, user_managed=False, multi_profile=False):
        ctx = Context(len(Engine.created))
        Engine.created.append(ctx)
        return ctx, user_managed

    owner = types.SimpleNamespace(torch=torch, device="cpu", cuda_graphs=True, create_context=create_context,
                                  stream=types.SimpleNamespace(cuda_stream=0, synchronize=lambda: None))
    eng = object.__new__(trt_backend._Engine)
    eng.owner, eng.graph, eng.engine, eng.num_profiles = owner, "lm", Engine(), 3
    eng.profile_names, eng.per_frame, eng.scratch = ["prefill", "decode", "extend"], False, None
    slots = eng._create_contexts()
    assert [s.profile for s in slots] == [0, 1, 2] and [s.context.profile for s in slots] == [0, 1, 2]
    assert calls == [(1, 1), (2, 2)]                        # profile 0: the first context has it already
    assert eng.scratch.numel() == 1500                       # the largest per-profile size
    assert {s.context.memory for s in slots} == {(eng.scratch.data_ptr(), 1500)}
    assert all(s.graphs for s in slots)                      # the LM: decode graphs possible on its contexts
    assert trt_backend._max_device_memory_size(types.SimpleNamespace(device_memory_size_v2=5), 2) == 5


def test_refused_profile_is_a_load_error(cpu_torch):
    import types

    torch = cpu_torch
    ctx = types.SimpleNamespace(set_optimization_profile_async=lambda p, s: False, set_device_memory=lambda *a: None)
    owner = types.SimpleNamespace(torch=torch, device="cpu", cuda_graphs=True,
                                  create_context=lambda engine, user_managed=False: (ctx, True),
                                  stream=types.SimpleNamespace(cuda_stream=0, synchronize=lambda: None))
    eng = object.__new__(trt_backend._Engine)
    eng.owner, eng.graph, eng.engine, eng.num_profiles = owner, "lm", types.SimpleNamespace(), 2
    eng.profile_names, eng.per_frame, eng.scratch = ["prefill", "decode"], False, None
    with pytest.raises(TrtBackendError, match="profile decode"):
        eng._create_contexts()


def test_execution_failures_are_backend_faults():
    import types

    eng = object.__new__(trt_backend._Engine)
    eng.graph = "acoustic_decoder"
    eng.owner = types.SimpleNamespace(stream=types.SimpleNamespace(cuda_stream=0))
    with pytest.raises(BackendFault, match="acoustic_decoder: TensorRT execution failed"):
        eng._execute(types.SimpleNamespace(execute_async_v3=lambda stream: False))
    assert not issubclass(BackendFault, RuntimeInputError)


def test_device_cache_growth_drops_the_graphs_of_its_old_buffer(cpu_torch):
    """A DeviceKVCache that grows to the next bucket moves: the backend is told the old address, and a
    context slot whose graph is bound there drops it; so does closing or collecting the cache (CPU tensors
    stand in for CUDA memory)."""
    import types

    torch = cpu_torch
    slot, forgotten, forget = _forgetting_slot()

    fake = types.SimpleNamespace(torch=torch, device=torch.device("cpu"), stream=None, forget_address=forget)
    cache = trt_backend.DeviceKVCache(fake, (1, 2, 2, 1, 1024, 4))
    first = cache.past(10)
    key = trt_backend.graph_key(["past_kv"], {"past_kv": tuple(first.shape)}, {"past_kv": first.data_ptr()})
    slot.store(key, "graph of the 64-slot bucket", {})
    assert cache.past(63).data_ptr() == first.data_ptr() and not forgotten  # same bucket: same address
    grown = cache.past(64)                                                      # 65 slots: the 128 bucket
    assert tuple(grown.shape)[4] == 128 and forgotten == [first.data_ptr()] and slot.graph is None
    # closed (or collected): its buffer's graphs go too, once
    key = trt_backend.graph_key(["past_kv"], {"past_kv": tuple(grown.shape)}, {"past_kv": grown.data_ptr()})
    slot.store(key, "graph of the 128-slot bucket", {})
    address = grown.data_ptr()
    del grown
    cache.close()
    assert forgotten[-1] == address and slot.graph is None and cache.data is None
    other = trt_backend.DeviceKVCache(fake, (1, 2, 2, 1, 1024, 4))
    address = other.data.data_ptr()
    del other
    import gc

    gc.collect()
    assert forgotten[-1] == address


# --- the CUDA-graph seam: a stand-in execution context under the backend's own _run ------------------

class _RecordingContext:
    """Stands in for a TensorRT execution context (which needs a GPU): records what the backend binds and
    executes; the output new_kv takes inputs_embeds' shape."""

    def __init__(self, accept_addresses=True):
        self.shapes, self.addresses, self.executions = {}, {}, 0
        self.accept_addresses = accept_addresses

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        return self.shapes["inputs_embeds"]

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return self.accept_addresses

    def execute_async_v3(self, stream):
        self.executions += 1
        return True


class _Graph:
    def __init__(self, key):
        self.key, self.replays = key, 0

    def replay(self):
        self.replays += 1


def _lm_engine_stub(monkeypatch, context, cache_on_device=False):
    """An `lm` _Engine with one profile (inputs_embeds [rows, seq, 4], past_kv [rows, slots]) whose context is
    `context`, CPU tensors standing in for device memory, and a capture that records the key it was
    captured at: the backend's own _run / _run_graph / _bind / ContextSlot code runs unchanged."""
    import contextlib
    import types

    torch = pytest.importorskip("torch")
    for name in ("device", "stream"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: None)
    owner = types.SimpleNamespace(torch=torch, device=torch.device("cpu"), cache_on_device=cache_on_device,
                                  stream=types.SimpleNamespace(cuda_stream=0, wait_stream=lambda other: None))
    eng = object.__new__(trt_backend._Engine)
    eng.owner, eng.graph, eng.per_frame = owner, "lm", False
    eng.inputs, eng.outputs = ["inputs_embeds", "past_kv"], ["new_kv"]
    eng.torch_dtypes = {"inputs_embeds": torch.float32, "past_kv": torch.float32, "new_kv": torch.float32}
    eng.np_dtypes = {"inputs_embeds": np.dtype(np.float32), "past_kv": np.dtype(np.float32)}
    eng.batched_inputs, eng.batched_outputs = {"inputs_embeds"}, {"new_kv"}
    eng.profiles = [{"inputs_embeds": ((1, 1, 4), (2, 1, 4), (4, 8, 4)), "past_kv": ((1, 1), (2, 64), (4, 256))}]
    eng.profile_names, eng.notes = ["decode"], []
    eng.slots = [trt_backend.ContextSlot(0, context, graphs=True)]
    eng.buffers = {n: trt_backend._Buffer(torch, "cpu", torch.float32, 4096, 1 << 20) for n in eng.inputs + eng.outputs}
    eng._capture = lambda ctx, key: _Graph(key)
    return eng, torch


import numpy as np  # noqa: E402  (the stand-in tests above use it too)


def test_plain_run_on_the_decode_context_drops_its_graph(monkeypatch):
    """A decode step captures the profile context's graph and the same step replays it; a plain call on
    that context with other shapes (a one-token host-cache call, validation feeds) re-binds it, so the
    graph goes: the next decode step with the old key captures anew (binding again) instead of replaying
    on the plain call's bindings."""
    context = _RecordingContext()
    eng, torch = _lm_engine_stub(monkeypatch, context)
    slot = eng.slots[0]
    cache = torch.zeros((2, 64))
    step = {"inputs_embeds": np.ones((2, 1, 4), np.float32), "past_kv": cache}
    eng.run(step)
    assert slot.captures == 1 and slot.graph is not None and context.executions == 1
    eng.run(step)
    assert slot.graph.replays == 1 and context.executions == 1            # replayed: no execution, no binding
    captured = slot.key
    eng.run({"inputs_embeds": np.ones((3, 1, 4), np.float32), "past_kv": np.zeros((3, 128), np.float32)})  # plain, host cache
    assert slot.graph is None and slot.dropped == 1 and context.shapes["inputs_embeds"] == (3, 1, 4)
    eng.run(step)                                                          # the old key: bound and captured again
    assert slot.captures == 2 and slot.key == captured and context.shapes["inputs_embeds"] == (2, 1, 4)
    assert context.addresses["past_kv"] == cache.data_ptr()
    eng.run({"inputs_embeds": np.ones((2, 1, 4), np.float32), "past_kv": np.zeros((2, 64), np.float32)})
    assert slot.graph is None                                              # same shapes, another address: dropped too
    assert slot.plain_runs == 4                                            # 2 capture warm-ups + 2 plain calls


def test_plain_run_at_the_graph_key_keeps_it():
    shapes = {"x": (2, 1, 4), "past_kv": (2, 64)}
    key = trt_backend.graph_key(["x", "past_kv"], shapes, {"x": 1, "past_kv": 2})
    slot = trt_backend.ContextSlot(0, context="ctx")
    slot.store(key, "graph", {})
    slot.ran_plain(key)                                                    # the same bindings: still valid
    assert slot.decide(key) == "replay" and slot.plain_runs == 1
    slot.ran_plain(trt_backend.graph_key(["x", "past_kv"], {**shapes, "x": (2, 2, 4)}, {"x": 1, "past_kv": 2}))
    assert slot.graph is None and slot.decide(key) == "capture"


def test_lm_new_kv_stays_on_the_device_while_a_device_cache_is_open(monkeypatch):
    """new_kv of an lm call fed numpy (a prefill from nothing) is a device tensor while the backend has a
    device cache open, numpy otherwise (the accuracy checks)."""
    eng, torch = _lm_engine_stub(monkeypatch, _RecordingContext())
    prefill = {"inputs_embeds": np.ones((1, 5, 4), np.float32), "past_kv": np.zeros((1, 1), np.float32)}
    assert isinstance(eng.run(prefill)["new_kv"], np.ndarray)
    eng.owner.cache_on_device = True
    out = eng.run(prefill)["new_kv"]
    assert isinstance(out, torch.Tensor) and tuple(out.shape) == (1, 5, 4)
    assert out.data_ptr() != eng.buffers["new_kv"].ptr                    # a copy: the next call reuses the buffer


def test_backend_knows_whether_a_device_cache_is_open(cpu_torch):
    import gc
    import weakref

    torch = cpu_torch
    backend = object.__new__(TrtBackend)
    backend.torch, backend.device, backend.stream, backend.engines = torch, torch.device("cpu"), None, {}
    backend._caches = weakref.WeakSet()
    backend.kv_pool = None
    assert not backend.cache_on_device
    cache = trt_backend.DeviceKVCache(backend, (1, 2, 2, 1, 128, 4))
    assert backend.cache_on_device
    cache.close()
    assert not backend.cache_on_device
    other = trt_backend.DeviceKVCache(backend, (1, 2, 2, 1, 128, 4))
    assert backend.cache_on_device
    del other
    gc.collect()
    assert not backend.cache_on_device


def test_refused_tensor_address_is_a_backend_fault(monkeypatch):
    eng, _ = _lm_engine_stub(monkeypatch, _RecordingContext(accept_addresses=False))
    with pytest.raises(BackendFault, match="lm: TensorRT refuses the device address of 'inputs_embeds'") as info:
        eng.run({"inputs_embeds": np.ones((2, 1, 4), np.float32), "past_kv": np.zeros((2, 64), np.float32)})
    assert "\n" not in str(info.value)


def test_profile_refusal_raised_by_the_bindings_is_the_one_line_error(cpu_torch):
    """TensorRT's Python bindings raise where the C++ set_optimization_profile_async returns false: the
    same one-line load error either way."""
    import types

    torch = cpu_torch

    def refuse(p, stream):
        raise RuntimeError("[executionContext.cpp::setOptimizationProfileInternal::1] Error Code 3: API Usage Error\n"
                           "(profile index out of range)")

    ctx = types.SimpleNamespace(set_optimization_profile_async=refuse, set_device_memory=lambda *a: None)
    owner = types.SimpleNamespace(torch=torch, device="cpu", cuda_graphs=True,
                                  create_context=lambda engine, user_managed=False: (ctx, True),
                                  stream=types.SimpleNamespace(cuda_stream=0, synchronize=lambda: None))
    eng = object.__new__(trt_backend._Engine)
    eng.owner, eng.graph, eng.engine, eng.num_profiles = owner, "lm", types.SimpleNamespace(), 2
    eng.profile_names, eng.per_frame, eng.scratch = ["prefill", "decode"], False, None
    with pytest.raises(TrtBackendError) as info:
        eng._create_contexts()
    message = str(info.value)
    assert message.startswith("lm: TensorRT refuses an execution context for optimisation profile decode (1 of 2): ")
    assert "API Usage Error" in message and "\n" not in message


def test_close_synchronises_the_stream_before_destroying_contexts():
    import types

    order = []
    backend = object.__new__(TrtBackend)
    backend.torch = object()
    backend.stream = types.SimpleNamespace(synchronize=lambda: order.append("synchronize"))
    backend.engines = {"lm": types.SimpleNamespace(close=lambda: order.append("close lm"))}
    backend.kv_pool = trt_backend.KVBufferPool(allocate=None, zero=None, nbytes=lambda b: 0,
                                               release=lambda b: order.append(f"release {b}"))
    backend.kv_pool.free = [((1,), "buffer")]
    backend.close()
    assert order == ["synchronize", "close lm", "release buffer"] and backend.stream is None


# --- LM cache buffers kept across generations (KVBufferPool) -----------------------------------------

def test_kv_buffer_pool_hands_back_the_same_buffer():
    """Pure bookkeeping, numpy buffers: a buffer given back is handed out again for its exact shape,
    zeroed; other shapes allocate; beyond max_bytes the oldest are released; an allocation that runs out
    of memory releases the pool and is tried once more."""
    released, allocations = [], []

    def allocate(shape):
        allocations.append(shape)
        return np.zeros(shape, np.float32)

    pool = trt_backend.KVBufferPool(allocate, zero=lambda b: b.fill(0), nbytes=lambda b: b.nbytes,
                                    release=released.append, max_bytes=3 * 64 * 4)
    a = pool.take((64,))
    a[:] = 7
    pool.give(a)
    b = pool.take((64,))
    assert b is a and not b.any() and pool.reused == 1 and allocations == [(64,)]
    c = pool.take((128,))
    assert c is not a and allocations == [(64,), (128,)]
    pool.give(b)
    pool.give(c)                                        # 3 x 64 floats: at the limit, nothing released
    assert released == [] and pool.held_bytes == 3 * 64 * 4
    d = pool.take((32,))                                # another shape: allocated, the pooled ones stay
    pool.give(d)                                        # over the limit: the oldest (b) goes
    assert [r is b for r in released] == [True] and pool.take((128,)) is c
    huge = np.zeros(1000, np.float32)
    pool.give(huge)                                     # larger than the pool: released at once
    assert released[-1] is huge

    failures = [MemoryError("out of memory")]

    def scarce(shape):
        if failures:
            raise failures.pop()
        return np.zeros(shape, np.float32)

    tight = trt_backend.KVBufferPool(scarce, zero=lambda b: b.fill(0), nbytes=lambda b: b.nbytes,
                                     release=released.append)
    tight.free = [((8,), np.zeros(8, np.float32))]
    assert tight.take((16,)).shape == (16,) and tight.free == []    # pool released, allocation retried
    failures.append(MemoryError("out of memory"))
    with pytest.raises(MemoryError):
        tight.take((16,))                                           # nothing pooled to release: the error stands


def test_next_cache_gets_the_buffer_and_replays_the_graph(cpu_torch):
    """Across generations (CPU tensors stand in for device memory): a cache that grows or closes gives its
    buffer to the backend's pool without dropping the graph bound there; the next cache of that shape gets
    the very buffer back, so the decode step's key is the captured one and the graph replays. A buffer the
    pool lets go drops its graph."""
    import gc
    import types

    torch = cpu_torch
    slot, forgotten, forget = _forgetting_slot()

    pool = trt_backend.KVBufferPool(lambda shape: torch.zeros(shape), zero=lambda b: b.zero_(),
                                    nbytes=lambda b: b.numel() * b.element_size(),
                                    release=lambda b: forget(b.data_ptr()), max_bytes=1 << 20)
    backend = types.SimpleNamespace(torch=torch, device=torch.device("cpu"), stream=None, kv_pool=pool,
                                    forget_address=forget)
    shape = (1, 2, 2, 1, 1024, 4)

    def decode_key(past):
        return trt_backend.graph_key(["past_kv"], {"past_kv": tuple(past.shape)}, {"past_kv": past.data_ptr()})

    first = trt_backend.DeviceKVCache(backend, shape)
    past = first.past(100)                                  # the 128-slot bucket (the 64 one went to the pool)
    past[0, 0, 0, 0, :5] = 1.0
    assert slot.decide(decode_key(past)) == "capture"
    slot.store(decode_key(past), "graph at the 128 bucket", {})
    address = past.data_ptr()
    del past
    first.close()                                           # generation over: buffer pooled, graph kept
    assert slot.graph is not None and not forgotten
    second = trt_backend.DeviceKVCache(backend, shape)      # the next generation
    again = second.past(100)
    assert again.data_ptr() == address and not again.any()  # the same memory, zeroed
    assert slot.decide(decode_key(again)) == "replay"
    assert pool.reused == 2 and pool.allocated == 2          # the 64 and 128 buffers, each allocated once
    del again
    second.close()
    gc.collect()
    pool.max_bytes = 0
    pool.give(torch.zeros(1))                                # over the limit: every pooled buffer released
    assert address in forgotten and slot.graph is None


def test_batched_row_write_equals_row_by_row_on_onnxrt(tiny_engine_dir, manifest, cpu_torch):
    """The TensorRT path's cache (DeviceKVCache, here on CPU tensors) written by one batched write_rows of
    a real decode step (the lm graph on ONNX Runtime) holds what one write per row gives, and the next
    decode step from either cache gives the same outputs."""
    import types

    torch = cpu_torch
    from vv_export.graph_rules import cpu_session

    backend = types.SimpleNamespace(torch=torch, device=torch.device("cpu"), stream=None)
    m = manifest["model"]
    L, KV, D, H = m["num_layers"], m["num_kv_heads"], m["head_dim"], m["hidden_size"]
    session = cpu_session(str(tiny_engine_dir / manifest["graphs"]["lm"]["file"]))
    rng = np.random.default_rng(0)
    rows, shape = 4, (L, 2, 4, KV, 512, D)
    batched, one_by_one = trt_backend.DeviceKVCache(backend, shape), trt_backend.DeviceKVCache(backend, shape)
    lengths = np.array([3, 70, 9, 33])                      # each row at its own position, one beyond a bucket
    prompt = rng.standard_normal((L, 2, rows, KV, 70, D)).astype(np.float32)
    for cache in (batched, one_by_one):
        cache.write(slice(0, rows), 0, torch.from_numpy(prompt))
    mask = (np.arange(128)[None] < lengths[:, None]).astype(np.int64)

    def step(cache, seed):
        r = np.random.default_rng(seed)
        past = cache.past(int(lengths.max()))
        feed = np.concatenate([mask[:, : past.shape[4]], np.ones((rows, 1), np.int64)], axis=1)
        names = [o.name for o in session.get_outputs()]
        out = session.run(names, {"inputs_embeds": r.standard_normal((rows, 1, H)).astype(np.float32),
                                  "attention_mask": feed, "position_ids": lengths[:, None].astype(np.int64),
                                  "past_kv": past.numpy()})
        return dict(zip(names, out))

    out = step(batched, 1)
    assert out["new_kv"].shape == (L, 2, rows, KV, 1, D)
    batched.write_rows(torch.from_numpy(out["new_kv"]), np.arange(rows), lengths)
    for r, slot in enumerate(lengths):
        one_by_one.write(slice(r, r + 1), int(slot), torch.from_numpy(out["new_kv"][:, :, r:r + 1]))
    np.testing.assert_array_equal(batched.numpy(), one_by_one.numpy())
    mask[np.arange(rows), lengths] = 1
    lengths = lengths + 1
    a, b = step(batched, 2), step(one_by_one, 2)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


# --- on a GPU: LM decode steps replayed as CUDA graphs (`make check-accuracy` runs -m gpu) ------------

_NO_GPU = tensorrt_gpu_unavailable()


@pytest.mark.gpu
@pytest.mark.skipif(_NO_GPU is not None, reason=_NO_GPU or "")
def test_decode_graphs_replay_the_plain_execution(tiny_engine_dir, tmp_path):
    """An fp32 lm engine (plan ci): decode steps on the device cache are captured once per (shape, cache
    address), replayed with new host inputs and equal plain execution; the next cache of that shape (the
    next generation's) gets the pooled buffer back and replays the same graph; a plain call on the decode
    profile drops it."""
    import shutil

    import numpy as np
    import torch

    from vv_export.trt_build import build_engines
    from vv_runtime.manifest import load_manifest

    out = tmp_path / "tiny"
    shutil.copytree(tiny_engine_dir, out)
    build_engines(out, plan="ci", precision="fp32", graphs=["lm"], progress=lambda line: None)
    manifest = load_manifest(out)
    notes = []
    graphs = TrtBackend(out, manifest, graphs=["lm"], notice=notes.append)
    plain = TrtBackend(out, manifest, graphs=["lm"], cuda_graphs=False)
    try:
        m = manifest["model"]
        L, KV, D, H = m["num_layers"], m["num_kv_heads"], m["head_dim"], m["hidden_size"]
        rows, live = 2, 10
        rng = np.random.default_rng(0)
        cache = graphs.kv_cache((L, 2, rows, KV, 4096, D))
        cache.write(slice(0, rows), 0, rng.standard_normal((L, 2, rows, KV, live, D)).astype(np.float32))
        past = cache.past(live)
        slots = int(past.shape[4])

        def step(backend, kv, seed):
            r = np.random.default_rng(seed)
            mask = np.zeros((rows, slots + 1), dtype=np.int64)
            mask[:, :live] = 1
            mask[:, -1] = 1
            feeds = {"inputs_embeds": r.standard_normal((rows, 1, H)).astype(np.float32), "attention_mask": mask,
                     "position_ids": np.full((rows, 1), live, dtype=np.int64), "past_kv": kv}
            got = backend.run("lm", feeds)
            return {k: (v.cpu().numpy() if isinstance(v, torch.Tensor) else v) for k, v in got.items()}

        lm = graphs.engines["lm"]
        for seed in (1, 2, 3):  # capture, then two replays with other host inputs
            got = step(graphs, past, seed)
            want = step(plain, past.clone(), seed)
            for name in want:
                np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=f"{name} seed {seed}")
        decode = lm.slots[lm.pick_profile({"inputs_embeds": (rows, 1, H), "attention_mask": (rows, slots + 1),
                                           "position_ids": (rows, 1), "past_kv": tuple(past.shape)})]
        assert decode.graph is not None, f"no CUDA graph captured: {notes}"
        stats = graphs.graph_stats()["lm"]
        assert stats["captures"] == 1 and stats["replays"] == 2 and stats["profile_contexts"] == lm.num_profiles
        address = past.data_ptr()
        del past
        cache.close()                                     # the generation ends: its buffer goes to the pool
        assert decode.graph is not None
        cache = graphs.kv_cache((L, 2, rows, KV, 4096, D))  # the next generation
        cache.write(slice(0, rows), 0, rng.standard_normal((L, 2, rows, KV, live, D)).astype(np.float32))
        past = cache.past(live)
        assert past.data_ptr() == address
        got, want = step(graphs, past, 4), step(plain, past.clone(), 4)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=f"{name} next cache")
        stats = graphs.graph_stats()["lm"]
        assert stats["captures"] == 1 and stats["replays"] == 3, stats
        step(graphs, past.cpu().numpy(), 5)               # a host-cache call on the decode profile: plain
        assert decode.graph is None
        assert graphs.limits()["plan"] == "ci" and plain.limits() == graphs.limits()
        with pytest.raises(RuntimeInputError, match="beyond the TensorRT plan 'ci'"):
            graphs.check_fits("lm", {"batch": rows, "seq": 1, "past": 10**6})
    finally:
        graphs.close()
        plain.close()
