"""The third-party zoo: tiny random Transformers from implementations outside Hugging Face
transformers, each with the truth read from the model's own config and modules.

`THIRDPARTY[name]` is an `Entry`: `build()` gives `(model in eval mode, example inputs)` (a
tuple of positional arguments or a dict of keyword arguments, under a fixed seed, tiny sizes)
and `truth(model)` the architecture as the library itself describes it (never from archfx):

    blocks            transformer layers (a list per stack for encoder/decoder models)
    hidden_size       residual stream width (a list per stage for hierarchical models)
    heads, kv_heads, head_dim
    mlp_hidden, gated, activation   ("gelu", "gelu_tanh", "silu", "relu", "relu2", "quick_gelu")
    norm              "layernorm" | "rmsnorm" (`unit_offset`: the gain is applied as 1 + w)
    placement         "pre" | "post" | "parallel" | "sandwich"
    cross_attention   bool
    attention_kernel  "sdpa" | "einsum" | "bmm" | "matmul" | "mha" (nn.MultiheadAttention)
    fused_qkv         None, or the layout of the fused projection's output features
    moe               number of experts, or None
    shared_weights    one layer module applied at several depths (ALBERT-style)
    tied_head         output projection shares the token embedding
    rope, pooling, notes

`AVAILABLE` names the entries whose library imports here; `MISSING` maps the others to the
import error, for tests that skip with the reason (importing every library takes ~13 s,
mostly lightning and torchtune's datasets). The libraries are optional test
dependencies (pip names in `Entry.library`); torchvision is never needed: vit-pytorch's and
torchtune's CLIP modules are imported without their package `__init__`, which is what pulls
torchvision in (`_import_without_package_init`). Installed next to CPU torch 2.13 without
changing it:

    pip install x-transformers ibm-fms fair-esm palm-rlhf-pytorch
    pip install --no-deps litgpt vit-pytorch && pip install lightning einops
    pip install torchtune torchao==0.14.1  # torchtune 0.6 imports torchao.dtypes.nf4tensor

(litgpt's own requirements would downgrade huggingface-hub below what transformers needs;
vit-pytorch declares torchvision.) timm cannot be used: `import timm` imports torchvision.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from archfx.passes.io.zoo import hf_model as zoo_model

V = 128  # vocabulary
SEQ = 8  # example sequence length
WIDTH = 64


@dataclass(frozen=True)
class Entry:
    library: str  # pip name
    module: str  # import name whose failure makes the entry unavailable
    constructs: str  # what the entry exercises
    build: Callable[[], tuple[nn.Module, object]]
    truth: Callable[[nn.Module], dict]

    def expected(self) -> dict:
        """The truth of a freshly built model."""
        return self.truth(self.build()[0])


def _ids(batch: int = 2, seq: int = SEQ, low: int = 0, high: int = V) -> torch.Tensor:
    return torch.randint(low, high, (batch, seq), generator=torch.Generator().manual_seed(1))


def _image(size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def _ready(model: nn.Module, example) -> tuple[nn.Module, object]:
    return model.eval(), example


def _activation(obj) -> str:
    """The activation a module or function computes, by its class or function name."""
    if isinstance(obj, nn.GELU):
        return "gelu_tanh" if obj.approximate == "tanh" else "gelu"
    name = (getattr(obj, "__name__", None) or type(obj).__name__).lower()
    for key, act in (
        ("relusquared", "relu2"),
        ("quickgelu", "quick_gelu"),
        ("gelutanh", "gelu_tanh"),
        ("gelu", "gelu"),
        ("silu", "silu"),
        ("swish", "silu"),
        ("relu", "relu"),
    ):
        if key in name:
            return act
    raise ValueError(f"unknown activation {obj!r}")


def _norm(module: nn.Module) -> str:
    name = type(module).__name__.lower()
    if "rms" in name:
        return "rmsnorm"
    if "layernorm" in name:
        return "layernorm"
    raise ValueError(f"unknown norm {module!r}")


def _modules(model: nn.Module, cls) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, cls)]


def _import_without_package_init(package: str, submodule: str) -> types.ModuleType:
    """`package.submodule`, importing `package` itself only when it imports cleanly; otherwise
    the package is registered as an empty namespace over its own directory so that its
    `__init__` (which imports torchvision for data transforms) never runs."""
    try:
        importlib.import_module(package)
    except ImportError:
        if package not in sys.modules or not hasattr(sys.modules[package], "__path__"):
            spec = importlib.util.find_spec(package)
            if spec is None or not spec.submodule_search_locations:
                raise
            stub = types.ModuleType(package)
            stub.__path__ = list(spec.submodule_search_locations)
            sys.modules[package] = stub
    return importlib.import_module(f"{package}.{submodule}")


def _base(**kw) -> dict:
    """Defaults of the truth dict; each reader overrides what its model has."""
    out = dict(
        blocks=None,
        hidden_size=None,
        heads=None,
        kv_heads=None,
        head_dim=None,
        mlp_hidden=None,
        gated=False,
        activation=None,
        norm=None,
        unit_offset=False,
        placement="pre",
        cross_attention=False,
        attention_kernel=None,
        fused_qkv=None,
        moe=None,
        shared_weights=False,
        tied_head=False,
        rope=False,
        pooling=None,
        notes="",
    )
    out.update(kw)
    return out


# -- x-transformers (lucidrains) -------------------------------------------------------------


def _xt_build_gqa():
    """Decoder with GQA (kv_heads=2), rotary, SwiGLU as one fused GLU projection, x-transformers'
    RMSNorm (F.normalize · √d · g); attention by einsum (Attend without flash); the layer list
    is flat and alternates attention and feed-forward entries (a "block" is two list items)."""
    from x_transformers import Decoder, TransformerWrapper

    torch.manual_seed(0)
    dec = Decoder(
        dim=32,
        depth=2,
        heads=4,
        attn_dim_head=8,
        attn_kv_heads=2,
        rotary_pos_emb=True,
        ff_glu=True,
        ff_swish=True,
        ff_mult=2,
        use_rmsnorm=True,
    )
    return _ready(TransformerWrapper(num_tokens=V, max_seq_len=16, attn_layers=dec), (_ids(),))


def _xt_build_tied():
    """Decoder whose 3 layers are one attention and one feed-forward module applied 3 times
    (weight_tie_layers: shared weights across depth), relu² feed-forward, head tied to the token
    embedding as `x @ Eᵀ · d^-½` (a matmul, not a linear), learned absolute positions."""
    from x_transformers import Decoder, TransformerWrapper

    torch.manual_seed(0)
    dec = Decoder(
        dim=32, depth=3, heads=4, attn_dim_head=8, ff_relu_squared=True, weight_tie_layers=True
    )
    model = TransformerWrapper(num_tokens=V, max_seq_len=16, tie_embedding=True, attn_layers=dec)
    return _ready(model, (_ids(),))


def _xt_build_sandwich():
    """Encoder with sandwich norm (a norm before and after each branch), GELU, einsum attention,
    non-causal (bidirectional)."""
    from x_transformers import Encoder, TransformerWrapper

    torch.manual_seed(0)
    enc = Encoder(dim=32, depth=2, heads=4, attn_dim_head=8, sandwich_norm=True, ff_mult=2)
    return _ready(TransformerWrapper(num_tokens=V, max_seq_len=16, attn_layers=enc), (_ids(),))


class XTEncoderDecoder(nn.Module):
    """Adapter: x-transformers' XTransformer.forward returns the training loss; this calls its
    own encoder and decoder the way XTransformer.generate does and returns the logits."""

    def __init__(self, xt: nn.Module):
        super().__init__()
        self.xt = xt

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        enc = self.xt.encoder(src, return_embeddings=True)
        return self.xt.decoder.net(tgt, context=enc)


def _xt_build_encdec():
    """XTransformer encoder/decoder: einsum self- and cross-attention, tied token embeddings
    between encoder and decoder, kwargs example inputs."""
    from x_transformers import XTransformer

    torch.manual_seed(0)
    xt = XTransformer(
        dim=32,
        enc_num_tokens=V,
        enc_depth=2,
        enc_heads=4,
        enc_attn_dim_head=8,
        enc_max_seq_len=16,
        dec_num_tokens=V,
        dec_depth=2,
        dec_heads=4,
        dec_attn_dim_head=8,
        dec_max_seq_len=16,
        enc_ff_mult=2,
        dec_ff_mult=2,
        tie_token_emb=True,
    )
    return _ready(XTEncoderDecoder(xt), {"src": _ids(), "tgt": _ids(seq=6)})


def _xt_build_vit():
    """ViTransformerWrapper: patches by einops Rearrange + LayerNorm + Linear, SDPA attention
    (attn_flash), mean pooling over tokens after the last block, classifier head."""
    from x_transformers import Encoder, ViTransformerWrapper

    torch.manual_seed(0)
    enc = Encoder(dim=32, depth=2, heads=4, attn_dim_head=8, attn_flash=True, ff_mult=2)
    model = ViTransformerWrapper(image_size=32, patch_size=8, num_classes=10, attn_layers=enc)
    return _ready(model, (_image(),))


def _xt_truth(model: nn.Module) -> dict:
    from x_transformers.x_transformers import GLU, Attention, FeedForward

    if isinstance(model, XTEncoderDecoder):
        stacks = [model.xt.encoder.attn_layers, model.xt.decoder.net.attn_layers]
        wrapper = model.xt.decoder.net
    else:
        wrapper = model
        stacks = [model.attn_layers]
    blocks, shared, kinds = [], False, set()
    for layers in stacks:
        order = list(layers.layers_execute_order)
        executed = [layers.layer_types[i] for i in order]
        blocks.append(executed.count("a"))
        shared |= len(order) > len(set(order))
        kinds |= set(executed)
    first = stacks[0]
    attn = next(m for m in first.modules() if isinstance(m, Attention))
    ff = next(m for m in first.modules() if isinstance(m, FeedForward))
    up = ff.ff[0]
    gated = isinstance(up, GLU)
    act = up.act if gated else up[1]
    attend = attn.attend
    norm_module = first.layers[0][0][0]
    placement = "sandwich" if first.sandwich_norm else ("pre" if first.pre_norm else "post")
    tied = getattr(wrapper, "to_logits", None) is not None and not isinstance(
        wrapper.to_logits, nn.Module
    )
    pooling = "mean" if hasattr(model, "patch_to_embedding") else None
    return _base(
        blocks=blocks if len(blocks) > 1 else blocks[0],
        hidden_size=first.dim,
        heads=attn.heads,
        kv_heads=attn.kv_heads,
        head_dim=attn.to_q.out_features // attn.heads,
        mlp_hidden=ff.ff[-1].in_features,
        gated=gated,
        activation=_activation(act),
        norm=_norm(norm_module),
        unit_offset=bool(getattr(norm_module, "unit_offset", False)),
        placement=placement,
        cross_attention="c" in kinds,
        attention_kernel="sdpa" if attend.flash else "einsum",
        shared_weights=shared,
        tied_head=tied,
        rope=first.rotary_pos_emb is not None,
        pooling=pooling,
        notes="layer list alternates attention / feed-forward entries"
        + (
            "; encoder and decoder share the token embedding"
            if isinstance(model, XTEncoderDecoder)
            and model.xt.decoder.net.token_emb is model.xt.encoder.token_emb
            else ""
        )
        + ("; RMSNorm is F.normalize(x)·√d·g" if _norm(norm_module) == "rmsnorm" else "")
        + ("; tied head is x @ Eᵀ · d^-½" if tied else ""),
    )


# -- litgpt (Lightning AI) ---------------------------------------------------------------------


def _litgpt(**kw):
    from litgpt.config import Config
    from litgpt.model import GPT

    torch.manual_seed(0)
    base = dict(
        block_size=16,
        vocab_size=V,
        padded_vocab_size=V,
        n_layer=2,
        n_embd=WIDTH,
        n_head=4,
        rotary_percentage=1.0,
        parallel_residual=False,
        bias=False,
        norm_class_name="RMSNorm",
        mlp_class_name="LLaMAMLP",
        intermediate_size=128,
    )
    base.update(kw)
    return _ready(GPT(Config(**base)), (_ids(),))


def _litgpt_build_llama():
    """Llama: one fused qkv linear whose output is split (q | k | v, GQA sizes 64 | 32 | 32),
    RoPE cos/sin computed once in GPT.forward and passed to every block, SDPA, SwiGLU."""
    return _litgpt(n_query_groups=2)


def _litgpt_build_neox():
    """Pythia / GPT-NeoX: parallel residual (x + attn(ln1 x) + mlp(ln2 x)), LayerNorm with bias,
    partial rotary (25% of each head), exact GELU MLP."""
    return _litgpt(
        parallel_residual=True,
        shared_attention_norm=False,
        bias=True,
        norm_class_name="LayerNorm",
        mlp_class_name="GptNeoxMLP",
        rotary_percentage=0.25,
        n_query_groups=4,
    )


def _litgpt_build_moe():
    """Mixtral-style LLaMAMoE: a router picks 2 of 4 SwiGLU experts per token (torch.where over
    the routing mask: data-dependent shapes)."""
    return _litgpt(
        mlp_class_name="LLaMAMoE",
        moe_intermediate_size=64,
        n_expert=4,
        n_expert_per_token=2,
        n_query_groups=4,
    )


def _litgpt_build_gemma2():
    """Gemma-2 style: RMSNorm with (1 + w) gains, a norm after each branch as well (sandwich),
    MQA (one kv head), GELU-tanh gated MLP, embeddings scaled by √d, tied head."""
    return _litgpt(
        name="Gemma-2-tiny",  # litgpt gives RMSNorm its (1 + w) gain by the name
        n_query_groups=1,
        post_attention_norm=True,
        post_mlp_norm=True,
        mlp_class_name="GemmaMLP",
        gelu_approximate="tanh",
        scale_embeddings=True,
    )


def _litgpt_truth(model: nn.Module) -> dict:
    from litgpt.model import LLaMAMoE

    c = model.config
    acts = {
        "LLaMAMLP": "silu",
        "LLaMAMoE": "silu",
        "GemmaMLP": "gelu_tanh" if c.gelu_approximate == "tanh" else "gelu",
        "GptNeoxMLP": "gelu_tanh" if c.gelu_approximate == "tanh" else "gelu",
    }
    moe = _modules(model, LLaMAMoE)
    if c.parallel_residual:
        placement = "parallel"
    elif c.post_attention_norm and c.post_mlp_norm:
        placement = "sandwich"
    else:
        placement = "pre"
    return _base(
        blocks=c.n_layer,
        hidden_size=c.n_embd,
        heads=c.n_head,
        kv_heads=c.n_query_groups,
        head_dim=c.head_size,
        mlp_hidden=c.moe_intermediate_size if moe else c.intermediate_size,
        gated=c.mlp_class_name != "GptNeoxMLP",
        activation=acts[c.mlp_class_name],
        norm=_norm(model.transformer.ln_f),
        unit_offset=bool(getattr(model.transformer.ln_f, "add_unit_offset", False)),
        placement=placement,
        attention_kernel="sdpa",
        fused_qkv=f"(q {c.n_head * c.head_size} | k {c.n_query_groups * c.head_size} | "
        f"v {c.n_query_groups * c.head_size}), split",
        moe=c.n_expert if moe else None,
        tied_head=model.lm_head.weight is model.transformer.wte.weight,
        rope=c.rope_n_elem > 0,
        notes=f"rotary on {c.rope_n_elem} of {c.head_size} dims; cos/sin computed outside blocks"
        + ("; embeddings scaled by √d" if c.scale_embeddings else ""),
    )


# -- torchtune (PyTorch) -------------------------------------------------------------------------


def _tt_build_llama3():
    """Llama-3: separate q/k/v, GQA, SDPA, one RotaryPositionalEmbeddings module shared by every
    layer's attention (called inside it), SwiGLU (w1, w3 → w2)."""
    from torchtune.models.llama3 import llama3

    torch.manual_seed(0)
    model = llama3(
        vocab_size=V,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        embed_dim=WIDTH,
        max_seq_len=16,
        intermediate_dim=128,
    )
    return _ready(model, (_ids(),))


