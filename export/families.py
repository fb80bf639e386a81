"""The model families the exporter knows, in one table: how a checkpoint of each is recognised (its config),
loaded, split into graphs and described in the manifest. A new family is one `Family` entry here, its module
(like `vv_export.realtime`) and its entry in `vv_engine_dir.FAMILIES`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

from . import realtime, specs
from .checkpoint import VIBEVOICE, LoadedModel, load_vibevoice_checkpoint, resolve_model_dir
from .errors import ExportError


@dataclass(frozen=True)
class Family:
    """A family's exporter: `module` (its spec module) provides `build_specs(context)` and
    `manifest_facts(context)`, looked up at each use."""
    name: str                       # manifest["model_family"] of its ENGINE_DIRs
    recognises: Callable            # config.json (dict) -> bool
    load: Callable                  # (model, directory, config, tokenizer_dir) -> LoadedModel
    context: Callable               # (loaded, diffusion_steps=) -> the specs' context
    module: ModuleType
    default_diffusion_steps: int

    def build_specs(self, context) -> list:
        return self.module.build_specs(context)

    def manifest_facts(self, context) -> dict:
        return self.module.manifest_facts(context)


FAMILIES = (
    Family(realtime.FAMILY, realtime.is_realtime_config, realtime.load_realtime_checkpoint, realtime.RealtimeContext,
           realtime, realtime.DEFAULT_DIFFUSION_STEPS),
    # VibeVoice-1.5B / 7B: any other VibeVoice config (its loader checks the layout)
    Family(VIBEVOICE, lambda cfg: True, load_vibevoice_checkpoint, specs.ExportContext, specs,
           specs.DEFAULT_DIFFUSION_STEPS),
)


def family_of(loaded: LoadedModel) -> Family:
    for family in FAMILIES:
        if family.name == loaded.family:
            return family
    raise ExportError(f"internal: no exporter for model family {loaded.family!r}")


def load_checkpoint(model: str, tokenizer_dir: str | None = None) -> LoadedModel:
    """Load a checkpoint directory or hub id of any known family (fp32, eval), recognised by its config.json."""
    directory = resolve_model_dir(model)
    config_path = directory / "config.json"
    if not config_path.exists():
        raise ExportError(f"{directory}: not a VibeVoice checkpoint (no config.json)")
    try:
        cfg = json.loads(config_path.read_text())
    except ValueError as exc:
        raise ExportError(f"{config_path}: not valid JSON ({exc})") from exc
    if not isinstance(cfg, dict):
        raise ExportError(f"{config_path}: not a VibeVoice config")
    family = next(f for f in FAMILIES if f.recognises(cfg))
    return family.load(model, directory, cfg, tokenizer_dir)
