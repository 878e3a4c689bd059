"""Reproducer for docs/onnx-accuracy.md: how far SmolLM2's fp32 logits are from fp64, in
PyTorch and in ONNX Runtime, per sequence of a batch of 8 × 128 random tokens.

    .venv/bin/python docs/onnx_accuracy.py                      # exports SmolLM2 first (minutes)
    .venv/bin/python docs/onnx_accuracy.py --onnx m.raw.onnx    # an existing export of it

(the exporter's model: `archfx apply smollm2 --pipeline canonicalize --onnx m.onnx
--keep-intermediate` leaves it beside m.onnx as m.raw.onnx)

Every figure is max |logit − fp64 logit| (logits reach ~36), over the batch and per sequence.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import onnxruntime as ort
import torch

from archfx.passes.io.zoo import build


def session(path: str, level: str):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = {
        "off": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--onnx", help="SmolLM2 exported by archfx (default: export it now)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    model = build("smollm2")
    exact = copy.deepcopy(model).double()
    path = args.onnx
    if path is None:
        from archfx.ir import capture
        from archfx.ir.lower import to_onnx

        ids = torch.randint(0, model.config.vocab_size, (8, 128))
        graph = capture(model, {"input_ids": ids, "use_cache": False})
        path = str(Path(tempfile.mkdtemp()) / "smollm2.onnx")
        to_onnx(graph, path, optimize=False, strict=False)
    sessions = {level: session(path, level) for level in ("off", "all")}
    for seed in args.seeds:
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, model.config.vocab_size, (8, 128), generator=gen)
        with torch.no_grad():
            x64 = exact(input_ids=ids, use_cache=False).logits
            fp32 = model(input_ids=ids, use_cache=False).logits.double()
        rows = {"PyTorch fp32": fp32}
        for level, s in sessions.items():
            out = s.run(None, {s.get_inputs()[0].name: ids.numpy()})[0]
            rows[f"ONNX Runtime fp32, optimisations {level}"] = torch.from_numpy(out).double()
        print(f"seed {seed}: max |logit| {float(x64.abs().max()):.1f}")
        for name, y in rows.items():
            per = (y - x64).abs().amax(dim=(1, 2))
            print(
                f"  {name:40s} max {float(per.max()):.1e}   per sequence "
                + " ".join(f"{float(v):.0e}" for v in per)
            )


if __name__ == "__main__":
    main()
