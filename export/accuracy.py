"""Accuracy helpers through polygraphy, shared by the CPU tests (ONNX Runtime against the saved PyTorch
outputs), the GPU accuracy check (TensorRT against ONNX Runtime) and the GPU benchmark.

* ``compare_outputs``: two runs through polygraphy's Comparator with the manifest's per-output
  tolerances (``max|test - ref| <= atol + rtol * max|ref|`` per output and iteration, the rule of
  vv_export.graph_rules) -> AccuracyReport;
* ``run_onnxrt``: one graph of an ENGINE_DIR in ONNX Runtime (OnnxrtRunner + Comparator.run);
* ``make_backend_runner`` / ``run_backend``: a polygraphy runner over any runtime backend (TrtBackend);
* ``reference_outputs``: the iterations of saved RunResults (the exporter's PyTorch outputs).

polygraphy, numpy and ONNX Runtime are imported inside the functions; torch never.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .graph_rules import allowed_error, max_error, peak_of


@dataclass
class OutputError:
    output: str
    iteration: int
    max_abs_error: float
    allowed: float
    peak: float
    passed: bool


@dataclass
class AccuracyReport:
    graph: str
    test: str
    reference: str
    passed: bool
    errors: list  # of OutputError

    def worst(self) -> dict:
        """output -> the largest error over the iterations, with its allowed bound."""
        out: dict = {}
        for e in self.errors:
            w = out.get(e.output)
            if w is None or e.max_abs_error - e.allowed > w["max_abs_error"] - w["allowed"]:
                out[e.output] = {"max_abs_error": e.max_abs_error, "allowed": e.allowed, "iteration": e.iteration}
        return out

    def failures(self) -> list[str]:
        return [f"{self.graph}.{e.output} (inputs #{e.iteration}): {self.test} vs {self.reference} max |error| "
                f"{e.max_abs_error:.3g} > allowed {e.allowed:.3g}" for e in self.errors if not e.passed]

    def to_json(self) -> dict:
        return {"graph": self.graph, "test": self.test, "reference": self.reference, "passed": self.passed,
                "worst": self.worst()}


def quiet_polygraphy() -> None:
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR


def _simple_compare(atol: dict, rtol: dict):
    from polygraphy.comparator import compare as pg_compare

    cls = getattr(pg_compare, "SimpleCompareFunc", None)
    if cls is not None:
        return cls(atol=atol, rtol=rtol, check_error_stat="max", check_shapes=True)
    return pg_compare.CompareFunc.simple(atol=atol, rtol=rtol, check_error_stat="max", check_shapes=True)


def compare_outputs(graph: str, test_outputs: list[dict], reference_outputs: list[dict], tolerance: dict,
                    test_name: str = "test", reference_name: str = "reference") -> AccuracyReport:
    """Compare two runs through polygraphy's Comparator with per-output tolerances.

    The criterion is the exporter's: ``max|test - ref| <= atol + rtol * max|ref|`` per output and per
    iteration. Polygraphy's own relative check is per element, so each iteration is compared with a
    SimpleCompareFunc whose absolute bound is atol + rtol * max|ref| (check_error_stat "max").
    """
    import numpy as np
    from polygraphy.comparator import Comparator, RunResults
    from polygraphy.comparator.struct import IterationResult

    quiet_polygraphy()
    if len(test_outputs) != len(reference_outputs):
        raise ValueError(f"{graph}: {len(test_outputs)} test iterations vs {len(reference_outputs)} reference")
    errors = []
    passed = True
    for i, (got, ref) in enumerate(zip(test_outputs, reference_outputs)):
        atol, rtol = {}, {}
        peaks = {}
        for name, value in ref.items():
            tol = tolerance.get(name, tolerance.get("")) or {"atol": 0.0, "rtol": 0.0}
            atol[name] = allowed_error(tol, value)
            rtol[name] = 0.0
            peaks[name] = peak_of(value)
        missing = [k for k in ref if k not in got]
        if missing:
            raise ValueError(f"{graph}: {test_name} produced no output {missing[0]!r}")
        results = RunResults()
        results.append((test_name, [IterationResult({k: np.asarray(got[k]) for k in ref}, runner_name=test_name)]))
        results.append((reference_name, [IterationResult({k: np.asarray(v) for k, v in ref.items()},
                                                         runner_name=reference_name)]))
        accuracy = Comparator.compare_accuracy(results, compare_func=_simple_compare(atol, rtol))
        verdicts = list(accuracy[0].values())[0][0] if len(accuracy) else {}
        for name in ref:
            a, b = np.asarray(got[name]), np.asarray(ref[name])
            err = max_error(a, b) if a.shape == b.shape else float("inf")
            ok = bool(verdicts.get(name, False)) and np.isfinite(err)
            passed &= ok
            errors.append(OutputError(name, i, err, atol[name], peaks[name], ok))
    return AccuracyReport(graph, test_name, reference_name, passed, errors)


def run_onnxrt(engine_dir, manifest: dict, graph: str, feeds_list: list[dict], providers=None,
               name: str = "onnxrt") -> list[dict]:
    """Run one graph of an ENGINE_DIR in ONNX Runtime through polygraphy (OnnxrtRunner + Comparator.run)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator

    quiet_polygraphy()
    path = Path(engine_dir) / manifest["graphs"][graph].get("file", f"{graph}.onnx")
    runner = OnnxrtRunner(SessionFromOnnx(str(path), providers=providers or ["cpu"]), name=name)
    results = Comparator.run([runner], data_loader=list(feeds_list))
    return [{k: v for k, v in it.items()} for it in results[0][1]]


def make_backend_runner(backend, manifest: dict, graph: str, name: str):
    """A polygraphy runner over any runtime backend (``backend.run(graph, feeds)``), e.g. TrtBackend."""
    from collections import OrderedDict

    import numpy as np
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class BackendRunner(BaseRunner):
        def __init__(self):
            super().__init__(name=name, prefix="backend")

        def get_input_metadata_impl(self):
            meta = TensorMetadata()
            for io_spec in manifest["graphs"][graph]["inputs"]:
                shape = [d if isinstance(d, int) else None for d in io_spec["shape"]]
                meta.add(io_spec["name"], np.dtype(io_spec["dtype"]), shape)
            return meta

        def infer_impl(self, feed_dict):
            start = time.perf_counter()
            out = backend.run(graph, dict(feed_dict))
            self.inference_time = time.perf_counter() - start
            return OrderedDict((k, np.array(v, copy=True)) for k, v in out.items())

    return BackendRunner()


def run_backend(backend, manifest: dict, graph: str, feeds_list: list[dict], name: str = "backend") -> list[dict]:
    """Run one graph on a runtime backend through polygraphy's Comparator.run."""
    from polygraphy.comparator import Comparator

    quiet_polygraphy()
    runner = make_backend_runner(backend, manifest, graph, name)
    results = Comparator.run([runner], data_loader=list(feeds_list))
    return [{k: v for k, v in it.items()} for it in results[0][1]]


def reference_outputs(run_results) -> list[dict]:
    """The iterations of the (single) runner of saved RunResults, as dicts of arrays."""
    _, iterations = run_results[0]
    return [{k: v for k, v in it.items()} for it in iterations]
