"""add-layers: insert new blocks into a stack (docs/passes.md, Growth).

Rewrite: n copies of a neighbouring block (the one before the insertion point, or the first
block when inserting at the start of a stack) are inserted at `at`; every copy's writers to
the residual stream — its attention and MLP output projections and their biases, or the gain
and bias of a norm on the branch output (sandwich norms) — are zero, so each new block adds
nothing to the stream; its other weights are the neighbour's (at the scale of a trained
block, and they train once the writers move). Later blocks are renumbered.

Exactness: pre-norm (and sandwich, parallel) blocks: x + 0 = x. Post-norm blocks are refused:
Norm(x + 0) ≠ x.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import fx

from archfx.ir import PassError
from archfx.ir.graph import reorder
from archfx.ir.recognise.walks import reach

from ..engines.residual import BLOCK_OWNERS, between
from ..infra.base import Option, Pass, PassResult, register


@register
class AddLayers(Pass):
    name = "add-layers"
    summary = "insert blocks (copies of a neighbour with zero writers to the stream)"
    requires = frozenset({"structure", "identity-layer"})
    options = (
        Option("n", int, 1, "number of blocks to insert", minimum=1),
        Option(
            "at", int, -1, "insert before this block (model order); -1: after the last", minimum=-1
        ),
    )

    def run(self, graph) -> PassResult:
        n, at = self.opts["n"], self.opts["at"]
        blocks = graph.structure.blocks
        if not blocks:
            raise PassError("no Transformer blocks found")
        if at > len(blocks):
            raise PassError(f"at={at} is past the last block ({len(blocks)} blocks)")
        if at == -1 or at == len(blocks):
            template, before = blocks[-1], False
        elif at > 0 and blocks[at - 1].stack == blocks[at].stack:
            template, before = blocks[at - 1], False
        else:
            template, before = blocks[at], True
        later = [b for b in blocks if b.stack == template.stack and b.index == template.index + 1]
        if not before and template.index == 0 and later:
            # a stack's first block often owns tables the others read (T5's position bias):
            # copy its successor instead, inserting at the same place
            template, before = later[0], True
        for r in template.residuals:
            if r.post_norm is not None or r.placement == "post":
                raise PassError(
                    f"{template.path} normalises after the residual add (post-LN): "
                    "Norm(x + 0) ≠ x, so a new block cannot start as the identity"
                )
        stack = template.stack
        if template.path != f"{stack}.{template.index}" or template.shares:
            raise PassError(
                f"{template.path} is not item {template.index} of an indexed container "
                f"({stack or 'the model'} holds its blocks under names, as attributes or as "
                "repeated calls of one module): add-layers numbers the blocks it inserts"
            )
        writers = _writers(template)
        local = template.index if before else template.index + 1
        before_names = [name for name, _ in graph.gm.named_parameters()]
        shift = _renumber(graph, stack, local, n)
        writers = {shift(t): v for t, v in writers.items()}
        prefix = f"{stack}.{template.index + (n if before else 0)}."
        new_paths = [f"{stack}.{local + c}" for c in range(n)]
        unit = _wrapped(graph, template)
        x = unit.input if before else unit.output
        for path in new_paths:
            x = _copy(graph, unit, x, prefix, path + ".", before, writers)
        reorder(graph.gm.graph)  # a copy before the block may precede what it reads
        inserted = [(local + c, local + c if before else template.index) for c in range(n)]
        graph.provenance["inserted_layers"] = [
            *graph.provenance.get("inserted_layers", []),
            *inserted,
        ]
        graph.gm.recompile()
        graph.invalidate()
        renamed = {name: shift(name) for name in before_names if shift(name) != name}
        details = {"inserted": new_paths, "template": template.path}
        return PassResult(changed=True, details=details, tensor_maps={"renamed": renamed})


def _writers(block) -> dict[str, float]:
    """The parameters, and the value, that make the block add nothing to its stream."""
    out: dict[str, float] = {}
    for r in block.residuals:
        norm = r.output_norm
        if norm is not None:
            if not norm.weight:
                raise PassError(f"{block.path}'s branch norm has no gain to zero")
            out[norm.weight] = -1.0 if norm.unit_offset else 0.0  # a (1 + w) gain: w = -1
            if norm.bias:
                out[norm.bias] = 0.0
            continue
        if r.moe is not None:
            raise PassError(
                f"{block.path} has a mixture-of-experts branch ({r.moe.experts} experts): "
                "add-layers does not silence experts"
            )
        linears = []
        if r.attention is not None:
            linears.append(r.attention.o)
        if r.mlp is not None:
            linears.append(r.mlp.down)
        if (
            r.kind not in ("attention", "mlp", "parallel", "cross_attention")
            or None in linears
            or not linears
        ):
            raise PassError(f"{block.path} has a residual branch ({r.kind}) archfx cannot silence")
        out.update({t: 0.0 for lin in linears for t in (lin.weight, lin.bias) if t})
    prefix = block.path + "."
    shared = [t for t in out if not t.startswith(prefix)]
    if shared:
        raise PassError(f"{block.path} writes through {shared[0]}, shared with other blocks")
    return out


def _renumber(graph, stack: str, start: int, n: int):
    """Blocks start.. of `stack` become start+n..: tensors, get_attr targets, module paths."""
    pat = re.compile(rf"^{re.escape(stack)}\.(\d+)(?=[.@]|$)")

    def shift(path: str) -> str:
        m = pat.match(path)
        if m and int(m.group(1)) >= start:
            return f"{stack}.{int(m.group(1)) + n}{path[m.end() :]}"
        return path

    nodes = [
        nd for nd in graph.gm.graph.nodes if nd.op == "get_attr" and shift(nd.target) != nd.target
    ]
    moved = {nd.target: graph.tensor(nd.target) for nd in nodes}
    for target in sorted(moved, reverse=True):
        graph.delete_tensor(target)
    for target, t in moved.items():
        graph.set_tensor(shift(target), t)
    for nd in nodes:
        nd.target = shift(nd.target)
    for nd in graph.gm.graph.nodes:
        stack_meta = nd.meta.get("nn_module_stack")
        if stack_meta:
            nd.meta["nn_module_stack"] = {k: (shift(v[0]), *v[1:]) for k, v in stack_meta.items()}
    return shift


@dataclass
class _Unit:
    """What one copy repeats: a block, or a block with the block-granularity residual scheme
    (AltUp) that wraps it, from the scheme's state before it to its state after."""

    input: fx.Node
    output: fx.Node
    nodes: set


