"""Generation speed with a key/value cache: SmolLM2-135M-Instruct, greedy, measured side by side.

Per batch size (1 and 8) and thread count (one, and every core), each the best of `--rounds`
interleaved runs of `--prompt` prompt tokens and `--new` new tokens (no early stop):

- transformers `generate` with its KV cache on the original model (the reference);
- archfx in PyTorch: the decode form (passes/engines/decode.py) of the canonicalized graph, and of
  `altup(k=2)` and `ddl(dv=1,value=compat)` applied to it;
- archfx compiled: the same three decode forms through torch.compile (`runtime="compile"`),
  compiled again for each thread count (Inductor fixes a kernel's threads when it compiles
  it) and warmed up on each batch size before the timed rounds;
- archfx in ONNX Runtime: the same three decode forms exported, the cache bound on ONNX
  Runtime's side (I/O binding).

Printed: end-to-end tokens/s (prefill + decode, all sequences) and decode time per token,
with the ratios the targets name — archfx torch / transformers ≥ 1.0, archfx ONNX /
transformers ≥ 1.5, a scheme's decode time per token / the canonicalized graph's in the same
runtime ≤ 1.10. transformers' decode time is its whole time less a one-token run's (its
prefill). The schemes' ratios come from a lockstep run (`lockstep`): the three decode forms
of a runtime generate one token each in turn, and each one's median step is compared. Then
the time of one decode step against the cached length it reads (`--lengths`, batch 1, every
core) for archfx torch and ONNX, interleaved: a linear fit (slope per 1k tokens, R²) and a
plot.

    python benchmarks/generate.py [--prompt 128] [--new 128] [--rounds 3]
                                  [--lengths 128,1024,...,8192] [--batches 1,8]
                                  [--out docs/results-generate]
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
from archfx.passes.io.generate import Session, generate
from archfx.passes.io.zoo import build

PIPELINES = {  # column name: pipeline (the schemes on the canonicalized graph)
    "": "canonicalize",
    " altup(k=2)": "canonicalize,altup(k=2)",
    " ddl(dv=1)": "canonicalize,ddl(dv=1,value=compat)",
}


BASES = ("archfx ONNX", "archfx compile")  # the canonicalized graph a row's ratio is against


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


def measure(
    model, sessions: dict, prompt: int, new: int, batch: int, rounds: int, threads: int
) -> dict:
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
    runs = {
        name: {"tokens_per_s": batch * new / total, "decode_ms_per_token": step * 1e3}
        for name, (total, step) in best.items()
    }
    for base in ("archfx torch", "archfx compile", "archfx ONNX"):
        group = {n: s for n, s in sessions.items() if n.startswith(base)}
        if base == "archfx ONNX":  # a spinning session's threads would take the next one's cores
            group = {n: s.with_threads(threads, spinning=False) for n, s in group.items()}
        for name, seconds in (lockstep(group, ids, new) if group else {}).items():
            runs[name]["lockstep_ms_per_token"] = seconds * 1e3
    return runs


def lockstep(sessions: dict, ids: torch.Tensor, new: int) -> dict[str, float]:
    """The median decode step (seconds) of sessions that generate after the same prompt one
    token each in turn, the order rotating, so that the machine's slow spells fall on all of
    them alike: the time per token the ratios to the canonicalized graph are taken from."""
    streams = {name: s.stream() for name, s in sessions.items()}
    tokens = {name: step(ids, torch.ones_like(ids)).argmax(-1) for name, step in streams.items()}
    times: dict[str, list[float]] = {name: [] for name in streams}
    order = list(streams)
    for _ in range(new - 1):
        order = order[1:] + order[:1]
        for name in order:
            t = tokens[name][:, None]
            t0 = time.perf_counter()
            logits = streams[name](t, torch.ones_like(t))
            times[name].append(time.perf_counter() - t0)
            tokens[name] = logits.argmax(-1)
    return {name: float(np.median(v)) for name, v in times.items()}


def per_step(sessions: dict, lengths: list[int], repeats: int = 9) -> dict:
    """One decode step's seconds (batch 1, the median of `repeats`) against the cached length
    it reads: each session's decode form called on a cache of that many slots (random keys
    and values: the time does not depend on them), the sessions' calls interleaved so that
    the machine's slow spells fall on all of them; a linear fit of time against length."""
    out = {name: {"lengths": lengths, "seconds": []} for name in sessions}
    for n in lengths:
        steps = {name: _one_step(s, n) for name, s in sessions.items()}
        times = {name: [] for name in sessions}
        for _ in range(repeats):
            for name, step in steps.items():
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
        for name in sessions:
            out[name]["seconds"].append(float(np.median(times[name])))
    for c in out.values():
        c["fit"] = linear_fit(c["lengths"], c["seconds"])
    return out


