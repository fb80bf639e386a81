"""`vv-export onnx --quantize int8|int4`: every graph within its stated tolerance, shared weights stay
shared, the manifest says what was done, the fixture's generation within the stated agreement, and bad
input is one line.

The quantized ENGINE_DIRs are exported with quantize_select="all" (each graph quantized wherever it
stays within its tolerance, whatever its speed: the tiny fixture's timings say nothing about a real
model's), at one thread so that the int8 kernels' results do not depend on the thread split.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnx.numpy_helper
import pytest

from conftest import REPO, load_benchmark

QUANTIZABLE = ["lm", "acoustic_encoder", "acoustic_decoder", "semantic_encoder", "acoustic_connector",
               "semantic_connector", "diffusion_step", "diffusion_sampler"]

# The fixture's whole generation, quantized vs fp32 ENGINE_DIR, one thread (measured values in brackets,
# docs/QUANTIZATION.md). The tiny fixture's loop is chaotic: each frame's latent feeds the next LM step, so
# errors compound over frames; the bounds are on what quantization does to the first frames and tokens.
INT8_FIRST_FRAME_LATENT_REL = 0.1        # forced run, frame 0 latent: max err / peak [0.052]
INT8_NATURAL_MIN_FIRST_DIVERGENCE = 12   # natural run: tokens identical for at least this many steps [18 of 23]
INT8_NATURAL_LATENT_REL = 0.07           # natural run, frames before the divergence: max err / peak [0.036]
INT4_FIRST_FRAME_LATENT_REL = 0.6        # forced run, frame 0 [0.38]: int4 is NOT faithful on the fixture


@pytest.fixture(scope="module")
def quant_dirs(fixture_dir, tmp_path_factory):
    from vv_export.families import load_checkpoint
    from vv_export.onnx_export import export_onnx

    base = tmp_path_factory.mktemp("quant")
    return {mode: export_onnx(load_checkpoint(str(fixture_dir)), base / mode, progress=False, threads=1,
                              quantize=mode, quantize_select="all")
            for mode in ("int8", "int4")}


@pytest.fixture(scope="module")
def report():
    return load_benchmark("quant_report")


def _manifest(d):
    return json.loads((d / "manifest.json").read_text())


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_every_graph_quantized_within_its_tolerance(quant_dirs, mode, report):
    from vv_export.quantize import BLOCK_SIZES, TOLERANCES

    d = quant_dirs[mode]
    manifest = _manifest(d)
    bits = {"int8": 8, "int4": 4}[mode]
    assert manifest["quantize"] == mode
    assert manifest["graphs"]["text_embed"]["quantization"]["status"] == "fp32"  # a gather: nothing to do
    for graph in QUANTIZABLE:
        entry = manifest["graphs"][graph]
        q = entry["quantization"]
        assert q["status"] == "quantized", (graph, q.get("reason"))
        assert (q["method"], q["bits"], q["block_size"]) == ("MatMulNBits", bits, BLOCK_SIZES[bits])
        assert q["weight_bytes_after"] < q["weight_bytes_before"]
        # the manifest's tolerance is the quantized one, the fp32 one is kept
        assert entry["tolerance"] == {o: TOLERANCES[bits][graph] for o in entry["tolerance"]}
        assert q["fp32_tolerance"] != entry["tolerance"]
        # the file on disk is what the record says, and it holds the quantized nodes
        model = onnx.load(str(d / entry["file"]))
        assert sum(n.op_type == "MatMulNBits" for n in model.graph.node) == q["nodes_quantized"] > 0
        assert not any(n.op_type in ("MatMul", "Gemm") and n.input[1] in {i.name for i in model.graph.initializer}
                       for n in model.graph.node)
        # independent re-check: the stored graph on the saved inputs vs the saved PyTorch outputs
        errors = report.graph_errors(d, graph, threads=1)
        for output, e in errors.items():
            tol = entry["tolerance"][output]
            assert e["max_abs"] <= tol["atol"] + tol["rtol"] * e["peak"], (graph, output, e, tol)
            assert e["max_abs"] > 0  # it really is quantized: fp32 graphs are within ~1e-6 of the peak


def test_int4_is_smaller_than_int8(quant_dirs):
    m8, m4 = _manifest(quant_dirs["int8"]), _manifest(quant_dirs["int4"])
    for graph in QUANTIZABLE:
        assert (m4["graphs"][graph]["quantization"]["weight_bytes_after"]
                < m8["graphs"][graph]["quantization"]["weight_bytes_after"]), graph


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_sampler_steps_share_one_copy_of_the_weights(quant_dirs, mode):
    """The 10 unrolled head evaluations read one quantized copy: the sampler's weights are the step
    graph's (the same head) plus the acoustic connector's, not 10 heads."""
    m = _manifest(quant_dirs[mode])["graphs"]
    step = m["diffusion_step"]["quantization"]["weight_bytes_after"]
    sampler = m["diffusion_sampler"]["quantization"]["weight_bytes_after"]
    connector = m["acoustic_connector"]["quantization"]["weight_bytes_after"]
    assert sampler <= 1.1 * (step + connector), (sampler, step, connector)
    # counted from the file itself, not from the record
    model = onnx.load(str(quant_dirs[mode] / m["diffusion_sampler"]["file"]))
    names = [i.name for i in model.graph.initializer]
    assert len(names) == len(set(names))
    stored = sum(len(i.raw_data) or onnx.numpy_helper.to_array(i).nbytes for i in model.graph.initializer)
    assert stored == sampler


def test_fixture_generation_int8_within_stated_agreement(quant_dirs, tiny_engine_dir, report):
    gen = report.generation_report(quant_dirs["int8"], tiny_engine_dir, "fixture", frames=8, threads=1)
    forced, natural = gen["forced"], gen["natural"]
    assert forced["tokens_equal"] and forced["frames"] == [8, 8]
    assert forced["latent_rel_peak_per_frame"][0] <= INT8_FIRST_FRAME_LATENT_REL, forced
    assert natural["frames"][0] > 0
    first = natural["first_divergence"]
    assert first is None or first >= INT8_NATURAL_MIN_FIRST_DIVERGENCE, natural
    assert natural["frames_compared"] > 0 and natural["latent_rel_peak"] <= INT8_NATURAL_LATENT_REL, natural


def test_fixture_generation_int4_first_frame(quant_dirs, tiny_engine_dir, report):
    gen = report.generation_report(quant_dirs["int4"], tiny_engine_dir, "fixture", frames=4, threads=1)
    forced = gen["forced"]
    assert forced["tokens_equal"] and forced["frames"] == [4, 4]
    assert forced["latent_rel_peak_per_frame"][0] <= INT4_FIRST_FRAME_LATENT_REL, forced


def test_conv_stacks_dynamic_int8_candidate_within_tolerance(quant_dirs):
    """The conv stacks' third candidate (their small, compute-bound MatMuls as dynamic int8 GEMMs) is built,
    validated and recorded; on the fixture it holds the int8 tolerance. Every MatMul of the fixture is small,
    so the fourth candidate (every MatMul dynamic int8) would be the same graph: it is not built."""
    manifest = _manifest(quant_dirs["int8"])
    for graph in ("acoustic_encoder", "acoustic_decoder", "semantic_encoder"):
        cands = {c["method"]: c for c in manifest["graphs"][graph]["quantization"]["candidates"]}
        dynamic = [c for m, c in cands.items() if m.endswith("+DynamicInt8")]
        assert len(dynamic) == 1 and dynamic[0]["method"].startswith("MatMulNBits+"), sorted(cands)
        assert dynamic[0]["dynamic_int8_nodes"] > 0 and dynamic[0]["within_tolerance"], dynamic[0]


def test_every_matmul_dynamic_int8_candidate(fixture_dir, tmp_path, monkeypatch):
    """Where a conv stack has large MatMuls (here: the bound lowered below the fixture's larger ones), the
    fourth candidate gives dynamic int8 to every MatMul, none left to MatMulNBits, validated like the others."""
    import vv_export.quantize as quantize
    from vv_export.families import load_checkpoint
    from vv_export.onnx_export import export_onnx

    monkeypatch.setattr(quantize, "DYNAMIC_MAX_WEIGHTS", 4096)
    out = export_onnx(load_checkpoint(str(fixture_dir)), tmp_path / "int8", progress=False, threads=1,
                      quantize="int8", quantize_select="all")
    q = _manifest(out)["graphs"]["acoustic_decoder"]["quantization"]
    cands = {c["method"]: c for c in q["candidates"]}
    small = next(c for m, c in cands.items() if m.startswith("MatMulNBits+") and m.endswith("+DynamicInt8"))
    every = next(c for m, c in cands.items() if m in ("ConvAsMatMul+DynamicInt8", "DynamicInt8"))
    assert every["within_tolerance"] and every["nodes_quantized"] == every["dynamic_int8_nodes"]
    assert every["dynamic_int8_nodes"] > small["dynamic_int8_nodes"] > 0


def _export_with_unreachable_tolerance(tmp_path, monkeypatch, mode: str):
    """The tiny random model exported with --quantize `mode`, every graph's tolerance at that width made
    unreachable (rtol 1e-7); returns (ENGINE_DIR, manifest)."""
    import vv_export.quantize as quantize
    from vv_export.checkpoint import tiny_random_model
    from vv_export.onnx_export import export_onnx

    bits = quantize.MODES[mode]
    strict = {g: {"atol": 0.0, "rtol": 1e-7} for g in quantize.TOLERANCES[bits]}
    monkeypatch.setitem(quantize.TOLERANCES, bits, strict)
    out = export_onnx(tiny_random_model(seed=0), tmp_path / mode, progress=False, threads=1,
                      quantize=mode, quantize_select="all")
    return out, _manifest(out)


def test_graph_beyond_tolerance_stays_fp32(tmp_path, monkeypatch):
    """A stated tolerance the quantized graph cannot meet: the graph stays fp32 and the manifest says why."""
    out, manifest = _export_with_unreachable_tolerance(tmp_path, monkeypatch, "int8")
    for graph in QUANTIZABLE:
        q = manifest["graphs"][graph]["quantization"]
        assert q["status"] == "fp32" and q["weight_bytes_after"] == q["weight_bytes_before"], graph
        assert q["reason"].startswith("8-bit: exceeds its quantization tolerance"), q["reason"]
        model = onnx.load(str(out / manifest["graphs"][graph]["file"]))
        assert not any(n.op_type == "MatMulNBits" for n in model.graph.node)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no scratch left behind


def test_graph_beyond_its_int4_tolerance_falls_back_to_int8(tmp_path, monkeypatch):
    """--quantize int4: a graph whose int4 copy misses its int4 tolerance gets int8 (not fp32) when int8 holds."""
    import vv_export.quantize as quantize

    out, manifest = _export_with_unreachable_tolerance(tmp_path, monkeypatch, "int4")
    for graph in QUANTIZABLE:
        entry = manifest["graphs"][graph]
        q = entry["quantization"]
        assert (q["status"], q["mode"], q["bits"]) == ("quantized", "int4", 8), (graph, q.get("reason"))
        assert q["fallback"]["int4_reason"].startswith("4-bit: exceeds its quantization tolerance")
        assert entry["tolerance"] == {o: quantize.TOLERANCES[8][graph] for o in entry["tolerance"]}
        model = onnx.load(str(out / entry["file"]))
        bits = {a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
        assert bits == {8}


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "vv_export.cli", "onnx", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def test_cli_rejects_quantize_without_validation(tmp_path):
    out = tmp_path / "e"
    proc = _cli("--out", str(out), "--quantize", "int8", "--no-validate")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["error: --quantize needs an fp32, validated export "
                                                "(no --no-validate, --dtype fp32)"]
    assert not out.exists()


def test_cli_rejects_unknown_mode(tmp_path):
    proc = _cli("--out", str(tmp_path / "e"), "--quantize", "int3")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "int3" in proc.stderr
    assert not (tmp_path / "e").exists()


def test_cli_quantize_measures_and_records(tmp_path):
    """The CLI path (select by measurement): a complete ENGINE_DIR whose manifest explains every graph."""
    out = tmp_path / "q"
    proc = _cli("--out", str(out), "--quantize", "int8")
    assert proc.returncode == 0, proc.stderr
    manifest = _manifest(out)
    for graph in QUANTIZABLE:
        q = manifest["graphs"][graph]["quantization"]
        assert q["select"] == "measure"
        if q["status"] == "quantized":
            speedups = [q["speedup"][label] for label in q["timing"]]  # the per-frame shape first
            assert speedups[0] >= 1.05 and all(v >= 0.8 for v in speedups[1:]), q
        else:
            assert q["reason"], graph
            assert q["timing"] or q["reason"].startswith("exceeds")
    # whatever was chosen, the runtime loads and runs it
    from vv_runtime.pipeline import Pipeline

    pipe = Pipeline.from_engine_dir(out, backend="ort", threads=1)
    result = pipe.generate("Speaker 1: Hello.", max_new_frames=2, seed=0)
    pipe.close()
    assert np.isfinite(result.audio[0]).all()


def test_trt_build_refuses_quantized_graphs(quant_dirs):
    """MatMulNBits is an ONNX Runtime contrib op: `vv-export trt` says so in one line, before any TensorRT
    or GPU check, and names the fix (an ENGINE_DIR exported without --quantize)."""
    from vv_export.errors import ExportError
    from vv_export.trt_build import resolve_for_engine_dir

    with pytest.raises(ExportError) as info:
        resolve_for_engine_dir(quant_dirs["int8"], plan="ci")
    message = str(info.value)
    assert "\n" not in message and "MatMulNBits" in message and "without --quantize" in message
