"""ONNX Runtime CPU kernels that archfx's lowering avoids, timed against what they replace.

ORT's SkipLayerNormFusion turns Add + LayerNormalization into one SkipLayerNormalization
node; on CPU in fp32 that kernel is several times slower than the two ops it replaces, so
`archfx.ir.lower` leaves this fusion out when no CUDA provider runs the model
(`disabled_fusions`). This script measures both forms side by side, one thread, with graph
optimisation off so each model runs as written:

    python benchmarks/ort_kernels.py [--shape 8,128,768] [--runs 50]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper


def model(fused: bool, simplified: bool, shape: list[int]) -> bytes:
    d = shape[-1]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("x", "y", "o")]
    inits = [onnx.numpy_helper.from_array(np.ones(d, np.float32), "g")]
    if not simplified:
        inits.append(onnx.numpy_helper.from_array(np.zeros(d, np.float32), "b"))
    affine = ["g"] if simplified else ["g", "b"]
    norm = "SimplifiedLayerNormalization" if simplified else "LayerNormalization"
    if fused:
        nodes = [
            helper.make_node(
                "Skip" + norm, ["x", "y", *affine], ["o"], domain="com.microsoft", epsilon=1e-5
            )
        ]
    else:
        nodes = [
            helper.make_node("Add", ["x", "y"], ["s"]),
            helper.make_node(norm, ["s", *affine], ["o"], axis=-1, epsilon=1e-5),
        ]
    graph = helper.make_graph(nodes, "g", io[:2], io[2:], inits)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="8,128,768")
    ap.add_argument("--runs", type=int, default=50)
    args = ap.parse_args(argv)
    shape = [int(s) for s in args.shape.split(",")]
    rng = np.random.default_rng(0)
    feed = {n: rng.standard_normal(shape, dtype=np.float32) for n in ("x", "y")}
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sessions = {
        (fused, simplified): ort.InferenceSession(
            model(fused, simplified, shape), so, providers=["CPUExecutionProvider"]
        )
        for fused in (True, False)
        for simplified in (False, True)
    }
    times = {k: [] for k in sessions}
    for s in sessions.values():
        s.run(None, feed)
    for _ in range(args.runs):  # interleaved
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feed)
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    print(f"### ONNX Runtime {ort.__version__} CPU, fp32 {'×'.join(map(str, shape))}, 1 thread\n")
    print("| norm | fused Skip* kernel | Add + norm | fused / unfused |")
    print("|---|---|---|---|")
    result = {}
    for simplified, name in ((False, "LayerNormalization"), (True, "SimplifiedLayerNormalization")):
        fused, plain = med[(True, simplified)], med[(False, simplified)]
        result[name] = fused / plain
        print(f"| {name} | {fused:.2f} ms | {plain:.2f} ms | {fused / plain:.2f}× |")
    return result


if __name__ == "__main__":
    main()