def _one_step(session: Session, n: int):
    """A callable running one decode step of `session` after a cache of `n` slots."""
    decoder = session.eager if session.ort is None else session.decoder
    names = decoder.inputs.names
    feed = [
        torch.tensor([[100]]),
        torch.ones(1, n + 1, dtype=torch.int64),
        torch.tensor([[n]]),
        *(torch.randn(1, *t.shape[1:-2], n, t.shape[-1]) for t in decoder.inputs.tensors[3:]),
    ]
    if session.ort is None:

        def run():
            with torch.no_grad():
                decoder(*feed)

        return run
    io = session.ort.io_binding()
    for name, value in zip(names, feed, strict=True):
        io.bind_cpu_input(name, value.numpy())
    for out in session.ort.get_outputs():
        io.bind_output(out.name, "cpu")
    return lambda: session.ort.run_with_iobinding(io)


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
    p.add_argument("--lengths", default="128,1024,2048,3072,4096,5120,6144,7168,8191")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--out", default="docs/results-generate")
    p.add_argument("--no-compile", action="store_true", help="leave out the compiled decode")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    model = build("smollm2").eval()
    graph = capture(model)
    with tempfile.TemporaryDirectory() as tmp:
        torch_sessions, onnx_sessions, rewritten_of = {}, {}, {}
        for suffix, text in PIPELINES.items():
            rewritten = rewritten_of[suffix] = Pipeline.parse(text).run(graph).graph
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
            compiled = {}
            if not args.no_compile:
                compiled = {
                    "archfx compile" + s: Session(g, "compile") for s, g in rewritten_of.items()
                }
            for batch in map(int, args.batches.split(",")):
                for name, session in compiled.items():  # compile for this batch size
                    t0 = time.perf_counter()
                    warm = torch.randint(100, 49000, (batch, args.prompt))
                    generate(session, warm.tolist(), max_new_tokens=3)
                    print(f"{name}: compiled in {time.perf_counter() - t0:.1f}s", flush=True)
                runs = measure(
                    model,
                    {**torch_sessions, **compiled, **ort},
                    args.prompt,
                    args.new,
                    batch,
                    args.rounds,
                    threads,
                )
                table.append({"threads": threads, "batch": batch, "runs": runs})
                _print_row(table[-1])
        torch.set_num_threads(cores)
        pair = {
            "archfx torch": torch_sessions["archfx torch"],
            "archfx ONNX": onnx_sessions["archfx ONNX"].with_threads(cores),
        }
        context = per_step(pair, [int(n) for n in args.lengths.split(",")])
        for name, c in context.items():
            f = c["fit"]
            print(
                f"{name}: step time {f['ms_at_start']:.1f} ms at {c['lengths'][0]} cached tokens, "
                f"+{f['ms_per_1k_tokens']:.2f} ms per 1k tokens of context (linear fit: R² "
                f"{f['r2']:.3f}); measured "
                + ", ".join(
                    f"{n}: {t * 1e3:.1f}" for n, t in zip(c["lengths"], c["seconds"], strict=True)
                )
            )
    _plot(context, out / "step_time.png")
    result = {
        "model": "SmolLM2-135M-Instruct (fp32)",
        "prompt": args.prompt,
        "new": args.new,
        "rounds": args.rounds,
        "torch": torch.__version__,
        "table": table,
        "context": context,
    }
    (out / "generate.json").write_text(json.dumps(result, indent=2))
    return result


def _print_row(row: dict) -> None:
    runs = row["runs"]
    ref = runs["transformers"]
    print(f"\nthreads {row['threads']}, batch {row['batch']}")
    print(
        f"{'':24} {'tokens/s':>9} {'× tf':>6} {'ms/token':>9} {'lockstep ms':>12} "
        f"{'× canonicalized':>16}"
    )
    for name, r in runs.items():
        base = runs[next((b for b in BASES if b in name), "archfx torch")]
        step = r.get("lockstep_ms_per_token")
        ratio = f"{step / base['lockstep_ms_per_token']:16.2f}" if step else ""
        print(
            f"{name:24} {r['tokens_per_s']:9.2f} {r['tokens_per_s'] / ref['tokens_per_s']:6.2f} "
            f"{r['decode_ms_per_token']:9.2f} {f'{step:12.2f}' if step else '':>12} {ratio}",
            flush=True,
        )


def _plot(context: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, c in context.items():
        x, y = np.asarray(c["lengths"]), np.asarray(c["seconds"]) * 1e3
        f = c["fit"]
        (dots,) = ax.plot(x, y, "o", ms=4, label=f"{name} (median of 9 steps)")
        ax.plot(
            x,
            f["ms_at_start"] + (x - x[0]) * f["ms_per_1k_tokens"] / 1e3,
            "-",
            color=dots.get_color(),
            label=f"{name}: linear fit, R² {f['r2']:.3f}",
        )
    ax.set_xlabel("cached tokens")
    ax.set_ylabel("decode step (ms)")
    ax.set_title("SmolLM2-135M: time per generated token against context (batch 1)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