def _tt_build_gemma():
    """Gemma: GemmaRMSNorm computes x̂·(1 + w), MQA, head_dim 16 with 4 heads, GELU-tanh gated,
    embeddings scaled by √d (GemmaNormEmbeddings), head tied through TiedLinear (F.linear on
    the embedding weight)."""
    from torchtune.models.gemma import gemma

    torch.manual_seed(0)
    model = gemma(
        vocab_size=V,
        num_layers=2,
        num_heads=4,
        head_dim=16,
        num_kv_heads=1,
        embed_dim=WIDTH,
        intermediate_dim=128,
        max_seq_len=16,
    )
    return _ready(model, (_ids(),))


def _tt_truth(model: nn.Module) -> dict:
    from torchtune.modules import MultiHeadAttention

    layer = model.layers[0]
    attn = _modules(model, MultiHeadAttention)[0]
    mlp = layer.mlp
    tied = type(model.output).__name__ == "TiedLinear"
    return _base(
        blocks=len(model.layers),
        hidden_size=attn.embed_dim,
        heads=attn.num_heads,
        kv_heads=attn.num_kv_heads,
        head_dim=attn.head_dim,
        mlp_hidden=mlp.w1.out_features,
        gated=mlp.w3 is not None,
        activation=_activation(mlp.activation),
        norm=_norm(layer.sa_norm),
        unit_offset=type(layer.sa_norm).__name__ == "GemmaRMSNorm",
        attention_kernel="sdpa",
        tied_head=tied,
        rope=attn.pos_embeddings is not None,
        notes="one rotary module shared by the layers, applied inside attention"
        + ("; embeddings scaled by √d" if "Norm" in type(model.tok_embeddings).__name__ else ""),
    )


