"""All of archfx's performance numbers in one run: a markdown table and plots into docs/.

    python benchmarks/run.py [--out docs/results-performance] [--quick]

1. The pipeline's own cost: capture + analyse + a pipeline of rewrites against torch.export
   alone (the same dynamic shapes), on 12-, 24- and 48-layer GPT-2-shaped models on the meta
   device (structure only), best of two.
2. Each rewrite's runtime overhead against the plain model (eager, torch.compile, ONNX
   Runtime): `rewrite_overhead.py` at the GPT-2-small shape.
3. Backends: eager PyTorch, torch.compile, ONNX Runtime on the plain dynamo export with its own
   full optimisation (what a user gets today), ONNX Runtime's transformer optimizer where it
   runs, and archfx's ONNX (fusion stage + ONNX Runtime), at the GPT-2-small shape and on
   SmolLM2-135M-Instruct (the packaged Q4_1 GGUF dequantised to fp32).

Threads pinned to one (PyTorch and ONNX Runtime); every ratio comes from interleaved rounds of
the same run (median). CUDA paths are used when a GPU is present. `--quick` shrinks every shape
so the whole script runs in about a minute (CI's smoke run).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import onnxruntime as ort
import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).parent))
import rewrite_overhead  # noqa: E402

from archfx.ir import capture  # noqa: E402
from archfx.ir.analyze import analyze  # noqa: E402
from archfx.ir.lower import compile_graph, device, ort_session, providers, run_onnx, to_onnx  # noqa: E402
from archfx.passes import Pipeline  # noqa: E402
from archfx.passes.io.zoo import build  # noqa: E402

COST_PIPELINE = "canonicalize,altup(k=2),expand-mlp(factor=2),canonicalize"
OVERHEAD_PIPELINES = "altup(k=2);ddl(dv=1);ddl(dv=4);sdnc"


def pipeline_cost(layers: list[int], width: int, heads: int, rounds: int) -> list[dict]:
    """Seconds of torch.export alone and of archfx's capture, analysis and pipeline: the best
    of `rounds` alternating runs, each after a garbage collection."""
    auto = torch.export.Dim.AUTO
    rows = []
    for n in [layers[0], *layers]:  # the first size twice: a warm-up
        with torch.device("meta"):
            model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=n, n_embd=width, n_head=heads)).eval()
        example = {
            "input_ids": torch.zeros(2, 16, dtype=torch.long, device="meta"),
            "use_cache": False,
        }
        export, ours = [], []
        for _ in range(rounds):
            gc.collect()
            t0 = time.perf_counter()
            torch.export.export(
                model,
                (),
                example,
                dynamic_shapes={"input_ids": {0: auto, 1: auto}, "use_cache": None},
                strict=False,
            )
            export.append(time.perf_counter() - t0)
            gc.collect()
            t0 = time.perf_counter()
            graph = capture(model, example)
            t1 = time.perf_counter()
            analyze(graph)
            t2 = time.perf_counter()
            Pipeline.parse(COST_PIPELINE).run(graph, verify=False)
            t3 = time.perf_counter()
            ours.append((t1 - t0, t2 - t1, t3 - t2))
        best = min(ours, key=sum)
        rows.append(
            {
                "layers": n,
                "export": min(export),
                "capture": best[0],
                "analyse": best[1],
                "pipeline": best[2],
            }
        )
    return rows[1:]


def _plain_session(path: Path, profile: bool = False):
    """ONNX Runtime as a user runs it: full optimisation, nothing disabled."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = 1, 1, 3
    so.enable_profiling = profile
    return ort.InferenceSession(str(path), so, providers=providers())


MATMUL_OPS = {"MatMul", "FusedMatMul", "Gemm"}


def _matmul_share(path: Path, feed) -> float:
    """The share of the plain model's kernel time spent in matrix products (ONNX Runtime's
    per-node profiler, the last two of three runs): what no fusion of the other ops removes."""
    session = _plain_session(path, profile=True)
    for _ in range(3):
        run_onnx(session, feed)
    profile = Path(session.end_profiling())
    events = json.loads(profile.read_text())
    profile.unlink()
    warm_up_end = min(e["ts"] + e["dur"] for e in events if e.get("name") == "model_run")
    kernels = [
        e
        for e in events
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] > warm_up_end
    ]
    matmul = sum(e["dur"] for e in kernels if e["args"]["op_name"] in MATMUL_OPS)
    return matmul / sum(e["dur"] for e in kernels)


def _ort_transformers(raw: Path, out: Path, heads: int, width: int):
    """ONNX Runtime's transformer optimizer on the plain export, or why it did not run."""
    from onnxruntime.transformers.optimizer import optimize_model

    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = optimize_model(str(raw), model_type="gpt2", num_heads=heads, hidden_size=width)
            opt.save_model_to_file(str(out))
        return _plain_session(out), None
    except Exception as exc:  # its optimizer raises many kinds; the reason goes into the table
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"


