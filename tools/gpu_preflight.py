#!/usr/bin/env python3
"""Preflight of the GPU jobs (`make check-accuracy`, `make bench-gpu`, `make test-gpu`).

Two checks, each one line on failure (exit status 2) and one line of facts on success:

    python3 tools/gpu_preflight.py --job "make check-accuracy" --venv .venv   # GPU, driver, Python
    .venv/bin/python tools/gpu_preflight.py --stack                             # the installed GPU stack sees it

The first runs with the system's python3 and the standard library only, before any virtual
environment or package exists, so that a machine without a GPU is told so within seconds having
installed nothing. It asks `nvidia-smi` for the GPUs and the driver version; only where nvidia-smi is
not installed does it accept a device node (/dev/nvidia0, or $VV_NVIDIA_DEVICE) and read the driver
version from the kernel module. An nvidia-smi that is there but fails (driver not loaded, no device) is
a one-line error: the device node alone does not prove the driver works, and the stack would otherwise be
installed (several GB) before the stack check failed. It then checks the Python the stack will be
installed for (the venv's where it exists, else this interpreter, which creates it) against
`SUPPORTED_PYTHON`, and its line names those versions and the package index the TensorRT wheels come
from (`NVIDIA_INDEX`, which the Makefile adds to pip's extra indexes; a wheelhouse through
PIP_FIND_LINKS / PIP_NO_INDEX instead, docs/GPU.md).
The second imports torch, TensorRT and ONNX Runtime from the environment the job will use and checks
that they are the pinned, coherent set of requirements-gpu.txt and that each sees the GPU; ONNX
Runtime's CUDA provider is checked by opening a session on it and reading the providers it kept (a
provider listed but unable to load CUDA or cuDNN is dropped by the session).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REQUIREMENTS = REPO / "requirements-gpu.txt"
# TensorRT 10 for CUDA 12 and CUDA 12 builds of torch and ONNX Runtime: a driver of the CUDA 12 family
# (minor-version compatibility starts at 525.60.13 on Linux).
MIN_DRIVER = (525, 60, 13)
# Python versions the pinned stack installs for: onnxruntime-gpu 1.26 has wheels for 3.11 and newer, the
# TensorRT 10.16 bindings for 3.8 to 3.13 (NVIDIA's installation guide).
SUPPORTED_PYTHON = ((3, 11), (3, 13))
# NVIDIA's package index: the real TensorRT wheels (the main index holds a stub that fetches them at build
# time). The Makefile reads this value (`python3 tools/gpu_preflight.py --index`).
NVIDIA_INDEX = "https://pypi.nvidia.com"
SMI_QUERY = ["--query-gpu=name,driver_version,memory.total", "--format=csv,noheader,nounits"]


class PreflightError(Exception):
    """What is missing, in one line."""


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def parse_smi(output: str) -> list[dict]:
    """The GPUs of `nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader,nounits`."""
    gpus = []
    for line in output.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3 or not parts[0] or not re.match(r"^\d+(\.\d+)*$", parts[1]):
            continue
        try:
            memory = int(float(parts[2]))
        except ValueError:
            memory = None
        gpus.append({"name": parts[0], "driver": parts[1], "memory_mib": memory})
    return gpus


def driver_from_proc(path: Path) -> str | None:
    """The driver version from /proc/driver/nvidia/version (`NVRM version: ... Kernel Module  550.54.15 ...`)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    match = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d+(?:\.\d+)+)", text)
    return match.group(1) if match else None


DEVICE_ENV = "VV_NVIDIA_DEVICE"  # the device node looked for where nvidia-smi is not installed (tests)


def default_device() -> str:
    return os.environ.get(DEVICE_ENV) or "/dev/nvidia0"


