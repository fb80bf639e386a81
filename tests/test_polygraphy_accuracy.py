"""Accuracy through polygraphy on the CPU: every graph in ONNX Runtime against the saved PyTorch outputs.

The exporter saves, per graph, the validation inputs (polygraphy `save_json`) and PyTorch's outputs
(polygraphy `RunResults`, runner "pytorch") under ENGINE_DIR/validation/. Here ONNX Runtime runs
through polygraphy's `OnnxrtRunner(SessionFromOnnx(...))` and `Comparator.run`, and
`Comparator.compare_accuracy` checks every output with the manifest's per-output tolerance
(max |onnx - torch| <= atol + rtol * max |torch|). The same saved data serves the GPU check
(tests/test_trt_accuracy.py: TensorRT against ONNX Runtime).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from vv_export.accuracy import compare_outputs, reference_outputs, run_onnxrt
from vv_export.validation_data import REFERENCE_RUNNER, load_validation_data, validation_paths

GRAPHS = ["text_embed", "lm", "acoustic_encoder", "acoustic_decoder", "semantic_encoder", "acoustic_connector",
          "semantic_connector", "diffusion_step", "diffusion_sampler"]


@pytest.fixture(scope="module")
def manifest(tiny_engine_dir):
    return json.loads((tiny_engine_dir / "manifest.json").read_text())


@pytest.fixture(scope="module")
def onnxrt_runs(tiny_engine_dir, manifest):
    """graph -> (feeds, ONNX Runtime outputs, PyTorch outputs), one polygraphy run per graph."""
    runs = {}
    for graph in GRAPHS:
        feeds, saved = load_validation_data(tiny_engine_dir, graph)
        runs[graph] = (feeds, run_onnxrt(tiny_engine_dir, manifest, graph, feeds), reference_outputs(saved))
    return runs


def test_validation_data_is_saved_for_every_graph(tiny_engine_dir, manifest):
    assert set(GRAPHS) == set(manifest["graphs"])
    for graph in GRAPHS:
        inputs, outputs = validation_paths(tiny_engine_dir, graph)
        assert inputs.is_file() and outputs.is_file(), graph
        feeds, saved = load_validation_data(tiny_engine_dir, graph)
        assert [name for name, _ in saved] == [REFERENCE_RUNNER]
        ref = reference_outputs(saved)
        assert len(feeds) == len(ref) >= 2  # several shapes per graph
        want_in = [i["name"] for i in manifest["graphs"][graph]["inputs"]]
        want_out = [o["name"] for o in manifest["graphs"][graph]["outputs"]]
        for feed, out in zip(feeds, ref):
            assert sorted(feed) == sorted(want_in) and sorted(out) == sorted(want_out)


@pytest.mark.parametrize("graph", GRAPHS)
def test_onnxrt_matches_pytorch(graph, onnxrt_runs, manifest):
    _, got, ref = onnxrt_runs[graph]
    report = compare_outputs(graph, got, ref, manifest["graphs"][graph]["tolerance"], "onnxrt", REFERENCE_RUNNER)
    assert report.passed, "; ".join(report.failures())
    assert set(report.worst()) == set(manifest["graphs"][graph]["tolerance"])


def test_a_wrong_output_fails(onnxrt_runs, manifest):
    """The comparison is not vacuous: a small bias beyond the bound fails, and names the output."""
    _, got, ref = onnxrt_runs["diffusion_sampler"]
    tol = manifest["graphs"]["diffusion_sampler"]["tolerance"]
    peak = float(np.max(np.abs(ref[1]["latent"])))
    bound = tol["latent"]["atol"] + tol["latent"]["rtol"] * peak
    bad = [dict(o) for o in got]
    bad[1] = {**bad[1], "latent": bad[1]["latent"] + np.float32(3 * bound)}
    report = compare_outputs("diffusion_sampler", bad, ref, tol, "onnxrt", REFERENCE_RUNNER)
    assert not report.passed
    failures = report.failures()
    assert len(failures) == 1 and failures[0].startswith("diffusion_sampler.latent (inputs #1)")


def test_criterion_is_atol_plus_rtol_of_peak():
    ref = [{"y": np.array([100.0, 0.001], dtype=np.float32)}]
    tol = {"y": {"atol": 0.0, "rtol": 0.01}}  # allowed: 0.01 * 100 = 1.0 for every element
    inside = [{"y": np.array([100.5, 0.9], dtype=np.float32)}]  # 0.9 off on a tiny value: fine
    outside = [{"y": np.array([100.0, 1.2], dtype=np.float32)}]
    assert compare_outputs("g", inside, ref, tol).passed
    assert not compare_outputs("g", outside, ref, tol).passed
    exact = {"y": {"atol": 0.0, "rtol": 0.0}}
    assert compare_outputs("g", ref, ref, exact).passed
    assert not compare_outputs("g", [{"y": np.array([100.0, 0.0011], dtype=np.float32)}], ref, exact).passed
    shape = [{"y": np.array([100.0], dtype=np.float32)}]
    assert not compare_outputs("g", shape, ref, tol).passed
    nan = [{"y": np.array([np.nan, 0.0], dtype=np.float32)}]
    assert not compare_outputs("g", nan, ref, tol).passed


@pytest.mark.parametrize("graph", ["lm", "acoustic_decoder"])
def test_backend_runner_matches_onnxrt(graph, tiny_engine_dir, manifest, onnxrt_runs):
    """The polygraphy runner over a runtime backend, which the GPU check wraps around TrtBackend, here around
    the ORT backend: its outputs are ONNX Runtime's."""
    from vv_export.accuracy import run_backend
    from vv_runtime.backend import OrtBackend

    feeds, ort_outputs, _ = onnxrt_runs[graph]
    backend = OrtBackend(tiny_engine_dir, manifest, providers=["CPUExecutionProvider"])
    try:
        got = run_backend(backend, manifest, graph, feeds, name="ort-backend")
    finally:
        backend.close()
    report = compare_outputs(graph, got, ort_outputs, {"": {"atol": 1e-6, "rtol": 1e-5}}, "ort-backend", "onnxrt")
    assert report.passed, "; ".join(report.failures())
