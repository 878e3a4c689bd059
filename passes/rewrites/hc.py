"""hc: hyper-connections (Zhu et al., ICLR 2025), docs/passes.md.

Rewrite: each stack's d-wide residual stream x becomes n streams H = (h_1 … h_n), initialised by
replicating x. Every residual site x ← x + T(x) (T = the sublayer with its norms, attention or
MLP unchanged) becomes

    read    h0 = Σ_i a_i h_i                        A_m = (a_i) ∈ R^n per site
    carry   h_j ← Σ_i r_ij h_i                      A_r = (r_ij) ∈ R^{n×n} per site
    write   h_j ← h_j + b_j T(h0)                   B = (b_j) ∈ R^n per site

and the model reads the mean of the streams (or their sum, absorbed exactly by the final
norm's eps). `dynamic=true` adds input-dependent terms, computed from the streams before the
site, H̄ = RMSNorm(H) (no gain):
a_i += s_α tanh(H̄_i W_m), r_ij += s_α tanh(H̄_i W_r)_j, b_j += s_β tanh(H̄_j W_β), with W = 0
and s_α = s_β = 0.01 at init. Post-norms between sites act on every stream.

Exactness: at init H is replicated, A_m = e_{l mod n} (site l reads stream l mod n), A_r = I,
B = 1 and the dynamic weights are 0, so every stream equals the original stream at every site
(bit-exact: each sum has one non-zero term) and the readout's weights sum to 1; `readout=sum`
scales every final norm's eps by n² (LN(n·y; n²ε) = LN(y; ε)) and is refused where a stack has
no final norm. A layer add-layers inserts starts with A_r = I and W_r = 0 (its branches are
zero), so it leaves trained, unequal streams unchanged.
"""

from __future__ import annotations

import torch
from torch import fx

from archfx.ir.ops import aten

from ..engines.residual import (
    SITES_RETHREADED,
    Emitter,
    Scheme,
    mean_of_channels,
    owned_parameters,
    refuse_after_block_scheme,
    replicate,
    rethread,
    stream_of,
)
from ..infra.base import Option, Pass, PassResult, register

OWNER = "hc"
SCALE = 0.01  # s_α, s_β at init


class HCScheme(Scheme):
    granularity = "site"

    def __init__(self, opts: dict, d: int, dtype: torch.dtype):
        self.n, self.dynamic, self.readout_kind = opts["n"], opts["dynamic"], opts["readout"]
        self.channels = self.n
        self.d, self.dtype = d, dtype
        self.normed: dict[str, fx.Node] = {}  # per site: H̄, for the write's dynamic B

    def init(self, em, x, stack):
        return replicate(em, x, self.n)

    def read(self, em, state, unit):
        n, name, rank = self.n, unit.name, unit.rank
        ones = [1] * rank
        a = torch.zeros(n, dtype=self.dtype)
        a[unit.index % n] = 1.0
        a_m = em.op(aten.view.default, em.param(f"{name}.read", a), [n, *ones])  # [n, 1…]
        a_r = em.op(
            aten.view.default,
            em.param(f"{name}.carry", torch.eye(n, dtype=self.dtype), fresh=True),
            [n, n, *ones],
        )  # [i, j, 1…]
        if self.dynamic:
            hbar = em.op(aten.rms_norm.default, state, [self.d], None, 1e-6)  # [n, *tok, d]
            self.normed[name] = hbar
            s_a = em.param(f"{name}.read_scale", torch.tensor(SCALE, dtype=self.dtype))
            a_m = em.op(aten.add.Tensor, a_m, self._tanh(em, hbar, f"{name}.read_dynamic", 1, s_a))
            r = self._tanh(em, hbar, f"{name}.carry_dynamic", n, s_a, fresh=True)  # [i, *tok, j]
            r = em.op(aten.permute.default, r, [0, rank, *range(1, rank)])
            a_r = em.op(aten.add.Tensor, a_r, em.op(aten.unsqueeze.default, r, -1))
        h0 = em.op(aten.sum.dim_IntList, em.op(aten.mul.Tensor, a_m, state), [0])
        carried = em.op(
            aten.sum.dim_IntList,
            em.op(aten.mul.Tensor, a_r, em.op(aten.unsqueeze.default, state, 1)),
            [0],
        )
        return carried, h0

    def write(self, em, state, unit_in, unit_out, unit):
        n, name = self.n, unit.name
        b = em.op(
            aten.view.default,
            em.param(f"{name}.write", torch.ones(n, dtype=self.dtype)),
            [n] + [1] * unit.rank,
        )
        if self.dynamic:
            s_b = em.param(f"{name}.write_scale", torch.tensor(SCALE, dtype=self.dtype))
            dyn = self._tanh(em, self.normed.pop(name), f"{name}.write_dynamic", 1, s_b)
            b = em.op(aten.add.Tensor, b, dyn)
        new = em.op(aten.mul.Tensor, b, em.op(aten.unsqueeze.default, unit_out, 0))
        return em.op(aten.add.Tensor, state, new)

    def readout(self, em, state, stack):
        mean = mean_of_channels(em, state)
        return mean if self.readout_kind == "mean" else em.op(aten.mul.Tensor, mean, float(self.n))

    def _tanh(
        self, em: Emitter, hbar: fx.Node, name: str, out: int, scale: fx.Node, fresh=False
    ) -> fx.Node:
        """s · tanh(H̄ W), W ∈ R^{d×out} zero at init: [n, *tok, out]."""
        w = em.param(name, torch.zeros(out, self.d, dtype=self.dtype), fresh=fresh)
        t = em.op(aten.tanh.default, em.op(aten.linear.default, hbar, w))
        return em.op(aten.mul.Tensor, t, scale)


@register
class HyperConnections(Pass):
    name = "hc"
    requires = frozenset({"structure", "site-residual"})
    invalidates = {"site-residual": SITES_RETHREADED}
    summary = (
        "hyper-connections: n residual streams; each residual site reads, carries and writes "
        "them through learned A_m, A_r, B (static or dynamic)"
    )
    options = (
        Option("n", int, 4, "number of streams n (expansion rate)", minimum=1, maximum=64),
        Option(
            "dynamic",
            bool,
            False,
            "add the input-dependent terms s·tanh(RMSNorm(H) W) (W = 0, s = 0.01 at init)",
        ),
        Option(
            "readout",
            str,
            "mean",
            "`mean` of the streams, or the paper's `sum` with every final norm's eps scaled by "
            "n² (exact; refused when a stack has no final norm)",
            choices=("mean", "sum"),
        ),
    )

    def check_order(self, before) -> None:
        if self.opts["n"] > 1:
            refuse_after_block_scheme(before)

    def run(self, graph) -> PassResult:
        o = self.opts
        sum_of = o["n"] if o["readout"] == "sum" else 1
        threads = rethread(graph, HCScheme(o, *stream_of(graph)), OWNER, sum_of)
        added = owned_parameters(graph, OWNER)
        return PassResult(
            changed=True,
            details={"sites": sum(len(t.states) for t in threads), "parameters_added": added},
        )
