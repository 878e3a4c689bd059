"""Recognises residual sites: the trunk adds of a block, their carry and branches, what each branch is.

A mixin of the structure analysis (`ir/analyze.py`): its methods read the graph through the
analyser's shared state."""

from __future__ import annotations

from torch import fx

from ..ops import (
    ADD,
    ATTENTION_OPS,
    is_call,
    strip,
)
from ..structure import (
    Residual,
)


class SiteRecogniser:
    def _site(self, add: fx.Node, trunk: set, bset: set, desc: set, path: str) -> Residual | None:
        read = carry = None
        if add in self.writes:
            carry, read, *branches = self.writes[add]
            leaves = [carry, *branches]
        elif is_call(add, ADD) and "archfx_scheme" not in add.meta:
            leaves = self._add_leaves(add, trunk, desc)
        else:
            return None
        carries = [leaf for leaf in leaves if leaf in trunk or strip(leaf) in trunk]
        if len(carries) != 1 or len(leaves) < 2:
            return None
        carry = carries[0]
        branches = [leaf for leaf in leaves if leaf is not carry]
        before = self.ancestors(carry, bset) | {carry}
        carry_desc = self.descendants(carry, bset)
        parts = []
        all_nodes = set()
        for h in branches:
            nodes = (self.ancestors(h, bset) | {h}) - before
            all_nodes |= nodes
            parts.append(self._classify(h, nodes, carry_desc, path))
        site = Residual(
            kind="other", placement="none", add=add, carry=carry, branches=branches, nodes=all_nodes
        )
        for kind, obj in parts:
            if kind in ("attention", "cross_attention") and site.attention is None:
                site.attention = obj
            elif kind == "mlp" and site.mlp is None:
                site.mlp = obj
            elif kind == "moe" and site.moe is None:
                site.moe = obj
        site.kind = "parallel" if len(parts) > 1 else parts[0][0]
        site.pre_norm = self._norm_from(carry if read is None else read, all_nodes)
        if len(branches) == 1:
            site.output_norm = self._norm_ending_at(branches[0], all_nodes)
        site.post_norm = self._norm_from(add, bset, on=trunk)
        if site.kind == "parallel":
            site.placement = "parallel"
        elif site.post_norm:
            site.placement = "post"
        elif site.pre_norm and site.output_norm:
            site.placement = "sandwich"
        elif site.pre_norm:
            site.placement = "pre"
        elif site.output_norm:
            site.placement = "output"
        return site

    def _add_leaves(self, add: fx.Node, trunk: set, desc: set) -> list:
        """Operands of a tree of adds (through identity ops) hanging off the trunk."""
        leaves = []
        for o in add.args[:2]:
            if not isinstance(o, fx.Node):
                return []
            inner = strip(o)
            if (
                is_call(inner, ADD)
                and inner not in trunk
                and len(inner.users) == 1
                and all(
                    isinstance(a, fx.Node) and (a in desc or strip(a) in trunk)
                    for a in inner.args[:2]
                )
            ):
                sub = self._add_leaves(inner, trunk, desc)
                if sub:
                    leaves.extend(sub)
                    continue
            leaves.append(o)
        return leaves

    def _classify(self, h: fx.Node, nodes: set, carry_desc: set, path: str):
        ordered = self.sorted(nodes)
        cores = [n for n in ordered if is_call(n, ATTENTION_OPS) or self._is_softmax_attention(n)]
        if cores:
            if len(cores) > 1:
                self.remarks.append(
                    f"{path}: branch with {len(cores)} attention kernels; using the first"
                )
            att = self._attention(cores[0], nodes, carry_desc)
            if att is not None:
                return ("cross_attention" if att.cross else "attention"), att
            self.remarks.append(
                f"{path}: attention kernel {cores[0].name} without recognisable q/k/v projections"
            )
            return "other", None
        moe = self._moe(ordered)
        if moe is not None:
            return "moe", moe
        mlp = self._mlp(h, ordered)
        if mlp is not None:
            return "mlp", mlp
        return "other", None
