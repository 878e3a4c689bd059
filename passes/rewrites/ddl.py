"""ddl: Deep Delta Learning residual updates (Zhang, Liu, Wang, Gu 2026), docs/passes.md.

Rewrite: every residual site x ← x + h (h = F(Norm(x)), attention or MLP unchanged) becomes a
delta-rule update of a residual state X ∈ R^{d×d_v} per token:

    k = h / sqrt(‖h‖² + ε²)          β = 2σ(w_β·c + b_β), b_β = logit(β0/2), c = Norm(x_in)
    v = W_v c (value=paper)   or   v = 4σ(W_v x_in + b) (value=code)
    X ← X + β k (vᵀ − kᵀX)

β = 0 keeps X, β = 1 overwrites the readout along k (kᵀX = vᵀ), β → 2 reflects; the error
along k shrinks by (1 − β). k, β and kᵀX are computed in fp32 whatever the model's dtype
(element-wise products and sums, which autocast leaves in fp32); v is one small projection
(a matmul, in autocast's precision, then promoted). For d_v > 1 the state starts
as the embedding replicated d_v times (or, with `ec`, through an identity-initialised causal
depthwise convolution over tokens per channel), and before each sublayer a compressor reads
x_in from X: `cc` mixes the channels per feature (weights 1/d_v), `tc` runs an
identity-initialised causal depthwise convolution over tokens per channel and then a read
vector (1/d_v); one compressor per block (shared by its sublayers), another before the final
norm. Post-norms act on every channel of the state.

Exactness: `value=paper` and `value=code` are the paper's and the official code's updates:
they change the function (the increment is parallel to h with a magnitude v cannot match).
`value=compat` is the homotopy x ← x + λh + (1 − λ)β(v − kᵀx)k with λ = 1 at init, exact
(bit-exact for d_v = 1); for d_v > 1 the replicated state and compressors whose weights sum to
1 keep it exact up to rounding.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from archfx.ir import PassError
from archfx.ir.ops import aten, is_call

from ..engines.decode import ONE_TOKEN
from ..engines.residual import (
    SITES_RETHREADED,
    Emitter,
    Scheme,
    owned_parameters,
    refuse_after_block_scheme,
    replicate,
    rethread,
    stream_of,
)
from ..infra.base import Option, Pass, PassResult, register

OWNER = "ddl"
F32 = torch.float32


class DDLScheme(Scheme):
    granularity = "site"

    def __init__(self, opts: dict, d: int, dtype: torch.dtype):
        self.dv, self.value, self.beta0 = opts["dv"], opts["value"], opts["beta0"]
        self.compressor, self.ec, self.eps = opts["compressor"], opts["ec"], opts["eps"]
        self.stream_shaped = self.dv == 1
        self.channels = self.dv
        self.d, self.dtype = d, dtype
        self.gen = torch.Generator().manual_seed(opts["seed"])
        self.compressors: dict[str, list[str]] = {}

    # state ------------------------------------------------------------------------------------

    def init(self, em, x, stack):
        if self.dv == 1:
            return x
        if not self.ec:
            return replicate(em, x, self.dv)
        _need_sequence(x.meta["val"].dim(), "the embeddings")
        w = torch.zeros(self.d * self.dv, 1, 4, dtype=self.dtype)
        w[:, 0, -1] = 1.0  # identity: each channel starts as the embedding
        conv = self._causal_conv(
            em,
            em.op(aten.unsqueeze.default, x, 0),
            em.param(f"s{stack}.embed_conv", w),
            groups=self.d,
            grouped_out=True,
        )
        return conv

    def read(self, em, state, unit):
        if self.dv == 1:
            return state, state
        if self.compressor == "tc":
            _need_sequence(unit.rank, f"the stream at {unit.block.path}")
        return state, self._compress(em, state, f"s{unit.stack}.l{unit.block.index}")

    def readout(self, em, state, stack):
        return state if self.dv == 1 else self._compress(em, state, f"s{stack}.readout")

    def write(self, em, state, unit_in, h, unit):
        name = unit.name
        c = unit.site.pre_norm.output if unit.site.pre_norm is not None else unit_in
        hf = self._f32(em, h)
        norm2 = em.op(aten.sum.dim_IntList, em.op(aten.mul.Tensor, hf, hf), [-1], True)
        k = em.op(
            aten.mul.Tensor,
            hf,
            em.op(aten.rsqrt.default, em.op(aten.add.Tensor, norm2, self.eps**2)),
        )
        cf = self._f32(em, c)
        w_beta = em.param(f"{name}.beta_weight", torch.zeros(self.d, dtype=F32))
        b_beta = em.param(
            f"{name}.beta_bias", torch.tensor([math.log(self.beta0 / (2 - self.beta0))], dtype=F32)
        )
        logit = em.op(
            aten.linear.default, cf, em.op(aten.view.default, w_beta, [1, self.d]), b_beta
        )
        beta = em.op(aten.mul.Tensor, em.op(aten.sigmoid.default, logit), 2.0)  # [*tok, 1]
        v = self._value(em, cf, unit_in, name)  # [*tok, dv]
        xf = self._f32(em, state)
        target = v
        if self.dv > 1:  # channels lead: X is [dv, *tok, d]
            k_ = em.op(aten.unsqueeze.default, k, 0)
            target = em.op(aten.unsqueeze.default, em.op(aten.movedim.int, v, -1, 0), -1)
        else:
            k_ = k
        kx = em.op(
            aten.sum.dim_IntList, em.op(aten.mul.Tensor, k_, xf), [-1], True
        )  # fp32, autocast-proof
        error = em.op(aten.sub.Tensor, target, kx)  # v − kᵀX, [dv?, *tok, 1]
        if self.value == "compat":  # X + λh + (1 − λ)·βk(v − kᵀX), λ = 1 at init
            lam = em.param(f"{name}.lam", torch.ones(1, dtype=self.dtype))
            gate = em.op(aten.mul.Tensor, em.op(aten.rsub.Scalar, lam, 1.0), beta)
            base = em.op(aten.addcmul.default, state, lam, h)
        else:
            gate, base = beta, state
        direction = em.op(aten.mul.Tensor, gate, k)  # [*tok, d]
        new = em.op(
            aten.addcmul.default, self._f32(em, base), direction, error
        )  # one pass over the state
        if self.dtype != F32:
            new = em.op(aten._to_copy.default, new, dtype=self.dtype)
        new.meta["archfx_ddl"] = {"k": k, "beta": beta, "v": v, "state_in": state}
        return new

    def _f32(self, em: Emitter, x: fx.Node) -> fx.Node:
        return x if self.dtype == F32 else em.op(aten._to_copy.default, x, dtype=F32)

    # pieces -----------------------------------------------------------------------------------

    def _value(self, em: Emitter, cf: fx.Node, unit_in: fx.Node, name: str) -> fx.Node:
        w = torch.randn(self.dv, self.d, generator=self.gen, dtype=F32) / self.d**0.5
        wv = em.param(f"{name}.value_weight", w)
        src = cf if self.value != "code" else em.op(aten._to_copy.default, unit_in, dtype=F32)
        if self.value != "code":
            return em.op(aten.linear.default, src, wv)
        b = em.param(f"{name}.value_bias", torch.zeros(self.dv, dtype=F32))
        return em.op(
            aten.mul.Tensor,
            em.op(aten.sigmoid.default, em.op(aten.linear.default, src, wv, b)),
            4.0,
        )

    def _compress(self, em: Emitter, state: fx.Node, key: str) -> fx.Node:
        """x_in from X: per-feature channel mix (cc) or causal token conv + read vector (tc).

        Written as s·Y_0 + Σ_{j≥1} c_j (Y_j − Y_0), which spans every channel weighting
        (w_0 = s − Σc_j, w_j = c_j) and starts at the paper's w = 1/d_v, but returns Y_0
        exactly (not a rounded Σ Y_j/d_v) while the channels are identical.
        """
        dv, d = self.dv, self.d
        if key in self.compressors:
            params = [em.get(t) for t in self.compressors[key]]
        elif self.compressor == "cc":
            params = [
                em.param(f"{key}.compress_first", torch.ones(d, dtype=self.dtype)),
                em.param(f"{key}.compress", torch.full((dv - 1, d), 1.0 / dv, dtype=self.dtype)),
            ]
        else:
            w = torch.zeros(dv * d, 1, 4, dtype=self.dtype)
            w[:, 0, -1] = 1.0
            params = [
                em.param(f"{key}.compress_conv", w),
                em.param(f"{key}.compress_first", torch.ones(1, dtype=self.dtype)),
                em.param(f"{key}.compress", torch.full((dv - 1,), 1.0 / dv, dtype=self.dtype)),
            ]
        self.compressors[key] = [p.target for p in params]
        if self.compressor == "tc":
            state = self._causal_conv(em, state, params.pop(0), groups=dv * d, grouped_out=False)
        first, rest = params
        y0 = em.op(aten.select.int, state, 0, 0)
        others = em.op(
            aten.sub.Tensor,
            em.op(aten.slice.Tensor, state, 0, 1),
            em.op(aten.unsqueeze.default, y0, 0),
        )
        if (
            self.compressor == "cc"
        ):  # per-feature weights: flatten the tokens, weigh, sum the channels
            flat = em.op(aten.reshape.default, others, [dv - 1, -1, d])
            mixed = em.op(
                aten.sum.dim_IntList,
                em.op(aten.mul.Tensor, flat, em.op(aten.unsqueeze.default, rest, 1)),
                [0],
            )
            mixed = em.op(aten.reshape_as.default, mixed, y0)
        else:
            mixed = em.op(aten.einsum.default, "c...d,c->...d", [others, rest])
        return em.op(aten.add.Tensor, em.op(aten.mul.Tensor, first, y0), mixed)

    def _causal_conv(
        self, em: Emitter, x: fx.Node, w: fx.Node, groups: int, grouped_out: bool
    ) -> fx.Node:
        """Depthwise causal convolution (kernel 4) over the token axis of [n, B, S, d] → [dv, B, S, d]."""
        n = 1 if grouped_out else self.dv
        t = em.op(aten.permute.default, x, [1, 0, 3, 2])  # [B, n, d, S]
        t = em.op(aten.flatten.using_ints, t, 1, 2)  # [B, n·d, S]
        t = em.op(aten.constant_pad_nd.default, t, [3, 0], 0.0)
        t = em.op(aten.conv1d.default, t, w, None, [1], [0], [1], groups)  # [B, dv·d, S]
        if grouped_out:  # one input channel per feature, dv outputs each: [B, d, dv, S]
            t = em.op(aten.unflatten.int, t, 1, [self.d, self.dv])
            return em.op(aten.permute.default, t, [2, 0, 3, 1])
        t = em.op(aten.unflatten.int, t, 1, [n, self.d])  # [B, dv, d, S]
        return em.op(aten.permute.default, t, [1, 0, 3, 2])


def _need_sequence(rank: int, where: str) -> None:
    if rank != 3:
        raise PassError(
            f"the token convolutions (ec, compressor=tc) need a (batch, sequence, features) "
            f"stream; {where} has rank {rank}"
        )


# one token of one sequence in eager PyTorch (engines/decode.py, ONE_TOKEN) ----------------------


class _Mismatch(Exception):
    pass


def _args(node, target, *, count: int | None = None) -> tuple:
    """`node`'s args when it is a call of `target` without kwargs (and `count` args)."""
    if not is_call(node, {target}) or node.kwargs or count not in (None, len(node.args)):
        raise _Mismatch
    return node.args


