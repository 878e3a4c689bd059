"""Structure analysis against each model's own config, on the zoo and on families it does not name."""

import pytest
import torch
import transformers as tf

from archfx.ir import AnalysisError, capture
from archfx.passes.io.zoo import build

from .families import FAMILIES, TRAITS, build_family
from .helpers import ZOO, captured, sampled


def _first(cfg, *names, default=None):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def expected(model) -> dict:
    """What the config says the structure is."""
    if not isinstance(model, tf.PreTrainedModel):  # the hand-written nanoGPT
        c = model.config
        return dict(
            type="nanogpt",
            hidden=c.n_embd,
            blocks=c.n_layer,
            heads=c.n_head,
            kv=c.n_head,
            head_dim=c.n_embd // c.n_head,
            mlp=4 * c.n_embd,
            tied=True,
            stacks=1,
        )
    c = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = c.num_attention_heads
    hidden = c.hidden_size
    kv = _first(c, "num_key_value_heads", default=heads)
    if c.model_type == "falcon":
        kv = c.num_kv_heads if c.new_decoder_architecture else (1 if c.multi_query else heads)
    if c.model_type == "gpt_bigcode" and c.multi_query:
        kv = 1
    head_dim = _first(c, "head_dim", "d_kv", default=hidden // heads)
    blocks = c.num_hidden_layers
    stacks = 1
    if getattr(c, "is_encoder_decoder", False):
        blocks = _first(c, "encoder_layers", "num_layers") + _first(
            c, "decoder_layers", "num_decoder_layers", "num_layers"
        )
        stacks = 2
    mlp = _first(
        c,
        "intermediate_size",
        "d_ff",
        "ffn_dim",
        "encoder_ffn_dim",
        "hidden_dim",
        "n_inner",
        default=4 * hidden,
    )
    tied = getattr(c, "tie_word_embeddings", False) and model.get_output_embeddings() is not None
    return dict(
        type=c.model_type,
        hidden=hidden,
        blocks=blocks,
        heads=heads,
        kv=kv,
        head_dim=head_dim,
        mlp=mlp,
        tied=tied,
        stacks=stacks,
    )


def check(model):
    exp = expected(model)
    s = capture(model).structure
    j = s.to_json()
    assert j["remarks"] == []
    assert s.hidden_size == exp["hidden"]
    assert len(s.blocks) == exp["blocks"]
    assert len(s.stacks) == exp["stacks"]
    for b in j["blocks"]:
        att = b["attention"]
        assert (att["heads"], att["kv_heads"], att["head_dim"]) == (
            exp["heads"],
            exp["kv"],
            exp["head_dim"],
        ), b["path"]
        assert b["mlp"]["hidden"] == exp["mlp"], b["path"]
        kinds = [r["kind"] for r in b["residuals"]]
        assert kinds in (
            ["attention", "mlp"],
            ["attention", "cross_attention", "mlp"],
            ["parallel"],
        ), kinds
        if b["stack"] == s.stacks[-1].path and exp["stacks"] == 2:
            assert b["cross_attention"] is not None
    if s.head is not None and exp["type"] not in (
        "bert",
        "roberta",
        "vit",
        "deit",
    ):  # poolers are not LM heads
        assert s.head.tied == exp["tied"]
    traits = TRAITS.get(exp["type"])
    if traits:
        placement, norm, gain, gated, rope, qk_norm = traits
        for b in j["blocks"]:
            for r in b["residuals"]:
                assert r["placement"] == placement, (b["path"], r)
                assert (r["norm"]["kind"], r["norm"]["gain"]) == (norm, gain), (b["path"], r)
            assert b["mlp"]["gated"] == gated
            assert b["attention"]["rope"] == rope
            assert b["attention"]["qk_norm"] == qk_norm
    return s


@pytest.mark.parametrize("name", sampled(ZOO))
def test_zoo_structure_matches_config(name):
    check(build(name))


@pytest.mark.parametrize("name", sampled(sorted(FAMILIES), ("bloom", "falcon-mqa", "opt")))
def test_unnamed_families_match_config(name):
    check(build_family(name))


def test_minilm_structure():
    s = check(build("minilm"))
    assert s.blocks[0].residuals[0].placement == "post"
    assert [e.kind for e in s.embeddings] == ["token", "token_type", "position"]


@pytest.mark.slow
def test_smollm2_structure():
    s = check(build("smollm2"))
    assert (s.blocks[0].attention.heads, s.blocks[0].attention.kv_heads) == (9, 3)
    assert len(s.blocks) == 30 and s.hidden_size == 576


def test_details_on_known_models():
    gpt2 = captured("tiny-gpt2").structure
    att = gpt2.blocks[0].attention
    assert att.fused_qkv and att.q.op == "conv1d"
    assert [e.kind for e in gpt2.embeddings] == ["token", "position"]
    llama = captured("tiny-llama").structure
    assert llama.blocks[0].attention.rotary_dim == llama.blocks[0].attention.head_dim
    assert llama.stacks[0].final_norm.kind == "rmsnorm"
    neox = capture(build_family("gptj")).structure
    assert neox.blocks[0].attention.rotary_dim == 8
    t5 = captured("tiny-t5").structure
    assert [s.path for s in t5.stacks] == ["encoder.block", "decoder.block"]
    assert t5.blocks[-1].cross_attention.kv_heads == t5.blocks[-1].attention.heads


def test_a_model_without_blocks_is_refused_with_the_reason():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8))
    g = capture(model, (torch.randint(0, 10, (2, 5)),))
    with pytest.raises(AnalysisError, match="no Transformer blocks found"):
        _ = g.structure


def test_learned_positions_indexed_by_an_arange_are_positions():
    """nanoGPT (and RandomArch) index their position table with `arange(T)` directly; the
    analysis looked only at the index's ancestors, not the index, and called it 'other'."""
    assert [e.kind for e in captured("nanogpt").structure.embeddings] == [
        "token",
        "position",
    ]
