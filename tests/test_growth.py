"""Growth passes: exact on every model (or refused with the reason), the oracles of
docs/passes.md (Growth), random compositions, Hugging Face round trips, growing an optimizer
mid-run, meta-device scale."""

import pytest
import torch
import transformers
from hypothesis import given
from hypothesis import strategies as st

from archfx.ir import ArtifactError, PassError, capture
from archfx.passes import Pipeline
from archfx.passes.io.hf_export import save_pretrained
from archfx.passes.io.optimizer import grow_optimizer
from archfx.passes.io.zoo.random_arch import ArchConfig, build_random

from .helpers import (
    EVERY_SAMPLED,
    byte_gpt,
    captured,
    hamlet,
    loss_of,
    meta_llama,
    model,
    sampled,
    train,
)

PASSES = [
    "expand-mlp(factor=1.5)",
    "add-heads(n=2)",
    "expand-head-dim(size={hd})",
    "expand-qk(size={hd})",
    "expand-hidden(factor=2)",
    "add-layers(n=1,at=1)",
]
POST_LN = ["tiny-bert", "tiny-roberta", "tiny-distilbert", "tiny-bart", "family:electra", "minilm"]
# (model, pass) -> the reason archfx must give for refusing: every other pair must be exact
REFUSED = {
    **{(m, "add-layers"): "post-LN" for m in POST_LN},
    # (BART — post-LN, tied head, no final norm — duplicates exactly: the last post-norm's
    # gain and bias are divided by the factor)
    **{
        (m, p): "touches the grown dimension"
        for m in ("family:falcon", "family:falcon-mqa")
        for p in ("add-heads", "expand-head-dim", "expand-qk")
    },
    ("family:bloom", "add-heads"): "computes a shape with the constant",
    ("family:bloom", "expand-head-dim"): "shares one dimension",
    ("family:bloom", "expand-qk"): "shares one dimension",
    ("family:cohere", "expand-qk"): "strided slice",
    ("family:olmo2", "add-heads"): "over the grown dimension",
}


@pytest.mark.parametrize("name", EVERY_SAMPLED)
def test_each_growth_is_exact_or_refused_with_its_reason(name):
    graph = captured(name)
    hd = graph.structure.blocks[0].attention.head_dim + 8
    for text in (t.format(hd=hd) for t in PASSES):
        key = (name, text.split("(")[0])
        if key in REFUSED:
            with pytest.raises(PassError, match=REFUSED[key]):
                Pipeline.parse(text).run(graph)
            continue
        result = Pipeline.parse(text).run(graph)
        cert = result.records[-1].certificate
        assert cert.ok and len(cert.input_sets) == 2, (text, cert)
        assert result.graph.num_parameters() > graph.num_parameters(), text


def test_tied_head_after_altup_on_a_post_ln_model_reads_a_scaled_input():
    """BART under AltUp: the tied head reads AltUp's stream, not a norm, so duplication scales
    the head's input by 1/m (a remark says so) instead of a norm gain; exact."""
    result = Pipeline.parse("altup(k=2),expand-hidden(factor=2)").run(captured("tiny-bart"))
    record = result.records[-1]
    assert record.certificate.ok, record.certificate
    node, scale = record.details["head_scale"]
    assert scale == 0.5 and any(
        r.site == node and "scaled by 0.5" in r.reason for r in record.remarks
    )
    head = result.graph.structure.head.linear
    assert node in {n.name for n in (head.node, *head.node.all_input_nodes)}


def test_gainless_rms_norm_output_is_rescaled_under_zero_padding():
    """AltUp's router reads the stream through an rms_norm with no gain; zero-padding the
    stream (an RMSNorm model) scales that norm's output by √(d/d̂) instead, exact."""
    graph = captured("tiny-llama")
    text = "altup(k=2,coefficients=router),expand-hidden(factor=2)"
    record = Pipeline.parse(text).run(graph).records[-1]
    assert record.certificate.ok, record.certificate
    scales = record.details["norm_scales"]
    # each layer's router reads the stream twice: before the layer (predict), after (correct)
    assert len(scales) == 2 * len(graph.structure.blocks)
    assert all(abs(f - 0.5**0.5) < 1e-12 for _, f in scales.values())
    assert {r.site for r in record.remarks} >= set(scales)


