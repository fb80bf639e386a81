"""`vv-export trt` without a GPU: clean one-line refusals, engine names, manifest records, up-to-date logic.

The orchestration of `build_engines` (naming, records, skipping, forced rebuilds, stale engines, atomic
files, interruption) runs here with TensorRT's part replaced by a stub; the real build is in the GPU
suite (tests/test_trt_accuracy.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from vv_export import trt_build
from vv_export.errors import ExportError, TrtUnavailable
from vv_export.plans import PlanError, resolve_plan
from vv_export.engine_dir import update_manifest
from vv_export.trt_build import build_engines, engine_file_name, engine_is_current, expected_engine


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return True


@pytest.fixture()
def engine_dir(tiny_engine_dir, tmp_path):
    out = tmp_path / "tiny"
    shutil.copytree(tiny_engine_dir, out)
    return out


def _manifest(path):
    return json.loads((path / "manifest.json").read_text())


# --- refusals ------------------------------------------------------------------------------------

@pytest.mark.skipif(_has_tensorrt(), reason="TensorRT is installed here")
def test_build_without_tensorrt_is_one_line(engine_dir):
    with pytest.raises(TrtUnavailable) as info:
        build_engines(engine_dir, progress=lambda line: None)
    message = str(info.value)
    assert message.startswith("TensorRT is not installed") and "\n" not in message
    assert isinstance(info.value, ExportError)
    assert not (engine_dir / "trt").exists()
    assert "trt" not in _manifest(engine_dir)


def test_build_without_gpu_is_one_line(engine_dir, monkeypatch):
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.99.0"
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_build, "_cuda_device", lambda: None)
    with pytest.raises(TrtUnavailable) as info:
        build_engines(engine_dir, progress=lambda line: None)
    assert str(info.value).startswith("no CUDA GPU") and "\n" not in str(info.value)


def test_old_tensorrt_refused(monkeypatch):
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "8.6.1"
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    with pytest.raises(TrtUnavailable, match="TensorRT 8.6.1 is too old"):
        trt_build.trt_environment()


def test_plan_errors_come_before_tensorrt(engine_dir):
    with pytest.raises(PlanError, match="unknown \\(available"):
        build_engines(engine_dir, plan="no-such-plan", progress=lambda line: None)
    with pytest.raises(ExportError, match="not a directory"):
        build_engines(engine_dir / "nowhere", progress=lambda line: None)


@pytest.mark.skipif(_has_tensorrt(), reason="TensorRT is installed here")
def test_cli_refusal(engine_dir):
    """`vv-export trt` prints one line and exits 1."""
    exe = Path(sys.executable).parent / "vv-export"
    if not exe.exists():
        pytest.skip("vv-export is not installed next to this interpreter")
    proc = subprocess.run([str(exe), "trt", "--engine-dir", str(engine_dir)], capture_output=True, text=True)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: TensorRT is not installed"), proc.stderr


def test_cli_precision_fp8_names_the_plan(engine_dir):
    """`--precision fp8` is refused before TensorRT is needed, in one line that names `--plan fp8`."""
    exe = Path(sys.executable).parent / "vv-export"
    if not exe.exists():
        pytest.skip("vv-export is not installed next to this interpreter")
    proc = subprocess.run([str(exe), "trt", "--engine-dir", str(engine_dir), "--precision", "fp8"],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: --precision fp8: expected one of fp32, fp16, bf16 (fp8 is chosen per graph by a plan: --plan fp8)"]


# --- names and records ---------------------------------------------------------------------------

def test_engine_file_name():
    sha = "0123456789abcdef" * 4
    plan = "fedcba9876543210" * 4
    name = engine_file_name("lm", "10.8.0.43", "sm90", sha, plan, "bf16")
    assert name == "trt/lm.10.8.0.43.sm90.0123456789ab.fedcba987654.bf16.engine"
    assert engine_file_name("lm", "10.8.0.43", "90", sha, plan, "bf16") == name
    for bad in [("lm", "10.8 0", "sm90", sha, plan, "bf16"), ("lm", "10.8", "ampere", sha, plan, "bf16"),
                ("lm", "10.8", "sm90", sha, plan, "int8")]:
        with pytest.raises(ValueError):
            engine_file_name(*bad)


def test_expected_engine_and_currency(engine_dir):
    manifest = _manifest(engine_dir)
    plan = resolve_plan("default", manifest)
    gp = plan.graphs["lm"]
    rec = expected_engine(engine_dir, manifest, gp, "10.8.0.43", "sm90", "default")
    assert rec["file"] == engine_file_name("lm", "10.8.0.43", "sm90", manifest["graphs"]["lm"]["sha256"],
                                           gp.hash, "bf16")
    assert rec["onnx_sha256"] == manifest["graphs"]["lm"]["sha256"] and rec["plan_hash"] == gp.hash
    assert [p["name"] for p in rec["profiles"]] == [p.name for p in gp.profiles]
    assert {"prefill", "decode"} <= {p["name"] for p in rec["profiles"]}
    assert rec["profiles"][0]["dims"]["past"][2] == 0 and "total" in rec["profiles"][0]["dims"]
    assert rec["inputs"] == ["inputs_embeds", "attention_mask", "position_ids", "past_kv"]

    assert engine_is_current(engine_dir, None, rec) == (False, "not built yet")
    ok, why = engine_is_current(engine_dir, dict(rec), rec)
    assert not ok and "missing" in why
    (engine_dir / "trt").mkdir()
    (engine_dir / rec["file"]).write_bytes(b"engine")
    assert engine_is_current(engine_dir, {**rec, "size_bytes": 6}, rec) == (True, "up to date")
    ok, why = engine_is_current(engine_dir, {**rec, "size_bytes": 7}, rec)
    assert not ok and "recorded" in why
    newer = expected_engine(engine_dir, manifest, gp, "10.9.0.1", "sm90", "default")
    ok, why = engine_is_current(engine_dir, {**rec, "size_bytes": 6}, newer)
    assert not ok and why.startswith(("file changed", "trt_version changed"))


def test_update_manifest_is_atomic(engine_dir):
    before = _manifest(engine_dir)

    def boom(manifest):
        manifest["trt"] = {"engines": {}}
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        update_manifest(engine_dir, boom)
    assert _manifest(engine_dir) == before
    update_manifest(engine_dir, lambda m: m.setdefault("trt", {}).update(engines={"x": 1}))
    assert _manifest(engine_dir)["trt"]["engines"] == {"x": 1}
    assert not list(engine_dir.glob(".*.tmp"))


# --- orchestration with a stub TensorRT ----------------------------------------------------------

class _Stub:
    def __init__(self, monkeypatch, version="10.8.0.43", cc="sm90"):
        self.built = []
        self.fail_on = None
        env = trt_build.TrtEnv(trt=types.SimpleNamespace(), version=version, major=int(version.split(".")[0]),
                               compute_capability=cc, device_name="Stub GPU")
        monkeypatch.setattr(trt_build, "trt_environment", lambda: env)
        monkeypatch.setattr(trt_build, "build_engine_bytes", self.build)

    def build(self, env, onnx_path, gp, cache_path, work, progress):
        if self.fail_on == gp.graph:
            raise KeyboardInterrupt
        self.built.append((gp.graph, gp.precision))
        return f"{gp.graph}-{gp.precision}-engine".encode(), "weak" if gp.precision != "fp32" else "fp32", 3


def test_build_records_every_engine_and_skips_current_ones(engine_dir, monkeypatch):
    stub = _Stub(monkeypatch)
    lines = []
    result = build_engines(engine_dir, progress=lines.append)
    manifest = _manifest(engine_dir)
    graphs = list(manifest["graphs"])
    assert [g for g, _ in stub.built] == [g for g in trt_build.resolve_plan("default", manifest).graphs]
    assert set(result["engines"]) == set(graphs) == set(manifest["trt"]["engines"])
    for graph, rec in manifest["trt"]["engines"].items():
        path = engine_dir / rec["file"]
        assert path.read_bytes() == f"{graph}-{rec['precision']}-engine".encode()
        assert rec["trt_version"] == "10.8.0.43" and rec["compute_capability"] == "sm90"
        assert rec["onnx_sha256"] == manifest["graphs"][graph]["sha256"]
        assert rec["size_bytes"] == path.stat().st_size
        for key in ("file", "trt_version", "compute_capability", "onnx_sha256", "plan_hash", "precision", "profiles"):
            assert key in rec
    assert manifest["trt"]["plan"] == "default"
    assert sum("building" in ln for ln in lines) == len(graphs)
    assert sum(": built in" in ln for ln in lines) == len(graphs)

    # up to date: nothing rebuilt
    stub.built.clear()
    lines.clear()
    result = build_engines(engine_dir, progress=lines.append)
    assert stub.built == [] and all(e["status"] == "up to date" for e in result["engines"].values())
    assert sum("up to date" in ln for ln in lines) == len(graphs)

    # forced: everything rebuilt, under the same names
    build_engines(engine_dir, force=True, progress=lambda line: None)
    assert len(stub.built) == len(graphs)
    again = _manifest(engine_dir)["trt"]["engines"]
    assert {g: r["file"] for g, r in again.items()} == {g: r["file"] for g, r in manifest["trt"]["engines"].items()}
    assert all((engine_dir / r["file"]).is_file() for r in again.values())


def test_precision_change_replaces_the_old_engine(engine_dir, monkeypatch):
    stub = _Stub(monkeypatch)
    build_engines(engine_dir, graphs=["acoustic_decoder"], progress=lambda line: None)
    old = _manifest(engine_dir)["trt"]["engines"]["acoustic_decoder"]
    assert old["precision"] == "fp16"
    build_engines(engine_dir, graphs=["acoustic_decoder"], precision="fp32", progress=lambda line: None)
    new = _manifest(engine_dir)["trt"]["engines"]["acoustic_decoder"]
    assert new["precision"] == "fp32" and new["file"].endswith(".fp32.engine")
    assert (engine_dir / new["file"]).is_file() and not (engine_dir / old["file"]).exists()
    assert stub.built == [("acoustic_decoder", "fp16"), ("acoustic_decoder", "fp32")]


def test_new_tensorrt_version_rebuilds(engine_dir, monkeypatch):
    _Stub(monkeypatch, version="10.8.0.43")
    build_engines(engine_dir, graphs=["text_embed"], progress=lambda line: None)
    stub = _Stub(monkeypatch, version="10.9.0.34", cc="sm89")
    lines = []
    build_engines(engine_dir, graphs=["text_embed"], progress=lines.append)
    assert stub.built == [("text_embed", "fp32")]
    assert any("trt_version changed" in ln or "file changed" in ln for ln in lines)
    rec = _manifest(engine_dir)["trt"]["engines"]["text_embed"]
    assert ".10.9.0.34.sm89." in rec["file"]
    assert len(list((engine_dir / "trt").glob("text_embed.*.engine"))) == 1


def test_interrupted_build_leaves_no_engine(engine_dir, monkeypatch):
    stub = _Stub(monkeypatch)
    stub.fail_on = "lm"
    with pytest.raises(KeyboardInterrupt):
        build_engines(engine_dir, progress=lambda line: None)
    manifest = _manifest(engine_dir)
    assert set(manifest["trt"]["engines"]) == {"text_embed"}  # built before lm, recorded
    leftovers = [p.name for p in (engine_dir / "trt").iterdir()
                 if p.name.startswith(".") and not p.name.endswith(".lock")]
    assert leftovers == []
    assert not list((engine_dir / "trt").glob("lm.*"))
    # the next run picks up where it stopped
    stub.fail_on = None
    stub.built.clear()
    build_engines(engine_dir, progress=lambda line: None)
    assert "text_embed" not in [g for g, _ in stub.built] and ("lm", "bf16") in stub.built


def test_engine_found_but_not_recorded_is_adopted(engine_dir, monkeypatch):
    stub = _Stub(monkeypatch)
    build_engines(engine_dir, graphs=["semantic_connector"], progress=lambda line: None)
    rec = _manifest(engine_dir)["trt"]["engines"]["semantic_connector"]
    update_manifest(engine_dir, lambda m: m["trt"]["engines"].clear())  # as if killed before recording
    stub.built.clear()
    lines = []
    build_engines(engine_dir, graphs=["semantic_connector"], progress=lines.append)
    assert stub.built == [] and any("recorded" in ln for ln in lines)
    assert _manifest(engine_dir)["trt"]["engines"]["semantic_connector"]["file"] == rec["file"]


def test_changed_onnx_is_refused(engine_dir, monkeypatch):
    _Stub(monkeypatch)
    path = engine_dir / "acoustic_connector.onnx"
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(ExportError, match="changed since export"):
        build_engines(engine_dir, graphs=["acoustic_connector"], progress=lambda line: None)


def test_stale_temp_files_of_dead_builds_are_removed(engine_dir, monkeypatch):
    _Stub(monkeypatch)
    trt_dir = engine_dir / "trt"
    trt_dir.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = trt_dir / f".lm.x.engine.{dead.pid}.abc123.tmp"
    stale.write_bytes(b"half")
    (trt_dir / f".work-{dead.pid}-xyz").mkdir()
    build_engines(engine_dir, graphs=["text_embed"], progress=lambda line: None)
    assert not stale.exists() and not (trt_dir / f".work-{dead.pid}-xyz").exists()


def test_bf16_needs_ampere(engine_dir, monkeypatch):
    _Stub(monkeypatch, cc="sm75")
    with pytest.raises(ExportError, match="bf16 needs compute capability 8.0.*--plan turing"):
        build_engines(engine_dir, progress=lambda line: None)
    build_engines(engine_dir, plan="turing", graphs=["lm"], progress=lambda line: None)


# --- timing cache merge --------------------------------------------------------------------------

class _Cache:
    def __init__(self, entries):
        self.entries = set(entries)

    def combine(self, other, ignore_mismatch):
        self.entries |= other.entries
        return True

    def serialize(self):
        return ",".join(sorted(self.entries)).encode()


class _Config:
    def __init__(self, entries):
        self.cache = _Cache(entries)

    def get_timing_cache(self):
        return self.cache

    def create_timing_cache(self, data):
        return _Cache(x for x in bytes(data).decode().split(",") if x)


def test_timing_cache_merge(tmp_path):
    path = tmp_path / "trt" / "timing.cache"
    trt_build._merge_timing_cache(path, _Config({"a", "b"}), print)
    assert path.read_bytes() == b"a,b"
    trt_build._merge_timing_cache(path, _Config({"c"}), print)  # another build's tactics
    assert path.read_bytes() == b"a,b,c"
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


# --- fp32 layers in weak typing --------------------------------------------------------------------

def test_keep_fp32_marks_the_norm_statistics(monkeypatch):
    """keep_fp32 op types and name globs become layer precisions + output types (float layers only)."""
    from types import SimpleNamespace as NS

    from polygraphy.backend.trt import util as trt_util

    monkeypatch.setattr(trt_util, "get_layer_class_mapping", lambda: {})
    class DType:  # hashable, like tensorrt.DataType
        def __init__(self, name):
            self.name = name

    f32, f16, i64 = DType("FLOAT"), DType("HALF"), DType("INT64")
    trt = NS(float32=f32, float16=f16, bfloat16=DType("BF16"))

    class Layer:
        def __init__(self, name, type_name, op=None, in_dtype=f16, out_dtype=f16):
            self.name, self.type, self.op = name, DType(type_name), DType(op) if op else None
            self.inputs, self.outputs = [NS(dtype=in_dtype)], [NS(dtype=out_dtype)]
            self.precision, self.output_types = None, {}

        num_inputs = property(lambda self: len(self.inputs))
        num_outputs = property(lambda self: len(self.outputs))

        def get_input(self, i):
            return self.inputs[i]

        def get_output(self, i):
            return self.outputs[i]

        def set_output_type(self, i, dtype):
            self.output_types[i] = dtype

    layers = [
        Layer("/layers.0/input_layernorm/Pow", "ELEMENTWISE", "POW"),
        Layer("/layers.0/input_layernorm/ReduceMean", "REDUCE"),
        Layer("/layers.0/input_layernorm/Sqrt", "UNARY", "SQRT"),
        Layer("/layers.0/input_layernorm/Div", "ELEMENTWISE", "DIV"),       # by name
        Layer("/layers.0/input_layernorm/Shape", "SHAPE", out_dtype=i64),   # shape logic: never
        Layer("/layers.0/mlp/Mul", "ELEMENTWISE", "PROD"),                  # not a norm: stays
        Layer("/layers.0/self_attn/Exp", "UNARY", "EXP"),                   # op not kept
        Layer("/pos/ReduceMean", "REDUCE", in_dtype=i64, out_dtype=i64),    # integer arithmetic: never
    ]
    network = NS(num_layers=len(layers), get_layer=lambda i: layers[i])
    marked = trt_build._mark_fp32_layers(trt, network, ["Pow", "ReduceMean", "Sqrt"], ["*norm*"])
    assert marked == 4
    for layer in layers:
        pinned = layer.precision is f32
        assert pinned == (layer.name.startswith("/layers.0/input_layernorm/") and layer.type.name != "SHAPE"), layer.name
        assert layer.output_types == ({0: f32} if pinned else {})


def test_changed_weights_rebuild_even_under_the_same_name(engine_dir, monkeypatch):
    """The name holds the ONNX file's hash; weights in external data are checked through the record."""
    stub = _Stub(monkeypatch)
    build_engines(engine_dir, graphs=["text_embed"], progress=lambda line: None)
    update_manifest(engine_dir, lambda m: m["source"].update(weights_sha256="0" * 64))
    stub.built.clear()
    lines = []
    build_engines(engine_dir, graphs=["text_embed"], progress=lines.append)
    assert stub.built == [("text_embed", "fp32")] and any("weights_sha256 changed" in ln for ln in lines)
