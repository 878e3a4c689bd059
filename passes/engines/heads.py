"""What the head-growth passes share: the attention sites of a block and their head axes."""

from __future__ import annotations

from archfx.ir import PassError
from archfx.ir.dims import Dims

from .growth import weight_axis


def attentions(block) -> list:
    sites = [r.attention for r in block.residuals if r.attention is not None]
    if not sites:
        raise PassError(f"block {block.path} has no attention archfx recognises")
    for a in sites:
        if a.o is None or a.query is None:
            raise PassError(f"the attention of {block.path} has no output projection")
    return sites


def head_axes(d: Dims, attention) -> tuple[int, int]:
    """(query-head id, value-dim id) from the output projection's input axis (heads × dv)."""
    o_in = weight_axis(d, attention.o, "in")
    parts = d.parts(o_in)
    if parts is None or parts[0] != "prod" or len(parts[1]) != 2:
        raise PassError("the output projection's input is not laid out as heads × head dim")
    return parts[1][0], parts[1][1]
