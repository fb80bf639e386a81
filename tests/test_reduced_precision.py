"""Reduced precision proven on the CPU (docs/PRECISION.md).

The graphs of the shared fixture are run in ONNX Runtime as a TensorRT fp16/bf16 engine would compute
them in the worst case the plan allows (vv_export.precision: every layer not kept in fp32 rounds its
inputs and outputs to fp16/bf16) and compared with the fp32 graphs: per graph against the plan's
tolerances, the LM at positions up to 8K and on left-padded batches, and whole generations. The
graphs as they were before the fix (RoPE angles and the timestep embedding in reduced precision,
finfo(float32).min mask bias) are emulated too, to show that these tests fail on them.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from conftest import load_benchmark
from vv_export import wrappers
from vv_export.graph_rules import ONNX_TO_TRT_LAYER, allowed_error, cpu_session, max_error
from vv_export.plans import KEEP_FP32_OPS, resolve_plan
from vv_export.precision import emulate_model, kept_node_names, write_emulated_engine_dir
from vv_export.validation_data import load_validation_data

_generation_compare = load_benchmark("generation_compare")  # benchmarks/generation_compare.py
compare_generations, decision_margins = _generation_compare.compare_generations, _generation_compare.decision_margins

PRECISIONS = ("fp16", "bf16")
GRAPHS = ("lm", "acoustic_encoder", "acoustic_decoder", "semantic_encoder", "acoustic_connector",
          "semantic_connector", "diffusion_step", "diffusion_sampler")
# The keep rules before this fix (trt_plans/default.toml): norm statistics only.
OLD_KEEP_OPS = ["Pow", "ReduceMean", "Sqrt", "Reciprocal", "RMSNormalization", "LayerNormalization"]
OLD_KEEP_NAMES = ["*norm*"]
LONG_POSITIONS = 65536  # the LM's RoPE table in the long-context tests (VibeVoice-1.5B's context)


@pytest.fixture(scope="module")
def manifest(tiny_engine_dir):
    return json.loads((tiny_engine_dir / "manifest.json").read_text())


@pytest.fixture(scope="module")
def plan(manifest):
    return resolve_plan("default", manifest)


@pytest.fixture(scope="module")
def graphs(tiny_engine_dir, manifest):
    return {g: onnx.load(str(tiny_engine_dir / manifest["graphs"][g]["file"])) for g in manifest["graphs"]}


def _keep(gp):
    return gp.builder["keep_fp32"], gp.builder["keep_fp32_names"]


def _run(session, feeds):
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


# --- the emulation itself --------------------------------------------------------------------------

def _tiny_graph():
    """x[2,4] -> MatMul(W) -> y;  y -> Add(b) -> out_add (a node the test keeps or not);  y -> out_mm."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((4, 3)) * 1.7).astype(np.float32)
    b = np.array([1 + 2 ** -9, 3.14159, -2.71828], np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="/mm/MatMul"),
             helper.make_node("Add", ["y", "b"], ["out_add"], name="/head_fp32/Add"),
             helper.make_node("Identity", ["y"], ["out_mm"], name="/Identity")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("out_add", TensorProto.FLOAT, [2, 3]),
                               helper.make_tensor_value_info("out_mm", TensorProto.FLOAT, [2, 3])],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), w, b


def _round(x, precision):
    import ml_dtypes

    with np.errstate(over="ignore"):
        return x.astype(np.float16 if precision == "fp16" else ml_dtypes.bfloat16).astype(np.float32)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_emulation_rounds_like_a_reduced_precision_engine(precision):
    model, w, b = _tiny_graph()
    x = np.array([[1.001, -2.3, 0.7, 5.5], [3.3, 0.01, -1.2, 7.9]], np.float32)
    # the Add kept in fp32 (by name), everything else reduced: MatMul on rounded x and W, fp32
    # accumulation, result rounded; the kept Add reads the rounded y and the fp32 bias, stays fp32
    out = _run(cpu_session(emulate_model(model, precision, [], ["*_fp32*"])), {"x": x})
    y = _round(_round(x, precision).astype(np.float64) @ _round(w, precision).astype(np.float64), precision)
    np.testing.assert_array_equal(out["out_mm"], y)
    np.testing.assert_array_equal(out["out_add"], (y + b).astype(np.float32))
    assert not np.array_equal(out["out_add"], _round(out["out_add"], precision))  # really fp32
    # nothing kept: the Add rounds its bias and its output too
    out = _run(cpu_session(emulate_model(model, precision, [], [])), {"x": x})
    np.testing.assert_array_equal(out["out_add"], _round(y + _round(b, precision), precision))
    # the same rules by op type
    out_ops = _run(cpu_session(emulate_model(model, precision, ["Add"], [])), {"x": x})
    np.testing.assert_array_equal(out_ops["out_add"], (y + b).astype(np.float32))


