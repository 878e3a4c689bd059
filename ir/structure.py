"""The Structure of a captured Transformer: what `archfx.ir.analyze` recognises.

Every field points back into the graph (nodes and parameter targets) so passes can rewrite
what the analysis found; `to_json()` is the stable, documented view the CLI prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

from .ops import Linear


@dataclass
class Norm:
    kind: str  # "layernorm" | "rmsnorm"
    input: fx.Node  # the tensor normalised
    output: fx.Node  # the normalised, scaled (and shifted) tensor
    weight: str | None = None  # gain parameter
    bias: str | None = None
    eps: float | None = None
    unit_offset: bool = False  # gain applied as (1 + w)
    nodes: set = field(default_factory=set, repr=False)

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "gain": "1+w" if self.unit_offset else ("w" if self.weight else None),
            "bias": self.bias is not None,
            "eps": self.eps,
        }


@dataclass
class Attention:
    core: fx.Node  # scaled_dot_product_attention, or the softmax of a hand-written attention
    heads: int
    kv_heads: int
    head_dim: int
    q: Linear
    k: Linear
    v: Linear
    o: Linear | None
    cross: bool = False
    rope: bool = False
    rotary_dim: int | None = None
    qk_norm: bool = False
    query: fx.Node | None = None  # the per-head queries and keys the scores are computed from
    key: fx.Node | None = None

    @property
    def fused_qkv(self) -> bool:
        return self.q.node is self.k.node

    def to_json(self) -> dict:
        return {
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "rope": self.rope,
            "rotary_dim": self.rotary_dim,
            "qk_norm": self.qk_norm,
            "fused_qkv": self.fused_qkv,
            "projection": self.q.op,
            "kernel": _kernel(self.core),
        }


@dataclass
class MLP:
    hidden: int
    gated: bool
    activation: str | None
    up: list[Linear]  # first-layer projections (gate and up, or one fused)
    down: Linear

    def to_json(self) -> dict:
        return {
            "hidden": self.hidden,
            "gated": self.gated,
            "activation": self.activation,
            "projection": self.down.op,
        }


@dataclass
class MoE:
    """A mixture-of-experts branch: a router scores `experts` experts, each token goes to
    `top_k` of them; `shared`: an expert every token also goes through."""

    experts: int
    top_k: int | None
    shared: bool
    router: Linear

    def to_json(self) -> dict:
        return {"experts": self.experts, "top_k": self.top_k, "shared_expert": self.shared}


@dataclass
class Residual:
    """One residual site: stream ← carry + branch(stream), with its norms."""

    kind: str  # "attention" | "cross_attention" | "mlp" | "moe" | "parallel" | "other"
    placement: str  # "pre" | "post" | "sandwich" | "output" | "none"
    add: fx.Node  # the residual add on the trunk
    carry: fx.Node  # the stream entering the site
    branches: list[fx.Node]  # branch outputs added to the stream (two for parallel sites)
    pre_norm: Norm | None = None
    output_norm: Norm | None = None  # norm on the branch output (sandwich / output placement)
    post_norm: Norm | None = None  # norm on the stream after the add
    attention: Attention | None = None
    mlp: MLP | None = None
    moe: MoE | None = None
    nodes: set = field(default_factory=set, repr=False)

    @property
    def norm(self) -> Norm | None:
        return self.pre_norm or self.post_norm or self.output_norm

    def to_json(self) -> dict:
        out = {
            "kind": self.kind,
            "placement": self.placement,
            "norm": self.norm.to_json() if self.norm else None,
        }
        if self.attention:
            out["attention"] = self.attention.to_json()
        if self.mlp:
            out["mlp"] = self.mlp.to_json()
        if self.moe:
            out["moe"] = self.moe.to_json()
        return out


@dataclass
class Block:
    index: int  # position in its stack
    stack: str  # module path of the stack (e.g. "model.layers", "encoder.block")
    path: str  # module path of the block
    input: fx.Node  # stream entering the block
    output: fx.Node  # stream leaving the block
    residuals: list[Residual]
    nodes: set = field(default_factory=set, repr=False)
    shares: str | None = None  # path of the block whose module (and weights) this one calls again

    def _first(self, kind: str, attr: str):
        for r in self.residuals:
            if r.kind == kind or (r.kind == "parallel" and kind in ("attention", "mlp")):
                value = getattr(r, attr)
                if value is not None:
                    return value
        return None

    @property
    def attention(self) -> Attention | None:
        return self._first("attention", "attention")

    @property
    def cross_attention(self) -> Attention | None:
        return self._first("cross_attention", "attention")

    @property
    def mlp(self) -> MLP | None:
        return self._first("mlp", "mlp")

    @property
    def moe(self) -> MoE | None:
        return self._first("moe", "moe")

    @property
    def placement(self) -> str:
        kinds = {r.placement for r in self.residuals}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    def to_json(self) -> dict:
        return {
            "index": self.index,
            "stack": self.stack,
            "path": self.path,
            "placement": self.placement,
            "shares": self.shares,
            "residuals": [r.to_json() for r in self.residuals],
            "attention": self.attention.to_json() if self.attention else None,
            "cross_attention": self.cross_attention.to_json() if self.cross_attention else None,
            "mlp": self.mlp.to_json() if self.mlp else None,
            "moe": self.moe.to_json() if self.moe else None,
        }


@dataclass
class Embedding:
    kind: str  # "token" | "position" | "token_type" | "patch" | "other"
    node: fx.Node
    weight: str
    num: int
    dim: int

    def to_json(self) -> dict:
        return {"kind": self.kind, "num": self.num, "dim": self.dim}


@dataclass
class Stack:
    path: str
    blocks: list[Block]
    final_norm: Norm | None
    output: fx.Node  # the stream after the final norm (or the last block)

    @property
    def width(self) -> int:
        """The stream's width in this stack (stages of a hierarchical model differ)."""
        return self.blocks[0].input.meta["val"].shape[-1]

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "blocks": len(self.blocks),
            "width": self.width,
            "final_norm": self.final_norm.to_json() if self.final_norm else None,
        }


