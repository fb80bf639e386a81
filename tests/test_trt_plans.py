"""TensorRT build plans: loading, validation (one-line errors), profile resolution against a manifest, hashes.

All CPU: plans are resolved against the manifest of the shared fixture's ENGINE_DIR (and a few edited
copies of it); nothing here needs TensorRT.
"""

from __future__ import annotations

import copy
import json

import pytest

from vv_export.errors import ExportError
from vv_export.plans import (PLAN_GRAPHS, PlanError, available_plans, evaluate, load_plan_data, resolve_plan)


@pytest.fixture(scope="module")
def manifest(tiny_engine_dir):
    return json.loads((tiny_engine_dir / "manifest.json").read_text())


@pytest.fixture()
def default_data():
    data, _ = load_plan_data("default")
    return data


def _resolve(data, manifest, **kw):
    return resolve_plan(copy.deepcopy(data), manifest, **kw)


def _error(data, manifest, **kw) -> str:
    with pytest.raises(PlanError) as info:
        _resolve(data, manifest, **kw)
    message = str(info.value)
    assert "\n" not in message
    assert isinstance(info.value, ExportError)
    return message


# --- the packaged plans --------------------------------------------------------------------------

def test_packaged_plans_resolve_against_the_fixture(manifest):
    assert {"default", "turing", "small", "ci"} <= set(available_plans())
    for name in available_plans():
        plan = resolve_plan(name, manifest)
        assert plan.name == name
        assert list(plan.graphs) == [g for g in PLAN_GRAPHS if g in manifest["graphs"]]
        assert len(plan.hash) == 64


def test_default_plan_sections_cover_the_contract(default_data):
    assert set(default_data["graphs"]) == set(PLAN_GRAPHS)
    assert default_data["graphs"]["lm"]["precision"] == "bf16"  # Qwen2 activations overflow fp16


def test_lm_profiles_prefill_and_decode(manifest):
    plan = resolve_plan("default", manifest)
    lm = plan.graphs["lm"]
    assert [p.name for p in lm.profiles] == ["prefill", "decode"]
    prefill, decode = lm.profiles
    max_pos = manifest["model"]["max_position_embeddings"]  # 4096 at the fixture: caps 65536 and 8192
    assert prefill.dims["seq"] == (1, 512, max_pos)
    assert prefill.dims["past"] == (0, 0, 0)
    assert prefill.dims["total"] == prefill.dims["seq"]
    assert decode.dims["seq"] == (1, 1, 1)
    assert decode.dims["past"] == (1, 1024, max_pos - 1)
    assert decode.dims["total"] == (2, 1025, max_pos)  # derived: past + seq
    assert prefill.dims["batch"] == decode.dims["batch"] == (1, 2, 32)  # 16 requests x CFG
    L, KV, D, H = (manifest["model"][k] for k in ("num_layers", "num_kv_heads", "head_dim", "hidden_size"))
    assert decode.shapes["past_kv"] == ((L, 2, 1, KV, 1, D), (L, 2, 2, KV, 1024, D), (L, 2, 32, KV, max_pos - 1, D))
    assert decode.shapes["attention_mask"] == ((1, 2), (2, 1025), (32, max_pos))
    assert prefill.shapes["inputs_embeds"] == ((1, 1, H), (2, 512, H), (32, max_pos, H))
    assert any("capped" in n for n in plan.notes)


