"""The residual-scheme engine: re-thread a model's residual stream through a scheme's state.

Every residual scheme (docs/architecture.md, principle 4) is three maps over a stream state S:

    read     S → the d-wide input a unit sees (after the scheme's carry)
    write    the unit's output → S
    readout  S → the d-wide stream the rest of the model reads

plus `init` (the model's d-wide stream → S). A *unit* is a whole block (AltUp) or one
residual site (DDL, hyper-connections): the engine finds the units in the Structure, creates S
after each stack's input, rewires every unit's stream input to `read`, feeds its output to
`write`, and hands everything after the stack (or between units, for schemes whose state is
the stream itself) `readout`. A scheme only says what its maps compute, through an `Emitter`
that appends ATen nodes.

Exact at init when: S starts replicated, carries keep a replicated state replicated (rows
summing to 1), writes have unit weight, and the readout's weights sum to 1.

Schemes nest, one per granularity: a site scheme's nodes belong to the block of the site (its
`nn_module_stack`) and each update records what it replaced (`archfx_site`), so the structure
analysis still finds every block and site; a block scheme then runs each layer, updates
included, on its state, and a site scheme applied after a block scheme rewrites the sites of
the layers the block scheme runs.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
from torch import fx, nn

from archfx.ir import Graph, PassError
from archfx.ir.ops import NORM_OPS, RESHAPES, STREAM_LOCAL, aten, is_call, is_identity, strip
from archfx.ir.structure import Block, Norm, Residual, Stack

BLOCKS_WRAPPED = "the layers already run inside a block scheme's state (AltUp): one per model"
SITES_RETHREADED = (
    "the residual adds are already delta-rule updates (DDL): one site scheme per model"
)
WIDE_INSIDE_BLOCKS = (
    "a site state wider than the stream (ddl d_v > 1, hc, mhc) inside a block scheme's blocks "
    "would make every AltUp block carry it, which AltUp applied first does not: apply the site "
    "scheme before altup"
)
BLOCK_OWNERS = {"altup"}  # owners of block-granularity schemes (the others rethread sites)


class Emitter:
    """Appends ATen nodes after a cursor; new parameters live under one owner module path."""

    def __init__(self, graph: Graph, owner: str):
        self.graph = graph
        self.g = graph.gm.graph
        self.owner = owner
        self.cursor: fx.Node | None = None
        self.created: set[fx.Node] = set()
        self.module_stack: dict | None = None  # the block a site scheme's nodes belong to

    def at(self, node: fx.Node) -> Emitter:
        self.cursor = node
        return self

    def _insert(self, make) -> fx.Node:
        with self.g.inserting_after(self.cursor):
            node = make()
        node.meta["nn_module_stack"] = dict(
            self.module_stack or {self.owner: (self.owner, "archfx")}
        )
        node.meta["archfx_scheme"] = self.owner
        self.created.add(node)
        self.cursor = node
        return node

    def op(self, target, *args, **kwargs) -> fx.Node:
        return self._insert(lambda: self.g.call_function(target, args, kwargs))

    def get(self, target: str) -> fx.Node:
        """Another read of an existing parameter."""
        return self._insert(lambda: self.g.get_attr(target))

    def param(self, name: str, value: torch.Tensor, *, fresh: bool = False) -> fx.Node:
        """A new trainable parameter (stored under `owner.name`, on the device of the model's
        parameters: CPU, GPU or meta) and a get_attr node reading it. `fresh`: a layer
        add-layers inserts is exact only if its copy starts from this value (AltUp's
        coefficients: the carry must be the identity), not from its trained neighbour's."""
        target = f"{self.owner}.{name}"
        self.graph.set_tensor(target, nn.Parameter(value.to(self.graph.device)))
        node = self.get(target)
        if fresh:
            node.meta["archfx_init"] = value.detach().cpu().clone()
        return node


