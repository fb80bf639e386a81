"""The GPU jobs cannot pass having tested nothing, and stop at once where there is no GPU (all CPU).

- VV_REQUIRE_GPU=1 (set by `make check-accuracy` / `make test-gpu`): the conftest hook turns a skipped
  gpu test into a failure and fails a session in which no gpu test ran. Shown on a real pytest run of
  a small test file beside a copy of tests/conftest.py.
- The preflight (tools/gpu_preflight.py, then the make targets themselves): without a GPU, non-zero
  within seconds, one line, no virtual environment created.
- requirements-gpu.txt and the `gpu` extra: one pinned, coherent CUDA 12 set.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PREFLIGHT = REPO / "tools" / "gpu_preflight.py"
HAS_GPU = bool(shutil.which("nvidia-smi")) or os.path.exists("/dev/nvidia0")

sys.path.insert(0, str(PREFLIGHT.parent))
import gpu_preflight  # noqa: E402

TESTS = '''
import pytest

@pytest.mark.gpu
def test_gpu_skips():
    pytest.skip("no CUDA GPU is visible")

@pytest.mark.gpu
def test_gpu_not_applicable():
    pytest.skip("not applicable: bf16 needs compute capability 8.0+")

@pytest.mark.gpu
def test_gpu_runs():
    assert 1 + 1 == 2

def test_cpu():
    assert True
'''


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("VV_REQUIRE_GPU", "MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    env.update(extra)
    return env


@pytest.fixture()
def suite(tmp_path):
    shutil.copy(REPO / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs a GPU\n    slow: long\n")
    (tmp_path / "test_sample.py").write_text(TESTS)

    def run(*args, require: bool):
        env = _env(**({"VV_REQUIRE_GPU": "1"} if require else {}))
        proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        return proc.returncode, proc.stdout + proc.stderr

    return run


def test_skipped_gpu_test_fails_under_require_gpu(suite):
    rc, out = suite("-m", "gpu", "-k", "skips", require=False)
    assert rc == 0, out  # the ordinary run: a skip is a skip
    rc, out = suite("-m", "gpu", "-k", "skips", require=True)
    assert rc != 0, out
    assert "gpu test skipped instead of running (no CUDA GPU is visible)" in out
    assert re.search(r"\b1 failed\b", out), out


def test_no_gpu_test_ran_fails_under_require_gpu(suite):
    rc, out = suite("-k", "test_cpu", require=False)
    assert rc == 0, out
    rc, out = suite("-k", "test_cpu", require=True)
    assert rc == 1, out
    assert "no gpu-marked test ran" in out
    # only "not applicable" skips: nothing ran either
    rc, out = suite("-k", "not_applicable", require=True)
    assert rc == 1 and "no gpu-marked test ran" in out, out


def test_gpu_tests_that_run_pass_under_require_gpu(suite):
    rc, out = suite("-m", "gpu", "-k", "runs or not_applicable", require=True)
    assert rc == 0, out
    assert re.search(r"\b1 passed, 1 skipped\b", out), out


# --- preflight --------------------------------------------------------------------------------------

def test_preflight_without_gpu_is_one_line_and_fast(tmp_path):
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(PREFLIGHT), "--job", "make check-accuracy",
                           "--nvidia-smi", str(tmp_path / "no-nvidia-smi"), "--device", str(tmp_path / "nvidia0")],
                          capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 10
    assert proc.returncode == 2
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: no NVIDIA GPU found (") and lines[0].endswith("make check-accuracy needs one")


def test_preflight_reads_nvidia_smi_and_the_driver(tmp_path):
    gpus = gpu_preflight.parse_smi("NVIDIA H100 80GB HBM3, 550.54.15, 81559\nNVIDIA H100 80GB HBM3, 550.54.15, 81559\n")
    assert gpus[0] == {"name": "NVIDIA H100 80GB HBM3", "driver": "550.54.15", "memory_mib": 81559}
    assert gpu_preflight.describe(gpus) == "GPU: NVIDIA H100 80GB HBM3, 81559 MiB (+1 more), driver 550.54.15"
    assert gpu_preflight.parse_smi("NVIDIA-SMI has failed because it couldn't communicate with the driver") == []
    gpu_preflight.check_driver(gpus, "job")  # new enough
    with pytest.raises(gpu_preflight.PreflightError, match="driver 470.57.02 is too old .*needs >= 525.60.13"):
        gpu_preflight.check_driver([{"name": "T4", "driver": "470.57.02"}], "job")
    proc_version = tmp_path / "version"
    proc_version.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n"
                            "GCC version:  gcc version 12.2.0\n")
    assert gpu_preflight.driver_from_proc(proc_version) == "550.54.15"
    device = tmp_path / "nvidia0"
    device.write_text("")  # a device node without nvidia-smi: accepted, driver from the kernel module
    gpus = gpu_preflight.find_gpus("job", smi=str(tmp_path / "none"), device=str(device), proc_version=str(proc_version))
    assert gpus[0]["driver"] == "550.54.15"


@pytest.mark.skipif(HAS_GPU, reason="this machine has an NVIDIA GPU: the make targets would install the GPU stack")
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("target", ["check-accuracy", "bench-gpu", "test-gpu"])
def test_make_gpu_job_without_gpu_stops_at_once(target, tmp_path):
    venv = tmp_path / "venv"
    start = time.monotonic()
    proc = subprocess.run(["make", "--no-print-directory", target, f"VENV={venv}"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode != 0, lines
    assert elapsed < 15, elapsed
    assert len(lines) == 1, lines
    assert "error: no NVIDIA GPU found" in lines[0] and f"make {target} needs one" in lines[0]
    assert not venv.exists()  # nothing installed, not even the venv


# --- the pinned stack -------------------------------------------------------------------------------

def test_gpu_requirements_are_one_coherent_pinned_set():
    lines = [l.split("#", 1)[0].strip() for l in (REPO / "requirements-gpu.txt").read_text().splitlines()]
    lines = [l for l in lines if l]
    assert lines and all("==" in l for l in lines), lines  # every line pinned
    pins = gpu_preflight.pinned_requirements()
    assert len(pins) == len(lines)
    trt = {k: v for k, v in pins.items() if k.startswith("tensorrt")}
    assert set(trt) == {"tensorrt-cu12", "tensorrt-cu12-libs", "tensorrt-cu12-bindings"}  # CUDA 12 builds only
    assert len(set(trt.values())) == 1 and next(iter(trt.values())).startswith("10.")  # one TensorRT 10
    assert "onnxruntime-gpu" in pins and "onnxruntime" not in pins  # one ONNX Runtime package
    assert not any("modelopt" in k for k in pins)  # TensorRT 10 weak typing: ModelOpt not needed
    assert "torch" in pins
    # the `gpu` extra agrees with the file on every package it names
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    for spec in extra:
        name, version = re.match(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==(\S+)$", spec).groups()
        assert pins.get(name.lower()) == version, spec
    assert not any(s.startswith(("onnxruntime", "nvidia-modelopt")) for s in extra)
