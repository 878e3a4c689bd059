"""expand-head-dim: grow the value dimension of every head of selected blocks (docs/passes.md).

Rewrite: per head, the value projection gets v̂ − v new rows inside that head's block (drawn at
the scale of the existing weights) and the output projection the matching new input columns,
all zero. Queries and keys are untouched (`expand-qk` grows them).

Exactness: always: each head's new value features are multiplied by zero columns.
"""

from __future__ import annotations

from archfx.ir import PassError

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
from ..infra.base import Option, Pass, PassResult, layer_indices, register


@register
class ExpandHeadDim(Pass):
    name = "expand-head-dim"
    summary = (
        "grow each head's value dimension: new value rows drawn at scale, new output columns zero"
    )
    options = (
        Option("size", int, 0, "new value dimension per head", minimum=1),
        Option("layers", str, "all", LAYERS_DOC),
        Option("seed", int, 0, SEED_DOC),
    )

    def validate(self) -> None:
        layer_indices(self.opts["layers"])
        if "size" not in self.given:
            raise PassError("give size (the new value dimension per head)")

    def check_order(self, before: list[Pass]) -> None:
        no_shrinking(self, before)

    def run(self, graph) -> PassResult:
        size = self.opts["size"]
        d = graph.dims
        blocks = select_blocks(graph, self.opts["layers"])

        def atoms(b):
            return [head_axes(d, a)[1] for a in attentions(b)]

        sizes = {}
        for b in blocks:
            for a in attentions(b):
                _, dv, dqk = (*head_axes(d, a), d.of(a.query, -1))
                if d.parts(dv) is not None:
                    raise PassError(
                        f"the value dimension of {b.path} is built from other dimensions"
                    )
                if dv in d.atoms(dqk):
                    raise PassError(f"{b.path} shares one dimension between values and keys")
                if size < d.size[dv]:
                    raise PassError(f"{b.path} has value dimension {d.size[dv]}; {size} is smaller")
                sizes[dv] = size
        check_coupling(d, graph, blocks, atoms)
        out, maps = grow(graph, Growth(sizes, dict.fromkeys(sizes, "free"), seed=self.opts["seed"]))
        return PassResult(
            changed=any(sizes[a] != d.size[a] for a in sizes),
            remarks=shared_remarks(blocks),
            details=out,
            tensor_maps=maps,
        )
