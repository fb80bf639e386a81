"""The GPU jobs cannot pass having tested nothing, and stop at once where there is no GPU (all CPU).

- VV_REQUIRE_GPU=1 (set by `make check-accuracy` / `make test-gpu`): the conftest hook turns a skipped
  gpu test into a failure and fails a session in which no gpu test ran. Shown on a real pytest run of
  a small test file beside a copy of tests/conftest.py.
- The preflight (tools/gpu_preflight.py, then the make targets themselves): without a GPU, non-zero
  within seconds, one line, no virtual environment created.
- requirements-gpu.txt and the `gpu` extra: one pinned, coherent CUDA 12 set.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
PREFLIGHT = REPO / "tools" / "gpu_preflight.py"
HAS_GPU = bool(shutil.which("nvidia-smi")) or os.path.exists("/dev/nvidia0")

sys.path.insert(0, str(PREFLIGHT.parent))
import gpu_preflight  # noqa: E402

TESTS = '''
import numpy as np
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


def _failing_nvidia_smi(tmp_path) -> tuple[Path, Path]:
    """A bin directory whose nvidia-smi fails as it does with the driver not loaded (exit 9), and a device
    node that exists: the state in which the device node must not be taken for a working GPU."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
                   "Make sure that the latest NVIDIA driver is installed and running.\" >&2\nexit 9\n")
    smi.chmod(0o755)
    device = tmp_path / "nvidia0"
    device.write_text("")
    return bin_dir, device