def test_fp16_overflow_gives_inf_like_the_gpu():
    model, w, _ = _tiny_graph()
    x = np.repeat(30000.0 * np.sign(w[:, :1].T), 2, 0).astype(np.float32)  # each input below 65504
    assert abs(float((x @ w)[0, 0])) > 65504
    fp16 = _run(cpu_session(emulate_model(model, "fp16", [], [])), {"x": x})
    assert np.isposinf(fp16["out_mm"][:, 0]).all()
    bf16 = _run(cpu_session(emulate_model(model, "bf16", [], [])), {"x": x})
    assert np.isfinite(bf16["out_mm"]).all()


def test_onnx_op_mapping_agrees_with_the_trt_build():
    from vv_export.graph_rules import FP32_LAYER_MATCH

    for op in KEEP_FP32_OPS:
        assert ONNX_TO_TRT_LAYER[op] == FP32_LAYER_MATCH[op], op


# --- the exported graphs keep what must stay fp32 -------------------------------------------------

def _producers(model):
    return {o: n for n in model.graph.node for o in n.output}


def _float_ancestors(model, node, stop_at_consts=True):
    """Nodes upstream of `node` through non-constant tensors (up to graph inputs)."""
    producers = _producers(model)
    consts = {i.name for i in model.graph.initializer}
    seen, stack, out = set(), list(node.input), []
    while stack:
        name = stack.pop()
        if name in seen or name in consts or name not in producers:
            continue
        seen.add(name)
        parent = producers[name]
        if parent.op_type == "Constant":
            continue
        out.append(parent)
        stack.extend(parent.input)
    return out


def test_fp32_nodes_match_the_plan_keep_rules(graphs, plan):
    checked = {"sincos": 0, "softmax": 0, "norm": 0}
    for g in GRAPHS:
        model = graphs[g]
        kept = kept_node_names(model, *_keep(plan.graphs[g]))
        producers = _producers(model)
        for node in model.graph.node:
            if node.op_type in ("Sin", "Cos"):
                # the angles and everything between the fp32 input and Sin/Cos: all kept
                upstream = _float_ancestors(model, node)
                assert upstream, node.name
                for n in [node, *upstream]:
                    assert n.name in kept, f"{g}: {n.op_type} {n.name} feeds {node.name} but is not kept in fp32"
                checked["sincos"] += 1
            if node.op_type == "Softmax":
                # softmax(scores * scale + mask bias) kept; the scores (q K_past^T, q k_new^T, concatenated)
                # come out of the engine-precision GEMMs
                add = producers[node.input[0]]
                scale = producers[add.input[0]]
                joined = producers[scale.input[0]]
                assert (add.op_type, scale.op_type, joined.op_type) == ("Add", "Mul", "Concat")
                assert [producers[i].op_type for i in joined.input] == ["MatMul", "MatMul"]
                for n in (node, add, scale):
                    assert n.name in kept, f"{g}: {n.op_type} {n.name} (attention softmax) is not kept in fp32"
                assert not {producers[i].name for i in joined.input} & kept, f"{g}: q k^T kept in fp32"
                checked["softmax"] += 1
            if node.op_type == "ReduceMean":
                # norm statistics: x^2 -> mean -> + eps -> sqrt -> 1 / .
                chain = [node]
                while True:
                    users = [n for n in model.graph.node if chain[-1].output[0] in n.input]
                    if len(users) != 1 or users[0].op_type not in ("Add", "Sqrt", "Div", "Reciprocal"):
                        break
                    chain.append(users[0])
                pow_node = producers[node.input[0]]
                assert pow_node.op_type == "Pow"
                assert [n.op_type for n in chain] == ["ReduceMean", "Add", "Sqrt", "Div"], [n.name for n in chain]
                for n in [pow_node, *chain]:
                    assert n.name in kept, f"{g}: norm statistic {n.op_type} {n.name} is not kept in fp32"
                checked["norm"] += 1
    assert checked["softmax"] == 2  # the tiny LM's two layers
    assert checked["sincos"] == 2  # the diffusion step's timestep embedding (the sampler's is a constant)
    assert checked["norm"] > 20


