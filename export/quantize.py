"""Weight quantization of the exported graphs for the CPU path (`vv-export onnx --quantize int8|int4`).

Runs graph by graph inside `export_onnx`, after the fp32 graph was exported and validated against
PyTorch; it uses ONNX Runtime's own tooling only:

- MatMul weights (and Gemm weights, rewritten as MatMul + Add first) become `MatMulNBits`
  (com.microsoft): block-wise, `BLOCK_SIZES[bits]` weights per block along K, symmetric, 8 or 4 bits, with
  `accuracy_level` 4 (int8 activations, the VNNI/AMX int8 kernels; the fp32 activations are quantized
  per block on the fly). The diffusion sampler's unrolled steps read every head weight through
  `Identity` nodes of one shared initializer: those are bypassed before quantizing and the quantizer's
  per-node copies are merged afterwards, so the 10 steps share one quantized copy (the graph's weight
  bytes say so: `weight_bytes_after` of the sampler equals the step graph's).
- The conv stacks (acoustic_encoder, acoustic_decoder, semantic_encoder) get a second candidate: their
  large strided Conv / ConvTranspose rewritten as MatMul first (`vv_export.conv_matmul`: exactly the
  same products over whole frames), so that their weights are quantized too. ~87 % of the stacks'
  weights are the blocks' feed-forward MatMuls; most of the rest is in two strided convolutions
  (2048 x 1024 x 16 each at full size), for which ORT has no fast quantized Conv kernel (its dynamic
  int8 `ConvInteger` runs slower than fp32 on these convolutions, so it is not a candidate). A third
  candidate adds dynamic int8 (`DynamicQuantizeMatMul`, int8 GEMM) for their small MatMuls, which run
  over hundreds to thousands of time steps per frame and are compute-bound, not weight-bound. A fourth
  (8 bits only) gives dynamic int8 to every MatMul, MatMulNBits to none: where the int8 GEMM has fast
  kernels (AMX), it also wins on the large MatMuls at a few rows a call (Realtime's grouped decoder).

Each candidate is validated on the very inputs the fp32 graph was validated on, against the saved
PyTorch (fp32) outputs (ENGINE_DIR/validation), with the tolerance of `TOLERANCES` for its bit width,
and timed against the fp32 graph in ONNX Runtime on this CPU at a per-frame shape (`TIMING_DIMS`),
interleaved, median of several runs. With `select="measure"` (the CLI's) a candidate is kept only
when it is within tolerance, at least `MIN_SPEEDUP` times faster than fp32 at the per-frame shape and
not much slower at the others (`MIN_SECONDARY_SPEEDUP`: the lm's prefill, i.e. first audio); of
several such, the fastest. Otherwise the graph stays fp32 and the manifest says why. `select="all"` keeps the first
candidate within tolerance whatever its speed (tests: timings of tiny graphs say nothing).

Tolerances (``max|quantized - torch| <= atol + rtol * max|torch|`` per output, as for fp32): the error
is dominated by the weights' rounding, not by operator order. Symmetric block quantization rounds each
weight to a step of max|block| / (2^(bits-1) - 1): int8 127 levels (step ~0.8 % of the block maximum;
uniform rounding noise ~0.23 % of it rms), int4 7 levels (step ~14 %, rms ~4 %). Each MatMul output is
a sum of K such products, so its relative error is about the weights' relative rms error (the noise adds
in quadrature, like the signal); the int8 activations of accuracy_level 4 add about as much again.
Through a stack of layers with residual connections the relative errors add roughly linearly in depth
(~sqrt in the best case). Random weights (Gaussian blocks, the tiny models' few
input channels) are a hard case for absmax blocks, and a single worst element is compared with the
tensor's peak, so the measured figures are well above these rms estimates; the bounds are twice the
worst error measured on the shared fixture, the tiny and the mid-size random models (listed at
`TOLERANCES`, docs/QUANTIZATION.md). They bound what the quantized graph may do on the validation
inputs; they say nothing about the quality of speech from real weights, which the user checks with
`benchmarks/quant_report.py` on the checkpoint.
Quantized outputs are compared with max-abs error over the tensor against its peak, so rtol is the
worst element's error relative to the tensor's largest value.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

from .conv_matmul import convs_to_matmul
from .engine_dir import sha256_file
from .errors import ExportError, ValidationError, one_line
from .graph_rules import (bypass_weight_identities, check_within_tolerance, max_error, save_graph,
                          weight_bytes)
from .specs import DECODE_FRAMES
from .validation_data import REFERENCE_RUNNER, load_validation_data

MODES = {"int8": 8, "int4": 4}
# weights per block along K. 128-weight int8 blocks (1.03 instead of 1.125 bytes per weight, ~9 % faster
# at full size) put the fixture's diffusion_step beyond its int8 tolerance: 32 for both widths
BLOCK_SIZES = {8: 32, 4: 32}
ACCURACY_LEVEL = 4  # int8 compute of the activations (MatMulNBits' fast CPU path)
MIN_SPEEDUP = 1.05  # a quantized graph must be at least 5 % faster than fp32 to be kept (select="measure")
MIN_SECONDARY_SPEEDUP = 0.8  # ... at its per-frame shape, and not > 25 % slower at the others (lm prefill)
CONV_GRAPHS = ("acoustic_encoder", "acoustic_decoder", "semantic_encoder")
# conv stacks: MatMuls with fewer weights than this (the blocks' feed-forward layers at 32-512 channels,
# run over hundreds to thousands of time steps per frame) get dynamic int8 in the
# MatMulNBits+ConvAsMatMul+DynamicInt8 candidate; ConvAsMatMul+DynamicInt8 gives it to every MatMul
DYNAMIC_MAX_WEIGHTS = 1 << 20

# graph -> [(label, dims)]: the shapes the graph is timed at; the first one decides (per-frame cost)
TIMING_DIMS = {
    "lm": [("decode", {"batch": 2, "seq": 1, "past": 255}), ("prefill", {"batch": 2, "seq": 128, "past": 0})],
    "acoustic_encoder": [("prompt", {"batch": 1, "frames": 8})],
    # Realtime-0.5B's grouped decoder (decode_frames) runs mostly DECODE_FRAMES frames a call, a job's first
    # frame alone; VibeVoice-1.5B's has no such dim (`timing_dims` keeps a graph's own dims)
    "acoustic_decoder": [("frame", {"batch": 1, "decode_frames": DECODE_FRAMES}),
                         ("first frame", {"batch": 1, "decode_frames": 1})],
    "semantic_encoder": [("frame", {"batch": 1})],
    "acoustic_connector": [("prompt", {"batch": 1, "frames": 8})],
    "semantic_connector": [("prompt", {"batch": 1, "frames": 8})],
    "diffusion_step": [("frame", {"batch": 1})],
    "diffusion_sampler": [("frame", {"batch": 1})],
    # VibeVoice-Realtime (vv_export.realtime): the TTS LM steps both CFG rows every frame, and once per text
    # window the window's tokens with the frame before it (seq 6); the text LM runs once per text window
    "tts_lm": [("decode", {"batch": 2, "seq": 1, "past": 255}), ("window", {"batch": 2, "seq": 6, "past": 255})],
    "text_lm": [("window", {"batch": 1, "seq": 5, "past": 255})],
}


def _tol(atol: float, rtol: float) -> dict:
    return {"atol": atol, "rtol": rtol}


# bits -> graph -> tolerance for every output of the graph. Measured worst error / peak (int8 | int4, over
# all outputs and validation shapes, accuracy_level 4) on the shared fixture, the tiny random and the
# mid-size random model: lm .10/.014/.028 | .42/.19/.13 (control_logits worst), acoustic_encoder
# .016/.008/.008 | .19/.08/.13, acoustic_decoder .05/.003/.001 | .41/.03/.01, semantic_encoder
# .02/.011/.007 | .24/.12/.11, connectors .011 | .16, diffusion_step .030/.012/.016 | .21/.16/.15,
# diffusion_sampler .032/.014/.008 | .28/.17/.13. VibeVoice-Realtime (its shared fixture / the tiny random
# model): text_lm .026/.008 | .23/.088, tts_lm .023/.008 | .27/.14 (eos_logit .005/.008 | .13/.14), and
# its 5-step sampler, decoder and connector within the bounds above. Bounds: about twice the worst of them.
TOLERANCES = {
    8: {
        "lm": _tol(1e-3, 0.2),
        "acoustic_encoder": _tol(1e-4, 0.04),
        "acoustic_decoder": _tol(1e-4, 0.1),
        "semantic_encoder": _tol(1e-4, 0.05),
        "acoustic_connector": _tol(1e-4, 0.03),
        "semantic_connector": _tol(1e-4, 0.03),
        "diffusion_step": _tol(1e-4, 0.06),
        "diffusion_sampler": _tol(1e-4, 0.07),
        "text_lm": _tol(1e-3, 0.06),
        "tts_lm": _tol(1e-3, 0.06),
    },
    4: {
        "lm": _tol(1e-3, 0.8),
        "acoustic_encoder": _tol(1e-4, 0.4),
        "acoustic_decoder": _tol(1e-4, 0.8),
        "semantic_encoder": _tol(1e-4, 0.5),
        "acoustic_connector": _tol(1e-4, 0.3),
        "semantic_connector": _tol(1e-4, 0.3),
        "diffusion_step": _tol(1e-4, 0.45),
        "diffusion_sampler": _tol(1e-4, 0.6),
        "text_lm": _tol(1e-3, 0.55),
        "tts_lm": _tol(1e-3, 0.55),
    },
}


def check_mode(mode: str) -> None:
    if mode != "none" and mode not in MODES:
        raise ExportError(f"--quantize {mode}: expected none, int8 or int4")


def tolerance_for(graph: str, bits: int, outputs: list[str]) -> dict:
    tol = TOLERANCES[bits].get(graph)
    if tol is None:
        raise ExportError(f"graph {graph}: no {bits}-bit quantization tolerance is stated")
    return {o: dict(tol) for o in outputs}


# --- graph rewrites --------------------------------------------------------------------------------

def _gemm_to_matmul(graph) -> int:
    """Gemm(A, W, C) with a constant W (alpha 1, A not transposed) -> MatMul(A, W as [K, N]) (+ Add(beta*C))."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in graph.initializer}
    made = {}
    nodes, count = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0)
                or abs(attrs.get("alpha", 1.0) - 1.0) > 0):
            nodes.append(node)
            continue
        w_name = node.input[1]
        trans_b = attrs.get("transB", 0)
        key = (w_name, trans_b)
        if key not in made:
            w = numpy_helper.to_array(inits[w_name])
            if trans_b:
                new_name = w_name + "__kn"
                graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), new_name))
            else:
                new_name = w_name
            made[key] = new_name
        has_bias = len(node.input) > 2 and node.input[2] and attrs.get("beta", 1.0) != 0
        mm_out = node.output[0] + "__mm" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], made[key]], [mm_out], name=(node.name or w_name) + "__mm"))
        if has_bias:
            bias = node.input[2]
            beta = attrs.get("beta", 1.0)
            if beta != 1.0:
                scaled = bias + "__beta"
                if scaled not in inits:
                    graph.initializer.append(helper.make_tensor(scaled, 1, [], [float(beta)]))
                    inits[scaled] = None
                nodes.append(helper.make_node("Mul", [bias, scaled], [bias + "__scaled_" + node.output[0]]))
                bias = bias + "__scaled_" + node.output[0]
            nodes.append(helper.make_node("Add", [mm_out, bias], [node.output[0]], name=(node.name or w_name) + "__bias"))
        count += 1
    graph.ClearField("node")
    graph.node.extend(nodes)
    return count