def _param(node) -> fx.Node:
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        raise _Mismatch
    return node


def _one_token_site(new: fx.Node) -> tuple | None:
    """`(kernel, args)` for a d_v = 1 update in fp32, recognised op by op as `DDLScheme.write`
    emits it, or None."""
    if "archfx_ddl" not in new.meta:
        return None
    try:
        base, direction, error = _args(new, aten.addcmul.default)
        lam = None
        if is_call(base, {aten.addcmul.default}):  # compat: x + λh, gate (1 − λ)β
            state, lam, h = _args(base, aten.addcmul.default)
            gate, k = _args(direction, aten.mul.Tensor)
            one_minus, beta = _args(gate, aten.mul.Tensor)
            if _args(one_minus, aten.rsub.Scalar) != (_param(lam), 1.0):
                raise _Mismatch
        else:
            state = base
            beta, k = _args(direction, aten.mul.Tensor)
        h_, scale = _args(k, aten.mul.Tensor)
        norm2, eps2 = _args(_args(scale, aten.rsqrt.default, count=1)[0], aten.add.Tensor)
        if lam is None:
            h = h_
        if h_ is not h or _args(norm2, aten.sum.dim_IntList) != (norm2.args[0], [-1], True):
            raise _Mismatch
        if _args(norm2.args[0], aten.mul.Tensor) != (h, h) or not isinstance(eps2, float):
            raise _Mismatch
        v, kx = _args(error, aten.sub.Tensor)
        if _args(kx, aten.sum.dim_IntList) != (kx.args[0], [-1], True):
            raise _Mismatch
        if _args(kx.args[0], aten.mul.Tensor) != (k, state):
            raise _Mismatch
        sigmoid, two = _args(beta, aten.mul.Tensor)
        logit = _args(sigmoid, aten.sigmoid.default, count=1)[0]
        c, w_beta, b_beta = _args(logit, aten.linear.default, count=3)
        w_beta = _param(_args(w_beta, aten.view.default, count=2)[0])
        if is_call(v, {aten.linear.default}):  # paper, compat: v = W_v c
            src, w_v = _args(v, aten.linear.default, count=2)
            b_v = None
            if src is not c:
                raise _Mismatch
        else:  # code: v = 4σ(W_v x_in + b)
            sigmoid_v, four = _args(v, aten.mul.Tensor)
            lin = _args(sigmoid_v, aten.sigmoid.default, count=1)[0]
            src, w_v, b_v = _args(lin, aten.linear.default, count=3)
            if four != 4.0:
                raise _Mismatch
            _param(b_v)
        for p in (w_v, b_beta):
            _param(p)
        values = [n.meta.get("val") for n in (state, h, c, src, new)]
        if (
            two != 2.0
            or any(x is None or x.dtype != F32 for x in values)
            or state.meta["val"].shape != h.meta["val"].shape  # d_v = 1: the stream's shape
        ):
            raise _Mismatch
    except _Mismatch:
        return None
    return _ddl_one_token, (state, h, c, w_beta, b_beta, src, w_v, b_v, lam, eps2)