def test_other_graphs_resolve_named_dims(manifest):
    plan = resolve_plan("default", manifest)
    hop, sr = manifest["model"]["hop_length"], manifest["model"]["sample_rate"]
    enc = plan.graphs["acoustic_encoder"].profiles[0]
    assert enc.shapes["audio"] == ((1, 1, hop), (1, 1, 10 * sr), (16, 1, 60 * sr))
    assert all(s[2] % hop == 0 for s in enc.shapes["audio"])
    dec = plan.graphs["acoustic_decoder"].profiles[0]
    state = manifest["model"]["decoder_state_size"]
    assert dec.shapes["state"] == ((1, state), (1, state), (16, state))
    step = plan.graphs["diffusion_step"].profiles[0]
    assert step.shapes["cfg_scale"] == ((1,), (1,), (1,))
    conn = plan.graphs["acoustic_connector"].profiles[0]
    assert conn.dims["frames"] == (1, 1, 60 * sr // hop)
    assert plan.graphs["text_embed"].profiles[0].dims["batch"] == (1, 2, 32)


def test_profiles_contain(manifest):
    lm = resolve_plan("default", manifest).graphs["lm"]
    L, KV, D, H = (manifest["model"][k] for k in ("num_layers", "num_kv_heads", "head_dim", "hidden_size"))
    decode_call = {"inputs_embeds": (4, 1, H), "attention_mask": (4, 101), "position_ids": (4, 1),
                   "past_kv": (L, 2, 4, KV, 100, D)}
    assert lm.profiles[1].contains(decode_call) and not lm.profiles[0].contains(decode_call)


def test_extends_overrides_and_inherits(manifest):
    turing = resolve_plan("turing", manifest)
    default = resolve_plan("default", manifest)
    assert turing.graphs["lm"].precision == "fp32"
    assert turing.graphs["acoustic_decoder"].precision == "fp16"  # inherited
    assert turing.graphs["lm"].profiles[0].dims["batch"] == (1, 2, 8)  # max_rows 4, x2 for CFG
    assert turing.graphs["lm"].builder["workspace_mib"] == 2048
    assert turing.graphs["lm"].builder["optimization_level"] == default.graphs["lm"].builder["optimization_level"]


def test_precision_override(manifest):
    plan = resolve_plan("default", manifest, precision="fp16")
    assert {gp.precision for gp in plan.graphs.values()} == {"fp16"}
    assert plan.graphs["lm"].hash != resolve_plan("default", manifest).graphs["lm"].hash


def test_tolerances(manifest):
    plan = resolve_plan("default", manifest)
    lm = plan.graphs["lm"].tolerance_for("bf16")
    assert set(lm) == {"hidden", "control_logits", "new_kv"} and lm["hidden"]["rtol"] == 0.1
    sampler = plan.graphs["diffusion_sampler"].tolerance_for("fp16")
    assert sampler["latent"] == {"atol": 3e-2, "rtol": 5e-2}
    dec = plan.graphs["acoustic_decoder"].tolerance_for("fp32")
    assert dec == {"audio": {"atol": 1e-4, "rtol": 1e-3}, "new_state": {"atol": 1e-4, "rtol": 1e-3}}


# --- hashes --------------------------------------------------------------------------------------

def test_hash_is_stable_and_local(manifest, default_data):
    a = _resolve(default_data, manifest)
    b = _resolve(default_data, manifest)
    assert a.hash == b.hash and all(a.graphs[g].hash == b.graphs[g].hash for g in a.graphs)

    edited = copy.deepcopy(default_data)
    edited["graphs"]["lm"]["profiles"][1]["past"] = [1, 512, "max_context - 1"]
    c = _resolve(edited, manifest)
    assert c.graphs["lm"].hash != a.graphs["lm"].hash
    assert c.graphs["acoustic_decoder"].hash == a.graphs["acoustic_decoder"].hash
    assert c.hash != a.hash

    edited = copy.deepcopy(default_data)
    edited["tolerance"]["fp16"] = {"atol": 1.0, "rtol": 1.0}  # tolerances never rebuild anything
    assert _resolve(edited, manifest).hash == a.hash

    edited = copy.deepcopy(default_data)
    edited["builder"]["optimization_level"] = 5
    assert all(_resolve(edited, manifest).graphs[g].hash != a.graphs[g].hash for g in a.graphs)


def test_settings_that_do_not_change_shapes_keep_hashes(manifest, default_data):
    """max_context beyond the model's max_position_embeddings is capped: same shapes, same engines."""
    a = _resolve(default_data, manifest)
    edited = copy.deepcopy(default_data)
    edited["settings"]["max_context"] = 1 << 20
    assert _resolve(edited, manifest).hash == a.hash


# --- validation ----------------------------------------------------------------------------------

def test_unknown_dim_in_profile(manifest, default_data):
    data = copy.deepcopy(default_data)
    data["graphs"]["lm"]["profiles"][0]["sequence"] = [1, 2, 3]
    msg = _error(data, manifest)
    assert "unknown dim 'sequence'" in msg and "graphs.lm.profiles[0] (prefill)" in msg


def test_dim_of_another_graph(manifest, default_data):
    data = copy.deepcopy(default_data)
    data["graphs"]["acoustic_decoder"]["profiles"][0]["seq"] = [1, 1, 1]
    assert "unknown dim 'seq'" in _error(data, manifest)


def test_unknown_dim_in_defaults(manifest, default_data):
    data = copy.deepcopy(default_data)
    data["dims"]["rows"] = [1, 1, 4]
    assert "dims.rows: unknown dim 'rows'" in _error(data, manifest)


def test_total_is_derived(manifest, default_data):
    data = copy.deepcopy(default_data)
    data["graphs"]["lm"]["profiles"][1]["total"] = [1, 2, 3]
    assert "total is derived as past + seq" in _error(data, manifest)


def test_unknown_graph_and_missing_section(manifest, default_data):
    data = copy.deepcopy(default_data)
    data["graphs"]["vocoder"] = {"precision": "fp16"}
    assert "unknown graph 'vocoder'" in _error(data, manifest)
    data = copy.deepcopy(default_data)
    del data["graphs"]["semantic_encoder"]
    assert "no section [graphs.semantic_encoder]" in _error(data, manifest)


def test_unknown_keys(manifest, default_data):
    data = copy.deepcopy(default_data)
    data["graphs"]["lm"]["precission"] = "fp16"
    assert "unknown key 'precission'" in _error(data, manifest)
    data = copy.deepcopy(default_data)
    data["builder"]["workspace"] = 1
    assert "unknown builder option 'workspace'" in _error(data, manifest)


def test_bad_values(manifest, default_data):
    cases = [
        (("graphs", "lm", "precision"), "int8", "is not one of fp32, fp16, bf16"),
        (("builder", "optimization_level"), 9, "optimization_level must be an integer 0..5"),
        (("builder", "typing"), "loose", "typing must be one of"),
        (("builder", "keep_fp32"), ["Pow", "Frobnicate"], "keep_fp32: unknown op type 'Frobnicate'"),
        (("settings", "max_rows"), "2 ** 4", "unsupported expression"),
        (("settings", "max_rows"), "rows * 2", "unknown name 'rows'"),
    ]
    for path, value, expected in cases:
        data = copy.deepcopy(default_data)
        table = data
        for key in path[:-1]:
            table = table[key]
        table[path[-1]] = value
        assert expected in _error(data, manifest), (path, value)


def test_bad_ranges(manifest, default_data):
    data = copy.deepcopy(default_data)
    data["graphs"]["lm"]["profiles"][0]["seq"] = [8, 4, 16]
    assert "needs min <= opt <= max, got [8, 4, 16]" in _error(data, manifest)
    data = copy.deepcopy(default_data)
    data["graphs"]["lm"]["profiles"][0]["batch"] = [0, 1, 2]
    assert "batch: min 0 is below 1" in _error(data, manifest)
    data = copy.deepcopy(default_data)
    data["graphs"]["lm"]["profiles"][1]["past"] = [1, 2, "max_position_embeddings"]
    assert "exceeds the model's max_position_embeddings" in _error(data, manifest)
    data = copy.deepcopy(default_data)
    del data["dims"]["batch"]
    assert "no range for dim 'batch'" in _error(data, manifest)


def test_tolerance_output_names_checked(manifest, default_data):
    data = copy.deepcopy(default_data)
    data["graphs"]["lm"]["tolerance"]["bf16"]["logits"] = {"atol": 1, "rtol": 1}
    assert "unknown output 'logits'" in _error(data, manifest)


def test_graph_subset(manifest):
    plan = resolve_plan("default", manifest, graphs=["lm", "acoustic_decoder"])
    assert list(plan.graphs) == ["lm", "acoustic_decoder"]
    with pytest.raises(PlanError, match="graph 'vocoder' is not in both"):
        resolve_plan("default", manifest, graphs=["vocoder"])


def test_plan_files(tmp_path, manifest):
    with pytest.raises(PlanError, match="unknown \\(available: .*default"):
        resolve_plan("no-such-plan", manifest)
    own = tmp_path / "mine.toml"
    own.write_text('extends = "default"\n[settings]\nmax_rows = 2\n')
    plan = resolve_plan(str(own), manifest)
    assert plan.name == "mine" and plan.graphs["lm"].profiles[0].dims["batch"] == (1, 2, 4)
    (tmp_path / "a.toml").write_text('extends = "b"\n')
    (tmp_path / "b.toml").write_text('extends = "a"\n')
    with pytest.raises(PlanError, match="cycle"):
        resolve_plan(str(tmp_path / "a.toml"), manifest)
    bad = tmp_path / "bad.toml"
    bad.write_text("[settings\n")
    with pytest.raises(PlanError, match="invalid TOML"):
        resolve_plan(str(bad), manifest)
    with pytest.raises(PlanError, match="--precision fp8"):
        resolve_plan("default", manifest, precision="fp8")


def test_expressions():
    names = {"a": 10, "b": 3}
    assert evaluate("a * b - 1", names, "x") == 29
    assert evaluate("min(a, b * 2) // 2", names, "x") == 3
    assert evaluate(7, names, "x") == 7
    for bad in ("a ** 2", "__import__('os')", "a.b", "[a]", True, 1.5):
        with pytest.raises(PlanError):
            evaluate(bad, names, "x")
