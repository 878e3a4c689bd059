"""Structure analysis: recognise embeddings, blocks, residual sites, norms, attention and MLPs.

Blocks come from `nn_module_stack` (the outermost integer-indexed module container); everything
inside a block comes from dataflow:

* the **stream input** is the block input that reaches a residual add directly;
* the **trunk** is the chain of dominators of the block output from the stream input: every
  path from input to output passes through it (networkx's dominator algorithm);
* each trunk **add** whose operand tree holds the incoming trunk node is a residual site; its
  other operands are the branches (two or more: a parallel site);
* norms are recognised by their arithmetic (a LayerNorm/RMSNorm op, or a mean-of-squares and
  rsqrt), attention by its kernel (SDPA, or a softmax over q·kᵀ), MLPs as the remaining
  branches with projections. No module, class or parameter names are consulted.
"""

from __future__ import annotations

import functools
import re
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import networkx as nx
import torch
from torch import fx, nn

from . import consistency
from .errors import AnalysisError, first_line
from .ops import (
    ACTIVATIONS,
    ADD,
    ATTENTION_OPS,
    CLAMPS,
    MATMUL,
    NORM_OPS,
    POSITION_OPS,
    SHAPE,
    SOFTMAX,
    Linear,
    as_linear,
    aten,
    is_assert,
    is_call,
    is_float,
    is_heavy,
    is_identity,
    is_pointwise,
    last_dim,
    param_target,
    shape,
    strip,
)
from .structure import MLP, Attention, Block, Embedding, Head, MoE, Norm, Residual, Stack, Structure

_INDEX = re.compile(r"^\d+$")
_L2 = aten.linalg_vector_norm.default  # x / ‖x‖ · √d: an RMSNorm written with F.normalize
_MAX_TOKEN_TYPES = 16


def analyze(graph) -> Structure:
    """The Structure of a captured `Graph` (cached on the graph as `graph.structure`)."""
    try:
        return _Analyzer(graph).run()
    except AnalysisError:
        raise
    except Exception as exc:  # a construct the analysis did not foresee: refuse, never guess
        raise AnalysisError(
            f"the structure analysis stopped on this graph ({first_line(exc)}); archfx "
            "refuses to guess — `archfx inspect --debug` shows where"
        ) from exc