@pytest.mark.slow
def test_every_growth_exact_on_smollm2():
    graph = captured("smollm2")  # 30 layers, 9 query heads in 3 KV groups, RoPE, tied
    more = ["expand-hidden(size=640)", "add-heads(n=3)", "add-heads(n=6)", "add-layers(n=2,at=0)"]
    for text in [*(t.format(hd=80) for t in PASSES if "add-heads" not in t), *more]:
        cert = Pipeline.parse(text).run(graph).records[-1].certificate
        assert cert.ok, (text, cert)
    with pytest.raises(PassError, match="3 key/value groups of 3 query heads"):
        Pipeline.parse("add-heads(n=2)").run(graph)


def test_minilm_hidden_growth_duplicates_and_refuses_other_sizes():
    graph = captured("minilm")
    result = Pipeline.parse("expand-hidden(factor=2)").run(graph)
    assert result.records[-1].details["method"] == "duplicate"
    notes = result.records[-1].certificate.notes  # MiniLM's outputs are the stream itself
    assert any("grew from 384 to 768 features" in n for n in notes), notes
    assert result.graph.structure.hidden_size == 768
    with pytest.raises(PassError, match="method=approximate"):
        Pipeline.parse("expand-hidden(size=500)").run(graph)
    approx = Pipeline.parse("expand-hidden(size=500,method=approximate)").run(graph)
    assert approx.records[-1].certificate is None and not approx.preserves


def _stream_values(graph):
    blocks = graph.structure.blocks
    return graph.probe([b.output for b in blocks] + [b.input for b in blocks])


def test_zero_padded_stream_has_exactly_zero_new_features_at_every_layer():
    graph = captured("tiny-llama")
    grown = Pipeline.parse("expand-hidden(size=96)").run(graph).graph
    assert grown.structure.hidden_size == 96
    for value in _stream_values(grown):
        assert value[..., 64:].abs().max() == 0 and value[..., :64].abs().max() > 0


def test_duplicated_stream_has_identical_copies_at_every_layer():
    grown = Pipeline.parse("expand-hidden(factor=3)").run(captured("tiny-gpt2")).graph
    for value in _stream_values(grown):
        assert torch.equal(value[..., :64], value[..., 64:128])
        assert torch.equal(value[..., :64], value[..., 128:])


def test_new_blocks_are_the_identity_and_renumber_the_stack():
    graph = captured("tiny-llama")
    grown = Pipeline.parse("add-layers(n=2,at=1)").run(graph).graph
    blocks = grown.structure.blocks
    assert [b.path for b in blocks] == [f"model.layers.{i}" for i in range(4)]
    x_in, x_out = grown.probe([blocks[1].input, blocks[2].output])
    assert torch.equal(x_in, x_out)
    names = dict(grown.gm.named_parameters())
    assert torch.equal(
        names["model.layers.3.mlp.down_proj.weight"],
        dict(graph.gm.named_parameters())["model.layers.1.mlp.down_proj.weight"],
    )
    assert names["model.layers.1.mlp.down_proj.weight"].abs().max() == 0


def test_gqa_heads_grow_per_group_or_by_whole_groups():
    graph = captured("tiny-llama")  # 4 query heads in 2 KV groups
    per_group = Pipeline.parse("add-heads(n=2)").run(graph).graph.structure.blocks[0].attention
    assert (per_group.heads, per_group.kv_heads) == (6, 2)
    whole = Pipeline.parse("add-heads(n=4)").run(graph).graph.structure.blocks[0].attention
    assert (whole.heads, whole.kv_heads) == (8, 2)
    with pytest.raises(PassError, match="neither a multiple"):
        Pipeline.parse("add-heads(n=3)").run(graph)


def test_rope_keeps_old_frequencies_and_continues_the_sequence():
    graph = captured("tiny-llama")
    grown = Pipeline.parse("expand-qk(size=24)").run(graph).graph
    old = dict(graph.gm.named_buffers())["model.rotary_emb.inv_freq"]
    new = dict(grown.gm.named_buffers())["model.rotary_emb.inv_freq"]
    assert new.shape == (12,) and torch.equal(new[:8], old)
    ratio = old[1] / old[0]
    assert torch.allclose(new[8:] / new[7:-1], ratio.expand(4), rtol=1e-5)


