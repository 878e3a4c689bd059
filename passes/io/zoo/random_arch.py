"""A configurable decoder-only Transformer written by hand: one module, many architectures.

`ArchConfig` picks, independently, what the families differ by: norm placement (pre, post,
sandwich, or GPT-J's parallel attention + MLP off one norm), norm kind (LayerNorm, RMSNorm
written out as Llama does, RMSNorm as `F.rms_norm`, Gemma's RMSNorm with a (1 + w) gain),
multi-head or grouped-query attention (any kv_heads dividing heads, repeated by `expand` as
Hugging Face's `repeat_kv` does or left to SDPA's `enable_gqa`), fused or separate q/k/v, a
gated (SwiGLU) or plain GELU MLP, tied or untied embeddings, biases on or off, rotary
(rotate-half, optionally partial) or learned absolute positions. Attention is always
`F.scaled_dot_product_attention` with causal masking. `random_config(rng)` draws one at random;
the property tests (tests/test_random_architectures.py) capture and rewrite what it draws.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

PLACEMENTS = ("pre", "post", "sandwich", "parallel")
NORMS = ("layernorm", "rmsnorm", "rmsnorm-op", "rmsnorm-1p")
POSITIONS = ("rope", "learned")
KV_REPEATS = ("expand", "enable_gqa")


@dataclass(frozen=True)
class ArchConfig:
    vocab_size: int = 64
    max_positions: int = 32
    hidden: int = 32
    layers: int = 2
    heads: int = 4
    kv_heads: int = 4
    head_dim: int = 8
    mlp_hidden: int = 64
    placement: str = "pre"
    norm: str = "rmsnorm"
    gated: bool = True
    tied: bool = False
    bias: bool = False
    positions: str = "rope"
    rotary_dim: int | None = None  # RoPE on the first rotary_dim features of a head (None: all)
    fused_qkv: bool = False
    kv_repeat: str = "expand"
    eps: float = 1e-5

    def __post_init__(self):
        checks = [
            (self.placement in PLACEMENTS, f"placement must be one of {PLACEMENTS}"),
            (self.norm in NORMS, f"norm must be one of {NORMS}"),
            (self.positions in POSITIONS, f"positions must be one of {POSITIONS}"),
            (self.kv_repeat in KV_REPEATS, f"kv_repeat must be one of {KV_REPEATS}"),
            (self.heads % self.kv_heads == 0, "kv_heads must divide heads"),
            (self.head_dim % 2 == 0, "head_dim must be even"),
            (
                self.rotary_dim is None
                or (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0),
                "rotary_dim must be even and at most head_dim",
            ),
            (self.layers >= 1, "layers must be ≥ 1"),
        ]
        for ok, why in checks:
            if not ok:
                raise ValueError(f"ArchConfig: {why}")

    def to_json(self) -> dict:
        return asdict(self)


def random_config(rng: random.Random) -> ArchConfig:
    """A small random architecture (every option drawn independently)."""
    head_dim = rng.choice([4, 8, 16])
    kv_heads = rng.choice([1, 2, 3])
    heads = kv_heads * rng.choice([1, 2, 3])
    positions = rng.choice(POSITIONS)
    rotary = None
    if positions == "rope" and rng.random() < 0.3 and head_dim > 4:
        rotary = head_dim // 2
    return ArchConfig(
        hidden=rng.choice([16, 24, 32, 48]),
        layers=rng.choice([1, 2, 3]),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        mlp_hidden=rng.choice([16, 40, 64]),
        placement=rng.choice(PLACEMENTS),
        norm=rng.choice(NORMS),
        gated=rng.random() < 0.5,
        tied=rng.random() < 0.5,
        bias=rng.random() < 0.5,
        positions=positions,
        rotary_dim=rotary,
        fused_qkv=rng.random() < 0.3,
        kv_repeat=rng.choice(KV_REPEATS),
    )


class Norm(nn.Module):
    """LayerNorm, RMSNorm (written out, or `F.rms_norm`), or RMSNorm with a (1 + w) gain."""

    def __init__(self, config: ArchConfig):
        super().__init__()
        self.kind, self.eps = config.norm, config.eps
        d = config.hidden
        if self.kind == "layernorm":
            self.ln = nn.LayerNorm(d, eps=config.eps, bias=config.bias)
        elif self.kind == "rmsnorm-1p":
            self.weight = nn.Parameter(torch.zeros(d))  # gain (1 + w), w = 0 at init
        else:
            self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        if self.kind == "layernorm":
            return self.ln(x)
        if self.kind == "rmsnorm-op":
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return y * (1.0 + self.weight) if self.kind == "rmsnorm-1p" else y * self.weight


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ArchConfig):
        super().__init__()
        self.config = c = config
        q, kv = c.heads * c.head_dim, c.kv_heads * c.head_dim
        if c.fused_qkv:
            self.qkv = nn.Linear(c.hidden, q + 2 * kv, bias=c.bias)
        else:
            self.q = nn.Linear(c.hidden, q, bias=c.bias)
            self.k = nn.Linear(c.hidden, kv, bias=c.bias)
            self.v = nn.Linear(c.hidden, kv, bias=c.bias)
        self.o = nn.Linear(q, c.hidden, bias=c.bias)

    def forward(self, x, cos=None, sin=None):
        c = self.config
        B, T, _ = x.shape
        if c.fused_qkv:
            q, k, v = self.qkv(x).split(
                [c.heads * c.head_dim, c.kv_heads * c.head_dim, c.kv_heads * c.head_dim], dim=-1
            )
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q = q.view(B, T, c.heads, c.head_dim).transpose(1, 2)
        k = k.view(B, T, c.kv_heads, c.head_dim).transpose(1, 2)
        v = v.view(B, T, c.kv_heads, c.head_dim).transpose(1, 2)
        if cos is not None:
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        gqa = c.kv_heads != c.heads
        if gqa and c.kv_repeat == "expand":  # Hugging Face's repeat_kv
            n = c.heads // c.kv_heads
            k = k[:, :, None].expand(B, c.kv_heads, n, T, c.head_dim).reshape(B, c.heads, T, -1)
            v = v[:, :, None].expand(B, c.kv_heads, n, T, c.head_dim).reshape(B, c.heads, T, -1)
            gqa = False
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return self.o(y.transpose(1, 2).reshape(B, T, c.heads * c.head_dim))

    def _rope(self, x, cos, sin):
        r = self.config.rotary_dim
        if r is None:
            return x * cos + rotate_half(x) * sin
        rot, rest = x[..., :r], x[..., r:]
        return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


class MLP(nn.Module):
    def __init__(self, config: ArchConfig):
        super().__init__()
        self.gated = config.gated
        if config.gated:
            self.gate = nn.Linear(config.hidden, config.mlp_hidden, bias=config.bias)
        self.up = nn.Linear(config.hidden, config.mlp_hidden, bias=config.bias)
        self.down = nn.Linear(config.mlp_hidden, config.hidden, bias=config.bias)

    def forward(self, x):
        h = F.silu(self.gate(x)) * self.up(x) if self.gated else F.gelu(self.up(x))
        return self.down(h)


class Block(nn.Module):
    def __init__(self, config: ArchConfig):
        super().__init__()
        self.placement = config.placement
        self.norm1 = Norm(config)
        self.attn = Attention(config)
        self.mlp = MLP(config)
        if config.placement != "parallel":
            self.norm2 = Norm(config)
        if config.placement == "sandwich":  # Gemma 2's norms on the branch outputs
            self.norm1_out = Norm(config)
            self.norm2_out = Norm(config)

    def forward(self, x, cos=None, sin=None):
        p = self.placement
        if p == "pre":
            x = x + self.attn(self.norm1(x), cos, sin)
            return x + self.mlp(self.norm2(x))
        if p == "post":
            x = self.norm1(x + self.attn(x, cos, sin))
            return self.norm2(x + self.mlp(x))
        if p == "sandwich":
            x = x + self.norm1_out(self.attn(self.norm1(x), cos, sin))
            return x + self.norm2_out(self.mlp(self.norm2(x)))
        h = self.norm1(x)  # parallel (GPT-J): one norm feeds attention and MLP
        return x + self.attn(h, cos, sin) + self.mlp(h)


class RandomArch(nn.Module):
    """Token ids (batch, tokens) → logits (batch, tokens, vocab)."""

    def __init__(self, config: ArchConfig):
        super().__init__()
        self.config = c = config
        self.embed = nn.Embedding(c.vocab_size, c.hidden)
        if c.positions == "learned":
            self.pos = nn.Embedding(c.max_positions, c.hidden)
        else:
            r = c.rotary_dim or c.head_dim
            inv = 1.0 / (10000.0 ** (torch.arange(0, r, 2, dtype=torch.float32) / r))
            self.register_buffer("inv_freq", inv, persistent=False)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        # post-LN models (BERT) normalise inside every block and have no final norm
        self.final_norm = Norm(c) if c.placement != "post" else None
        self.head = nn.Linear(c.hidden, c.vocab_size, bias=False)
        if c.tied:
            self.head.weight = self.embed.weight
        self.block_size = c.max_positions
        self.apply(self._init)
        gen = torch.Generator().manual_seed(0)
        for p in self.parameters():  # non-trivial gains and biases
            if p.dim() == 1:
                with torch.no_grad():
                    p.add_(0.1 * torch.randn(p.shape, generator=gen))

    @staticmethod
    def _init(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.1)

    def forward(self, input_ids):
        T = input_ids.shape[1]
        x = self.embed(input_ids)
        cos = sin = None
        pos = torch.arange(T, device=input_ids.device)
        if self.config.positions == "learned":
            x = x + self.pos(pos)
        else:
            freqs = pos[:, None].float() * self.inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return self.head(x)


def build_random(config: ArchConfig | None = None, seed: int = 0) -> RandomArch:
    """A `RandomArch` in eval mode with weights drawn from `seed` (a random config if None)."""
    if config is None:
        config = random_config(random.Random(seed))
    torch.manual_seed(seed)
    return RandomArch(config).eval()