def _tt_build_t5():
    """T5 encoder: attention by torch.matmul with a relative-position bias computed once for
    max_seq_len (the input must be exactly that long), softmax in fp32, RMSNorm, GEGLU (exact
    GELU gate) MLP, no output head."""
    from torchtune.models.t5._component_builders import t5_encoder

    torch.manual_seed(0)
    model = t5_encoder(
        embed_dim=WIDTH,
        mlp_dim=128,
        num_heads=4,
        head_dim=16,
        num_layers=2,
        rel_pos_num_buckets=8,
        rel_pos_max_dist=16,
        vocab_size=V,
        norm_eps=1e-6,
        max_seq_len=SEQ,
    )
    return _ready(model, (_ids(),))


def _tt_t5_truth(model: nn.Module) -> dict:
    layer = model.layers[0]
    attn = layer.attn
    return _base(
        blocks=len(model.layers),
        hidden_size=model.token_embedding.embedding_dim,
        heads=attn.num_heads,
        kv_heads=attn.num_heads,
        head_dim=attn.head_dim,
        mlp_hidden=layer.mlp.w1.out_features,
        gated=layer.mlp.w3 is not None,
        activation=_activation(layer.mlp.activation),
        norm=_norm(layer.sa_norm),
        attention_kernel="matmul",
        notes="relative position bias added to the scores, fixed sequence length "
        f"{model.max_seq_len}; no scaling by 1/√d (T5)",
    )


