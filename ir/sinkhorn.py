"""Sinkhorn–Knopp normalisation as one graph op: mHC's doubly stochastic H_res (docs/passes.md).

    archfx::sinkhorn(Tensor logits, int iters) -> Tensor
        M = exp(logits) over the last two axes ([..., n, n]); then `iters` times, every row
        divided by its sum, then every column by its sum. The columns, normalised last, sum to
        1; the rows as closely as the iterations bring them.

One op rather than the 4·iters ATen calls it stands for, because of how those calls run:
each reduces over an axis of n (4) innermost, so eagerly every call is a tiny reduction per
token, and under torch.compile AOTAutograd recomputes the whole chain inside the backward,
which Inductor turns into loops over masked 4-of-8-lane vectors (docs/benchmarks.md). The
op's kernel moves the matrices to a tokens-last layout [n, n, tokens], where every row or
column sum adds n slabs of all the tokens, and does the same arithmetic in the same order as
the chain: the chain's result, within a rounding of the sums' order (tested against it). Its
backward, `archfx::sinkhorn_backward(grad, logits, iters)`, recomputes the iterations from the
logits (nothing else is saved: 2·iters intermediates per token would be) and takes each step
b = a / s (s = Σ a along the axis) back as ∂a = (∂b − Σ ∂b ⊙ b) / s, then
∂logits = ∂M ⊙ M. Under torch.compile both run as opaque kernels. A second derivative is
refused. The forward divides in place (it keeps nothing); the backward's recomputation keeps
every step, which its loop reads back.

`explicit_sinkhorn(graph)` rewrites each op into the chain (exp, then per iteration sum, div,
sum, div over the last two axes): the ONNX export uses it, so the ONNX model computes the same
H_res.
"""

from __future__ import annotations

import torch
from torch import fx

_LIB = torch.library.Library("archfx", "FRAGMENT")
_LIB.define("sinkhorn(Tensor logits, int iters) -> Tensor")
_LIB.define("sinkhorn_backward(Tensor grad, Tensor logits, int iters) -> Tensor")


def _tokens_last(x: torch.Tensor) -> torch.Tensor:
    """[..., n, n] → a new contiguous [n, n, tokens]."""
    n = x.shape[-1]
    out = x.new_empty(n, n, x.numel() // (n * n))
    out.copy_(x.reshape(-1, n, n).permute(1, 2, 0))
    return out


def _back(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[n, n, tokens] → like's shape, contiguous."""
    return a.permute(2, 0, 1).reshape(like.shape).contiguous()


def _steps(logits: torch.Tensor, iters: int):
    """exp(logits) tokens-last, and every normalisation: (axis, its sums, the result)."""
    m = _tokens_last(logits).exp_()
    steps, a = [], m
    for _ in range(iters):
        for axis in (1, 0):  # [i, j, t]: rows sum over j, then columns over i
            s = a.sum(axis, keepdim=True)
            a = a / s
            steps.append((axis, s, a))
    return m, steps


def _forward(logits: torch.Tensor, iters: int) -> torch.Tensor:
    a = _tokens_last(logits).exp_()
    for _ in range(iters):
        a.div_(a.sum(1, keepdim=True))
        a.div_(a.sum(0, keepdim=True))
    return _back(a, logits)


def _backward(grad: torch.Tensor, logits: torch.Tensor, iters: int) -> torch.Tensor:
    m, steps = _steps(logits, iters)
    g = _tokens_last(grad)
    for axis, s, b in reversed(steps):
        g = g.sub((g * b).sum(axis, keepdim=True)).div_(s)
    return _back(g.mul_(m), logits)


def _like(logits: torch.Tensor, *_) -> torch.Tensor:
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


_LIB.impl("sinkhorn", _forward, "CompositeExplicitAutograd")
_LIB.impl("sinkhorn_backward", _backward, "CompositeExplicitAutograd")
torch.library.register_fake("archfx::sinkhorn", _like, lib=_LIB)
torch.library.register_fake(
    "archfx::sinkhorn_backward", lambda grad, logits, iters: _like(logits), lib=_LIB
)


def _save(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])
    ctx.iters = inputs[1]


def _grad(ctx, grad):
    (logits,) = ctx.saved_tensors
    return SINKHORN_BACKWARD(grad, logits, ctx.iters), None


def _no_second_derivative(ctx, grad):
    raise RuntimeError("archfx::sinkhorn has no second derivative (its backward is one kernel)")


torch.library.register_autograd("archfx::sinkhorn", _grad, setup_context=_save, lib=_LIB)
torch.library.register_autograd(
    "archfx::sinkhorn_backward",
    _no_second_derivative,
    setup_context=lambda ctx, inputs, output: None,
    lib=_LIB,
)

SINKHORN = torch.ops.archfx.sinkhorn.default
SINKHORN_BACKWARD = torch.ops.archfx.sinkhorn_backward.default


def explicit_sinkhorn(graph: fx.Graph) -> bool:
    """Every `archfx::sinkhorn` node of `graph` rewritten into its ATen chain; whether any was."""
    aten = torch.ops.aten
    found = [n for n in graph.nodes if n.target is SINKHORN]
    for node in found:
        logits, iters = node.args
        with graph.inserting_before(node):
            a = graph.call_function(aten.exp.default, (logits,))
            for _ in range(iters):
                for axis in (-1, -2):
                    s = graph.call_function(aten.sum.dim_IntList, (a, [axis], True))
                    a = graph.call_function(aten.div.Tensor, (a, s))
        a.meta.update(node.meta)
        node.replace_all_uses_with(a)
        graph.erase_node(node)
    return bool(found)
