"""sdnc: every attention becomes the read heads of a stateless DNC over an explicit memory
(Tang & Xie 2026, arXiv 2603.19272), docs/passes.md.

Rewrite: each attention site writes its keys and values to a memory (`archfx::memory_write`:
addresses = keys, contents = values, one slot per position, write-once) and reads it with its
queries (`archfx::memory_read`: every query head a read head, content addressing with the
model's own similarity and strength; GQA heads share a bank; cross-attention reads the memory
the encoder wrote). Both ops are defined in `archfx.ir.memory`; the rewrite below is
passes/engines/attention_memory.py's (shared with the decode form), inspection passes/io/memory_inspect.py.
  - SDPA sites: SDPA(q, k, v, mask, p, causal, scale, gqa) → read(q, write(k, v), mask, p,
    causal, scale, gqa) with the same arguments.
  - Hand-written sites (q·kᵀ, then scaling, soft-capping c·tanh(x/c), additive biases and
    masks, softmax, ·v): the chain between the two matmuls is read as the read op's scale,
    softcap and mask (a reshape of the scores is undone for the masks); anything else in it
    (a second reshape, a bias added before the soft-cap, a finite masked_fill) is refused with
    the op named.
Options (the DNC's, each changing the function): `addressing=cosine` (unit-norm addresses and
queries, learned strength β ≥ 1), `write=delta` (a fast-weight memory per key head written by
the delta rule with erase), `persistent=true` (the memory is an input and an output, carried
across calls by `MemoryStream`).

Exactness: with the default options. SDPA sites run the same kernel with the same arguments
(bit-exact); hand-written sites compute the same function in SDPA's arithmetic (equal up to
rounding, verify ≤ 1e-5). The ops decompose to exactly the attention the model had, so
torch.compile and ONNX run the fused attention kernel as before.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from archfx.ir import PassError
from archfx.ir.memory import DELTA, READ
from archfx.ir.ops import SOFTMAX, aten, is_call, op_arg

from ..engines.attention_memory import (
    SDPA,
    _node,
    check_causal,
    from_sdpa,
    parse_attention,
)
from ..infra.base import Option, Pass, PassResult, register


@register
class SDNC(Pass):
    name = "sdnc"
    requires = frozenset({"structure", "softmax-attention"})
    invalidates = {"softmax-attention": "every attention is a memory read after sdnc"}
    summary = "attention as the read heads of a stateless DNC: explicit memory write and read ops"
    exact_when = {"addressing": ("dot",), "write": ("once",), "persistent": (False,)}
    options = (
        Option(
            "addressing",
            str,
            "dot",
            "dot (the model's own similarity) or cosine (the DNC's: unit-norm addresses and "
            "queries, a learned strength β = 1 + softplus(W x + b) ≥ 1 per head and token)",
            choices=("dot", "cosine"),
        ),
        Option(
            "write",
            str,
            "once",
            "once (one slot per position) or delta (a d_k × d_v fast-weight memory per key "
            "head written by the delta rule with erase, β = 2σ(W x + b), read after each write)",
            choices=("once", "delta"),
        ),
        Option(
            "beta0",
            float,
            1.0,
            "write=delta: initial β (0 < β0 < 2)",
            minimum=1e-6,
            maximum=2 - 1e-6,
        ),
        Option(
            "persistent",
            bool,
            False,
            "the memory persists across calls (inputs and outputs gain it): process a text "
            "segment by segment with `MemoryStream`",
        ),
    )

    def validate(self) -> None:
        if self.opts["write"] == "delta" and (
            self.opts["persistent"] or self.opts["addressing"] != "dot"
        ):
            raise PassError(
                "write=delta keeps its own normalised keys and fixed-size memory; "
                "it does not combine with addressing=cosine or persistent=true"
            )

    def run(self, graph) -> PassResult:
        sites = [
            (block, r.attention)
            for block in graph.structure.blocks
            for r in block.residuals
            if r.attention is not None and r.attention.core.target is not READ
        ]
        if not sites:
            raise PassError("no attention left to rewrite (none found, or already memory reads)")
        g = graph.gm.graph
        plans = []
        for block, a in sites:  # every site is checked before any is changed
            if a.core.target is SDPA:
                plans.append((a, None))
            elif is_call(a.core, SOFTMAX):
                plans.append((a, parse_attention(graph, a.core, block.path)))
            else:
                raise PassError(
                    f"{block.path}: attention kernel {a.core.target} has no memory-read form"
                )
        learned = {"addressing": "cosine", "write": "delta"}  # a strength, a write rate from x
        option = ",".join(f"{k}={v}" for k, v in learned.items() if self.opts[k] == v)
        orders = (
            [
                _per_token_input(a, a.core.args[0] if plan is None else plan.query, b.path, option)
                for (b, a), (_, plan) in zip(sites, plans, strict=True)
            ]
            if option
            else []
        )
        kinds = {"sdpa": 0, "hand-written": 0, "cross": 0}
        reads = []
        for a, plan in plans:
            with g.inserting_before(a.core if plan is None else plan.out):
                reads.append(from_sdpa(g, a.core) if plan is None else plan.emit(g))
            kinds["sdpa" if plan is None else "hand-written"] += 1
            kinds["cross"] += a.cross
        if self.opts["addressing"] == "cosine":
            for (block, a), read, order in zip(sites, reads, orders, strict=True):
                _cosine(graph, read, a, _owner(block, a), order)
        g.eliminate_dead_code()
        graph.gm.recompile()
        kinds["shared_banks"] = sum(op_arg(r, "enable_gqa") for r in reads)
        if self.opts["persistent"]:
            from ..engines.decode import persist  # the decode form builds on this pass's reads

            persist(graph, reads)
        if self.opts["write"] == "delta":
            check_causal(graph, reads, [block.path for block, _ in sites])
            for (block, a), read, order in zip(sites, reads, orders, strict=True):
                _delta(graph, read, a, _owner(block, a), order, self.opts["beta0"])
            g.eliminate_dead_code()
            graph.gm.recompile()
        return PassResult(changed=True, details={"sites": len(plans), **kinds})


def _owner(block, a) -> str:
    """Where a site's new parameters live: sdnc.<block>.r<attention kernel>."""
    return f"sdnc.{block.path.replace('.', '_')}.r{a.core.name}"


