"""How fast this machine streams weights through ONNX Runtime: the ceiling of every per-frame graph.

    python benchmarks/bandwidth_probe.py [--threads 2] [--out benchmarks/results]

A decode step multiplies 2 rows (the CFG pair) by every weight once, so on a CPU its time is the weight
bytes over the rate at which the MatMul kernels stream them. This probe measures that rate in ONNX
Runtime at the LM's MLP shape (1536 -> 8960, 2 rows), over enough distinct weights (12 layers' worth,
far beyond the caches), for fp32 MatMul and for MatMulNBits int8 / int4 (block 32, accuracy_level 4:
the `--quantize` kernels), median of 15 runs. Writes `<out>/bandwidth_probe.json`: bytes, ms and GB/s
per kind (a graph that reads B weight bytes per call needs at least B / rate).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import provenance, write_result  # noqa: E402

K, N, LAYERS, ROWS = 1536, 8960, 12, 2


def _model():
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((K, N)) * 0.02).astype(np.float32), f"w{i}")
             for i in range(LAYERS)]
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]) for i in range(LAYERS)]
    nodes.append(helper.make_node("Sum", [f"y{i}" for i in range(LAYERS)], ["y"]))
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [ROWS, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [ROWS, N])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _quantized(model, bits: int):
    import onnx

    from vv_export.quantize import quiet_logging
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                  MatMulNBitsQuantizer)

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, accuracy_level=4, bits=bits)
    with quiet_logging():
        q = MatMulNBitsQuantizer(copy, bits=bits, block_size=32, is_symmetric=True, accuracy_level=4,
                                 algo_config=config)
        q.process()
    return q.model.model


def measure(threads: int) -> dict:
    import onnxruntime as ort

    from vv_runtime.backend import session_options

    base = _model()
    x = np.random.default_rng(1).standard_normal((ROWS, K)).astype(np.float32)
    out = {}
    for kind, model in (("fp32", base), ("int8", _quantized(base, 8)), ("int4", _quantized(base, 4))):
        weight_bytes = sum(len(i.raw_data) for i in model.graph.initializer)
        opts = session_options(threads)  # as the runtime opens its graphs
        session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        for _ in range(3):
            session.run(None, {"x": x})
        times = []
        for _ in range(15):
            t = time.perf_counter()
            session.run(None, {"x": x})
            times.append(time.perf_counter() - t)
        ms = statistics.median(times) * 1e3
        out[kind] = {"weight_bytes": weight_bytes, "ms": ms, "gb_per_s": weight_bytes / ms / 1e6}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    kinds = measure(args.threads)
    result = {"benchmark": "bandwidth_probe", "threads": args.threads, "rows": ROWS,
              "shape": f"{LAYERS} x [{K}, {N}] weights", "kinds": kinds, **provenance()}
    for kind, r in kinds.items():
        print(f"{kind:5s} {r['weight_bytes'] / 1e6:7.1f} MB  {r['ms']:6.2f} ms  {r['gb_per_s']:5.1f} GB/s")
    write_result(args.out, "bandwidth_probe.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
