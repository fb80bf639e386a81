"""The in-place cache variant of the lm graph (export/wrappers.py `LMStepInPlaceCache`), on ONNX Runtime.

The exported lm concatenates each layer's cache with the new positions every call; the variant reads the
cache where it lives (scores of the cached and the new keys apart, one fp32 softmax over both, P_past
V_past + P_new v_new) and leaves the cache to be updated in place by the caller's batched row write.
Here, on the shared fixture: the variant has no cache concatenation, only its softmax is kept in fp32,
and it gives the concatenating graph's outputs in fp32 (to float rounding) and in emulated bf16 (within
the default plan's bf16 tolerance for lm; a cache stored in bf16 changes nothing there).
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


@pytest.fixture(scope="module")
def graphs(fixture_dir, tiny_engine_dir, tmp_path_factory):
    """(concatenating lm, in-place variant, manifest): the variant exported like the lm (same spec, same
    exporter), from the same checkpoint."""
    from vv_export import wrappers
    from vv_export.families import load_checkpoint
    from vv_export.onnx_export import export_graph
    from vv_export.specs import ExportContext, build_specs

    ctx = ExportContext(load_checkpoint(str(fixture_dir)))
    spec = next(s for s in build_specs(ctx) if s.name == "lm")
    lm = ctx.net.model.language_model
    variant = dataclasses.replace(spec, name="lm_in_place",
                                  build=lambda c: wrappers.LMStepInPlaceCache(lm, c.net.lm_head.weight, c.control_ids))
    out = tmp_path_factory.mktemp("lm-variant")
    export_graph(variant, ctx, out, "fp32")
    manifest = json.loads((tiny_engine_dir / "manifest.json").read_text())
    return (onnx.load(str(tiny_engine_dir / manifest["graphs"]["lm"]["file"])), onnx.load(str(out / "lm_in_place.onnx")),
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


def test_variant_reads_the_cache_in_place_and_keeps_only_the_softmax(graphs):
    concat, variant, manifest = graphs
    assert _copies_cache(concat) and not _copies_cache(variant)
    assert [i.name for i in variant.graph.input] == [i.name for i in concat.graph.input]
    assert [o.name for o in variant.graph.output] == [o.name for o in concat.graph.output]
    gp = resolve_plan("default", manifest).graphs["lm"]
    kept = kept_node_names(variant, gp.builder["keep_fp32"], gp.builder["keep_fp32_names"])
    layers = manifest["model"]["num_layers"]
    softmax = {n.name for n in variant.graph.node if n.op_type == "Softmax"}
    assert len(softmax) == layers and softmax <= kept
    assert all(name.startswith("/attn_softmax_fp32.") for name in softmax)
    # the q k^T and probabilities x values products run in the engine's precision
    weights = {i.name for i in variant.graph.initializer}
    attention_matmuls = [n.name for n in variant.graph.node if n.op_type == "MatMul" and n.input[1] not in weights]
    assert len(attention_matmuls) == 4 * layers and not set(attention_matmuls) & kept  # q K_past, q k_new, P V x 2


def test_variant_equals_the_concatenating_lm_in_fp32(graphs, tiny_engine_dir):
    concat, variant, manifest = graphs
    feeds = _feeds(tiny_engine_dir, manifest)
    for want, got in zip(_run(concat, feeds), _run(variant, feeds)):
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_variant_in_emulated_bf16_within_the_plans_tolerance(graphs, tiny_engine_dir):
    """Both graphs as a bf16 engine of the default plan computes them (vv_export.precision): the variant's
    scores come out of a bf16 GEMM, only the softmax stays fp32. Against the fp32 outputs the variant stays
    within the plan's bf16 tolerance for lm, as the concatenating graph does, and the two differ by less
    than that tolerance. A cache stored in bf16 gives bit for bit the same outputs (the engine rounds the
    cache it reads to bf16 anyway, and writes new_kv in bf16)."""
    concat, variant, manifest = graphs
    gp = resolve_plan("default", manifest).graphs["lm"]
    assert gp.precision == "bf16"
    tolerance = gp.tolerance_for("bf16")
    keep = (gp.builder["keep_fp32"], gp.builder["keep_fp32_names"])
    feeds = _feeds(tiny_engine_dir, manifest)
    reference = _run(concat, feeds)
    emulated_concat = _run(emulate_model(concat, "bf16", *keep), feeds)
    emulated_variant_model = emulate_model(variant, "bf16", *keep)
    emulated_variant = _run(emulated_variant_model, feeds)
    worst = 0.0
    for ref, a, b in zip(reference, emulated_concat, emulated_variant):
        for name, r in ref.items():
            allowed = allowed_error(tolerance[name], r)
            assert max_error(a[name], r) <= allowed, name
            assert max_error(b[name], r) <= allowed, name
            assert max_error(b[name], a[name]) <= allowed, name
            worst = max(worst, max_error(b[name], a[name]) / allowed)
    assert worst > 0  # the variant's bf16 scores do round differently
    import ml_dtypes

    bf16_cache = [{**f, "past_kv": f["past_kv"].astype(ml_dtypes.bfloat16).astype(np.float32)} for f in feeds]
    for a, b in zip(emulated_variant, _run(emulated_variant_model, bf16_cache)):
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
        assert np.array_equal(a["new_kv"], a["new_kv"].astype(ml_dtypes.bfloat16).astype(np.float32))