def _tt_build_clip_text():
    """CLIP text encoder: quick-GELU MLP, a learned position Parameter added whole (the input
    must be max_seq_len long), pooling of the end-of-text token's state after the final norm
    (argmax over tokens == eot, take_along_dim). torchtune.models.clip's __init__ imports
    torchvision: imported without it."""
    builders = _import_without_package_init("torchtune.models.clip", "_component_builders")
    torch.manual_seed(0)
    model = builders.clip_text_encoder(
        embed_dim=WIDTH, num_heads=4, num_layers=2, vocab_size=V, max_seq_len=SEQ
    )
    nn.init.normal_(model.position_embedding, std=0.02)
    ids = _ids(high=V - 1)
    ids[:, -1] = model.eot_token = V - 1
    return _ready(model, (ids,))


def _tt_clip_truth(model: nn.Module) -> dict:
    out = _tt_truth_layers(model)
    out.update(
        pooling="eot token (argmax)",
        notes="learned positions, fixed sequence length "
        f"{model.max_seq_len}; the output is [batch, dim]",
    )
    return out


def _tt_truth_layers(model: nn.Module) -> dict:
    layer = model.layers[0]
    attn = layer.attn
    mlp = layer.mlp
    return _base(
        blocks=len(model.layers),
        hidden_size=attn.embed_dim,
        heads=attn.num_heads,
        kv_heads=attn.num_kv_heads,
        head_dim=attn.head_dim,
        mlp_hidden=mlp.w1.out_features,
        gated=mlp.w3 is not None,
        activation=_activation(mlp.activation),
        norm=_norm(layer.sa_norm),
        attention_kernel="sdpa",
    )


# -- ibm-fms (IBM foundation-model-stack) ------------------------------------------------------


def _fms_build_llama():
    """LLaMA: one fused qkv linear split into GQA sizes (FusedQKV), gate and up fused into one
    linear (wg1_fused) and chunked, SDPA, RMSNorm written as LayerNormParameterized(use_mean=
    False) in fp32, RoPE module at model level."""
    from fms.models.llama import LLaMA, LLaMAConfig

    torch.manual_seed(0)
    cfg = LLaMAConfig(
        src_vocab_size=V,
        emb_dim=WIDTH,
        nheads=4,
        kvheads=2,
        nlayers=2,
        max_expected_seq_len=16,
        multiple_of=32,
    )
    model = LLaMA(cfg)
    model.reset_parameters()
    return _ready(model, (_ids(),))


def _fms_build_roberta():
    """RoBERTa: post-LN encoder, fused qkv with bias, positions from the padding mask (cumsum),
    a token-type embedding, MLM head dense → GELU → LayerNorm → linear."""
    from fms.models.roberta import RoBERTa, RoBERTaConfig

    torch.manual_seed(0)
    cfg = RoBERTaConfig(
        src_vocab_size=V,
        emb_dim=WIDTH,
        nheads=4,
        nlayers=2,
        max_pos=16,
        p_dropout=0.0,
        hidden_grow_factor=2.0,
    )
    model = RoBERTa(cfg)
    model.reset_parameters()
    return _ready(model, (_ids(low=2),))


def _fms_build_bigcode():
    """GPT-BigCode: multi-query attention from one fused linear (q 64 | k 16 | v 16), GELU-tanh,
    learned positions, tied head."""
    from fms.models.gpt_bigcode import GPTBigCode, GPTBigCodeConfig

    torch.manual_seed(0)
    cfg = GPTBigCodeConfig(
        src_vocab_size=V,
        emb_dim=WIDTH,
        nheads=4,
        nlayers=2,
        max_expected_seq_len=16,
        hidden_grow_factor=2.0,
    )
    model = GPTBigCode(cfg)
    model.reset_parameters()
    model.post_init()
    return _ready(model, (_ids(),))


def _fms_truth(model: nn.Module) -> dict:
    from fms.modules.attention import MultiHeadAttention

    c = model.config
    base = model.base_model
    layer = base.layers[0]
    attn = _modules(model, MultiHeadAttention)[0]
    ff = layer.ff_sub_layer
    gated = type(ff).__name__ == "GatedLinearUnit"
    name = type(model).__name__
    splits = list(attn.in_proj.splits)
    head = getattr(model, "head", None)
    emb = base.embedding
    tied = isinstance(head, nn.Linear) and head.weight is emb.weight
    if name == "RoBERTa":
        tied = model.classification_head.head.weight is emb.weight
    return _base(
        blocks=c.nlayers,
        hidden_size=c.emb_dim,
        heads=attn.nheads,
        kv_heads=attn.kvheads,
        head_dim=attn.emb_kq_per_head,
        mlp_hidden=ff.w2.in_features,
        gated=gated,
        activation=_activation(ff.a),
        norm="rmsnorm"
        if type(layer.ln).__name__ == "LayerNormParameterized" and not layer.ln.use_mean
        else _norm(layer.ln),
        placement="post" if name == "RoBERTa" else "pre",
        attention_kernel="sdpa",
        fused_qkv=f"(q {splits[0]} | k {splits[1]} | v {splits[2]}), split",
        tied_head=tied,
        rope=name == "LLaMA",
        notes={
            "LLaMA": "gate and up fused in one linear (wg1_fused), chunked",
            "RoBERTa": "positions from the padding mask; token types; MLM head",
            "GPTBigCode": "multi-query attention",
        }[name],
    )


# -- palm-rlhf-pytorch (lucidrains) -----------------------------------------------------------


def _palm_build():
    """PaLM: parallel block (x + attn(ln x) + ff(ln x)) whose q, k, v and the SwiGLU up/gate
    come from ONE fused linear (split 64 | 16 | 16 | 512), multi-query attention, xPos rotary,
    LayerNorm without bias written as layer_norm(x, γ + 1) (unit offset), einsum attention,
    residual added in place (x.add_(y)) under no_grad, tied head."""
    from palm_rlhf_pytorch import PaLM

    torch.manual_seed(0)
    model = PaLM(num_tokens=V, dim=WIDTH, depth=2, dim_head=16, heads=4, ff_mult=2)
    return _ready(model, (_ids(),))


