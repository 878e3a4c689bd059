"""resi-dual: ResiDual (Xie et al. 2023), a post-LN stream plus an unnormalised accumulator.

Rewrite: a post-LN model keeps its stream, x_a ← Norm(x_a + F(x_a)) at every residual site,
and gains an accumulator of what the sublayers added, unnormalised:

    x_d ← x_d + F(x_a)                   x_d starts as the stream entering the first block
    y   = x_a + LN_f(x_d)                what the rest of the model reads after the stack

LN_f is a new norm of the model's kind (LayerNorm or RMSNorm, the post-norms' eps) with its
own gain (and bias). The post-LN stream keeps the model's behaviour; the accumulator carries
the pre-LN-like path whose gradient does not shrink through the norms.

Exactness: LN_f's gain and bias start at 0, so y = x_a + 0 = x_a, bit-exact (the gain still
gets a gradient: LN_f(x_d) ≠ 0). Refused where a residual site is not post-LN: a pre-LN stream
already is the unnormalised accumulator, and the paper's rewrite starts from a post-LN model.
ResiDual's accumulator lives beside the stream, outside any other scheme's state: it neither
runs inside AltUp's blocks nor with another site scheme.
"""

from __future__ import annotations

import torch

from archfx.ir import PassError
from archfx.ir.ops import aten

from ..engines.residual import SITES_RETHREADED, Scheme, rethread, stream_of
from ..infra.base import Pass, PassResult, register

OWNER = "resi_dual"
BESIDE = "ResiDual's accumulator runs beside the stream, outside a block scheme's state"


class ResiDualScheme(Scheme):
    granularity = "site"
    stream_shaped = True  # the state is the post-LN stream; the accumulator is kept here

    def __init__(self, opts: dict, d: int, dtype: torch.dtype):
        self.kind, self.eps = opts["kind"], opts["eps"]  # the post-norms'
        self.d, self.dtype = d, dtype
        self.acc: dict[int, object] = {}  # per stack: the accumulator after the last site

    def init(self, em, x, stack):
        self.acc[stack] = x
        return x

    def read(self, em, state, unit):
        return state, state

    def write(self, em, state, unit_in, unit_out, unit):
        self.acc[unit.stack] = em.op(aten.add.Tensor, self.acc[unit.stack], unit_out)
        return em.op(aten.add.Tensor, state, unit_out)

    def readout(self, em, state, stack):
        return state

    def close(self, em, out, stack):
        gain = em.param(f"s{stack}.norm_weight", torch.zeros(self.d, dtype=self.dtype))
        acc = self.acc.pop(stack)
        if self.kind == "rmsnorm":
            normed = em.op(aten.rms_norm.default, acc, [self.d], gain, self.eps)
        else:
            bias = em.param(f"s{stack}.norm_bias", torch.zeros(self.d, dtype=self.dtype))
            normed = em.op(aten.layer_norm.default, acc, [self.d], gain, bias, self.eps)
        return em.op(aten.add.Tensor, out, normed)


@register
class ResiDual(Pass):
    name = "resi-dual"
    requires = frozenset({"structure", "site-residual", "block-residual"})
    invalidates = {"site-residual": SITES_RETHREADED, "block-residual": BESIDE}
    summary = (
        "ResiDual on a post-LN model: an unnormalised accumulator of the sublayer outputs beside "
        "the stream, y = x_post + LN_f(x_acc), LN_f's gain and bias 0 at init"
    )

    def run(self, graph) -> PassResult:
        structure = graph.structure
        sites = [(b, r) for b in structure.blocks for r in b.residuals]
        pre = [f"{b.path} ({r.kind}: {r.placement})" for b, r in sites if r.placement != "post"]
        if pre:
            raise PassError(
                "ResiDual starts from a post-LN model, and these residual sites are not post-LN: "
                + ", ".join(pre[:4])
                + (f" and {len(pre) - 4} more" if len(pre) > 4 else "")
                + "; a pre-LN stream already is the unnormalised accumulator ResiDual adds"
            )
        norms = {(r.post_norm.kind, r.post_norm.eps) for _, r in sites}
        kind, eps = sorted(norms, key=str)[0]
        scheme = ResiDualScheme({"kind": kind, "eps": eps or 1e-5}, *stream_of(graph))
        threads = rethread(graph, scheme, OWNER)
        return PassResult(
            changed=True,
            details={"sites": sum(len(t.states) for t in threads), "stacks": len(threads)},
        )
