"""What an sdnc graph's memories hold and what its read heads read (`archfx inspect --memory`,
examples/memory.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from archfx.ir import PassError
from archfx.ir.memory import READ, weightings
from archfx.ir.ops import op_arg


@dataclass
class LayerMemory:
    """One attention site's memory and what its read heads read, for given inputs."""

    path: str  # the block
    cross: bool  # reads a memory written by another stream (the encoder)
    addresses: torch.Tensor  # [batch, banks, slots, d_k]
    contents: torch.Tensor  # [batch, banks, slots, d_v]
    weightings: torch.Tensor  # [batch, read heads, queries, slots]


def memories(graph, inputs=None) -> list[LayerMemory]:
    """Every memory of an sdnc graph and its read weightings on `inputs` (the example inputs by
    default)."""
    reads = [
        (block, r.attention)
        for block in graph.structure.blocks
        for r in block.residuals
        if r.attention is not None and r.attention.core.target is READ
    ]
    if not reads:
        raise PassError("this graph has no memory reads: run the `sdnc` pass first")
    probes = []
    for _, a in reads:
        probes += [x for x in a.core.args[:4] if isinstance(x, fx.Node)]
    values = dict(zip(probes, graph.probe(probes, inputs), strict=True))
    out = []
    with torch.no_grad():
        for block, a in reads:
            q, addr, cont = (values[x] for x in a.core.args[:3])
            mask = op_arg(a.core, "attn_mask")
            w = weightings(
                q,
                addr,
                values[mask] if isinstance(mask, fx.Node) else None,
                op_arg(a.core, "is_causal"),
                scale=op_arg(a.core, "scale"),
                enable_gqa=op_arg(a.core, "enable_gqa"),
                softcap=op_arg(a.core, "softcap"),
            )
            out.append(LayerMemory(block.path, a.cross, addr, cont, w))
    return out
