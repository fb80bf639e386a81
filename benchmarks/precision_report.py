"""Reduced precision on the CPU: emulated fp16/bf16 engines against fp32 -> benchmarks/results/reduced_precision.json.

Every graph of the shared fixture is run in ONNX Runtime as a TensorRT engine at reduced precision would
compute it in the worst case the plan allows (vv_export.precision, docs/PRECISION.md) and compared with
the fp32 graph. Reported: per graph x precision the max abs error on the exporter's validation inputs
and the plan's tolerance; the LM at positions 16/512/2048/8192 (the fixture's weights with a 64K RoPE
table); a left-padded batch (finite, rows equal to the rows run alone); whole generations (token
agreement, audio SNR) on the fixture and on the tiny random model; and, for contrast, the graphs as
they were before the fix (old keep rules, in-graph RoPE angles, finfo(float32).min mask bias).

    python benchmarks/precision_report.py [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import REPO, SHARED, provenance, write_result  # noqa: E402
from generation_compare import compare_generations, decision_margins  # noqa: E402

FIXTURE = SHARED / "fixtures" / "vibevoice-tiny-original"
RESULT_NAME = "reduced_precision.json"
PRECISIONS = ("fp16", "bf16")
OLD_KEEP_OPS = ["Pow", "ReduceMean", "Sqrt", "Reciprocal", "RMSNormalization", "LayerNormalization"]
OLD_KEEP_NAMES = ["*norm*"]
LONG_POSITIONS = 65536
LM_POSITIONS = (16, 512, 2048, 8192)
RANDOM_SCRIPT = "Speaker 1: Reduced precision, checked on the CPU.\nSpeaker 2: Every graph, every frame."


def _run(session, feeds):
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def _compare(ref, emu, feeds_list, tol):
    from vv_export.graph_rules import allowed_error, max_error

    worst = {}
    for feeds in feeds_list:
        want, got = _run(ref, feeds), _run(emu, feeds)
        for name, r in want.items():
            err, allowed = max_error(got[name], r), allowed_error(tol[name], r)
            if name not in worst or err - allowed > worst[name]["max_abs_error"] - worst[name]["allowed"]:
                worst[name] = {"max_abs_error": err, "allowed": allowed, "atol": tol[name]["atol"],
                               "rtol": tol[name]["rtol"], "ok": bool(err <= allowed)}
    return worst


def graph_errors(engine_dir, plan) -> dict:
    import onnx

    from vv_export.graph_rules import cpu_session
    from vv_export.precision import emulate_model
    from vv_export.validation_data import load_validation_data

    out = {}
    for graph, gp in plan.graphs.items():
        model = onnx.load(str(Path(engine_dir) / f"{graph}.onnx"))
        feeds_list, _ = load_validation_data(engine_dir, graph)
        ref = cpu_session(model)
        entry = {"plan_precision": gp.precision}
        for precision in PRECISIONS:
            emu = cpu_session(emulate_model(model, precision, gp.builder["keep_fp32"], gp.builder["keep_fp32_names"]))
            entry[precision] = _compare(ref, emu, feeds_list, gp.tolerance_for(precision))
            if graph == "diffusion_step":
                old = cpu_session(emulate_model(model, precision, OLD_KEEP_OPS, OLD_KEEP_NAMES))
                entry[precision + "_old_keep_rules"] = _compare(ref, old, feeds_list, gp.tolerance_for(precision))
        out[graph] = entry
    return out


def _legacy_lm_class():
    import torch
    from torch import nn

    from vv_export import wrappers

    class LegacyRope(nn.Module):
        def __init__(self, rotary):
            super().__init__()
            self.rotary = rotary

        def forward(self, position_ids):
            return self.rotary(torch.zeros((), dtype=torch.float32), position_ids)

    class LegacyLMStep(wrappers.LMStep):
        """The LM graph before the fix: in-graph RoPE angles, finfo(float32).min bias, no own-slot attention."""

        def __init__(self, language_model, *args):
            super().__init__(language_model, *args)
            self.rope_table = LegacyRope(language_model.rotary_emb)

        def _attention_bias(self, attention_mask, past, seq):
            q_pos = torch.arange(seq) + past
            k_pos = torch.arange(past + seq)
            allowed = (k_pos[None, :] <= q_pos[:, None])[None, None] & (attention_mask[:, None, None, :] > 0)
            return torch.where(allowed, torch.zeros(()), torch.full((), torch.finfo(torch.float32).min))

    return LegacyLMStep


def long_lms(work: Path):
    import onnx

    from vv_export.families import load_checkpoint
    from vv_export.onnx_export import export_graph
    from vv_export.specs import ExportContext, build_specs

    loaded = load_checkpoint(str(FIXTURE))
    loaded.model.config.text_config.max_position_embeddings = LONG_POSITIONS
    loaded.model.model.language_model.config.max_position_embeddings = LONG_POSITIONS
    ctx = ExportContext(loaded)
    spec = next(s for s in build_specs(ctx) if s.name == "lm")
    legacy_cls = _legacy_lm_class()
    net = ctx.net.model
    legacy = dataclasses.replace(spec, build=lambda c: legacy_cls(net.language_model, c.net.lm_head.weight,
                                                                  c.control_ids))
    models = {}
    for label, s in (("new", spec), ("old", legacy)):
        directory = work / f"lm_{label}"
        directory.mkdir()
        export_graph(s, ctx, directory, "fp32")
        models[label] = onnx.load(str(directory / "lm.onnx"))
    return models, ctx


def lm_positions(models, ctx, gp) -> dict:
    from vv_export.graph_rules import cpu_session
    from vv_export.precision import emulate_model

    keep = (gp.builder["keep_fp32"], gp.builder["keep_fp32_names"])
    out = {}
    for precision in PRECISIONS:
        tol = gp.tolerance_for(precision)
        rows = {}
        for label in ("new", "old"):
            ref = cpu_session(models[label])
            emu = cpu_session(emulate_model(models[label], precision, *keep))
            for position in LM_POSITIONS:
                cases = {}
                # decode at the position after a past of min(position, 256) slots; prefill of 4 ending there
                for name, seq, past in (("decode", 1, min(position, 256)), ("short_past", 4, 4)):
                    start = position - past - seq + 1  # position ids start + past .. position
                    gen = np.random.default_rng(position + seq)
                    feeds = {
                        "inputs_embeds": (gen.standard_normal((2, seq, ctx.hidden)) * 0.5).astype(np.float32),
                        "attention_mask": np.ones((2, past + seq), np.int64),
                        "position_ids": (start + past + np.arange(seq))[None].repeat(2, 0).astype(np.int64),
                        "past_kv": gen.standard_normal((ctx.layers, 2, 2, ctx.kv_heads, past, ctx.head_dim))
                        .astype(np.float32),
                    }
                    cases[f"{name} (seq {seq}, past {past}, last position {position})"] = \
                        _compare(ref, emu, [feeds], tol)
                rows.setdefault(label, {})[str(position)] = cases
        out[precision] = rows
    return out


def padded_batch(models, ctx, gp) -> dict:
    from vv_export.graph_rules import cpu_session
    from vv_export.precision import emulate_model

    keep = (gp.builder["keep_fp32"], gp.builder["keep_fp32_names"])
    gen = np.random.default_rng(0)
    seq = 8
    mask = np.ones((3, seq), np.int64)
    mask[1, :3] = 0
    mask[2, :] = 0
    positions = np.cumsum(mask, axis=1) - 1
    positions[mask == 0] = 1
    feeds = {"inputs_embeds": (gen.standard_normal((3, seq, ctx.hidden)) * 0.5).astype(np.float32),
             "attention_mask": mask, "position_ids": positions.astype(np.int64),
             "past_kv": np.zeros((ctx.layers, 2, 3, ctx.kv_heads, 0, ctx.head_dim), np.float32)}
    out = {"rows": "row 0 full (8 tokens), row 1 left-padded by 3 slots, row 2 padding only"}
    for precision in PRECISIONS:
        entry = {}
        for label in ("new", "old"):
            emu = cpu_session(emulate_model(models[label], precision, *keep))
            batch = _run(emu, feeds)
            diff = 0.0
            for row, start in ((0, 0), (1, 3)):
                alone = _run(emu, {"inputs_embeds": feeds["inputs_embeds"][row:row + 1, start:],
                                   "attention_mask": mask[row:row + 1, start:],
                                   "position_ids": feeds["position_ids"][row:row + 1, start:],
                                   "past_kv": feeds["past_kv"][:, :, row:row + 1]})
                for a, b in ((batch["hidden"][row], alone["hidden"][0]),
                             (batch["new_kv"][:, :, row, :, start:], alone["new_kv"][:, :, 0])):
                    diff = max(diff, float(np.max(np.abs(a.astype(np.float64) - b))) if np.isfinite(a).all()
                               else float("inf"))
            entry[label] = {"all_outputs_finite": bool(all(np.isfinite(v).all() for v in batch.values())),
                            "real_row_hidden_finite": bool(np.isfinite(batch["hidden"][:2]).all()),
                            "real_rows_max_diff_vs_alone": diff}
        out[precision] = entry
    return out


def generations(engine_dir, manifest, label, script, voices, noise, cfg_scale, frames, work: Path) -> dict:
    from vv_export.plans import resolve_plan
    from vv_export.precision import write_emulated_engine_dir

    tokens, margins = decision_margins(engine_dir, script, voices, noise, cfg_scale, frames)
    out = {"fp32_tokens": len(tokens),
           "fp32_smallest_decision_margins": sorted(round(m, 4) for m in margins)[:3]}
    for case, precision in (("plan", None), ("bf16", "bf16"), ("fp16", "fp16")):
        plan = resolve_plan("default", manifest, precision=precision)
        directory = work / f"{label}_{case}"
        write_emulated_engine_dir(engine_dir, directory, plan)
        r = compare_generations(engine_dir, directory, script, voices, noise, cfg_scale, frames)
        shutil.rmtree(directory)
        atol = plan.graphs["lm"].tolerance_for(plan.graphs["lm"].precision)["control_logits"]["atol"]
        r["first_near_tie"] = next((i for i, m in enumerate(margins) if m < atol), None)
        r["near_tie_margin_below"] = atol
        r["precisions"] = {g: gp.precision for g, gp in plan.graphs.items()}
        out[case] = r
    return out


def _finite_json(obj):
    """inf/nan as strings: the result stays strict JSON."""
    if isinstance(obj, float) and not np.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_json(v) for v in obj]
    return obj


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    if not FIXTURE.exists():
        print(f"error: the shared fixture is missing at {FIXTURE}", file=sys.stderr)
        return 2

    import soundfile as sf
    from safetensors.numpy import load_file

    from vv_export.checkpoint import tiny_random_model
    from vv_export.families import load_checkpoint
    from vv_export.onnx_export import export_onnx
    from vv_export.plans import resolve_plan

    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="precision-report-"))
    try:
        fixture_dir = export_onnx(load_checkpoint(str(FIXTURE)), work / "fixture", progress=False)
        random_dir = export_onnx(tiny_random_model(seed=0), work / "random", progress=False)
        manifest = json.loads((fixture_dir / "manifest.json").read_text())
        plan = resolve_plan("default", manifest)
        result = {"what": "emulated fp16/bf16 engines (vv_export.precision) vs fp32 graphs, ONNX Runtime CPU",
                  "plan": "default", "keep_fp32": plan.graphs["lm"].builder["keep_fp32"],
                  "keep_fp32_names": plan.graphs["lm"].builder["keep_fp32_names"],
                  "old_keep_fp32": OLD_KEEP_OPS, "old_keep_fp32_names": OLD_KEEP_NAMES}
        print("per graph ...", file=sys.stderr)
        result["graphs"] = graph_errors(fixture_dir, plan)
        print("lm at long positions ...", file=sys.stderr)
        models, ctx = long_lms(work)
        result["lm_positions"] = lm_positions(models, ctx, plan.graphs["lm"])
        result["padded_batch"] = padded_batch(models, ctx, plan.graphs["lm"])
        print("whole generations ...", file=sys.stderr)
        meta = json.loads((FIXTURE / "reference.json").read_text())
        ref = load_file(str(FIXTURE / "reference_outputs.safetensors"))
        gen = meta["generate"]
        result["generation_fixture"] = generations(
            fixture_dir, manifest, "fixture", gen["script"], [ref["generate.voice_wav_raw"]], ref["generate.noise"],
            gen["cfg_scale"], gen["max_new_tokens"], work)
        random_manifest = json.loads((random_dir / "manifest.json").read_text())
        voices = [sf.read(str(REPO / "examples" / f"voice_{v}.wav"), dtype="float32")[0] for v in ("a", "b")]
        latent = random_manifest["model"]["acoustic_vae_dim"]

        def noise(k, n):
            return np.random.default_rng([7, k]).standard_normal((n, latent)).astype(np.float32)

        result["generation_random_tiny"] = generations(random_dir, random_manifest, "random", RANDOM_SCRIPT, voices,
                                                       noise, 1.3, 40, work)
        result["seconds"] = round(time.time() - t0, 1)
        result.update(provenance())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    path = write_result(args.out, RESULT_NAME, _finite_json(result))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
