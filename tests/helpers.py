"""Shared test utilities: every zoo model, and a short training loop on real text."""

import pytest
import torch
import transformers as tf

from archfx.ir import capture
from archfx.passes import Pipeline
from archfx.passes.io.zoo import BUILTINS, build
from archfx.passes.io.zoo.text import batches, byte_tokens, shakespeare

from .families import FAMILIES, build_family

ZOO = [name for name, b in BUILTINS.items() if not b.real]
EVERY = [*ZOO, *(f"family:{f}" for f in sorted(FAMILIES))]
# the zoo and MiniLM in the default run, the held-out families under `make test-all`
ZOO_FIRST = [
    *ZOO,
    "minilm",
    *(pytest.param(f"family:{f}", marks=pytest.mark.slow) for f in sorted(FAMILIES)),
]
# a sample in the default run (a pre-LN decoder, RoPE + GQA, an encoder-decoder, a post-LN
# encoder and a post-LN encoder-decoder), every other zoo model and family under `make test-all`
SCHEME_SAMPLE = ("tiny-gpt2", "tiny-llama", "tiny-t5", "tiny-bert", "tiny-bart")
EVERY_SAMPLED = [
    n if n in SCHEME_SAMPLE else pytest.param(n, marks=pytest.mark.slow) for n in [*EVERY, "minilm"]
]
# ONNX exports are the slow part of the suite: every run exports a LayerNorm decoder, an RMSNorm
# decoder with RoPE and GQA, and an encoder-decoder; `make test-all` exports every model
ONNX_SAMPLE = ("tiny-gpt2", "tiny-llama", "tiny-t5")


def onnx_params(names: list[str], sample: tuple[str, ...] = ONNX_SAMPLE) -> list:
    """`names` as test parameters: those in `sample` in every run, the others marked slow."""
    return [n if n in sample else pytest.param(n, marks=pytest.mark.slow) for n in names]


def model(name: str) -> torch.nn.Module:
    return build_family(name.split(":", 1)[1]) if name.startswith("family:") else build(name)


def hamlet(batch: int = 8, seq: int = 64, seed: int = 0):
    """Batches of (bytes, next bytes) from Hamlet."""
    gen = torch.Generator().manual_seed(seed)
    return batches(byte_tokens(shakespeare(("hamlet",))), batch, seq, gen)


def loss_of(graph, x, y) -> torch.Tensor:
    logits = graph(x)[0]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def train(
    graph,
    steps: int = 30,
    batch: int = 8,
    seq: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    opt=None,
    data=None,
) -> list[float]:
    """Next-byte prediction on Hamlet with AdamW (or `opt`, on `data`); every step's loss."""
    data = data or hamlet(batch, seq, seed)
    if opt is None:
        opt = torch.optim.AdamW([p for p in graph.gm.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        x, y = next(data)
        loss = loss_of(graph, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def byte_gpt(pipeline: str):
    """A 2-layer GPT-2 over bytes (vocabulary 256), captured and rewritten by `pipeline`."""
    torch.manual_seed(0)
    config = tf.GPT2Config(
        vocab_size=256,
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
    )
    example = {"input_ids": torch.randint(0, 256, (2, 8)), "use_cache": False}
    return Pipeline.parse(pipeline).run(capture(tf.GPT2LMHeadModel(config), example)).graph


def meta_llama(**sizes):
    """A Hugging Face Llama built on the meta device (structure only) and captured there."""
    config = tf.LlamaConfig(
        **{
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 256,
            **sizes,
        }
    )
    with torch.device("meta"):
        llama = tf.LlamaForCausalLM(config).eval()
    ids = torch.zeros(2, 8, dtype=torch.long, device="meta")
    return capture(llama, {"input_ids": ids, "use_cache": False})