def _wrapped(graph, block) -> _Unit:
    """The block with the block scheme around it, if any: the copy is then a layer of its own
    (AltUp: own predict and correct coefficients, started at the identity)."""
    states = [  # in graph order
        nd
        for nd in graph.gm.graph.nodes
        if ("archfx_state" in nd.meta or "archfx_start" in nd.meta)
        and nd.meta.get("archfx_scheme") in BLOCK_OWNERS
    ]
    every = set(graph.gm.graph.nodes)
    downstream = reach(block.output, every, lambda n: n.users)
    after = next((st for st in states if st in downstream), None)
    if after is None:
        return _Unit(block.input, block.output, set(block.nodes))
    upstream = reach(block.input, every, lambda n: n.all_input_nodes)
    before = next((st for st in reversed(states) if st in upstream), None)
    if before is None:
        raise PassError(f"{block.path}: the residual scheme's state before it was not found")
    up = reach(after, every, lambda n: n.all_input_nodes)  # what the state after is made of
    earlier = reach(before, every, lambda n: n.all_input_nodes) | {before}
    mine = {  # the scheme's ops of this layer: on the state, or on its parameters alone
        n for n in up - earlier if n.op == "call_function" and "archfx_scheme" in n.meta
    }
    return _Unit(before, after, set(block.nodes) | between(before, after) | mine)