@dataclass
class Head:
    linear: Linear
    tied: bool
    norm: Norm | None = None  # the norm whose output the head reads (after any transform)

    def to_json(self) -> dict:
        return {
            "out_features": self.linear.out_features,
            "tied": self.tied,
            "bias": self.linear.bias is not None,
        }


@dataclass
class Structure:
    hidden_size: int  # the first stack's width (`Stack.width` for each stack's)
    embeddings: list[Embedding]
    stacks: list[Stack]
    head: Head | None
    remarks: list[str] = field(default_factory=list)
    # constructs the analysis could not account for (ir/consistency.py): a partial structure
    unrecognised: list[str] = field(default_factory=list)

    @property
    def partial(self) -> bool:
        return bool(self.unrecognised)

    @property
    def blocks(self) -> list[Block]:
        return [b for s in self.stacks for b in s.blocks]

    def to_json(self) -> dict:
        return {
            "hidden_size": self.hidden_size,
            "num_blocks": len(self.blocks),
            "embeddings": [e.to_json() for e in self.embeddings],
            "stacks": [s.to_json() for s in self.stacks],
            "blocks": [b.to_json() for b in self.blocks],
            "head": self.head.to_json() if self.head else None,
            "remarks": list(self.remarks),
            "partial": self.partial,
            "unrecognised": list(self.unrecognised),
        }


def _kernel(core: fx.Node) -> str:
    """What computes an attention: `memory` (sDNC read), `sdpa`, or a hand-written `softmax`."""
    name = str(core.target)
    return (
        "memory" if "memory_read" in name else "sdpa" if "scaled_dot_product" in name else "softmax"
    )
