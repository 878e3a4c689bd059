"""The op-rule table of the coupled-dimension analysis (ir/dims.py): for each ATen op, which
axes of its operands and result are one dimension (`Dims.union`) and how an axis is built from
others (`Dims.define`: products of a reshape, concatenations of a slice, split or cat), plus
the literal shape arguments that name sizes and the reductions over axes. An op with no rule
is opaque: the dimensions it touches cannot grow.

A new op is one entry in `RULES` (the op → a function of the rule context and the result's
axes); element-wise ops (ATen's `pointwise` tag, `ELEMENTWISE`) broadcast their operands.
"""

from __future__ import annotations

import operator

from torch import fx

from .dims import Dims, Literal, Reduction
from .memory import WRITE
from .ops import (
    ATTENTION_OPS,
    CHUNKS,
    CONSTRUCTORS,
    DIMS_IGNORED,
    ELEMENTWISE,
    REDUCTIONS,
    SOFTMAX,
    VIEWS,
    aten,
    is_pointwise,
)
from .sinkhorn import SINKHORN


def apply_rule(d: Dims, node: fx.Node) -> None:
    """Record what `node` (a call) says about the dimensions of its operands and result."""
    t = node.target
    if t in DIMS_IGNORED or "_assert" in str(t):
        return
    r = _Rules(d, node)
    out = r.ax(node)
    if t in ELEMENTWISE or is_pointwise(node):
        r.broadcast(out)
        return
    rule = RULES.get(t)
    if rule is None:
        r.opaque()
    else:
        rule(r, out)


