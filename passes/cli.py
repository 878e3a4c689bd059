"""The `archfx` command line: `passes`, `inspect`, `apply` (the contract README.md states).

Human tables by default, one JSON object on stdout with --json; progress and the one-line
reason for any failure go to stderr; exit status is non-zero on any error or failed check.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from archfx.ir import ArchfxError, ModelSpecError, capture
from archfx.ir.verify import certify

from . import REGISTRY, Pipeline
from .engines.residual import schemes
from .infra.base import markdown_overview, markdown_reference
from .io.generate import RUNTIMES


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        sys.stderr.write(
            f"archfx: error: {message} (see `archfx {self.prog.split()[-1]} --help`)\n".replace(
                "archfx archfx", "archfx"
            )
        )
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="archfx", description="Capture, inspect and rewrite Transformer architectures."
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("passes", help="list the registered passes and their options")
    s.add_argument("--json", action="store_true")
    s.add_argument(
        "--markdown",
        action="store_true",
        help="print the overview table and every pass's options (the docs' generated tables)",
    )
    s.set_defaults(func=cmd_passes)

    def model_args(s):
        s.add_argument(
            "model",
            metavar="MODEL",
            help="checkpoint directory, built-in name, or package.module:callable",
        )
        s.add_argument(
            "--method",
            choices=("export", "fx"),
            default="export",
            help="capture method (default export)",
        )
        s.add_argument(
            "--trust-remote-code",
            action="store_true",
            help="allow a checkpoint's own model code to run",
        )
        s.add_argument("--json", action="store_true", help="print one JSON object")

    s = sub.add_parser("inspect", help="show the recognised structure of MODEL")
    model_args(s)
    s.add_argument(
        "--pipeline",
        metavar="TEXT",
        help="rewrite MODEL first (as apply does) and show the rewritten structure and its "
        "residual schemes",
    )
    s.add_argument("--draw", metavar="FILE", help="draw the block structure to FILE (.svg or .png)")
    s.add_argument(
        "--memory",
        metavar="FILE",
        help="rewrite with sdnc and draw every layer's read weightings on the example input to FILE",
    )
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("apply", help="run a pipeline of passes on MODEL")
    model_args(s)
    s.add_argument(
        "--pipeline",
        required=True,
        metavar="TEXT",
        help="e.g. 'canonicalize' or 'altup(k=2),canonicalize'",
    )
    s.add_argument(
        "--verify",
        action="store_true",
        help="certify every preserving pass and the whole pipeline numerically",
    )
    s.add_argument("--out", metavar="DIR", help="save the rewritten model (safetensors + recipe)")
    s.add_argument(
        "--save-pretrained",
        metavar="DIR",
        help="Hugging Face models: write a plain HF checkpoint (grown config + weights), checked to reload equal",
    )
    s.add_argument("--force", action="store_true", help="replace a non-empty --out directory")
    s.add_argument(
        "--onnx", metavar="FILE", help="export to ONNX, optimise for ONNX Runtime and check it"
    )
    s.add_argument(
        "--no-fuse",
        action="store_true",
        help="with --onnx: skip archfx's fusion into ONNX Runtime's operators (ir/fuse.py)",
    )
    s.add_argument(
        "--keep-intermediate",
        action="store_true",
        help="with --onnx: keep the exporter's and the fusion's models beside FILE "
        "(*.raw.onnx, *.fused.onnx); by default FILE alone is written, self-contained",
    )
    s.add_argument("--dump-ir", metavar="DIR", help="write the graph before and after every pass")
    s.set_defaults(func=cmd_apply)

    s = sub.add_parser(
        "generate", help="generate text with MODEL, as rewritten by a pipeline, with a KV cache"
    )
    model_args(s)
    source = s.add_mutually_exclusive_group()
    source.add_argument("--pipeline", metavar="TEXT", help="rewrite MODEL first (as apply does)")
    source.add_argument(
        "--from", dest="from_dir", metavar="DIR", help="the rewritten model `apply --out` saved"
    )
    prompt = s.add_mutually_exclusive_group(required=True)
    prompt.add_argument(
        "--prompt", nargs="+", metavar="TEXT", help="one or more prompts (one padded batch)"
    )
    prompt.add_argument(
        "--input-ids", metavar="IDS", help="token ids: comma-separated, ';' between sequences"
    )
    s.add_argument("--max-new-tokens", type=int, default=32, metavar="N")
    s.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="torch",
        help="torch (eager), compile (torch.compile of the decode form: compiles on the first "
        "calls) or onnx (ONNX Runtime)",
    )
    s.add_argument(
        "--onnx", metavar="FILE", help="with --runtime onnx: where to export the decoder"
    )
    s.add_argument("--temperature", type=float, metavar="T", help="sample (default: greedy)")
    s.add_argument("--top-k", type=int, metavar="K")
    s.add_argument("--top-p", type=float, metavar="P")
    s.add_argument("--seed", type=int, metavar="S")
    s.set_defaults(func=cmd_generate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    err = Console(stderr=True, highlight=False)
    try:
        return args.func(args, err)
    except ArchfxError as exc:
        if args.debug:
            raise
        _fail(str(exc))
        return 1
    except KeyboardInterrupt:
        _fail("interrupted")
        return 130
    except Exception as exc:  # a bug: still one line unless --debug
        if args.debug:
            raise
        _fail(
            f"internal error: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''} (rerun with --debug for the traceback)"
        )
        return 3


def _out() -> Console:
    """Stdout console; wide when not a terminal so piped tables keep whole paths."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def _fail(message: str) -> None:
    sys.stderr.write("archfx: error: " + " ".join(message.split()) + "\n")