def test_lm_has_fp32_rope_table_and_a_finite_mask_bias(graphs, manifest):
    model = graphs["lm"]
    assert not [n for n in model.graph.node if n.op_type in ("Sin", "Cos")]  # no angles in the graph
    inits = {i.name: i for i in model.graph.initializer}
    half = manifest["model"]["head_dim"] // 2
    table = [i for name, i in inits.items() if name.startswith("rope_table.")]
    assert sorted(i.name for i in table) == ["rope_table.cos_half", "rope_table.sin_half"]
    assert all(list(i.dims) == [manifest["model"]["max_position_embeddings"], half] for i in table)
    # every float constant is representable in fp16 (no finfo(float32).min turning into -inf)
    from onnx import numpy_helper

    values = [numpy_helper.to_array(i) for i in model.graph.initializer]
    values += [numpy_helper.to_array(a.t) for n in model.graph.node if n.op_type == "Constant"
               for a in n.attribute if a.name == "value"]
    floats = [v for v in values if v.dtype == np.float32 and v.size]
    assert max(float(np.max(np.abs(v))) for v in floats) <= 65504
    assert any(np.any(v == wrappers.MASK_BIAS) for v in floats)


# --- per graph, per precision ---------------------------------------------------------------------

def _graph_errors(tiny_engine_dir, graphs, gp, graph, precision, keep=None):
    feeds_list, _ = load_validation_data(tiny_engine_dir, graph)
    ref = cpu_session(graphs[graph])
    emu = cpu_session(emulate_model(graphs[graph], precision, *(keep or _keep(gp))))
    tol = gp.tolerance_for(precision)
    worst = {}
    for feeds in feeds_list:
        want, got = _run(ref, feeds), _run(emu, feeds)
        for name, r in want.items():
            err, allowed = max_error(got[name], r), allowed_error(tol[name], r)
            if name not in worst or err - allowed > worst[name][0] - worst[name][1]:
                worst[name] = (err, allowed)
    return worst


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("graph", GRAPHS)
def test_graph_within_tolerance_at_reduced_precision(tiny_engine_dir, graphs, plan, graph, precision):
    for name, (err, allowed) in _graph_errors(tiny_engine_dir, graphs, plan.graphs[graph], graph, precision).items():
        assert err <= allowed, f"{graph} {precision} {name}: max error {err:.3g} > allowed {allowed:.3g}"
        assert err > 0, f"{graph} {precision} {name}: no rounding at all (the emulation did nothing)"


def test_old_timestep_embedding_fails_in_bf16(tiny_engine_dir, graphs, plan):
    """The regression: without the fp32 timestep nodes the diffusion step leaves its bf16 tolerance."""
    worst = _graph_errors(tiny_engine_dir, graphs, plan.graphs["diffusion_step"], "diffusion_step", "bf16",
                          keep=(OLD_KEEP_OPS, OLD_KEEP_NAMES))
    err, allowed = worst["guided"]
    assert err > allowed, f"old keep rules: {err:.3g} <= {allowed:.3g}: the test could not see the fault"


# --- the LM at long positions and on padded batches ------------------------------------------------

class _LegacyRope(nn.Module):
    """RoPE as before the fix: angles position * inv_freq and their Cos/Sin computed in the graph."""

    def __init__(self, rotary):
        super().__init__()
        self.rotary = rotary

    def forward(self, position_ids):
        return self.rotary(torch.zeros((), dtype=torch.float32), position_ids)


class _LegacyLMStep(wrappers.LMStep):
    """The LM graph before the fix: in-graph RoPE angles, finfo(float32).min bias, no own-slot attention."""

    def __init__(self, language_model, *args):
        super().__init__(language_model, *args)
        self.rope_table = _LegacyRope(language_model.rotary_emb)

    def _attention_bias(self, attention_mask, past, seq):
        q_pos = torch.arange(seq) + past
        k_pos = torch.arange(past + seq)
        allowed = (k_pos[None, :] <= q_pos[:, None])[None, None] & (attention_mask[:, None, None, :] > 0)
        return torch.where(allowed, torch.zeros(()), torch.full((), torch.finfo(torch.float32).min))


