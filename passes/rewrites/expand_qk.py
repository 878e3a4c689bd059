"""expand-qk: grow the query/key dimension of every head of selected blocks (docs/passes.md).

Rewrite: per head, q and k get k̂ − k new rows inside that head's block: the query rows drawn
at the scale of the existing weights, the key rows zero, so q·k is unchanged. With RoPE the
old inverse frequencies are kept and the new pairs continue their geometric sequence, in the
rotate-half layout [old first half, new first half, old second half, new second half];
with partial rotary the rotary part is kept and the new dimensions are not rotated. With
QK-norm both new q and k rows are zero and the norm gains and eps are rescaled. Where the
attention scale is derived from the head dimension (1/√k, the SDPA default or the same value
given explicitly), it becomes 1/√k̂ and the old key weights are multiplied by √(k̂/k); a fixed
scale (T5's 1, Gemma 2's query_pre_attn_scalar, a hand-written constant) is kept.

Exactness: always, for even growth of rotary halves; the new query rows train through the key
rows (with QK-norm the new rows start at a saddle: archfx reports it).
"""

from __future__ import annotations

import math
import operator

from torch import fx

from archfx.ir import PassError
from archfx.ir.dims import Dims
from archfx.ir.ops import ATTENTION_OPS, CHUNKS, LINEAR_OPS, aten, is_call, op_arg

from ..engines.growth import (
    LAYERS_DOC,
    SEED_DOC,
    Growth,
    check_coupling,
    grow,
    no_shrinking,
    select_blocks,
    shared_remarks,
)
from ..engines.heads import attentions, head_axes
from ..infra.base import Option, Pass, PassResult, Remark, layer_indices, register


@register
class ExpandQK(Pass):
    name = "expand-qk"
    summary = "grow each head's query/key dimension: new query rows drawn at scale, key rows zero"
    options = (
        Option("size", int, 0, "new query/key dimension per head", minimum=1),
        Option("layers", str, "all", LAYERS_DOC),
        Option("seed", int, 0, SEED_DOC),
    )

    def validate(self) -> None:
        layer_indices(self.opts["layers"])
        if "size" not in self.given:
            raise PassError("give size (the new query/key dimension per head)")

    def check_order(self, before: list[Pass]) -> None:
        no_shrinking(self, before)

    def run(self, graph) -> PassResult:
        size = self.opts["size"]
        d = graph.dims
        blocks = select_blocks(graph, self.opts["layers"])
        sizes, modes, zero, scale, param_scale = {}, {}, set(), {}, {}
        scales = []  # SDPA scale arguments to update once the growth has succeeded
        remarks = []
        for b in blocks:
            for a in attentions(b):
                dqk = d.of(a.query, -1)
                atom, new = self._atom(d, dqk, size, b.path)
                sizes[atom] = new
                modes[atom] = "zero" if a.qk_norm else "free"
                if d.contains(head_axes(d, a)[1], atom):
                    raise PassError(
                        f"{b.path} shares one dimension between queries, keys and values"
                    )
                q_side, q_params, q_parts = _side(d, a.query)
                k_side, k_params, k_parts = _side(d, a.key)
                keys = {i for i in k_side - q_side if d.contains(i, atom) and d.parts(i)}
                parts = {
                    (c, j)
                    for c, j in k_parts - q_parts
                    if d.contains(d.parts(c)[1][j], atom) and d.parts(c)[1][j] not in keys
                }
                zero |= keys | parts
                if a.qk_norm:
                    remarks.append(
                        Remark(
                            b.path,
                            "QK-norm: new query and key rows both start at zero (a saddle: they get no gradient until other weights move)",
                        )
                    )
                if is_call(a.core, ATTENTION_OPS) and _derived_scale(a.core, d.size[dqk]):
                    f = math.sqrt(size / d.size[dqk])
                    gains = [
                        p
                        for p in k_params - q_params
                        if any(d.contains(i, atom) for i in d.params[p])
                    ]
                    if a.qk_norm and gains:
                        param_scale.update(dict.fromkeys(gains, f))
                    else:  # the outermost key-only axes, so no entry is scaled twice
                        scale.update(dict.fromkeys(_outermost(d, keys) | parts, f))
                    if op_arg(a.core, "scale") is not None:
                        scales.append((a.core, 1 / math.sqrt(size)))
        check_coupling(
            d,
            graph,
            blocks,
            lambda b: [self._atom(d, d.of(a.query, -1), size, b.path)[0] for a in attentions(b)],
        )
        growth = Growth(sizes, modes, zero, scale, param_scale, seed=self.opts["seed"])
        out, maps = grow(graph, growth)
        for core, value in scales:
            core.kwargs = {**core.kwargs, "scale": value}
        graph.gm.recompile()
        remarks += shared_remarks(blocks)
        return PassResult(changed=True, remarks=remarks, details=out, tensor_maps=maps)

    def _atom(self, d: Dims, dqk: int, size: int, path: str) -> tuple[int, int]:
        old = d.size[dqk]
        if size < old:
            raise PassError(f"{path} has query/key dimension {old}; {size} is smaller")
        parts = d.parts(dqk)
        if parts is None:
            return dqk, size
        kind, ps = parts
        if kind == "cat" and len(ps) == 2 and ps[0] == ps[1] and d.parts(ps[0]) is None:
            if (size - old) % 2:
                raise PassError(f"{path} uses rotate-half RoPE; grow by an even number")
            return ps[0], d.size[ps[0]] + (size - old) // 2
        if kind == "cat" and len(ps) == 2 and d.parts(ps[1]) is None:
            return ps[1], d.size[ps[1]] + size - old  # partial rotary: grow the unrotated part
        if kind == "prod" and len(ps) == 2 and d.parts(ps[0]) is None and d.size[ps[1]] == 2:
            if (size - old) % 2:
                raise PassError(f"{path} uses interleaved RoPE; grow by an even number")
            return ps[0], d.size[ps[0]] + (size - old) // 2
        raise PassError(
            f"the query/key dimension of {path} is laid out in a way archfx cannot grow"
        )


def _outermost(d: Dims, ids: set[int]) -> set[int]:
    return {i for i in ids if not any(j != i and i in d.within(j) for j in ids)}


def _derived_scale(core: fx.Node, k: int) -> bool:
    scale = op_arg(core, "scale")
    return scale is None or abs(scale * math.sqrt(k) - 1) < 1e-6


def _side(d: Dims, start: fx.Node) -> tuple[set[int], set[str], set[tuple[int, int]]]:
    """Dimension ids, parameters, and parts of split last axes (split id, index) on the path
    from the projection to the scores."""
    ids, params, parts, stack, seen = set(), set(), set(), [start], set()
    while stack:
        n = stack.pop()
        if n in seen or not isinstance(n, fx.Node):
            continue
        seen.add(n)
        if n.op == "get_attr":
            params.add(n.target)
            continue
        ids |= {d.find(i) for i in d.axes.get(n, [])}
        if n.target is operator.getitem and n.args[0].target in CHUNKS:
            src = n.args[0].args[0]
            dim = n.args[0].args[2] if len(n.args[0].args) > 2 else 0
            if dim % len(d.axes[src]) == len(d.axes[src]) - 1:
                parts.add((d.of(src, -1), n.args[1]))
        if n.op != "call_function" or n.target in LINEAR_OPS or n.target is aten.embedding.default:
            continue
        stack.extend(n.all_input_nodes)
    return ids, params, parts