@dataclass
class Unit:
    """What a scheme rethreads: a block, or one residual site of a block."""

    index: int  # position in its stack
    stack: int  # stack number
    block: Block
    site: Residual | None  # None for block units
    input: fx.Node  # the stream entering the unit
    consumers: set  # nodes whose uses of `input` read the scheme's `read` instead
    outputs: list[fx.Node]  # what the unit adds to the stream (the block output, or its branches)
    replaces: fx.Node  # the node the rest of the graph reads as the stream after the unit

    @property
    def owned(self) -> set:
        """The unit's nodes: its consumers and everything from its input to `replaces`."""
        return self.consumers | between(self.input, self.replaces)

    @property
    def rank(self) -> int:
        """The rank of the stream entering the unit: 3 for (batch, sequence, features), less
        where the model flattens the tokens around a sublayer (OPT's MLP: [batch·sequence, d])."""
        return self.input.meta["val"].dim()

    @property
    def name(self) -> str:
        return f"s{self.stack}.l{self.block.index}" + (
            f".r{self.block.residuals.index(self.site)}" if self.site else ""
        )


class Scheme:
    """A residual scheme: subclasses implement the four maps with an `Emitter`."""

    granularity = "block"  # or "site"
    stream_shaped = False  # the state is the d-wide stream itself (it may pass through post-norms)
    channels = 1  # otherwise the state is [channels, *stream]

    def init(self, em: Emitter, x: fx.Node, stack: int) -> fx.Node:
        raise NotImplementedError

    def read(self, em: Emitter, state: fx.Node, unit: Unit) -> tuple[fx.Node, fx.Node]:
        """Returns (state after the carry, the d-wide input of the unit)."""
        raise NotImplementedError

    def write(
        self, em: Emitter, state: fx.Node, unit_in: fx.Node, unit_out: fx.Node, unit: Unit
    ) -> fx.Node:
        raise NotImplementedError

    def readout(self, em: Emitter, state: fx.Node, stack: int) -> fx.Node:
        raise NotImplementedError

    def close(self, em: Emitter, out: fx.Node, stack: int) -> fx.Node | None:
        """What the rest of the model reads instead of the stack's output `out` (the last
        block's, after its post-norm), for a scheme that keeps state beside the stream
        (ResiDual's accumulator); None: the readout already is what it reads."""
        return None


@dataclass
class StackThreading:
    """Where the engine put a stack's state: one node per unit (after its write)."""

    stack: Stack
    states: list[fx.Node]


def units(stack: Stack, s_idx: int, granularity: str) -> list[Unit]:
    out = []
    for block in stack.blocks:
        if granularity == "block":
            out.append(
                Unit(
                    len(out),
                    s_idx,
                    block,
                    None,
                    block.input,
                    block.nodes,
                    [block.output],
                    block.output,
                )
            )
        else:
            for r in block.residuals:
                out.append(
                    Unit(len(out), s_idx, block, r, r.carry, r.nodes, list(r.branches), r.add)
                )
    return out


def replicate(em: Emitter, x: fx.Node, n: int) -> fx.Node:
    """The state [n, *stream]: n copies of the d-wide stream (a view, no copy)."""
    rank = x.meta["val"].dim()
    return em.op(aten.expand.default, em.op(aten.unsqueeze.default, x, 0), [n] + [-1] * rank)


def mean_of_channels(em: Emitter, state: fx.Node) -> fx.Node:
    """The mean of a state's channels as x_0 + mean(x_i − x_0): x_0 exactly while they are equal
    (a rounded Σ x_i / n would not be)."""
    x0 = em.op(aten.select.int, state, 0, 0)
    spread = em.op(
        aten.mean.dim, em.op(aten.sub.Tensor, state, em.op(aten.unsqueeze.default, x0, 0)), [0]
    )
    return em.op(aten.add.Tensor, x0, spread)


def _sum_readout_norms(graph: Graph, n: int) -> list[Norm]:
    """The final norms a `readout=sum` of n channels relies on: every stack must end in one
    (LN(n·y; n²ε) = LN(y; ε)), else the readout is refused."""
    stacks = graph.structure.stacks
    missing = [s.path or "the model" for s in stacks if s.final_norm is None]
    if missing and n > 1:
        raise PassError(
            f"readout=sum is exact only before a final norm, and {', '.join(missing)} has none; "
            "use readout=mean"
        )
    return [s.final_norm for s in stacks] if n > 1 else []


