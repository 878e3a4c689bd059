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

from dataclasses import dataclass, field

import torch
from torch import fx


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
    # roots that are a model dimension: a parameter's axis, or a part of a defined axis (a
    # head axis split off by a view). A unit axis that is neither (a mask's, cos's) only
    # broadcasts: `dim_rules` keeps it apart from the one-head axis it meets
    anchored: set[int] = field(default_factory=set)
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
        if rb in self.anchored:
            self.anchored.add(ra)
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
        self.anchored.update(self.find(p) for p in parts)
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
        self.anchored.update(pieces)

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
            d.anchored.update(d.axes[node])
        else:
            v = node.meta.get("val")
            if isinstance(v, torch.Tensor):
                d.axes[node] = [d.new(_size(s)) for s in v.shape]
    from .dim_rules import apply_rule  # the op-rule table (it builds on Dims)

    for node in gm.graph.nodes:
        if node.op == "call_function":
            apply_rule(d, node)
    return d


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


def _offsets(sizes: list[int]) -> list[int]:
    out, at = [0], 0
    for s in sizes:
        at += s
        out.append(at)
    return out


def _common(sa: list, sb: list) -> bool:
    return all(isinstance(s, int) for s in sa + sb) and sum(sa) == sum(sb)
