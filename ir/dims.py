"""Coupled-dimension analysis: which tensor axes, parameter axes and shape constants of a graph
must change together when one dimension grows.

Every axis of every tensor in the graph (node values and parameters) gets a dimension id.
Ops say which ids are equal (elementwise ops, contractions, norms, attention) and how ids are
built from others: a reshape that splits 576 into 9 × 64 makes the 576 axis the row-major
*product* (9, 64); a slice, split or concatenation makes an axis a *concatenation* of parts.
Equal ids are merged (union-find) and their definitions unified part by part, so structure
found anywhere holds everywhere: RoPE's rotate-half (`cat(-x2, x1)` added to `x`) makes the
head dimension `cat(X, X)` for one half-dimension X; GQA makes the query-head axis the product
(kv heads, query heads per kv head); a fused QKV projection's rows are `cat(Q, K, V)`.

Growing an *atomic* id (one with no definition) then fixes the new size and the index layout
of every axis built from it, and the literal shape arguments (view sizes, split sizes, slice
bounds, norm shapes) that name those sizes. This is the mirror image of Torch-Pruning's
dependency groups; nothing here reads module or parameter names.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from .memory import WRITE
from .ops import (
    ATTENTION_OPS,
    CONSTRUCTORS,
    DIMS_IGNORED,
    ELEMENTWISE,
    REDUCTIONS,
    SOFTMAX,
    aten,
    is_pointwise,
)


@dataclass
class Literal:
    """An int in a node's arguments that is the size (or a part's offset) of a dimension."""

    node: fx.Node
    path: tuple  # where in node.args: (arg index,) or (arg index, list index)
    dim: int  # the dimension id whose size it is
    offset_of: tuple = ()  # for slice bounds: (cat id, part index) — the value is an offset
    # (growth finds the boundary by its old value: later slices may cut the parts finer)
    split_parts: tuple = ()  # for aten.split's one size: every part's id (they may diverge)


@dataclass
class Reduction:
    """A reduction over dimension ids (mean, var, softmax, norms): growth must keep its value."""

    node: fx.Node
    # "mean" | "mean_sq" (a mean of squares: RMS) | "sum" | "norm2" (‖x‖₂) | "max" | "var" |
    # "softmax"
    # | "layer_norm" | "rms_norm"
    kind: str
    dims: list[int]


@dataclass
class Dims:
    """The result: dimension ids of every axis, their definitions and the literals naming them."""

    parent: dict[int, int] = field(default_factory=dict)
    size: dict[int, object] = field(default_factory=dict)  # int, or a sympy expression
    defn: dict[int, tuple[str, list[int]]] = field(default_factory=dict)  # root -> (kind, parts)
    frozen: dict[int, str] = field(default_factory=dict)  # root -> why it cannot grow
    axes: dict[fx.Node, list[int]] = field(default_factory=dict)
    params: dict[str, list[int]] = field(default_factory=dict)  # get_attr target -> axis ids
    literals: list[Literal] = field(default_factory=list)
    reductions: list[Reduction] = field(default_factory=list)
    opaque: list[tuple[fx.Node, list[int]]] = field(default_factory=list)  # ops not understood

    # union-find ---------------------------------------------------------------------------

    def new(self, size) -> int:
        i = len(self.parent)
        self.parent[i] = i
        self.size[i] = size
        return i

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            self.freeze(ra, f"axes of sizes {self.size[ra]} and {self.size[rb]} meet")
            self.freeze(rb, f"axes of sizes {self.size[ra]} and {self.size[rb]} meet")
            return
        self.parent[rb] = ra
        if rb in self.frozen:
            self.frozen.setdefault(ra, self.frozen.pop(rb))
        da, db = self.defn.pop(ra, None), self.defn.pop(rb, None)
        if da is None or db is None:
            if da or db:
                self.defn[ra] = da or db
            return
        self.defn[ra] = da
        self._unify(ra, da, db)

    def define(self, i: int, kind: str, parts: list[int]) -> None:
        """Axis `i` is the product or concatenation of `parts` (in order)."""
        r = self.find(i)
        if r in [self.find(p) for p in parts]:
            return
        if r not in self.defn:
            self.defn[r] = (kind, list(parts))
        else:
            self._unify(r, self.defn[r], (kind, list(parts)))

    def _unify(self, root: int, da, db) -> None:
        (ka, pa), (kb, pb) = da, db
        sa = [self.size[self.find(p)] for p in pa]
        sb = [self.size[self.find(p)] for p in pb]
        if ka == kb and sa == sb:
            for x, y in zip(pa, pb, strict=True):
                self.union(x, y)
        elif ka == kb == "cat" and _common(sa, sb):
            self._refine(root, pa, pb)
        elif ka == "prod" and kb == "cat" or ka == "cat" and kb == "prod":
            self.freeze(root, "it is split both into heads and into parts")
        else:
            self.freeze(root, f"it is split two ways ({ka} {sa} and {kb} {sb})")

    def _refine(self, root: int, pa: list[int], pb: list[int]) -> None:
        """Two concatenations of one axis with different cuts: cut both at every boundary."""
        cuts = sorted(
            set(_offsets([self.size[self.find(p)] for p in pa]))
            | set(_offsets([self.size[self.find(p)] for p in pb]))
        )
        pieces = [self.new(b - a) for a, b in zip(cuts, cuts[1:], strict=False)]
        for parts in (pa, pb):
            at = 0
            for p in parts:
                n = self.size[self.find(p)]
                inside = [
                    q
                    for q, (a, _) in zip(pieces, zip(cuts, cuts[1:], strict=False), strict=True)
                    if at <= a < at + n
                ]
                if len(inside) == 1:
                    self.union(p, inside[0])
                else:
                    self.define(p, "cat", inside)
                at += n
        self.defn[root] = ("cat", pieces)

    def freeze(self, i: int, why: str) -> None:
        self.frozen.setdefault(self.find(i), why)

    # reading --------------------------------------------------------------------------------

    def of(self, node: fx.Node, axis: int) -> int:
        return self.find(self.axes[node][axis])

    def parts(self, i: int) -> tuple[str, list[int]] | None:
        d = self.defn.get(self.find(i))
        return (d[0], [self.find(p) for p in d[1]]) if d else None

    def atoms(self, i: int) -> list[int]:
        """The atomic ids `i` is built from, in layout order."""
        d = self.parts(i)
        if d is None:
            return [self.find(i)]
        return [a for p in d[1] for a in self.atoms(p)]

    def within(self, i: int) -> set[int]:
        """`i` and every id it is built from, composite or atomic."""
        d = self.parts(i)
        out = {self.find(i)}
        for p in d[1] if d else ():
            out |= self.within(p)
        return out

    def contains(self, i: int, atom: int) -> bool:
        return self.find(atom) in self.atoms(i)

    def frozen_reason(self, atom: int) -> str | None:
        """Why `atom` cannot grow: it, or an axis built from it, is split inconsistently."""
        for root, why in self.frozen.items():
            if self.contains(root, atom):
                return why
        return None


def analyze_dims(gm: fx.GraphModule) -> Dims:
    """Build the dimension ids of every axis of `gm` (node `meta['val']`s must be current)."""
    d = Dims()
    by_tensor: dict[int, list[int]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            t = _attr(gm, node.target)
            if not isinstance(t, torch.Tensor):
                continue
            if id(t) not in by_tensor:
                by_tensor[id(t)] = [d.new(int(s)) for s in t.shape]
            d.axes[node] = by_tensor[id(t)]
            d.params[node.target] = d.axes[node]
        else:
            v = node.meta.get("val")
            if isinstance(v, torch.Tensor):
                d.axes[node] = [d.new(_size(s)) for s in v.shape]
    for node in gm.graph.nodes:
        if node.op == "call_function":
            _Rules(d, node).apply()
    return d


# op rules ---------------------------------------------------------------------------------


class _Rules:
    def __init__(self, d: Dims, node: fx.Node):
        self.d, self.n = d, node

    def ax(self, x) -> list[int] | None:
        return self.d.axes.get(x) if isinstance(x, fx.Node) else None

    def apply(self) -> None:
        t = self.n.target
        out = self.ax(self.n)
        if t in DIMS_IGNORED or "_assert" in str(t):
            return
        if t in ELEMENTWISE or is_pointwise(self.n):
            return self.broadcast(out)
        if t in (aten.linear.default,):
            return self.linear(self.n.args[0], self.n.args[1], _arg(self.n, 2), out)
        if t is aten.addmm.default:
            b, x, w = self.n.args[:3]
            self.matmul(x, w, out)
            if self.ax(b):
                self.d.union(self.ax(b)[-1], out[-1])
            return None
        if t in (aten.mm.default, aten.bmm.default, aten.matmul.default):
            return self.matmul(self.n.args[0], self.n.args[1], out)
        if t is aten.baddbmm.default:
            self.matmul(self.n.args[1], self.n.args[2], out)
            return self.broadcast(out, [self.n.args[0]])
        if t is aten.embedding.default:
            w, idx = self.n.args[:2]
            self.d.union(self.ax(w)[1], out[-1])
            return self.same(self.ax(idx), out[:-1])
        if t in (aten.layer_norm.default, aten.rms_norm.default):
            return self.norm(out)
        if t in REDUCTIONS:
            return self.reduce(REDUCTIONS[t], out)
        if t is aten.linalg_vector_norm.default and _arg(self.n, 1, 2) == 2:
            return self.norm2(out)
        if t in SOFTMAX or t is aten.log_softmax.int:
            x = self.ax(self.n.args[0])
            self.same(x, out)
            dim = self.n.args[1] % len(x)
            self.d.reductions.append(Reduction(self.n, "softmax", [x[dim]]))
            return None
        if t in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
            return self.reshape(self.ax(self.n.args[0]), out, sizes_at=1)
        if t in (aten.expand.default, aten.broadcast_to.default):
            return self.expand(out)
        if t is aten.expand_as.default:  # x broadcast to other's shape
            return self.broadcast(out)
        if t is aten.view_as.default:  # x in other's shape
            x, other = (self.ax(a) for a in self.n.args[:2])
            self.same(other, out)
            if [self.d.size[a] for a in x] == [self.d.size[a] for a in out]:
                return self.same(x, out)
            return self.opaque()
        if t is aten.unsqueeze.default:
            x = self.ax(self.n.args[0])
            dim = self.n.args[1] % len(out)
            return self.same(x, out[:dim] + out[dim + 1 :])
        if t in (aten.squeeze.dim, aten.squeeze.default, aten.squeeze.dims):
            return self.squeeze(out)
        if t is aten.transpose.int:
            x = list(self.ax(self.n.args[0]))
            a, b = (i % len(x) for i in self.n.args[1:3])
            x[a], x[b] = x[b], x[a]
            return self.same(x, out)
        if t is aten.permute.default:
            x = self.ax(self.n.args[0])
            return self.same([x[i % len(x)] for i in self.n.args[1]], out)
        if t in (aten.t.default, aten.numpy_T.default):
            return self.same(list(reversed(self.ax(self.n.args[0]))), out)
        if t is aten.flatten.using_ints:
            x = self.ax(self.n.args[0])
            s, e = (_arg(self.n, 1, 0) % len(x)), (_arg(self.n, 2, -1) % len(x))
            self.same(x[:s] + x[e + 1 :], out[:s] + out[s + 1 :])
            return self.d.define(out[s], "prod", x[s : e + 1])
        if t is aten.unflatten.int:
            x = self.ax(self.n.args[0])
            dim = self.n.args[1] % len(x)
            k = len(self.n.args[2])
            self.same(x[:dim] + x[dim + 1 :], out[:dim] + out[dim + k :])
            self.d.define(x[dim], "prod", out[dim : dim + k])
            for j, s in enumerate(self.n.args[2]):
                if isinstance(s, int) and s != -1:
                    self.d.literals.append(Literal(self.n, (2, j), out[dim + j]))
            return None
        if t is aten.slice.Tensor:
            return self.slice(out)
        if t is aten.select.int:
            x = self.ax(self.n.args[0])
            dim = self.n.args[1] % len(x)
            return self.same(x[:dim] + x[dim + 1 :], out)
        if t in (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default):
            return self.split()
        if t is aten.unbind.int:  # each item is a select along dim
            x = self.ax(self.n.args[0])
            dim = _arg(self.n, 1, 0) % len(x)
            for u in self.n.users:
                if u.target is operator.getitem:
                    self.same(x[:dim] + x[dim + 1 :], self.ax(u))
            return None
        if t is aten.cat.default:
            return self.cat(out)
        if t is aten.stack.default:
            dim = _arg(self.n, 1, 0) % len(out)
            for x in self.n.args[0]:
                self.same(self.ax(x), out[:dim] + out[dim + 1 :])
            return None
        if t is operator.getitem:
            return None  # handled by the op producing the tuple
        if t in ATTENTION_OPS:
            return self.attention(out)
        if t is WRITE:  # (addresses, contents) written as they are
            for u in self.n.users:
                if u.target is operator.getitem:
                    self.same(self.ax(self.n.args[u.args[1]]), self.ax(u))
            return None
        if t in (aten.conv2d.default, aten.convolution.default):
            x, w = self.ax(self.n.args[0]), self.ax(self.n.args[1])
            self.d.union(x[1], w[1])
            self.d.union(out[1], w[0])
            b = self.ax(_arg(self.n, 2))
            if b:
                self.d.union(b[0], out[1])
            return self.same(x[:1], out[:1])
        if t in (aten.repeat_interleave.self_int, aten.repeat.default):
            return self.repeat(out)
        if t in CONSTRUCTORS:
            sizes = self.n.args[1] if t.__name__.startswith("new_") else self.n.args[0]
            for j, s in enumerate(sizes):
                if isinstance(s, int) and out is not None:
                    self.d.literals.append(
                        Literal(self.n, (1 if t.__name__.startswith("new_") else 0, j), out[j])
                    )
            return None
        if t is aten.index.Tensor:
            x = self.ax(self.n.args[0])
            idx = self.n.args[1]
            if out is not None and all(i is not None for i in idx):
                k = len(idx)
                rest = len(x) - k
                if rest:
                    self.same(x[k:], out[len(out) - rest :])
                return None
        self.opaque()
        return None

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
        for x in inputs:
            xa = self.ax(x)
            if xa is None:
                continue
            for k in range(1, min(len(xa), len(out)) + 1):
                sx, so = self.d.size[xa[-k]], self.d.size[out[-k]]
                # a unit axis of an operand of the output's rank is the output's axis (nothing
                # broadcast along it): single-head q * cos keeps its head axis through RoPE
                if sx == so and (sx != 1 or len(xa) == len(out)):
                    self.d.union(xa[-k], out[-k])

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
        for xa in (aa, ba):
            for k in range(3, min(len(xa), len(out)) + 1):
                if self.d.size[xa[-k]] == self.d.size[out[-k]] != 1:
                    self.d.union(xa[-k], out[-k])
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


def _attr(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def _size(s):
    if isinstance(s, torch.SymInt):
        expr = s.node.expr
        return int(expr) if expr.is_number else expr
    return int(s)


def _unit_before(d: Dims, axes: list[int], k: int) -> int | None:
    """The size-1 axis just before position k of a shape, if there is one."""
    return axes[k - 1] if k > 0 and d.size[axes[k - 1]] == 1 else None


def _lt(a, b) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a < b
    return len(str(a)) < len(str(b))


def _offsets(sizes: list[int]) -> list[int]:
    out, at = [0], 0
    for s in sizes:
        at += s
        out.append(at)
    return out


def _common(sa: list, sb: list) -> bool:
    return all(isinstance(s, int) for s in sa + sb) and sum(sa) == sum(sb)
