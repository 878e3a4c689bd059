"""Forward latency of rewritten models relative to the plain model, side by side in one run.

GPT-2-small shape (12 layers × 768, 12 heads, vocabulary 50257), batch 8 × 128, one thread,
random weights. For each backend (eager PyTorch on the captured graph, torch.compile, ONNX
Runtime with its full graph optimisation) the plain and every rewritten graph are timed in
interleaved rounds, and the median ratio is reported.

    python benchmarks/rewrite_overhead.py --pipelines 'altup(k=2)' [--backends eager,compiled,ort] [--out docs/benchmarks/altup.md]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers as tf

from archfx.ir import capture
from archfx.ir.lower import compile_graph, ort_session, run_onnx, to_onnx
from archfx.passes import Pipeline


def gpt2_small(layers: int, width: int, heads: int, vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = tf.GPT2Config(
        n_layer=layers, n_embd=width, n_head=heads, vocab_size=vocab, n_positions=1024
    )
    return tf.GPT2LMHeadModel(config).eval()


def time_rounds(fns: dict, rounds: int, inner: int) -> dict[str, list[float]]:
    """Interleaved timing: every round runs every candidate `inner` times."""
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm up
    for _ in range(rounds):
        for k, fn in fns.items():
            t = time.perf_counter()
            for _ in range(inner):
                fn()
            times[k].append((time.perf_counter() - t) / inner)
    return times


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--pipelines",
        default="altup(k=2)",
        help="';'-separated pipelines to compare with the plain model",
    )
    ap.add_argument("--backends", default="eager,compiled,ort")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", help="append the markdown table to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    model = gpt2_small(args.layers, args.width, args.heads, args.vocab)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    plain = (
        Pipeline.parse("canonicalize")
        .run(capture(model, {"input_ids": ids, "use_cache": False}))
        .graph
    )
    graphs = {"plain": plain}
    for text in [t.strip() for t in args.pipelines.split(";") if t.strip()]:
        graphs[text] = Pipeline.parse(text + ",canonicalize").run(plain).graph
    backends = [b.strip() for b in args.backends.split(",")]
    rows = {}
    with torch.no_grad():
        if "eager" in backends:
            fns = {k: (lambda g=g: g.gm(ids)) for k, g in graphs.items()}
            rows["eager"] = time_rounds(fns, args.rounds, 1)
        if "compiled" in backends:
            compiled = {k: compile_graph(g).compiled for k, g in graphs.items()}
            fns = {k: (lambda c=c: c(ids)) for k, c in compiled.items()}
            rows["compiled"] = time_rounds(fns, args.rounds, 1)
        if "ort" in backends:
            tmp = Path(tempfile.mkdtemp())
            fns = {}
            for i, (k, g) in enumerate(graphs.items()):
                sess = ort_session(to_onnx(g, tmp / f"m{i}.onnx").path, threads=1)
                fns[k] = lambda s=sess, g=g: run_onnx(s, g.inputs)
            rows["ort"] = time_rounds(fns, args.rounds, 1)
    shape = f"GPT-2 shape {args.layers}×{args.width}, {args.heads} heads, vocab {args.vocab}, batch {args.batch}×{args.seq}, 1 thread"
    lines = [
        f"### {shape}",
        "",
        "| backend | " + " | ".join(f"`{k}`" for k in graphs) + " |",
        "|---|" + "---|" * len(graphs),
    ]
    result = {}
    for backend, times in rows.items():
        base = statistics.median(times["plain"])
        ratios = {k: statistics.median(v) / base for k, v in times.items()}
        result[backend] = {"plain_seconds": base, **ratios}
        cells = [
            f"{base * 1000:.0f} ms" if k == "plain" else f"{r:.3f}×" for k, r in ratios.items()
        ]
        lines.append(f"| {backend} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        with open(args.out, "a") as f:
            f.write(table + "\n")
    return result


if __name__ == "__main__":
    main()
