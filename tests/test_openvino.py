"""OpenVINO as a second CPU runtime, chosen per graph at export (`vv-export onnx --runtimes ort,openvino`): the
choice is made and recorded, a candidate beyond its tolerance is not chosen, generation on a mixed ENGINE_DIR
equals itself batched and stays within stated bounds of fp32, both model families, and an ENGINE_DIR that names
OpenVINO says so in one line where OpenVINO is missing (and then runs its ONNX graphs).

The mixed ENGINE_DIRs are exported with runtime_select="all" (OpenVINO wherever a candidate is within its
tolerance, whatever its speed: the tiny models' timings say nothing about a real model's) at one thread.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("openvino")
pytest.importorskip("nncf")

from conftest import REPO, load_benchmark  # noqa: E402

# the graphs the 1.5B's loop calls that have a timing shape (vv_export.quantize.TIMING_DIMS)
CANDIDATES = ["lm", "acoustic_encoder", "acoustic_decoder", "semantic_encoder", "diffusion_sampler"]
REALTIME_CANDIDATES = ["text_lm", "tts_lm", "acoustic_decoder", "diffusion_sampler"]
AUDIO_RTOL_OF_PEAK = 1e-4  # batched vs alone: float reordering only (tests/test_scheduler_equal_alone.py)

# The fixture's whole generation, mixed (OpenVINO int8_asym weights for the lm, the encoders, the decoder and
# the sampler; text_embed on ONNX Runtime) vs the fp32 ENGINE_DIR, one thread; measured values in brackets. The
# bounds of --quantize int8 (tests/test_quantize.py), but for the natural run's tokens: they part at step 10,
# whose fp32 decision is a coin flip (top-2 control-logit margin 0.014 logits, against an 8-bit lm's error of
# 0.17 on the validation inputs; ONNX Runtime's int8 lm happens to keep it and parts at step 18).
MIXED_FIRST_FRAME_LATENT_REL = 0.1        # forced run, frame 0 latent: max err / peak [0.042]
MIXED_NATURAL_MIN_FIRST_DIVERGENCE = 10   # natural run: tokens identical for at least this many steps [10 of 23]
MIXED_NATURAL_LATENT_REL = 0.07           # natural run, frames before the divergence: max err / peak [0.055]

HIDE_OPENVINO = """
import sys

class HideOpenVINO:
    def find_spec(self, name, path=None, target=None):
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError(f"No module named {name!r}")
        return None