def _palm_truth(model: nn.Module) -> dict:
    block = model.layers[0].fn
    attn_inner, dk, dv, ff2 = block.fused_dims
    return _base(
        blocks=len(model.layers),
        hidden_size=model.dim,
        heads=model.heads,
        kv_heads=dk // model.dim_head,
        head_dim=model.dim_head,
        mlp_hidden=ff2 // 2,
        gated=True,
        activation="silu",
        norm="layernorm",
        unit_offset=True,
        placement="parallel",
        attention_kernel="einsum",
        fused_qkv=f"(q {attn_inner} | k {dk} | v {dv} | ff {ff2}), split: attention and MLP "
        "share one projection",
        tied_head=model.to_logits.weight is model.token_emb.weight,
        rope=True,
        notes="xPos rotary; LayerNorm bias is a zero buffer; in-place residual add",
    )


# -- fair-esm (Meta) -------------------------------------------------------------------------------


def _esm_build():
    """ESM-2: fairseq-style MultiheadAttention with separate q/k/v and torch.bmm scores, rotary
    on q/k, pre-LN, tied LM head (dense → GELU → LayerNorm → E), output a dict {logits,
    representations}; the forward branches on `padding_mask.any()` (data-dependent)."""
    from esm.model.esm2 import ESM2

    torch.manual_seed(0)
    model = ESM2(num_layers=2, embed_dim=WIDTH, attention_heads=4)
    return _ready(model, (_ids(low=4, high=24),))


def _esm_truth(model: nn.Module) -> dict:
    layer = model.layers[0]
    attn = layer.self_attn
    return _base(
        blocks=model.num_layers,
        hidden_size=model.embed_dim,
        heads=attn.num_heads,
        kv_heads=attn.num_heads,
        head_dim=attn.head_dim,
        mlp_hidden=layer.fc1.out_features,
        activation="gelu",
        norm=_norm(layer.self_attn_layer_norm),
        attention_kernel="bmm",
        tied_head=model.lm_head.weight is model.embed_tokens.weight,
        rope=attn.rot_emb is not None,
        notes="(T, B, E) layout inside the layers; token-dropout rescaling of embeddings; "
        "dict output",
    )


# -- vit-pytorch (lucidrains) ------------------------------------------------------------------


def _vit_build():
    """ViT: class token prepended, pooling x[:, 0] after the last block; fused to_qkv chunked
    into 3 then rearranged 'b n (h d) -> b h n d'; torch.matmul attention; the norm lives inside
    the Attention module and the FeedForward nn.Sequential; a block is a ModuleList pair
    (attention, feed-forward) that is never called as a unit."""
    vit = _import_without_package_init("vit_pytorch", "vit")
    torch.manual_seed(0)
    model = vit.ViT(
        image_size=32,
        patch_size=8,
        num_classes=10,
        dim=WIDTH,
        depth=2,
        heads=4,
        dim_head=16,
        mlp_dim=128,
    )
    return _ready(model, (_image(),))


def _vit_truth(model: nn.Module) -> dict:
    vit = sys.modules["vit_pytorch.vit"]
    attn = _modules(model, vit.Attention)[0]
    ff = _modules(model, vit.FeedForward)[0]
    linears = [m for m in ff.net if isinstance(m, nn.Linear)]
    heads = attn.heads
    return _base(
        blocks=len(model.transformer.layers),
        hidden_size=attn.to_qkv.in_features,
        heads=heads,
        kv_heads=heads,
        head_dim=attn.to_qkv.out_features // 3 // heads,
        mlp_hidden=linears[0].out_features,
        activation=_activation(next(m for m in ff.net if isinstance(m, nn.GELU))),
        norm=_norm(attn.norm),
        attention_kernel="matmul",
        fused_qkv="(3, H, D): chunk(3) then 'b n (h d) -> b h n d'",
        pooling=model.pool,
        notes="blocks are ModuleList pairs; norms inside the branch modules",
    )


def _pit_build():
    """PiT: two stages (dims 32 → 64) joined by a depthwise-conv pooling that halves the token
    grid and a linear on the class token (hierarchical, stream width changes between stages);
    stages are items of an nn.Sequential; patches by nn.Unfold."""
    pit = _import_without_package_init("vit_pytorch", "pit")
    torch.manual_seed(0)
    model = pit.PiT(
        image_size=32,
        patch_size=4,
        num_classes=10,
        dim=32,
        depth=(1, 1),
        heads=2,
        dim_head=16,
        mlp_dim=64,
    )
    return _ready(model, (_image(),))


def _pit_truth(model: nn.Module) -> dict:
    pit = sys.modules["vit_pytorch.pit"]
    stages = [m for m in model.layers if isinstance(m, pit.Transformer)]
    attn = [_modules(s, pit.Attention)[0] for s in stages]
    ff = _modules(stages[0], pit.FeedForward)[0]
    lin = [m for m in ff.net if isinstance(m, nn.Linear)]
    return _base(
        blocks=[len(s.layers) for s in stages],
        hidden_size=[a.to_qkv.in_features for a in attn],
        heads=attn[0].heads,
        kv_heads=attn[0].heads,
        head_dim=attn[0].to_qkv.out_features // 3 // attn[0].heads,
        mlp_hidden=lin[0].out_features,
        activation=_activation(next(m for m in ff.net if isinstance(m, nn.GELU))),
        norm=_norm(attn[0].norm),
        attention_kernel="einsum",
        fused_qkv="(3, H, D): chunk(3)",
        pooling="cls",
        notes="hierarchical: pooling (depthwise conv) between stages changes width and tokens",
    )


# -- torch.nn -------------------------------------------------------------------------------------


def _nn_layer(norm_first: bool, activation: str = "relu") -> nn.TransformerEncoderLayer:
    return nn.TransformerEncoderLayer(
        d_model=WIDTH,
        nhead=4,
        dim_feedforward=128,
        dropout=0.0,
        activation=activation,
        batch_first=True,
        norm_first=norm_first,
    )


