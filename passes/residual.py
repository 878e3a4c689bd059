"""The residual-scheme engine: re-thread a model's residual stream through a wider state.

Every residual scheme (SPEC.md, "A unifying view") is three maps over a stream state S:

    read  (S → the d-wide input a unit sees)
    write (the unit's output → S), including the scheme's carry
    readout (S → the d-wide stream the rest of the model reads)

plus `init` (the model's d-wide stream → S, replicating it). A *unit* is a whole block (AltUp)
or one residual site (DDL, hyper-connections). The engine does the graph surgery once for all
schemes: it creates S after each stack's input, rewires every unit's stream input to `read`,
feeds its output to `write`, and hands everything after the stack `readout`. A scheme only
says what its four maps compute, through an `Emitter` that appends ATen nodes.

Exact at init when: S starts replicated, carries keep a replicated state replicated (rows
summing to 1), writes have unit weight, and the readout's weights sum to 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from archfx.ir import Graph, PassError
from archfx.ir.ops import is_identity, strip
from archfx.ir.structure import Block, Stack

from .base import Remark


class Emitter:
    """Appends ATen nodes after a cursor; new parameters live under one owner module path."""

    def __init__(self, graph: Graph, owner: str):
        self.graph = graph
        self.g = graph.gm.graph
        self.owner = owner
        self.cursor: fx.Node | None = None
        self.created: set[fx.Node] = set()

    def at(self, node: fx.Node) -> Emitter:
        self.cursor = node
        return self

    def _insert(self, make) -> fx.Node:
        with self.g.inserting_after(self.cursor):
            node = make()
        node.meta["nn_module_stack"] = {self.owner: (self.owner, "archfx")}
        node.meta["archfx_scheme"] = self.owner  # opaque to the structure analysis
        self.created.add(node)
        self.cursor = node
        return node

    def op(self, target, *args, **kwargs) -> fx.Node:
        return self._insert(lambda: self.g.call_function(target, args, kwargs))

    def get(self, target: str) -> fx.Node:
        """Another read of an existing parameter."""
        return self._insert(lambda: self.g.get_attr(target))

    def param(self, name: str, value: torch.Tensor) -> fx.Node:
        """A new trainable parameter (stored under `owner.name`) and a get_attr node reading it."""
        target = f"{self.owner}.{name}"
        self.graph.set_tensor(target, nn.Parameter(value))
        return self.get(target)


class Scheme:
    """A residual scheme: subclasses implement the four maps with an `Emitter`."""

    granularity = "block"  # or "site"

    def init(self, em: Emitter, x: fx.Node, stack: int) -> fx.Node:
        raise NotImplementedError

    def read(self, em: Emitter, state: fx.Node, unit: int, stack: int) -> tuple[fx.Node, fx.Node]:
        """Returns (state after the carry, the d-wide input of the unit)."""
        raise NotImplementedError

    def write(
        self,
        em: Emitter,
        state: fx.Node,
        unit_in: fx.Node,
        unit_out: fx.Node,
        unit: int,
        stack: int,
    ) -> fx.Node:
        raise NotImplementedError

    def readout(self, em: Emitter, state: fx.Node, stack: int) -> fx.Node:
        raise NotImplementedError


@dataclass
class StackThreading:
    """Where the engine put a stack's state: one node per unit (after its write)."""

    stack: Stack
    init: fx.Node
    states: list[fx.Node]
    readout: fx.Node


def rethread(graph: Graph, scheme: Scheme, owner: str) -> tuple[list[StackThreading], list[Remark]]:
    """Thread every stack of `graph` through `scheme` (block granularity)."""
    if scheme.granularity != "block":
        raise PassError(f"the residual engine does not thread {scheme.granularity!r} units yet")
    structure = graph.structure
    em = Emitter(graph, owner)
    done, remarks = [], []
    for s_idx, stack in enumerate(structure.stacks):
        reason = _refuse(stack)
        if reason:
            raise PassError(f"{owner}: cannot rethread {stack.path}: {reason}")
        done.append(_thread_stack(graph, em, scheme, stack, s_idx))
    graph.gm.graph.eliminate_dead_code()
    graph.gm.recompile()
    return done, remarks


def _refuse(stack: Stack) -> str | None:
    for prev, nxt in zip(stack.blocks, stack.blocks[1:], strict=False):
        if strip(nxt.input) is not prev.output:
            return f"{nxt.path} does not read {prev.path}'s output directly (something runs between the blocks)"
    return None


def _thread_stack(
    graph: Graph, em: Emitter, scheme: Scheme, stack: Stack, s_idx: int
) -> StackThreading:
    first = stack.blocks[0]
    x0 = first.input
    state = scheme.init(em.at(x0), x0, s_idx)
    init = state
    states = []
    for u, block in enumerate(stack.blocks):
        state, unit_in = scheme.read(em.at(em.cursor), state, u, s_idx)
        _rewire_input(block, unit_in, em.created)
        y = block.output
        state = scheme.write(em.at(y), state, unit_in, y, u, s_idx)
        state.meta["archfx_state"] = (stack.path, u)  # the stream state after unit u (for probes)
        states.append(state)
        last = u == len(stack.blocks) - 1
        nxt = None if last else stack.blocks[u + 1]
        outside = [
            n
            for n in list(y.users)
            if n not in em.created
            and n not in block.nodes
            and (nxt is None or (n not in nxt.nodes and not _feeds_only(n, nxt)))
        ]
        if outside:
            out = scheme.readout(em.at(em.cursor), state, s_idx)
            out.meta["archfx_readout"] = stack.path  # where the analysis finds the stream again
            for n in outside:
                n.replace_input_with(y, out)
    return StackThreading(stack, init, states, out if outside else states[-1])


def _feeds_only(n: fx.Node, block: Block) -> bool:
    """An identity op between two blocks whose every user is in the next block."""
    return is_identity(n) and all(u in block.nodes or _feeds_only(u, block) for u in n.users)


def _rewire_input(block: Block, new: fx.Node, created: set) -> None:
    """Every use of the block's stream input (or of identity ops on it) inside the block → new."""
    x = block.input
    chain = [x]
    while is_identity(chain[-1]) and chain[-1] not in block.nodes:
        chain.append(chain[-1].args[0])
    for src in chain:
        for user in list(src.users):
            if user in block.nodes and user not in created:
                user.replace_input_with(src, new)