def _scale_eps(norm: Norm, factor: int) -> None:
    """Multiply a norm's eps by `factor` (in the op's arguments or in its `+ eps` node)."""
    for n in norm.nodes:
        if is_call(n, NORM_OPS):
            idx = 4 if n.target != aten.rms_norm.default else 3
            args = list(n.args) + [None] * (idx + 1 - len(n.args))
            eps = (
                args[idx]
                if args[idx] is not None
                else (1e-5 if n.target != aten.rms_norm.default else None)
            )
            if eps is None:
                raise PassError(
                    "readout=sum needs the final norm's eps, which this rms_norm leaves to the dtype"
                )
            args[idx] = eps * factor
            n.args = tuple(args)
            return
        if (
            is_call(n, {aten.add.Tensor})
            and not isinstance(n.args[1], fx.Node)
            and norm.eps is not None
            and n.args[1] == norm.eps
        ):
            n.args = (n.args[0], n.args[1] * factor)
            return
    raise PassError("readout=sum could not find the final norm's eps to rescale")


def stream_of(graph: Graph) -> tuple[int, torch.dtype]:
    """What a scheme is built for: the stream's width and dtype (its rank is each unit's)."""
    return graph.structure.hidden_size, graph.structure.blocks[0].input.meta["val"].dtype


def owned_parameters(graph: Graph, owner: str) -> int:
    return sum(p.numel() for n, p in graph.gm.named_parameters() if n.startswith(owner + "."))


def refuse_after_block_scheme(before) -> None:
    """A site state wider than the stream cannot live inside a block scheme's blocks."""
    if any("block-residual" in p.invalidates for p in before):
        raise PassError(WIDE_INSIDE_BLOCKS)


def rethread(graph: Graph, scheme: Scheme, owner: str, sum_of: int = 1) -> list[StackThreading]:
    """Thread every stack of `graph` through `scheme`; the graph is edited in place. `sum_of`:
    the readout sums that many equal channels, which every stack's final norm absorbs (its
    eps × sum_of²; refused where a stack has none)."""
    finals = _sum_readout_norms(graph, sum_of) if sum_of > 1 else []
    present = {n.meta["archfx_scheme"] for n in graph.gm.graph.nodes if "archfx_scheme" in n.meta}
    if scheme.granularity == "block" and present & BLOCK_OWNERS:
        raise PassError(BLOCKS_WRAPPED)
    if scheme.granularity == "site" and present - BLOCK_OWNERS:
        raise PassError(SITES_RETHREADED)
    if scheme.granularity == "site" and scheme.channels > 1 and present & BLOCK_OWNERS:
        raise PassError(WIDE_INSIDE_BLOCKS)
    stacks = graph.structure.stacks
    if len({s.width for s in stacks}) > 1:
        raise PassError(
            "the stacks' streams have different widths ("
            + ", ".join(f"{s.path or 'the model'} {s.width}" for s in stacks)
            + "): a residual scheme's parameters have one width"
        )
    em = Emitter(graph, owner)
    done = []
    for s_idx, stack in enumerate(graph.structure.stacks):
        done.append(_thread_stack(em, scheme, units(stack, s_idx, scheme.granularity), stack))
    for norm in finals:
        _scale_eps(norm, sum_of**2)
    graph.gm.graph.eliminate_dead_code()
    graph.gm.recompile()
    return done