def _nn_build_encoder_postln():
    """A top-level nn.Sequential (embedding → nn.TransformerEncoder → linear), post-LN ReLU
    layers; nn.MultiheadAttention with its fused in_proj; in eval mode without grad the layers
    may take PyTorch's fused fast path (torch._transformer_encoder_layer_fwd)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Embedding(V, WIDTH),
        nn.TransformerEncoder(_nn_layer(False), num_layers=2, enable_nested_tensor=False),
        nn.Linear(WIDTH, V),
    )
    return _ready(model, (_ids(),))


def _nn_build_named_preln():
    """String-keyed nn.Sequential: the blocks are named attributes ("first", "second"), not
    items of an integer-indexed list; pre-LN GELU layers, nn.MultiheadAttention."""
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            embed=nn.Embedding(V, WIDTH),
            first=_nn_layer(True, "gelu"),
            second=_nn_layer(True, "gelu"),
            final_norm=nn.LayerNorm(WIDTH),
            head=nn.Linear(WIDTH, V),
        )
    )
    return _ready(model, (_ids(),))


def _nn_build_transformer():
    """nn.Transformer encoder/decoder on float inputs (no embeddings, no head): post-LN, ReLU,
    nn.MultiheadAttention for self and cross attention, final norms on both stacks; kwargs
    example inputs (src, tgt)."""
    torch.manual_seed(0)
    model = nn.Transformer(
        d_model=32,
        nhead=4,
        num_encoder_layers=2,
        num_decoder_layers=2,
        dim_feedforward=64,
        dropout=0.0,
        batch_first=True,
    )
    g = torch.Generator().manual_seed(1)
    return _ready(
        model,
        {"src": torch.randn(2, SEQ, 32, generator=g), "tgt": torch.randn(2, 6, 32, generator=g)},
    )


def _nn_truth(model: nn.Module) -> dict:
    layers = _modules(model, nn.TransformerEncoderLayer)
    dec = _modules(model, nn.TransformerDecoderLayer)
    layer = layers[0]
    attn = layer.self_attn
    blocks: int | list[int] = len(layers)
    if dec:
        blocks = [len(layers), len(dec)]
    act = layer.activation
    return _base(
        blocks=blocks,
        hidden_size=attn.embed_dim,
        heads=attn.num_heads,
        kv_heads=attn.num_heads,
        head_dim=attn.head_dim,
        mlp_hidden=layer.linear1.out_features,
        activation=_activation(act),
        norm=_norm(layer.norm1),
        placement="pre" if layer.norm_first else "post",
        cross_attention=bool(dec),
        attention_kernel="mha",
        fused_qkv="(3, E) in_proj_weight" if attn._qkv_same_embed_dim else None,
        pooling=None,
        notes="nn.MultiheadAttention (F.multi_head_attention_forward)",
    )


THIRDPARTY: dict[str, Entry] = {
    "xt-gqa-swiglu": Entry(
        "x-transformers",
        "x_transformers",
        "einsum attention, GQA, fused GLU, flat attn/ff layer list, F.normalize RMSNorm, rotary",
        _xt_build_gqa,
        _xt_truth,
    ),
    "xt-tied-relu2": Entry(
        "x-transformers",
        "x_transformers",
        "weights shared across depth, relu², tied matmul head",
        _xt_build_tied,
        _xt_truth,
    ),
    "xt-sandwich": Entry(
        "x-transformers",
        "x_transformers",
        "sandwich norm, bidirectional einsum attention",
        _xt_build_sandwich,
        _xt_truth,
    ),
    "xt-encdec": Entry(
        "x-transformers",
        "x_transformers",
        "encoder/decoder, einsum cross attention, kwargs inputs (adapter)",
        _xt_build_encdec,
        _xt_truth,
    ),
    "xt-vit": Entry(
        "x-transformers",
        "x_transformers",
        "ViT: SDPA (flash), Rearrange patches, mean pooling",
        _xt_build_vit,
        _xt_truth,
    ),
    "litgpt-llama": Entry(
        "litgpt",
        "litgpt.model",
        "fused GQA qkv split, RoPE outside the blocks, SDPA",
        _litgpt_build_llama,
        _litgpt_truth,
    ),
    "litgpt-neox": Entry(
        "litgpt",
        "litgpt.model",
        "parallel residual (two norms), partial rotary, LayerNorm",
        _litgpt_build_neox,
        _litgpt_truth,
    ),
    "litgpt-moe": Entry(
        "litgpt", "litgpt.model", "MoE (LLaMAMoE, top-2 of 4)", _litgpt_build_moe, _litgpt_truth
    ),
    "litgpt-gemma2": Entry(
        "litgpt",
        "litgpt.model",
        "(1 + w) RMSNorm, sandwich norms, MQA, GELU-tanh gated",
        _litgpt_build_gemma2,
        _litgpt_truth,
    ),
    "tt-llama3": Entry(
        "torchtune",
        "torchtune.modules",
        "separate q/k/v GQA, SDPA, shared rotary module",
        _tt_build_llama3,
        _tt_truth,
    ),
    "tt-gemma": Entry(
        "torchtune",
        "torchtune.modules",
        "(1 + w) RMSNorm, MQA, TiedLinear head, scaled embeddings",
        _tt_build_gemma,
        _tt_truth,
    ),
    "tt-t5-encoder": Entry(
        "torchtune",
        "torchtune.modules",
        "matmul attention with relative bias, fixed length, GEGLU",
        _tt_build_t5,
        _tt_t5_truth,
    ),
    "tt-clip-text": Entry(
        "torchtune",
        "torchtune.models.clip:_component_builders",
        "quick-GELU, EOT-token pooling, fixed length",
        _tt_build_clip_text,
        _tt_clip_truth,
    ),
    "fms-llama": Entry(
        "ibm-fms", "fms.models", "fused GQA qkv, fused gate/up, SDPA", _fms_build_llama, _fms_truth
    ),
    "fms-roberta": Entry(
        "ibm-fms",
        "fms.models",
        "post-LN encoder, fused qkv, MLM head",
        _fms_build_roberta,
        _fms_truth,
    ),
    "fms-bigcode": Entry(
        "ibm-fms",
        "fms.models",
        "MQA from a fused linear, GELU-tanh, tied",
        _fms_build_bigcode,
        _fms_truth,
    ),
    "palm": Entry(
        "palm-rlhf-pytorch",
        "palm_rlhf_pytorch",
        "parallel block with one attn+ff projection, MQA, (1 + γ) LayerNorm, einsum",
        _palm_build,
        _palm_truth,
    ),
    "esm2": Entry(
        "fair-esm",
        "esm",
        "bmm attention, rotary, dict output, data-dependent branch",
        _esm_build,
        _esm_truth,
    ),
    "vitp-vit": Entry(
        "vit-pytorch",
        "vit_pytorch:vit",
        "class token + pooling, fused qkv chunk(3), blocks as ModuleList pairs",
        _vit_build,
        _vit_truth,
    ),
    "vitp-pit": Entry(
        "vit-pytorch",
        "vit_pytorch:vit",
        "hierarchical stages with pooling (width 32 → 64), einsum attention",
        _pit_build,
        _pit_truth,
    ),
    "nn-encoder-postln": Entry(
        "torch",
        "torch",
        "top-level nn.Sequential, post-LN, nn.MultiheadAttention",
        _nn_build_encoder_postln,
        _nn_truth,
    ),
    "nn-named-preln": Entry(
        "torch",
        "torch",
        "string-keyed Sequential (blocks as named attributes), pre-LN GELU",
        _nn_build_named_preln,
        _nn_truth,
    ),
    "nn-transformer": Entry(
        "torch",
        "torch",
        "nn.Transformer enc/dec: MHA self + cross attention, float inputs",
        _nn_build_transformer,
        _nn_truth,
    ),
}


def _probe(module: str) -> None:
    """Import `module`; `package:submodule` imports the submodule without the package init."""
    if ":" in module:
        package, sub = module.split(":")
        _import_without_package_init(package, sub)
    else:
        importlib.import_module(module)


def _availability() -> tuple[set[str], dict[str, str]]:
    errors: dict[str, str | None] = {}
    for entry in THIRDPARTY.values():
        if entry.module not in errors:
            try:
                _probe(entry.module)
                errors[entry.module] = None
            except Exception as exc:  # any import failure makes the entry unavailable
                errors[entry.module] = f"{entry.library}: {type(exc).__name__}: {exc}"
    available = {n for n, e in THIRDPARTY.items() if errors[e.module] is None}
    missing = {n: errors[e.module] for n, e in THIRDPARTY.items() if errors[e.module] is not None}
    return available, missing


AVAILABLE, MISSING = _availability()


# comparing what archfx recognised with the truth -------------------------------------------


def recognised(js: dict) -> dict:
    """The recognised structure, in the truth's terms."""
    blocks = js["blocks"]
    first = lambda key: next((b[key] for b in blocks if b.get(key)), None)  # noqa: E731
    attn, mlp = first("attention"), first("mlp")
    kinds = sorted({r["kind"] for b in blocks for r in b["residuals"]})
    placements = sorted({b["placement"] for b in blocks})
    norm = next((r["norm"] for b in blocks for r in b["residuals"] if r.get("norm")), None)
    moe = first("moe")
    out = {
        "blocks": [s["blocks"] for s in js["stacks"]],
        "hidden_size": (
            js["hidden_size"]
            if len({s["width"] for s in js["stacks"]}) == 1
            else [s["width"] for s in js["stacks"]]
        ),
        "heads": attn and attn["heads"],
        "kv_heads": attn and attn["kv_heads"],
        "head_dim": attn and attn["head_dim"],
        "mlp_hidden": mlp and mlp["hidden"],
        "gated": mlp and mlp["gated"],
        "activation": mlp and mlp["activation"],
        "norm": norm and norm["kind"],
        "unit_offset": bool(norm and norm.get("gain") == "1+w"),
        "norm_gain": norm and norm.get("gain"),
        "placement": "parallel" if "parallel" in kinds else "/".join(placements),
        "cross_attention": any(b.get("cross_attention") for b in blocks),
        "kernel": attn and attn["kernel"],
        "fused_qkv": attn and attn["fused_qkv"],
        "rope": bool(attn and attn["rope"]),
        "moe": moe,
        "shared_weights": any(b.get("shares") for b in blocks),
        "tied_head": js["head"]["tied"] if js.get("head") else None,
        "residual_kinds": kinds,
        "sites": {
            "blocks": len(blocks),
            "residual": sum(len(b["residuals"]) for b in blocks),
            "attention": sum(1 for b in blocks for r in b["residuals"] if r.get("attention")),
            "mlp": sum(1 for b in blocks if b.get("mlp")),
        },
    }
    return out


