"""Validation data saved with polygraphy's JSON utilities, so CPU and GPU accuracy checks share it.

ENGINE_DIR/validation/<graph>.inputs.json   list of feed dicts (polygraphy `save_json`)
ENGINE_DIR/validation/<graph>.outputs.json  polygraphy `RunResults` with one runner, "pytorch"
"""

from __future__ import annotations

from pathlib import Path

REFERENCE_RUNNER = "pytorch"


def validation_paths(engine_dir, graph: str) -> tuple[Path, Path]:
    base = Path(engine_dir) / "validation"
    return base / f"{graph}.inputs.json", base / f"{graph}.outputs.json"


def _quiet_polygraphy() -> None:
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.WARNING


def save_validation_data(engine_dir, graph: str, feeds_list: list[dict], outputs_list: list[dict]) -> None:
    _quiet_polygraphy()
    from polygraphy.comparator import RunResults
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.json import save_json

    inputs_path, outputs_path = validation_paths(engine_dir, graph)
    inputs_path.parent.mkdir(parents=True, exist_ok=True)
    save_json(feeds_list, str(inputs_path))
    results = RunResults()
    results.append((REFERENCE_RUNNER, [IterationResult(outputs=dict(o), runner_name=REFERENCE_RUNNER)
                                       for o in outputs_list]))
    results.save(str(outputs_path))


def load_validation_data(engine_dir, graph: str):
    """(feeds_list, RunResults) saved for `graph`."""
    _quiet_polygraphy()
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    inputs_path, outputs_path = validation_paths(engine_dir, graph)
    return load_json(str(inputs_path)), RunResults.load(str(outputs_path))
