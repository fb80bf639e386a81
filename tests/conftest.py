"""Shared test fixtures: the shared reference checkpoint and ENGINE_DIRs exported once per session."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VV_SHARED_DIR", REPO.parent / "shared"))
FIXTURE = SHARED / "fixtures" / "vibevoice-tiny-original"
REALTIME_FIXTURE = SHARED / "fixtures" / "vibevoice-realtime-tiny-original"
REFERENCE = SHARED / "reference"


def load_benchmark(name: str):
    """Import benchmarks/<name>.py as module `name` (the benchmarks are scripts, not a package)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def __getattr__(name: str):
    """`from conftest import ServerProcess`: a `vv-serve` child process, started and stopped (benchmarks/
    serve_process.py, loaded on first use so that a copy of this file elsewhere still imports)."""
    if name == "ServerProcess":
        return load_benchmark("serve_process").ServerProcess
    raise AttributeError(name)


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared reference material not found at {path}")
    return path


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    return _need(FIXTURE)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return _need(REFERENCE)


@pytest.fixture(scope="session")
def fixture_reference(fixture_dir):
    """(reference.json dict, reference_outputs as numpy arrays)."""
    from safetensors.numpy import load_file

    return (json.loads((fixture_dir / "reference.json").read_text()),
            load_file(str(fixture_dir / "reference_outputs.safetensors")))


@pytest.fixture(scope="session")
def tiny_engine_dir(fixture_dir, tmp_path_factory) -> Path:
    """The shared fixture exported (fp32, validated) once per test session."""
    from vv_export.families import load_checkpoint
    from vv_export.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("engines") / "tiny"
    export_onnx(load_checkpoint(str(fixture_dir)), out, progress=False)
    return out


@pytest.fixture(scope="session")
def realtime_fixture_dir() -> Path:
    """The shared tiny VibeVoice-Realtime checkpoint (original layout, reference outputs of Microsoft's code)."""
    return _need(REALTIME_FIXTURE)


@pytest.fixture(scope="session")
def realtime_reference(realtime_fixture_dir):
    """(reference.json dict, reference_outputs as numpy arrays) of the realtime fixture."""
    from safetensors.numpy import load_file

    return (json.loads((realtime_fixture_dir / "reference.json").read_text()),
            load_file(str(realtime_fixture_dir / "reference_outputs.safetensors")))


@pytest.fixture(scope="session")
def realtime_engine_dir(realtime_fixture_dir, tmp_path_factory) -> Path:
    """The realtime fixture exported (fp32, validated, 5 diffusion steps) once per test session."""
    from vv_export.families import load_checkpoint
    from vv_export.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("engines") / "realtime-tiny"
    export_onnx(load_checkpoint(str(realtime_fixture_dir)), out, progress=False)
    return out


@pytest.fixture(scope="session")
def realtime_voiced_engine_dir(realtime_engine_dir, realtime_fixture_dir, tmp_path_factory) -> Path:
    """The exported realtime fixture with its voice preset `en-Tiny_man` converted in (`vv-export voices`)."""
    import shutil

    from vv_export.voices import convert_voices

    out = tmp_path_factory.mktemp("engines") / "realtime-tiny-voiced"
    shutil.copytree(realtime_engine_dir, out)
    convert_voices(out, [realtime_fixture_dir / "voices" / "en-Tiny_man.pt"])
    return out


@pytest.fixture(scope="session")
def random_engine_dir(tmp_path_factory) -> Path:
    """The README demo's tiny random model exported once per session."""
    from vv_export.checkpoint import tiny_random_model
    from vv_export.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("engines") / "random"
    export_onnx(tiny_random_model(seed=0), out, progress=False)
    return out


@pytest.fixture(scope="session")
def presets(tmp_path_factory) -> Path:
    """A `vv-serve --voices` folder (read, never written) with the two example voices, voice_a and voice_b."""
    import shutil

    folder = tmp_path_factory.mktemp("presets")
    for name in ("voice_a.wav", "voice_b.wav"):
        shutil.copy(REPO / "examples" / name, folder / name)
    return folder


# --- VV_REQUIRE_GPU=1 (set by `make check-accuracy` / `make test-gpu`): a GPU run that cannot pass by skipping.
# Any skip of a `gpu`-marked test becomes a failure, except a skip whose reason starts with "not applicable"
# (e.g. bf16 on a GPU without bf16); the session fails when no gpu-marked test ran at all.

_GPU_RAN = pytest.StashKey[int]()  # gpu-marked tests whose call phase ran (passed or failed)


def tensorrt_gpu_unavailable() -> str | None:
    """Why TensorRT cannot run on a GPU here (None when it can): checked at collection, before any fixture
    exports anything; gpu-marked modules skip with this reason (and fail under VV_REQUIRE_GPU=1)."""
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:
        return f"TensorRT is not installed ({type(exc).__name__})"
    try:
        import torch
    except Exception:
        return "PyTorch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to PyTorch"
    return None


def _require_gpu() -> bool:
    return os.environ.get("VV_REQUIRE_GPU", "").strip() not in ("", "0")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if not _require_gpu() or item.get_closest_marker("gpu") is None:
        return
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if reason.startswith("Skipped: "):
            reason = reason[len("Skipped: "):]
        if not reason.startswith("not applicable"):
            report.outcome = "failed"
            report.longrepr = f"VV_REQUIRE_GPU=1: gpu test skipped instead of running ({reason})"
    elif report.when == "call" and not report.skipped:
        item.config.stash[_GPU_RAN] = item.config.stash.get(_GPU_RAN, 0) + 1


def pytest_sessionfinish(session, exitstatus):
    if _require_gpu() and session.config.stash.get(_GPU_RAN, 0) == 0:
        print("\nVV_REQUIRE_GPU=1: no gpu-marked test ran", flush=True)
        if exitstatus == 0:
            session.exitstatus = 1
