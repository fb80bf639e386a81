#!/usr/bin/env python3
"""Preflight of the GPU jobs (`make check-accuracy`, `make bench-gpu`, `make test-gpu`).

Two checks, each one line on failure (exit status 2) and one line of facts on success:

    python3 tools/gpu_preflight.py --job "make check-accuracy"   # an NVIDIA GPU and its driver
    .venv/bin/python tools/gpu_preflight.py --stack                # the installed GPU stack sees it

The first runs with the system's python3 and the standard library only, before any virtual
environment or package exists, so that a machine without a GPU is told so within seconds having
installed nothing. It asks `nvidia-smi` for the GPUs and the driver version; only where nvidia-smi is
not installed does it accept a device node (/dev/nvidia0, or $VV_NVIDIA_DEVICE) and read the driver
version from the kernel module. An nvidia-smi that is there but fails (driver not loaded, no device) is
a one-line error: the device node alone does not prove the driver works, and the stack would otherwise be
installed (several GB) before the stack check failed.
The second imports torch, TensorRT and ONNX Runtime from the environment the job will use and checks
that they are the pinned, coherent set of requirements-gpu.txt and that each sees the GPU.
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

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise PreflightError(f"error: onnxruntime {onnxruntime.__version__} has no CUDAExecutionProvider")
    major, minor = torch.cuda.get_device_capability(0)
    return (f"GPU stack: {torch.cuda.get_device_name(0)} sm{major}{minor}, torch {torch.__version__} "
            f"(CUDA {torch.version.cuda}), TensorRT {tensorrt.__version__}, onnxruntime-gpu {onnxruntime.__version__}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", default="this job", help="what needs the GPU (named in the error line)")
    parser.add_argument("--stack", action="store_true", help="check the installed GPU stack instead")
    parser.add_argument("--nvidia-smi", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", default=None, help=argparse.SUPPRESS)  # default: $VV_NVIDIA_DEVICE or /dev/nvidia0
    args = parser.parse_args(argv)
    try:
        if args.stack:
            print(check_stack(args.job))
        else:
            gpus = find_gpus(args.job, smi=args.nvidia_smi, device=args.device)
            check_driver(gpus, args.job)
            print(describe(gpus))
    except PreflightError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
