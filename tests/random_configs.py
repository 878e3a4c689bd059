"""Random small Hugging Face models built from configs (random weights, nothing downloaded), and
what each config says its structure is: the oracle the random-architecture tests assert."""

import random

import torch
import transformers as tf

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gpt2", "gpt_neox", "phi")


def random_hf(rng: random.Random) -> tuple[str, torch.nn.Module, dict]:
    """(description, model in eval mode, expected structure) for a random config."""
    family = rng.choice(FAMILIES)
    kv = rng.choice([1, 2])
    heads = kv * rng.choice([1, 2, 3])
    head_dim = rng.choice([8, 16])
    layers = rng.choice([1, 2, 3])
    inter = rng.choice([32, 64, 96])
    tie = rng.random() < 0.5
    # a multiple of heads (Llama's and Gemma 2's configs insist), not always heads × head_dim
    hidden = heads * rng.choice([8, 12, 16])
    common = dict(vocab_size=64, num_hidden_layers=layers, tie_word_embeddings=tie)
    exp = dict(
        blocks=layers, heads=heads, kv=kv, head_dim=head_dim, mlp=inter, tied=tie,
        placement="pre", norm="rmsnorm", gain="w", gated=True, rope=True, qk_norm=False,
    )  # fmt: skip
    llama_like = dict(
        hidden_size=hidden,
        intermediate_size=inter,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        **common,
    )
    if family in ("llama", "mistral"):
        bias = dict(attention_bias=rng.random() < 0.5, mlp_bias=rng.random() < 0.5)
        if family == "mistral":
            bias = {}
        cls = tf.LlamaForCausalLM if family == "llama" else tf.MistralForCausalLM
        config = (tf.LlamaConfig if family == "llama" else tf.MistralConfig)(**llama_like, **bias)
    elif family == "qwen2":  # q/k/v biases always; Qwen2 derives head_dim from hidden / heads
        hidden = heads * head_dim
        llama_like.update(hidden_size=hidden)
        llama_like.pop("head_dim")
        cls, config = tf.Qwen2ForCausalLM, tf.Qwen2Config(**llama_like)
    elif family == "qwen3":
        cls = tf.Qwen3ForCausalLM
        config = tf.Qwen3Config(**llama_like, attention_bias=rng.random() < 0.5)
        exp.update(qk_norm=True)
    elif family == "gemma":
        cls, config = tf.GemmaForCausalLM, tf.GemmaConfig(**llama_like)
        exp.update(gain="1+w")
    elif family == "gemma2":
        cls, config = tf.Gemma2ForCausalLM, tf.Gemma2Config(**llama_like)
        exp.update(gain="1+w", placement="sandwich")
    elif family == "gpt2":
        hidden = heads * head_dim
        cls = tf.GPT2LMHeadModel
        config = tf.GPT2Config(
            vocab_size=64, n_embd=hidden, n_layer=layers, n_head=heads, n_inner=inter,
            n_positions=64, tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        exp.update(kv=heads, norm="layernorm", gated=False, rope=False)
    elif family == "gpt_neox":
        hidden = heads * head_dim
        parallel = rng.random() < 0.5
        rotary = rng.choice([0.25, 0.5, 1.0])
        cls = tf.GPTNeoXForCausalLM
        config = tf.GPTNeoXConfig(
            hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
            use_parallel_residual=parallel, attention_bias=rng.random() < 0.5,
            rotary_pct=rotary, **common,
        )  # fmt: skip
        exp.update(kv=heads, norm="layernorm", gated=False, full_rotary_slice=rotary == 1.0)
        exp.update(placement="parallel" if parallel else "pre")
    else:  # phi: one LayerNorm feeds attention and MLP in parallel; partial rotary
        hidden = heads * head_dim
        qk = rng.random() < 0.5
        rotary = rng.choice([0.5, 1.0])
        cls = tf.PhiForCausalLM
        config = tf.PhiConfig(
            hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
            num_key_value_heads=kv, partial_rotary_factor=rotary, qk_layernorm=qk, **common,
        )  # fmt: skip
        exp.update(norm="layernorm", gated=False, placement="parallel", qk_norm=qk)
        exp.update(full_rotary_slice=rotary == 1.0)
    exp["hidden"] = hidden
    torch.manual_seed(rng.randrange(2**31))
    model = cls(config).eval()
    return f"{family} {config.to_diff_dict()}", model, exp