def _thread_stack(em: Emitter, scheme: Scheme, todo: list[Unit], stack: Stack) -> StackThreading:
    state = scheme.init(em.at(todo[0].input), todo[0].input, todo[0].stack)
    state.meta["archfx_start"] = stack.path  # the state before the first unit
    states, readout = [], None
    for i, unit in enumerate(todo):
        prev = todo[i - 1].replaces if i else unit.input
        if unit.input is not prev and not _same(unit.input, prev):
            state = (
                unit.input
            )  # the stream went through trunk ops (a post-norm) that now act on the state
            em.at(state)
        elif unit.input is not prev and scheme.stream_shaped:
            # casts between two sites: they now cast the state, which the site reads as the
            # replaced add read the stream
            _recast(unit.input, prev, state)
            state = unit.input
            em.at(state)
        em.module_stack = unit.replaces.meta.get("nn_module_stack") if unit.site else None
        mine = set(em.created)
        carry = state  # the update's stream: the state before the unit (its carry map included)
        state, unit_in = scheme.read(em, state, unit)
        _rewire(unit, unit_in, em.created)
        out, at = unit.outputs[0], unit.replaces
        if len(unit.outputs) > 1:  # parallel branches add to the stream together
            em.at(at)
            for extra in unit.outputs[1:]:
                out = em.op(aten.add.Tensor, out, extra)
            at = em.cursor
        state = scheme.write(em.at(at), state, unit_in, out, unit)
        em.module_stack = None
        if unit.site is not None:  # the analysis reads the update as the site's residual add
            state.meta["archfx_site"] = _site_record(
                state, carry, unit_in, unit.outputs, em.created - mine
            )
        state.meta["archfx_state"] = (stack.path, unit.index)  # the stream state after the unit
        states.append(state)
        nxt = todo[i + 1] if i + 1 < len(todo) else None
        if nxt is not None:
            lifted = _lift(unit, nxt.input, state, scheme)
            src, at = unit.replaces, em.cursor
        else:  # the last block's post-norm acts on the state too: read out after it
            lifted = _lift(unit, unit.block.output, state, scheme, strict=False)
            src, at = unit.replaces, em.cursor
            if lifted:
                src = at = state = unit.block.output
        after = [
            n
            for n in list(src.users)
            if n not in em.created
            and n not in unit.consumers
            and n not in lifted
            and not _next(n, nxt)
        ]
        if after:
            out = scheme.readout(em.at(at), state, unit.stack)
            if nxt is None:
                out.meta["archfx_readout"] = stack.path  # where the analysis finds the stream again
                readout = out
            for n in after:
                n.replace_input_with(src, out)
    end = stack.blocks[-1].output
    closed = scheme.close(em.at(end), end, todo[0].stack)
    if closed is not None:
        for n in list(end.users):
            if n not in em.created:
                n.replace_input_with(end, closed)
        if readout is not None:  # the stream continues after the close instead
            del readout.meta["archfx_readout"]
        closed.meta["archfx_readout"] = stack.path
    return StackThreading(stack, states)


def _lift(unit: Unit, end: fx.Node, state: fx.Node, scheme: Scheme, strict: bool = True) -> set:
    """Trunk ops from a unit to `end` (the next unit's input, or the last block's output: a
    post-norm) read the state instead of the d-wide stream.

    For a stream-shaped state nothing changes. A wider state [n, *stream] passes through ops
    that act on the last dimension and broadcast over the rest (norms, element-wise
    arithmetic with scalars or d-vectors) and through reshapes that keep the last dimension
    (the channel count is prepended to their shape): each channel goes where the stream went.
    """
    if _same(end, unit.replaces) or scheme.stream_shaped:
        return set()
    segment = between(unit.replaces, end)
    bad = [n for n in segment if n.op != "call_function" or n.target not in STREAM_LOCAL | RESHAPES]
    if not strict and (not segment or bad):  # the stream is read out before them instead
        return set()
    if not segment or bad:
        what = ", ".join(str(n.target) for n in bad[:3]) or "nothing it can follow"
        raise PassError(
            f"between {unit.block.path} and the next unit the stream goes through {what}; a state wider than the stream cannot"
        )
    for n in segment:
        if unit.replaces in n.all_input_nodes:
            n.replace_input_with(unit.replaces, state)
        if n.target in RESHAPES:
            n.args = (n.args[0], [scheme.channels, *n.args[1]])
    return segment