def backends(
    name: str, model: torch.nn.Module, ids: torch.Tensor, heads: int, width: int, rounds: int
) -> dict:
    """Median seconds per forward of each backend, interleaved, and archfx's fusion report."""
    dev = device()
    graph = (
        Pipeline.parse("canonicalize")
        .run(capture(model, {"input_ids": ids, "use_cache": False}))
        .graph
    )
    tmp = Path(tempfile.mkdtemp())
    plain = to_onnx(  # a failure is reported; the exporter's model kept: raw_path
        graph, tmp / "plain.onnx", fuse=False, strict=False, keep_intermediate=True
    )
    ours = to_onnx(graph, tmp / "archfx.onnx", strict=False)
    feed = graph.inputs
    fns = {}
    model = model.to(dev)
    ids_dev = ids.to(dev)
    with torch.no_grad():
        fns["eager (Hugging Face module)"] = lambda: model(ids_dev, use_cache=False)
        compiled = compile_graph(graph).compiled
        fns["torch.compile (inductor)"] = lambda: compiled(*feed.tensors)
    s_plain = _plain_session(plain.raw_path)
    fns["ORT, plain export (ORT_ENABLE_ALL)"] = lambda: run_onnx(s_plain, feed)
    s_tr, why = _ort_transformers(plain.raw_path, tmp / "ort_transformers.onnx", heads, width)
    if s_tr is not None:
        fns["ORT transformer optimizer"] = lambda: run_onnx(s_tr, feed)
    s_ours = ort_session(ours.path, threads=1)
    fns["archfx ONNX (fusions + ORT)"] = lambda: run_onnx(s_ours, feed)
    with torch.no_grad():
        times = rewrite_overhead.time_rounds(fns, rounds, 1)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "name": name,
        "seconds": med,
        "matmul_share": _matmul_share(plain.raw_path, feed),
        "ort_transformers_error": why,
        "fusions": ours.fusions.lines(),
        "checks": {"plain export": plain, "archfx ONNX": ours},
        "archfx_diff": ours.max_abs_diff,
    }


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds >= 0.1 else f"{seconds * 1000:.3g} ms"


def _bar(path: Path, results: list[dict]) -> None:
    from archfx.ir.draw import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        eager = r["seconds"]["eager (Hugging Face module)"]
        names = list(r["seconds"])
        ax.barh(names, [eager / r["seconds"][k] for k in names], color="tab:blue")
        ax.axvline(1.0, color="gray", lw=0.8)
        ax.set_xlabel("speed-up over eager PyTorch (higher is better)")
        ax.set_title(r["name"], fontsize=9)
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cost_plot(path: Path, rows: list[dict]) -> None:
    from archfx.ir.draw import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    xs = [r["layers"] for r in rows]
    ax.plot(xs, [r["export"] for r in rows], "o-", label="torch.export alone")
    ax.plot(
        xs,
        [r["capture"] + r["analyse"] + r["pipeline"] for r in rows],
        "o-",
        label="archfx: capture + analyse + pipeline",
    )
    ax.set_xlabel("layers (GPT-2 shape, meta device)")
    ax.set_ylabel("seconds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out", default="docs/results-performance", help="folder for results.md and the PNGs"
    )
    ap.add_argument(
        "--quick", action="store_true", help="tiny shapes: a smoke run of every section"
    )
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--sections",
        default="1,2,3",
        help="which sections to (re)run; the others keep their last results in --out",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    q = args.quick
    chosen = {int(x) for x in args.sections.split(",")}
    runs = {1: _cost_section, 2: _overhead_section, 3: _backends_section}
    result = {}
    for n in sorted(chosen):
        print(f"section {n}", flush=True)
        key, value, lines = runs[n](out, q, args.rounds)
        result[key] = value
        (out / f"section{n}.md").write_text("\n".join(lines) + "\n")
    header = [
        "# Performance results",
        "",
        "`python benchmarks/run.py` (each section can be rerun alone with `--sections N`); one "
        f"thread, {ort.get_device()} / {', '.join(providers())}, torch {torch.__version__}, "
        f"onnxruntime {ort.__version__}.",
        "",
    ]
    parts = [
        (out / f"section{n}.md").read_text() for n in runs if (out / f"section{n}.md").exists()
    ]
    text = "\n".join(header) + "\n".join(parts)
    (out / "results.md").write_text(text)
    print(text)
    return result


def _cost_section(out: Path, q: bool, rounds: int):
    w, h = (64, 4) if q else (768, 12)
    lines = [
        "## 1. The pipeline's own cost against torch.export",
        "",
        f"GPT-2 shape ({w} wide, {h} heads) on the meta device, dynamic batch and sequence; "
        f"pipeline `{COST_PIPELINE}` without numerical verification (no values on meta); best of "
        f"{rounds} rounds, torch.export and archfx alternating, each after a garbage collection.",
        "",
        "| layers | torch.export | capture | analyse | pipeline | archfx total / export |",
        "|---|---|---|---|---|---|",
    ]
    cost = pipeline_cost([2, 4, 8] if q else [12, 24, 48], w, h, rounds)
    for r in cost:
        total = r["capture"] + r["analyse"] + r["pipeline"]
        lines.append(
            f"| {r['layers']} | {r['export']:.2f} s | {r['capture']:.2f} s | {r['analyse']:.2f} s | "
            f"{r['pipeline']:.2f} s | {total / r['export']:.2f}× |"
        )
    totals = [r["capture"] + r["analyse"] + r["pipeline"] for r in cost]
    lines += [
        "",
        f"Largest / smallest model, archfx total: {totals[-1] / totals[0]:.2f} "
        f"({cost[-1]['layers'] // cost[0]['layers']}× the layers).",
        "",
        "![pipeline cost](pipeline_cost.png)",
        "",
    ]
    _cost_plot(out / "pipeline_cost.png", cost)
    return "cost", cost, lines


