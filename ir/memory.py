"""The memory of a stateless Differentiable Neural Computer as two graph ops (docs/passes.md).

    archfx::memory_write(addresses, contents) -> (addresses, contents)
        One slot per position, written once: slot t holds address k_t and content v_t (the
        keys and values as the model computes them, RoPE and QK-norm included). GQA models
        write one bank per key head.
    archfx::memory_read(query, addresses, contents, attn_mask, dropout_p, is_causal, *,
                        scale, enable_gqa, softcap) -> read vectors
        Every query head is a read head: read weighting w = softmax(cap(s · q·Kᵀ) + mask) with
        the model's own strength s (its scale, 1/√d_k when None), mask and optional tanh
        soft-capping cap(x) = c·tanh(x / c); read vector r = wᵀV. Query heads sharing a key
        head read the same bank (`enable_gqa`). The arguments are those of
        `scaled_dot_product_attention`, plus `softcap`.

Both are CompositeImplicitAutograd: in eager PyTorch the read is the fused SDPA kernel,
autograd runs through it, and torch.compile and the ONNX exporter see exactly the attention
the model had. The explicit form (matmul, softmax, matmul) serves soft-capping, which SDPA
lacks, and (batch·heads, tokens, dim) layouts, which the ONNX exporter's SDPA lacks.
torch.export keeps the two ops whole, so captures, analyses and growth passes see the memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_LIB = torch.library.Library("archfx", "DEF")
_LIB.define(
    "memory_write(Tensor(a) addresses, Tensor(b) contents) -> (Tensor(a), Tensor(b))",
)
_LIB.define(
    "memory_read(Tensor query, Tensor addresses, Tensor contents, Tensor? attn_mask=None, "
    "float dropout_p=0.0, bool is_causal=False, *, float? scale=None, bool enable_gqa=False, "
    "float? softcap=None) -> Tensor"
)


def _write(addresses: torch.Tensor, contents: torch.Tensor):
    return torch.ops.aten.alias(addresses), torch.ops.aten.alias(contents)


def weightings(
    query: torch.Tensor,
    addresses: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    *,
    scale: float | None = None,
    enable_gqa: bool = False,
    softcap: float | None = None,
) -> torch.Tensor:
    """The read weightings [..., heads, queries, slots] of `memory_read` (its explicit form)."""
    if enable_gqa:
        addresses = _per_read_head(addresses, query)
    s = query.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(query, addresses.transpose(-2, -1)) * s
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if is_causal:
        n, m = scores.shape[-2:]
        allowed = torch.ones(n, m, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    # at least fp32, as eager attention does for half precisions (fp64 stays fp64)
    wide = torch.promote_types(scores.dtype, torch.float32)
    return torch.softmax(scores, -1, dtype=wide).to(query.dtype)


def _read(
    query,
    addresses,
    contents,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    *,
    scale=None,
    enable_gqa=False,
    softcap=None,
):
    if (
        enable_gqa
        and torch.onnx.is_in_onnx_export()  # the exporter's SDPA would repeat the banks
        and query.dim() == 4
        and query.shape[1] != addresses.shape[1]
    ):
        return _grouped(query, addresses, contents, attn_mask, dropout_p, is_causal, scale, softcap)
    if softcap is None and query.dim() == 4:
        return F.scaled_dot_product_attention(
            query,
            addresses,
            contents,
            attn_mask,
            dropout_p,
            is_causal,
            scale=scale,
            enable_gqa=enable_gqa,
        )
    w = weightings(
        query,
        addresses,
        attn_mask,
        is_causal,
        scale=scale,
        enable_gqa=enable_gqa,
        softcap=softcap,
    )
    if dropout_p > 0:
        w = F.dropout(w, dropout_p)
    if enable_gqa:
        contents = _per_read_head(contents, query)
    return torch.matmul(w, contents)


def _grouped(query, addresses, contents, attn_mask, dropout_p, is_causal, scale, softcap):
    """A GQA read without repeating the banks: the g query heads [B, H, n, d] of each key head
    read as g·n queries [B, H/g, g·n, d] of its bank (the mask repeated over the g groups)."""
    b, h, n, d = query.shape
    hk, slots = addresses.shape[1], addresses.shape[-2]
    g = h // hk
    mask = attn_mask
    if is_causal:
        causal = torch.ones(n, slots, dtype=torch.bool, device=query.device).tril()
        if mask is None:
            mask = causal
        elif mask.dtype == torch.bool:
            mask = mask & causal
        else:
            mask = mask.masked_fill(~causal, float("-inf"))
    if mask is not None:
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        mb = mask.shape[0]
        if mask.shape[1] == 1:
            mask = mask.unsqueeze(2).expand(mb, 1, g, n, slots).reshape(mb, 1, g * n, slots)
        else:
            mask = mask.expand(mb, h, n, slots).reshape(mb, hk, g * n, slots)
    out = _read(
        query.reshape(b, hk, g * n, d),
        addresses,
        contents,
        mask,
        dropout_p,
        scale=scale,
        softcap=softcap,
    )
    return out.reshape(b, h, n, out.shape[-1])


def _per_read_head(bank: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """A GQA bank repeated for each query head that reads it."""
    return bank.repeat_interleave(query.shape[-3] // bank.shape[-3], -3)


_LIB.define(
    "memory_delta(Tensor query, Tensor keys, Tensor values, Tensor strength) -> Tensor",
)


CHUNK = 32  # tokens per chunk of the delta-rule scan


def _delta(query, keys, values, strength):
    """A fast-weight memory written by the delta rule token by token, read after each write:
    per key head X_t = X_{t−1} + β_t k_t (v_tᵀ − k_tᵀ X_{t−1}) ∈ R^{d_k×d_v} (k_t of unit norm:
    the error of the readout along k_t shrinks by 1 − β_t, β_t = 1 overwrites it with v_t; the
    update DDL applies over layers), X_0 = 0, r_t = X_tᵀ q_t; query heads of a GQA group read
    their key head's memory. (batch, heads, tokens, dim) layouts.

    Computed chunk by chunk (the WY form of the delta rule, Yang et al. 2024): inside a chunk
    of C tokens starting from X, the written values u_t = β_t(v_t − X_{t−1}ᵀk_t) solve the unit
    lower-triangular system (I + tril(diag(β) K Kᵀ, −1)) U = diag(β)(V − K X), which forward
    substitution solves in the order the token loop would; then every read of the chunk is
    Q X + tril(Q Kᵀ) U and X ← X + Kᵀ U. A chunk is a few matmuls and one triangular solve,
    so T tokens take ⌈T/C⌉ sequential steps instead of T."""
    b, hk, n, dk = keys.shape
    dv, groups = values.shape[-1], query.shape[1] // hk
    dtype = query.dtype
    wide = torch.promote_types(dtype, torch.float32)  # the solve needs fp32 or fp64
    pad = -n % CHUNK  # padding tokens write nothing (β = 0, k = 0) and are never read
    c = (n + pad) // CHUNK

    def chunks(t, last):  # [b, hk, tokens, last] → [b, hk, chunk, C, last]
        t = F.pad(t.to(wide), (0, 0, 0, pad))
        return t.reshape(b, hk, c, CHUNK, last)

    k, v = chunks(keys, dk), chunks(values, dv)
    beta = F.pad(strength.to(wide), (0, pad)).reshape(b, hk, c, CHUNK, 1)
    q = F.pad(query.to(wide).reshape(b, hk, groups, n, dk), (0, 0, 0, pad))
    q = q.reshape(b, hk, groups, c, CHUNK, dk).transpose(2, 3)  # [b, hk, chunk, groups, C, dk]
    ones = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=keys.device)
    system = (beta * k @ k.transpose(-1, -2)).masked_fill(~ones.tril(-1), 0) + torch.eye(
        CHUNK, dtype=wide, device=keys.device
    )
    # W = A⁻¹ diag(β) K and Ũ = A⁻¹ diag(β) V, so that U = Ũ − W X for the chunk's start X
    solved = torch.linalg.solve_triangular(
        system, beta * torch.cat([k, v], -1), upper=False, unitriangular=True
    )
    w, u0 = solved[..., :dk], solved[..., dk:]
    causal = (q @ k.unsqueeze(3).transpose(-1, -2)).masked_fill(~ones.tril(), 0)
    state = keys.new_zeros(b, hk, dk, dv, dtype=wide)
    reads = []
    for i in range(c):
        u = u0[:, :, i] - w[:, :, i] @ state  # [b, hk, C, dv]
        reads.append(q[:, :, i] @ state.unsqueeze(2) + causal[:, :, i] @ u.unsqueeze(2))
        state = state + k[:, :, i].transpose(-1, -2) @ u
    out = torch.stack(reads, 2)  # [b, hk, chunk, groups, C, dv]
    out = out.transpose(2, 3).reshape(b, hk * groups, c * CHUNK, dv)[:, :, :n]
    return out.to(dtype)


_LIB.impl("memory_write", _write, "CompositeImplicitAutograd")
_LIB.impl("memory_read", _read, "CompositeImplicitAutograd")
_LIB.impl("memory_delta", _delta, "CompositeImplicitAutograd")

WRITE = torch.ops.archfx.memory_write.default
READ = torch.ops.archfx.memory_read.default
DELTA = torch.ops.archfx.memory_delta.default