def _drop_unused_and_duplicate_initializers(graph) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    seen, keep = set(), []
    for init in graph.initializer:
        if init.name in used and init.name not in seen:
            seen.add(init.name)
            keep.append(init)
    if len(keep) != len(graph.initializer):
        graph.ClearField("initializer")
        graph.initializer.extend(keep)


@contextlib.contextmanager
def quiet_logging():
    """ORT's quantization tools log every tensor at INFO (some through the root logger) and advise
    pre-processing at WARNING."""
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.quantization")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def quantize_matmuls(model, bits: int):
    """MatMulNBits for every MatMul with a constant weight; returns (model, nodes quantized)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                  MatMulNBitsQuantizer)

    bypass_weight_identities(model.graph)
    _gemm_to_matmul(model.graph)
    block = BLOCK_SIZES[bits]
    config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, accuracy_level=ACCURACY_LEVEL, bits=bits)
    with quiet_logging():
        quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=True,
                                         accuracy_level=ACCURACY_LEVEL, algo_config=config)
        quantizer.process()
    out = quantizer.model.model
    _drop_unused_and_duplicate_initializers(out.graph)
    nodes = sum(1 for n in out.graph.node if n.op_type == "MatMulNBits")
    return out, nodes


def constant_matmuls(model) -> dict[str, int]:
    """The MatMuls with a constant 2-D weight (Gemms rewritten as MatMul first): node name -> weights."""
    bypass_weight_identities(model.graph)
    _gemm_to_matmul(model.graph)
    inits = {i.name: i for i in model.graph.initializer}
    return {n.name: int(np.prod(inits[n.input[1]].dims)) for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2}


def quantize_matmuls_dynamic(model, work: Path, max_weights: float = DYNAMIC_MAX_WEIGHTS):
    """Dynamic int8 (`DynamicQuantizeMatMul`: the activation quantized per call, weights int8 per output
    channel) for the MatMuls with fewer than `max_weights` constant weights (math.inf: all); returns
    (model, count).

    In the conv stacks the small ones run at high time resolution (800-3200 rows per frame at 32-128
    channels): compute-bound, where the int8 GEMM (VNNI, AMX where the CPU has it) beats both fp32 and
    MatMulNBits, whose strength is reading fewer weight bytes. The larger ones run at a few to a few hundred
    rows a call; whether MatMulNBits or the int8 GEMM serves them better depends on the CPU and the rows (a
    grouped decoder call has 6 frames' worth): the two candidates measure it.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    small = [name for name, weights in constant_matmuls(model).items() if weights < max_weights]
    if not small:
        return model, 0
    src, dst = work / "dynamic_in.onnx", work / "dynamic_out.onnx"
    onnx.save_model(model, str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=src.name + ".data", size_threshold=1024)
    del model
    with quiet_logging():
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], nodes_to_quantize=small,
                         per_channel=True, weight_type=QuantType.QInt8, use_external_data_format=True)
    out = onnx.load(str(dst), load_external_data=True)
    for f in work.glob("dynamic_*"):
        f.unlink()
    count = sum(1 for n in out.graph.node if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul"))
    return out, count


# --- saving, validating, timing --------------------------------------------------------------------

def _session(path: Path, threads: int | None):
    """A CPU session for timing and validation, as the runtime opens it (vv_runtime.backend.session_options:
    the timings that choose a graph are the ones it will have): `threads` intra-op threads (None: one per core)."""
    import onnxruntime as ort

    from vv_runtime.backend import session_options

    return ort.InferenceSession(str(path), sess_options=session_options(int(threads or os.cpu_count() or 1)),
                                providers=["CPUExecutionProvider"])


def validate_quantized(name: str, path: Path, directory: Path, tolerance: dict, threads: int | None):
    """Max error per output of the graph at `path` on the saved validation inputs vs the saved PyTorch outputs.

    Returns (errors, first failure message or None).
    """
    session = _session(path, threads)
    outputs = [o.name for o in session.get_outputs()]
    return validate_runner(name, lambda feeds: dict(zip(outputs, session.run(outputs, feeds))), outputs,
                           directory, tolerance)


def validate_runner(name: str, run, outputs: list[str], directory: Path, tolerance: dict):
    """`validate_quantized` for any runner of the graph: `run(feeds) -> {output: array}` (an ONNX Runtime
    session, an OpenVINO model, ...). Returns (max error per output, first failure message or None)."""
    feeds_list, results = load_validation_data(directory, name)
    refs = dict(results)[REFERENCE_RUNNER]
    worst = {o: 0.0 for o in outputs}
    failure = None
    for feeds, ref in zip(feeds_list, refs):
        got = run(feeds)
        for out_name in outputs:
            value, reference = got[out_name], np.asarray(ref[out_name])
            err = max_error(value, reference)
            worst[out_name] = max(worst[out_name], err) if np.isfinite(err) else float("inf")
            if failure is None:
                try:
                    check_within_tolerance(name, out_name, value, reference, tolerance[out_name],
                                           {k: list(v.shape) for k, v in feeds.items()})
                except ValidationError as exc:
                    failure = str(exc)
    return worst, failure


def full_dims(ctx, dims: dict) -> dict:
    """`dims` with the dimensions derived from them: samples (frames x hop), decode_samples (decode_frames x
    hop), total (past + seq)."""
    d = dict(dims)
    if "frames" in d:
        d.setdefault("samples", d["frames"] * ctx.hop)
    if "decode_frames" in d:
        d.setdefault("decode_samples", d["decode_frames"] * ctx.hop)
    if "past" in d:
        d.setdefault("total", d["past"] + d["seq"])
    return d


def timing_feeds(spec, ctx, dims: dict) -> dict:
    """Random inputs of `spec` at the timing shape `dims` (numpy)."""
    from .specs import sample_inputs

    return {k: v.numpy() for k, v in sample_inputs(spec, ctx, full_dims(ctx, dims), seed=7).items()}


def ort_runner(path: Path, threads: int | None):
    """`run(feeds) -> {output: array}` of the graph at `path` in an ONNX Runtime CPU session (`_session`)."""
    session = _session(path, threads)
    outputs = [o.name for o in session.get_outputs()]
    return lambda feeds: dict(zip(outputs, session.run(outputs, feeds)))


def time_pair(paths: dict, feeds: dict, threads: int | None, budget_s: float = 2.0) -> dict:
    """Median seconds per run of each graph in `paths` on `feeds` in ONNX Runtime, runs interleaved."""
    return time_runners({k: ort_runner(p, threads) for k, p in paths.items()}, feeds, budget_s)


def time_runners(runners: dict, feeds: dict, budget_s: float = 2.0) -> dict:
    """Median seconds per call of each runner (`run(feeds)`: any runtime) on `feeds`, calls interleaved (the
    same machine load for all), after one warm-up call each; as many rounds as fit in about `budget_s`
    (5 to 50)."""
    first = {}
    for k, run in runners.items():  # warm-up (and the size of one run)
        run(feeds)
        t = time.perf_counter()
        run(feeds)
        first[k] = time.perf_counter() - t
    repeats = int(min(50, max(5, budget_s / max(sum(first.values()), 1e-6))))
    times = {k: [] for k in runners}
    for _ in range(repeats):
        for k, run in runners.items():
            t = time.perf_counter()
            run(feeds)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def fast_enough(speedup: dict, primary: str) -> bool:
    """The rule that keeps a faster candidate (`speedup`: label -> times faster than the graph it would
    replace): at least MIN_SPEEDUP at the per-frame shape `primary`, at least MIN_SECONDARY_SPEEDUP at the
    others."""
    return speedup[primary] >= MIN_SPEEDUP and all(v >= MIN_SECONDARY_SPEEDUP for k, v in speedup.items()
                                                   if k != primary)


def timing_dims(spec) -> list[tuple[str, dict]]:
    """The shapes `spec`'s graph is timed at: its TIMING_DIMS naming only the dims its I/O has, a shape that
    says nothing new left out."""
    named = {d for io in spec.inputs + spec.outputs for d in io.shape if isinstance(d, str)}
    shapes: list[tuple[str, dict]] = []
    for label, dims in TIMING_DIMS.get(spec.name, []):
        own = {k: v for k, v in dims.items() if k in named}
        if own not in [d for _, d in shapes]:
            shapes.append((label, own))
    return shapes


def primary_label(name: str) -> str | None:
    """The timing shape that decides for graph `name` (its per-frame cost), None where none is stated."""
    return TIMING_DIMS[name][0][0] if name in TIMING_DIMS else None


# --- one graph --------------------------------------------------------------------------------------

def _graph_files(directory: Path, entry: dict) -> list[Path]:
    return [directory / entry["file"], *[directory / f for f in entry.get("external_data", [])]]


def quantize_graph(spec, ctx, directory: Path, entry: dict, mode: str, *, threads: int | None = None,
                   select: str = "measure", log=None) -> tuple[dict, dict]:
    """Quantize directory/<graph>.onnx (fp32, validated) in place when it pays; returns (entry, record).

    `entry` is the exporter's file entry (file, external_data, sha256, weight_bytes); the returned one
    describes the graph as it is now on disk. `record` is the manifest's `quantization` object.
    """
    import onnx

    bits = MODES[mode]
    name = spec.name
    before = int(entry["weight_bytes"])
    record = {"mode": mode, "method": None, "bits": bits, "block_size": BLOCK_SIZES[bits], "symmetric": True,
              "accuracy_level": ACCURACY_LEVEL, "nodes_quantized": 0, "weight_bytes_before": before,
              "weight_bytes_after": before, "status": "fp32", "select": select}
    fp32_path = directory / entry["file"]
    probe = onnx.load(str(fp32_path), load_external_data=False)
    has_matmul = any(n.op_type in ("MatMul", "Gemm") for n in probe.graph.node)
    has_conv = any(n.op_type in ("Conv", "ConvTranspose") for n in probe.graph.node)
    del probe
    if not has_matmul:
        record["reason"] = "no MatMul/Gemm weights to quantize"
        return entry, record
    scratch = directory / f".{name}.quantize"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        # int4: the int8 copy is tried too, and the graph gets the faster of the two within its tolerance
        # (int4 kernels lose to int8 where activations are long, e.g. the conv stacks' high-rate stages);
        # a graph beyond its int4 tolerance gets int8 before it stays fp32. select="all": the first
        # width within tolerance (int4 before int8), whatever its speed.
        chosen, width, tolerance = None, bits, None
        primary = primary_label(name)
        for w in (bits, 8) if bits == 4 else (bits,):
            got, tried, timing, tol, reason = _attempt(spec, ctx, directory, entry, name, w, has_conv,
                                                       scratch / f"int{w}", threads, select)
            if w == bits:
                record.update({"tolerance": tol, "timing": timing, "candidates": tried})
                tolerance = tol
            else:
                record["fallback"] = {"bits": w, "block_size": BLOCK_SIZES[w], "tolerance": tol, "timing": timing,
                                      "candidates": tried, "reason": reason, "int4_reason": record.get("reason")}
            record["reason"] = reason if chosen is None else record.get("reason")
            # the other width must win clearly: the two were timed in separate runs against fp32
            if got is not None and (chosen is None or (primary is not None and select != "all" and
                                                       got["speedup"][primary] > MIN_SPEEDUP * chosen["speedup"][primary])):
                if chosen is not None:
                    record["fallback"]["chosen_because"] = (
                        f"int{w} {got['speedup'][primary]:.2f}x fp32 at {primary}, faster than "
                        f"int{width} {chosen['speedup'][primary]:.2f}x")
                chosen, width, tolerance = got, w, tol
            if chosen is not None and select == "all":
                break
        if chosen is None:
            return entry, record
        # replace the fp32 files by the chosen candidate's
        for old in _graph_files(directory, entry):
            old.unlink(missing_ok=True)
        for f in chosen["files"]:
            os.replace(chosen["path"].parent / f, directory / f)
        new_entry = {**entry, "file": chosen["files"][0], "external_data": chosen["files"][1:],
                     "sha256": sha256_file(directory / chosen["files"][0]),
                     "weight_bytes": chosen["weight_bytes_after"]}
        record.pop("reason", None)
        record.update({"status": "quantized", "method": chosen["method"], "bits": width,
                       "block_size": BLOCK_SIZES[width], "tolerance": tolerance,
                       "nodes_quantized": chosen["nodes_quantized"],
                       "convs_as_matmul": chosen.get("convs_as_matmul", 0),
                       "dynamic_int8_nodes": chosen.get("dynamic_int8_nodes", 0),
                       "weight_bytes_after": chosen["weight_bytes_after"],
                       "validated_max_abs_error": chosen["validated_max_abs_error"]})
        if chosen.get("speedup"):
            record["speedup"] = chosen["speedup"]
        if log:
            log(f"{name}: {chosen['method']} {width}-bit, {before / 1e6:.1f} -> "
                f"{chosen['weight_bytes_after'] / 1e6:.1f} MB")
        return new_entry, record
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _attempt(spec, ctx, directory: Path, entry: dict, name: str, bits: int, has_conv: bool, scratch: Path,
             threads, select: str):
    """Candidates at one bit width: built, validated, timed; returns (chosen or None, candidate records,
    timing, tolerance, reason it was not kept or None)."""
    import onnx

    outputs = [o.name for o in spec.outputs]
    tolerance = tolerance_for(name, bits, outputs)
    fp32_path = directory / entry["file"]
    scratch.mkdir()
    # (method, convolutions as MatMuls, MatMuls below this many weights as dynamic int8 (0: none))
    candidates = [("MatMulNBits", False, 0)]
    if name in CONV_GRAPHS and has_conv:
        candidates += [("MatMulNBits+ConvAsMatMul", True, 0),
                       ("MatMulNBits+ConvAsMatMul+DynamicInt8", True, DYNAMIC_MAX_WEIGHTS)]
        if bits == 8:
            candidates.append(("ConvAsMatMul+DynamicInt8", True, math.inf))
    tried = []
    for method, convs, dynamic in candidates:
        cdir = scratch / method.replace("+", "_")
        cdir.mkdir()
        conv_nodes = dynamic_nodes = 0
        try:
            model = onnx.load(str(fp32_path), load_external_data=True)
            if convs:
                conv_nodes = convs_to_matmul(model)
                if not conv_nodes and not dynamic:
                    continue  # no convolution large enough: the same graph as the plain candidate
                if not conv_nodes:
                    method = method.replace("ConvAsMatMul+", "")
            if dynamic == math.inf and max(constant_matmuls(model).values(), default=0) < DYNAMIC_MAX_WEIGHTS:
                continue  # no MatMul is large: the same graph as the small ones' candidate
            if dynamic:
                model, dynamic_nodes = quantize_matmuls_dynamic(model, cdir, dynamic)
            model, mm_nodes = quantize_matmuls(model, bits)
            after = weight_bytes(model)
            path = cdir / entry["file"]
            files = save_graph(model, path)
            del model
            errors, failure = validate_quantized(name, path, directory, tolerance, threads)
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as exc:  # a candidate ORT's tools or kernels cannot handle: recorded, graph stays fp32
            detail = one_line(exc)[:300]
            tried.append({"method": method, "within_tolerance": False, "nodes_quantized": 0,
                          "validated_max_abs_error": {},
                          "failure": f"graph {name}: {method} candidate failed ({detail})"})
            continue
        cand = {"method": method, "bits": bits, "nodes_quantized": mm_nodes + dynamic_nodes, "convs_as_matmul": conv_nodes,
                "dynamic_int8_nodes": dynamic_nodes,
                "weight_bytes_after": int(after), "validated_max_abs_error": errors,
                "within_tolerance": failure is None, "path": path, "files": files}
        if failure is not None:
            cand["failure"] = failure
        tried.append(cand)
    # time every candidate within tolerance against fp32, interleaved
    good = [c for c in tried if c["within_tolerance"]]
    timing = {}
    if good:
        for label, dims in timing_dims(spec):
            feeds = timing_feeds(spec, ctx, dims)
            medians = time_pair({"fp32": fp32_path, **{c["method"]: c["path"] for c in good}}, feeds, threads)
            timing[label] = {"dims": dims, "ms": {k: v * 1e3 for k, v in medians.items()}}
            for c in good:
                c.setdefault("speedup", {})[label] = medians["fp32"] / medians[c["method"]]
    primary = primary_label(name)
    shown = [{k: v for k, v in c.items() if k not in ("path", "files")} for c in tried]
    chosen, reason = None, None
    if select == "all":
        chosen = good[0] if good else None
    elif primary is not None:
        fast = [c for c in good if fast_enough(c["speedup"], primary)]
        chosen = max(fast, key=lambda c: c["speedup"][primary]) if fast else None
    if chosen is None:
        if not good:
            failure = tried[0]["failure"]
            reason = failure if " candidate failed (" in failure else "exceeds its quantization tolerance: " + failure
        elif primary is None:
            reason = "no timing shape is stated for this graph (TIMING_DIMS): not measured"
        else:
            speeds = "; ".join(f"{c['method']} " + ", ".join(f"{k} {v:.2f}x" for k, v in c["speedup"].items())
                               for c in good)
            reason = (f"not faster than fp32 on this CPU ({speeds}; need >= {MIN_SPEEDUP}x at "
                      f"{primary} and >= {MIN_SECONDARY_SPEEDUP}x elsewhere)")
    return chosen, shown, timing, tolerance, (None if chosen is not None else f"{bits}-bit: {reason}")


def record_in_manifest(manifest: dict, mode: str, records: dict) -> None:
    """Put each graph's quantization record into the manifest.

    A quantized graph's `tolerance` and `validated_max_abs_error` become those of the quantized graph
    (what the file on disk was checked against); the fp32 graph's are kept in the record.
    """
    manifest["quantize"] = mode
    for name, record in records.items():
        graph = manifest["graphs"][name]
        if record["status"] == "quantized":
            record["fp32_tolerance"] = graph["tolerance"]
            if "validated_max_abs_error" in graph:
                record["fp32_validated_max_abs_error"] = graph["validated_max_abs_error"]
            graph["tolerance"] = record["tolerance"]
            graph["validated_max_abs_error"] = record["validated_max_abs_error"]
        graph["quantization"] = record
