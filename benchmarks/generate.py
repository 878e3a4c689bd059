"""Generation speed with a key/value cache: SmolLM2-135M-Instruct, greedy, measured side by side.

Per batch size (1 and 8) and thread count (one, and every core), each the best of `--rounds`
interleaved runs of `--prompt` prompt tokens and `--new` new tokens (no early stop):

- transformers `generate` with its KV cache on the original model (the reference);
- archfx in PyTorch: the decode form (passes/decode.py) of the canonicalized graph, and of
  `altup(k=2)` and `ddl(dv=1,value=compat)` applied to it;
- archfx in ONNX Runtime: the same three decode forms exported, the cache bound on ONNX
  Runtime's side (I/O binding).

Printed: end-to-end tokens/s (prefill + decode, all sequences) and decode time per token,
with the ratios the targets name — archfx torch / transformers ≥ 1.0, archfx ONNX /
transformers ≥ 1.5, a scheme's decode time per token / the canonicalized graph's in the same
runtime ≤ 1.10. transformers' decode time is its whole time less a one-token run's (its
prefill). Then the time of each decode step against the context length (batch 1, every core,
up to `--context` tokens) for archfx torch and ONNX, their steps interleaved: a linear fit to
the median of every BIN steps (slope per 1k tokens, R²) and a plot.

    python benchmarks/generate.py [--prompt 128] [--new 128] [--rounds 3] [--context 1024]
                                  [--batches 1,8] [--out docs/results-generate]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from archfx.ir import capture
from archfx.passes import Pipeline
from archfx.passes.generate import Session, generate
from archfx.passes.zoo import build

PIPELINES = {  # column name: pipeline (the schemes on the canonicalized graph)
    "": "canonicalize",
    " altup(k=2)": "canonicalize,altup(k=2)",
    " ddl(dv=1)": "canonicalize,ddl(dv=1,value=compat)",
}


def _hf(model, ids: torch.Tensor, new: int) -> float:
    with torch.no_grad():
        t0 = time.perf_counter()
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )
        return time.perf_counter() - t0


def _ours(session: Session, ids: torch.Tensor, new: int) -> tuple[float, float]:
    """(end-to-end seconds, decode seconds per step)."""
    t0 = time.perf_counter()
    out = generate(session, ids.tolist(), max_new_tokens=new)
    total = time.perf_counter() - t0
    per_step = ids.shape[0] / out.decode_tokens_per_second
    return total, per_step


def measure(model, sessions: dict, prompt: int, new: int, batch: int, rounds: int) -> dict:
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(100, 49000, (batch, prompt), generator=gen)
    best: dict[str, list[float]] = {}
    for _ in range(rounds):
        whole, first = _hf(model, ids, new), _hf(model, ids, 1)
        hf = best.setdefault("transformers", [float("inf"), float("inf")])
        hf[0] = min(hf[0], whole)
        hf[1] = min(hf[1], max(whole - first, 1e-9) / (new - 1))
        for name, session in sessions.items():
            total, step = _ours(session, ids, new)
            row = best.setdefault(name, [float("inf"), float("inf")])
            row[0], row[1] = min(row[0], total), min(row[1], step)
    return {
        name: {"tokens_per_s": batch * new / total, "decode_ms_per_token": step * 1e3}
        for name, (total, step) in best.items()
    }


BIN = 32  # steps per point of the step-time fit (the median: robust to the machine's noise)


def per_step(sessions: dict, prompt: int, context: int) -> dict:
    """Each decode step's seconds against the context length it reads (batch 1), the
    sessions' steps interleaved so that the machine's slow spells fall on all of them; a
    linear fit to the median step time of every BIN steps."""
    ids = torch.randint(100, 49000, (1, prompt), generator=torch.Generator().manual_seed(0))
    streams = {name: s.stream() for name, s in sessions.items()}
    logits = {name: st(ids, torch.ones_like(ids)) for name, st in streams.items()}
    out = {name: {"lengths": [], "seconds": []} for name in sessions}
    for n in range(prompt, context):
        for name, st in streams.items():
            token = logits[name].argmax(-1, keepdim=True)
            t0 = time.perf_counter()
            logits[name] = st(token, torch.ones_like(token))
            out[name]["seconds"].append(time.perf_counter() - t0)
            out[name]["lengths"].append(n + 1)
    for c in out.values():
        x, y = np.asarray(c["lengths"]), np.asarray(c["seconds"])
        bins = range(0, len(x) - BIN + 1, BIN)
        c["bins"] = (
            [float(np.median(x[i : i + BIN])) for i in bins],
            [float(np.median(y[i : i + BIN])) for i in bins],
        )
        c["fit"] = linear_fit(*c["bins"])
    return out


def linear_fit(x: list, y: list) -> dict:
    a, b = np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)
    pred = a * np.asarray(x) + b
    ss = float(((np.asarray(y) - pred) ** 2).sum())
    tot = float(((np.asarray(y) - np.mean(y)) ** 2).sum()) or 1.0
    return {"ms_at_start": (a * x[0] + b) * 1e3, "ms_per_1k_tokens": a * 1e6, "r2": 1 - ss / tot}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--out", default="docs/results-generate")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    model = build("smollm2").eval()
    graph = capture(model)
    with tempfile.TemporaryDirectory() as tmp:
        torch_sessions, onnx_sessions = {}, {}
        for suffix, text in PIPELINES.items():
            rewritten = Pipeline.parse(text).run(graph).graph
            t0 = time.perf_counter()
            torch_sessions["archfx torch" + suffix] = Session(rewritten)
            t1 = time.perf_counter()
            onnx_sessions["archfx ONNX" + suffix] = Session(
                rewritten, "onnx", onnx=Path(tmp) / f"decoder{len(onnx_sessions)}.onnx"
            )
            print(
                f"{text}: decode form {t1 - t0:.1f}s, ONNX export {time.perf_counter() - t1:.1f}s",
                flush=True,
            )
        table = []
        for threads in sorted({1, cores}):
            torch.set_num_threads(threads)
            ort = {name: s.with_threads(threads) for name, s in onnx_sessions.items()}
            for batch in map(int, args.batches.split(",")):
                runs = measure(
                    model, {**torch_sessions, **ort}, args.prompt, args.new, batch, args.rounds
                )
                table.append({"threads": threads, "batch": batch, "runs": runs})
                _print_row(table[-1])
        torch.set_num_threads(cores)
        pair = {
            "archfx torch": torch_sessions["archfx torch"],
            "archfx ONNX": onnx_sessions["archfx ONNX"].with_threads(cores),
        }
        context = per_step(pair, args.prompt, args.context)
        for name, c in context.items():
            f = c["fit"]
            print(
                f"{name}: step time {f['ms_at_start']:.1f} ms at {c['lengths'][0]} tokens, "
                f"+{f['ms_per_1k_tokens']:.2f} ms per 1k tokens of context "
                f"(fit to the median of every {BIN} steps: R² {f['r2']:.3f})"
            )
    _plot(context, out / "step_time.png")
    result = {
        "model": "SmolLM2-135M-Instruct (fp32)",
        "prompt": args.prompt,
        "new": args.new,
        "rounds": args.rounds,
        "torch": torch.__version__,
        "table": table,
        "context": {k: {"fit": v["fit"], "bins": v["bins"]} for k, v in context.items()},
    }
    (out / "generate.json").write_text(json.dumps(result, indent=2))
    return result


def _print_row(row: dict) -> None:
    runs = row["runs"]
    ref = runs["transformers"]
    print(f"\nthreads {row['threads']}, batch {row['batch']}")
    print(f"{'':24} {'tokens/s':>9} {'× tf':>6} {'ms/token':>9} {'× canonicalized':>16}")
    for name, r in runs.items():
        base = runs["archfx ONNX" if "ONNX" in name else "archfx torch"]
        print(
            f"{name:24} {r['tokens_per_s']:9.2f} {r['tokens_per_s'] / ref['tokens_per_s']:6.2f} "
            f"{r['decode_ms_per_token']:9.2f} "
            f"{r['decode_ms_per_token'] / base['decode_ms_per_token']:16.2f}",
            flush=True,
        )


def _plot(context: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, c in context.items():
        x, y = np.asarray(c["lengths"]), np.asarray(c["seconds"]) * 1e3
        ax.plot(x, y, ".", ms=2, alpha=0.3, label=f"{name} (each step)")
        ax.plot(
            c["bins"][0],
            np.asarray(c["bins"][1]) * 1e3,
            "o",
            ms=4,
            label=f"{name}: median of {BIN}",
        )
        f = c["fit"]
        ax.plot(
            x,
            f["ms_at_start"] + (x - c["bins"][0][0]) * f["ms_per_1k_tokens"] / 1e3,
            "-",
            label=f"{name}: linear fit, R² {f['r2']:.2f}",
        )
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("decode step (ms)")
    ax.set_title("SmolLM2-135M: time per generated token against context (batch 1)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