sys.meta_path.insert(0, HideOpenVINO())
"""


def _manifest(d):
    return json.loads((d / "manifest.json").read_text())


@pytest.fixture(scope="module")
def report():
    return load_benchmark("quant_report")


@pytest.fixture(scope="module")
def mixed_dir(fixture_dir, tmp_path_factory):
    """The fixture with --quantize int8 and OpenVINO candidates int8_asym, then f32."""
    from vv_export.families import load_checkpoint
    from vv_export.onnx_export import export_onnx

    return export_onnx(load_checkpoint(str(fixture_dir)), tmp_path_factory.mktemp("openvino") / "mixed",
                       progress=False, threads=1, quantize="int8", quantize_select="all", runtimes="ort,openvino",
                       runtime_select="all", openvino_precisions=("int8_asym", "f32"))


@pytest.fixture(scope="module")
def voice(fixture_reference):
    return fixture_reference[1]["generate.voice_wav_raw"]


def test_choice_made_and_recorded(mixed_dir, report):
    from vv_export.engine_dir import sha256_file
    from vv_export.quantize import TIMING_DIMS, TOLERANCES

    manifest = _manifest(mixed_dir)
    assert manifest["runtimes"]["tried"] == ["ort", "openvino"]
    assert isinstance(manifest["runtimes"]["openvino"]["bf16"], bool)  # what OpenVINO reports of this CPU
    chosen = [g for g, e in manifest["graphs"].items() if e.get("runtime")]
    assert chosen == CANDIDATES  # text_embed (no timing shape) and the auxiliary graphs are not candidates
    for graph in CANDIDATES:
        entry = manifest["graphs"][graph]
        runtime = entry["runtime"]
        assert (runtime["name"], runtime["precision"], runtime["weight_format"]) == ("openvino", "int8_asym",
                                                                                      "int8_asym")
        assert runtime["shapes"] == ("static" if entry["role"] == "per-frame" else "dynamic")
        # the IR is in the ENGINE_DIR as recorded, and so is the ONNX graph --quantize kept (ONNX Runtime's)
        for f in (runtime["file"], runtime["weights_file"]):
            assert sha256_file(mixed_dir / f) == runtime["sha256"][f]
        assert entry["quantization"]["status"] == "quantized" and (mixed_dir / entry["file"]).is_file()
        # int8 weights: the IR's weights are about a quarter of the fp32 graph's
        assert runtime["weight_bytes"] < 0.5 * entry["quantization"]["weight_bytes_before"], graph
        assert 'element_type="u8"' in (mixed_dir / runtime["file"]).read_text()
        # measured: both runtimes timed at every timing shape of the graph; the reason names the choice
        # (the shapes of TIMING_DIMS the graph has: VibeVoice's one-frame decoder has no "first frame" of a group)
        assert set(runtime["times_ms"]) == set(runtime["timing_dims"]) <= {label for label, _ in TIMING_DIMS[graph]}
        assert runtime["timing_dims"]
        for times in runtime["times_ms"].values():
            assert times["onnxruntime/int8"] > 0 and times["openvino/int8_asym"] > 0 and times["openvino/f32"] > 0
        assert runtime["reason"].startswith("openvino/int8_asym "), runtime["reason"]
        assert [c["precision"] for c in runtime["candidates"]] == ["int8_asym", "f32"]
        assert all(c["within_tolerance"] for c in runtime["candidates"])
        # the 8-bit weight tolerance, and an independent re-check of the stored IR as the runtime serves it
        assert runtime["tolerance"] == {o: TOLERANCES[8][graph] for o in entry["tolerance"]}
        for output, e in report.graph_errors(mixed_dir, graph, threads=1, served=True).items():
            tol = runtime["tolerance"][output]
            assert 0 < e["max_abs"] <= tol["atol"] + tol["rtol"] * e["peak"], (graph, output, e, tol)
    assert not [p for p in mixed_dir.iterdir() if p.name.startswith(".")]  # no scratch left behind


def test_candidate_beyond_its_tolerance_is_not_chosen(tmp_path, monkeypatch):
    """An impossible tolerance for one candidate only (int8_asym everywhere; every candidate of the sampler):
    those are not chosen, the next candidate within tolerance is (f32), and a graph with none stays on ONNX
    Runtime, the manifest saying why."""
    import vv_export.openvino_candidates as candidates
    from vv_export.checkpoint import tiny_random_model
    from vv_export.onnx_export import export_onnx

    stated = candidates.tolerance_for

    def impossible_for_some(graph, precision, fp32_tolerance):
        tol = stated(graph, precision, fp32_tolerance)
        if precision == "int8_asym" or graph == "diffusion_sampler":
            return {o: {"atol": 0.0, "rtol": 1e-9} for o in tol}
        return tol

    monkeypatch.setattr(candidates, "tolerance_for", impossible_for_some)
    out = export_onnx(tiny_random_model(seed=0), tmp_path / "e", progress=False, threads=1,
                      runtimes="ort,openvino", runtime_select="all", openvino_precisions=("int8_asym", "f32"))
    manifest = _manifest(out)
    for graph in CANDIDATES:
        runtime = manifest["graphs"][graph]["runtime"]
        int8 = next(c for c in runtime["candidates"] if c["precision"] == "int8_asym")
        assert not int8["within_tolerance"] and "differs from PyTorch" in int8["failure"], int8
        assert not (out / f"{graph}.openvino.int8_asym.xml").exists()
        if graph == "diffusion_sampler":
            assert (runtime["name"], runtime["precision"]) == ("onnxruntime", "fp32")
            assert runtime["reason"].startswith("no OpenVINO candidate within its tolerance"), runtime["reason"]
            assert not list(out.glob(f"{graph}.openvino.*"))
        else:
            assert (runtime["name"], runtime["precision"]) == ("openvino", "f32"), (graph, runtime["reason"])
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_mixed_generation_batched_equals_alone(mixed_dir, voice):
    """Two scripts generated together (the per-frame graphs then run a two-row call: OpenVINO's dynamic
    compilation) equal each script generated alone (one row: the static one)."""
    from vv_runtime.pipeline import Pipeline

    scripts = ["Speaker 1: Hello world.\nSpeaker 1: This is a tiny test.", "Speaker 1: One two three four five."]
    pipe = Pipeline.from_engine_dir(mixed_dir, backend="ort", threads=1)
    try:
        assert pipe.backend.describe() == "ort[CPU]+openvino[" + ",".join(CANDIDATES) + "]"
        together = pipe.generate(scripts, [voice], seed=5, max_new_frames=12)
        assert sum(together.frames) > 0
        for i, script in enumerate(scripts):
            alone = pipe.generate(script, [voice], seed=5 + i, max_new_frames=12)
            assert together.tokens[i] == alone.tokens[0]
            expected, got = alone.audio[0], together.audio[i]
            assert got.shape == expected.shape
            if expected.size:
                assert np.abs(got - expected).max() <= AUDIO_RTOL_OF_PEAK * np.abs(expected).max()
    finally:
        pipe.close()


def test_mixed_generation_within_stated_bounds_of_fp32(mixed_dir, tiny_engine_dir, report):
    gen = report.generation_report(mixed_dir, tiny_engine_dir, "fixture", frames=8, threads=1)
    forced, natural = gen["forced"], gen["natural"]
    assert forced["tokens_equal"] and forced["frames"] == [8, 8]
    assert 0 < forced["latent_rel_peak_per_frame"][0] <= MIXED_FIRST_FRAME_LATENT_REL, forced
    assert natural["frames"][0] > 0
    first = natural["first_divergence"]
    assert first is None or first >= MIXED_NATURAL_MIN_FIRST_DIVERGENCE, natural
    assert natural["frames_compared"] > 0 and natural["latent_rel_peak"] <= MIXED_NATURAL_LATENT_REL, natural


def test_realtime_family_gets_openvino_graphs(realtime_fixture_dir, realtime_voiced_engine_dir, realtime_reference,
                                              tmp_path):
    """The streaming model's loop graphs (text and TTS LMs, sampler, decoder) in OpenVINO f32: chosen,
    recorded, and the fixture's generation as on ONNX Runtime fp32 (the same frames, audio close)."""
    from vv_export.families import load_checkpoint
    from vv_export.onnx_export import export_onnx
    from vv_export.voices import convert_voices
    from vv_runtime.realtime_pipeline import RealtimePipeline

    out = export_onnx(load_checkpoint(str(realtime_fixture_dir)), tmp_path / "rt", progress=False, threads=1,
                      runtimes="ort,openvino", runtime_select="all", openvino_precisions=("f32",))
    convert_voices(out, [realtime_fixture_dir / "voices" / "en-Tiny_man.pt"])
    manifest = _manifest(out)
    assert [g for g, e in manifest["graphs"].items() if e.get("runtime")] == REALTIME_CANDIDATES
    assert all(manifest["graphs"][g]["runtime"]["name"] == "openvino" for g in REALTIME_CANDIDATES)
    settings, ref = realtime_reference
    text, noise = settings["generate"]["script"], ref["generate.noise"]
    results = []
    for directory in (out, realtime_voiced_engine_dir):
        pipe = RealtimePipeline.from_engine_dir(directory, backend="ort", threads=1)
        try:
            results.append((pipe.backend.describe(), pipe.generate(text, "en-Tiny_man", noise=noise,
                                                                   cfg_scale=settings["generate"]["cfg_scale"])))
        finally:
            pipe.close()
    (described, mixed), (_, fp32) = results
    assert described == "ort[CPU]+openvino[" + ",".join(REALTIME_CANDIDATES) + "]"
    assert mixed.frames == fp32.frames == settings["generate"]["frames"]
    peak = float(np.abs(fp32.audio).max())
    error = np.abs(mixed.audio - fp32.audio).reshape(mixed.frames, -1).max(axis=1) / peak
    assert error[:8].max() <= 1e-4 and error.max() <= 2e-3, error  # test_realtime_generate's bounds


