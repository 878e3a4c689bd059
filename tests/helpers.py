"""Shared test utilities: every zoo model, and a short training loop on real text."""

import functools

import pytest
import torch
import transformers as tf

from archfx.ir import Graph, capture
from archfx.passes import Pipeline
from archfx.passes.io.zoo import BUILTINS, build
from archfx.passes.io.zoo.text import batches, byte_tokens, shakespeare

from .families import FAMILIES, build_family

ZOO = [name for name, b in BUILTINS.items() if not b.real]
EVERY = [*ZOO, *(f"family:{f}" for f in sorted(FAMILIES))]
# The default run (`make test`) checks a sample of the zoo: a pre-LN decoder, RoPE + GQA, an
# encoder-decoder and a post-LN encoder; `make test-all` checks every zoo model, MiniLM and
# the held-out families too.
ZOO_SAMPLE = ("tiny-gpt2", "tiny-llama", "tiny-t5", "tiny-bert")


def sampled(names, sample: tuple = ZOO_SAMPLE) -> list:
    """`names` as test parameters: those in `sample` in every run, the others marked slow."""
    return [n if n in sample else pytest.param(n, marks=pytest.mark.slow) for n in names]


EVERY_SAMPLED = sampled([*EVERY, "minilm"])


def diagonal(rows: list, columns: list) -> list:
    """Every (row, column) pair as test parameters; the default run takes each row once, with
    the columns in turn, and marks the other pairs slow."""
    return [
        (r, c) if i % len(columns) == j else pytest.param(r, c, marks=pytest.mark.slow)
        for i, r in enumerate(rows)
        for j, c in enumerate(columns)
    ]


def model(name: str) -> torch.nn.Module:
    return build_family(name.split(":", 1)[1]) if name.startswith("family:") else build(name)


def captured(name: str) -> Graph:
    """capture(model(name)), captured once per test process (torch.export takes seconds, the
    copy milliseconds): a copy of its own every call, the RNG left as the build and capture
    left it. The zoo's and the families' models are built from seed 0, so every build has the
    same weights; the real models (SmolLM2, MiniLM) are captured afresh, not kept."""
    if name in BUILTINS and BUILTINS[name].real:
        return capture(model(name))
    graph, rng = _captured(name)
    torch.set_rng_state(rng)
    return graph.copy()


@functools.cache
def _captured(name: str) -> tuple[Graph, torch.Tensor]:
    return capture(model(name)), torch.get_rng_state()


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


def perturb_ddl(out, seed: int = 1) -> None:
    """Gates that vary per token, λ = 0.3 (compat), value biases ≠ 0 (code)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in out.gm.named_parameters():
            if name.endswith(".beta_weight"):
                p.copy_(torch.randn(p.shape, generator=gen) / p.numel() ** 0.5)
            elif name.endswith(".value_bias"):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name.endswith(".lam"):
                p.fill_(0.3)
