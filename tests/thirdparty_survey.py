"""Survey what archfx does on the third-party zoo (tests/thirdparty.py).

    python tests/thirdparty_survey.py [NAME ...] [--timeout S] [--out FILE.md] [--json FILE]

For each model: build it, capture it (`archfx.ir.capture`), check the graph against the model
on the example inputs (and on a second shape for token-id models), analyse it, print the
recognised structure next to the truth the model's own config gives, then run every
registered pass alone with verify and print its outcome: ok (the certificate's fp64 math
difference and how many sites it rewrote out of those the structure has), refused (the
message) or failed (an exception, the shape check or the certificate). Each model runs in its
own process under a time limit (default 120 s) so one hang or crash does not stop the survey.

Structure classes: ok; "silently wrong structure" (something differs from the truth and the
structure carries no remark or unrecognised construct); "wrong structure (flagged)" (differs,
with remarks or unrecognised constructs); "refused" (an archfx error with its message);
"failed" (any other exception).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEP_SECONDS = 40


# -- the child: one model, one JSON object per line on stdout ------------------------------------


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout(f"step ran past {STEP_SECONDS} s")


def _emit(**event) -> None:
    print("@@" + json.dumps(event, default=str), flush=True)


def _error(exc: BaseException) -> dict:
    from archfx.ir.errors import ArchfxError, PassFailure, VerificationError

    # a pass's unexpected exception is a PassFailure: a bug, not a refusal
    crashed = isinstance(exc, PassFailure) or not isinstance(exc, ArchfxError)
    cause = exc.__cause__
    refused = not crashed and not isinstance(exc, VerificationError)
    kind = "refused" if refused else "failed"
    msg = f"{type(exc).__name__}: {exc}"
    if crashed and cause is not None:
        msg += f" [cause {type(cause).__name__}: {cause}]"
    out = {"outcome": kind, "message": msg.replace("\n", " ")[:600]}
    if kind == "failed" and not isinstance(exc, ArchfxError):
        out["where"] = "".join(traceback.format_tb(exc.__traceback__)[-2:])[-600:]
    return out


def _leaves(out) -> list:
    import torch
    from torch.utils import _pytree as pytree

    if hasattr(out, "logits"):
        out = out.logits
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _diff(got: list, want: list) -> str:
    """max |got − want| / max |want| over the outputs."""
    import torch

    if len(got) != len(want):
        return f"{len(got)} outputs for {len(want)}"
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        if g.shape != w.shape:
            return f"output shape {tuple(g.shape)} != {tuple(w.shape)}"
        if w.is_floating_point():
            scale = max(float(w.abs().max()), 1e-30)
            worst = max(worst, float((g - w).abs().max()) / scale)
        elif not torch.equal(g, w):
            return "integer output differs"
    return f"{worst:.1e}"


def _compare(reference, graph, args, kwargs) -> str:
    """The graph against `reference` (a separately built copy of the model that capture never
    saw) on these inputs."""
    import torch
    from torch.utils import _pytree as pytree

    with torch.no_grad():
        try:
            want = _leaves(reference(*args, **kwargs))
        except Exception as exc:  # the model itself rejects these inputs
            return f"n/a (the model itself fails: {type(exc).__name__}: {str(exc)[:120]})"
        flat = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        got = [t for t in graph(*flat) if isinstance(t, torch.Tensor)]
    return _diff(got, want)


def _intact(model, reference, args, kwargs) -> str:
    """The captured model run eagerly after capture against the reference: capture promises
    never to mutate the model."""
    import torch

    with torch.no_grad():
        return _diff(_leaves(model(*args, **kwargs)), _leaves(reference(*args, **kwargs)))


def _coverage(text: str, details: dict, found: dict | None, block_paths: list[str]) -> str:
    """Sites the pass rewrote / sites the structure has."""
    sites = (found or {}).get("sites", {})
    name = text.split("(")[0]

    def touched() -> int:
        tensors = details.get("tensors", [])
        return sum(
            1
            for p in block_paths
            if any(t.startswith(q + ".") for q in _prefixes(p) for t in tensors)
        )

    if name == "altup":
        return f"{details.get('layers')}/{sites.get('blocks')} layers"
    if name in ("ddl", "hc", "mhc", "resi-dual"):
        return f"{details.get('sites')}/{sites.get('residual')} residual sites"
    if name == "sdnc":
        return f"{details.get('sites')}/{sites.get('attention')} attention sites"
    if name == "expand-mlp":
        return f"{touched()}/{sites.get('mlp')} mlp blocks"
    if name in ("add-heads", "expand-head-dim", "expand-qk"):
        return f"{touched()}/{sites.get('blocks')} blocks"
    if name == "expand-hidden":
        return f"{len(details.get('tensors', []))} tensors"
    if name == "add-layers":
        return f"inserted {details.get('inserted')}"
    return ",".join(f"{k}={v}" for k, v in details.items() if isinstance(v, int))


def _prefixes(path: str) -> list[str]:
    """Module paths of a block path; a merged block `a.layers.0-1` is `a.layers.0`, `a.layers.1`."""
    head, _, last = path.rpartition(".")
    lo, dash, hi = last.partition("-")
    if dash and lo.isdigit() and hi.isdigit():
        return [f"{head}.{i}" if head else str(i) for i in range(int(lo), int(hi) + 1)]
    return [path]


def child(name: str) -> None:
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    from archfx.ir import capture
    from archfx.passes import Pipeline
    from tests.thirdparty import MISSING, THIRDPARTY, mismatches, pass_texts, recognised

    signal.signal(signal.SIGALRM, _alarm)
    entry = THIRDPARTY[name]
    if name in MISSING:
        _emit(step="skip", reason=MISSING[name])
        return

    def step(label, fn):
        signal.alarm(STEP_SECONDS)
        t0 = time.perf_counter()
        try:
            return fn(), None
        except BaseException as exc:  # reported, the survey goes on
            if isinstance(exc, KeyboardInterrupt):
                raise
            return None, _error(exc)
        finally:
            signal.alarm(0)
            _emit(step="time", label=label, seconds=round(time.perf_counter() - t0, 2))

    built, err = step("build", entry.build)
    if err:
        _emit(step="build", **err)
        return
    _emit(step="build", outcome="ok")
    model, example = built
    truth = entry.truth(model)
    _emit(step="truth", truth=truth, library=entry.library, constructs=entry.constructs)
    graph, err = step("capture", lambda: capture(model, example))
    if err:
        _emit(step="capture", **err)
        return
    args, kwargs = (example, {}) if isinstance(example, tuple) else ((), example)
    reference = entry.build()[0]  # never captured, never called before the graph is
    fidelity, err = step("fidelity", lambda: _compare(reference, graph, args, kwargs))
    intact, err3 = step("intact", lambda: _intact(model, reference, args, kwargs))
    intact = intact or err3["message"]
    second = None
    if isinstance(example, tuple) and len(example) == 1 and not example[0].is_floating_point():
        ids = example[0]
        other = torch.randint(
            int(ids.min()),
            int(ids.max()) + 1,
            (3, ids.shape[1] - 2),
            generator=torch.Generator().manual_seed(5),
        )
        if ids[:, -1].eq(ids[0, -1]).all():  # an end token at the end (CLIP): keep it
            other[:, -1] = ids[0, -1]
        second, err2 = step("fidelity2", lambda: _compare(reference, graph, (other,), {}))
        second = second or err2["message"]
    _emit(
        step="capture",
        outcome="ok",
        fidelity=fidelity or err["message"],
        second=second,
        intact=intact,
    )

    def analysed():
        return graph.found_structure

    structure, err = step("analyze", analysed)
    found = None
    if err:
        _emit(step="analyze", **err)
    else:
        js = structure.to_json()
        found = recognised(js)
        _emit(
            step="analyze",
            outcome="ok",
            found=found,
            remarks=js["remarks"],
            unrecognised=js["unrecognised"],
            mismatches=mismatches(truth, found),
            paths=[b["path"] for b in js["blocks"]],
        )
    paths = [b.path for b in structure.blocks] if structure is not None else []
    for text in pass_texts(truth, found):

        def run(text=text):
            return Pipeline.parse(text).run(graph)

        result, err = step(text, run)
        if err:
            _emit(step="pass", text=text, **err)
            continue
        rec = result.records[0]
        cert = rec.certificate
        _emit(
            step="pass",
            text=text,
            outcome="ok" if cert is None or cert.ok else "failed",
            changed=rec.changed,
            math_diff=None if cert is None else cert.math_diff,
            precision=None if cert is None else cert.precision,
            coverage=_coverage(text, rec.details, found, paths),
            remarks=[str(r) for r in rec.remarks][:4],
        )


# -- the parent: run each model, collect, print and write the table -----------------------------


def survey(name: str, timeout: float) -> dict:
    env = dict(os.environ)
    env.setdefault("ARCHFX_CACHE", "/tmp/archfx-survey-cache")
    env["OMP_NUM_THREADS"] = "1"
    report: dict = {"name": name, "events": []}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", name],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=ROOT,
        )
        stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        stderr, rc = f"timed out after {timeout:.0f} s", "timeout"
    report["seconds"] = round(time.perf_counter() - t0, 1)
    for line in stdout.splitlines():
        if line.startswith("@@"):
            report["events"].append(json.loads(line[2:]))
    report["rc"] = rc
    if rc != 0:
        report["stderr"] = stderr.strip().splitlines()[-3:] if stderr else []
    return report


def _classify(report: dict) -> tuple[str, str]:
    ev = {e["step"]: e for e in report["events"] if e["step"] != "pass"}
    if "skip" in ev:
        return "skipped", ev["skip"]["reason"]
    for key in ("build", "capture", "analyze"):
        e = ev.get(key)
        if e is None:
            return "failed", f"no {key} result ({report.get('rc')}: {report.get('stderr')})"
        if e["outcome"] != "ok":
            return e["outcome"], f"{key}: {e['message']}"
    bad = _far(ev["capture"].get("fidelity"))
    if bad:
        return "failed", f"the graph differs from the model by {bad} of its scale"
    a = ev["analyze"]
    if a["unrecognised"]:
        return "refused", "partial structure: " + "; ".join(a["unrecognised"])
    wrong = a["mismatches"]
    if wrong:
        silent = [m for m in wrong if not _flagged(m, a["remarks"])]
        label = "silently wrong structure" if silent else "wrong structure (flagged)"
        return label, "; ".join(wrong)
    return "ok", ""


def _far(value) -> str | None:
    """`value` when it is a relative difference above 1e-4 (or not a number at all)."""
    if value is None or str(value).startswith("n/a"):
        return None
    try:
        return None if float(value) <= 1e-4 else str(value)
    except ValueError:
        return str(value)


# words a remark about a mismatched field would use
FLAG_WORDS = {
    "blocks": ("block", "layer", "stack"),
    "hidden_size": ("width", "hidden", "stage"),
    "norm": ("norm",),
    "unit_offset": ("norm", "gain", "offset"),
    "placement": ("norm", "placement"),
    "rope": ("rot", "rope", "position"),
    "tied_head": ("head", "tied", "tie"),
    "shared_weights": ("share",),
    "cross_attention": ("cross",),
}


def _flagged(mismatch: str, remarks: list[str]) -> bool:
    """Whether some remark of the analysis is about the field of `mismatch`."""
    key = mismatch.split(":")[0]
    if key in ("heads", "kv_heads", "head_dim", "kernel", "fused_qkv"):
        words = ("attention", "head", "kernel")
    elif key == "norm gain":
        words = ("gain",)
    elif key in ("mlp_hidden", "gated", "activation", "moe"):
        words = ("mlp", "expert", "feed", "activation")
    else:
        words = FLAG_WORDS.get(key, (key,))
    return any(w in r.lower() for r in remarks for w in words)


def _short(value) -> str:
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return "-" if value is None else str(value)


def _line(d: dict) -> str:
    return (
        f"blocks {_short(d.get('blocks'))} d={_short(d.get('hidden_size'))} "
        f"h={_short(d.get('heads'))}/kv={_short(d.get('kv_heads'))}/hd={_short(d.get('head_dim'))}"
        f" mlp={_short(d.get('mlp_hidden'))}{' gated' if d.get('gated') else ''} "
        f"{_short(d.get('activation'))} {_short(d.get('norm'))}"
        f"{'(1+w)' if d.get('unit_offset') else ''}"
        f"{'(no gain)' if d.get('norm') and 'norm_gain' in d and not d['norm_gain'] else ''} "
        f"{_short(d.get('placement'))} "
        f"{_short(d.get('attention_kernel') or d.get('kernel'))}"
        f"{' rope' if d.get('rope') else ''}{' cross' if d.get('cross_attention') else ''}"
        f"{' shared' if d.get('shared_weights') else ''}{' tied' if d.get('tied_head') else ''}"
        f"{' moe=' + str(d.get('moe')) if d.get('moe') else ''}"
    )


def _pass_cell(e: dict) -> str:
    if e["outcome"] == "ok":
        diff = e.get("math_diff")
        diff = "-" if diff is None else f"{diff:.0e}"
        if e.get("precision") not in (None, "float64"):
            diff += f" (in {e['precision']})"
        return f"ok {diff} {e.get('coverage', '')}".strip()
    msg = e["message"]
    if "the structure is partial" in msg:
        msg = msg.split(":")[0] + ": the structure is partial (as above)"
    return f"{e['outcome'].upper()}: {msg[:400]}"


def _environment() -> str:
    """The library versions and the archfx commit the survey ran against."""
    from importlib import metadata

    sys.path.insert(0, str(ROOT))
    from tests.thirdparty import THIRDPARTY

    versions = []
    for lib in sorted({e.library for e in THIRDPARTY.values()}):
        try:
            versions.append(f"{lib} {metadata.version(lib)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{lib} (not installed)")
    try:
        head = subprocess.run(
            ["git", "log", "-1", "--format=%h"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        ).stdout.strip()
    except OSError:
        head, dirty = "?", ""
    state = f"archfx {head}" + (" with uncommitted changes" if dirty else "")
    return f"{state}; " + ", ".join(versions)


def render(reports: list[dict]) -> str:
    lines = ["# archfx on the third-party zoo", ""]
    counts: dict[str, int] = {}
    pass_counts: dict[str, dict[str, int]] = {}
    rows = []
    for r in reports:
        cls, why = _classify(r)
        counts[cls] = counts.get(cls, 0) + 1
        ev = {e["step"]: e for e in r["events"] if e["step"] not in ("pass", "time")}
        truth = ev.get("truth", {}).get("truth", {})
        found = ev.get("analyze", {}).get("found", {})
        cap = ev.get("capture", {})
        passes = [e for e in r["events"] if e["step"] == "pass"]
        for e in passes:
            name = e["text"].split("(")[0]
            pass_counts.setdefault(name, {}).setdefault(e["outcome"], 0)
            pass_counts[name][e["outcome"]] += 1
        rows.append((r, cls, why, truth, found, cap, passes, ev))
    lines.append(next((r["environment"] for r in reports if r.get("environment")), ""))
    lines.append("")
    lines.append("Structure: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    lines.append("")
    lines.append("| pass | " + " | ".join(["ok", "refused", "failed"]) + " |")
    lines.append("|---|---|---|---|")
    for name, c in pass_counts.items():
        lines.append(
            f"| {name} | {c.get('ok', 0)} | {c.get('refused', 0)} | {c.get('failed', 0)} |"
        )
    lines.append("")
    lines.append("| model | library | structure | truth | recognised | model after capture |")
    lines.append("|---|---|---|---|---|---|")
    for r, cls, why, truth, found, cap, *_ in rows:
        lib = next((e.get("library") for e in r["events"] if e["step"] == "truth"), "")
        cell = cls + (f": {why}" if why else "")
        mutated = _far(cap.get("intact"))
        after = f"MUTATED: differs by {mutated}" if mutated else "intact"
        after = after if cap.get("outcome") == "ok" else "-"
        lines.append(
            f"| {r['name']} | {lib} | {cell.replace('|', '/')} | {_line(truth)} | "
            f"{_line(found) if found else '-'} | {after} |"
        )
    lines.append("")
    for r, cls, why, truth, found, cap, passes, ev in rows:
        lines.append(f"## {r['name']} ({r['seconds']} s)")
        lines.append("")
        constructs = ev.get("truth", {}).get("constructs")
        if constructs:
            lines.append(f"- constructs: {constructs}")
        if truth.get("notes"):
            lines.append(f"- notes: {truth['notes']}")
        lines.append(f"- truth: {_line(truth)}")
        if found:
            lines.append(f"- found: {_line(found)}; residual kinds {found['residual_kinds']}")
            a = ev["analyze"]
            lines.append(f"- block paths: {a.get('paths')}")
            if a["remarks"]:
                lines.append(f"- remarks: {a['remarks']}")
            if a["unrecognised"]:
                lines.append(f"- unrecognised: {a['unrecognised']}")
        if cap.get("outcome") == "ok":
            lines.append(
                f"- graph vs a fresh copy of the model: example {cap.get('fidelity')}, "
                f"second shape {cap.get('second')}; the captured model run after "
                f"capture vs the fresh copy: {cap.get('intact')}"
            )
        lines.append(f"- structure: **{cls}**" + (f" — {why}" if why else ""))
        for e in passes:
            lines.append(f"- `{e['text']}`: {_pass_cell(e)}")
            if e.get("remarks"):
                lines.append(f"  - remarks: {e['remarks']}")
        if r.get("rc") not in (0, None):
            lines.append(f"- process: rc {r['rc']} {r.get('stderr')}")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per model")
    p.add_argument("--out", default="/tmp/survey.md")
    p.add_argument("--json", default="/tmp/survey.json")
    p.add_argument("--render", metavar="JSON", help="only write --out from a saved --json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.render:
        Path(a.out).write_text(render(json.loads(Path(a.render).read_text())))
        print(f"wrote {a.out}")
        return 0
    if a.child:
        child(a.child)
        return 0
    sys.path.insert(0, str(ROOT))
    from tests.thirdparty import THIRDPARTY

    names = a.names or list(THIRDPARTY)
    unknown = [n for n in names if n not in THIRDPARTY]
    if unknown:
        p.error(f"unknown models {unknown}; known: {', '.join(THIRDPARTY)}")
    reports, environment = [], _environment()
    for name in names:
        r = survey(name, a.timeout)
        r["environment"] = environment
        reports.append(r)
        cls, why = _classify(r)
        print(f"{name:20s} {r['seconds']:6.1f}s {cls}{': ' + why if why else ''}", flush=True)
        for e in r["events"]:
            if e["step"] == "pass":
                print(f"    {e['text']:28s} {_pass_cell(e)[:220]}", flush=True)
        Path(a.json).write_text(json.dumps(reports, indent=1, default=str))
        Path(a.out).write_text(render(reports))
    print(f"wrote {a.out} and {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