def test_layers_option_grows_only_the_chosen_blocks_and_checks_coupling():
    graph = captured("tiny-llama")
    grown = Pipeline.parse("expand-mlp(size=200,layers=1)").run(graph).graph
    assert [b.mlp.hidden for b in grown.structure.blocks] == [128, 200]
    with pytest.raises(PassError, match="outside"):
        Pipeline.parse("expand-mlp(size=200,layers=0-5)").run(graph)
    with pytest.raises(PassError, match="select it too"):  # T5 shares position-bias heads
        Pipeline.parse("add-heads(n=2,layers=1)").run(captured("tiny-t5"))


@pytest.mark.parametrize(
    "text",
    [
        "expand-mlp(factor=2)",
        pytest.param("expand-hidden(size=96)", marks=pytest.mark.slow),
        "add-heads(n=2)",
        pytest.param("expand-qk(size=24)", marks=pytest.mark.slow),
        pytest.param("add-layers(n=1)", marks=pytest.mark.slow),
    ],
)
def test_new_parameters_train(text):
    """Both the zero side and the free side move under training (none stuck at a saddle)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    example = {"input_ids": torch.randint(0, 256, (2, 8)), "use_cache": False}
    graph = capture(transformers.LlamaForCausalLM(config), example)
    result = Pipeline.parse(text).run(graph)
    grown = result.graph
    before = {k: v.detach().clone() for k, v in grown.gm.named_parameters()}
    layouts = result.records[-1].tensor_maps.get("layouts", {})
    train(grown, steps=3, seq=32)
    after = dict(grown.gm.named_parameters())
    fresh = [n for n in after if n not in dict(graph.gm.named_parameters())]
    for name, axes in layouts.items():
        if name not in after:  # buffers (RoPE frequencies) do not train
            continue
        for k, src in enumerate(axes):
            if src is None or not (src < 0).any():
                continue
            moved = (after[name] - before[name]).index_select(k, torch.nonzero(src < 0).flatten())
            assert moved.abs().max() > 0, (text, name)
    for name in fresh:
        assert (after[name] - before[name]).abs().max() > 0, (text, name)


growth_step = st.one_of(
    st.builds("expand-mlp(factor={})".format, st.sampled_from([1.25, 1.5, 2.0])),
    st.builds("add-heads(n={})".format, st.sampled_from([2, 4])),
    st.builds("expand-head-dim(size={})".format, st.integers(17, 24)),
    st.builds("expand-qk(size={})".format, st.sampled_from([18, 20, 24])),
    st.builds("expand-hidden(size={})".format, st.integers(65, 100)),
    st.builds("add-layers(n={},at={})".format, st.integers(1, 2), st.integers(0, 2)),
)


@given(
    st.sampled_from(["tiny-llama", "tiny-qwen3", "tiny-gemma"]),
    st.lists(growth_step, min_size=2, max_size=3, unique_by=lambda s: s.split("(")[0]),
)
def test_random_growth_compositions_are_exact(name, steps):
    graph = captured(name)
    result = Pipeline.parse(",".join(steps)).run(graph)
    assert all(r.certificate.ok for r in result.records), [r.certificate for r in result.records]
    whole = result.certificate  # end to end: each pass on the input it got; fp32 input to output
    assert whole.ok and whole.max_abs_diff <= 1e-4, whole


@pytest.mark.parametrize(
    "name,text",
    [
        (
            "tiny-llama",
            "expand-mlp(factor=2),add-heads(n=2),expand-hidden(size=96),add-layers(n=1,at=1)",
        ),
        ("tiny-llama", "expand-qk(size=24),expand-head-dim(size=24)"),
        ("tiny-qwen3", "add-heads(n=2),expand-mlp(size=160)"),
        pytest.param(
            "tiny-t5",
            "expand-mlp(factor=2),add-heads(n=2),add-layers(n=1,at=1)",
            marks=pytest.mark.slow,
        ),
        ("tiny-gpt2", "expand-mlp(factor=2),add-layers(n=1)"),
        ("tiny-bert", "expand-mlp(factor=2)"),
    ],
)
def test_hugging_face_round_trip(tmp_path, name, text):
    source = model(name)
    graph = captured(name)
    grown = Pipeline.parse(text).run(graph).graph
    out = save_pretrained(grown, source, tmp_path / "grown")
    back = type(source).from_pretrained(str(out)).eval()
    args, kwargs = graph.inputs.as_call()
    with torch.no_grad():
        got = back(*args, **kwargs)
    for key, expected in zip(grown.output_names, grown.run(), strict=True):
        assert (got[key] - expected).abs().max() <= 1e-5, key


def test_hugging_face_export_saves_the_source_tokenizer(tmp_path):
    """MiniLM's checkpoint directory has a tokenizer: it is saved with the grown checkpoint, and
    encodes as the source's does; a model built from a config has none and gets none."""
    source = model("minilm")
    grown = Pipeline.parse("expand-mlp(factor=2)").run(captured("minilm")).graph
    out = save_pretrained(grown, source, tmp_path / "grown")
    text = "Growing a model keeps its vocabulary: tokenizers don't change."
    want = transformers.AutoTokenizer.from_pretrained(source.name_or_path)(text)["input_ids"]
    assert transformers.AutoTokenizer.from_pretrained(str(out))(text)["input_ids"] == want
    tiny = Pipeline.parse("expand-mlp(factor=2)").run(captured("tiny-bert")).graph
    plain = save_pretrained(tiny, model("tiny-bert"), tmp_path / "tiny")
    assert sorted(p.name for p in plain.iterdir()) == ["config.json", "model.safetensors"]