class _Analyzer:
    def __init__(self, graph):
        self.graph = graph
        self.nodes = list(graph.gm.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.params = {n.target: graph.tensor(n.target) for n in self.nodes if n.op == "get_attr"}
        self.remarks: list[str] = []
        self._linear_cache: dict = {}
        self._all = set(self.nodes)
        self._skipped: list[str] = []  # blocks that hold a site and could not be read
        self.by_name = {n.name: n for n in self.nodes}
        # a site scheme's update (DDL) stands for the residual add it replaced:
        # [carry, what the site read from the state, *branches]
        self.writes = {n: self._update(n) for n in self.nodes if "archfx_site" in n.meta}

    # helpers ---------------------------------------------------------------------------------

    def linear(self, node) -> Linear | None:
        if node not in self._linear_cache:
            self._linear_cache[node] = as_linear(node, self.params)
        return self._linear_cache[node]

    def ancestors(self, node: fx.Node, within: set) -> set:
        return _reach(node, within, lambda n: n.all_input_nodes)

    def descendants(self, node: fx.Node, within: set) -> set:
        return _reach(node, within, lambda n: n.users)

    def sorted(self, nodes) -> list[fx.Node]:
        return sorted(nodes, key=self.order.__getitem__)

    def _update(self, w: fx.Node) -> list[fx.Node]:
        site = w.meta["archfx_site"]

        def follow(path: list[int]) -> fx.Node:
            n = w
            for i in path:
                n = n.args[i] if i < len(n.args) else None
                if not isinstance(n, fx.Node):
                    raise AnalysisError(
                        f"the residual-scheme update {w.name} no longer reads the stream and "
                        "branches it was made from"
                    )
            return n

        carry = follow(site["carry"])
        read = carry if site["read"] is None else self.by_name.get(site["read"])
        if read is None:
            raise AnalysisError(f"the residual-scheme update {w.name} lost its read {site['read']}")
        return [carry, read, *(follow(b) for b in site["branches"])]

    def operands(self, n: fx.Node) -> list | None:
        """The two operands of a residual add, or (carry, branch) of a site scheme's update."""
        if n in self.writes:
            return [self.writes[n][0], self.writes[n][2]]
        return list(n.args[:2]) if is_call(n, ADD) else None

    # driver ------------------------------------------------------------------------------------

    def run(self) -> Structure:
        units = self._module_units() or self._indexed_units()
        in_blocks = set().union(*(u.nodes for u in units)) if units else set()
        scheme = {n for n in self.nodes if "archfx_scheme" in n.meta}  # residual-scheme nodes
        outside = set(self.nodes) - in_blocks - scheme
        readouts = {n.meta["archfx_readout"]: n for n in self.nodes if "archfx_readout" in n.meta}
        chains: list[list[Block]] = []
        prev: Block | None = None
        for unit in units:
            block = self._block(unit, prev.output if prev else None)
            if block is None:
                continue
            if prev is None or not self._continues(prev.output, block.input, in_blocks):
                chains.append([])  # the stream does not continue from the last block: a new stack
            chains[-1].append(block)
            prev = block
        if not chains:
            raise AnalysisError(
                "no Transformer blocks found: archfx looks for repeated modules (the same class "
                "called more than once, or items of a container) whose forward adds a branch "
                "back onto their input"
            )
        stack_objs = []
        chains = [self._merge_periodic(blocks) for blocks in chains]
        paths = [_common_path([b.path for b in blocks]) for blocks in chains]
        shared = {p for p in paths if paths.count(p) > 1}
        paths = [  # stacks of one container (stages): named by their blocks
            blocks[0].path + (f"-{blocks[-1].path}" if len(blocks) > 1 else "")
            if path in shared
            else path
            for blocks, path in zip(chains, paths, strict=True)
        ]
        for blocks, path in zip(chains, paths, strict=True):
            for i, b in enumerate(blocks):
                b.index, b.stack = i, path
            last = readouts.get(path, blocks[-1].output)  # a rethreaded stream continues there
            final = self._norm_from(last, outside)
            stack_objs.append(Stack(path, blocks, final, final.output if final else last))
        stack_objs.sort(key=lambda s: self.order[s.blocks[0].input])
        embeddings = self._embeddings(outside)
        head = self._head(stack_objs[-1], outside, embeddings)
        d = last_dim(stack_objs[0].blocks[0].input)
        structure = Structure(d, embeddings, stack_objs, head, self.remarks)
        kernels = [
            n for n in self.nodes if is_call(n, ATTENTION_OPS) or self._is_softmax_attention(n)
        ]
        outputs = [a for a in self.nodes[-1].all_input_nodes]
        consistency.check(structure, self._candidate_sites, kernels, outputs, self._skipped)
        return structure

    # blocks from repeated computation ----------------------------------------------------------

    def _continues(self, out: fx.Node, x: fx.Node, in_blocks: set) -> bool:
        """Whether stream `x` is block output `out` carried on through light ops only (casts,
        a residual scheme's bookkeeping): the same stack. A projection (patch merging), a norm
        or another source (a decoder's embeddings) between them starts a new stack."""
        seen, todo = {out}, [out]
        while todo:
            n = todo.pop()
            if n is x or strip(x) is n:
                return True
            for u in n.users:
                light = "archfx_scheme" in u.meta or not (
                    is_heavy(u) or self.linear(u) or u in in_blocks
                )
                if u not in seen and (light or u is x):
                    seen.add(u)
                    todo.append(u)
        return False

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
                _INDEX.match(c.path.rpartition(".")[2])
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
                anc = _reach(f, self._all, lambda n: n.all_input_nodes) | {f}
                if strip(x) not in anc and x not in anc:
                    continue
                branch = {  # tensors only: sizes read off the stream (sym_size) are not f
                    n
                    for n in anc & (_reach(x, self._all, lambda n: n.users) - {add})
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
                    if i > 0 and _INDEX.match(p)
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
                names = [_common_path([b.path for b in g], strip_last=False) for g in groups]
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

    # blocks -------------------------------------------------------------------------------------

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

    # attention --------------------------------------------------------------------------------

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

    def _through(self, n: fx.Node, nodes: set) -> list[fx.Node]:
        """Users of n, looking through identity ops (dropout, casts)."""
        out = []
        for u in n.users:
            if u in nodes and is_identity(u):
                out.extend(self._through(u, nodes))
            elif u in nodes and not is_assert(u):
                out.append(u)
        return out

    def _chain(self, n: fx.Node, nodes: set) -> set:
        chain = {n}
        for u in n.users:
            if u in nodes and is_identity(u):
                chain |= self._chain(u, nodes)
        return chain

    def _linear_above(self, node: fx.Node, nodes: set) -> Linear | None:
        seen, todo = {node}, deque([node])
        while todo:
            n = todo.popleft()
            lin = self.linear(n)
            if lin is not None:
                return lin
            for a in n.all_input_nodes:
                if a not in seen and a in nodes:
                    seen.add(a)
                    todo.append(a)
        return None

    def _between(self, src: fx.Node, dst: fx.Node, nodes: set) -> list[fx.Node]:
        return self.sorted(self.descendants(src, nodes) & (self.ancestors(dst, nodes) | {dst}))

    # mlp ------------------------------------------------------------------------------------------

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

    # norms ----------------------------------------------------------------------------------------

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

    # embeddings and head ----------------------------------------------------------------------------

    def _value_ancestors(self, node: fx.Node) -> set:
        seen, todo = set(), [node]
        while todo:
            n = todo.pop()
            for a in n.all_input_nodes:
                if a not in seen and (
                    isinstance(a.meta.get("val"), torch.Tensor)
                    or a.op in ("get_attr", "placeholder")
                ):
                    seen.add(a)
                    todo.append(a)
        return seen

    def _embeddings(self, outside: set) -> list[Embedding]:
        out = []
        for n in self.nodes:
            if n not in outside:
                continue
            if is_call(n, {aten.embedding.default}):
                w = param_target(n.args[0])
                if w is None:
                    continue
                num, dim = self.params[w].shape
                idx = n.args[1]
                while is_call(idx, SHAPE) or is_identity(idx):
                    idx = idx.args[0]
                anc = self._value_ancestors(n.args[1]) | {n.args[1], idx}  # the index too
                if idx.op == "placeholder":
                    kind = "token"
                elif num <= _MAX_TOKEN_TYPES:
                    kind = "token_type"  # a position table covers every position; a type table a few ids
                elif any(a.op == "get_attr" or is_call(a, POSITION_OPS) for a in anc):
                    kind = "position"  # arange / cumsum over the sequence, or position-id buffers
                else:
                    kind = "other"
                out.append(Embedding(kind, n, w, num, dim))
            elif is_call(n, {aten.conv2d.default, aten.convolution.default}) and any(
                a.op == "placeholder" for a in self._value_ancestors(n)
            ):
                w = param_target(n.args[1])
                out.append(
                    Embedding("patch", n, w, self.params[w].shape[0], self.params[w].shape[0])
                )
        return out

    def _head(self, stack: Stack, outside: set, embeddings: list[Embedding]) -> Head | None:
        """The first projection after the last stack, or, past a transform (BERT's dense →
        GELU → LayerNorm), the one that shares the token embedding's weight (tied)."""
        tokens = [self.params[e.weight] for e in embeddings if e.kind == "token"]

        def tied(lin: Linear) -> bool:
            w = self.params[lin.weight]
            return any(t is w or t.data_ptr() == w.data_ptr() for t in tokens)

        found: list[Linear] = []
        seen, todo = set(), deque([stack.output])
        while todo:
            n = todo.popleft()
            for u in self.sorted(n.users):
                if u in seen or u not in outside:
                    continue
                seen.add(u)
                lin = self.linear(u)
                if lin is not None:
                    found.append(lin)
                todo.append(u)
        if not found:
            return None
        lin = next((f for f in found if tied(f)), found[0])
        end = lin.input
        while is_identity(end) or is_call(end, SHAPE):
            end = end.args[0]
        last = stack.blocks[-1]
        known = [stack.final_norm, *(r.post_norm for r in reversed(last.residuals))]
        norm = next(
            (k for k in known if k is not None and end in (k.output, strip(k.output))),
            None,
        ) or self._norm_ending_at(end, self._all)
        return Head(lin, tied(lin), norm)


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


def _common_path(paths: list[str], strip_last: bool = True) -> str:
    """The module path the blocks share: their common prefix ("model.layers" for
    model.layers.0 … model.layers.5; a repeated call's own path, without its call number)."""
    split = [p.split("@")[0].split(".") for p in paths]
    common = []
    for parts in zip(*split, strict=False):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    if strip_last and len(common) == min(len(s) for s in split) and len(set(map(tuple, split))) > 1:
        common = common[:-1]
    if strip_last and len(paths) == 1 and _INDEX.match(common[-1] if common else ""):
        common = common[:-1]
    return ".".join(common)


def _reach(node: fx.Node, within: set, step) -> set:
    """Nodes of `within` reachable from `node` by repeated `step` (inputs or users)."""
    seen, todo = set(), [node]
    while todo:
        for m in step(todo.pop()):
            if m in within and m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


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


def _identity_chain(node: fx.Node) -> list[fx.Node]:
    chain = [node]
    while is_identity(chain[-1]):
        chain.append(chain[-1].args[0])
    return chain


def _int_numel(s) -> int:
    total = 1
    for d in s:
        if isinstance(d, int):
            total *= d
    return total


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
