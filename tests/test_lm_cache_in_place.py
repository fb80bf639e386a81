"""The lm graph reads its cache in place (export/wrappers.py `DecoderStep._attend`), on ONNX Runtime.

The straightforward attention concatenates each layer's cache with the new positions every call (the cache
read twice and written once); the exported lm reads the cache where it lives (scores of the cached and the
new keys apart, one fp32 softmax over both, P_past V_past + P_new v_new) and leaves the cache to be updated
in place by the caller's batched row write. Here, on the shared fixture, against a concatenating lm
exported from the same checkpoint: the exported lm copies no cache, only its softmax is kept in fp32, and it
gives the concatenating graph's outputs in fp32 (to float rounding) and in emulated bf16 (within the default
plan's bf16 tolerance for lm; a cache stored in bf16 changes nothing there).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest

from vv_export.graph_rules import allowed_error, cpu_session, max_error
from vv_export.plans import resolve_plan
from vv_export.precision import emulate_model, kept_node_names
from vv_export.validation_data import load_validation_data

# ops that only move or select data: a cache reaching a Concat through them is copied whole
DATA_MOVEMENT = {"Gather", "Unsqueeze", "Squeeze", "Transpose", "Slice", "Reshape", "Identity"}


def _concatenating_step():
    """An lm step that attends over one key/value tensor per layer: the cache concatenated with the new
    positions (the reference the in-place reading is checked against)."""
    import torch

    from vv_export import wrappers

    class ConcatenatingLMStep(wrappers.LMStep):
        def _attend(self, i, q, k, v, past_kv, bias, bsz, seq):
            keys = torch.cat([past_kv[i, 0], k], dim=2).unsqueeze(2)
            values = torch.cat([past_kv[i, 1], v], dim=2).unsqueeze(2)
            probs = self.attn_softmax_fp32[i](torch.matmul(self._grouped(q, bsz, seq), keys.transpose(-2, -1)), bias)
            return torch.matmul(probs, values)

    return ConcatenatingLMStep


@pytest.fixture(scope="module")
def graphs(fixture_dir, tiny_engine_dir, tmp_path_factory):
    """(concatenating lm, the exported lm, manifest): the concatenating one exported like the lm (same spec,
    same exporter), from the same checkpoint."""
    from vv_export.families import load_checkpoint
    from vv_export.onnx_export import export_graph
    from vv_export.specs import ExportContext, build_specs

    ctx = ExportContext(load_checkpoint(str(fixture_dir)))
    spec = next(s for s in build_specs(ctx) if s.name == "lm")
    lm = ctx.net.model.language_model
    step = _concatenating_step()
    concat = dataclasses.replace(spec, name="lm_concatenating",
                                 build=lambda c: step(lm, c.net.lm_head.weight, c.control_ids))
    out = tmp_path_factory.mktemp("lm-concatenating")
    export_graph(concat, ctx, out, "fp32")
    manifest = json.loads((tiny_engine_dir / "manifest.json").read_text())
    return (onnx.load(str(out / "lm_concatenating.onnx")), onnx.load(str(tiny_engine_dir / manifest["graphs"]["lm"]["file"])),
            manifest)


def _feeds(tiny_engine_dir, manifest):
    """The lm's validation input sets, and a decode step of 4 rows over a 128-slot cache, each row with its
    own length and masked holes (as the shared cache of a batch holds them)."""
    feeds, _ = load_validation_data(tiny_engine_dir, "lm")
    feeds = [dict(f) for f in feeds]
    m = manifest["model"]
    L, KV, D, H = m["num_layers"], m["num_kv_heads"], m["head_dim"], m["hidden_size"]
    rng = np.random.default_rng(0)
    lengths = np.array([5, 128, 60, 17])
    mask = (np.arange(128)[None] < lengths[:, None]).astype(np.int64)
    mask[1, 30:40] = 0
    feeds.append({"inputs_embeds": rng.standard_normal((4, 1, H)).astype(np.float32),
                  "attention_mask": np.concatenate([mask, np.ones((4, 1), np.int64)], axis=1),
                  "position_ids": lengths[:, None].astype(np.int64),
                  "past_kv": rng.standard_normal((L, 2, 4, KV, 128, D)).astype(np.float32)})
    return feeds


def _run(model, feeds_list):
    session = cpu_session(model)
    names = [o.name for o in session.get_outputs()]
    return [dict(zip(names, session.run(names, feeds))) for feeds in feeds_list]


def _copies_cache(model) -> bool:
    """Whether past_kv reaches a Concat through data movement only (the cache copied whole)."""
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    frontier, seen = ["past_kv"], set()
    while frontier:
        name = frontier.pop()
        for node in consumers.get(name, []):
            if node.op_type == "Concat":
                return True
            if node.op_type in DATA_MOVEMENT and node.name not in seen:
                seen.add(node.name)
                frontier.extend(node.output)
    return False


def test_lm_reads_the_cache_in_place_and_keeps_only_the_softmax(graphs):
    concat, lm, manifest = graphs
    assert _copies_cache(concat) and not _copies_cache(lm)
    assert [i.name for i in lm.graph.input] == [i.name for i in concat.graph.input]
    assert [o.name for o in lm.graph.output] == [o.name for o in concat.graph.output]
    gp = resolve_plan("default", manifest).graphs["lm"]
    kept = kept_node_names(lm, gp.builder["keep_fp32"], gp.builder["keep_fp32_names"])
    layers = manifest["model"]["num_layers"]
    softmax = {n.name for n in lm.graph.node if n.op_type == "Softmax"}
    assert len(softmax) == layers and softmax <= kept
    assert all(name.startswith("/attn_softmax_fp32.") for name in softmax)
    # the q k^T and probabilities x values products run in the engine's precision
    weights = {i.name for i in lm.graph.initializer}
    attention_matmuls = [n.name for n in lm.graph.node if n.op_type == "MatMul" and n.input[1] not in weights]
    assert len(attention_matmuls) == 4 * layers and not set(attention_matmuls) & kept  # q K_past, q k_new, P V x 2


def test_lm_equals_the_concatenating_lm_in_fp32(graphs, tiny_engine_dir):
    concat, lm, manifest = graphs
    feeds = _feeds(tiny_engine_dir, manifest)
    for want, got in zip(_run(concat, feeds), _run(lm, feeds)):
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_lm_in_emulated_bf16_within_the_plans_tolerance(graphs, tiny_engine_dir):
    """Both graphs as a bf16 engine of the default plan computes them (vv_export.precision): the scores come
    out of bf16 GEMMs, only the softmax stays fp32. Against the fp32 outputs the lm stays within the plan's
    bf16 tolerance for lm, as the concatenating graph does, and the two differ by less than that tolerance. A cache stored in bf16 gives bit for bit the same outputs (the engine rounds the
    cache it reads to bf16 anyway, and writes new_kv in bf16)."""
    concat, lm, manifest = graphs
    gp = resolve_plan("default", manifest).graphs["lm"]
    assert gp.precision == "bf16"
    tolerance = gp.tolerance_for("bf16")
    keep = (gp.builder["keep_fp32"], gp.builder["keep_fp32_names"])
    feeds = _feeds(tiny_engine_dir, manifest)
    reference = _run(concat, feeds)
    emulated_concat = _run(emulate_model(concat, "bf16", *keep), feeds)
    emulated_lm_model = emulate_model(lm, "bf16", *keep)
    emulated_lm = _run(emulated_lm_model, feeds)
    worst = 0.0
    for ref, a, b in zip(reference, emulated_concat, emulated_lm):
        for name, r in ref.items():
            allowed = allowed_error(tolerance[name], r)
            assert max_error(a[name], r) <= allowed, name
            assert max_error(b[name], r) <= allowed, name
            assert max_error(b[name], a[name]) <= allowed, name
            worst = max(worst, max_error(b[name], a[name]) / allowed)
    assert worst > 0  # the two attentions' bf16 products do round differently
    import ml_dtypes

    bf16_cache = [{**f, "past_kv": f["past_kv"].astype(ml_dtypes.bfloat16).astype(np.float32)} for f in feeds]
    for a, b in zip(emulated_lm, _run(emulated_lm_model, bf16_cache)):
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
        assert np.array_equal(a["new_kv"], a["new_kv"].astype(ml_dtypes.bfloat16).astype(np.float32))


def test_bf16_cache_io_is_the_graph_on_a_rounded_cache(graphs, tiny_engine_dir):
    """The copy `vv-export trt` builds a bf16-cache LM engine from (graph_rules.with_cache_dtype): past_kv and
    new_kv in bf16, the graph between them unchanged. On ONNX Runtime it gives exactly the fp32 graph's
    outputs on the bf16-rounded cache, new_kv rounded to bf16."""
    import copy

    import ml_dtypes
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from vv_export.graph_rules import with_cache_dtype

    _, lm, manifest = graphs
    typed = copy.deepcopy(lm)
    assert with_cache_dtype(typed, "bf16") == 2 and with_cache_dtype(copy.deepcopy(lm), "fp32") == 0
    types = {v.name: v.type.tensor_type.elem_type for v in list(typed.graph.input) + list(typed.graph.output)}
    assert types["past_kv"] == types["new_kv"] == TensorProto.BFLOAT16 and types["inputs_embeds"] == TensorProto.FLOAT
    # read new_kv back through a float Cast (numpy has no bf16 for ONNX Runtime to hand out)
    typed.graph.node.append(helper.make_node("Cast", ["new_kv"], ["new_kv_float"], to=TensorProto.FLOAT))
    typed.graph.output.append(helper.make_tensor_value_info("new_kv_float", TensorProto.FLOAT, None))
    session = ort.InferenceSession(typed.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in lm.graph.output]
    for feeds, want in zip(_feeds(tiny_engine_dir, manifest), _run(lm, [
            {**f, "past_kv": f["past_kv"].astype(ml_dtypes.bfloat16).astype(np.float32)}
            for f in _feeds(tiny_engine_dir, manifest)])):
        ort_feeds = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items() if k != "past_kv"}
        bf16 = np.ascontiguousarray(feeds["past_kv"].astype(ml_dtypes.bfloat16).view(np.uint16))
        ort_feeds["past_kv"] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bf16, TensorProto.BFLOAT16)
        got = session.run_with_ort_values([n for n in names if n != "new_kv"] + ["new_kv_float"], ort_feeds)
        got = dict(zip([n for n in names if n != "new_kv"] + ["new_kv"], (g.numpy() for g in got)))
        for name in names:
            expected = want[name]
            if name == "new_kv":
                expected = expected.astype(ml_dtypes.bfloat16).astype(np.float32)
            np.testing.assert_array_equal(got[name], expected, err_msg=name)