def _sigmoid(z: float) -> float:
    return 0.5 * (1.0 + math.tanh(0.5 * z))  # no overflow for any z


def _ddl_one_token(state, h, c, w_beta, b_beta, src, w_v, b_v, lam, eps2: float):
    """The update for one token of one sequence: the same formula in Python floats,
    X + s·h with s = β r (v − r hᵀX), r = 1/sqrt(‖h‖² + ε²) (k = r h), s ← λ + (1 − λ)s in
    compat mode (s = 1 exactly at λ = 1)."""
    d = h.shape[-1]
    x, hv, cv = state.reshape(d), h.reshape(d), c.reshape(d)
    r = 1.0 / math.sqrt(torch.dot(hv, hv).item() + eps2)
    beta = 2.0 * _sigmoid(torch.dot(cv, w_beta).item() + b_beta.item())
    v = torch.dot(src.reshape(d), w_v.reshape(d)).item()
    if b_v is not None:  # value=code: v = 4σ(W_v x_in + b)
        v = 4.0 * _sigmoid(v + b_v.item())
    s = beta * r * (v - r * torch.dot(hv, x).item())
    if lam is not None:
        lam_ = lam.item()
        s = lam_ + (1.0 - lam_) * s
    return torch.add(state, h, alpha=s)


ONE_TOKEN.append(_one_token_site)


