"""canonicalize: one form for every construct the other passes look at.

Rewrite:
  * runtime asserts torch.export leaves behind (`_assert_tensor_metadata`) are removed;
  * no-op casts (`to` the same dtype and device), eval-mode or p = 0 dropout and `alias`
    are replaced by their input;
  * GPT-2's Conv1D (`view → addmm(b, x, W) → view`) and `x @ W` with a parameter W become
    `aten.linear(x, Wᵀ, b)`, the parameter stored transposed (nn.Linear's (out, in) layout);
  * a `reshape` of a transposed or permuted tensor reads an explicit contiguous copy, the
    copy reshape makes anyway (`ir.layout.explicit_reshape_copies`);
  * dead nodes, unused get_attr nodes and the parameters no node reads are removed.

Exactness: every rewrite computes the same values (linear and addmm perform the same
products and sums); certified like every preserving pass.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import fx

from archfx.ir.layout import explicit_reshape_copies
from archfx.ir.ops import (
    MATMULS_2D,
    NOOP_CASTS,
    as_linear,
    aten,
    is_assert,
    is_call,
    is_dropout_identity,
)

from ..infra.base import Pass, PassResult, Remark, register


@register
class Canonicalize(Pass):
    name = "canonicalize"
    requires = frozenset()
    summary = "remove asserts, no-op casts and eval dropout; Conv1D/x@W → linear; dead code and unused parameters"

    def run(self, graph) -> PassResult:
        g = graph.gm.graph
        counts: Counter = Counter()
        remarks: list[Remark] = []
        for n in list(g.nodes):
            if is_assert(n) and not n.users:
                g.erase_node(n)
                counts["asserts"] += 1
        for n in list(g.nodes):
            if _is_noop(n):
                n.replace_all_uses_with(n.args[0])
                g.erase_node(n)
                counts["no-op casts and dropout"] += 1
        params = {n.target: graph.tensor(n.target) for n in g.nodes if n.op == "get_attr"}
        transposed: dict[str, str] = {}
        for n in list(g.nodes):
            lin = as_linear(n, params) if is_call(n, {aten.addmm.default, *MATMULS_2D}) else None
            if lin is None or not isinstance(lin.input, fx.Node):
                continue
            if lin.node.target == aten.addmm.default and not _restores_leading_shape(lin):
                remarks.append(
                    Remark(
                        n.name,
                        "addmm whose output is not reshaped back to its input's leading dims",
                    )
                )
                continue
            weight = lin.weight
            if lin.layout == "in_out":
                weight = transposed.get(lin.weight) or self._transpose(
                    graph, lin.weight, params, transposed
                )
            with g.inserting_before(n):
                w = g.get_attr(weight)
                b = g.get_attr(lin.bias) if lin.bias else None
                new = g.call_function(
                    aten.linear.default, (lin.input, w, b) if b is not None else (lin.input, w)
                )
            new.meta.update(
                {
                    k: v
                    for k, v in n.meta.items()
                    if k in ("nn_module_stack", "stack_trace", "source_fn_stack")
                }
            )
            lin.output.replace_all_uses_with(new)
            counts["linear"] += 1
        copies = explicit_reshape_copies(g)
        if copies:
            counts["explicit contiguous copies"] = copies
        g.eliminate_dead_code()
        for n in list(g.nodes):
            if n.op == "get_attr" and not n.users:
                g.erase_node(n)
        used = {n.target for n in g.nodes if n.op == "get_attr"}
        for name, _ in list(graph.gm.named_parameters(remove_duplicate=False)) + list(
            graph.gm.named_buffers(remove_duplicate=False)
        ):
            if name not in used:
                graph.delete_tensor(name)
                counts["unused tensors"] += 1
        graph.gm.delete_all_unused_submodules()
        graph.gm.recompile()
        return PassResult(changed=bool(counts), remarks=remarks, details=dict(counts))

    def _transpose(self, graph, target: str, params, transposed: dict) -> str:
        """Store W (in, out) as Wᵀ (out, in) under the same name, or a new one if W is read elsewhere."""
        readers = [
            u
            for n in graph.gm.graph.nodes
            if n.op == "get_attr" and n.target == target
            for u in n.users
        ]
        only_here = all(
            as_linear(u, params) is not None and as_linear(u, params).layout == "in_out"
            for u in readers
        )
        w = params[target]
        new = torch.nn.Parameter(w.detach().t().contiguous(), requires_grad=w.requires_grad)
        name = target if only_here else target + "_t"
        graph.set_tensor(name, new)
        transposed[target] = name
        return name


def _is_noop(n: fx.Node) -> bool:
    if is_dropout_identity(n):
        return True
    if not is_call(n, NOOP_CASTS) or not isinstance(n.args[0], fx.Node):
        return False
    a, b = n.args[0].meta.get("val"), n.meta.get("val")
    return (
        isinstance(a, torch.Tensor)
        and isinstance(b, torch.Tensor)
        and a.dtype == b.dtype
        and a.device == b.device
    )


def _restores_leading_shape(lin) -> bool:
    out = lin.output.meta.get("val")
    src = lin.input.meta.get("val")
    if out is None or src is None:
        return False
    return tuple(out.shape[:-1]) == tuple(src.shape[:-1])