def _copy(graph, block, x, prefix: str, new_prefix: str, before: bool, writers):
    """Insert one copy of `block` reading `x`; returns its output."""
    g = graph.gm.graph
    order = [nd for nd in g.nodes if nd in block.nodes]
    anchor = order[0].prev if before else x
    env: dict[fx.Node, fx.Node] = {block.input: x}
    attrs: dict[str, fx.Node] = {}

    def attr(node: fx.Node) -> fx.Node:
        if node.target not in attrs:
            target = node.target
            if target.startswith(prefix) or "archfx_scheme" in node.meta:
                # the block's weights, and a residual scheme's parameters of the block (AltUp's
                # coefficients, DDL's gates), are the copy's own; those a scheme marked fresh
                # start at their identity, not at the neighbour's trained value
                t = graph.tensor(node.target)
                init = _scheme_init(g, node.target)
                target = (
                    new_prefix + target[len(prefix) :]
                    if target.startswith(prefix)
                    else _fresh(graph, target)
                )
                if node.target in writers:
                    value = torch.full_like(t, writers[node.target])
                elif init is not None:
                    value = init.to(t)
                else:
                    value = t.detach().clone()
                graph.set_tensor(
                    target,
                    torch.nn.Parameter(value, t.requires_grad)
                    if isinstance(t, torch.nn.Parameter)
                    else value,
                )
            with g.inserting_after(anchor_attr):
                attrs[node.target] = g.get_attr(target)
            attrs[node.target].meta = dict(node.meta)  # a scheme's parameter stays one
        return attrs[node.target]

    anchor_attr = next(nd for nd in g.nodes if nd.op == "placeholder")
    while anchor_attr.next.op == "placeholder":
        anchor_attr = anchor_attr.next
    last = anchor
    out = None
    for nd in order:

        def arg(a):
            if a in env:
                return env[a]
            if isinstance(a, fx.Node) and a.op == "get_attr":
                return attr(a)
            return a

        with g.inserting_after(last):
            new = g.node_copy(nd, arg)
        new.meta = dict(nd.meta)
        site = nd.meta.get("archfx_site")
        if site and site["read"]:  # the copy's update reads from the copy's compressor
            names = {o.name: c.name for o, c in env.items()}
            new.meta["archfx_site"] = {**site, "read": names.get(site["read"], site["read"])}
        stack_meta = nd.meta.get("nn_module_stack")
        if stack_meta:
            old = prefix[:-1]
            new.meta["nn_module_stack"] = {
                k: ((new_prefix[:-1] + v[0][len(old) :]) if v[0].startswith(old) else v[0], *v[1:])
                for k, v in stack_meta.items()
            }
        env[nd] = new
        last = new
        if nd is block.output:
            out = new
    if before:
        for nd in order:
            nd.replace_input_with(x, out) if x in nd.all_input_nodes else None
    else:
        for user in list(x.users):
            if user not in env.values() and user is not out:
                user.replace_input_with(x, out)
    return out


def _scheme_init(g: fx.Graph, target: str) -> torch.Tensor | None:
    """The value a copy of the residual scheme parameter `target` starts from (Emitter.param's
    `fresh`), or None: the copy takes the neighbour's."""
    for nd in g.find_nodes(op="get_attr", target=target):
        if "archfx_init" in nd.meta:
            return nd.meta["archfx_init"]
    return None


def _fresh(graph, target: str) -> str:
    """An unused name beside `target` (`….l3.…` → `….l3c1.…`) for a copied scheme parameter."""
    if not re.search(r"\.l\d+(c\d+)?\.", target):
        raise PassError(f"{target} names no layer: archfx cannot name its copy")
    for i in range(1, 1 << 16):
        name = re.sub(r"\.l(\d+)(c\d+)?\.", rf".l\g<1>c{i}.", target, count=1)
        try:
            graph.tensor(name)
        except AttributeError:
            return name
    raise PassError(f"no free name for a copy of {target}")
