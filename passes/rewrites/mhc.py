"""mhc: manifold-constrained hyper-connections (DeepSeek 2025), docs/passes.md.

Rewrite: each stack's d-wide residual stream becomes n streams x = (x_1 … x_n) ∈ R^{n×d},
initialised by replicating it. Every residual site x ← x + F(x) (F = the sublayer with its
norms) becomes

    x ← H_res x + H_postᵀ F(H_pre x)

with coefficients computed per token from x̃ = RMSNorm(vec(x)) (no gain, over all n·d features):

    H_pre  = σ(α_pre · x̃ φ_pre + b_pre)                      ∈ R^{1×n}
    H_post = 2σ(α_post · x̃ φ_post + b_post)                  ∈ R^{1×n}
    H_res  = SinkhornKnopp(exp(α_res · mat(x̃ φ_res) + b_res)) ∈ R^{n×n}, doubly stochastic

(`sinkhorn_iters` alternate row and column normalisations, ending on the columns: one graph
op, `archfx::sinkhorn`, ir/sinkhorn.py). The model reads the mean of the streams. Post-norms
between sites act on every stream.

Exactness: at init φ = 0 (α = 0.01, so φ gets gradient), b_pre = logit(1/n), b_post = 0,
b_res = 0: H_pre = 1/n, H_post = 1 and exp(b_res) is the all-ones matrix, which the first row
normalisation makes exactly doubly stochastic (every entry 1/n) — further iterations leave it
alone, so Sinkhorn's finite iterations leave no residue at init. With the replicated state every
stream stays equal to the original stream: H_pre x and H_res x are averages of equal streams,
exact up to the rounding of 1/n (none for n a power of two; ≤ one ulp of the stream per site
otherwise). Once the streams differ, no layer is the identity (H_res has positive entries), so
add-layers after mhc is refused.

The paper's init (`pre=uniform`) treats every stream alike, so the model is symmetric under
permuting the streams, and so is every gradient step: the streams stay equal in training (the
pass says so in a remark). `pre=alternating` weighs stream l mod n by 0.9 in site l's H_pre and
the others by 0.1/(n − 1) — weights summing to 1, exact all the same — which breaks the symmetry
as hyper-connections' A_m = e_{l mod n} does. Once trained, Sinkhorn's finite iterations leave
rows that sum to 1 only approximately (the columns, normalised last, are exact): how closely
depends on how peaked exp(·) has become.
"""

from __future__ import annotations

import torch

from archfx.ir.ops import aten
from archfx.ir.sinkhorn import SINKHORN

from ..engines.residual import (
    SITES_RETHREADED,
    Scheme,
    mean_of_channels,
    owned_parameters,
    refuse_after_block_scheme,
    replicate,
    rethread,
    stream_of,
)
from ..infra.base import Option, Pass, PassResult, Remark, register

OWNER = "mhc"
ALPHA = 0.01  # α_pre, α_post, α_res at init
OWNS = ("pre", "post", "res")
READ_WEIGHT = 0.9  # pre=alternating: H_pre's weight on stream l mod n at init
SYMMETRIC = (
    "pre=uniform starts every stream alike (H_pre = 1/n, H_post = 1, H_res = 1/n): the model is "
    "symmetric under permuting the streams, and so is every gradient step, so the streams "
    "stay equal in training; pre=alternating breaks the symmetry, exact all the same"
)
NO_IDENTITY_LAYER = (
    "mHC's carry H_res is Sinkhorn of exp(·): doubly stochastic with positive entries, never the "
    "identity, so a new layer mixes the streams, which is exact only while they are equal"
)