@contextlib.contextmanager
def _step(err: Console, what: str):
    t0 = time.perf_counter()
    with err.status(what + " …"):
        yield
    err.print(f"[green]✓[/green] {what} ({time.perf_counter() - t0:.1f}s)")


def _load_and_capture(args, err: Console):
    from .io.models import load

    with _step(err, f"loading {args.model}"):
        loaded = load(args.model, trust_remote_code=args.trust_remote_code)
    with _step(err, f"capturing {type(loaded.model).__name__}"):
        graph = capture(loaded.model, loaded.example_inputs, method=args.method)
    return loaded, graph


def _memory(graph, picture: str, title: str, err: Console) -> dict:
    """sdnc, then each memory's shape and read weightings drawn to `picture`."""
    from archfx.ir.draw import draw_memory

    from .io.memory_inspect import memories

    with _step(err, "rewriting attention as memory reads (sdnc)"):
        result = Pipeline.parse("sdnc").run(graph)
    certificate = result.records[-1].certificate
    with _step(err, "reading the memories on the example input"):
        layers = memories(result.graph)
    with _step(err, f"drawing {picture}"):
        draw_memory(layers, picture, title=f"{title}: read weightings (sdnc)")
    err.print(
        f"memory picture: {picture} (sdnc certificate: max |Δ| {certificate.max_abs_diff:.2e})"
    )
    return {
        "picture": picture,
        "max_abs_diff": certificate.max_abs_diff,
        "layers": [
            {
                "block": m.path,
                "cross": m.cross,
                "banks": m.addresses.shape[-3],
                "slots": m.addresses.shape[-2],
                "read_heads": m.weightings.shape[-3],
            }
            for m in layers
        ],
    }


# passes ---------------------------------------------------------------------------------------


def cmd_passes(args, err: Console) -> int:
    entries = [cls.to_json() for cls in REGISTRY.values()]
    if args.json:
        print(json.dumps({"passes": entries}, indent=2))
        return 0
    if args.markdown:
        print(markdown_overview() + "\n\n" + markdown_reference())
        return 0
    table = Table(title="archfx passes")
    table.add_column("pass")
    table.add_column("exact")
    table.add_column("options")
    table.add_column("summary")
    for e in entries:
        opts = "\n".join(f"{o['name']}={o['default']}  {o['doc']}" for o in e["options"]) or "—"
        table.add_row(e["name"], REGISTRY[e["name"]].exact_when_text(), opts, e["summary"])
    _out().print(table)
    return 0