@pytest.fixture(scope="module")
def long_lms(fixture_dir, tmp_path_factory):
    """The fixture's LM with a 64K-position RoPE table (its weights, VibeVoice-1.5B's context), new and old."""
    from vv_export.families import load_checkpoint
    from vv_export.onnx_export import export_graph
    from vv_export.specs import ExportContext, build_specs

    loaded = load_checkpoint(str(fixture_dir))
    loaded.model.config.text_config.max_position_embeddings = LONG_POSITIONS
    loaded.model.model.language_model.config.max_position_embeddings = LONG_POSITIONS
    ctx = ExportContext(loaded)
    spec = next(s for s in build_specs(ctx) if s.name == "lm")
    net = ctx.net.model
    legacy = dataclasses.replace(spec, build=lambda c: _LegacyLMStep(net.language_model, c.net.lm_head.weight,
                                                                      c.control_ids))
    out = {}
    for label, s in (("new", spec), ("old", legacy)):
        directory = tmp_path_factory.mktemp(f"lm_{label}")
        export_graph(s, ctx, directory, "fp32")
        out[label] = onnx.load(str(directory / "lm.onnx"))
    out["ctx"] = ctx
    return out


def _lm_feeds(ctx, batch, seq, past, first_position, seed):
    gen = np.random.default_rng(seed)
    return {
        "inputs_embeds": (gen.standard_normal((batch, seq, ctx.hidden)) * 0.5).astype(np.float32),
        "attention_mask": np.ones((batch, past + seq), np.int64),
        "position_ids": (first_position + past + np.arange(seq))[None].repeat(batch, 0).astype(np.int64),
        "past_kv": gen.standard_normal((ctx.layers, 2, batch, ctx.kv_heads, past, ctx.head_dim)).astype(np.float32),
    }


# (seq, past, first position of the past): a short past ending at position 8192, a past of a few
# hundred, a decode step at 8192, and a short context for comparison
LONG_CASES = [(4, 4, 8185), (2, 300, 7891), (1, 512, 7680), (6, 0, 0)]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_lm_at_positions_up_to_8k(long_lms, plan, precision):
    gp = plan.graphs["lm"]
    tol = gp.tolerance_for(precision)
    ref = cpu_session(long_lms["new"])
    emu = cpu_session(emulate_model(long_lms["new"], precision, *_keep(gp)))
    old_ref = cpu_session(long_lms["old"])
    old_emu = cpu_session(emulate_model(long_lms["old"], precision, *_keep(gp)))
    old_fails = False
    for i, (seq, past, start) in enumerate(LONG_CASES):
        feeds = _lm_feeds(long_lms["ctx"], 2, seq, past, start, seed=i)
        assert int(feeds["position_ids"].max()) == (8192 if start else seq - 1)
        want, got = _run(ref, feeds), _run(emu, feeds)
        for name, r in want.items():
            err, allowed = max_error(got[name], r), allowed_error(tol[name], r)
            assert err <= allowed, f"{precision} seq {seq} past {past} pos {start}: {name} {err:.3g} > {allowed:.3g}"
        # the old graph, same plan: fine at small positions, off at ~8K in bf16
        old_want, old_got = _run(old_ref, feeds), _run(old_emu, feeds)
        np.testing.assert_allclose(old_want["hidden"], want["hidden"], rtol=0, atol=1e-4)  # same fp32 model
        errs = {n: max_error(old_got[n], r) - allowed_error(tol[n], r) for n, r in old_want.items()}
        if start == 0:
            assert all(e <= 0 for e in errs.values()), errs
        old_fails |= any(e > 0 for e in errs.values())
    if precision == "bf16":
        assert old_fails, "the old in-graph RoPE passed at ~8K in bf16: the test could not see the fault"


def _padded_feeds(ctx, seed=0):
    """3 rows, prefill of 8 slots: a full row, a row left-padded by 3 slots, a row of padding only."""
    gen = np.random.default_rng(seed)
    seq = 8
    embeds = (gen.standard_normal((3, seq, ctx.hidden)) * 0.5).astype(np.float32)
    mask = np.ones((3, seq), np.int64)
    mask[1, :3] = 0
    mask[2, :] = 0
    positions = np.cumsum(mask, axis=1) - 1
    positions[mask == 0] = 1  # the runtime's convention for masked slots
    return {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions.astype(np.int64),
            "past_kv": np.zeros((ctx.layers, 2, 3, ctx.kv_heads, 0, ctx.head_dim), np.float32)}


