"""Recognises blocks: repeated modules (nn_module_stack) or indexed calls, their stream input and output, periodic merges.

A mixin of the structure analysis (`ir/analyze.py`): its methods read the graph through the
analyser's shared state."""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass, field

import networkx as nx
import torch
from torch import fx

from ..ops import (
    is_float,
    is_heavy,
    is_identity,
    last_dim,
    shape,
    strip,
)
from ..structure import (
    Block,
)
from .walks import INDEX, common_path, reach


class BlockRecogniser:
    def _module_units(self) -> list[_Unit]:
        """Blocks as module calls: the innermost calls that repeat (the same module called
        again, items of a container, or same-class siblings) and hold a whole residual site —
        the add and every op of its branch. A call whose repeated sub-calls hold sites is split
        into them only when they are of one class (stages of blocks); calls of several classes
        inside (T5's self-attention, cross-attention and feed-forward layers) make it the block.
        """
        calls: dict[tuple[str, str], _Call] = {}
        for n in self.nodes:
            if n.op != "call_function":
                continue
            parent = None
            for key, (path, kind) in (n.meta.get("nn_module_stack") or {}).items():
                if not path:
                    continue
                # a copied block (add-layers) keeps its template's keys under a new path
                call = calls.get((key, path))
                if call is None:
                    call = calls[(key, path)] = _Call(key, path, str(kind), parent)
                call.nodes.add(n)
                parent = call
        if not calls:
            return []
        sites = self._candidate_sites
        by_path: dict[str, list[_Call]] = {}
        for c in calls.values():
            by_path.setdefault(c.path, []).append(c)
        siblings: dict[tuple, set] = {}
        for c in calls.values():
            siblings.setdefault((c.path.rpartition(".")[0], c.kind), set()).add(c.path)
        units = []
        for c in calls.values():
            member = (
                INDEX.match(c.path.rpartition(".")[2])
                or len(by_path[c.path]) > 1
                or len(siblings[(c.path.rpartition(".")[0], c.kind)]) > 1
            )
            if member and any(
                add in c.nodes and carry not in c.nodes and branch <= c.nodes
                for add, carry, branch in sites
            ):
                units.append(c)
        unit_set = set(units)
        inner: dict[_Call, list[_Call]] = {c: [] for c in units}
        for c in units:
            p = c.parent
            while p is not None and p not in unit_set:
                p = p.parent
            if p is not None:
                inner[p].append(c)

        def blocks_of(c: _Call) -> list[_Call]:
            kids = inner[c]
            if kids and len({k.kind for k in kids}) == 1:
                return [b for k in kids for b in blocks_of(k)]
            return [c]

        tops = [c for c in units if not any(c in kids for kids in inner.values())]
        chosen = [b for c in tops for b in blocks_of(c)]
        chosen.sort(key=self._first_op)
        out = []
        for c in chosen:  # the k-th call of a module (k > 0) shares the first call's weights
            k = sorted(by_path[c.path], key=self._first_op).index(c)
            out.append(
                _Unit(
                    path=f"{c.path}@{k}" if k else c.path,
                    nodes=self.sorted(c.nodes),
                    shares=c.path if k else None,
                    has_site=True,
                )
            )
        return out

    def _first_op(self, call: _Call) -> int:
        return min(self.order[n] for n in call.nodes)

    @functools.cached_property
    def _candidate_sites(self) -> list[tuple[fx.Node, fx.Node, set]]:
        """Every `x + f(x)` of the graph where f holds a projection or attention: (add, x, the
        nodes of f). The residual sites of blocks are among them; the consistency gate checks
        that every one outside a block is accounted for."""
        out = []
        for add in self.nodes:
            ops = self.operands(add)
            if (
                ops is None
                or not is_float(add)
                or "archfx_scheme" in add.meta
                and add not in self.writes
            ):
                continue
            ops = [o for o in ops if isinstance(o, fx.Node)]
            if len(ops) != 2:
                continue
            for x, f in (ops, ops[::-1]) if add not in self.writes else (ops,):
                if shape(x) != shape(add) or x.op == "get_attr":
                    continue
                anc = reach(f, self._all, lambda n: n.all_input_nodes) | {f}
                if strip(x) not in anc and x not in anc:
                    continue
                branch = {  # tensors only: sizes read off the stream (sym_size) are not f
                    n
                    for n in anc & (reach(x, self._all, lambda n: n.users) - {add})
                    if isinstance(n.meta.get("val"), torch.Tensor)
                }
                if any(is_heavy(n) or self.linear(n) for n in branch):
                    out.append((add, x, branch))
                    break
        return out

    def _indexed_units(self) -> list[_Unit]:
        """Blocks from module paths: the outermost integer-indexed container (the rule for
        blocks that are containers without a forward of their own — a loop over ModuleDicts —
        whose ops run in the module that owns the stack: an op there joins the block whose
        values it reads, when it reads values of exactly one block)."""
        groups: OrderedDict = OrderedDict()
        owner: dict[fx.Node, tuple] = {}
        loose: list[tuple[fx.Node, str]] = []
        for n in self.nodes:
            stack = n.meta.get("nn_module_stack")
            if n.op != "call_function":
                continue
            path = list(stack.values())[-1][0] if stack else ""
            parts = [p.split("@")[0] for p in path.split(".")] if path else []
            key = next(
                (
                    (".".join(parts[:i]), int(p))
                    for i, p in enumerate(parts)
                    if i > 0 and INDEX.match(p)
                ),
                None,
            )
            if key is not None:
                item = f"{key[0]}.{key[1]}"
                call = next(  # the item's call number: one module applied again is a new block
                    (
                        _call_number(k)
                        for k, (p, _) in stack.items()
                        if p == item or p.startswith(item + ".")
                    ),
                    0,
                )
                key = (*key, call)
                groups.setdefault(key, []).append(n)
                owner[n] = key
            else:
                loose.append((n, path))
        stacks = {key[0] for key in groups}
        for n, path in loose:  # topological order: chains of adds inherit step by step
            if not any(st == path or st.startswith(path + ".") or path == "" for st in stacks):
                continue
            keys = {owner[a] for a in n.all_input_nodes if a in owner}
            if keys:
                # the stream from one block and a branch of the next (`x = attn(x) + x` in a
                # loop over ModuleList pairs): the add belongs to the later block
                key = max(keys, key=lambda k: self.order[groups[k][0]])
                if key[0] == path or key[0].startswith(path + ".") or path == "":
                    groups[key].append(n)
                    owner[n] = key
        branches = set().union(*(branch for _, _, branch in self._candidate_sites))
        return [  # a group no residual branch runs through (an embedding's Sequential) is none
            _Unit(
                f"{stack}.{idx}" + (f"@{call}" if call else ""),
                self.sorted(nodes),
                shares=f"{stack}.{idx}" if call else None,
            )
            for (stack, idx, call), nodes in groups.items()
            if branches & set(nodes)
        ]

    def _merge_periodic(self, blocks: list[Block]) -> list[Block]:
        """Blocks whose sites alternate with a period (x-transformers' attention, feed-forward,
        attention, … layers; Residual(attention), Residual(feed-forward) items) merged into
        units of that period, so every block of a stack has the same sites."""
        kinds = [tuple(r.kind for r in b.residuals) for b in blocks]
        if len(set(kinds)) == 1:
            return blocks
        for p in range(2, len(blocks) // 2 + 1):
            if len(blocks) % p == 0 and all(kinds[i] == kinds[i % p] for i in range(len(blocks))):
                groups = [blocks[i : i + p] for i in range(0, len(blocks), p)]
                names = [common_path([b.path for b in g], strip_last=False) for g in groups]
                if len(set(names)) != len(names):  # items of one container: name the range
                    names = [f"{g[0].path}-{g[-1].path.rpartition('.')[2]}" for g in groups]
                merged_name = {
                    b.path: name for g, name in zip(groups, names, strict=True) for b in g
                }
                merged = [
                    Block(
                        0,
                        "",
                        name,
                        g[0].input,
                        g[-1].output,
                        [r for b in g for r in b.residuals],
                        set().union(*(b.nodes for b in g)),
                        shares=merged_name.get(g[0].shares, g[0].shares),
                    )
                    for g, name in zip(groups, names, strict=True)
                ]
                self.remarks.append(
                    f"blocks of {p} alternating sites ({' | '.join('+'.join(k) for k in kinds[:p])}) "
                    f"taken as one layer each"
                )
                return merged
        return blocks

    def _block(self, unit: _Unit, prev_out: fx.Node | None) -> Block | None:
        block = self._read_block(unit, prev_out)
        if isinstance(block, str):
            # a module call holding a whole residual site is a block; one that cannot be read
            # leaves the structure partial (an integer path alone is only a hint: a remark)
            (self._skipped if unit.has_site else self.remarks).append(
                f"{unit.path}: {'not read' if unit.has_site else 'skipped'}, {block}"
            )
            return None
        return block

    def _read_block(self, unit: _Unit, prev_out: fx.Node | None) -> Block | str:
        path, bnodes = unit.path, unit.nodes
        bset = set(bnodes)
        inputs = []
        for n in bnodes:
            for a in n.all_input_nodes:
                if a not in bset and a.op != "get_attr" and a not in inputs:
                    inputs.append(a)
        operands = {
            c
            for n in bnodes
            for o in self.operands(n) or ()
            if isinstance(o, fx.Node)
            for c in _identity_chain(o)
        }
        cands = [x for x in inputs if is_float(x) and x in operands]
        if not cands:
            return "no input reaches a residual add"
        x = prev_out if prev_out in cands else cands[0]
        d, rank = last_dim(x), len(shape(x))
        outs = [
            n
            for n in bnodes
            if any(u not in bset for u in n.users)
            and is_float(n)
            and last_dim(n) == d
            and len(shape(n)) == rank
        ]
        desc = self.descendants(x, bset)
        outs = [n for n in outs if n in desc]
        if not outs:
            return "no block output depends on its stream input"
        y = self.sorted(outs)[-1]
        trunk = self._trunk(x, y, desc)
        residuals = []
        trunk_set = set(trunk)
        for t in trunk[1:]:
            site = self._site(t, trunk_set, bset, desc, path)
            if site is not None:
                residuals.append(site)
        if not residuals:
            return "no residual add on the stream"
        return Block(0, "", path, x, y, residuals, bset, shares=unit.shares)

    def _trunk(self, x: fx.Node, y: fx.Node, desc: set) -> list[fx.Node]:
        g = nx.DiGraph()
        g.add_node(x)
        for n in [x, *desc]:
            for u in n.users:
                if u in desc:
                    g.add_edge(n, u)
        idom = nx.immediate_dominators(g, x)
        chain = [y]
        while chain[-1] is not x:
            chain.append(idom[chain[-1]])
        return chain[::-1]


@dataclass(eq=False)
class _Call:
    """One call of a module (torch.export's nn_module_stack key): its ops, and the call that
    made it."""

    key: str
    path: str
    kind: str  # the module's class
    parent: _Call | None
    nodes: set = field(default_factory=set)


@dataclass
class _Unit:
    """Ops taken as one block before its analysis."""

    path: str
    nodes: list
    shares: str | None = None  # the block whose module this one calls again
    has_site: bool = False  # holds a whole residual site (so it must be read)


def _call_number(key: str) -> int:
    """torch.export's nn_module_stack key counts a module's calls: `…layers_0@2` is its third."""
    head, _, n = key.rpartition("@")
    return int(n) if head and n.isdigit() else 0


def _identity_chain(node: fx.Node) -> list[fx.Node]:
    chain = [node]
    while is_identity(chain[-1]):
        chain.append(chain[-1].args[0])
    return chain
