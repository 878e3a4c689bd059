"""Recognises norms by their arithmetic: LayerNorm/RMSNorm ops, or mean-of-squares and rsqrt; gains and biases.

A mixin of the structure analysis (`ir/analyze.py`): its methods read the graph through the
analyser's shared state."""

from __future__ import annotations

from collections import deque

from torch import fx

from ..ops import (
    ADD,
    CLAMPS,
    NORM_OPS,
    aten,
    is_call,
    is_heavy,
    is_identity,
    param_target,
    strip,
)
from ..structure import (
    Norm,
)

_L2 = aten.linalg_vector_norm.default  # x / ‖x‖ · √d: an RMSNorm written with F.normalize


class NormRecogniser:
    def _norm_from(self, start: fx.Node, allowed: set, on: set | None = None) -> Norm | None:
        """A norm applied to `start` (its output inside `on`, when given)."""
        for u in self._through(start, allowed):
            if is_call(u, NORM_OPS):
                norm = self._norm_op(start, u, allowed)
                return norm if on is None or norm.output in on else None
        region, todo = set(), deque([(start, 0)])
        while todo:
            n, depth = todo.popleft()
            for u in n.users:
                if u in allowed and u not in region and not is_heavy(u) and depth < 12:
                    region.add(u)
                    todo.append((u, depth + 1))
        roots = self.sorted(
            n for n in region if is_call(n, {aten.rsqrt.default, aten.sqrt.default, _L2})
        )
        for r in roots:
            stats = self.ancestors(r, region) | {r}
            if not any(
                is_call(n, {aten.mean.dim, aten.var.correction, aten.var_mean.correction, _L2})
                for n in stats
            ):
                continue
            scaled = [
                u
                for u in self._past_clamps(r, region)
                if is_call(u, {aten.mul.Tensor, aten.div.Tensor})
            ]
            if not scaled:
                continue
            out = scaled[0]
            centered = any(
                is_call(n, {aten.sub.Tensor, aten.var_mean.correction, aten.var.correction})
                for n in self.ancestors(out, region)
            )
            norm = Norm("layernorm" if centered else "rmsnorm", start, out)
            eps_add = next(
                (n for n in stats if is_call(n, ADD) and not isinstance(n.args[1], fx.Node)), None
            )
            norm.eps = float(eps_add.args[1]) if eps_add is not None else None
            self._affine(norm, region | allowed)
            norm.nodes = (self.ancestors(norm.output, region) | {norm.output}) & region
            if on is not None and norm.output not in on:
                return None
            return norm
        return None

    def _past_clamps(self, n: fx.Node, nodes: set) -> list[fx.Node]:
        """Users of a statistic, looking through identity ops, clamps (F.normalize's
        ‖x‖.clamp_min(ε)) and broadcasts."""
        out = []
        for u in self._through(n, nodes):
            if is_call(u, CLAMPS):
                out.extend(self._past_clamps(u, nodes))
            else:
                out.append(u)
        return out

    def _norm_op(self, start: fx.Node, op: fx.Node, allowed: set | None = None) -> Norm:
        """A LayerNorm/RMSNorm op; without a gain or bias of its own, extended over the affine
        applied after it within `allowed` (x-transformers' LayerNorm · γ)."""
        if op.target == aten.rms_norm.default:
            w = op.args[2] if len(op.args) > 2 else op.kwargs.get("weight")
            eps = op.args[3] if len(op.args) > 3 else op.kwargs.get("eps")
            gain, offset = _gain(w)
            norm = Norm("rmsnorm", start, op, gain, None, eps, offset, nodes={op})
        else:
            w = op.args[2] if len(op.args) > 2 else None
            b = op.args[3] if len(op.args) > 3 else None
            eps = op.args[4] if len(op.args) > 4 else 1e-5
            out = op
            if op.target == aten.native_layer_norm.default:
                out = next(iter(op.users))
            gain, offset = _gain(w)
            norm = Norm(
                "layernorm", start, out, gain, param_target(b), eps, offset, nodes={op, out}
            )
        if allowed is not None and norm.weight is None and norm.bias is None:
            self._affine(norm, allowed)
        return norm

    def _affine(self, norm: Norm, allowed: set) -> None:
        """Extend a norm's output over its gain (w or 1 + w) and bias."""
        out = norm.output
        while True:
            users = self._through(out, allowed)
            if len(users) != 1:
                break
            u = users[0]
            other = next(
                (
                    a
                    for a in u.args[:2]
                    if a is not out and not (isinstance(a, fx.Node) and strip(a) is strip(out))
                ),
                None,
            )
            chain_out = u
            if is_call(u, {aten.mul.Tensor}) and isinstance(other, (int, float)):
                pass  # a constant scale (F.normalize(x) · √d): part of the normalisation
            elif (
                is_call(u, {aten.mul.Tensor}) and norm.weight is None and isinstance(other, fx.Node)
            ):
                target, offset = _gain(other)
                norm.unit_offset = offset
                if target is None or self.params[target].dim() != 1:
                    break
                norm.weight = target
            elif is_call(u, ADD) and norm.bias is None and isinstance(other, fx.Node):
                target = param_target(other)
                if target is None or self.params[target].dim() != 1:
                    break
                norm.bias = target
            else:
                break
            norm.output = chain_out
            out = chain_out
            if norm.bias is not None:
                break
        while len(self._through(norm.output, allowed)) == 1 and any(
            is_identity(u) for u in norm.output.users
        ):
            norm.output = next(u for u in norm.output.users if is_identity(u))

    def _norm_ending_at(self, h: fx.Node, allowed: set) -> Norm | None:
        end = strip(h)
        if is_call(end, NORM_OPS):
            return self._norm_op(end.args[0], end)
        seen, todo = set(), deque([(end, 0)])
        while todo:
            n, depth = todo.popleft()
            for a in n.all_input_nodes:
                if a in allowed and a not in seen and depth < 10:
                    seen.add(a)
                    if is_call(a, NORM_OPS):  # a norm op whose affine comes after it
                        norm = self._norm_op(a.args[0], a, allowed)
                        if end in (norm.output, strip(norm.output)):
                            return norm
                    elif is_heavy(a) or self.linear(a):
                        norm = self._norm_from(
                            self.linear(a).output if self.linear(a) else a, allowed
                        )
                        if (
                            norm is not None
                            and strip(norm.output) is end
                            or (norm and norm.output is end)
                        ):
                            return norm
                    else:
                        todo.append((a, depth + 1))
        return None


def _gain(w) -> tuple[str | None, bool]:
    """A norm op's weight argument: a parameter w, or 1 + w computed before the op."""
    w = strip(w) if isinstance(w, fx.Node) else w
    target = param_target(w)
    if target is not None or not is_call(w, ADD):
        return target, False
    inner = [param_target(a) for a in w.args[:2] if isinstance(a, fx.Node)]
    consts = [a for a in w.args[:2] if not isinstance(a, fx.Node)]
    if len(inner) == 1 and inner[0] and consts in ([1], [1.0]):
        return inner[0], True
    if len(inner) == 1 and inner[0] and consts in ([0], [0.0]):  # w + 0 (an offset switched off)
        return inner[0], False
    return None, False