KERNELS = {"sdpa": {"sdpa"}, "mha": {"sdpa", "softmax"}}


def mismatches(truth: dict, found: dict) -> list[str]:
    out = []

    def diff(key, t, f):
        if t != f:
            out.append(f"{key}: truth {t!r}, found {f!r}")

    tb = truth["blocks"]
    diff("blocks", tb if isinstance(tb, list) else [tb], found["blocks"])
    diff("hidden_size", truth["hidden_size"], found["hidden_size"])
    moe = found.get("moe")
    # a recognised mixture of experts: its experts are compared, not a dense MLP
    mlp_keys = (
        () if truth["moe"] and isinstance(moe, dict) else ("mlp_hidden", "gated", "activation")
    )
    for key in (
        "heads",
        "kv_heads",
        "head_dim",
        *mlp_keys,
        "norm",
        "unit_offset",
        "placement",
        "cross_attention",
        "shared_weights",
        "rope",
    ):
        diff(key, truth[key], found[key])
    diff("tied_head", truth["tied_head"], bool(found["tied_head"]))
    if found["norm"] and found.get("norm_gain") is None:  # every norm in the zoo has a gain
        out.append("norm gain: the model's norms have a gain, found none")
    kernel = found["kernel"]
    allowed = KERNELS.get(truth["attention_kernel"], {"softmax"})
    if kernel not in allowed:
        out.append(f"kernel: truth {truth['attention_kernel']!r}, found {kernel!r}")
    if bool(truth["fused_qkv"]) != bool(found["fused_qkv"]):
        out.append(f"fused_qkv: truth {truth['fused_qkv']!r}, found {found['fused_qkv']!r}")
    experts = moe.get("experts") if isinstance(moe, dict) else moe
    if (truth["moe"] or experts) and truth["moe"] != experts:
        out.append(f"moe: truth {truth['moe']} experts, found {moe!r}")
    return out


def pass_texts(truth: dict, found: dict | None) -> list[str]:
    f = found or {}
    heads = f.get("heads") or truth["heads"] or 1
    kv = f.get("kv_heads") or truth["kv_heads"] or heads
    dim = f.get("head_dim") or truth["head_dim"] or 8
    return [
        "canonicalize",
        "altup(k=2)",
        "ddl(dv=1,value=compat)",
        "sdnc",
        "expand-mlp(factor=2)",
        f"add-heads(n={1 if heads == kv else kv})",
        f"expand-head-dim(size={dim + 4})",
        f"expand-qk(size={dim + 2})",
        "expand-hidden(factor=2)",
        "add-layers(n=1)",
    ]