def _alone(feeds, row, start):
    return {"inputs_embeds": feeds["inputs_embeds"][row:row + 1, start:],
            "attention_mask": feeds["attention_mask"][row:row + 1, start:],
            "position_ids": feeds["position_ids"][row:row + 1, start:],
            "past_kv": feeds["past_kv"][:, :, row:row + 1]}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_padded_batch_is_finite_and_rows_equal_alone(long_lms, plan, precision):
    gp = plan.graphs["lm"]
    feeds = _padded_feeds(long_lms["ctx"])
    emu = cpu_session(emulate_model(long_lms["new"], precision, *_keep(gp)))
    batch = _run(emu, feeds)
    for name, value in batch.items():
        assert np.isfinite(value).all(), f"{precision}: {name} has non-finite values"
    for row, start in ((0, 0), (1, 3)):
        alone = _run(emu, _alone(feeds, row, start))
        np.testing.assert_allclose(batch["hidden"][row], alone["hidden"][0], rtol=0, atol=1e-6)
        np.testing.assert_allclose(batch["control_logits"][row], alone["control_logits"][0], rtol=0, atol=1e-6)
        np.testing.assert_allclose(batch["new_kv"][:, :, row, :, start:], alone["new_kv"][:, :, 0], rtol=0, atol=1e-6)
    # the old graph (finfo(float32).min -> -inf, padded queries with every key masked): NaN reaches the
    # real positions of the padded row through the next layer (0 weight x NaN value)
    old = _run(cpu_session(emulate_model(long_lms["old"], precision, *_keep(gp))), feeds)
    assert not np.isfinite(old["new_kv"][:, :, 2]).all()  # the all-padding row
    assert not np.isfinite(old["hidden"][1]).all()  # the real last position of the left-padded row


# --- whole generations -----------------------------------------------------------------------------

# plan: the default plan as built (lm bf16, other graphs fp16); "bf16"/"fp16": every graph at that
# precision (`vv-export trt --precision`)
GENERATION_CASES = {"plan": None, "bf16": "bf16", "fp16": "fp16"}


@pytest.fixture(scope="module")
def generations(tiny_engine_dir, manifest, fixture_reference, tmp_path_factory):
    meta, ref = fixture_reference
    gen = meta["generate"]
    args = (gen["script"], [ref["generate.voice_wav_raw"]], ref["generate.noise"], gen["cfg_scale"],
            gen["max_new_tokens"])
    tokens, margins = decision_margins(tiny_engine_dir, *args)
    assert tokens == gen["generated_tokens"]
    out = {}
    for label, precision in GENERATION_CASES.items():
        directory = tmp_path_factory.mktemp("emulated") / label
        write_emulated_engine_dir(tiny_engine_dir, directory, resolve_plan("default", manifest, precision=precision))
        out[label] = compare_generations(tiny_engine_dir, directory, *args)
        shutil.rmtree(directory)
    return out, tokens, margins


@pytest.mark.parametrize("label", list(GENERATION_CASES))
def test_whole_generation_at_reduced_precision(generations, plan, label):
    """Tokens agree with fp32 at least until the first decision whose fp32 margin is within the LM's error.

    The fixture is a tiny random model: some of its control-token decisions are near ties (fp32 top-2
    margins of 0.014 and 0.038 logits), below what any bf16/fp16 LM may move its logits (the plan's
    control_logits atol: 0.05 bf16, 0.02 fp16). A decision with a larger margin must not flip, so the
    tokens must agree up to the first near tie; beyond it a different but valid sequence is no fault.
    With identical tokens, the audio must stay within 25 dB SNR of fp32 (measured in fp16: 48 dB; the
    plan and bf16 agree through token 18 and then take the other branch of the 0.038 near tie).
    """
    results, tokens, margins = generations
    r = results[label]
    lm_precision = GENERATION_CASES[label] or plan.graphs["lm"].precision
    atol = plan.graphs["lm"].tolerance_for(lm_precision)["control_logits"]["atol"]
    near_tie = next((i for i, m in enumerate(margins) if m < atol), len(tokens))
    assert r["first_token_difference"] is None or r["first_token_difference"] >= near_tie, (r, near_tie)
    assert r["audio_finite"]
    if r["token_agreement"] == 1.0:
        assert r["frames_emulated"] == r["frames"]
        assert r["audio_snr_db"] >= 25.0, r
