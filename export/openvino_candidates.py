"""OpenVINO as a second CPU runtime, chosen per graph by measurement (`vv-export onnx --runtimes ort,openvino`).

Runs graph by graph inside `export_onnx`, beside `--quantize` (export/quantize.py), and with its tools:

1. `RuntimeChoice(...)` (after the fp32 graph was exported and validated, before `--quantize` replaces it):
   the fp32 ONNX graph is converted to an OpenVINO model once and saved as IR (`ov.save_model`, f32 weights:
   compress_to_fp16=False), and once per int8 weight format as nncf `compress_weights` made it (INT8_ASYM /
   INT8_SYM: one scale (and zero point) per output channel). The candidates are these IRs at an inference
   precision: `f32`, `bf16` (the f32 IR computed in bf16; only where OpenVINO reports BF16 for this CPU, else
   recorded as skipped), `int8_asym` and `int8_sym` (int8 weights, f32 activations that OpenVINO quantizes
   per group of DYNAMIC_QUANTIZATION_GROUP_SIZE on the fly for its int8 kernels).
2. `choose` (after `--quantize` chose the ONNX Runtime graph): each candidate in turn is compiled and warmed
   by the runtime's own `OpenVinoGraph` (what `vv-run` will run), validated on the saved validation inputs
   against the saved PyTorch outputs with the tolerance of its precision (`tolerance_for`) and, within it,
   timed interleaved with the ONNX Runtime graph as it is now on disk at the graph's timing shapes
   (quantize.TIMING_DIMS, `time_runners`), then released (one OpenVINO copy of the graph in memory at a
   time). With select="measure" the fastest candidate is kept if it beats the ONNX Runtime graph by the rule
   that keeps a quantized graph (`quantize.fast_enough`: >= 1.05x at the per-frame shape, >= 0.8x
   elsewhere), otherwise ONNX Runtime stays; select="all" keeps the first candidate within tolerance,
   whatever its speed (tests: the tiny models' timings say nothing). The chosen IR is moved into the
   ENGINE_DIR; the ONNX graph stays (ONNX Runtime runs it where OpenVINO is missing; TensorRT builds from
   it). The manifest's ``graphs[g]["runtime"]`` records the choice, the candidates, the measured times and
   the reason (docs/ENGINE_DIR.md, Graph runtimes).

The ONNX Runtime side of the choice is whatever --quantize kept (fp32, int8 or int4: the quantization
record holds their own timings against fp32); the two steps together pick the fastest within tolerance.

Shapes: the per-frame graphs' shapes are fixed for a batch size, so their OpenVINO model is compiled for the
timing shape (one row, `shapes: "static"`, faster than dynamic shapes) with a dynamic compilation for other
row counts; the loop graphs (lm, encoders: prompt lengths vary) keep dynamic shapes. Graphs the loop never
calls (role auxiliary) and graphs without a timing shape are not candidates: ONNX Runtime serves them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from .engine_dir import DEFAULT_RUNTIME, OPENVINO_RUNTIME, RUNTIME_INSTALL, sha256_file
from .errors import ExportError, one_line
from .quantize import (MIN_SECONDARY_SPEEDUP, MIN_SPEEDUP, TIMING_DIMS, TOLERANCES, fast_enough, full_dims, ort_runner,
                       primary_label, time_runners, timing_dims, timing_feeds, validate_runner)

OPENVINO = OPENVINO_RUNTIME
RUNTIMES = ("ort", OPENVINO)  # --runtimes names; ONNX Runtime always serves the graphs OpenVINO does not
# candidate -> (weights of its IR, inference precision)
PRECISIONS = {"f32": ("f32", "f32"), "bf16": ("f32", "bf16"), "int8_asym": ("int8_asym", "f32"),
              "int8_sym": ("int8_sym", "f32")}
DYNAMIC_QUANTIZATION_GROUP_SIZE = 32  # int8 weights: activations quantized per 32 values for the int8 kernels
# A compiled candidate holds OpenVINO's own copy of the weights, at about this fraction of the fp32 graph's bytes
# (the IR's own pages are mapped from the file); a candidate that would need more (x 1.5) than the memory
# available is skipped, and the manifest says so, rather than ending the export (the exporter holds the torch
# model meanwhile: ~11 GB at the 1.5B size)
COMPILED_WEIGHTS = {"f32": 1.0, "bf16": 0.5, "int8_asym": 0.25, "int8_sym": 0.25}


def _tol(atol: float, rtol: float) -> dict:
    return {"atol": atol, "rtol": rtol}


# bf16 computing (the f32 IR with inference precision bf16: OpenVINO runs its MatMuls, convolutions and most
# elementwise ops in bf16, 8 mantissa bits, ~0.4 % per rounding), graph -> tolerance for every output, as
# max|got - torch| <= atol + rtol * max|torch|. Measured worst error / peak over all outputs and validation shapes
# on the shared fixture / the tiny random / the mid-size random model (VibeVoice-Realtime: its shared fixture):
# lm .017/.004/.007, acoustic_encoder .013/.004/.006, acoustic_decoder .022/.004/.003 (Realtime .020),
# diffusion_sampler .012/.005/.005 (Realtime .013), text_lm .008, tts_lm .011 (eos_logit .010); the bounds are
# about twice the worst (text_lm and tts_lm get the lm's). semantic_encoder .004 on the mid-size model, but
# 1.25 on the fixture and .063 (its new_state) on the tiny random model: bf16 breaks that graph on the tiny
# weights, and its bound (the decoder's) rejects it there.
BF16_TOLERANCES = {
    "lm": _tol(1e-3, 0.04),
    "acoustic_encoder": _tol(1e-4, 0.03),
    "acoustic_decoder": _tol(1e-4, 0.05),
    "semantic_encoder": _tol(1e-4, 0.05),
    "diffusion_sampler": _tol(1e-4, 0.03),
    "text_lm": _tol(1e-3, 0.04),
    "tts_lm": _tol(1e-3, 0.04),
}
# int8 weights (nncf, per output channel) are held to the 8-bit weight bounds of --quantize int8
# (quantize.TOLERANCES[8]): measured on the same models, int8_asym | int8_sym: lm .056/.011/.027 | .063/.015/.037,
# acoustic_encoder .026/.009/.010 | .023/.008/.011, acoustic_decoder .063/.005/.007 (Realtime .049) |
# .068/.005/.007 (.072), semantic_encoder .026/.009/.015 | .029/.007/.013, diffusion_sampler .021/.008/.017
# (Realtime .034) | .022/.009/.017 (.032), text_lm .021 | .024, tts_lm .026 | .035: within them everywhere.


def tolerance_for(graph: str, precision: str, fp32_tolerance: dict) -> dict:
    """Per-output tolerance of an OpenVINO candidate: f32 that of the fp32 graph (`fp32_tolerance`), bf16
    BF16_TOLERANCES, int8 weights the 8-bit weight tolerance of --quantize int8 (quantize.TOLERANCES[8]).
    ExportError where none is stated for the graph."""
    if precision == "f32":
        return {o: dict(t) for o, t in fp32_tolerance.items()}
    table = BF16_TOLERANCES if precision == "bf16" else TOLERANCES[8]
    tol = table.get(graph)
    if tol is None:
        raise ExportError(f"graph {graph}: no OpenVINO {precision} tolerance is stated")
    return {o: dict(tol) for o in fp32_tolerance}


def check_runtimes(runtimes) -> tuple[str, ...]:
    """`--runtimes` ("ort,openvino" or a sequence) -> the runtimes, ort first; one-line ExportError for an
    unknown name, or for openvino where OpenVINO or nncf is not installed."""
    names = [r.strip() for r in (runtimes.split(",") if isinstance(runtimes, str) else runtimes) if r.strip()]
    unknown = [r for r in names if r not in RUNTIMES]
    if unknown:
        raise ExportError(f"--runtimes {','.join(names)}: unknown runtime {unknown[0]!r} "
                          f"(known: {', '.join(RUNTIMES)})")
    if OPENVINO in names:
        for module in ("openvino", "nncf"):
            try:
                __import__(module)
            except ImportError as exc:
                raise ExportError(f"--runtimes openvino: {module} is not installed ({one_line(exc)}); "
                                  f"{RUNTIME_INSTALL[OPENVINO]}") from exc
    return tuple(r for r in RUNTIMES if r in names or r == "ort")


def check_export(runtimes, validate: bool, dtype: str) -> tuple[str, ...]:
    """`check_runtimes`, and OpenVINO candidates need an fp32, validated export (they are validated on its
    saved inputs and outputs): one-line ExportError otherwise. Returns the runtimes."""
    checked = check_runtimes(runtimes)
    if OPENVINO in checked and (not validate or dtype != "fp32"):
        raise ExportError("--runtimes openvino needs an fp32, validated export (no --no-validate, --dtype fp32)")
    return checked


def openvino_facts() -> dict:
    """OpenVINO's version and what it reports of this CPU: device name, optimisation capabilities, bf16."""
    import openvino as ov

    core = ov.Core()
    capabilities = [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]
    return {"version": ov.__version__, "device": str(core.get_property("CPU", "FULL_DEVICE_NAME")),
            "capabilities": capabilities, "bf16": "BF16" in capabilities}