# inspect --------------------------------------------------------------------------------------


def cmd_inspect(args, err: Console) -> int:
    from archfx.ir.draw import check_path

    for picture in (args.draw, args.memory):
        if picture:
            check_path(picture)
    pipeline = Pipeline.parse(args.pipeline) if args.pipeline else None  # before loading
    loaded, graph = _load_and_capture(args, err)
    if pipeline is not None:
        with _step(err, f"rewriting with {pipeline}"):
            graph = pipeline.run(graph, verify=False).graph
    with _step(err, "analysing structure"):
        structure = graph.found_structure
    title = f"{args.model}: {type(loaded.model).__name__}"
    if args.draw:
        from archfx.ir.draw import draw

        with _step(err, f"drawing {args.draw}"):
            draw(structure, args.draw, title=title)
    data = {
        "model": args.model,
        "class": type(loaded.model).__name__,
        "parameters": graph.num_parameters(),
        "buffers": graph.num_buffers(),
        **structure.to_json(),
        "schemes": schemes(graph),
    }
    if args.memory:
        data["memory"] = _memory(graph, args.memory, title, err)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    out = _out()
    out.print(
        f"[bold]{args.model}[/bold]  {data['class']}  hidden {data['hidden_size']}  {data['parameters']:,} parameters"
        + (f" (+ {data['buffers']:,} in buffers)" if data["buffers"] else "")
    )
    out.print(
        "embeddings: " + ", ".join(f"{e['kind']} {e['num']}×{e['dim']}" for e in data["embeddings"])
    )
    table = Table()
    for col in ("block", "residual sites", "norm", "attention (heads/kv×dim)", "mlp"):
        table.add_column(col)
    for b in data["blocks"]:
        sites = " → ".join(f"{r['kind']}" for r in b["residuals"])
        norms = ", ".join(
            sorted(
                {
                    f"{r['placement']} {r['norm']['kind']}{' (1+w)' if r['norm']['gain'] == '1+w' else ''}"
                    if r["norm"]
                    else r["placement"]
                    for r in b["residuals"]
                }
            )
        )
        a = b["attention"]
        att = "—"
        if a:
            att = f"{a['heads']}/{a['kv_heads']}×{a['head_dim']}"
            flags = [
                f"rope {a['rotary_dim']}" if a["rope"] else "",
                "qk-norm" if a["qk_norm"] else "",
                "fused qkv" if a["fused_qkv"] else "",
                a["projection"] if a["projection"] != "linear" else "",
            ]
            att += " " + " ".join(f for f in flags if f)
        if b["cross_attention"]:
            att += " + cross"
        m = b["mlp"]
        mlp = f"{m['hidden']} {'gated ' if m['gated'] else ''}{m['activation'] or ''}" if m else "—"
        table.add_row(b["path"], sites, norms, att, mlp)
    out.print(table)
    for sc in data["schemes"]:
        out.print(
            f"residual scheme {sc['scheme']} ({sc['granularity']}s): {sc['units']} units, state "
            f"{'×'.join(map(str, sc['state']))}, {sc['parameters']:,} parameters"
        )
    for s in data["stacks"]:
        fn = s["final_norm"]
        out.print(
            f"stack {s['path']}: {s['blocks']} blocks, width {s['width']}, final norm {fn['kind'] if fn else 'none'}"
        )
    if data["head"]:
        out.print(
            f"head: {data['head']['out_features']} outputs{', tied to the token embedding' if data['head']['tied'] else ''}"
        )
    for r in data["remarks"]:
        out.print(f"[yellow]remark[/yellow]: {r}")
    for r in data["unrecognised"]:
        out.print(f"[red]unrecognised[/red]: {r}")
    if data["partial"]:
        out.print("[red]partial structure[/red]: passes refuse this model until the above is read")
    return 0


