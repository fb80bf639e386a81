"""TensorRT build plans (package data): ``default.toml`` and per-GPU overrides that extend it.

Loaded and resolved against an ENGINE_DIR manifest by ``vv_export.plans``.
"""

from pathlib import Path

PLANS_DIR = Path(__file__).resolve().parent


def available_plans() -> list[str]:
    """Names of the plans shipped with the package (``--plan NAME``)."""
    return sorted(p.stem for p in PLANS_DIR.glob("*.toml"))
