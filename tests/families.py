"""Tiny random Hugging Face models of families the built-in zoo does not name, from configs."""

import torch
import transformers as tf

V = 128


def _small(**kw):
    return dict(vocab_size=V, **kw)


FAMILIES = {
    "falcon": lambda: tf.FalconForCausalLM(
        tf.FalconConfig(
            **_small(
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                new_decoder_architecture=True,
                num_kv_heads=2,
            )
        )
    ),
    "falcon-mqa": lambda: tf.FalconForCausalLM(
        tf.FalconConfig(
            **_small(
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                multi_query=True,
                parallel_attn=True,
            )
        )
    ),
    "opt": lambda: tf.OPTForCausalLM(
        tf.OPTConfig(
            **_small(
                hidden_size=64,
                ffn_dim=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                word_embed_proj_dim=64,
            )
        )
    ),
    "gptj": lambda: tf.GPTJForCausalLM(
        tf.GPTJConfig(**_small(n_embd=64, n_layer=2, n_head=4, rotary_dim=8))
    ),
    "olmo2": lambda: tf.Olmo2ForCausalLM(
        tf.Olmo2Config(
            **_small(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
            )
        )
    ),
    "gpt-bigcode": lambda: tf.GPTBigCodeForCausalLM(
        tf.GPTBigCodeConfig(**_small(n_embd=64, n_layer=2, n_head=4, multi_query=True))
    ),
    "bloom": lambda: tf.BloomForCausalLM(
        tf.BloomConfig(**_small(hidden_size=64, n_layer=2, n_head=4))
    ),
    "stablelm": lambda: tf.StableLmForCausalLM(
        tf.StableLmConfig(
            **_small(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
            )
        )
    ),
    "mt5": lambda: tf.MT5ForConditionalGeneration(
        tf.MT5Config(**_small(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4))
    ),
    "electra": lambda: tf.ElectraModel(
        tf.ElectraConfig(
            **_small(
                embedding_size=32,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
            )
        )
    ),
    "deit": lambda: tf.DeiTModel(
        tf.DeiTConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            image_size=32,
            patch_size=8,
        )
    ),
    "starcoder2": lambda: tf.Starcoder2ForCausalLM(
        tf.Starcoder2Config(
            **_small(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
            )
        )
    ),
    "cohere": lambda: tf.CohereForCausalLM(
        tf.CohereConfig(
            **_small(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
            )
        )
    ),
    "gemma2": lambda: tf.Gemma2ForCausalLM(
        tf.Gemma2Config(
            **_small(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
            )
        )
    ),
    "gemma3": lambda: tf.Gemma3ForCausalLM(
        tf.Gemma3TextConfig(
            **_small(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
            )
        )
    ),
}


def build_family(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return FAMILIES[name]().eval()


# What each family is, from its papers and model cards (the oracle for the analysis):
# residual placement, norm kind, gain form, gated MLP, RoPE, QK-norm.
TRAITS = {
    "gpt2": ("pre", "layernorm", "w", False, False, False),
    "bert": ("post", "layernorm", "w", False, False, False),
    "roberta": ("post", "layernorm", "w", False, False, False),
    "distilbert": ("post", "layernorm", "w", False, False, False),
    "electra": ("post", "layernorm", "w", False, False, False),
    "bart": ("post", "layernorm", "w", False, False, False),
    "llama": ("pre", "rmsnorm", "w", True, True, False),
    "mistral": ("pre", "rmsnorm", "w", True, True, False),
    "qwen2": ("pre", "rmsnorm", "w", True, True, False),
    "qwen3": ("pre", "rmsnorm", "w", True, True, True),
    "gemma": ("pre", "rmsnorm", "1+w", True, True, False),
    "gemma2": ("sandwich", "rmsnorm", "1+w", True, True, False),
    "gemma3_text": ("sandwich", "rmsnorm", "1+w", True, True, True),
    "olmo2": ("output", "rmsnorm", "w", True, True, True),
    "t5": ("pre", "rmsnorm", "w", False, False, False),
    "mt5": ("pre", "rmsnorm", "w", True, False, False),
    "vit": ("pre", "layernorm", "w", False, False, False),
    "deit": ("pre", "layernorm", "w", False, False, False),
    "gpt_neox": ("parallel", "layernorm", "w", False, True, False),
    "phi": ("parallel", "layernorm", "w", False, True, False),
    "gptj": ("parallel", "layernorm", "w", False, True, False),
    "falcon": ("parallel", "layernorm", "w", False, True, False),
    "cohere": ("parallel", "layernorm", "w", True, True, False),
    "opt": ("pre", "layernorm", "w", False, False, False),
    "gpt_bigcode": ("pre", "layernorm", "w", False, False, False),
    "bloom": ("pre", "layernorm", "w", False, False, False),
    "stablelm": ("pre", "layernorm", "w", True, True, False),
    "starcoder2": ("pre", "layernorm", "w", False, True, False),
}
