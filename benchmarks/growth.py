"""Time and peak memory of function-preserving growth (issue: growth passes).

Two measurements, one run:

1. A Llama-1B-shaped model (2048 wide, 16 layers, 32/8 heads, 8192 MLP, 128k vocabulary) built
   on the meta device: capture, then each growth pass on the structure alone (no values).
2. SmolLM2-135M-Instruct's weights (the packaged Q4_1 GGUF dequantised to fp32), each growth
   in a fresh process and in place
   (`Pipeline.run(graph, inplace=True, verify=False)`): its wall time, the memory the model
   occupies at the growth's peak (Linux VmHWM reset just before growing, minus the rest of the
   process: its RSS then less the loaded weights) against the grown model's size, and — on a separate
   capture, not in place — its certificate (the growth applied to an fp64 copy too: the two fp64
   graphs' difference relative to the logits' scale, and max |Δ| of the logits in fp32, on two
   input shapes).

    python benchmarks/growth.py [--skip-smollm2]

Threads are pinned to one; times are wall-clock on a shared machine (ratios matter).
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

from archfx.ir import capture
from archfx.passes import Pipeline

PIPELINES = [
    "expand-mlp(factor=2)",
    "add-heads(n=3)",
    "expand-qk(size=80),expand-head-dim(size=80)",
    "expand-hidden(size=768)",
    "add-layers(n=6)",
]
META_PIPELINES = [
    "expand-mlp(factor=2)",
    "add-heads(n=8)",
    "expand-qk(size=96),expand-head-dim(size=96)",
    "expand-hidden(size=3072)",
    "add-layers(n=4)",
]


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _size(graph) -> int:
    seen, total = set(), 0
    for t in [*graph.gm.parameters(), *graph.gm.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def meta() -> list[str]:
    config = transformers.LlamaConfig(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    t0 = time.perf_counter()
    graph = capture(
        model, {"input_ids": torch.zeros(2, 8, dtype=torch.long, device="meta"), "use_cache": False}
    )
    rows = [
        f"| capture (torch.export + flatten) | {time.perf_counter() - t0:.2f} s | {graph.num_parameters() / 1e9:.3f} B |"
    ]
    for text in META_PIPELINES:
        t0 = time.perf_counter()
        grown = Pipeline.parse(text).run(graph, verify=False).graph
        rows.append(
            f"| `{text}` | {time.perf_counter() - t0:.2f} s | {grown.num_parameters() / 1e9:.3f} B |"
        )
    return rows


def smollm2(text: str) -> str:
    """One growth of SmolLM2 in this (fresh) process, in place: the memory the model takes
    at its peak during growth, against the grown model's size; then the certificate."""
    from archfx.passes.io.zoo import build

    model = build("smollm2")
    graph = capture(model)
    del model  # the graph owns its own copy of every weight
    gc.collect()
    loaded = _size(graph)
    runtime = _status("VmRSS") - loaded  # the interpreter and libraries: everything but weights
    _reset_peak()
    t0 = time.perf_counter()
    grown = Pipeline.parse(text).run(graph, verify=False, inplace=True).graph
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM") - runtime
    size = _size(grown)
    del grown, graph
    gc.collect()
    cert = Pipeline.parse(text).run(capture(build("smollm2"))).records[-1].certificate
    return (
        f"| `{text}` | {seconds:.1f} s | {loaded / 2**20:.0f} MiB | {size / 2**20:.0f} MiB "
        f"| {peak / 2**20:.0f} MiB | {peak / size:.2f}× | {cert.max_abs_diff:.1e} | {cert.math_diff:.1e} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--one", metavar="PIPELINE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.one:
        print(smollm2(args.one), flush=True)
        return
    print("## Llama-1B shape on the meta device (structure only)\n")
    print("| step | time | parameters |\n|---|---|---|")
    print("\n".join(meta()), flush=True)
    if not args.skip_smollm2:
        print("\n## SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to fp32)\n")
        print(
            "| pipeline | time | loaded model | grown model | peak | peak / grown "
            "| max abs diff (fp32) | fp64, relative |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for text in PIPELINES:  # a fresh process each: peak memory is the growth's own
            out = subprocess.run(
                [sys.executable, __file__, "--one", text],
                capture_output=True,
                text=True,
                check=True,
            )
            print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
