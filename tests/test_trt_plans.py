"""TensorRT build plans: loading, validation (one-line errors), profile resolution against a manifest, hashes,
coverage of every shape the runtime and the validation use, and the device memory they need.

All CPU: plans are resolved against the manifest of the shared fixture's ENGINE_DIR (and a few edited
copies of it) and against a full-size (VibeVoice-1.5B) manifest assembled from the released config and
the measured full-size export (benchmarks/results/export_full_size.json: its graphs' I/O shapes and
weight bytes), without exporting the 1.5B here; nothing needs TensorRT.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from vv_export.errors import ExportError
from vv_export.plans import (GPU_HEADROOM, PLAN_GRAPHS, PlanError, available_plans, evaluate, load_plan_data,
                             memory_estimate, resolve_plan)
from vv_runtime.backend import bucket_slots


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
    assert {"default", "turing", "small", "ci", "bench", "fp8", "int8wo"} <= set(available_plans())
    for name in available_plans():
        plan = resolve_plan(name, manifest)
        assert plan.name == name
        assert list(plan.graphs) == [g for g in PLAN_GRAPHS if g in manifest["graphs"]]
        assert len(plan.hash) == 64


def test_default_plan_sections_cover_the_contract(default_data):
    assert set(default_data["graphs"]) == set(PLAN_GRAPHS)
    assert default_data["graphs"]["lm"]["precision"] == "bf16"  # Qwen2 activations overflow fp16


def test_lm_profiles(manifest):
    plan = resolve_plan("default", manifest)
    lm = plan.graphs["lm"]
    assert [p.name for p in lm.profiles] == ["prefill", "decode", "extend", "decode_long", "prefill_long"]
    prefill, decode, extend, decode_long, prefill_long = lm.profiles
    max_pos = manifest["model"]["max_position_embeddings"]  # 4096 at the fixture: caps 65536 and 8192
    assert prefill.dims["seq"] == (1, 512, 2048)
    assert prefill.dims["past"] == (0, 0, 0)
    assert prefill.dims["total"] == prefill.dims["seq"]
    assert prefill.dims["batch"] == (1, 1, 16)  # positive rows only: the negative row is one token
    assert decode.dims["seq"] == (1, 1, 1)
    assert decode.dims["past"] == (1, 1024, 4096)  # batch_context, the whole fixture context
    assert decode.dims["total"] == (2, 1025, 4097)  # derived: past + seq (the largest bucket + the new input)
    assert decode.dims["batch"] == (1, 2, 32)  # 16 requests x CFG
    assert extend.dims["seq"][0] == 2 and extend.dims["past"][0] == 1  # a prompt over a cached prefix
    assert decode_long.dims["batch"] == (1, 2, 2) and decode_long.dims["past"][2] == max_pos
    assert prefill_long.dims["batch"] == (1, 1, 1) and prefill_long.dims["seq"][2] == max_pos  # 8192 capped
    L, KV, D, H = (manifest["model"][k] for k in ("num_layers", "num_kv_heads", "head_dim", "hidden_size"))
    assert decode.shapes["past_kv"] == ((L, 2, 1, KV, 1, D), (L, 2, 2, KV, 1024, D), (L, 2, 32, KV, 4096, D))
    assert decode.shapes["attention_mask"] == ((1, 2), (2, 1025), (32, 4097))
    assert prefill.shapes["inputs_embeds"] == ((1, 1, H), (1, 512, H), (16, 2048, H))
    assert any("capped" in n for n in plan.notes)


def test_other_graphs_resolve_named_dims(manifest):
    plan = resolve_plan("default", manifest)
    hop, sr = manifest["model"]["hop_length"], manifest["model"]["sample_rate"]
    enc = plan.graphs["acoustic_encoder"].profiles[0]
    assert enc.shapes["audio"] == ((1, 1, hop), (1, 1, 10 * sr), (16, 1, 60 * sr))
    assert all(s[2] % hop == 0 for s in enc.shapes["audio"])
    dec = plan.graphs["acoustic_decoder"].profiles[-1]
    state = manifest["model"]["decoder_state_size"]
    assert dec.shapes["state"] == ((9, state), (16, state), (16, state))
    # per-frame graphs: one profile per batch bucket, opt = max (the runtime pads to it: one CUDA graph each)
    for name in ("ci", "default", "bench"):
        p = resolve_plan(name, manifest)
        top = p.settings["max_rows"]
        for g in ("acoustic_decoder", "semantic_encoder", "diffusion_sampler"):
            buckets = [pr.dims["batch"] for pr in p.graphs[g].profiles]
            assert all(opt == hi for _, opt, hi in buckets), (name, g, buckets)
            assert buckets[0] == (1, 1, 1) and buckets[-1][2] == top
            assert all(a[2] + 1 == b[0] for a, b in zip(buckets, buckets[1:])), (name, g, buckets)  # no gap, no overlap
    assert [pr.dims["batch"] for pr in plan.graphs["diffusion_sampler"].profiles] == [
        (1, 1, 1), (2, 2, 2), (3, 4, 4), (5, 8, 8), (9, 16, 16)]
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
    assert not lm.profiles[2].contains(decode_call)  # extend: seq >= 2


def test_extends_overrides_and_inherits(manifest):
    turing = resolve_plan("turing", manifest)
    default = resolve_plan("default", manifest)
    assert turing.graphs["lm"].precision == "fp32"
    assert turing.graphs["acoustic_decoder"].precision == "fp16"  # inherited
    assert turing.graphs["lm"].profiles[1].dims["batch"] == (1, 2, 8)  # decode: max_rows 4, x2 for CFG
    assert turing.graphs["lm"].builder["workspace_mib"] == 1024
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


def test_lm_cache_type(manifest, default_data, tiny_engine_dir):
    """The bf16 LMs of the default plan bind a bf16 cache (builder cache_dtype, part of their hash and of
    their engine record); an fp16 LM keeps an fp32 cache, the plan saying so; a bad value is one line."""
    from vv_export.trt_build import expected_engine

    plan = _resolve(default_data, manifest)
    assert plan.graphs["lm"].builder["cache_dtype"] == "bf16" and plan.graphs["lm"].precision == "bf16"
    assert plan.graphs["acoustic_decoder"].builder["cache_dtype"] == "fp32"
    record = expected_engine(tiny_engine_dir, manifest, plan.graphs["lm"], "10.8.0.43", "sm90")
    assert record["cache_dtype"] == "bf16"
    assert "cache_dtype" not in expected_engine(tiny_engine_dir, manifest, plan.graphs["acoustic_decoder"],
                                                "10.8.0.43", "sm90")
    fp32_cache = copy.deepcopy(default_data)
    fp32_cache["graphs"]["lm"]["builder"] = {"cache_dtype": "fp32"}
    assert _resolve(fp32_cache, manifest).graphs["lm"].hash != plan.graphs["lm"].hash
    fp16 = _resolve(default_data, manifest, precision="fp16")
    assert fp16.graphs["lm"].builder["cache_dtype"] == "fp32"
    assert any("graphs.lm: cache_dtype bf16 with fp16 compute: the cache stays fp32" == n for n in fp16.notes)
    bad = copy.deepcopy(default_data)
    bad["graphs"]["lm"]["builder"] = {"cache_dtype": "fp8"}
    assert "graphs.lm.builder: cache_dtype must be one of fp32, bf16, got 'fp8'" in _error(bad, manifest)


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
    data["graphs"]["lm"]["profiles"][1]["past"] = [1, 2, "max_position_embeddings + 1"]
    assert "past max 4097 exceeds the model's max_position_embeddings" in _error(data, manifest)
    data["graphs"]["lm"]["profiles"][1]["past"] = [1, 2, "max_position_embeddings"]  # the largest bucket
    assert _resolve(data, manifest).graphs["lm"].profiles[1].dims["total"][2] == 4097
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
    assert plan.name == "mine" and plan.graphs["lm"].profiles[1].dims["batch"] == (1, 2, 4)
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


# --- coverage: every shape the runtime and the validation use lies in some profile ---------------------
#
# What a plan promises, from its [settings] (docs/GPU.md):
#   text_embed   rows <= 2 * max_rows, prompts <= max(max_prompt, long_prompt)
#   lm prefill   B <= max_rows rows at prompt lengths <= max_prompt (past 0), and the negative row (1, 1, 0);
#                B <= long_rows at prompts <= long_prompt
#   lm decode    2B rows (CFG) for B <= max_rows at every cache bucket the runtime can bind up to
#                batch_context, and for B <= long_rows up to max_context (vv_runtime.backend.bucket_slots:
#                the whole buffer is past_kv, seq 1, total = past + 1)
#   lm extend    B <= max_rows rows continuing a cached prefix of <= extend_past slots by 2..max_prompt
#   per frame    diffusion_step/sampler, acoustic_decoder, semantic_encoder: batch <= max_rows
#   realtime     (VibeVoice-Realtime's text_lm and tts_lm) B <= max_rows rows of text windows (1..5 tokens)
#                over every cache bucket up to batch_context, and B <= long_rows up to max_context; tts_lm
#                also one speech step of 2B rows (CFG) over the same buckets. Caches start from a voice
#                preset (past >= 1): nothing is prefilled from scratch.
#   voice        acoustic_encoder: one voice of hop..max_voice_seconds; connectors: its frames
#   validation   every validation input set the exporter saved (the GPU accuracy check runs them)

FULL_RESULT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "export_full_size.json"


def _lengths(limit: int) -> list[int]:
    """1, 2, 3, the powers of two and their neighbours, and the limit itself (all <= limit)."""
    out = {1, 2, 3, limit - 1, limit}
    k = 4
    while k <= limit:
        out.update({k - 1, k, k + 1})
        k *= 2
    return sorted(n for n in out if 1 <= n <= limit)


def _buckets(limit: int) -> list[int]:
    """Every past_kv length the runtime binds with caches of capacity up to `limit` (bucket_slots)."""
    out = set()
    for capacity in _lengths(limit):
        for n in _lengths(capacity):
            out.add(bucket_slots(n, capacity))
    return sorted(out)


def _concrete(entry: dict, dims: dict) -> dict:
    dims = {**dims, "total": dims.get("past", 0) + dims.get("seq", 0)} if "seq" in dims else dims
    return {io["name"]: tuple(dims[d] if isinstance(d, str) else d for d in io["shape"]) for io in entry["inputs"]}


def _dims_of(entry: dict, feeds: dict) -> dict:
    dims = {}
    for io in entry["inputs"]:
        for d, n in zip(io["shape"], feeds[io["name"]].shape):
            if isinstance(d, str) and d != "total":  # derived: past + seq
                dims[d] = int(n)
    return dims


def runtime_calls(plan, manifest: dict, validation: dict) -> list[tuple[str, str, dict]]:
    """(graph, label, dims) of every call the plan promises to cover (see above)."""
    s = plan.settings
    max_pos = manifest["model"]["max_position_embeddings"]
    R, P, C = s["max_rows"], s["max_prompt"], s["max_context"]
    BC, LR = min(s["batch_context"], C), s["long_rows"]
    LP, EP = min(s["long_prompt"], C), min(s["extend_past"], C)
    hop, sr = manifest["model"]["hop_length"], manifest["model"]["sample_rate"]
    calls = []
    for n in _lengths(max(P, LP)):
        for b in sorted({1, 2, R, 2 * R}):
            if n <= P or b <= LR:
                calls.append(("text_embed", "prompt", {"batch": b, "seq": n}))
    for b in range(1, R + 1):
        calls += [("lm", "prefill", {"batch": b, "seq": n, "past": 0}) for n in _lengths(P)]
        calls += [("lm", "extend", {"batch": b, "seq": n, "past": p})
                  for n in _lengths(P) if n >= 2 for p in _lengths(EP)]
        calls += [("lm", "decode", {"batch": 2 * b, "seq": 1, "past": p}) for p in _buckets(BC)]
        # (one frame a call: the TensorRT backend does not group Realtime's decoder, Backend.groups_steps)
        calls += [("per_frame", "frame", {"batch": b, "decode_frames": 1})]
    for b in range(1, LR + 1):
        calls += [("lm", "prefill_long", {"batch": b, "seq": n, "past": 0}) for n in _lengths(LP)]
        calls += [("lm", "decode_long", {"batch": 2 * b, "seq": 1, "past": p}) for p in _buckets(C)]
    calls.append(("lm", "negative row", {"batch": 1, "seq": 1, "past": 0}))
    text_window = (manifest.get("streaming") or {}).get("text_window", 5)
    for rows, limit, label in ((R, BC, ""), (LR, C, "_long")) if {"text_lm", "tts_lm"} & set(plan.graphs) else ():
        for b in range(1, rows + 1):
            for p in _buckets(limit):
                calls += [("realtime_lms", f"window{label}", {"batch": b, "seq": n, "past": p})
                          for n in range(1, text_window + 1)]
                calls.append(("tts_lm", f"decode{label}", {"batch": 2 * b, "seq": 1, "past": p}))
    max_frames = s["max_voice_seconds"] * sr // hop
    for f in _lengths(max_frames):
        calls.append(("acoustic_encoder", "voice", {"batch": 1, "samples": f * hop}))
        calls.append(("connectors", "voice", {"batch": 1, "frames": f}))
    out = []
    for graph, label, dims in calls:
        graphs = {"per_frame": ("diffusion_step", "diffusion_sampler", "acoustic_decoder", "semantic_encoder"),
                  "connectors": ("acoustic_connector", "semantic_connector"),
                  "realtime_lms": ("text_lm", "tts_lm")}.get(graph, (graph,))
        out += [(g, label, dims) for g in graphs if g in plan.graphs]
    for graph, dims_list in validation.items():
        out += [(graph, "validation", dims) for dims in dims_list if graph in plan.graphs]
    assert max(d.get("past", 0) for _, _, d in out) <= max_pos
    return out


def coverage_gaps(plan, manifest: dict, validation: dict) -> list[str]:
    gaps = []
    for graph, label, dims in runtime_calls(plan, manifest, validation):
        shapes = _concrete(manifest["graphs"][graph], dims)
        if not any(p.contains(shapes) for p in plan.graphs[graph].profiles):
            gaps.append(f"{plan.name}: {graph} {label} {dims}")
    return gaps


@pytest.fixture(scope="module")
def validation_dims(tiny_engine_dir, manifest):
    """graph -> the named dims of every saved validation input set (the exporter's spec shapes)."""
    from vv_export.validation_data import load_validation_data

    out = {}
    for graph, entry in manifest["graphs"].items():
        feeds, _ = load_validation_data(tiny_engine_dir, graph)
        out[graph] = [_dims_of(entry, f) for f in feeds]
    assert {"batch": 3, "seq": 3, "past": 5} in out["lm"]  # the shape no old profile held
    return out


@pytest.fixture(scope="module")
def full_manifest(manifest, reference_dir):
    """The VibeVoice-1.5B manifest: the fixture's I/O with the full-size export's shapes and weight bytes."""
    config = json.loads((reference_dir / "vibevoice-1.5b-original-config.json").read_text())
    measured = json.loads(FULL_RESULT.read_text())
    dec = config["decoder_config"]
    full = copy.deepcopy(manifest)
    hop = 1
    for r in config["acoustic_tokenizer_config"]["encoder_ratios"]:
        hop *= r
    for graph, entry in full["graphs"].items():
        rec = measured["graphs"][graph]
        concrete = {**rec["ort"]["inputs"], **rec["ort"]["outputs"]}
        for io in entry["inputs"] + entry["outputs"]:
            io["shape"] = [d if isinstance(d, str) else concrete[io["name"]][i] for i, d in enumerate(io["shape"])]
        entry["weight_bytes"] = rec["weight_bytes"]
    head_dim = dec["hidden_size"] // dec["num_attention_heads"]
    full["model"].update(hidden_size=dec["hidden_size"], num_layers=dec["num_hidden_layers"],
                         num_attention_heads=dec["num_attention_heads"], num_kv_heads=dec["num_key_value_heads"],
                         head_dim=head_dim, vocab_size=dec["vocab_size"],
                         max_position_embeddings=dec["max_position_embeddings"], hop_length=hop,
                         acoustic_vae_dim=config["acoustic_vae_dim"], semantic_vae_dim=config["semantic_vae_dim"],
                         decoder_state_size=full["graphs"]["acoustic_decoder"]["inputs"][1]["shape"][1],
                         semantic_state_size=full["graphs"]["semantic_encoder"]["inputs"][1]["shape"][1])
    full["dtype"] = measured["dtype"]
    # the measured export and the config agree
    assert full["graphs"]["lm"]["inputs"][3]["shape"] == [28, 2, "batch", 2, "past", 128]
    assert full["graphs"]["lm"]["inputs"][0]["shape"] == ["batch", "seq", 1536]
    return full


def test_every_plan_covers_what_runs(manifest, full_manifest, validation_dims):
    for m in (manifest, full_manifest):
        for name in available_plans():
            plan = resolve_plan(name, m)
            gaps = coverage_gaps(plan, m, validation_dims)
            assert not gaps, f"{len(gaps)} gaps, e.g. {gaps[:3]}"


def test_coverage_check_finds_the_old_gaps(manifest, full_manifest, validation_dims, default_data):
    """The old lm profiles: {batch 3, seq 3, past 5} fits none, the largest cache bucket is one too long."""
    old = copy.deepcopy(default_data)
    old["graphs"]["lm"]["profiles"] = [
        {"name": "prefill", "batch": [1, 2, "2 * max_rows"], "seq": [1, 512, "max_prompt"], "past": [0, 0, 0]},
        {"name": "decode", "batch": [1, 2, "2 * max_rows"], "seq": [1, 1, 1],
         "past": [1, "min(1024, max_context - 1)", "max_context - 1"]}]
    for m in (manifest, full_manifest):
        gaps = coverage_gaps(_resolve(old, m), m, validation_dims)
        assert any("lm validation {'batch': 3, 'seq': 3, 'past': 5" in g for g in gaps), gaps[:5]
        max_pos = m["model"]["max_position_embeddings"]
        assert any(f"lm decode_long {{'batch': 2, 'seq': 1, 'past': {max_pos}}}" in g for g in gaps), gaps[:5]
    # the new plan with only decode_long one short: exactly the largest bucket is missing
    short = copy.deepcopy(default_data)
    short["graphs"]["lm"]["profiles"][3]["past"] = [1, "min(8192, max_context)", "max_context - 1"]
    gaps = coverage_gaps(_resolve(short, full_manifest), full_manifest, validation_dims)
    assert gaps == ["default: lm decode_long {'batch': 2, 'seq': 1, 'past': 65536}"]


@pytest.fixture(scope="module")
def realtime_manifest(realtime_engine_dir):
    return json.loads((realtime_engine_dir / "manifest.json").read_text())


@pytest.fixture(scope="module")
def realtime_validation_dims(realtime_engine_dir, realtime_manifest):
    from vv_export.validation_data import load_validation_data

    out = {}
    for graph, entry in realtime_manifest["graphs"].items():
        feeds, _ = load_validation_data(realtime_engine_dir, graph)
        out[graph] = [_dims_of(entry, f) for f in feeds]
    assert {"batch": 1, "seq": 5, "past": 9} in out["tts_lm"]  # a text window over a preset's cache
    return out


def test_every_plan_covers_what_runs_on_realtime(realtime_manifest, realtime_validation_dims):
    """VibeVoice-Realtime's ENGINE_DIR: every packaged plan resolves against it (its graphs, in its order) and
    covers its loop's calls. The fixture has the full-size model's context (8192 positions), so the named
    dimensions, which are all the profiles give, are those of Realtime-0.5B."""
    assert realtime_manifest["model"]["max_position_embeddings"] == 8192
    for name in available_plans():
        plan = resolve_plan(name, realtime_manifest)
        assert list(plan.graphs) == [g for g in PLAN_GRAPHS if g in realtime_manifest["graphs"]]
        assert list(plan.graphs) == list(realtime_manifest["graphs"])
        gaps = coverage_gaps(plan, realtime_manifest, realtime_validation_dims)
        assert not gaps, f"{len(gaps)} gaps, e.g. {gaps[:3]}"
        labels = {label for g, label, _ in runtime_calls(plan, realtime_manifest, realtime_validation_dims)
                  if g == "tts_lm"}
        assert labels == {"window", "window_long", "decode", "decode_long", "validation"}


def test_realtime_lm_profiles(realtime_manifest):
    plan = resolve_plan("default", realtime_manifest)
    tts = plan.graphs["tts_lm"]
    assert tts.precision == "bf16" and plan.graphs["text_lm"].precision == "bf16"
    assert [p.name for p in tts.profiles] == ["window", "decode", "window_long", "decode_long"]
    window, decode, window_long, decode_long = tts.profiles
    assert window.dims["seq"] == (1, 5, 5) and window.dims["past"] == (1, 1024, 4096)
    assert decode.dims["batch"] == (1, 2, 32) and decode.dims["seq"] == (1, 1, 1)
    assert decode_long.dims["past"][2] == window_long.dims["past"][2] == 8192  # max_context capped to the model's
    m = realtime_manifest["model"]
    assert decode.shapes["past_kv"][2] == (m["tts_lm_layers"], 2, 32, m["num_kv_heads"], 4096, m["head_dim"])
    assert decode.shapes["input_types"] == ((1, 1), (2, 1), (32, 1))
    assert [p.name for p in plan.graphs["text_lm"].profiles] == ["window", "window_long"]
    assert set(tts.tolerance_for("bf16")) == {"hidden", "eos_logit", "new_kv"}


def test_coverage_check_finds_realtime_gaps(realtime_manifest, realtime_validation_dims, default_data):
    """A text window one token short, and no speech step beyond batch_context: both found."""
    short = copy.deepcopy(default_data)
    short["graphs"]["text_lm"]["profiles"][0]["seq"] = [1, 4, 4]
    gaps = coverage_gaps(_resolve(short, realtime_manifest), realtime_manifest, realtime_validation_dims)
    assert gaps and all(g.startswith("default: text_lm window {") and "'seq': 5" in g for g in gaps), gaps[:3]
    no_long = copy.deepcopy(default_data)
    del no_long["graphs"]["tts_lm"]["profiles"][3]
    gaps = coverage_gaps(_resolve(no_long, realtime_manifest), realtime_manifest, realtime_validation_dims)
    assert gaps and all(g.startswith("default: tts_lm decode_long") for g in gaps), gaps[:3]
    assert "default: tts_lm decode_long {'batch': 2, 'seq': 1, 'past': 8192}" in gaps


# --- device memory -----------------------------------------------------------------------------------

def test_every_plan_fits_its_gpu(full_manifest):
    for name in available_plans():
        plan = resolve_plan(name, full_manifest)
        est = memory_estimate(plan, full_manifest)
        budget = plan.settings["gpu_memory_gb"]
        assert est["over_int32"] == [], (name, est["over_int32"])
        assert est["fits"], (name, round(est["total_bytes"] / 1e9, 1), budget)
        assert est["total_bytes"] <= GPU_HEADROOM * budget * 1e9
        assert budget == {"default": 80, "bench": 80, "ci": 16, "small": 16, "turing": 16, "fp8": 80,
                          "int8wo": 80}.get(name, budget)


def test_memory_estimate_components(full_manifest):
    plan = resolve_plan("default", full_manifest)
    est = memory_estimate(plan, full_manifest)
    # the lm's weights at bf16: half the fp32 ONNX bytes (5.24 GB measured)
    assert est["weights_bytes"]["lm"] == full_manifest["graphs"]["lm"]["weight_bytes"] // 2
    assert est["weights_bytes"]["text_embed"] == full_manifest["graphs"]["text_embed"]["weight_bytes"]  # fp32
    decode = est["profiles"]["lm/decode"]
    past_kv = 28 * 2 * 32 * 2 * 4096 * 128 * 4  # [L, 2, rows, KV, past, D] fp32
    assert past_kv < decode["io_bytes"] < past_kv * 1.01
    prefill = est["profiles"]["lm/prefill"]
    scores = 16 * 12 * 2048 * 2048 * 4 * 2  # rows x heads x seq x total x fp32 x (scores, probs)
    assert scores < prefill["activation_bytes"] < scores * 2
    turing = memory_estimate(resolve_plan("turing", full_manifest), full_manifest)
    assert turing["weights_bytes"]["lm"] == full_manifest["graphs"]["lm"]["weight_bytes"]  # fp32 lm


def test_quantized_plans_need_less_memory(full_manifest):
    """fp8 / int8wo: 1 byte per weight of the lm and the diffusion head (a quarter of the fp32 ONNX bytes,
    half of bf16/fp16), their activations still 2 bytes; everything else as the default plan."""
    default = memory_estimate(resolve_plan("default", full_manifest), full_manifest)
    for name in ("fp8", "int8wo"):
        est = memory_estimate(resolve_plan(name, full_manifest), full_manifest)
        for graph in ("lm", "diffusion_step", "diffusion_sampler"):
            assert est["weights_bytes"][graph] == full_manifest["graphs"][graph]["weight_bytes"] // 4
        for graph in ("text_embed", "acoustic_encoder", "acoustic_decoder"):
            assert est["weights_bytes"][graph] == default["weights_bytes"][graph]
        assert est["profiles"]["lm/prefill"] == default["profiles"]["lm/prefill"]  # bf16/fp16 activations
        saved = sum(default["weights_bytes"][g] - est["weights_bytes"][g] for g in est["weights_bytes"])
        assert est["total_bytes"] == default["total_bytes"] - saved and saved > 1.5e9, (name, saved)  # 1.56 GB


@pytest.fixture(scope="module")
def realtime_full_manifest(realtime_manifest, full_manifest, reference_dir):
    """The VibeVoice-Realtime-0.5B manifest: the realtime fixture's I/O at the full-size config's dimensions,
    each graph's weight bytes counted on the model built on the meta device (no weights allocated)."""
    import torch

    from vv_export import realtime

    config = json.loads((reference_dir / "vibevoice-realtime-0.5b-config.json").read_text())
    with torch.device("meta"):
        net = realtime.build_model(realtime.config_kwargs(config))
    body = net.model
    dec = config["decoder_config"]
    H, KV, D = dec["hidden_size"], dec["num_key_value_heads"], dec["hidden_size"] // dec["num_attention_heads"]
    A, state = config["acoustic_vae_dim"], full_manifest["model"]["decoder_state_size"]  # the 1.5B's decoder
    layers = {"text_lm": len(body.language_model.layers), "tts_lm": len(body.tts_language_model.layers)}
    sized = {"inputs_embeds": {2: H}, "hidden": {-1: H}, "pos_condition": {1: H}, "neg_condition": {1: H},
             "acoustic_embed": {1: H}, "embeds": {2: H}, "noise": {1: A}, "latent": {-1: A},
             "state": {1: state}, "new_state": {1: state}}

    def numel(*modules):
        return sum(p.numel() for m in modules for p in m.parameters())

    rope = dec["max_position_embeddings"] * D  # the fp32 cos/sin table (2 x positions x D/2)
    elems = {"text_embed": numel(body.language_model.embed_tokens),
             "text_lm": numel(body.language_model.layers) + rope,
             "tts_lm": numel(body.tts_language_model, body.tts_input_types, net.tts_eos_classifier) + rope,
             "acoustic_decoder": numel(body.audio_tower), "acoustic_connector": numel(body.multi_modal_projector),
             "diffusion_sampler": numel(body.diffusion_head, body.multi_modal_projector)}
    full = copy.deepcopy(realtime_manifest)
    for graph, entry in full["graphs"].items():
        for io in entry["inputs"] + entry["outputs"]:
            fixed = dict(sized.get(io["name"], {}))
            if io["name"] in ("past_kv", "new_kv"):
                fixed = {0: layers[graph], 3: KV, 5: D}
            for axis, value in fixed.items():
                io["shape"][axis] = value
        entry["weight_bytes"] = 4 * elems[graph]
    full["model"].update(hidden_size=H, text_lm_layers=layers["text_lm"], tts_lm_layers=layers["tts_lm"],
                         num_attention_heads=dec["num_attention_heads"], num_kv_heads=KV, head_dim=D,
                         intermediate_size=dec["intermediate_size"], vocab_size=dec["vocab_size"],
                         acoustic_vae_dim=A, decoder_state_size=state)
    assert full["graphs"]["tts_lm"]["inputs"][4]["shape"] == [20, 2, "batch", 2, "past", 64]  # the presets' caches
    assert 0.85e9 < sum(elems.values()) < 0.9e9  # Qwen2.5-0.5B, the 0.34 B acoustic decoder, the 4-layer head
    return full


def test_every_plan_fits_its_gpu_with_realtime(realtime_full_manifest):
    """Realtime-0.5B under every plan: within the plan's GPU, its LM activations counted (text_lm, tts_lm)."""
    for name in available_plans():
        plan = resolve_plan(name, realtime_full_manifest)
        est = memory_estimate(plan, realtime_full_manifest)
        assert est["over_int32"] == [] and est["fits"], (name, round(est["total_bytes"] / 1e9, 1))
        assert est["largest_lm_profile"].split("/")[0] in ("text_lm", "tts_lm")
    est = memory_estimate(resolve_plan("default", realtime_full_manifest), realtime_full_manifest)
    decode = est["profiles"]["tts_lm/decode"]
    past_kv = 20 * 2 * 32 * 2 * 4096 * 64 * 4  # [L, 2, rows, KV, past, D] fp32
    assert past_kv < decode["io_bytes"] < past_kv * 1.01 and decode["activation_bytes"] > 0
    assert est["weights_bytes"]["tts_lm"] == realtime_full_manifest["graphs"]["tts_lm"]["weight_bytes"] // 2  # bf16


def test_old_default_would_not_fit(full_manifest, default_data):
    """The old default (32 rows x 8192-token prefill, decode to the full context at 32 rows): out of memory."""
    old = copy.deepcopy(default_data)
    old["settings"].update(max_prompt=8192)
    old["graphs"]["lm"]["profiles"] = [
        {"name": "prefill", "batch": [1, 2, "2 * max_rows"], "seq": [1, 512, "max_prompt"], "past": [0, 0, 0]},
        {"name": "decode", "batch": [1, 2, "2 * max_rows"], "seq": [1, 1, 1],
         "past": [1, "min(1024, max_context - 1)", "max_context - 1"]}]
    est = memory_estimate(_resolve(old, full_manifest), full_manifest)
    assert not est["fits"]
    assert est["total_bytes"] > 80e9
    assert any(s.startswith("lm/decode:past_kv [28, 2, 32, 2, 65535, 128]") for s in est["over_int32"])


def test_bench_plan_is_tuned_for_the_measured_batches(full_manifest):
    """bench: one decode profile per measured batch size (1/4/16 scripts: 2/8/32 rows), each the one the
    runtime picks for that batch's decode steps (nearest opt among the profiles containing the shapes)."""
    plan = resolve_plan("bench", full_manifest)
    lm = plan.graphs["lm"]
    decode = {p.name: p for p in lm.profiles if p.name.startswith("decode")}
    assert {n: p.dims["batch"][1] for n, p in decode.items()} == {"decode_1": 2, "decode_4": 8, "decode_16": 32}
    L, KV, D, H = (full_manifest["model"][k] for k in ("num_layers", "num_kv_heads", "head_dim", "hidden_size"))
    for scripts, name in ((1, "decode_1"), (4, "decode_4"), (16, "decode_16")):
        rows = 2 * scripts
        for past in (256, 512, 1024, 4096):  # the buckets of 200-1024-token prompts plus the frames
            shapes = {"inputs_embeds": (rows, 1, H), "attention_mask": (rows, past + 1), "position_ids": (rows, 1),
                      "past_kv": (L, 2, rows, KV, past, D)}
            holding = [p.name for p in lm.profiles if p.contains(shapes)]
            assert holding == [name], (scripts, past, holding)
    assert lm.profiles[0].name == "prefill" and lm.profiles[0].dims["batch"] == (1, 1, 16)
