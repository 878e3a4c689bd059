"""Recognises attention: SDPA or a softmax over q·kᵀ, its projections, heads, positions and masks.

A mixin of the structure analysis (`ir/analyze.py`): its methods read the graph through the
analyser's shared state."""

from __future__ import annotations

from torch import fx, nn

from ..ops import (
    ADD,
    ATTENTION_OPS,
    MATMUL,
    NORM_OPS,
    POSITION_OPS,
    SOFTMAX,
    aten,
    is_assert,
    is_call,
    is_float,
    is_identity,
    last_dim,
    param_target,
    shape,
)
from ..structure import (
    Attention,
)


class AttentionRecogniser:
    def _is_softmax_attention(self, n: fx.Node) -> bool:
        return is_call(n, SOFTMAX) and self._scores_matmul(n) is not None

    def _scores_matmul(self, softmax: fx.Node) -> fx.Node | None:
        n = softmax.args[0]
        passthrough = {
            aten.mul.Tensor,
            aten.div.Tensor,
            aten.add.Tensor,
            aten.masked_fill.Scalar,
            aten.masked_fill.Tensor,
            aten.where.self,
            aten.tanh.default,
            aten.to.dtype,
            aten._to_copy.default,
        }
        for _ in range(8):
            if not isinstance(n, fx.Node):
                return None
            if is_call(n, MATMUL) and all(
                isinstance(a, fx.Node) and param_target(a) is None for a in n.args[:2]
            ):
                return n
            if is_call(n, {aten.baddbmm.default}):  # bias (e.g. ALiBi) + q @ kᵀ
                return n
            if is_call(n, {aten.view.default, aten.reshape.default}):
                n = n.args[0]
                continue
            if is_call(n, passthrough):
                n = next((a for a in n.args if isinstance(a, fx.Node) and len(shape(a)) >= 3), None)
                continue
            if n.op == "call_function" and n.target == aten.where.self:
                n = n.args[1]
                continue
            return None
        return None

    def _attention(self, core: fx.Node, nodes: set, carry_desc: set) -> Attention | None:
        if is_call(core, ATTENTION_OPS):
            q, k, v = core.args[:3]
            q = _heads_view(q)  # a kernel run on (batch·heads, tokens, dim) views
            out = core
            gqa = bool(core.kwargs.get("enable_gqa", False))
        else:
            mm = self._scores_matmul(core)
            q, k = mm.args[1:3] if is_call(mm, {aten.baddbmm.default}) else mm.args[:2]
            out = core
            while not is_call(out, MATMUL):
                users = [u for u in out.users if not is_assert(u)]
                if len(users) != 1:
                    return None
                out = users[0]
                if not (
                    is_identity(out)
                    or is_call(out, MATMUL | {aten.view.default, aten.reshape.default})
                ):
                    return None
            v = out.args[1]
            gqa = False
            q, k = _heads_view(q), _heads_view(k)
        qs = shape(q)
        if len(qs) != 4 or not isinstance(qs[1], int) or not isinstance(qs[3], int):
            return None
        heads, head_dim = qs[1], qs[3]
        lq, lk, lv = (self._linear_above(t, nodes) for t in (q, k, v))
        if lq is None or lk is None or lv is None:
            return None
        q_path = self._between(lq.node, q, nodes)
        k_path = self._between(lk.node, k, nodes)
        n_rep = 1
        k_heads = shape(k)[1] if len(shape(k)) == 4 else heads
        if gqa or (isinstance(k_heads, int) and k_heads < heads):
            n_rep = heads // k_heads  # the kernel broadcasts (or groups) the key heads itself
        for n in k_path:
            if is_call(n, {aten.expand.default, aten.broadcast_to.default}):
                n_rep *= _int_numel(shape(n)) // max(1, _int_numel(shape(n.args[0])))
            elif is_call(n, {aten.repeat_interleave.self_int}):
                n_rep *= int(n.args[1])
        rope_cats = [  # rotate-half: cat(-x2, x1); interleaved pairs: stack(x·cos − y·sin, …)
            n
            for n in q_path
            if is_call(n, {aten.cat.default, aten.stack.default})
            and (
                any(is_call(a, {aten.neg.default}) for a in n.args[0])
                or (
                    len(n.args[0]) == 2
                    and is_call(n.args[0][0], {aten.sub.Tensor})
                    and is_call(n.args[0][1], ADD)
                )
            )
        ]
        complex_rope = any(is_call(n, {aten.view_as_complex.default}) for n in q_path) or any(
            self._positional(n, {*q_path, lq.node}, carry_desc)
            for n in q_path
            if is_call(n, {aten.mul.Tensor})
        )
        rotary = None
        if rope_cats:
            c = rope_cats[0]
            rotary = (
                last_dim(c)
                if is_call(c, {aten.cat.default})
                else 2 * (last_dim(c.args[0][0]) or 0) * 1
            )
            if is_call(c, {aten.stack.default}):
                rotary = (
                    2 * _int_numel(shape(c.args[0][0])[3:])
                    if len(shape(c.args[0][0])) > 3
                    else last_dim(c.args[0][0]) * 2
                )
        qk_norm = any(is_call(n, NORM_OPS | {aten.rsqrt.default}) for n in q_path)
        o = next(
            (self.linear(n) for n in self.sorted(self.descendants(out, nodes)) if self.linear(n)),
            None,
        )
        return Attention(
            core=core,
            heads=heads,
            kv_heads=heads // n_rep if n_rep else heads,
            head_dim=head_dim,
            q=lq,
            k=lk,
            v=lv,
            o=o,
            cross=k not in carry_desc,
            rope=bool(rope_cats) or complex_rope,
            rotary_dim=rotary,
            qk_norm=qk_norm,
            query=q,
            key=k,
        )

    def _positional(self, mul: fx.Node, q_path: set, stream: set) -> bool:
        """A product of the queries with a position table (a rotation written as a matrix or
        an elementwise product with cos/sin from a buffer, or computed from positions)."""
        others = [
            a
            for a in mul.args[:2]
            if isinstance(a, fx.Node) and a not in q_path and a not in stream
        ]
        for o in others:
            anc = self._value_ancestors(o) | {o}
            if any(a.op == "placeholder" and is_float(a) for a in anc):
                continue  # a value computed from the input (a gate), not a table
            if any(
                is_call(a, {aten.cos.default, aten.sin.default, *POSITION_OPS})
                or (a.op == "get_attr" and not isinstance(self.params.get(a.target), nn.Parameter))
                for a in anc
            ):
                return True
        return False


def _heads_view(node: fx.Node) -> fx.Node:
    """The 4-d (batch, heads, seq, dim) tensor behind a 3-d (batch·heads, seq, dim) one."""
    n = node
    for _ in range(4):
        if len(shape(n)) == 4:
            return n
        if not is_call(
            n,
            {
                aten.view.default,
                aten.reshape.default,
                aten.transpose.int,
                aten._unsafe_view.default,
            },
        ):
            break
        n = n.args[0]
    return node


def _int_numel(s) -> int:
    total = 1
    for d in s:
        if isinstance(d, int):
            total *= d
    return total
