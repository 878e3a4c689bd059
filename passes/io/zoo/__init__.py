"""Built-in models: tiny random Hugging Face models built from configs (the test zoo), a
hand-written nanoGPT, and the two real pretrained models shipped as packages."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from archfx.ir import ModelSpecError

from . import packaged
from .nanogpt import GPT, GPTConfig


@dataclass(frozen=True)
class Builtin:
    name: str
    description: str
    factory: Callable[[], torch.nn.Module]
    real: bool = False
    family: str = ""


def hf_model(cls_name: str, config_name: str, **kw) -> Callable[[], torch.nn.Module]:
    """A builder of a Hugging Face model from its config (SDPA attention unless
    `attn_implementation` is given): the zoo's, and the tests' families outside it."""

    def make():
        import transformers as tf

        config = getattr(tf, config_name)(**kw)
        if "attn_implementation" not in kw and hasattr(config, "_attn_implementation"):
            config._attn_implementation = "sdpa"
        return getattr(tf, cls_name)(config)

    return make


V = 128
_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)

BUILTINS: dict[str, Builtin] = {
    b.name: b
    for b in [
        Builtin(
            "tiny-gpt2",
            "GPT-2 (Conv1D, fused QKV, tied head)",
            hf_model(
                "GPT2LMHeadModel",
                "GPT2Config",
                vocab_size=V,
                n_embd=64,
                n_layer=2,
                n_head=4,
                n_positions=128,
                bos_token_id=0,
                eos_token_id=0,
            ),
            family="gpt2",
        ),
        Builtin(
            "tiny-bert",
            "BERT encoder (post-LN)",
            hf_model("BertModel", "BertConfig", vocab_size=V, **_SMALL),
            family="bert",
        ),
        Builtin(
            "tiny-llama",
            "Llama (RMSNorm, RoPE, GQA 4/2, SwiGLU)",
            hf_model(
                "LlamaForCausalLM", "LlamaConfig", vocab_size=V, num_key_value_heads=2, **_SMALL
            ),
            family="llama",
        ),
        Builtin(
            "tiny-t5",
            "T5 encoder-decoder (relative bias, cross-attention)",
            hf_model(
                "T5ForConditionalGeneration",
                "T5Config",
                vocab_size=V,
                d_model=64,
                d_kv=16,
                d_ff=128,
                num_layers=2,
                num_heads=4,
            ),
            family="t5",
        ),
        Builtin(
            "tiny-vit",
            "ViT (patch embedding, pre-LN)",
            hf_model("ViTModel", "ViTConfig", image_size=32, patch_size=8, **_SMALL),
            family="vit",
        ),
        Builtin(
            "nanogpt",
            "hand-written nanoGPT (manual attention)",
            lambda: GPT(GPTConfig()),
            family="nanogpt",
        ),
        Builtin(
            "tiny-qwen2",
            "Qwen2 (GQA, QKV biases)",
            hf_model(
                "Qwen2ForCausalLM", "Qwen2Config", vocab_size=V, num_key_value_heads=2, **_SMALL
            ),
            family="qwen2",
        ),
        Builtin(
            "tiny-gpt-neox",
            "GPT-NeoX (parallel residual, partial rotary, fused QKV)",
            hf_model("GPTNeoXForCausalLM", "GPTNeoXConfig", vocab_size=V, rotary_pct=0.5, **_SMALL),
            family="gpt_neox",
        ),
        Builtin(
            "tiny-phi",
            "Phi (parallel attention/MLP, one LayerNorm, partial rotary)",
            hf_model(
                "PhiForCausalLM", "PhiConfig", vocab_size=V, partial_rotary_factor=0.5, **_SMALL
            ),
            family="phi",
        ),
        Builtin(
            "tiny-gemma",
            "Gemma ((1+w) RMSNorm, √d embedding scale, GQA)",
            hf_model(
                "GemmaForCausalLM",
                "GemmaConfig",
                vocab_size=V,
                num_key_value_heads=2,
                head_dim=16,
                **_SMALL,
            ),
            family="gemma",
        ),
        Builtin(
            "tiny-roberta",
            "RoBERTa encoder (post-LN)",
            hf_model("RobertaModel", "RobertaConfig", vocab_size=V, **_SMALL),
            family="roberta",
        ),
        Builtin(
            "tiny-distilbert",
            "DistilBERT encoder (post-LN)",
            hf_model(
                "DistilBertModel",
                "DistilBertConfig",
                vocab_size=V,
                dim=64,
                hidden_dim=128,
                n_layers=2,
                n_heads=4,
            ),
            family="distilbert",
        ),
        Builtin(
            "tiny-bart",
            "BART encoder-decoder (post-LN, learned positions)",
            hf_model(
                "BartForConditionalGeneration",
                "BartConfig",
                vocab_size=V,
                d_model=64,
                encoder_layers=2,
                decoder_layers=2,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                encoder_ffn_dim=128,
                decoder_ffn_dim=128,
            ),
            family="bart",
        ),
        Builtin(
            "tiny-qwen3",
            "Qwen3 (QK-norm)",
            hf_model(
                "Qwen3ForCausalLM",
                "Qwen3Config",
                vocab_size=V,
                num_key_value_heads=2,
                head_dim=16,
                **_SMALL,
            ),
            family="qwen3",
        ),
        Builtin(
            "tiny-mistral",
            "Mistral (GQA, sliding window)",
            hf_model(
                "MistralForCausalLM", "MistralConfig", vocab_size=V, num_key_value_heads=2, **_SMALL
            ),
            family="mistral",
        ),
        Builtin(
            "minilm",
            "all-MiniLM-L6-v2, pretrained (BERT, 6 × 384, post-LN)",
            packaged.minilm,
            real=True,
            family="bert",
        ),
        Builtin(
            "smollm2",
            "SmolLM2-135M-Instruct, pretrained, Q4_1 GGUF dequantised to fp32 (Llama, 30 × 576, GQA 9/3)",
            packaged.smollm2,
            real=True,
            family="llama",
        ),
    ]
}


def build(name: str) -> torch.nn.Module:
    """A built-in model in eval mode, fp32, with deterministic weights (seed 0)."""
    if name not in BUILTINS:
        close = difflib.get_close_matches(name, list(BUILTINS), n=3, cutoff=0.5)
        hint = (
            f"did you mean {' or '.join(close)}?" if close else f"built-ins: {', '.join(BUILTINS)}"
        )
        raise ModelSpecError(f"unknown built-in model {name!r}; {hint}")
    torch.manual_seed(0)
    return BUILTINS[name].factory().eval()