def test_hugging_face_export_refuses_what_the_config_cannot_say(tmp_path):
    grown = Pipeline.parse("add-heads(n=2)").run(captured("tiny-gpt2")).graph
    with pytest.raises(ArtifactError, match="divisible"):
        save_pretrained(grown, model("tiny-gpt2"), tmp_path / "x")
    assert not (tmp_path / "x").exists()
    heads = Pipeline.parse("add-heads(n=2)").run(captured("tiny-llama")).graph
    with pytest.raises(ArtifactError, match="not a multiple of the number of attention heads"):
        save_pretrained(heads, model("tiny-llama"), tmp_path / "z")  # HF's own validator
    uneven = Pipeline.parse("expand-mlp(size=200,layers=0)").run(captured("tiny-llama")).graph
    with pytest.raises(ArtifactError, match="MLP widths"):
        save_pretrained(uneven, model("tiny-llama"), tmp_path / "y")


def test_training_continues_after_growing_mid_run():
    graph = byte_gpt("canonicalize")
    opt = torch.optim.AdamW(graph.gm.parameters(), lr=3e-3)
    data = hamlet(8, 32)
    train(graph, steps=5, opt=opt, data=data)
    x, y = next(data)
    with torch.no_grad():
        before = loss_of(graph, x, y).item()
    result = Pipeline.parse("expand-mlp(factor=2),expand-hidden(factor=2),add-layers(n=1)").run(
        graph
    )
    grown = result.graph
    opt = grow_optimizer(opt, graph, result)
    with torch.no_grad():
        assert abs(loss_of(grown, x, y).item() - before) < 1e-5
    for p in grown.gm.parameters():
        state = opt.state.get(p)
        if state:
            assert state["exp_avg"].shape == p.shape
    p = dict(grown.gm.named_parameters())["transformer.h.0.mlp.c_fc.weight"]
    assert p.shape == (512, 128)  # canonicalize made it (out, in)
    assert opt.state[p]["exp_avg"][256:].abs().max() == 0  # new MLP units: zero moments
    assert opt.state[p]["exp_avg"][:, 64:].abs().max() == 0  # new (duplicated) inputs: zero
    assert opt.state[p]["exp_avg"][:256, :64].abs().max() > 0  # old entries: kept
    assert train(grown, steps=5, opt=opt, data=data)[-1] < before


def test_meta_device_growth_is_structure_only():
    graph = meta_llama(
        hidden_size=256, intermediate_size=512, num_attention_heads=8, vocab_size=1000
    )
    grown = (
        Pipeline.parse("expand-mlp(factor=2),add-heads(n=2),add-layers(n=1)")
        .run(graph, verify=False)
        .graph
    )
    s = grown.structure
    assert (
        len(s.blocks) == 3 and s.blocks[0].mlp.hidden == 1024 and s.blocks[0].attention.heads == 10
    )
    assert all(p.is_meta for p in grown.gm.parameters())