# cosine addressing -----------------------------------------------------------------------------


def _per_token_input(a, query: fx.Node, path: str, option: str) -> list[int]:
    """How a per-token map of the attention's input x, [*x's two leading axes, heads], is
    permuted into the query's [batch, heads, tokens]: x is (batch, tokens, features) or
    sequence-first (tokens, batch, features), on the query's batch and token axes."""
    x, q = a.q.input.meta["val"].shape, query.meta["val"].shape
    if len(q) == 4 and len(x) == 3:
        axes = (str(x[0]), str(x[1]))
        if axes == (str(q[0]), str(q[2])):
            return [0, 2, 1]
        if axes == (str(q[2]), str(q[0])):
            return [1, 2, 0]
    raise PassError(
        f"{path} needs (batch, heads, tokens, dim) queries computed from (batch, tokens, "
        f"features) or (tokens, batch, features) inputs for {option}, not {tuple(q)} from "
        f"{tuple(x)}"
    )


def _cosine(graph, read: fx.Node, a, owner: str, order: list[int]) -> None:
    """The DNC's content addressing: addresses and queries of unit norm, and a read strength
    β = 1 + softplus(W x + b) ≥ 1 per head and token from the attention's input x (W = 0,
    b = softplus⁻¹(√d_k − 1) at first, so β starts at √d_k); the read's own scale becomes 1."""
    g = graph.gm.graph
    q = read.args[0]
    heads, dk = q.meta["val"].shape[1], q.meta["val"].shape[-1]
    b0 = math.log(math.expm1(math.sqrt(dk) - 1)) if dk > 1 else -20.0
    logits = _per_head_logits(graph, read, a.q.input, f"{owner}.strength", heads, b0)
    _unit_addresses(g, read.args[1].args[0])
    with g.inserting_before(read):
        beta = _node(
            g, read, aten.add.Tensor, (_node(g, read, aten.softplus.default, (logits,)), 1)
        )
        beta = _node(
            g,
            read,
            aten.unsqueeze.default,
            (_node(g, read, aten.permute.default, (beta, order)), -1),
        )
        query = _node(g, read, aten.mul.Tensor, (_unit(g, read, q), beta))
    read.args = (query, *read.args[1:])
    read.kwargs = {**read.kwargs, "scale": 1.0}


def _per_head_logits(graph, read: fx.Node, x: fx.Node, name: str, heads: int, bias: float):
    """W x + b, [*x's leading axes, heads], from new parameters `name`_weight = 0 and
    `name`_bias = `bias`, inserted before `read`."""
    g = graph.gm.graph
    d, dtype = x.meta["val"].shape[-1], x.meta["val"].dtype
    params = []
    for suffix, value in (("weight", torch.zeros(heads, d)), ("bias", torch.full((heads,), bias))):
        target = f"{name}_{suffix}"
        graph.set_tensor(target, torch.nn.Parameter(value.to(dtype=dtype, device=graph.device)))
        with g.inserting_before(read):
            params.append(g.get_attr(target))
    with g.inserting_before(read):
        return _node(g, read, aten.linear.default, (x, *params))


def _unit_addresses(g: fx.Graph, memory: fx.Node) -> None:
    """The memory write stores its addresses with unit norm."""
    with g.inserting_before(memory):
        unit = _unit(g, memory, memory.args[0])
    memory.args = (unit, memory.args[1])


def _unit(g: fx.Graph, like: fx.Node, x: fx.Node) -> fx.Node:
    """x / ‖x‖ over the last axis (ε = 1e-6 under the square root)."""
    sq = _node(g, like, aten.sum.dim_IntList, (_node(g, like, aten.mul.Tensor, (x, x)), [-1], True))
    inv = _node(g, like, aten.rsqrt.default, (_node(g, like, aten.add.Tensor, (sq, 1e-6)),))
    return _node(g, like, aten.mul.Tensor, (x, inv))


# delta-rule write ------------------------------------------------------------------------------


def _delta(graph, read: fx.Node, a, owner: str, order: list[int], beta0: float) -> None:
    """read(q, write(k, v)) → memory_delta(q/‖q‖, k/‖k‖, v, β): the slots become a fast-weight
    memory written by the delta rule (`archfx.ir.memory`, DDL's update over
    tokens instead of layers), β = 2σ(W x + b) per key head and token (W = 0,
    b = logit(β0/2))."""
    g = graph.gm.graph
    # the values written: existing nodes (a hand-written site's keys may be a new transpose)
    banks = read.args[1].args[0].args[1].meta["val"].shape[1]
    logits = _per_head_logits(
        graph, read, a.q.input, f"{owner}.write", banks, math.log(beta0 / (2 - beta0))
    )
    _unit_addresses(g, read.args[1].args[0])
    with g.inserting_before(read):
        beta = _node(g, read, aten.mul.Tensor, (_node(g, read, aten.sigmoid.default, (logits,)), 2))
        beta = _node(g, read, aten.permute.default, (beta, order))
        q = _unit(g, read, read.args[0])
        delta = _node(g, read, DELTA, (q, read.args[1], read.args[2], beta))
    read.replace_all_uses_with(delta)
    g.erase_node(read)
