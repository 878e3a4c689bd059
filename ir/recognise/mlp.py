"""Recognises MLPs (up, optional gate, activation, down) and mixtures of experts.

A mixin of the structure analysis (`ir/analyze.py`): its methods read the graph through the
analyser's shared state."""

from __future__ import annotations

from torch import fx

from ..ops import (
    ACTIVATIONS,
    aten,
    is_call,
    is_float,
    is_identity,
    is_pointwise,
)
from ..structure import (
    MLP,
    MoE,
)


class MLPRecogniser:
    def _moe(self, ordered: list) -> MoE | None:
        """A router (a projection to one score per expert) whose scores pick the top k."""
        nodes = set(ordered)
        topk = next((n for n in ordered if is_call(n, {aten.topk.default})), None)
        if topk is None:
            return None
        router = self._linear_above(topk.args[0], nodes)
        if router is None:
            return None
        routed = self.descendants(topk, nodes)
        shared = [
            lin
            for n in ordered
            if (lin := self.linear(n)) is not None
            and n not in routed
            and lin is not router
            and router.node not in self.ancestors(n, nodes)
        ]
        k = topk.args[1] if len(topk.args) > 1 else topk.kwargs.get("k")
        return MoE(router.out_features, k if isinstance(k, int) else None, len(shared) >= 2, router)

    def _mlp(self, h: fx.Node, ordered: list) -> MLP | None:
        nodes = set(ordered)
        lins = [self.linear(n) for n in ordered if self.linear(n)]
        if len(lins) < 2:
            return None
        lin_nodes = {lin.node for lin in lins}
        down = lins[-1]
        ups = [lin for lin in lins if not (self.ancestors(lin.node, nodes) & lin_nodes)]
        if not ups or down in ups:
            return None
        hidden = down.in_features
        between = set()
        for up in ups:
            between |= self.descendants(up.node, nodes)
        between &= self.ancestors(down.node, nodes)
        # gated: a product of two values computed from the up projections, neither from the
        # other (x·σ(x), x·Φ(x), relu(x)² are activations of one value; a fused or split
        # projection's halves, a gate and an up, are two)
        up_nodes = {u.node for u in ups}
        gated = False
        for n in between:
            if not is_call(n, {aten.mul.Tensor}) or not all(
                isinstance(a, fx.Node) for a in n.args[:2]
            ):
                continue
            a, b = n.args[:2]
            src_a, src_b = _sources(a), _sources(b)
            if (
                not src_a & src_b
                and up_nodes & (self.ancestors(a, nodes) | {a})
                and up_nodes & (self.ancestors(b, nodes) | {b})
            ):
                gated = True
        return MLP(hidden=hidden, gated=gated, activation=_activation(between), up=ups, down=down)


def _sources(node: fx.Node) -> set:
    """The tensors an element-wise expression is computed from: walking up through ops ATen
    tags pointwise (and casts) to the first that is not (a projection, a split's part)."""
    out, todo, seen = set(), [node], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        pointwise = is_pointwise(n) or is_identity(n)
        if not pointwise:
            out.add(n)
            continue
        todo.extend(a for a in n.all_input_nodes if is_float(a))
    return out


def _activation(nodes: set) -> str | None:
    """The MLP's activation, named by what it computes (not by the op or module called)."""
    calls = [n for n in nodes if n.op == "call_function"]
    targets = {n.target for n in calls}
    found = [name for op, name in ACTIVATIONS.items() if op in targets]
    if "gelu" in found:
        g = next(n for n in calls if n.target == aten.gelu.default)
        return "gelu_tanh" if g.kwargs.get("approximate", "none") == "tanh" else "gelu"
    if "tanh" in found and (
        aten.pow.Tensor_Scalar in targets or any(0.044715 in n.args for n in calls)
    ):
        return "gelu_tanh"  # 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³)))
    if "erf" in found:
        return "gelu"
    if "relu" in found:
        r = next(n for n in calls if n.target == aten.relu.default)
        squared = any(
            (u.target in (aten.pow.Tensor_Scalar,) and u.args[1] == 2)
            or u.target == aten.square.default
            or (u.target == aten.mul.Tensor and u.args[0] is u.args[1])
            for u in r.users
        )
        return "relu2" if squared else "relu"
    if "sigmoid" in found:
        sg = next(n for n in calls if n.target == aten.sigmoid.default)
        arg = sg.args[0]
        scale = (
            next((a for a in arg.args if not isinstance(a, fx.Node)), None)
            if is_call(arg, {aten.mul.Tensor})
            else None
        )
        gated = any(is_call(u, {aten.mul.Tensor}) for u in sg.users)
        if gated and scale is not None:
            return "quick_gelu" if abs(float(scale) - 1.702) < 1e-3 else f"x·σ({scale}x)"
        return "silu" if gated else "sigmoid"
    return found[0] if found else None