def test_bad_options_say_what_to_do():
    graph = captured("tiny-llama")
    for text, match in [
        ("expand-mlp", "exactly one of factor or size"),
        ("expand-mlp(factor=2,size=300)", "exactly one"),
        ("expand-mlp(size=10)", "smaller"),
        ("expand-qk(size=25)", "even"),
        ("expand-head-dim", "give size"),
        ("expand-mlp(factor=2,layers=x)", "layers must be"),
        ("add-layers(at=9)", "past the last block"),
        ("expand-mlp(factor=1000)", "refuses more than"),
        ("expand-mlp(factor=nan)", "finite"),
    ]:
        with pytest.raises(PassError, match=match):
            Pipeline.parse(text).run(graph)


@pytest.mark.parametrize("name", sampled(["tiny-llama", "tiny-gpt2", "tiny-t5"], ("tiny-gpt2",)))
def test_grown_models_export_to_onnx(tmp_path, name):
    from archfx.ir.lower import to_onnx

    text = {
        "tiny-llama": "expand-mlp(factor=2),add-heads(n=2),expand-qk(size=24),expand-hidden(size=96),add-layers(n=1)",
        "tiny-gpt2": "expand-hidden(factor=2),expand-head-dim(size=24),add-layers(n=1)",
        "tiny-t5": "expand-mlp(factor=2),add-heads(n=2),expand-hidden(size=80)",
    }[name]
    grown = Pipeline.parse(text).run(captured(name)).graph
    assert to_onnx(grown, tmp_path / "m.onnx").max_abs_diff <= 1e-4


def test_inplace_growth_edits_the_graph_and_cannot_certify():
    graph = captured("tiny-llama")
    with pytest.raises(PassError, match="verify=False"):
        Pipeline.parse("expand-mlp(factor=2)").run(graph, inplace=True)
    expected = graph.run()
    result = Pipeline.parse("expand-mlp(factor=2),add-layers(n=1)").run(
        graph, verify=False, inplace=True
    )
    assert result.graph is graph and graph.structure.blocks[0].mlp.hidden == 256
    assert all((a - b).abs().max() <= 1e-5 for a, b in zip(expected, graph.run(), strict=True))


@pytest.mark.slow
def test_smollm2_grown_round_trips_through_hugging_face(tmp_path):
    source = model("smollm2")
    graph = capture(source)
    text = "expand-mlp(factor=1.5),add-heads(n=3),expand-hidden(size=768),add-layers(n=2,at=10)"
    grown = Pipeline.parse(text).run(graph).graph
    out = save_pretrained(grown, source, tmp_path / "grown")
    back = type(source).from_pretrained(str(out)).eval()
    assert (back.config.num_hidden_layers, back.config.hidden_size) == (32, 768)
    assert (back.config.num_attention_heads, back.config.num_key_value_heads) == (12, 3)
    ids = graph.inputs.tensors[0]
    with torch.no_grad():
        assert (back(input_ids=ids).logits - grown(ids)[0]).abs().max() <= 1e-5


# Regressions found by tests/test_random_architectures.py: a size-1 axis (one key/value head,
# or one attention head) used to vanish from the coupled-dimension analysis.