# apply ----------------------------------------------------------------------------------------


def cmd_apply(args, err: Console) -> int:
    pipeline = Pipeline.parse(args.pipeline)  # before loading: a typo fails fast
    if args.keep_intermediate and not args.onnx:
        raise ArchfxError("--keep-intermediate keeps the ONNX export's intermediates: give --onnx")
    if args.out and not args.force:
        out = Path(args.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ArchfxError(
                f"{out} exists and is not empty; choose another directory or pass --force"
            )
    loaded, graph = _load_and_capture(args, err)
    status = 0
    progress = err.status("running passes …")
    with progress:
        result = pipeline.run(
            graph,
            verify=args.verify,
            dump_dir=args.dump_ir,
            on_pass=lambda i, p: progress.update(f"pass {i + 1}/{len(pipeline)}: {p} …"),
        )
    for r in result.records:
        err.print(f"[green]✓[/green] {r.name} ({r.seconds:.2f}s)")
    data: dict = {
        "model": args.model,
        "pipeline": str(pipeline),
        "passes": [r.to_json() for r in result.records],
        "params": _params(graph, result.graph),
    }
    if args.verify:
        with _step(err, "verifying against the input model"):
            cert = _verify(graph, result, pipeline)
        data["verify"] = {**cert.to_json(), "expected_equal": result.preserves}
        if result.preserves and not cert.ok:
            _fail(f"verification failed: {cert.reason()}")
            status = 1
    if args.onnx:
        from archfx.ir.lower import to_onnx

        with _step(err, "building the decode form (causal language models)"):
            exported, form, why = _onnx_form(result.graph)
        with _step(err, f"exporting ONNX ({form}) to {args.onnx}"):
            onnx = to_onnx(
                exported,
                args.onnx,
                fuse=not args.no_fuse,
                strict=False,
                keep_intermediate=args.keep_intermediate,
            )
        data["onnx"] = {**onnx.to_json(), "form": form, "form_note": why}
        if not onnx.ok:
            _fail(f"ONNX check failed: {onnx.failure}")
            status = 1
    if args.out:
        from .io.artifact import save

        with _step(err, f"saving to {args.out}"):
            save(
                result.graph,
                args.out,
                source=loaded.source,
                pipeline=str(pipeline),
                model=loaded.model,
                force=args.force,
            )
        data["out"] = str(args.out)
    if args.save_pretrained:
        from .io.hf_export import save_pretrained
        from .io.models import tokenizer

        with _step(err, f"writing a Hugging Face checkpoint to {args.save_pretrained}"):
            tok = tokenizer(loaded, trust_remote_code=args.trust_remote_code)
            save_pretrained(
                result.graph,
                loaded.model,
                args.save_pretrained,
                force=args.force,
                tokenizer=False if tok is None else tok,
            )
        data["save_pretrained"] = str(args.save_pretrained)
        # the source model's tokenizer, saved beside the weights (None: the model has none)
        data["save_pretrained_tokenizer"] = None if tok is None else type(tok).__name__
    if args.json:
        print(json.dumps(data, indent=2))
        return status
    _print_apply(data)
    return status


def _onnx_form(graph):
    """What `--onnx` exports: a causal language model's decode form (the ecosystem's
    decoder-with-past: input_ids, attention_mask, position_ids, past_key_values.* → logits,
    present.*), any other model as it is, with the reason it has no decode form."""
    from archfx.ir import PassError

    from .engines.decode import decode_form

    try:
        return decode_form(graph), "decoder-with-past", None
    except PassError as exc:
        return graph, "whole-sequence", f"no decode form: {exc}"


def _params(before, after) -> dict:
    """Parameter counts (tied weights once, as `model.parameters()`), buffers apart."""
    return {
        "before": before.num_parameters(),
        "after": after.num_parameters(),
        "buffers": {"before": before.num_buffers(), "after": after.num_buffers()},
    }


def _verify(graph, result, pipeline):
    """The whole pipeline's certificate: the pipeline's own where it made one (every pass
    preserves), else the rewritten graph run against the input. A graph whose memory persists
    across calls (sdnc(persistent=true)) takes its memory as extra inputs and returns it as
    extra outputs: it is compared as its first call, with the memory empty."""
    from .engines.decode import first_call, is_decoder

    if result.certificate is not None:
        return result.certificate
    candidate, note = result.graph, None
    if is_decoder(candidate):
        candidate = first_call(candidate)
        note = (
            "persistent memory: compared as the first call (memory empty); the memory "
            "inputs and outputs are not compared"
        )
    widened = any(p.widens_outputs for p in pipeline.passes)
    cert = certify(graph, candidate, widened=widened)
    if note:
        cert.notes.append(note)
    return cert


def _print_apply(data: dict) -> None:
    out = _out()
    table = Table(title=f"{data['model']}: {data['pipeline']}")
    for col in ("pass", "changed", "nodes", "parameters", "seconds", "max |Δ|"):
        table.add_column(col)
    for p in data["passes"]:
        cert = p["certificate"]
        table.add_row(
            p["name"],
            "yes" if p["changed"] else "no",
            f"{p['nodes']['before']} → {p['nodes']['after']}",
            f"{p['params']['before']:,} → {p['params']['after']:,}",
            f"{p['seconds']:.2f}",
            f"{cert['max_abs_diff']:.2e}" if cert else ("—" if p["preserves"] else "changes"),
        )
    out.print(table)
    n, b = data["params"], data["params"]["buffers"]
    out.print(
        f"parameters: {n['before']:,} → {n['after']:,} (buffers apart: {b['before']:,} → {b['after']:,})"
    )
    for p in data["passes"]:
        for r in p["remarks"]:
            out.print(f"[yellow]remark[/yellow] {p['name']}: {r}")
    if "verify" in data:
        v = data["verify"]
        verdict = (
            "equal"
            if v["ok"]
            else (
                "differs (expected: the pipeline changes the function)"
                if not v["expected_equal"]
                else "DIFFERS"
            )
        )
        out.print(
            f"verify: in {v['precision']} max |Δ| = {v['math_diff']:.1e} of each output's scale "
            f"(allowed {v['tolerance']:g}); in the model's dtype max |Δ| = "
            f"{v['max_abs_diff']:.3e}; on {', '.join(v['inputs'])}: {verdict}"
        )
        for note in v["notes"]:
            out.print(f"  note: {note}")
    if "onnx" in data:
        o = data["onnx"]
        out.print(
            f"onnx: {o['path']} ({o['form']}) max |Δ| = {o['max_abs_diff']:.3e} "
            f"({', '.join(o['providers'])})"
        )
        if o["form_note"]:
            out.print(f"  note: {o['form_note']}")
        for c in o["outputs"]:  # relative to the output's scale, against PyTorch's fp64 run
            fp64 = "—" if c["fp64_error"] is None else f"{c['fp64_error']:.1e}"
            out.print(
                f"  {c['name']}: export in fp64 {fp64}, ONNX Runtime fp32 {c['onnx_error']:.1e} "
                f"(PyTorch fp32 {c['reference_error']:.1e})"
            )
        for note in o["notes"]:
            out.print(f"  note: {note}")
        for line in o["fusions"] or []:
            out.print(f"  {line}", markup=False)
        for f in o["files"]:  # the model first, self-contained (past 2 GB: with its .data)
            size = Path(f).stat().st_size if Path(f).exists() else 0
            out.print(f"  wrote {f} ({size / 1e6:,.1f} MB)", markup=False, soft_wrap=True)
    if "out" in data:
        out.print(f"saved: {data['out']}")
    if "save_pretrained" in data:
        tok = data["save_pretrained_tokenizer"]
        out.print(
            f"saved Hugging Face checkpoint: {data['save_pretrained']} "
            + (
                f"(with the source model's tokenizer, {tok})"
                if tok
                else "(no tokenizer: the source model has none)"
            ),
            markup=False,
            soft_wrap=True,
        )


# generate -------------------------------------------------------------------------------------


def cmd_generate(args, err: Console) -> int:
    from .io.generate import generate
    from .io.models import load, tokenizer

    prompts = _input_ids(args.input_ids) if args.input_ids else None
    pipeline = Pipeline.parse(args.pipeline) if args.pipeline else None
    with _step(err, f"loading {args.model}"):
        loaded = load(args.model, trust_remote_code=args.trust_remote_code)
        tok = tokenizer(loaded, trust_remote_code=args.trust_remote_code)
    if prompts is None:
        if tok is None:
            raise ModelSpecError(
                f"{args.model} has no tokenizer: give --input-ids instead of --prompt"
            )
        prompts = [tok(text).input_ids for text in args.prompt]
    if args.from_dir:
        from .io.artifact import load as load_saved

        with _step(err, f"loading the rewritten model from {args.from_dir}"):
            graph = load_saved(args.from_dir, trust_remote_code=args.trust_remote_code)
    else:
        with _step(err, f"capturing {type(loaded.model).__name__}"):
            graph = capture(loaded.model, loaded.example_inputs, method=args.method)
        if pipeline is not None:
            with _step(err, f"running {pipeline}"):
                graph = pipeline.run(graph).graph
    eos, pad = _special_tokens(loaded.model, tok)
    streaming = tok is not None and len(prompts) == 1 and not args.json
    out = _out()
    shown: list[int] = []
    printed = [""]

    def show(ids: list[int]) -> None:  # the text so far, printed as it grows
        shown.append(ids[0])
        text = tok.decode(shown, skip_special_tokens=True)
        out.print(text[len(printed[0]) :], end="", soft_wrap=True)
        printed[0] = text

    what = "generating" + {"onnx": " (ONNX Runtime)", "compile": " (torch.compile)"}.get(
        args.runtime, ""
    )
    with _step(err, what) if not streaming else contextlib.nullcontext():
        result = generate(
            graph,
            prompts,
            max_new_tokens=args.max_new_tokens,
            runtime=args.runtime,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            eos_token_id=eos,
            pad_token_id=pad,
            tokenizer=tok,
            onnx=args.onnx,
            on_tokens=show if streaming else None,
        )
    data = {"model": args.model, "pipeline": args.pipeline, **result.to_json()}
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    if streaming:
        out.print()
    else:
        for i, new in enumerate(result.new_tokens):
            text = result.text[i] if result.text else ",".join(map(str, new))
            out.print(f"[{i}] {text}", soft_wrap=True)
    err.print(
        f"{sum(map(len, result.new_tokens))} new tokens ({result.runtime}): prefill "
        f"{result.prefill_seconds:.2f}s, decode {result.decode_tokens_per_second:.1f} tokens/s"
    )
    return 0


def _input_ids(text: str) -> list[list[int]]:
    """`1,2,3;4,5` → [[1, 2, 3], [4, 5]]."""
    try:
        rows = [[int(t) for t in row.split(",") if t.strip()] for row in text.split(";")]
    except ValueError as exc:
        raise ModelSpecError(
            f"--input-ids {text!r}: comma-separated integers, ';' between sequences"
        ) from exc
    if not rows or any(not r or min(r) < 0 for r in rows):
        raise ModelSpecError(f"--input-ids {text!r}: every sequence needs non-negative ids")
    return rows


def _special_tokens(model, tok) -> tuple:
    """End-of-sequence ids and the padding id, as transformers' generate takes them: the
    model's generation config, then its config, then the tokenizer."""
    cfgs = [getattr(model, "generation_config", None), getattr(model, "config", None), tok]
    eos = next((c.eos_token_id for c in cfgs if getattr(c, "eos_token_id", None) is not None), None)
    pad = next((c.pad_token_id for c in cfgs if getattr(c, "pad_token_id", None) is not None), None)
    return eos, pad


if __name__ == "__main__":
    sys.exit(main())
