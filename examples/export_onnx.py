"""Rewrite a model, export it to ONNX, optimise it for ONNX Runtime and run it.

python examples/export_onnx.py [BUILTIN] [--out model.onnx]
"""

import argparse
import tempfile
from pathlib import Path

from archfx.ir import capture
from archfx.ir.lower import ort_session, run_onnx, to_onnx
from archfx.passes import Pipeline
from archfx.passes.io.zoo import build


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="tiny-bert")
    ap.add_argument("--out", default=None, help="where to write the .onnx file")
    args = ap.parse_args(argv)

    graph = Pipeline.parse("canonicalize").run(capture(build(args.model))).graph
    path = Path(args.out or Path(tempfile.mkdtemp()) / f"{args.model}.onnx")
    result = to_onnx(graph, path)  # export, ORT graph optimisation, check against PyTorch
    print(
        f"wrote {result.path}: max|Δ| vs PyTorch = {result.max_abs_diff:.1e} on {result.providers}"
    )

    session = ort_session(result.path, threads=1)
    outputs = run_onnx(session, graph.inputs)
    for name, array in zip(graph.output_names, outputs, strict=True):
        print(f"  {name}: {array.shape}")
    return result


if __name__ == "__main__":
    main()