def test_expand_qk_is_exact_with_one_key_value_head():
    """MQA with separate k and v projections (any Llama/Mistral/Qwen2 config with
    num_key_value_heads=1): the key projection's rows are (1 × head dim). They used to be read
    as the head dim itself, shared with the queries, so the new key rows were drawn instead of
    zeroed and the certificate failed (max |Δ| 1e-3 on Llama, 0.13 on RandomArch)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    llama = transformers.LlamaForCausalLM(config).eval()
    arch = build_random(ArchConfig(heads=2, kv_heads=1, head_dim=8, positions="learned"))
    for m, hd in ((llama, 16), (arch, 8)):
        result = Pipeline.parse(f"expand-qk(size={hd + 4})").run(capture(m))
        assert result.records[0].certificate.ok
        assert result.graph.structure.blocks[0].attention.head_dim == hd + 4


def _single_head_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=8,
    )
    return transformers.LlamaForCausalLM(config).eval(), "model.layers.0.self_attn"


SINGLE_HEAD = {
    "rope": lambda: (build_random(ArchConfig(heads=1, kv_heads=1, head_dim=8)), "blocks.0.attn"),
    "learned": lambda: (
        build_random(ArchConfig(heads=1, kv_heads=1, head_dim=8, positions="learned")),
        "blocks.0.attn",
    ),
    "llama": _single_head_llama,
}


@pytest.mark.parametrize("which", sorted(SINGLE_HEAD))
def test_a_single_head_grows_into_several(which):
    """heads = 1: add-heads used to refuse ('not laid out as heads × head dim'), because the
    unit head axis vanished from the analysis. Keeping it takes three rules: a view that splits
    off a unit axis makes the axis (1 × n); an operand's unit axis is the output's (q · cos with
    RoPE keeps the head axis); a reshape that keeps a unit axis in place keeps it (Llama's
    (b, 1, t, d) → (b, -1, t, d)). Now q, k, v and o all grow and the Structure sees the heads."""
    m, prefix = SINGLE_HEAD[which]()
    result = Pipeline.parse("add-heads(n=2),expand-qk(size=12),expand-head-dim(size=10)").run(
        capture(m)
    )
    assert all(r.certificate.ok for r in result.records)
    att = result.graph.structure.blocks[0].attention
    assert (att.heads, att.kv_heads, att.head_dim) == (3, 3, 12)
    shapes = {k: tuple(v.shape) for k, v in result.graph.gm.state_dict().items()}
    d = 32
    q, k, v, o = (
        shapes[f"{prefix}.{n}.weight"]
        for n in (
            ("q", "k", "v", "o") if "blocks" in prefix else ("q_proj", "k_proj", "v_proj", "o_proj")
        )
    )
    assert q == k == (36, d) and v == (30, d) and o == (d, 30)


def _one_head(model_cls, config_cls, **extra):
    torch.manual_seed(0)
    config = config_cls(
        vocab_size=64,
        hidden_size=12,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=16,
        **extra,
    )
    return capture(model_cls(config).eval())


EAGER_ONE_HEAD = {
    "gemma2": lambda: _one_head(
        transformers.Gemma2ForCausalLM,
        transformers.Gemma2Config,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "llama": lambda: _one_head(
        transformers.LlamaForCausalLM, transformers.LlamaConfig, attn_implementation="eager"
    ),
}


@pytest.mark.parametrize("which", sorted(EAGER_ONE_HEAD))
def test_a_single_head_grows_through_eager_attention(which):
    """heads = 1 with eager attention (q · kᵀ, softmax, p · v as matmuls; Gemma2 has no SDPA):
    the matmuls dropped their unit batch axes, so the heads of q, k, v, the scores and the
    output (o's input, heads × head dim = 1 × 16) were four dimensions; add-heads grew o's input
    alone and failed its shape check (o read 16 features with 32 columns). The batch axes of a
    matmul now follow the broadcast rule, and a mask's unit axis, read by every layer, no longer
    ties the layers' heads: each layer grows alone."""
    graph = EAGER_ONE_HEAD[which]()
    for text, heads in (("add-heads(n=1)", [2, 2]), ("add-heads(n=1,layers=0)", [2, 1])):
        result = Pipeline.parse(text).run(graph)
        cert = result.records[-1].certificate
        assert cert.ok and cert.max_abs_diff <= 1e-5, (text, cert)
        assert [b.attention.heads for b in result.graph.structure.blocks] == heads, text
        o = result.graph.gm.state_dict()["model.layers.0.self_attn.o_proj.weight"]
        assert tuple(o.shape) == (12, 32), text


def test_neox_full_rotary_expand_qk_is_refused():
    """Known limit (excluded in tests/test_random_architectures.py): GPT-NeoX with
    partial_rotary_factor=1.0 concatenates the rotated head dim with an empty pass-through
    slice; expand-qk cannot follow that layout and refuses with the reason."""
    torch.manual_seed(0)
    config = transformers.GPTNeoXConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        rotary_pct=1.0,
    )
    graph = capture(transformers.GPTNeoXForCausalLM(config).eval())
    with pytest.raises(PassError, match="laid out in a way archfx cannot grow"):
        Pipeline.parse("expand-qk(size=12)").run(graph)