def test_missing_openvino_is_one_line_and_onnx_runtime_serves(mixed_dir, tmp_path):
    """vv-run on an ENGINE_DIR that names OpenVINO, in a process where OpenVINO cannot be imported: one line
    says so (naming the graphs and how to install it), and ONNX Runtime runs their ONNX graphs."""
    wav = tmp_path / "out.wav"
    code = HIDE_OPENVINO + (
        "from vv_runtime.cli import main\n"
        f"sys.argv = ['vv-run', '--engine-dir', {str(mixed_dir)!r}, '--script', 'Speaker 1: Hello there.', "
        f"'--out', {str(wav)!r}, '--seed', '1', '--max-new-frames', '3', '--threads', '1', '--json']\n"
        "main()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "OpenVINO" in ln]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("note: ") and "not installed" in lines[0] and "vibevoice-trt[openvino]" in lines[0]
    assert all(g in lines[0] for g in CANDIDATES)
    assert json.loads(proc.stdout.strip().splitlines()[-1])["backend"] == "ort[CPU]"
    assert wav.is_file() and wav.stat().st_size > 0


def test_runtime_entry_files_and_unknown_runtimes(mixed_dir, tmp_path):
    """The contract: a missing IR file is a one-line error at load; a runtime this version does not know is
    one line, and ONNX Runtime serves that graph."""
    from vv_runtime.errors import RuntimeInputError
    from vv_runtime.manifest import load_manifest
    from vv_runtime.pipeline import Pipeline

    broken = tmp_path / "broken"
    shutil.copytree(mixed_dir, broken)
    runtime = _manifest(broken)["graphs"]["lm"]["runtime"]
    (broken / runtime["weights_file"]).unlink()
    with pytest.raises(RuntimeInputError) as info:
        load_manifest(broken)
    assert "\n" not in str(info.value) and runtime["weights_file"] in str(info.value) and "'lm'" in str(info.value)

    unknown = tmp_path / "unknown"
    shutil.copytree(mixed_dir, unknown)
    manifest = _manifest(unknown)
    manifest["graphs"]["lm"]["runtime"] = {"name": "some-future-runtime", "file": runtime["file"]}
    (unknown / "manifest.json").write_text(json.dumps(manifest))
    notes = []
    from vv_runtime.backend import select_backend

    backend = select_backend(unknown, load_manifest(unknown), "ort", threads=1, notice=notes.append)
    pipe = Pipeline(unknown, load_manifest(unknown), backend)
    try:
        assert len(notes) == 1 and "lm (some-future-runtime)" in notes[0] and "\n" not in notes[0]
        assert "lm" not in backend.openvino_served and "diffusion_sampler" in backend.openvino_served
        result = pipe.generate("Speaker 1: Hello.", seed=0, max_new_frames=2)
        assert np.isfinite(result.audio[0]).all()
    finally:
        pipe.close()


def _cli(*args, hide_openvino=False):
    prefix = HIDE_OPENVINO if hide_openvino else "import sys\n"
    code = prefix + f"from vv_export.cli import main\nsys.argv = ['vv-export', 'onnx', *{list(args)!r}]\nmain()\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)


def test_cli_runtimes_errors_are_one_line(tmp_path):
    out = tmp_path / "e"
    proc = _cli("--out", str(out), "--runtimes", "ort,tensorrt")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "error: --runtimes ort,tensorrt: unknown runtime 'tensorrt' (known: ort, openvino)"]
    proc = _cli("--out", str(out), "--runtimes", "ort,openvino", "--no-validate")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "error: --runtimes openvino needs an fp32, validated export (no --no-validate, --dtype fp32)"]
    proc = _cli("--out", str(out), "--runtimes", "ort,openvino", hide_openvino=True)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: --runtimes openvino: openvino is not installed") and "[openvino]" in lines[0]
    assert not out.exists()
