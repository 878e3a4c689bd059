"""add-heads: add attention heads to selected blocks (docs/passes.md, Growth).

Rewrite: n new heads per attention site (self and cross). Multi-head attention: q, k and v
get one new block of rows per head (drawn at the scale of the existing weights), the output
projection the matching input columns, all zero. Grouped-query attention keeps the query
heads a multiple of the key/value heads: when n is a multiple of the number of KV groups,
every group gets n / groups new query heads (k and v unchanged); otherwise, when n is a
multiple of the queries per group, n / (queries per group) whole groups are added (new k and
v heads too); any other n is refused with the reason.

Exactness: always: the new heads' outputs are multiplied by zero columns.
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
)
from ..engines.heads import attentions, head_axes
from ..infra.base import Option, Pass, PassResult, layer_indices, register


@register
class AddHeads(Pass):
    name = "add-heads"
    summary = "add attention heads: new q/k/v rows drawn at scale, new output columns zero"
    options = (
        Option("n", int, 1, "number of query heads to add per attention site", minimum=1),
        Option("layers", str, "all", LAYERS_DOC),
        Option("seed", int, 0, SEED_DOC),
    )

    def validate(self) -> None:
        layer_indices(self.opts["layers"])

    def run(self, graph) -> PassResult:
        n = self.opts["n"]
        d = graph.dims
        blocks = select_blocks(graph, self.opts["layers"])

        def grown(b):
            return [self._atom(d, a, n, b.path)[0] for a in attentions(b)]

        sizes = {}
        for b in blocks:
            for a in attentions(b):
                atom, new = self._atom(d, a, n, b.path)
                sizes[atom] = new
        check_coupling(d, graph, blocks, grown)
        out, maps = grow(graph, Growth(sizes, dict.fromkeys(sizes, "free"), seed=self.opts["seed"]))
        return PassResult(
            changed=True, remarks=shared_remarks(blocks), details=out, tensor_maps=maps
        )

    def _atom(self, d, attention, n: int, path: str) -> tuple[int, int]:
        heads, _ = head_axes(d, attention)
        parts = d.parts(heads)
        if parts is None:
            return heads, d.size[heads] + n
        if parts[0] != "prod" or len(parts[1]) != 2:
            raise PassError(f"the heads of {path} are not laid out as groups × heads per group")
        groups, per = parts[1]
        if d.parts(groups) is not None or d.parts(per) is not None:
            raise PassError(f"the head groups of {path} are built from other dimensions")
        g, r = d.size[groups], d.size[per]
        if n % g == 0:
            return per, r + n // g
        if n % r == 0:
            return groups, g + n // r
        raise PassError(
            f"{path} has {g} key/value groups of {r} query heads; n={n} is neither a "
            f"multiple of {g} (one more query head per group) nor of {r} (whole groups)"
        )