@register
class DDL(Pass):
    name = "ddl"
    requires = frozenset({"structure", "site-residual"})
    invalidates = {"site-residual": SITES_RETHREADED}
    summary = (
        "Deep Delta Learning: each residual add becomes a delta-rule update of a (d × d_v) state"
    )
    exact_when = {"value": ("compat",)}
    options = (
        Option(
            "dv",
            int,
            1,
            "value channels d_v of the state (1: the ordinary stream)",
            minimum=1,
            maximum=64,
        ),
        Option(
            "value",
            str,
            "compat",
            "`compat`: x ← x + λh + (1 − λ)β(v − kᵀx)k with λ = 1 at init (exact, for "
            "upcycling pretrained models); `paper`: v = W_v c; `code`: v = 4σ(W_v x + b) (both "
            "change the function: no certificate is claimed)",
            choices=("compat", "paper", "code"),
        ),
        Option(
            "beta0",
            float,
            1.0,
            "initial gate β, 0 < β0 < 2 (1 overwrites the readout along k, → 2 reflects)",
            minimum=1e-6,
            maximum=2 - 1e-6,
        ),
        Option(
            "compressor",
            str,
            "cc",
            "d_v > 1: how a block reads X: `cc` mixes the channels per feature (weights 1/d_v); "
            "`tc` runs a causal depthwise conv over tokens (kernel 4, identity at init) per "
            "channel, then a read vector (1/d_v)",
            choices=("cc", "tc"),
        ),
        Option(
            "ec",
            bool,
            False,
            "d_v > 1: the embedding enters through an identity-initialised causal depthwise conv "
            "per channel instead of being replicated",
        ),
        Option("eps", float, 1e-5, "ε in k = h / sqrt(‖h‖² + ε²)", minimum=0.0),
        Option("seed", int, 0, "seed of the value projections' initial weights", minimum=0),
    )

    def check_order(self, before) -> None:
        if self.opts["dv"] > 1:
            refuse_after_block_scheme(before)

    def run(self, graph) -> PassResult:
        threads = rethread(graph, DDLScheme(self.opts, *stream_of(graph)), OWNER)
        added = owned_parameters(graph, OWNER)
        sites = sum(len(t.states) for t in threads)
        return PassResult(
            changed=True,
            details={"sites": sites, "parameters_added": added, "exact": self.claims_exact()},
        )