def _recast(cast: fx.Node, stream: fx.Node, state: fx.Node) -> None:
    """The chain of identity ops `cast` ends in reads `state` instead of `stream`."""
    while cast.args[0] is not stream:
        if not is_identity(cast.args[0]):
            raise PassError(f"{cast.name} reaches the stream through {cast.args[0].name}")
        cast = cast.args[0]
    cast.replace_input_with(stream, state)


def _site_record(update: fx.Node, carry, read, branches, own: set) -> dict:
    """What the analysis reads a site update as (`archfx_site`): the residual add it replaced.
    The stream it updates and the branches it adds are recorded as argument paths from the
    update through the scheme's own nodes — they stay right when a later pass rewires or
    removes the model's nodes there (AltUp's read, a cast canonicalize drops); what the site
    read from a wider state is the scheme's node, by name (None: the stream itself)."""
    return {
        "carry": _path(update, carry, own),
        "branches": [_path(update, b, own) for b in branches],
        "read": None if read is carry else read.name,
    }


def _path(src: fx.Node, dst: fx.Node, through: set) -> list[int]:
    """The shortest argument path from `src` to `dst`, stepping through `through` only (the
    direct one: a longer one, through the scheme's coefficient computations, would break when
    growth inserts a node there)."""
    todo, seen = deque([(src, [])]), set()
    while todo:
        n, path = todo.popleft()
        for i, a in enumerate(n.args):
            if a is dst:
                return [*path, i]
            if isinstance(a, fx.Node) and a in through and a not in seen:
                seen.add(a)
                todo.append((a, [*path, i]))
    raise PassError(f"{src.name} does not read {dst.name}")


def _same(a: fx.Node, b: fx.Node) -> bool:
    """The same stream, through identity ops (casts) on either side."""
    return strip(a) is strip(b)


def between(src: fx.Node, dst: fx.Node) -> set:
    """Nodes on paths from src (excluded) to dst (included)."""
    down, todo = set(), [src]
    while todo:
        for u in todo.pop().users:
            if u not in down:
                down.add(u)
                todo.append(u)
    up, todo = {dst}, [dst]
    while todo:
        for a in todo.pop().all_input_nodes:
            if a in down and a not in up:
                up.add(a)
                todo.append(a)
    return up & down


def _next(n: fx.Node, nxt: Unit | None) -> bool:
    """`n` belongs to the next unit (its consumers, its residual add, or identity ops feeding it)."""
    if nxt is None:
        return False
    if n in nxt.owned:
        return True
    return is_identity(n) and bool(n.users) and all(_next(u, nxt) for u in n.users)


def _rewire(unit: Unit, new: fx.Node, created: set) -> None:
    """Every use of the unit's stream input (or of identity ops on it) inside the unit → new."""
    chain = [unit.input]
    while is_identity(chain[-1]) and chain[-1] not in unit.consumers:
        chain.append(chain[-1].args[0])
    for src in chain:
        for user in list(src.users):
            if user in unit.consumers and user not in created:
                user.replace_input_with(src, new)


def schemes(graph: Graph) -> list[dict]:
    """The residual schemes a graph holds, in the order they thread it (for `archfx inspect`):
    the owner of their parameters, their granularity, how many units they rethread, the shape
    of the state after the first unit and the parameters they added."""
    out: dict[str, dict] = {}
    for n in graph.gm.graph.nodes:
        owner = n.meta.get("archfx_scheme")
        if owner is None:
            continue
        sc = out.setdefault(
            owner,
            {
                "scheme": owner,
                "granularity": "block" if owner in BLOCK_OWNERS else "site",
                "units": 0,
                "state": None,
                "parameters": sum(
                    p.numel() for k, p in graph.gm.named_parameters() if k.startswith(owner + ".")
                ),
            },
        )
        if "archfx_state" in n.meta:
            sc["units"] += 1
            if sc["state"] is None:
                sc["state"] = [int(x) for x in n.meta["val"].shape]
    return list(out.values())
