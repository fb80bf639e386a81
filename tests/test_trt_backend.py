"""The TensorRT backend's CPU-checkable parts: refusals (one line, naming both sides), `trt_engines_match`,
the `auto` fallback, profile choice, buffer growth, and that nothing imports torch/tensorrt eagerly.

Running engines needs a GPU: tests/test_trt_accuracy.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vv_runtime import trt_backend
from vv_runtime.backend import OrtBackend, select_backend
from vv_runtime.errors import RuntimeInputError
from vv_runtime.trt_backend import TrtBackend, TrtBackendError, trt_engines_match


@pytest.fixture()
def manifest(tiny_engine_dir):
    return json.loads((tiny_engine_dir / "manifest.json").read_text())


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
    with pytest.raises(TrtBackendError) as info:
        eng.pick_profile({"x": (2, 3), "kv": (2, 5)})            # chunked prefill: not planned
    msg = str(info.value)
    assert "outside every optimisation profile" in msg and "prefill" in msg and "decode" in msg
    with pytest.raises(TrtBackendError):
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


def test_device_kv_cache_behaves_like_the_host_cache(monkeypatch):
    """DeviceKVCache's indexing (rows broadcast, slots, zeroing, past) equals HostKVCache's, here on CPU tensors."""
    import contextlib
    import types

    import numpy as np

    torch = pytest.importorskip("torch")
    from vv_runtime.backend import HostKVCache

    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
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


def test_graph_keys_and_stale_graphs():
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
    cache = trt_backend.GraphCache(capacity=2)
    assert cache.put(key, "a") == [] and cache.put(moved, "b") == []
    assert cache.get(key) == "a"                      # now the most recently used
    assert cache.put(bucket, "c") == [moved]          # the least recently used goes
    assert key in cache and bucket in cache and len(cache) == 2
    assert cache.forget_address(0x9000) == 1 and bucket not in cache and key in cache
    assert cache.forget_address(0x1234) == 0
    cache.clear()
    assert len(cache) == 0 and cache.get(key) is None


def test_device_cache_growth_drops_the_graphs_of_its_old_buffer(monkeypatch):
    """A DeviceKVCache that grows to the next bucket moves: the backend is told the old address, and a
    GraphCache keyed on it drops exactly the graphs bound there (CPU tensors stand in for CUDA memory)."""
    import contextlib
    import types

    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    graphs = trt_backend.GraphCache(8)
    forgotten = []

    def forget(address):
        forgotten.append(address)
        graphs.forget_address(address)

    fake = types.SimpleNamespace(torch=torch, device=torch.device("cpu"), stream=None, forget_address=forget)
    cache = trt_backend.DeviceKVCache(fake, (1, 2, 2, 1, 1024, 4))
    first = cache.past(10)
    key = trt_backend.graph_key(["past_kv"], {"past_kv": tuple(first.shape)}, {"past_kv": first.data_ptr()})
    graphs.put(key, "graph of the 64-slot bucket")
    assert cache.past(63).data_ptr() == first.data_ptr() and not forgotten  # same bucket: same address
    grown = cache.past(64)                                                      # 65 slots: the 128 bucket
    assert tuple(grown.shape)[4] == 128 and forgotten == [first.data_ptr()] and key not in graphs


# --- on a GPU: LM decode steps replayed as CUDA graphs (`make check-accuracy` runs -m gpu) ------------

def _no_gpu() -> str | None:
    try:
        import tensorrt  # noqa: F401
        import torch
    except Exception as exc:
        return f"TensorRT or PyTorch is not installed ({type(exc).__name__})"
    return None if torch.cuda.is_available() else "no CUDA GPU is visible to PyTorch"


@pytest.mark.gpu
@pytest.mark.skipif(_no_gpu() is not None, reason=_no_gpu() or "")
def test_decode_graphs_replay_the_plain_execution(tiny_engine_dir, tmp_path):
    """An fp32 lm engine (plan ci): decode steps on the device cache are captured once per (shape, cache
    address), replayed with new host inputs, equal plain execution, and a cache that grows drops them."""
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
        assert len(lm.decode_graphs) == 1, notes
        (_, cuda_graph, _), = lm.decode_graphs.entries.values()
        assert cuda_graph is not None, f"no CUDA graph captured: {notes}"
        cache.past(slots)  # grows to the next bucket: the buffer moves, its graphs go
        assert len(lm.decode_graphs) == 0
        assert graphs.limits()["plan"] == "ci" and plain.limits() == graphs.limits()
        with pytest.raises(RuntimeInputError, match="beyond the TensorRT plan 'ci'"):
            graphs.check_fits("lm", {"batch": rows, "seq": 1, "past": 10**6})
    finally:
        graphs.close()
        plain.close()
