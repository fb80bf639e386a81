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