def test_preflight_failing_nvidia_smi_is_an_error_even_with_a_device_node(tmp_path):
    bin_dir, device = _failing_nvidia_smi(tmp_path)
    with pytest.raises(gpu_preflight.PreflightError) as info:
        gpu_preflight.find_gpus("job", smi=str(bin_dir / "nvidia-smi"), device=str(device))
    assert str(info.value).startswith("error: nvidia-smi failed (exit 9: NVIDIA-SMI has failed because")
    assert str(info.value).endswith("job needs a working GPU")
    # the command line, nvidia-smi found on PATH, the device node from the environment: one line, exit 2
    env = _env(PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", VV_NVIDIA_DEVICE=str(device))
    proc = subprocess.run([sys.executable, str(PREFLIGHT), "--job", "make bench-gpu"], env=env,
                          capture_output=True, text=True, timeout=60)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, lines)
    assert lines[0].startswith("error: nvidia-smi failed (exit 9: NVIDIA-SMI has failed") and "make bench-gpu" in lines[0]
    # nvidia-smi absent: the same device node (from the environment) is accepted
    env = _env(PATH=str(tmp_path / "empty"), VV_NVIDIA_DEVICE=str(device))
    proc = subprocess.run([sys.executable, str(PREFLIGHT), "--job", "job"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and f"NVIDIA device {device} (nvidia-smi unavailable)" in proc.stdout, proc


def test_preflight_nvidia_smi_listing_no_gpu_is_an_error(tmp_path):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'No devices were found'\nexit 0\n")
    smi.chmod(0o755)
    device = tmp_path / "nvidia0"
    device.write_text("")
    with pytest.raises(gpu_preflight.PreflightError, match=r"no NVIDIA GPU found \(nvidia-smi lists none: exit 0: "
                                                           r"No devices were found\): job needs one"):
        gpu_preflight.find_gpus("job", smi=str(smi), device=str(device))


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_gpu_job_with_failing_nvidia_smi_stops_at_once(tmp_path):
    """nvidia-smi there but failing, /dev/nvidia0 there: make stops in the preflight, installing nothing."""
    bin_dir, device = _failing_nvidia_smi(tmp_path)
    venv = tmp_path / "venv"
    env = _env(PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", VV_NVIDIA_DEVICE=str(device))
    start = time.monotonic()
    proc = subprocess.run(["make", "--no-print-directory", "bench-gpu", f"VENV={venv}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode != 0 and time.monotonic() - start < 15, lines
    assert len(lines) == 1 and "error: nvidia-smi failed (exit 9" in lines[0], lines
    assert not venv.exists()


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


def test_gpu_setup_leaves_the_package_index_to_pip_environment():
    """An offline wheelhouse works through PIP_FIND_LINKS / PIP_NO_INDEX (docs/GPU.md): the set-up's pip
    installs carry no index option that would override them, nor --isolated (which ignores them)."""
    recipe = (REPO / "Makefile").read_text().split("$(GPU_STAMP):", 1)[1].split("\ngpu-setup:", 1)[0]
    installs = [line for line in recipe.splitlines() if "pip install" in line]
    assert len(installs) >= 3, recipe
    for line in installs:
        assert not re.search(r"(^|\s)(-i|--index-url|--extra-index-url|--no-index|-f|--find-links|--isolated)\b",
                             line.split("pip install", 1)[1]), line


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_gpu_setup_names_nvidia_index_and_the_supported_pythons(tmp_path):
    """On a machine that passes the preflight (here: a device node, no nvidia-smi), `make gpu-setup`'s
    preflight line names the Python versions the stack supports and NVIDIA's index, and the stack's
    requirements are installed with that index added to pip's extra indexes (after the environment's)."""
    device = tmp_path / "nvidia0"
    device.write_text("")
    venv = tmp_path / "venv"
    env = _env(PATH=f"{tmp_path / 'no-smi'}{os.pathsep}/usr/bin{os.pathsep}/bin", VV_NVIDIA_DEVICE=str(device))
    proc = subprocess.run(["make", "-n", "--no-print-directory", f"{venv}/.gpu-stack", f"VENV={venv}",
                           f"PY={sys.executable}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    low, high = (f"{a}.{b}" for a, b in gpu_preflight.SUPPORTED_PYTHON)
    assert (low, high) == ("3.11", "3.13")
    preflight = lines[0]
    assert f"the GPU stack supports {low}-{high}" in preflight and "https://pypi.nvidia.com" in preflight, preflight
    install = [line for line in lines if "pip install" in line and "-r requirements-gpu.txt" in line]
    assert len(install) == 1 and install[0].startswith(
        'PIP_EXTRA_INDEX_URL="${PIP_EXTRA_INDEX_URL:+$PIP_EXTRA_INDEX_URL }https://pypi.nvidia.com" '), install
    assert not venv.exists()  # -n: nothing ran


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_gpu_first_run_confirms_in_order(tmp_path):
    """`make gpu-first-run` (docs/GPU.md): after the stack check, the backend's CUDA graphs, the engines
    against ONNX Runtime, the quantized engines, then the benchmark, each step a command of its own (make
    stops at the first that fails), the pytest steps under VV_REQUIRE_GPU=1. Shown with a venv whose python
    answers the stack check (the stack installed, a stamp newer than its inputs); without a GPU it stops
    in the preflight like every GPU job."""
    device = tmp_path / "nvidia0"
    device.write_text("")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text('#!/bin/sh\ncase "$*" in *--stack*) echo "GPU stack: stand-in";; *) echo 3 12;; esac\n')
    python.chmod(0o755)
    (venv / ".gpu-stack").write_text("")
    os.utime(venv / ".gpu-stack", (time.time() + 60, time.time() + 60))
    env = _env(PATH=f"{tmp_path / 'no-smi'}{os.pathsep}/usr/bin{os.pathsep}/bin", VV_NVIDIA_DEVICE=str(device))
    proc = subprocess.run(["make", "-n", "--no-print-directory", "gpu-first-run", f"VENV={venv}", f"PY={sys.executable}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    steps = [line for line in proc.stdout.splitlines() if " -m pytest " in line or " benchmarks/bench_gpu.py " in line]
    assert [line.split()[-1] for line in steps] == ["tests/test_trt_backend.py", "tests/test_trt_accuracy.py",
                                                    "tests/test_qdq.py", "benchmarks/results"], steps
    assert all(line.startswith("VV_REQUIRE_GPU=1 ") and " -m gpu " in line for line in steps[:3]), steps
    assert "GPU stack: stand-in" in proc.stdout
    if not HAS_GPU:
        proc = subprocess.run(["make", "--no-print-directory", "gpu-first-run", f"VENV={tmp_path / 'none'}"], cwd=REPO,
                              env=_env(), capture_output=True, text=True, timeout=120)
        lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
        assert proc.returncode != 0 and len(lines) == 1 and "make gpu-first-run needs one" in lines[0], lines


def test_preflight_refuses_a_python_the_stack_has_no_wheels_for(tmp_path):
    """The venv's Python decides where the venv exists (else the interpreter that will create it): 3.10
    and 3.14 are refused in one line naming the supported versions; 3.12 passes."""
    device = tmp_path / "nvidia0"
    device.write_text("")
    for version, ok in (("3 10", False), ("3 14", False), ("3 12", True)):
        venv = tmp_path / f"venv{version.replace(' ', '')}"
        (venv / "bin").mkdir(parents=True)
        python = venv / "bin" / "python"
        python.write_text(f"#!/bin/sh\necho {version}\n")
        python.chmod(0o755)
        proc = subprocess.run([sys.executable, str(PREFLIGHT), "--job", "make bench-gpu", "--venv", str(venv),
                               "--nvidia-smi", str(tmp_path / "none"), "--device", str(device)],
                              capture_output=True, text=True, timeout=60)
        lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
        assert len(lines) == 1, lines
        if ok:
            assert proc.returncode == 0 and "Python 3.12 (the GPU stack supports 3.11-3.13)" in lines[0], lines
        else:
            assert proc.returncode == 2, lines
            dotted = version.replace(" ", ".")
            assert lines[0].startswith(f"error: Python {dotted} ({python}) cannot take the GPU stack"), lines
            assert "3.11-3.13" in lines[0] and "make bench-gpu" in lines[0], lines


def test_onnxruntime_cuda_check_opens_a_session():
    """The stack check asks a real ONNX Runtime session for CUDA: here (CPU build) it is refused in one
    line; a session that kept only the CPU provider (CUDA or cuDNN not loading) is refused as well."""
    import onnxruntime

    session = onnxruntime.InferenceSession(gpu_preflight._identity_model_bytes(), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.ones(1, np.float32)})[0].tolist() == [1.0]
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(gpu_preflight.PreflightError, match="has no CUDAExecutionProvider"):
            gpu_preflight.ort_cuda_providers(onnxruntime)
    with pytest.raises(gpu_preflight.PreflightError) as info:
        gpu_preflight.check_session_providers(["CPUExecutionProvider"], "1.26.0")
    assert "lists CUDAExecutionProvider but a session runs on CPUExecutionProvider only" in str(info.value)
    gpu_preflight.check_session_providers(["CUDAExecutionProvider", "CPUExecutionProvider"], "1.26.0")


# --- the GPU benchmark: what the CPU can run of it --------------------------------------------------

@pytest.fixture(scope="module")
def bench_gpu():
    from conftest import load_benchmark

    return load_benchmark("bench_gpu")


@pytest.mark.skipif(HAS_GPU, reason="this machine has an NVIDIA GPU")
def test_bench_gpu_without_gpu_is_one_line_exit_2(tmp_path):
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_gpu.py"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, env=_env())
    assert time.monotonic() - start < 60
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, lines)
    assert lines[0].startswith("bench_gpu: error: no NVIDIA GPU found")
    assert not (tmp_path / "out").exists()  # no half-written result


def test_bench_gpu_arguments(bench_gpu):
    args = bench_gpu.parse_args([])
    assert args.plan == "bench" and args.batches == [1, 4, 16] and args.prompt == 200
    assert args.sides == list(bench_gpu.SIDES)
    assert args.torch_dtype == ["bf16", "fp32"]  # reduced-precision TensorRT is not compared with fp32 alone
    assert bench_gpu.parse_args(["--torch-dtype", "fp32, bf16,fp32"]).torch_dtype == ["fp32", "bf16"]
    args = bench_gpu.parse_args(["--batches", "2,8", "--sides", "tensorrt,pytorch_reference", "--frames", "10"])
    assert args.batches == [2, 8] and args.sides == ["tensorrt", "pytorch_reference"] and args.frames == 10
    for bad in (["--batches", "1,x"], ["--batches", "0"], ["--sides", "tensorrt,cuda"], ["--frames", "2"],
                ["--torch-dtype", "int8"], ["--torch-dtype", ","]):
        with pytest.raises(SystemExit) as info:
            bench_gpu.parse_args(bad)
        assert info.value.code == 2


def test_bench_gpu_figures_from_chunk_times(bench_gpu):
    frame_s = 3200 / 24000
    # 2 scripts, 4 steps 10 ms apart (both chunks of a step at once), the first 50 ms after the call
    stamps = [(row, 0.050 + 0.010 * k) for k in range(4) for row in (0, 1)]
    fig = bench_gpu.figures_from_stamps(0.0, stamps, 2, frame_s)
    assert fig["frames_per_script"] == 4 and fig["scripts"] == 2
    assert fig["first_chunk_ms"] == pytest.approx(50.0)
    assert fig["ms_per_frame"] == pytest.approx(10.0)
    assert fig["rtf"] == pytest.approx(10.0 / 133.333, rel=1e-4)
    assert fig["realtime_x"] == pytest.approx(2 * 133.333 / 10.0, rel=1e-4)
    assert "ms_per_frame" not in bench_gpu.figures_from_stamps(0.0, stamps[:2], 2, frame_s)  # one step: no rate
    assert bench_gpu.median_figures([{"ms_per_frame": 3.0}, {"ms_per_frame": 1.0}, {"ms_per_frame": 2.0}]) == \
        {"ms_per_frame": 2.0, "runs": 3}


def _sample_result() -> dict:
    side = lambda ms, first, b: {"ms_per_frame": ms, "first_chunk_ms": first, "rtf": ms / 133.333,  # noqa: E731
                                 "realtime_x": b * 133.333 / ms}
    return {"benchmark": "bench_gpu", "environment": {"device": "sample", "tensorrt": "10.16.1.11"},
            "settings": {"plan": "bench"},
            "results": {"1": {"tensorrt": side(2.5, 40.0, 1), "ort_cuda": side(6.0, 70.0, 1),
                              "pytorch_reference": side(75.0, 300.0, 1), "transformers_generate": side(90.0, 400.0, 1)},
                        "16": {"tensorrt": side(8.0, 90.0, 16), "pytorch_reference": side(1200.0, 300.0, 16)}},
            "errors": {}}


def test_bench_gpu_summary_goals_and_outputs(bench_gpu, tmp_path):
    result = bench_gpu.summarize(_sample_result())
    assert result["speedups"]["1"]["tensorrt_vs_pytorch_reference"] == 30.0
    assert result["speedups"]["1"]["tensorrt_vs_transformers_generate"] == 36.0
    assert result["speedups"]["1"]["ort_cuda_vs_pytorch_reference"] == 12.5
    assert result["speedups"]["16"] == {"tensorrt_vs_pytorch_reference": 150.0}
    goals = {g["name"]: g for g in result["goals"]}
    assert goals["ms_per_frame_batch_1"]["met"] is True and goals["ms_per_frame_batch_1"]["measured"] == 2.5
    assert goals["speedup_vs_pytorch_batch_1"]["met"] is True
    assert goals["first_audio_ms"]["met"] is True
    assert goals["realtime_x_batch_16"]["met"] is False  # 16 x 133 ms / 8 ms = 267x < 300x
    slower = _sample_result()
    slower["results"]["1"]["tensorrt"]["ms_per_frame"] = 4.0
    del slower["results"]["16"]
    goals = {g["name"]: g for g in bench_gpu.summarize(slower)["goals"]}
    assert goals["ms_per_frame_batch_1"]["met"] is False
    assert goals["realtime_x_batch_16"]["met"] is None and goals["realtime_x_batch_16"]["measured"] is None

    paths = bench_gpu.write_outputs(result, tmp_path)
    assert [p.name for p in paths] == ["bench_gpu.json", "bench_gpu.png"]
    assert json.loads(paths[0].read_text())["goals"] == result["goals"]
    assert paths[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[1].stat().st_size > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench_gpu.json", "bench_gpu.png"]  # no temporaries


def test_bench_gpu_speedups_name_each_sides_precision(bench_gpu):
    """A ratio of TensorRT (reduced precision) over ONNX Runtime CUDA (fp32 graphs) says so, per batch."""
    sample = _sample_result()
    sample["results"]["1"]["pytorch_reference"]["torch_dtype"] = "bf16"
    sample["side_precisions"] = {"tensorrt": {"lm": "bf16", "acoustic_decoder": "fp16", "diffusion_sampler": "fp16",
                                              "text_embed": "fp32"},
                                 "ort_cuda": "fp32 ONNX graphs"}
    labels = bench_gpu.summarize(sample)["speedup_precisions"]
    assert labels["1"]["tensorrt_vs_ort_cuda"] == ("tensorrt (bf16: lm; fp16: acoustic_decoder, diffusion_sampler; "
                                                   "fp32: text_embed) over ort_cuda (fp32 ONNX graphs)")
    assert labels["1"]["ort_cuda_vs_pytorch_reference"] == "ort_cuda (fp32 ONNX graphs) over pytorch_reference (bf16)"
    assert set(labels["1"]) == set(sample["speedups"]["1"]) and set(labels["16"]) == {"tensorrt_vs_pytorch_reference"}


def test_iobinding_ort_backend_keeps_the_cache_in_place(bench_gpu, tiny_engine_dir):
    """The ORT-CUDA side's backend (IOBinding, cache bound by address, new_kv into a device buffer), run on
    the CPU device: the same audio as OrtBackend, with every decode step bound in place."""
    from common import ForcedDiffusion
    from vv_runtime.backend import OrtBackend
    from vv_runtime.pipeline import Pipeline

    manifest = json.loads((tiny_engine_dir / "manifest.json").read_text())
    script, ids = bench_gpu.prompt_script(tiny_engine_dir, manifest, 100)
    assert 100 <= len(ids) < 110
    column = manifest["control_tokens"].index("speech_diffusion")
    bound = bench_gpu.IOBindingOrtBackend(tiny_engine_dir, manifest, device="cpu")
    outs = []
    for backend in (OrtBackend(tiny_engine_dir, manifest), bound):
        pipe = Pipeline(tiny_engine_dir, manifest, ForcedDiffusion(backend, column))
        outs.append(pipe.generate([script, "Speaker 1: hi there", script], max_new_frames=5, seed=0))
        backend.close()
    assert outs[0].frames == outs[1].frames == [5, 5, 5]
    for a, b in zip(outs[0].audio, outs[1].audio):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert bound.bound_calls >= 4  # the decode steps ran on the bound cache
    assert isinstance(bound.kv_cache((1, 2, 2, 1, 8, 1)), bench_gpu.TorchKVCache)


@pytest.mark.slow
def test_bench_gpu_torch_sides_run(bench_gpu, fixture_dir):
    """The PyTorch reference and transformers' generate as the benchmark drives them (CPU, tiny fixture)."""
    import torch

    from torch_reference import TorchReference
    from vv_export.families import load_checkpoint

    loaded = load_checkpoint(str(fixture_dir))
    bench_gpu.align_generation_tokens(loaded.model, loaded.token_ids)
    ids = list(range(10, 30))
    device = torch.device("cpu")
    frame_s = 3200 / 24000
    gen = bench_gpu.measure_transformers(loaded.model, ids, 2, 3, 1, frame_s, device)
    assert gen["scripts"] == 2 and gen["audio_samples_per_script"] == 3 * 3200  # the forced audio token: 3 frames
    assert gen["first_chunk_ms"] > 0 and gen["runs"] == 1
    runner = TorchReference(loaded.model, loaded.token_ids, diffusion_steps=10)
    ref = bench_gpu.measure_reference(runner, ids, 2, 3, 1, frame_s, device, loaded.model.config.audio_config.hidden_size)
    assert ref["frames_per_script"] == 3 and ref["scripts"] == 2 and ref["first_chunk_ms"] > 0
    assert ref["realtime_x"] == pytest.approx(2 * frame_s * 1e3 / ref["ms_per_frame"])


def test_bench_gpu_sides_orchestration_on_cpu(bench_gpu, tiny_engine_dir, tmp_path):
    """run_sides as the GPU run drives it (the ORT side, on the CPU device here): figures per batch, summary, files."""
    import torch

    manifest = json.loads((tiny_engine_dir / "manifest.json").read_text())
    args = bench_gpu.parse_args(["--sides", "ort_cuda", "--batches", "1,2", "--frames", "4", "--repeats", "1",
                                 "--prompt", "80"])
    notes = []
    results, memory, errors, backends = bench_gpu.run_sides(args, tiny_engine_dir, manifest, torch.device("cpu"),
                                                            notes.append)
    assert errors == {} and set(results) == {"1", "2"}
    assert memory == {}  # the CPU device: no GPU figures claimed
    assert backends["ort_cuda"]["bound_calls"] > 0 and backends["ort_cuda"]["notices"] == []
    assert "graph_stats" not in backends["ort_cuda"]  # ONNX Runtime has none
    for b in ("1", "2"):
        fig = results[b]["ort_cuda"]
        assert fig["scripts"] == int(b) and fig["frames_per_script"] == 4 and fig["prompt_tokens"] >= 80
        assert fig["realtime_x"] == pytest.approx(int(b) * 3200 / 24000 * 1e3 / fig["ms_per_frame"])
    result = bench_gpu.summarize({"results": results, "errors": errors, "settings": {"plan": "bench"}})
    goals = {g["name"]: g for g in result["goals"]}
    assert all(g["met"] is None for g in goals.values())  # no TensorRT side: nothing claimed
    assert [p.name for p in bench_gpu.write_outputs(result, tmp_path)] == ["bench_gpu.json", "bench_gpu.png"]


def test_bench_gpu_graph_replay_check(bench_gpu):
    """The TensorRT side fails unless LM decode and every per-frame graph replayed a CUDA graph."""
    replayed = {"captures": 2, "replays": 90, "plain_runs": 1, "notes": []}
    stats = {g: dict(replayed) for g in ("lm", *bench_gpu.PER_FRAME_GRAPHS)}
    stats["text_embed"] = {"captures": 0, "replays": 0, "plain_runs": 4, "notes": []}  # not per-frame: no claim
    assert bench_gpu.graph_replay_failures(stats) == []
    stats["lm"] = {"captures": 0, "replays": 0, "plain_runs": 150,
                   "notes": ["lm: CUDA graph capture failed at (1, 1) (operation not permitted when stream is capturing)"]}
    del stats["acoustic_decoder"]
    failures = bench_gpu.graph_replay_failures(stats)
    assert failures == ["lm: no CUDA graph replayed (captures 0, plain runs 150; lm: CUDA graph capture failed at "
                        "(1, 1) (operation not permitted when stream is capturing))",
                        "acoustic_decoder: no graph statistics"]
    assert bench_gpu.graph_replay_failures(None) == [
        "TrtBackend.graph_stats() is not available: whether CUDA graphs ran is unknown"]
    assert bench_gpu.graph_replay_failures({"lm": replayed}, per_frame=()) == []

    class WithStats:
        def describe(self):
            return "trt[cuda:0]"

        def graph_stats(self):
            return {"lm": replayed}

    report = bench_gpu.backend_report(WithStats(), ["a notice"])
    assert report == {"backend": "trt[cuda:0]", "notices": ["a notice"], "graph_stats": {"lm": replayed}}


def test_bench_gpu_memory_figures_are_labelled(bench_gpu):
    gb = 10 ** 9
    fig = bench_gpu.memory_figures(before=(70 * gb, 80 * gb), at_peak=(45 * gb, 80 * gb),
                                   torch_max_allocated=3 * gb, smi_used_mib=34_000)
    assert fig == {"device_used_before_side_gb": 10.0, "device_total_gb": 80.0,
                   "device_used_after_timed_runs_gb": 35.0, "side_device_gb": 25.0, "torch_max_allocated_gb": 3.0,
                   "nvidia_smi_used_after_timed_runs_gb": round(34_000 * 2 ** 20 / gb, 3)}
    assert set(fig) <= set(bench_gpu.MEMORY_LABELS)  # every figure explained in the JSON
    assert bench_gpu.memory_figures(None, None, None, None) == {}


def test_bench_gpu_speedups_use_the_faster_torch_dtype(bench_gpu):
    """Both PyTorch dtypes measured: the figure (and the 20x goal) is the faster one's, labelled."""
    bf16 = {"ms_per_frame": 40.0, "first_chunk_ms": 200.0}
    fp32 = {"ms_per_frame": 60.0, "first_chunk_ms": 300.0}
    best = bench_gpu.fastest({"fp32": fp32, "bf16": bf16})
    assert best["ms_per_frame"] == 40.0 and best["torch_dtype"] == "bf16"
    assert best["by_torch_dtype"] == {"fp32": fp32, "bf16": bf16}
    assert bench_gpu.fastest({"bf16": {"error": "x"}}) is None
    assert "by_torch_dtype" not in bench_gpu.fastest({"fp32": fp32})
    result = _sample_result()
    result["results"]["1"]["pytorch_reference"] = best
    result = bench_gpu.summarize(result)
    assert result["speedups"]["1"]["tensorrt_vs_pytorch_reference"] == 16.0  # 40 / 2.5, not 60 / 2.5
    assert result["speedup_torch_dtypes"]["1"] == {"pytorch_reference": "bf16"}
    goal = next(g for g in result["goals"] if g["name"] == "speedup_vs_pytorch_batch_1")
    assert goal["met"] is False and goal["pytorch_dtype"] == "bf16" and "side_error" not in goal
    # the TensorRT side measured but failed its CUDA graph check: its goals say so
    failed = _sample_result()
    failed["errors"] = {"tensorrt": "CUDA graphs did not run: lm: no CUDA graph replayed"}
    goals = bench_gpu.summarize(failed)["goals"]
    assert all(g["side_error"].startswith("CUDA graphs did not run") for g in goals if g["measured"] is not None)


@pytest.mark.slow
def test_bench_gpu_torch_sides_in_both_dtypes(bench_gpu, fixture_dir, tiny_engine_dir, monkeypatch):
    """run_sides drives both PyTorch sides in bf16 and fp32 (CPU, the tiny fixture's weights in place of the
    full-size random model): each figure is the faster dtype's, labelled, both dtypes kept."""
    import torch

    from vv_export.families import load_checkpoint

    loads = []

    def fixture_model(config, manifest, device, dtype):
        loaded = load_checkpoint(str(fixture_dir))
        tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        loaded.model.to(device=device, dtype=tdtype).eval()
        bench_gpu.align_generation_tokens(loaded.model, loaded.token_ids)
        loads.append(dtype)
        return loaded

    monkeypatch.setattr(bench_gpu, "torch_model", fixture_model)
    manifest = json.loads((tiny_engine_dir / "manifest.json").read_text())
    args = bench_gpu.parse_args(["--sides", "pytorch_reference,transformers_generate", "--batches", "1",
                                 "--frames", "4", "--repeats", "1", "--prompt", "20"])
    results, memory, errors, backends = bench_gpu.run_sides(args, tiny_engine_dir, manifest, torch.device("cpu"),
                                                            lambda _t: None)
    assert errors == {} and backends == {} and loads == ["bf16", "fp32"]  # one model load per dtype
    for side in ("pytorch_reference", "transformers_generate"):
        fig = results["1"][side]
        assert set(fig["by_torch_dtype"]) == {"bf16", "fp32"}
        assert fig["torch_dtype"] == min(fig["by_torch_dtype"], key=lambda d: fig["by_torch_dtype"][d]["ms_per_frame"])
        assert fig["ms_per_frame"] == fig["by_torch_dtype"][fig["torch_dtype"]]["ms_per_frame"]