# Hugging Face families outside the test zoo ----------------------------------------------------


def _hf(cls: str, config: str, example: str = "ids", **kw) -> Callable[[], tuple]:
    """The model as the built-in zoo builds one (SDPA unless `attn_implementation` is given),
    with example inputs of the `example` kind."""
    make = zoo_model(cls, config, **kw)

    def build():
        torch.manual_seed(0)
        model = make().eval()
        cfg = model.config
        if example == "pixels":
            size = getattr(cfg, "image_size", 32)
            return model, {"pixel_values": _image(size)}
        if example == "audio":
            feats = torch.randn(2, cfg.num_mel_bins, 2 * cfg.max_source_positions, generator=_gen())
            return model, {
                "input_features": feats,
                "decoder_input_ids": _ids(seq=4),
                "use_cache": False,
            }
        return model, {"input_ids": _ids(), "use_cache": False} if _causal(cls) else {
            "input_ids": _ids()
        }

    return build


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(1)


def _causal(cls: str) -> bool:
    return cls.endswith("ForCausalLM")


def _hf_truth(model: nn.Module) -> dict:
    """What a Hugging Face config says (the fields every family names the same way)."""
    c = model.config
    heads = getattr(c, "num_attention_heads", None) or getattr(c, "encoder_attention_heads", None)
    width = getattr(c, "hidden_size", None) or getattr(c, "d_model", None)
    layers = getattr(c, "num_hidden_layers", None)
    if getattr(c, "is_encoder_decoder", False):  # one stack each
        layers = [c.encoder_layers, c.decoder_layers]
    return {
        "blocks": layers,
        "hidden_size": width,
        "heads": heads,
        "kv_heads": getattr(c, "num_key_value_heads", None) or heads,
        "head_dim": getattr(c, "head_dim", None) or width // heads,
    }


_SMALL = dict(
    vocab_size=V, hidden_size=WIDTH, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4,
)  # fmt: skip

HF_HELD_OUT: dict[str, Entry] = {
    "hf-phi3": Entry(
        "transformers",
        "transformers",
        "Phi-3: fused qkv and gate_up",
        _hf("Phi3ForCausalLM", "Phi3Config", num_key_value_heads=2, pad_token_id=0, **_SMALL),
        _hf_truth,
    ),
    "hf-granite": Entry(
        "transformers",
        "transformers",
        "Granite: residual and embedding multipliers",
        _hf(
            "GraniteForCausalLM",
            "GraniteConfig",
            num_key_value_heads=2,
            residual_multiplier=0.5,
            embedding_multiplier=2.0,
            **_SMALL,
        ),
        _hf_truth,
    ),
    "hf-mixtral": Entry(
        "transformers",
        "transformers",
        "Mixtral: top-2 of 4 experts",
        _hf(
            "MixtralForCausalLM",
            "MixtralConfig",
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            **_SMALL,
        ),
        _hf_truth,
    ),
    "hf-olmoe": Entry(
        "transformers",
        "transformers",
        "OLMoE: experts and QK-norm",
        _hf(
            "OlmoeForCausalLM",
            "OlmoeConfig",
            num_key_value_heads=4,
            num_experts=4,
            num_experts_per_tok=2,
            **_SMALL,
        ),
        _hf_truth,
    ),
    "hf-qwen2-moe": Entry(
        "transformers",
        "transformers",
        "Qwen2-MoE: experts and a shared expert",
        _hf(
            "Qwen2MoeForCausalLM",
            "Qwen2MoeConfig",
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            **_SMALL,
        ),
        _hf_truth,
    ),
    "hf-persimmon": Entry(
        "transformers",
        "transformers",
        "Persimmon: fused qkv, QK LayerNorm, partial rotary",
        _hf("PersimmonForCausalLM", "PersimmonConfig", **_SMALL),
        _hf_truth,
    ),
    "hf-nemotron": Entry(
        "transformers",
        "transformers",
        "Nemotron: (1 + w) LayerNorm, relu², partial rotary",
        _hf("NemotronForCausalLM", "NemotronConfig", num_key_value_heads=2, **_SMALL),
        _hf_truth,
    ),
    "hf-modernbert": Entry(
        "transformers",
        "transformers",
        "ModernBERT: local/global attention, fused GLU",
        _hf(
            "ModernBertModel",
            "ModernBertConfig",
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            cls_token_id=1,
            sep_token_id=2,
            **_SMALL,
        ),
        _hf_truth,
    ),
    "hf-deberta-v2": Entry(
        "transformers",
        "transformers",
        "DeBERTa-v2: disentangled attention (bmm)",
        _hf("DebertaV2Model", "DebertaV2Config", attn_implementation="eager", **_SMALL),
        _hf_truth,
    ),
    "hf-clip-text": Entry(
        "transformers",
        "transformers",
        "CLIP text: quick-GELU, end-of-text pooling",
        _hf("CLIPTextModel", "CLIPTextConfig", **_SMALL),
        _hf_truth,
    ),
    "hf-whisper": Entry(
        "transformers",
        "transformers",
        "Whisper: conv stem, encoder-decoder",
        _hf(
            "WhisperForConditionalGeneration",
            "WhisperConfig",
            "audio",
            vocab_size=V,
            d_model=WIDTH,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            num_mel_bins=16,
            max_source_positions=8,
            max_target_positions=16,
            decoder_start_token_id=0,
            pad_token_id=0,
        ),
        _hf_truth,
    ),
    "hf-swin": Entry(
        "transformers",
        "transformers",
        "Swin: windowed attention, patch-merging stages",
        _hf(
            "SwinModel",
            "SwinConfig",
            "pixels",
            image_size=32,
            patch_size=4,
            embed_dim=16,
            depths=[2, 2],
            num_heads=[2, 4],
            window_size=4,
        ),
        lambda m: {  # stages: one stack each, the width doubling at each patch merging
            "blocks": list(m.config.depths),
            "hidden_size": [m.config.embed_dim * 2**i for i in range(len(m.config.depths))],
            "heads": list(m.config.num_heads),
        },
    ),
}