def find_gpus(job: str, smi: str | None = None, device: str | None = None,
              proc_version: str = "/proc/driver/nvidia/version", timeout: float = 20.0) -> list[dict]:
    """The NVIDIA GPUs of this machine with the driver version, or PreflightError naming what was tried.

    nvidia-smi decides where it is installed (`smi` given, or found on PATH): GPUs it lists, or an error
    carrying its first line. Only where it is not installed is the device node accepted."""
    device = device or default_device()
    found = smi if smi is not None else shutil.which("nvidia-smi")
    if found and not os.path.exists(found) and not shutil.which(found):
        found = None  # a path given that does not exist: nvidia-smi is not installed
    tried = []
    if found:
        try:
            proc = subprocess.run([found, *SMI_QUERY], capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PreflightError(f"error: nvidia-smi failed ({' '.join(str(exc).split())[:150]}): "
                                 f"the NVIDIA driver does not answer; {job} needs a working GPU") from None
        gpus = parse_smi(proc.stdout) if proc.returncode == 0 else []
        if gpus:
            return gpus
        said = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        reason = f"exit {proc.returncode}" + (f": {' '.join(said[0].split())[:150]}" if said else "")
        if proc.returncode != 0:
            raise PreflightError(f"error: nvidia-smi failed ({reason}): the NVIDIA driver is not working; "
                                 f"{job} needs a working GPU")
        raise PreflightError(f"error: no NVIDIA GPU found (nvidia-smi lists none: {reason}): {job} needs one")
    tried.append("nvidia-smi not found")
    if os.path.exists(device):
        return [{"name": f"NVIDIA device {device} (nvidia-smi unavailable)",
                 "driver": driver_from_proc(Path(proc_version)), "memory_mib": None}]
    tried.append(f"no {device}")
    raise PreflightError(f"error: no NVIDIA GPU found ({'; '.join(tried)}): {job} needs one")


def check_driver(gpus: list[dict], job: str) -> None:
    driver = gpus[0].get("driver")
    if driver and version_tuple(driver) < MIN_DRIVER:
        need = ".".join(map(str, MIN_DRIVER))
        raise PreflightError(f"error: NVIDIA driver {driver} is too old for the CUDA 12 GPU stack "
                             f"(needs >= {need}): {job} cannot run here")


def describe(gpus: list[dict]) -> str:
    first = gpus[0]
    memory = f", {first['memory_mib']} MiB" if first.get("memory_mib") else ""
    more = f" (+{len(gpus) - 1} more)" if len(gpus) > 1 else ""
    return f"GPU: {first['name']}{memory}{more}, driver {first.get('driver') or 'unknown'}"


def python_range() -> str:
    (lo_major, lo_minor), (hi_major, hi_minor) = SUPPORTED_PYTHON
    return f"{lo_major}.{lo_minor}-{hi_major}.{hi_minor}"


def venv_python_version(venv: str | None, timeout: float = 20.0) -> tuple[tuple[int, int], str]:
    """((major, minor), where) of the Python the GPU stack goes into: the venv's interpreter where the venv
    exists, else this one (`make` creates the venv with it)."""
    python = Path(venv) / "bin" / "python" if venv else None
    if python is not None and python.exists():
        try:
            proc = subprocess.run([str(python), "-c", "import sys; print(*sys.version_info[:2])"],
                                  capture_output=True, text=True, timeout=timeout)
            major, minor = (int(x) for x in proc.stdout.split())
        except (OSError, ValueError, subprocess.TimeoutExpired):
            raise PreflightError(f"error: {python} does not run; remove {venv} or point VENV elsewhere") from None
        return (major, minor), str(python)
    return tuple(sys.version_info[:2]), sys.executable or "python3"


def check_python(version: tuple[int, int], where: str, job: str) -> None:
    lo, hi = SUPPORTED_PYTHON
    if not lo <= tuple(version) <= hi:
        raise PreflightError(f"error: Python {version[0]}.{version[1]} ({where}) cannot take the GPU stack, which "
                             f"needs Python {python_range()} (onnxruntime-gpu 1.26 needs 3.11+, the TensorRT 10 "
                             f"bindings stop at 3.13): run {job} with PY=python3.12 (a new VENV)")


def describe_setup(version: tuple[int, int]) -> str:
    """The set-up half of the preflight line: the Python and where the TensorRT wheels come from."""
    return (f"Python {version[0]}.{version[1]} (the GPU stack supports {python_range()}); TensorRT wheels from "
            f"NVIDIA's index {NVIDIA_INDEX} or a wheelhouse (PIP_FIND_LINKS, PIP_NO_INDEX=1)")


def pinned_requirements(path: Path = REQUIREMENTS) -> dict:
    """name -> version of the `name==version` lines of requirements-gpu.txt (extras dropped)."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        match = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*==\s*([^\s;]+)", line)
        if match:
            pins[match.group(1).lower().replace("_", "-")] = match.group(3)
    return pins


def check_stack(job: str) -> str:
    """Import the GPU stack of this interpreter's environment and check it is the pinned set and sees a GPU."""
    from importlib import metadata

    pins = pinned_requirements()

    def installed(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    both = [n for n in ("onnxruntime", "onnxruntime-gpu") if installed(n)]
    if both != ["onnxruntime-gpu"]:
        raise PreflightError(f"error: the GPU stack needs onnxruntime-gpu alone, found {both or 'neither'} "
                             f"(run `make gpu-setup`): {job} cannot run")
    for name, version in pins.items():
        got = installed(name)
        if got is None or got.split("+")[0] != version.split("+")[0]:
            raise PreflightError(f"error: {name} {got or 'is not installed'}, requirements-gpu.txt pins {version} "
                                 f"(run `make gpu-setup`): {job} cannot run")
    try:
        import torch
    except Exception as exc:
        raise PreflightError(f"error: torch does not import ({type(exc).__name__}: {str(exc)[:150]})") from exc
    if not (torch.version.cuda or "").startswith("12."):
        raise PreflightError(f"error: torch {torch.__version__} is not a CUDA 12 build (CUDA {torch.version.cuda})")
    if not torch.cuda.is_available():
        raise PreflightError(f"error: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU: "
                             f"check the driver ({job} cannot run)")
    try:
        import tensorrt
    except Exception as exc:
        raise PreflightError(f"error: TensorRT does not import ({type(exc).__name__}: {' '.join(str(exc).split())[:150]})") from exc
    if not tensorrt.__version__.startswith("10."):
        raise PreflightError(f"error: TensorRT {tensorrt.__version__}: this project's plans need TensorRT 10")
    try:
        logger = tensorrt.Logger(tensorrt.Logger.ERROR)
        builder = tensorrt.Builder(logger)
        if builder is None:
            raise RuntimeError("no builder")
    except Exception as exc:
        raise PreflightError(f"error: TensorRT {tensorrt.__version__} cannot create a builder on this GPU "
                             f"({' '.join(str(exc).split())[:150]})") from exc
    import onnxruntime

    ort_cuda_providers(onnxruntime)
    major, minor = torch.cuda.get_device_capability(0)
    return (f"GPU stack: {torch.cuda.get_device_name(0)} sm{major}{minor}, torch {torch.__version__} "
            f"(CUDA {torch.version.cuda}), TensorRT {tensorrt.__version__}, onnxruntime-gpu {onnxruntime.__version__}")


def _identity_model_bytes() -> bytes:
    """A one-node ONNX model (Identity of a float [1] tensor), serialized (onnx comes with `.[dev]`)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "preflight",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    return model.SerializeToString()


def ort_cuda_providers(onnxruntime) -> list[str]:
    """The providers of an ONNX Runtime session asked for CUDA: a PreflightError unless CUDA is among them.

    Listing CUDAExecutionProvider (`get_available_providers`) only says the wheel was built with it; a
    session drops it when CUDA or cuDNN do not load, which is what the jobs would meet."""
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise PreflightError(f"error: onnxruntime {onnxruntime.__version__} has no CUDAExecutionProvider")
    try:
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        session = onnxruntime.InferenceSession(_identity_model_bytes(), options,
                                               providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        providers = session.get_providers()
    except Exception as exc:
        raise PreflightError(f"error: onnxruntime {onnxruntime.__version__} cannot open a session on CUDA "
                             f"({' '.join(str(exc).split())[:150]})") from exc
    check_session_providers(providers, onnxruntime.__version__)
    return providers


def check_session_providers(providers: list[str], version: str) -> None:
    """A session asked for CUDA that kept only the CPU provider: CUDA or cuDNN did not load."""
    if "CUDAExecutionProvider" not in providers:
        raise PreflightError(f"error: onnxruntime {version} lists CUDAExecutionProvider but a session runs on "
                             f"{', '.join(providers) or 'nothing'} only (the CUDA 12 / cuDNN 9 libraries do not load; "
                             f"run `make gpu-setup`)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", default="this job", help="what needs the GPU (named in the error line)")
    parser.add_argument("--stack", action="store_true", help="check the installed GPU stack instead")
    parser.add_argument("--venv", default=None, help="the venv the stack goes into (its Python is checked)")
    parser.add_argument("--index", action="store_true", help="print NVIDIA's package index and exit")
    parser.add_argument("--nvidia-smi", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", default=None, help=argparse.SUPPRESS)  # default: $VV_NVIDIA_DEVICE or /dev/nvidia0
    args = parser.parse_args(argv)
    if args.index:
        print(NVIDIA_INDEX)
        return 0
    try:
        if args.stack:
            print(check_stack(args.job))
        else:
            gpus = find_gpus(args.job, smi=args.nvidia_smi, device=args.device)
            check_driver(gpus, args.job)
            version, where = venv_python_version(args.venv)
            check_python(version, where, args.job)
            print(f"{describe(gpus)}; {describe_setup(version)}")
    except PreflightError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
