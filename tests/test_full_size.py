"""Full-size VibeVoice-1.5B (random weights): export every graph and run each in ONNX Runtime (CPU).

The same code as `make bench-export` (benchmarks/bench_export.py). Needs about 17 GB of RAM at its peak
(11 GB for the fp32 PyTorch model), 12 GB of free disk and 10-15 minutes on 2 cores: `-m slow` only.
"""

from __future__ import annotations

import json
import os

import pytest
from conftest import load_benchmark

MIN_RAM_GB = 20
MIN_DISK_GB = 14


def _bench_export():
    return load_benchmark("bench_export")


def _ram_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return 0.0


@pytest.mark.slow
def test_full_size_export_loads_and_runs_in_onnxruntime(reference_dir, tmp_path):
    import shutil

    config = reference_dir / "vibevoice-1.5b-original-config.json"
    if _ram_gb() < MIN_RAM_GB:
        pytest.skip(f"needs {MIN_RAM_GB} GB of RAM, this machine has {_ram_gb():.0f} GB")
    if shutil.disk_usage(tmp_path).free / 1e9 < MIN_DISK_GB:
        pytest.skip(f"needs {MIN_DISK_GB} GB of free disk under {tmp_path}")
    bench = _bench_export()
    engine_dir = tmp_path / "full-size"
    try:
        result = bench.run_benchmark(tmp_path / "results", config=config, validate=True, engine_dir=engine_dir,
                                     keep=True)

        manifest = json.loads((engine_dir / "manifest.json").read_text())
        model = manifest["model"]
        assert (model["hidden_size"], model["num_layers"], model["vocab_size"]) == (1536, 28, 151936)
        assert manifest["tokens"]["speech_start"] == 151652 and manifest["tokens"]["eos"] == 151643
        assert 2.6e9 < result["model"]["parameters"] < 2.8e9
        assert set(result["graphs"]) == set(manifest["graphs"])
        for name, graph in result["graphs"].items():
            assert graph["ort"]["outputs_finite"], name
            assert graph["total_bytes"] > 0, name
            assert "validated_max_abs_error" in graph, name
        # the LM's weights (28 layers, no embedding table) live in one side file
        assert manifest["graphs"]["lm"]["external_data"] == ["lm.onnx.data"]
        assert 5.0e9 < result["graphs"]["lm"]["total_bytes"] < 5.5e9
        assert result["all_graphs_ran"]
        assert result["peak_rss_gb"] < 20  # measured 16.2 GB (fp32 torch model + the LM's ORT session)
        assert (tmp_path / "results" / bench.RESULT_NAME).exists()
    finally:
        shutil.rmtree(engine_dir, ignore_errors=True)  # 11 GB: do not leave it to pytest's tmp retention
