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

from collections import deque

import torch
from torch import fx

from . import consistency
from .errors import AnalysisError, first_line
from .ops import (
    ADD,
    ATTENTION_OPS,
    Linear,
    as_linear,
    is_assert,
    is_call,
    is_heavy,
    is_identity,
    last_dim,
    strip,
)
from .recognise.attention import AttentionRecogniser
from .recognise.blocks import BlockRecogniser
from .recognise.embeddings import EmbeddingRecogniser
from .recognise.head import HeadRecogniser
from .recognise.mlp import MLPRecogniser
from .recognise.norms import NormRecogniser
from .recognise.sites import SiteRecogniser
from .recognise.walks import common_path, reach
from .structure import Block, Stack, Structure


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


class _Analyzer(
    BlockRecogniser,
    SiteRecogniser,
    AttentionRecogniser,
    MLPRecogniser,
    NormRecogniser,
    EmbeddingRecogniser,
    HeadRecogniser,
):
    """The analysis' shared state (nodes, order, parameters, remarks, site-scheme updates) and
    its driver; each construct's recogniser is a mixin (`ir/recognise/`)."""

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
        return reach(node, within, lambda n: n.all_input_nodes)

    def descendants(self, node: fx.Node, within: set) -> set:
        return reach(node, within, lambda n: n.users)

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
        paths = [common_path([b.path for b in blocks]) for blocks in chains]
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

    # blocks -------------------------------------------------------------------------------------

    # attention --------------------------------------------------------------------------------

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

    # norms ----------------------------------------------------------------------------------------

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
