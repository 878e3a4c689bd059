"""altup: Alternating Updates (Baykal et al., NeurIPS 2023), Recycled-AltUp by default.

Rewrite: each stack's d-wide residual stream x becomes K blocks S = (x_1 … x_K), initialised by
replicating x (no wider embedding). Each Transformer layer L, whole (its own norms and residual
adds included), runs on one block only:

    predict   x̂_i = Σ_j p_ij x_j                 P ∈ R^{K×K} per layer
    compute   x̃  = L(x̂_j*)                       j* = l mod K (alternating) or `active` (same)
    correct   x_i ← x̂_i + g_i (x̃ − x̂_j*)         g ∈ R^K per layer

and the model reads the mean of the K blocks (or their sum, absorbed exactly by the final
norm's eps). `coefficients=router` is Gemma 3n's input-dependent form: P = I + reshape(W_p m),
g = 1 + W_c m', m = tanh(W_r RMSNorm(x) / d), with W_p = W_c = 0 and W_r ≠ 0 at init; no
in-place clamping (clip coefficients in the optimiser if wanted).

Exactness: at init S is replicated, P = I, g = 1 and the readout weights sum to 1, so every
block equals the original stream at every layer and the output is unchanged, for any
schedule and any K (K = 1 is the identity rewrite). `readout=sum` is exact only when a final
LayerNorm/RMSNorm reads the stream: its eps is scaled by K² (LN(Ky; K²ε) = LN(y; ε)).
"""

from __future__ import annotations

import torch
from torch import fx

from archfx.ir import PassError
from archfx.ir.ops import aten

from ..engines.residual import (
    BLOCKS_WRAPPED,
    Emitter,
    Scheme,
    mean_of_channels,
    owned_parameters,
    replicate,
    rethread,
    stream_of,
)
from ..infra.base import Option, Pass, PassResult, register

OWNER = "altup"


class AltUpScheme(Scheme):
    granularity = "block"

    def __init__(self, opts: dict, d: int, dtype: torch.dtype):
        self.k, self.schedule, self.active = opts["k"], opts["schedule"], opts["active"]
        self.router = opts["coefficients"] == "router"
        self.readout_kind = opts["readout"]
        self.d, self.dtype = d, dtype
        self.gen = torch.Generator().manual_seed(opts["seed"])
        self.routers: dict[str, str] = {}

    def _j(self, unit: int) -> int:
        return unit % self.k if self.schedule == "alternating" else self.active

    def init(self, em, x, stack):
        return replicate(em, x, self.k)

    def read(self, em, state, unit):
        k, name = self.k, unit.name
        if not self.router:
            p = em.param(f"{name}.predict", torch.eye(k, dtype=self.dtype), fresh=True)
            coef = em.op(aten.view.default, p, [k, k] + [1] * unit.rank)
        else:  # P = I + reshape(W_p m): the I is the `state +` below
            m = self._route(em, em.op(aten.select.int, state, 0, self._j(unit.index)), name)
            w = em.param(f"{name}.predict", torch.zeros(k * k, k, dtype=self.dtype), fresh=True)
            c = em.op(
                aten.unflatten.int, em.op(aten.linear.default, m, w), -1, [k, k]
            )  # [*tok, K, K]
            tok = unit.rank - 1  # token dims of the d-wide stream (batch, sequence, …)
            c = em.op(aten.permute.default, c, [tok, tok + 1, *range(tok)])
            coef = em.op(aten.unsqueeze.default, c, -1)  # [K, K, *tok, 1]
        mixed = em.op(aten.mul.Tensor, coef, em.op(aten.unsqueeze.default, state, 0))
        xhat = em.op(aten.sum.dim_IntList, mixed, [1])
        if self.router:
            xhat = em.op(aten.add.Tensor, state, xhat)
        return xhat, em.op(aten.select.int, xhat, 0, self._j(unit.index))

    def write(self, em, state, unit_in, unit_out, unit):
        """x_i ← x̂_i + g_i (x̃ − x̂_j*), evaluated as g_i x̃ + (x̂_i − g_i x̂_j*): the same sum,
        bit-exact at init (x̂_i = x̂_j*, g = 1), where x̂ + (x̃ − x̂) would round."""
        k, name = self.k, unit.name
        if not self.router:
            g = em.param(f"{name}.correct", torch.ones(k, dtype=self.dtype), fresh=True)
            gain = em.op(aten.view.default, g, [k] + [1] * unit.rank)
        else:  # g = 1 + W_c m'
            m = self._route(em, unit_out, name)
            w = em.param(f"{name}.correct", torch.zeros(k, k, dtype=self.dtype), fresh=True)
            c = em.op(aten.add.Tensor, em.op(aten.linear.default, m, w), 1.0)  # [*tok, K]
            gain = em.op(
                aten.unsqueeze.default,
                em.op(aten.permute.default, c, [unit.rank - 1, *range(unit.rank - 1)]),
                -1,
            )
        new = em.op(aten.mul.Tensor, gain, em.op(aten.unsqueeze.default, unit_out, 0))
        old = em.op(
            aten.sub.Tensor,
            state,
            em.op(aten.mul.Tensor, gain, em.op(aten.unsqueeze.default, unit_in, 0)),
        )
        return em.op(aten.add.Tensor, new, old)

    def readout(self, em, state, stack):
        """mean (or sum) of the K blocks, as x_0 + mean(x_i − x_0): exact while they are equal."""
        mean = mean_of_channels(em, state)
        return mean if self.readout_kind == "mean" else em.op(aten.mul.Tensor, mean, float(self.k))

    def _route(self, em: Emitter, x: fx.Node, name: str) -> fx.Node:
        """m = tanh(W_r · RMSNorm(x) / d), one W_r per layer shared by predict and correct."""
        if name in self.routers:
            w = em.get(self.routers[name])
        else:
            init = torch.randn(self.k, self.d, generator=self.gen) / self.d**0.5
            w = em.param(f"{name}.router", init.to(self.dtype))
            self.routers[name] = w.target
        n = em.op(
            aten.mul.Tensor, em.op(aten.rms_norm.default, x, [self.d], None, 1e-6), 1.0 / self.d
        )
        return em.op(aten.tanh.default, em.op(aten.linear.default, n, w))


