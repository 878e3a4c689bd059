"""expand-mlp: widen the MLP hidden layer of selected blocks (docs/passes.md, Growth).

Rewrite: the MLP width p → p̂ (`size`, or `factor` × p). The first-layer projections (up and
gate, fused or not) get p̂ − p new output rows drawn at the scale of the existing weights;
the down projection gets p̂ − p new input columns, all zero.

Exactness: always, for any p̂ ≥ p: the new units' activations are multiplied by zero columns.
The MLP must be element-wise between its projections (no norm over its hidden units).
"""

from __future__ import annotations

from archfx.ir import PassError

from ..engines.growth import (
    LAYERS_DOC,
    SEED_DOC,
    Growth,
    check_coupling,
    grow,
    select_blocks,
    shared_remarks,
    weight_axis,
)
from ..infra.base import Option, Pass, PassResult, layer_indices, register


@register
class ExpandMLP(Pass):
    name = "expand-mlp"
    summary = (
        "widen the MLP of selected blocks: new up/gate rows drawn at scale, new down columns zero"
    )
    options = (
        Option(
            "factor", float, 0.0, "new width = factor × width (give factor or size)", minimum=0.0
        ),
        Option("size", int, 0, "new width (give factor or size)", minimum=0),
        Option("layers", str, "all", LAYERS_DOC),
        Option("seed", int, 0, SEED_DOC),
    )

    def validate(self) -> None:
        layer_indices(self.opts["layers"])
        if (self.opts["factor"] > 0) == (self.opts["size"] > 0):
            raise PassError("give exactly one of factor or size")

    def run(self, graph) -> PassResult:
        factor, size = self.opts["factor"], self.opts["size"]
        d = graph.dims
        blocks = select_blocks(graph, self.opts["layers"])

        def atoms(b):
            return [weight_axis(d, b.mlp.down, "in")] if b.mlp else []

        sizes = {}
        for b in blocks:
            if b.mlp is None:
                if b.moe is not None:
                    raise PassError(
                        f"block {b.path}'s MLP is a mixture of {b.moe.experts} experts: "
                        "expand-mlp grows dense MLPs only"
                    )
                raise PassError(f"block {b.path} has no MLP archfx recognises")
            atom = atoms(b)[0]
            if d.parts(atom) is not None:
                raise PassError(f"the MLP width of {b.path} is built from other dimensions")
            old = d.size[atom]
            new = size or round(old * factor)
            if new < old:
                raise PassError(f"{b.path} has width {old}; the new width {new} is smaller")
            sizes[atom] = new
        check_coupling(d, graph, blocks, atoms)
        growth = Growth(sizes, dict.fromkeys(sizes, "free"), seed=self.opts["seed"])
        out, maps = grow(graph, growth)
        return PassResult(
            changed=any(sizes[a] != d.size[a] for a in sizes),
            remarks=shared_remarks(blocks),
            details=out,
            tensor_maps=maps,
        )