def is_candidate(spec) -> bool:
    """Whether OpenVINO is tried for this graph: the loop calls it and a timing shape is stated."""
    return spec.role != "auxiliary" and spec.name in TIMING_DIMS


@contextlib.contextmanager
def _quiet_nncf():
    """nncf logs a table per compression at INFO and draws a progress bar on stdout."""
    from nncf.common.logging.logger import nncf_logger, set_log_level

    level = nncf_logger.level
    set_log_level(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        set_log_level(level)


def _save_ir(model, path: Path) -> list[str]:
    import openvino as ov

    ov.save_model(model, str(path), compress_to_fp16=False)
    return [path.name, path.with_suffix(".bin").name]


def _runtime_entry(precision: str, spec, ctx, files: list[str], directory: Path) -> dict:
    """The manifest's runtime entry of an OpenVINO candidate (what the runtime reads to serve it)."""
    weights, inference = PRECISIONS[precision]
    entry = {"name": OPENVINO, "precision": precision, "inference_precision": inference, "weight_format": weights,
             "file": files[0], "weights_file": files[1],
             "shapes": "static" if spec.role == "per-frame" else "dynamic",
             "warm": [full_dims(ctx, dims) for _, dims in timing_dims(spec)],
             "weight_bytes": int((directory / files[1]).stat().st_size)}
    if weights != "f32":
        entry["dynamic_quantization_group_size"] = DYNAMIC_QUANTIZATION_GROUP_SIZE
    return entry


class RuntimeChoice:
    """The OpenVINO candidates of one graph: their IRs made from the fp32 ONNX graph at construction (before
    --quantize replaces it), validated, timed and chosen from by `choose` (each candidate compiled, checked
    and timed alone, then released: one OpenVINO copy of the graph in memory at a time)."""

    def __init__(self, spec, ctx, directory: Path, entry: dict, *, threads: int | None, precisions, select: str,
                 facts: dict, log=None):
        self.spec, self.ctx, self.directory, self.log = spec, ctx, directory, log
        self.name = spec.name
        self.select = select
        self.threads = int(threads or os.cpu_count() or 1)  # as ONNX Runtime is timed (quantize._session)
        self.facts = facts
        self.fp32_bytes = int(entry["weight_bytes"])
        self.scratch = directory / f".{self.name}.openvino"
        self.candidates: list[dict] = []
        self.irs: dict[str, list[str]] = {}
        shutil.rmtree(self.scratch, ignore_errors=True)
        self.scratch.mkdir()
        try:
            self._build(directory / entry["file"], list(precisions))
        except BaseException:
            self.discard()
            raise

    def _build(self, fp32_path: Path, precisions: list[str]) -> None:
        import openvino as ov

        core = ov.Core()
        self.irs["f32"] = _save_ir(core.read_model(str(fp32_path)), self.scratch / f"{self.name}.openvino.f32.xml")
        for precision in precisions:
            weights, inference = PRECISIONS[precision]
            record = {"runtime": OPENVINO, "precision": precision}
            self.candidates.append(record)
            if inference == "bf16" and not self.facts["bf16"]:
                record["skipped"] = (f"this CPU has no bf16 ({self.facts['device']}; OpenVINO reports "
                                     f"{', '.join(self.facts['capabilities'])})")
                continue
            if weights in self.irs:
                continue
            try:
                import nncf

                with _quiet_nncf():
                    compressed = nncf.compress_weights(core.read_model(str(self.scratch / self.irs["f32"][0])),
                                                       mode=getattr(nncf.CompressWeightsMode, weights.upper()))
                self.irs[weights] = _save_ir(compressed, self.scratch / f"{self.name}.openvino.{weights}.xml")
                del compressed
            except (MemoryError, KeyboardInterrupt):
                raise
            except Exception as exc:  # a graph nncf cannot compress: recorded, not chosen
                record["failure"] = f"graph {self.name}: nncf {weights} failed ({one_line(exc)[:300]})"

    # --- the choice ----------------------------------------------------------------------------------

    def choose(self, entry: dict, quantization: dict | None) -> dict:
        """Validate each candidate, time those within tolerance against the ONNX Runtime graph as `entry`
        describes it now (interleaved, candidate by candidate), move the chosen IR into the ENGINE_DIR.
        Returns the manifest's runtime record."""
        try:
            return self._choose(entry, quantization)
        finally:
            self.discard()

    def _feeds(self) -> dict:
        return {label: timing_feeds(self.spec, self.ctx, dims) for label, dims in timing_dims(self.spec)}

    def _try(self, record: dict, ort, feeds: dict, ort_label: str, times: dict) -> None:
        """Validate one candidate (through the runtime's OpenVinoGraph: what vv-run will run) and, within
        tolerance, time it against `ort` at every timing shape; the results go into `record` and `times`."""
        from vv_runtime.openvino_backend import OpenVinoGraphs

        precision = record["precision"]
        runtime = _runtime_entry(precision, self.spec, self.ctx, self.irs[PRECISIONS[precision][0]], self.scratch)
        tolerance = tolerance_for(self.name, precision, self.spec.tolerance)
        manifest = {"graphs": {self.name: {"weight_bytes": self.fp32_bytes, **self.spec.manifest_entry(),
                                           "runtime": runtime}}}
        graphs = OpenVinoGraphs(self.scratch, manifest, [self.name], threads=self.threads)  # compiled + warmed
        try:
            run = lambda f: graphs.run(self.name, f)  # noqa: E731
            outputs = [o.name for o in self.spec.outputs]
            errors, failure = validate_runner(self.name, run, outputs, self.directory, tolerance)
            record.update({"within_tolerance": failure is None, "tolerance": tolerance,
                           "validated_max_abs_error": errors, "weight_bytes": runtime["weight_bytes"]})
            if failure is not None:
                record["failure"] = failure
                return
            key = f"{OPENVINO}/{precision}"
            speedup = {}
            for label, f in feeds.items():
                medians = time_runners({ort_label: ort, key: run}, f)
                times[label].setdefault(ort_label, []).append(medians[ort_label] * 1e3)
                times[label][key] = round(medians[key] * 1e3, 4)
                speedup[label] = round(medians[ort_label] / medians[key], 4)
            record["speedup_vs_onnxruntime"] = speedup
            record["entry"] = runtime
        finally:
            graphs.close()

    def _choose(self, entry: dict, quantization: dict | None) -> dict:
        ort_precision = (f"int{quantization['bits']}" if quantization and quantization.get("status") == "quantized"
                         else "fp32")
        ort_label = f"{DEFAULT_RUNTIME}/{ort_precision}"
        ort = ort_runner(self.directory / entry["file"], self.threads)
        feeds = self._feeds()
        times = {label: {} for label in feeds}
        for record in self.candidates:
            need, available = 1.5 * COMPILED_WEIGHTS[record["precision"]] * self.fp32_bytes, _available_memory()
            if "skipped" not in record and available is not None and need > available:
                record["skipped"] = (f"compiling it needs about {need / 1e9:.1f} GB of memory, "
                                     f"{available / 1e9:.1f} GB available")
            if "skipped" in record or "failure" in record:
                record["within_tolerance"] = False
                continue
            try:
                self._try(record, ort, feeds, ort_label, times)
            except (MemoryError, KeyboardInterrupt):
                raise
            except Exception as exc:  # a candidate OpenVINO cannot compile or run: recorded, not chosen
                record.update({"within_tolerance": False,
                               "failure": f"graph {self.name}: OpenVINO {record['precision']} candidate failed "
                                          f"({one_line(exc)[:300]})"})
        if not any(times.values()):  # nothing was timed: ONNX Runtime alone, for the record
            for label, f in feeds.items():
                times[label][ort_label] = [time_runners({ort_label: ort}, f)[ort_label] * 1e3]
        for label in times:  # ONNX Runtime was timed beside each candidate: the median of those runs
            times[label][ort_label] = round(float(np.median(times[label][ort_label])), 4)
        primary = primary_label(self.name)
        good = [c for c in self.candidates if c.get("within_tolerance")]
        shown = [{k: v for k, v in c.items() if k != "entry"} for c in self.candidates]
        record = {"times_ms": times,
                  "timing_dims": {label: full_dims(self.ctx, dims) for label, dims in timing_dims(self.spec)},
                  "candidates": shown, "select": self.select, "openvino_version": self.facts["version"]}
        if self.select == "all":
            chosen = good[0] if good else None
        else:
            fast = [c for c in good if fast_enough(c["speedup_vs_onnxruntime"], primary)]
            chosen = max(fast, key=lambda c: c["speedup_vs_onnxruntime"][primary]) if fast else None
        if chosen is None:
            if not good:
                why = "; ".join(c.get("failure") or f"{c['precision']}: {c['skipped']}" for c in self.candidates)
                reason = f"no OpenVINO candidate within its tolerance ({why})"
            else:
                speeds = "; ".join(f"{OPENVINO}/{c['precision']} " + ", ".join(
                    f"{k} {v:.2f}x" for k, v in c["speedup_vs_onnxruntime"].items()) for c in good)
                reason = (f"OpenVINO not faster than the ONNX Runtime graph ({ort_precision}) on this CPU "
                          f"({speeds}; need >= {MIN_SPEEDUP}x at {primary} and >= {MIN_SECONDARY_SPEEDUP}x "
                          f"elsewhere)")
            if self.log:
                self.log(f"{self.name}: ONNX Runtime ({ort_precision}): {reason}")
            return {"name": DEFAULT_RUNTIME, "precision": ort_precision, "reason": reason, **record}
        runtime = dict(chosen["entry"])
        for f in (runtime["file"], runtime["weights_file"]):
            os.replace(self.scratch / f, self.directory / f)
        runtime["sha256"] = {f: sha256_file(self.directory / f) for f in (runtime["file"], runtime["weights_file"])}
        key, speedup = f"{OPENVINO}/{chosen['precision']}", chosen["speedup_vs_onnxruntime"]
        how = ("the first candidate within tolerance (select all)" if self.select == "all"
               else "the fastest within tolerance")
        runtime.update({"tolerance": chosen["tolerance"], "validated_max_abs_error": chosen["validated_max_abs_error"],
                        "speedup_vs_onnxruntime": speedup,
                        "reason": (f"{key} {speedup[primary]:.2f}x the ONNX Runtime graph ({ort_precision}) at "
                                   f"{primary}: {how}"),
                        **record})
        if self.log:
            self.log(f"{self.name}: {runtime['reason']}")
        return runtime

    def discard(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)


def _available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class RuntimeSelection:
    """`--runtimes` over a whole export: a `RuntimeChoice` per candidate graph (`prepare` before --quantize,
    `choose` after it), and the manifest's records (`record`)."""

    def __init__(self, runtimes, ctx, directory: Path, *, threads: int | None = None, select: str = "measure",
                 precisions=None, log=None):
        if select not in ("measure", "all"):
            raise ExportError(f"runtime selection {select!r}: expected measure or all")
        self.runtimes = check_runtimes(runtimes)
        self.ctx, self.directory, self.threads, self.select, self.log = ctx, Path(directory), threads, select, log
        self.precisions = tuple(precisions or PRECISIONS)
        unknown = [p for p in self.precisions if p not in PRECISIONS]
        if unknown:
            raise ExportError(f"OpenVINO precision {unknown[0]!r}: expected one of {', '.join(PRECISIONS)}")
        self.facts = openvino_facts() if OPENVINO in self.runtimes else None
        if self.facts and log:
            log(f"OpenVINO {self.facts['version'].split('-')[0]} on {self.facts['device']}: "
                + ("bf16 candidates too (the CPU has bf16)" if self.facts["bf16"] else
                   "this CPU has no bf16: no bf16 candidates"))
        self.pending: dict[str, RuntimeChoice] = {}
        self.records: dict[str, dict] = {}

    def prepare(self, spec, entry: dict) -> None:
        if self.facts is not None and is_candidate(spec):
            self.pending[spec.name] = RuntimeChoice(spec, self.ctx, self.directory, entry, threads=self.threads,
                                                    precisions=self.precisions, select=self.select,
                                                    facts=self.facts, log=self.log)

    def choose(self, spec, entry: dict, quantization: dict | None) -> None:
        choice = self.pending.pop(spec.name, None)
        if choice is not None:
            self.records[spec.name] = choice.choose(entry, quantization)

    def record(self, manifest: dict) -> None:
        """Each graph's runtime record into the manifest, and ``manifest["runtimes"]``: the runtimes tried and
        what OpenVINO reports of this CPU (its version, device, capabilities, bf16)."""
        manifest["runtimes"] = {"tried": list(self.runtimes), **({OPENVINO: self.facts} if self.facts else {}),
                                "select": self.select}
        for name, record in self.records.items():
            manifest["graphs"][name]["runtime"] = record