@register
class AltUp(Pass):
    name = "altup"
    requires = frozenset({"structure", "block-residual"})
    invalidates = {"block-residual": BLOCKS_WRAPPED}
    summary = (
        "widen the residual stream K× (Recycled-AltUp): each layer updates one block, P/g mix them"
    )
    options = (
        Option(
            "k", int, 2, "number of blocks K (K = 1 is the identity rewrite)", minimum=1, maximum=64
        ),
        Option(
            "schedule",
            str,
            "alternating",
            "layer l computes on block l mod K, or (`same`) always on `active`",
            choices=("alternating", "same"),
        ),
        Option("active", int, 0, "the block for `schedule=same` (< k)", minimum=0),
        Option(
            "coefficients",
            str,
            "static",
            "`static`: P, g per layer (P = I, g = 1 at init). `router`: Gemma 3n's "
            "P = I + reshape(W_p m), g = 1 + W_c m', m = tanh(W_r RMSNorm(x)/d), W_p = W_c = 0, "
            "W_r random",
            choices=("static", "router"),
        ),
        Option(
            "readout",
            str,
            "mean",
            "`mean` of the K blocks, or `sum` with every final norm's eps scaled by K² (exact; "
            "refused when a stack has no final norm)",
            choices=("mean", "sum"),
        ),
        Option("seed", int, 0, "seed of the router's initial weights", minimum=0),
    )

    def validate(self) -> None:
        if self.opts["active"] >= self.opts["k"]:
            raise PassError(f"active={self.opts['active']} must be < k={self.opts['k']}")

    def run(self, graph) -> PassResult:
        o = self.opts
        scheme = AltUpScheme(o, *stream_of(graph))
        sum_of = o["k"] if o["readout"] == "sum" else 1
        threads = rethread(graph, scheme, OWNER, sum_of)
        added = owned_parameters(graph, OWNER)
        return PassResult(
            changed=True,
            details={
                "stacks": len(threads),
                "layers": sum(len(t.states) for t in threads),
                "parameters_added": added,
            },
        )