class _Rules:
    """The context of one op's rule: the dimensions `d` and the op's node `n`."""

    def __init__(self, d: Dims, node: fx.Node):
        self.d, self.n = d, node

    def ax(self, x) -> list[int] | None:
        return self.d.axes.get(x) if isinstance(x, fx.Node) else None

    def arg_axes(self, i: int) -> list[int] | None:
        return self.ax(self.n.args[i])

    # one rule per op (or family of ops) --------------------------------------------------------

    def addmm(self, out) -> None:
        b, x, w = self.n.args[:3]
        self.matmul(x, w, out)
        if self.ax(b):
            self.d.union(self.ax(b)[-1], out[-1])

    def baddbmm(self, out) -> None:
        self.matmul(self.n.args[1], self.n.args[2], out)
        self.broadcast(out, [self.n.args[0]])

    def embedding(self, out) -> None:
        w, idx = self.n.args[:2]
        self.d.union(self.ax(w)[1], out[-1])
        self.same(self.ax(idx), out[:-1])

    def softmax(self, out) -> None:
        x = self.arg_axes(0)
        self.same(x, out)
        dim = self.n.args[1] % len(x)
        self.d.reductions.append(Reduction(self.n, "softmax", [x[dim]]))

    def sinkhorn(self, out) -> None:  # [..., n, n] normalised by sums over both n axes
        x = self.arg_axes(0)
        self.same(x, out)
        self.d.reductions.append(Reduction(self.n, "sum", x[-2:]))

    def view_as(self, out) -> None:  # x in other's shape
        x, other = (self.ax(a) for a in self.n.args[:2])
        self.same(other, out)
        if [self.d.size[a] for a in x] == [self.d.size[a] for a in out]:
            self.same(x, out)
        else:
            self.opaque()

    def unsqueeze(self, out) -> None:
        dim = self.n.args[1] % len(out)
        self.same(self.arg_axes(0), out[:dim] + out[dim + 1 :])

    def transpose(self, out) -> None:
        x = list(self.arg_axes(0))
        a, b = (i % len(x) for i in self.n.args[1:3])
        x[a], x[b] = x[b], x[a]
        self.same(x, out)

    def permute(self, out) -> None:
        x = self.arg_axes(0)
        self.same([x[i % len(x)] for i in self.n.args[1]], out)

    def t(self, out) -> None:
        self.same(list(reversed(self.arg_axes(0))), out)

    def flatten(self, out) -> None:
        x = self.arg_axes(0)
        s, e = (_arg(self.n, 1, 0) % len(x)), (_arg(self.n, 2, -1) % len(x))
        self.same(x[:s] + x[e + 1 :], out[:s] + out[s + 1 :])
        self.d.define(out[s], "prod", x[s : e + 1])

    def unflatten(self, out) -> None:
        x = self.arg_axes(0)
        dim = self.n.args[1] % len(x)
        k = len(self.n.args[2])
        self.same(x[:dim] + x[dim + 1 :], out[:dim] + out[dim + k :])
        self.d.define(x[dim], "prod", out[dim : dim + k])
        for j, s in enumerate(self.n.args[2]):
            if isinstance(s, int) and s != -1:
                self.d.literals.append(Literal(self.n, (2, j), out[dim + j]))

    def select(self, out) -> None:
        x = self.arg_axes(0)
        dim = self.n.args[1] % len(x)
        self.same(x[:dim] + x[dim + 1 :], out)

    def unbind(self, out) -> None:  # each item is a select along dim
        x = self.arg_axes(0)
        dim = _arg(self.n, 1, 0) % len(x)
        for u in self.n.users:
            if u.target is operator.getitem:
                self.same(x[:dim] + x[dim + 1 :], self.ax(u))

    def stack(self, out) -> None:
        dim = _arg(self.n, 1, 0) % len(out)
        for x in self.n.args[0]:
            self.same(self.ax(x), out[:dim] + out[dim + 1 :])

    def write(self, out) -> None:  # (addresses, contents) written as they are
        for u in self.n.users:
            if u.target is operator.getitem:
                self.same(self.ax(self.n.args[u.args[1]]), self.ax(u))

    def conv(self, out) -> None:
        x, w = self.arg_axes(0), self.arg_axes(1)
        self.d.union(x[1], w[1])
        self.d.union(out[1], w[0])
        b = self.ax(_arg(self.n, 2))
        if b:
            self.d.union(b[0], out[1])
        self.same(x[:1], out[:1])

    def construct(self, out) -> None:
        at = 1 if self.n.target.__name__.startswith("new_") else 0
        for j, s in enumerate(self.n.args[at]):
            if isinstance(s, int) and out is not None:
                self.d.literals.append(Literal(self.n, (at, j), out[j]))

    def index(self, out) -> None:
        x = self.arg_axes(0)
        idx = self.n.args[1]
        if out is None or any(i is None for i in idx):
            self.opaque()
            return
        rest = len(x) - len(idx)
        if rest:
            self.same(x[len(idx) :], out[len(out) - rest :])

    # helpers -------------------------------------------------------------------------------

    def same(self, a, b) -> None:
        if a is None or b is None:
            return
        for x, y in zip(a, b, strict=True):
            self.d.union(x, y)

    def opaque(self) -> None:
        ids = [i for x in self.n.all_input_nodes for i in (self.ax(x) or [])]
        ids += self.ax(self.n) or []
        self.d.opaque.append((self.n, ids))

    def broadcast(self, out, inputs=None) -> None:
        if out is None:
            return
        inputs = inputs if inputs is not None else self.n.args
        self.aligned([self.ax(x) for x in inputs], out, 1)

    def aligned(self, operands, out, last: int) -> None:
        """Operand axes aligned from the end with the output's (broadcasting), from the
        `last`-th from the end on, are the output's where nothing is broadcast along them. A
        unit axis of an operand of the output's rank is the output's: one head of q keeps its
        head axis through q · cos (RoPE), q · kᵀ and p · v. When several operands have one
        there, only those that are a model dimension (`Dims.anchored`) are; a mask's or cos's
        unit axis broadcasts to any number of heads, and must not tie the heads of the layers
        that share it."""
        for k in range(last, len(out) + 1):
            so = self.d.size[out[-k]]
            same = [
                xa[-k]
                for xa in operands
                if xa is not None
                and len(xa) >= k
                and self.d.size[xa[-k]] == so
                and (so != 1 or len(xa) == len(out))
            ]
            if so == 1:
                same = [a for a in same if self.d.find(a) in self.d.anchored] or same
            for a in same:
                self.d.union(a, out[-k])

    def linear(self, x, w, b, out) -> None:
        xa, wa = self.ax(x), self.ax(w)
        self.d.union(xa[-1], wa[1])
        self.d.union(out[-1], wa[0])
        if self.ax(b):
            self.d.union(self.ax(b)[0], out[-1])
        self.same(xa[:-1], out[:-1])

    def matmul(self, a, b, out) -> None:
        aa, ba = self.ax(a), self.ax(b)
        if len(aa) < 2 or len(ba) < 2:
            return self.opaque()
        self.d.union(aa[-1], ba[-2])
        self.d.union(out[-2], aa[-2])
        self.d.union(out[-1], ba[-1])
        self.aligned([aa, ba], out, 3)  # the batch axes broadcast
        return None

    def norm(self, out) -> None:
        x = self.ax(self.n.args[0])
        self.same(x, out)
        shape = self.n.args[1]
        k = len(shape)
        w = self.ax(_arg(self.n, 2))
        b = self.ax(_arg(self.n, 3)) if self.n.target is aten.layer_norm.default else None
        for p in (w, b):
            if p:
                self.same(p, x[-k:])
        for j in range(k):
            self.d.literals.append(Literal(self.n, (1, j), x[len(x) - k + j]))
        kind = "layer_norm" if self.n.target is aten.layer_norm.default else "rms_norm"
        self.d.reductions.append(Reduction(self.n, kind, x[-k:]))

    def reduce(self, kind, out) -> None:
        x = self.ax(self.n.args[0])
        dims = _arg(self.n, 1)
        dims = list(range(len(x))) if dims is None else [dims] if isinstance(dims, int) else dims
        dims = sorted(i % len(x) for i in dims)
        keep = _arg(self.n, 2, False) if kind != "var" else self.n.kwargs.get("keepdim", False)
        kept = [a for i, a in enumerate(x) if i not in dims]
        if out is not None:
            out_kept = [a for i, a in enumerate(out) if not (keep and i in dims)]
            self.same(kept, out_kept)
        if kind == "mean" and _is_square(self.n.args[0]):
            kind = "mean_sq"
        self.d.reductions.append(Reduction(self.n, kind, [x[i] for i in dims]))

    def norm2(self, out) -> None:
        """‖x‖₂ over some axes (F.normalize, an RMSNorm written as x / ‖x‖ · √d)."""
        x = self.ax(self.n.args[0])
        dims = _arg(self.n, 2)
        dims = list(range(len(x))) if dims is None else [dims] if isinstance(dims, int) else dims
        dims = sorted(i % len(x) for i in dims)
        keep = _arg(self.n, 3, False)
        kept = [a for i, a in enumerate(x) if i not in dims]
        if out is not None:
            self.same(kept, [a for i, a in enumerate(out) if not (keep and i in dims)])
        self.d.reductions.append(Reduction(self.n, "norm2", [x[i] for i in dims]))

    def squeeze(self, out) -> None:
        x = self.ax(self.n.args[0])
        keep = [a for a in x if self.d.size[a] != 1]
        self.same(keep, [a for a in out if self.d.size[a] != 1])

    def reshape(self, x, out, sizes_at) -> None:
        sizes = self.n.args[sizes_at]
        for j, s in enumerate(sizes):
            if isinstance(s, int) and s != -1:
                self.d.literals.append(Literal(self.n, (sizes_at, j), out[j]))
        xi = [k for k, a in enumerate(x) if self.d.size[a] != 1]
        oi = [k for k, a in enumerate(out) if self.d.size[a] != 1]
        xs, os = [x[k] for k in xi], [out[k] for k in oi]
        i = j = 0
        while i < len(xs) and j < len(os):
            si, sj = self.d.size[xs[i]], self.d.size[os[j]]
            if si == sj:
                # a unit axis split off (or merged into) this one: one head of (1, head dim),
                # one key/value group of (1, queries per group); keep it as a factor, so the
                # axis is (1 × n) as it is (k × n) for k > 1 and a pass can grow the 1
                ux, uo = _unit_before(self.d, x, xi[i]), _unit_before(self.d, out, oi[j])
                if isinstance(si, int) and si > 1 and (ux is None) != (uo is None):
                    if uo is not None:
                        self.d.define(xs[i], "prod", [uo, os[j]])
                    else:
                        self.d.define(os[j], "prod", [ux, xs[i]])
                else:
                    self.d.union(xs[i], os[j])
                    if ux is not None and uo is not None:
                        self.d.union(ux, uo)  # the unit axis kept where it was
                i, j = i + 1, j + 1
                continue
            gi, gj = [xs[i]], [os[j]]
            pi, pj = si, sj
            while pi != pj and i + len(gi) <= len(xs) and j + len(gj) <= len(os):
                if _lt(pi, pj) and i + len(gi) < len(xs):
                    gi.append(xs[i + len(gi)])
                    pi = pi * self.d.size[gi[-1]]
                elif j + len(gj) < len(os):
                    gj.append(os[j + len(gj)])
                    pj = pj * self.d.size[gj[-1]]
                else:
                    break
            if pi != pj:
                for a in xs[i:] + os[j:]:
                    self.d.freeze(a, f"{self.n.name} reshapes it in a way archfx cannot follow")
                return
            if len(gi) == 1:
                self.d.define(gi[0], "prod", gj)
            elif len(gj) == 1:
                self.d.define(gj[0], "prod", gi)
            else:
                for a in gi + gj:
                    self.d.freeze(a, f"{self.n.name} regroups it")
            i, j = i + len(gi), j + len(gj)

    def expand(self, out) -> None:
        x = self.ax(self.n.args[0])
        sizes = self.n.args[1]
        off = len(out) - len(x)
        for j, s in enumerate(sizes):
            if j >= off and self.d.size[x[j - off]] == self.d.size[out[j]]:
                self.d.union(x[j - off], out[j])
            if isinstance(s, int) and s != -1:
                self.d.literals.append(Literal(self.n, (1, j), out[j]))

    def slice(self, out) -> None:
        x = self.ax(self.n.args[0])
        dim = _arg(self.n, 1, 0) % len(x)
        start, end, step = _arg(self.n, 2, None), _arg(self.n, 3, None), _arg(self.n, 4, 1)
        n = self.d.size[x[dim]]
        self.same(x[:dim] + x[dim + 1 :], out[:dim] + out[dim + 1 :])
        k = self.d.size[out[dim]]
        if k == n:
            self.d.union(x[dim], out[dim])
            return
        if not (isinstance(n, int) and isinstance(k, int)):
            return  # a slice along a sequence axis: positions, not features
        if step != 1 or not all(isinstance(v, (int, type(None))) for v in (start, end)):
            self.d.freeze(x[dim], f"{self.n.name} takes a strided slice of it")
            return
        a = 0 if start is None else (start + n if start < 0 else min(start, n))
        parts, index = [], 0
        if a > 0:
            parts.append(self.d.new(a))
            index = 1
        parts.append(out[dim])
        if a + k < n:
            parts.append(self.d.new(n - a - k))
        self.d.define(x[dim], "cat", parts)
        self.d.literals.append(Literal(self.n, (2,), x[dim], offset_of=(x[dim], index)))
        self.d.literals.append(Literal(self.n, (3,), x[dim], offset_of=(x[dim], index + 1)))

    def split(self) -> None:
        x = self.ax(self.n.args[0])
        dim = _arg(self.n, 2, 0) % len(x)
        outs = sorted(
            (u for u in self.n.users if u.target is operator.getitem), key=lambda u: u.args[1]
        )
        val = self.n.meta.get("val")
        if not isinstance(val, (list, tuple)) or len(outs) != len(val):
            return self.opaque()
        parts = [self.ax(u) for u in outs]
        for p in parts:
            self.same(x[:dim] + x[dim + 1 :], p[:dim] + p[dim + 1 :])
        self.d.define(x[dim], "cat", [p[dim] for p in parts])
        if self.n.target is aten.chunk.default or (
            self.n.target is aten.split.Tensor and isinstance(self.n.args[1], int)
        ):
            ids = tuple(p[dim] for p in parts)
            self.d.literals.append(Literal(self.n, (1,), parts[0][dim], split_parts=ids))
        elif self.n.target is aten.split_with_sizes.default:
            for j, p in enumerate(parts):
                self.d.literals.append(Literal(self.n, (1, j), p[dim]))
        return None

    def cat(self, out) -> None:
        xs = [self.ax(x) for x in self.n.args[0]]
        xs = [x for x in xs if x is not None and not (len(x) == 1 and self.d.size[x[0]] == 0)]
        dim = _arg(self.n, 1, 0) % len(out)
        for x in xs:
            self.same(x[:dim] + x[dim + 1 :], out[:dim] + out[dim + 1 :])
        if isinstance(self.d.size[out[dim]], int):
            self.d.define(out[dim], "cat", [x[dim] for x in xs])

    def attention(self, out) -> None:
        q, k, v = (self.ax(a) for a in self.n.args[:3])
        if out is None:  # the fused CPU kernels return tuples
            return self.opaque()
        self.d.union(q[-1], k[-1])
        self.d.union(v[-1], out[-1])
        self.d.union(k[-2], v[-2])
        self.d.union(q[-2], out[-2])
        self.d.union(q[-3], out[-3])
        self.d.union(k[-3], v[-3])
        hq, hk = self.d.size[q[-3]], self.d.size[k[-3]]
        if hq == hk:
            self.d.union(q[-3], k[-3])
        elif isinstance(hq, int) and isinstance(hk, int) and hk and hq % hk == 0:
            self.d.define(q[-3], "prod", [k[-3], self.d.new(hq // hk)])
        for a in (k, v):
            for i in range(len(a) - 3):
                self.d.union(a[i], q[i])
        mask = self.ax(_arg(self.n, 3))
        if mask:
            scores = q[:-1] + [k[-2]]
            for j in range(1, min(len(mask), len(scores)) + 1):
                if self.d.size[mask[-j]] == self.d.size[scores[-j]] != 1:
                    self.d.union(mask[-j], scores[-j])
        self.d.reductions.append(Reduction(self.n, "softmax", [k[-2]]))
        return None

    def repeat(self, out) -> None:
        x = self.ax(self.n.args[0])
        if self.n.target is aten.repeat.default:
            reps = self.n.args[1]
            off = len(out) - len(x)
            for j, r in enumerate(reps):
                if j < off:
                    continue
                if r == 1:
                    self.d.union(x[j - off], out[j])
                elif isinstance(r, int):
                    rep = self.d.new(r)
                    self.d.define(out[j], "prod", [rep, x[j - off]])
                    self.d.literals.append(Literal(self.n, (1, j), rep))
            return
        dim = _arg(self.n, 2, None)
        r = self.n.args[1]
        if dim is None or not isinstance(r, int):
            return self.opaque()
        dim %= len(x)
        self.same(x[:dim] + x[dim + 1 :], out[:dim] + out[dim + 1 :])
        rep = self.d.new(r)
        self.d.define(out[dim], "prod", [x[dim], rep])
        self.d.literals.append(Literal(self.n, (1,), rep))
        return None


def _vector_norm(r: _Rules, out) -> None:
    if _arg(r.n, 1, 2) == 2:
        r.norm2(out)
    else:
        r.opaque()


RULES = {  # op → rule(context, the result's axes)
    aten.linear.default: lambda r, out: r.linear(r.n.args[0], r.n.args[1], _arg(r.n, 2), out),
    aten.addmm.default: _Rules.addmm,
    **dict.fromkeys(
        (aten.mm.default, aten.bmm.default, aten.matmul.default),
        lambda r, out: r.matmul(r.n.args[0], r.n.args[1], out),
    ),
    aten.baddbmm.default: _Rules.baddbmm,
    aten.embedding.default: _Rules.embedding,
    **dict.fromkeys((aten.layer_norm.default, aten.rms_norm.default), _Rules.norm),
    **{op: (lambda kind: lambda r, out: r.reduce(kind, out))(k) for op, k in REDUCTIONS.items()},
    aten.linalg_vector_norm.default: _vector_norm,
    SINKHORN: _Rules.sinkhorn,
    **dict.fromkeys((*SOFTMAX, aten.log_softmax.int), _Rules.softmax),
    **dict.fromkeys(VIEWS, lambda r, out: r.reshape(r.arg_axes(0), out, sizes_at=1)),
    **dict.fromkeys((aten.expand.default, aten.broadcast_to.default), _Rules.expand),
    aten.expand_as.default: lambda r, out: r.broadcast(out),  # x broadcast to other's shape
    aten.view_as.default: _Rules.view_as,
    aten.unsqueeze.default: _Rules.unsqueeze,
    **dict.fromkeys((aten.squeeze.dim, aten.squeeze.default, aten.squeeze.dims), _Rules.squeeze),
    aten.transpose.int: _Rules.transpose,
    aten.permute.default: _Rules.permute,
    **dict.fromkeys((aten.t.default, aten.numpy_T.default), _Rules.t),
    aten.flatten.using_ints: _Rules.flatten,
    aten.unflatten.int: _Rules.unflatten,
    aten.slice.Tensor: _Rules.slice,
    aten.select.int: _Rules.select,
    **dict.fromkeys(CHUNKS, lambda r, out: r.split()),
    aten.unbind.int: _Rules.unbind,
    aten.cat.default: _Rules.cat,
    aten.stack.default: _Rules.stack,
    operator.getitem: lambda r, out: None,  # handled by the op producing the tuple
    **dict.fromkeys(ATTENTION_OPS, _Rules.attention),
    WRITE: _Rules.write,
    **dict.fromkeys((aten.conv2d.default, aten.convolution.default), _Rules.conv),
    **dict.fromkeys((aten.repeat_interleave.self_int, aten.repeat.default), _Rules.repeat),
    **dict.fromkeys(CONSTRUCTORS, _Rules.construct),
    aten.index.Tensor: _Rules.index,
}


def _is_square(x) -> bool:
    while isinstance(x, fx.Node) and x.target in (aten.to.dtype, aten._to_copy.default):
        x = x.args[0]
    if not isinstance(x, fx.Node):
        return False
    if x.target is aten.pow.Tensor_Scalar:
        return x.args[1] == 2
    if x.target is aten.square.default:
        return True
    return x.target is aten.mul.Tensor and x.args[0] is x.args[1]


def _arg(node: fx.Node, i: int, default=None):
    return node.args[i] if len(node.args) > i else default


def _unit_before(d: Dims, axes: list[int], k: int) -> int | None:
    """The size-1 axis just before position k of a shape, if there is one."""
    return axes[k - 1] if k > 0 and d.size[axes[k - 1]] == 1 else None


def _lt(a, b) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a < b
    return len(str(a)) < len(str(b))