class MHCScheme(Scheme):
    granularity = "site"

    def __init__(self, opts: dict, d: int, dtype: torch.dtype):
        self.n, self.iters = opts["n"], opts["sinkhorn_iters"]
        self.alternating = opts["pre"] == "alternating"
        self.channels = self.n
        self.d, self.dtype = d, dtype
        self.post: dict[str, object] = {}  # per site: H_post, for the write

    def init(self, em, x, stack):
        return replicate(em, x, self.n)

    def read(self, em, state, unit):
        n, name, dt = self.n, unit.name, self.dtype
        tok = unit.rank - 1  # token dims of the d-wide stream
        flat = em.op(
            aten.flatten.using_ints,
            em.op(aten.permute.default, state, [*range(1, tok + 1), 0, tok + 1]),
            tok,
            tok + 1,
        )  # [*tok, n·d]
        xn = em.op(aten.rms_norm.default, flat, [n * self.d], None, 1e-6)
        phi = em.param(f"{name}.phi", torch.zeros(2 * n + n * n, n * self.d, dtype=dt))
        proj = em.op(aten.linear.default, xn, phi)  # [*tok, 2n + n²]: pre, post, res
        alpha = em.param(f"{name}.alpha", torch.full((3,), ALPHA, dtype=dt))

        def logits(i: int, lo: int, hi: int | None, bias: torch.Tensor):
            part = em.op(aten.slice.Tensor, proj, -1, lo, hi)
            scaled = em.op(aten.mul.Tensor, part, em.op(aten.select.int, alpha, 0, i))
            return em.op(aten.add.Tensor, scaled, em.param(f"{name}.{OWNS[i]}_bias", bias))

        pre = em.op(aten.sigmoid.default, logits(0, 0, n, self._pre_bias(unit.index)))
        post = em.op(
            aten.mul.Tensor,
            em.op(aten.sigmoid.default, logits(1, n, 2 * n, torch.zeros(n, dtype=dt))),
            2.0,
        )
        self.post[name] = post
        res = em.op(
            SINKHORN,
            em.op(
                aten.unflatten.int, logits(2, 2 * n, None, torch.zeros(n * n, dtype=dt)), -1, [n, n]
            ),
            self.iters,
        )  # [*tok, i, j]
        unit_in = em.op(
            aten.sum.dim_IntList,
            em.op(aten.mul.Tensor, self._lead(em, pre, tok), state),
            [0],
        )
        coef = em.op(aten.permute.default, res, [tok + 1, tok, *range(tok)])  # [j, i, *tok]
        carried = em.op(
            aten.sum.dim_IntList,
            em.op(
                aten.mul.Tensor,
                em.op(aten.unsqueeze.default, coef, -1),
                em.op(aten.unsqueeze.default, state, 1),
            ),
            [0],
        )  # (H_res x)_i = Σ_j H_res[i, j] x_j
        return carried, unit_in

    def _pre_bias(self, site: int) -> torch.Tensor:
        """b_pre = logit(w), w = 1/n (uniform), or READ_WEIGHT on stream l mod n and the rest
        shared by the others (alternating): weights summing to 1 either way."""
        n = self.n
        w = torch.full((n,), 1 / n, dtype=torch.float64)
        if self.alternating:
            w.fill_((1 - READ_WEIGHT) / (n - 1))
            w[site % n] = READ_WEIGHT
        return torch.logit(w).to(self.dtype)

    def write(self, em, state, unit_in, unit_out, unit):
        post = self._lead(em, self.post.pop(unit.name), unit.rank - 1)
        new = em.op(aten.mul.Tensor, post, em.op(aten.unsqueeze.default, unit_out, 0))
        return em.op(aten.add.Tensor, state, new)

    def readout(self, em, state, stack):
        return mean_of_channels(em, state)

    def _lead(self, em, coef, tok: int):
        """[*tok, n] → [n, *tok, 1], to weigh the state's channels."""
        t = em.op(aten.permute.default, coef, [tok, *range(tok)])
        return em.op(aten.unsqueeze.default, t, -1)


@register
class ManifoldHyperConnections(Pass):
    name = "mhc"
    requires = frozenset({"structure", "site-residual"})
    invalidates = {"site-residual": SITES_RETHREADED, "identity-layer": NO_IDENTITY_LAYER}
    summary = (
        "manifold-constrained hyper-connections: n streams mixed by a doubly stochastic H_res "
        "(Sinkhorn-Knopp), read and written through σ-gated H_pre, H_post"
    )
    options = (
        Option("n", int, 4, "number of streams n (expansion rate)", minimum=2, maximum=64),
        Option(
            "pre",
            str,
            "uniform",
            "H_pre at init: `uniform` (the paper's b_pre = logit(1/n); the streams then stay "
            f"equal in training) or `alternating` (site l weighs stream l mod n by {READ_WEIGHT}, "
            "the others equally: breaks the symmetry, still exact)",
            choices=("uniform", "alternating"),
        ),
        Option(
            "sinkhorn_iters",
            int,
            20,
            "Sinkhorn-Knopp iterations (row then column normalisation) making H_res doubly "
            "stochastic",
            minimum=1,
            maximum=100,
        ),
    )

    def check_order(self, before) -> None:
        refuse_after_block_scheme(before)

    def run(self, graph) -> PassResult:
        scheme = MHCScheme(self.opts, *stream_of(graph))
        threads = rethread(graph, scheme, OWNER)
        remarks = [] if scheme.alternating else [Remark("every stream", SYMMETRIC)]
        added = owned_parameters(graph, OWNER)
        return PassResult(
            changed=True,
            remarks=remarks,
            details={"sites": sum(len(t.states) for t in threads), "parameters_added": added},
        )