def _overhead_section(out: Path, q: bool, rounds: int):
    shape = (
        [
            "--layers",
            "2",
            "--width",
            "64",
            "--heads",
            "4",
            "--vocab",
            "256",
            "--batch",
            "2",
            "--seq",
            "16",
        ]
        if q
        else []
    )
    overhead = rewrite_overhead.main(
        ["--pipelines", OVERHEAD_PIPELINES, "--rounds", str(rounds), *shape]
    )
    names = [p.strip() for p in OVERHEAD_PIPELINES.split(";")]
    lines = [
        "## 2. Each rewrite's runtime overhead (latency / plain model's)",
        "",
        "GPT-2-small shape (12 × 768, vocabulary 50257), batch 8 × 128, random weights"
        if not q
        else "tiny shape (--quick)",
        "",
        "| backend | plain | " + " | ".join(f"`{n}`" for n in names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for backend, row in overhead.items():
        lines.append(
            f"| {backend} | {_ms(row['plain_seconds'])} | "
            + " | ".join(f"{row[n]:.3f}×" for n in names)
            + " |"
        )
    lines.append("")
    return "overhead", overhead, lines


def _backends_section(out: Path, q: bool, rounds: int):
    torch.manual_seed(0)
    if q:
        gpt2 = rewrite_overhead.gpt2_small(2, 64, 4, 256)
        ids = torch.randint(0, 256, (2, 16))
        models = [("GPT-2 shape 2 × 64 (--quick)", gpt2, ids, 4, 64)]
    else:
        reference = rewrite_overhead.gpt2_small(6, 384, 6, 50257)
        gpt2 = rewrite_overhead.gpt2_small(12, 768, 12, 50257)
        smol = build("smollm2")
        ids = torch.randint(0, 50257, (8, 128))
        models = [
            (
                "GPT-2 shape 6 × 384 (issue #7's reference model), batch 8 × 128",
                reference,
                ids,
                6,
                384,
            ),
            ("GPT-2-small shape, batch 8 × 128", gpt2, ids, 12, 768),
            (
                "SmolLM2-135M-Instruct (Q4_1 → fp32), batch 8 × 128",
                smol,
                torch.randint(0, smol.config.vocab_size, (8, 128)),
                9,
                576,
            ),
        ]
    results = []
    for name, model, ids, heads, width in models:
        print(f"   {name}", flush=True)
        results.append(backends(name, model, ids, heads, width, rounds))
    lines = ["## 3. Backends (seconds per forward; speed-up over eager)", ""]
    for r in results:
        eager = r["seconds"]["eager (Hugging Face module)"]
        plain = r["seconds"]["ORT, plain export (ORT_ENABLE_ALL)"]
        lines += [
            f"### {r['name']}",
            "",
            "| backend | time | vs eager | vs plain ORT |",
            "|---|---|---|---|",
        ]
        for k, v in r["seconds"].items():
            lines.append(f"| {k} | {_ms(v)} | {eager / v:.2f}× | {plain / v:.2f}× |")
        if r["ort_transformers_error"]:
            lines.append(
                f"| ORT transformer optimizer | fails: {r['ort_transformers_error']} | | |"
            )
        share = r["matmul_share"]
        lines += [
            "",
            f"Matrix products (MatMul, FusedMatMul, Gemm) take {share:.0%} of the plain model's "
            f"kernel time (ONNX Runtime's profiler): if every other op cost nothing, the model "
            f"would run at most {1 / share:.2f}× faster than plain ORT.",
            "",
            "Checks against PyTorch (example and second input shapes, per output: the export run "
            "in fp64 against the graph in fp64, relative; ONNX Runtime's fp32 run against fp64):",
            "",
        ]
        for k, c in r["checks"].items():
            fp64 = "" if c.fp64_error is None else f"; export in fp64 {c.fp64_error:.1e}"
            fp32 = max((o.onnx_error for o in c.outputs), default=0.0)
            lines.append(
                f"- {k}: max |Δ| {c.max_abs_diff:.1e}{fp64}; ONNX Runtime fp32 vs fp64 {fp32:.1e} "
                f"({'ok' if c.ok else 'FAILS: ' + c.failure})"
            )
        lines += [
            "",
            "Fusion report:",
            "",
            "```",
            *r["fusions"],
            "```",
            "",
        ]
    _bar(out / "backends.png", results)
    lines += ["![backends](backends.png)", ""]
    return "backends", results, lines


if __name__ == "__main__":
    main()
