"""sdnc: attention as explicit memory write / read ops (docs/passes.md, sdnc)."""

import functools
import itertools
import json

import pytest
import torch

from archfx.ir import LoweringError, PassError, capture
from archfx.ir.lower import compile_graph, to_onnx
from archfx.ir.memory import DELTA, READ, WRITE, _grouped
from archfx.passes import Pipeline
from archfx.passes.cli import main as cli
from archfx.passes.engines.decode import MemoryStream, first_call
from archfx.passes.io.memory_inspect import memories

from .helpers import EVERY, byte_gpt, captured, model, sampled, train


def reads(graph):
    return [n for n in graph.gm.graph.nodes if n.target is READ]


@pytest.mark.parametrize("name", sampled(EVERY))
def test_sdnc_is_exact_everywhere(name):
    graph = captured(name)
    result = Pipeline.parse("sdnc").run(graph)
    out = result.graph
    sites = [r.attention for b in graph.structure.blocks for r in b.residuals if r.attention]
    assert len(reads(out)) == len(sites) == result.records[-1].details["sites"]
    assert sum(n.target is WRITE for n in out.gm.graph.nodes) == len(sites)
    assert all(
        r.attention.core.target is READ
        for b in out.structure.blocks
        for r in b.residuals
        if r.attention
    )
    assert result.records[-1].certificate.max_abs_diff <= 1e-5


def test_cross_attention_reads_the_encoders_memory():
    out = Pipeline.parse("sdnc").run(captured("tiny-t5")).graph
    layers = memories(out)
    cross = [m for m in layers if m.cross]
    assert len(cross) == 2 and len(layers) == 6
    enc = out.inputs.tensors[out.inputs.names.index("input_ids")].shape[1]
    dec = out.inputs.tensors[out.inputs.names.index("decoder_input_ids")].shape[1]
    for m in cross:  # slots are the encoder's positions, queries the decoder's
        assert m.addresses.shape[-2] == enc and m.weightings.shape[-2:] == (dec, enc)


@pytest.mark.parametrize("name", ["tiny-llama", "nanogpt", "family:gemma2", "family:bloom"])
def test_memory_oracles(name):
    """Reads are Vᵀw over the written slots; weightings are distributions, causal for decoders;
    GQA heads share banks; the addresses are the keys the original attention used."""
    graph = captured(name)
    out = Pipeline.parse("sdnc").run(graph).graph
    layers = memories(out)
    got = out.probe(reads(out))
    for m, r in zip(layers, got, strict=True):
        w = m.weightings
        torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))
        assert bool((w.triu(1) == 0).all())  # causal: no slot after the query
        c = m.contents.repeat_interleave(w.shape[-3] // m.contents.shape[-3], -3)
        torch.testing.assert_close(w @ c, r, atol=1e-6, rtol=1e-5)
    keys = [a.key for b in graph.structure.blocks for r in b.residuals if (a := r.attention)]
    if all(k.target is not torch.ops.aten.transpose.int for k in keys):
        for m, k in zip(layers, graph.probe(keys), strict=True):  # banks shared by GQA heads
            n = k.shape[-3] // m.addresses.shape[-3]
            assert torch.equal(m.addresses.repeat_interleave(n, -3), k)
    if name == "tiny-llama":
        assert layers[0].addresses.shape[-3] == 2 and layers[0].weightings.shape[-3] == 4


@pytest.mark.parametrize(
    "name",
    [
        "tiny-llama",
        *(
            pytest.param(n, marks=pytest.mark.slow)
            for n in ["tiny-gpt2", "tiny-t5", "nanogpt", "family:gemma2"]
        ),
    ],
)
def test_sdnc_composes_with_head_growth(name):
    graph = captured(name)
    for text in [
        "sdnc,add-heads(n=2)",
        "add-heads(n=2),sdnc",
        "sdnc,expand-qk(size=24),expand-head-dim(size=24)",
    ]:
        result = Pipeline.parse(text).run(graph)
        assert all(r.certificate.max_abs_diff <= 1e-5 for r in result.records), text
        assert len(reads(result.graph)) > 0


@pytest.mark.parametrize(
    "name",
    [
        "tiny-llama",
        pytest.param("tiny-t5", marks=pytest.mark.slow),
        pytest.param("nanogpt", marks=pytest.mark.slow),
        pytest.param("family:gemma2", marks=pytest.mark.slow),
        pytest.param("family:bloom", marks=pytest.mark.slow),
    ],
)
def test_sdnc_lowers_to_onnx(name, tmp_path):
    out = Pipeline.parse("sdnc").run(captured(name)).graph
    result = to_onnx(out, tmp_path / "m.onnx")
    assert result.max_abs_diff <= 1e-4


@pytest.mark.slow
def test_sdnc_compiles():
    out = Pipeline.parse("sdnc").run(captured("tiny-llama")).graph
    assert compile_graph(out).max_abs_diff <= 1e-5


def test_sdnc_trains_and_keeps_the_dtype():
    graph = capture(model("tiny-llama").to(torch.bfloat16))
    out = Pipeline.parse("sdnc").run(graph).graph
    assert out.run()[0].dtype == torch.bfloat16
    fp32 = Pipeline.parse("sdnc").run(captured("nanogpt")).graph
    logits = fp32(*fp32.inputs.tensors)[0]
    (logits**2).mean().backward()
    q_weights = [p for n, p in fp32.gm.named_parameters() if "c_attn" in n]
    assert q_weights and all(p.grad is not None and p.grad.abs().sum() > 0 for p in q_weights)


def test_sdnc_twice_is_refused():
    out = Pipeline.parse("sdnc").run(captured("tiny-llama")).graph
    with pytest.raises(PassError, match="not yet a memory read"):
        Pipeline.parse("sdnc").run(out)


def test_memories_need_sdnc():
    with pytest.raises(PassError, match="run the `sdnc` pass first"):
        memories(captured("tiny-llama"))


def test_cli_memory_picture(tmp_path, capsys):
    path = tmp_path / "memory.png"
    assert cli(["inspect", "nanogpt", "--memory", str(path), "--json"]) == 0
    import json

    data = json.loads(capsys.readouterr().out)
    assert path.stat().st_size > 5000
    assert [m["read_heads"] for m in data["memory"]["layers"]] == [4, 4]
    assert data["memory"]["max_abs_diff"] <= 1e-5


DECODERS = [
    "tiny-gpt2",
    "tiny-llama",
    "nanogpt",
    "tiny-qwen2",
    "tiny-gpt-neox",
    "tiny-phi",
    "tiny-gemma",
    "tiny-qwen3",
    "tiny-mistral",
]


@pytest.mark.parametrize("name", sampled(DECODERS, ("tiny-llama", "tiny-gpt2", "nanogpt")))
def test_persistent_memory_segments_equal_the_whole(name):
    graph = captured(name)
    result = Pipeline.parse("sdnc(persistent=true)").run(graph)
    record = result.records[-1]
    assert not record.preserves and record.certificate is None
    ids = torch.randint(0, 100, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = graph(ids)[0]  # the original model, one call
    stream = MemoryStream(result.graph)
    cuts = [0, 5, 6, 13, 21]
    with torch.no_grad():
        segments = torch.cat([stream(ids[:, a:b])[0] for a, b in itertools.pairwise(cuts)], 1)
        assert stream.slots == 21
        stream.reset()
        decoded = torch.cat([stream(ids[:, i : i + 1])[0] for i in range(21)], 1)
    assert float((segments - whole).abs().max()) <= 1e-5
    assert float((decoded - whole).abs().max()) <= 1e-5


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("tiny-bert", "not exactly causal"),
        ("tiny-t5", "one \\(batch, tokens\\) input"),
        ("family:bloom", "position bias"),
        ("family:opt", "differs from the whole sequence"),  # positions from the mask's cumsum
    ],
)
def test_persistent_memory_refusals(name, why):
    with pytest.raises(PassError, match=why):
        Pipeline.parse("sdnc(persistent=true)").run(captured(name))


def test_persistent_memory_is_the_decode_form_and_exports_with_the_ecosystems_names(tmp_path):
    out = Pipeline.parse("sdnc(persistent=true)").run(captured("nanogpt")).graph
    assert out.inputs.names[:5] == [
        "input_ids",
        "attention_mask",
        "position_ids",
        "past_key_values.0.key",
        "past_key_values.0.value",
    ]
    assert out.output_names[-2:] == ["present.1.key", "present.1.value"]
    assert out.inputs.tensors[3].shape[-2] == 2  # cached slots in the example: exportable
    result = to_onnx(out, tmp_path / "m.onnx")
    assert result.ok


def test_persistent_graph_as_its_first_call_certifies_and_the_cli_verifies(capsys):
    from archfx.ir.verify import certify

    graph = captured("tiny-llama")
    out = Pipeline.parse("sdnc(persistent=true)").run(graph).graph
    first = first_call(out)  # empty memory in, memory out dropped: the model's own signature
    assert first.inputs.names == graph.inputs.names and first.output_names == graph.output_names
    assert first.gm.get_parameter("lm_head.weight") is out.gm.get_parameter("lm_head.weight")
    cert = certify(graph, first)
    assert cert.ok and cert.max_abs_diff <= 1e-5 and len(cert.input_sets) == 2
    with pytest.raises(PassError, match="persistent=true"):
        first_call(graph)
    code = cli(["apply", "tiny-llama", "--pipeline", "sdnc(persistent=true)", "--verify", "--json"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    verify = json.loads(stdout)["verify"]
    assert verify["ok"] and verify["max_abs_diff"] <= 1e-5
    assert any("first call" in note for note in verify["notes"])


def test_a_certified_pass_after_persistent_memory_runs_on_the_memory_inputs():
    # sdnc(persistent=true) adds inputs: a later certified pass is checked on those inputs,
    # and the whole pipeline against the model as its first call
    graph = captured("tiny-llama")
    result = Pipeline.parse("sdnc(persistent=true),expand-mlp(factor=2)").run(graph)
    cert = result.records[-1].certificate
    assert cert is not None and cert.ok and cert.max_abs_diff <= 1e-5
    code = cli(
        [
            "apply",
            "tiny-llama",
            "--pipeline",
            "sdnc(persistent=true),expand-mlp(factor=2)",
            "--verify",
        ]
    )
    assert code == 0


def test_memory_stream_needs_a_persistent_graph():
    out = Pipeline.parse("sdnc").run(captured("nanogpt")).graph
    with pytest.raises(PassError, match="persistent=true"):
        MemoryStream(out)
    stream = MemoryStream(Pipeline.parse("sdnc(persistent=true)").run(captured("nanogpt")).graph)
    stream(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(PassError, match="batch 1"):
        stream(torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.slow
def test_smollm2_memory_is_exact_and_persists():
    from archfx.ir.verify import in_fp64

    graph = captured("smollm2")
    assert Pipeline.parse("sdnc").run(graph).records[-1].certificate.max_abs_diff <= 1e-5
    out = Pipeline.parse("sdnc(persistent=true)").run(graph).graph
    out.gm = in_fp64(out.gm)  # segment equality is arithmetic; fp32 adds ~1e-4 of rounding
    ids = torch.randint(0, 49152, (2, 23), generator=torch.Generator().manual_seed(0))
    stream = MemoryStream(out)
    with torch.no_grad():
        whole = in_fp64(graph.gm)(ids)[0]
        parts = torch.cat([stream(ids[:, :11])[0], stream(ids[:, 11:])[0]], 1)
    assert float((parts - whole).abs().max()) <= 1e-10


def test_cosine_addressing_is_the_dncs():
    graph = captured("tiny-llama")
    result = Pipeline.parse("sdnc(addressing=cosine)").run(graph)
    assert result.records[-1].certificate is None and not result.records[-1].preserves
    out = result.graph
    for m in memories(out):  # unit-norm addresses
        norms = m.addresses.norm(dim=-1)
        torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)
    (q,) = {n.args[0] for n in reads(out)[:1]}
    strength = out.probe([q])[0].norm(dim=-1)  # β·q/‖q‖: the strength, √d_k at first
    torch.testing.assert_close(strength, torch.full_like(strength, 4.0), atol=1e-4, rtol=0)
    logits = out(*out.inputs.tensors)[0]
    (logits**2).mean().backward()
    grads = [p.grad for n, p in out.gm.named_parameters() if n.endswith("strength_weight")]
    assert len(grads) == 2 and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_cosine_addressing_matches_dot_under_unit_gain_qk_norm():
    """With QK-norm (gains 1 in this random model) ‖q‖ = ‖k‖ = √d_k, so β = √d_k gives the
    model's own q·k/√d_k: the two addressings coincide up to the norm's ε."""
    graph = captured("tiny-qwen3")
    out = Pipeline.parse("sdnc(addressing=cosine)").run(graph).graph
    assert float((out.run()[0] - graph.run()[0]).abs().max()) <= 1e-4


def test_cosine_addressing_trains_on_shakespeare():
    losses = train(byte_gpt("sdnc(addressing=cosine)"), steps=40)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses


def delta_update(state, k, v, beta):
    """The delta rule, SPEC's form: state ← state + β k (vᵀ − kᵀ state), k of unit norm."""
    error = v - torch.einsum("...k,...kv->...v", k, state)
    return state + beta[..., None, None] * k[..., :, None] * error[..., None, :]


def test_the_delta_memory_shrinks_the_error_along_k_by_one_minus_beta():
    """Two tokens, both queries k_2: r_1 = X_1ᵀk_2 and r_2 = X_2ᵀk_2 are the readouts along k_2
    before and after its write, so v_2 − r_2 = (1 − β_2)(v_2 − r_1)."""
    gen = torch.Generator().manual_seed(0)
    k = torch.nn.functional.normalize(torch.randn(2, 3, 2, 8, generator=gen), dim=-1)
    v = torch.randn(2, 3, 2, 5, generator=gen)
    beta = torch.rand(2, 3, 2, generator=gen) * 2
    q = k[:, :, 1:].expand(-1, -1, 2, -1)
    r = DELTA(q, k, v, beta)
    before, after = v[:, :, 1] - r[:, :, 0], v[:, :, 1] - r[:, :, 1]
    torch.testing.assert_close(after, (1 - beta[:, :, 1, None]) * before, atol=1e-5, rtol=1e-5)


def token_by_token(query, keys, values, strength):
    """The delta-rule memory as its definition: one `delta_update` per token, read after it."""
    b, hk, n, dk = keys.shape
    groups = query.shape[1] // hk
    state = keys.new_zeros(b, hk, dk, values.shape[-1])
    q = query.reshape(b, hk, groups, n, dk)
    reads = []
    for t in range(n):
        state = delta_update(state, keys[:, :, t], values[:, :, t], strength[:, :, t])
        reads.append(torch.einsum("bhgk,bhkv->bhgv", q[:, :, :, t], state))
    return torch.stack(reads, 3).reshape(b, hk * groups, n, values.shape[-1])


@pytest.mark.parametrize("tokens", [1, 31, 32, 77])
def test_the_chunked_delta_scan_is_the_token_by_token_delta_rule(tokens):
    """`archfx::memory_delta` runs chunks of CHUNK tokens (a triangular solve per chunk): its
    reads and every gradient equal the per-token recurrence in fp64 (to rounding), for lengths
    inside one chunk, exactly one, and across chunks, with GQA groups and β over (0, 2)."""
    gen = torch.Generator().manual_seed(tokens)
    unit = functools.partial(torch.nn.functional.normalize, dim=-1)
    args = [
        unit(torch.randn(2, 6, tokens, 8, generator=gen, dtype=torch.float64)),
        unit(torch.randn(2, 3, tokens, 8, generator=gen, dtype=torch.float64)),
        torch.randn(2, 3, tokens, 5, generator=gen, dtype=torch.float64),
        torch.rand(2, 3, tokens, generator=gen, dtype=torch.float64) * 2,
    ]
    got_args = [a.clone().requires_grad_() for a in args]
    want_args = [a.clone().requires_grad_() for a in args]
    got, want = DELTA(*got_args), token_by_token(*want_args)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    weights = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    for a, b in zip(
        torch.autograd.grad((got * weights).sum(), got_args),
        torch.autograd.grad((want * weights).sum(), want_args),
        strict=True,
    ):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_delta_write_is_causal_and_trains():
    graph = captured("tiny-llama")
    result = Pipeline.parse("sdnc(write=delta)").run(graph)
    assert result.records[-1].certificate is None and not result.records[-1].preserves
    out = result.graph
    ids = out.inputs.tensors[0].clone()
    later = ids.clone()
    later[:, -1] = (later[:, -1] + 1) % 100
    with torch.no_grad():
        a, b = out(ids)[0], out(later)[0]
    assert torch.equal(a[:, :-1], b[:, :-1]) and not torch.equal(a[:, -1], b[:, -1])
    losses = train(byte_gpt("sdnc(write=delta)"), steps=40)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses


class _SequenceFirstLM(torch.nn.Module):
    """torch.nn's encoder in its default (tokens, batch, features) layout, causal."""

    def __init__(self):
        super().__init__()
        layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0)
        self.emb, self.head = torch.nn.Embedding(50, 32), torch.nn.Linear(32, 50)
        self.enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, ids):
        mask = torch.nn.Transformer.generate_square_subsequent_mask(ids.shape[1])
        x = self.enc(self.emb(ids).transpose(0, 1), mask=mask, is_causal=True)
        return self.head(x.transpose(0, 1))


@pytest.mark.parametrize("text", ["sdnc(write=delta)", "sdnc(addressing=cosine)"])
def test_learned_rates_on_sequence_first_inputs(text):
    """β per head and token comes from the attention's input x; in a (tokens, batch, features)
    layout it is permuted onto the queries' (batch, heads, tokens) axes, and the memory stays
    causal."""
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 8))
    out = Pipeline.parse(text).run(capture(_SequenceFirstLM().eval(), (ids,))).graph
    later = ids.clone()
    later[:, -1] = (later[:, -1] + 1) % 50
    with torch.no_grad():
        a, b = out(ids)[0], out(later)[0]
    assert torch.equal(a[:, :-1], b[:, :-1]) and not torch.equal(a[:, -1], b[:, -1])


@pytest.mark.slow
def test_delta_write_compiles():
    from archfx.ir.lower import compile_graph

    out = Pipeline.parse("sdnc(write=delta)").run(captured("tiny-llama")).graph
    assert compile_graph(out, dynamic=True).max_abs_diff <= 1e-5


def test_delta_write_refuses_onnx_export(tmp_path):
    from archfx.ir.lower import to_onnx

    out = Pipeline.parse("sdnc(write=delta)").run(captured("tiny-llama")).graph
    with pytest.raises(LoweringError, match="no ONNX form yet"):
        to_onnx(out, tmp_path / "m.onnx")


@pytest.mark.parametrize(
    ("text", "name", "why"),
    [
        ("sdnc(write=delta)", "tiny-bert", "not exactly causal"),
        ("sdnc(write=delta,persistent=true)", "tiny-llama", "does not combine"),
        ("sdnc(addressing=cosine)", "family:bloom", "\\(batch, heads, tokens, dim\\)"),
    ],
)
def test_dnc_option_refusals(text, name, why):
    with pytest.raises(PassError, match=why):
        Pipeline.parse(text).run(captured(name))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("mask", [None, "per-batch", "per-head", "additive", "2-d"])
def test_a_gqa_read_equals_reading_repeated_banks(mask, causal, softcap):
    # exported to ONNX, a GQA read groups each key head's query heads instead of repeating its
    # bank (the exporter's SDPA would copy it per query head): the oracle repeats the bank
    torch.manual_seed(0)
    for b, h, hk, n, t in [(2, 9, 3, 1, 7), (2, 9, 3, 5, 5), (3, 8, 1, 4, 6)]:
        q, k, v = torch.randn(b, h, n, 16), torch.randn(b, hk, t, 16), torch.randn(b, hk, t, 8)
        m = {
            None: None,
            "per-batch": torch.rand(b, 1, n, t) > 0.3,
            "per-head": torch.rand(b, h, n, t) > 0.3,
            "additive": torch.randn(1, 1, n, t),
            "2-d": torch.rand(n, t) > 0.3,
        }[mask]
        if m is not None and m.dtype == torch.bool:
            m[..., 0] = True  # every row reads a slot
        kk, vv = k.repeat_interleave(h // hk, 1), v.repeat_interleave(h // hk, 1)
        s = q @ kk.transpose(-1, -2) / 4
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        if causal:
            s = s.masked_fill(~torch.ones(n, t, dtype=torch.bool).tril(), float("-inf"))
        if m is not None:
            s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m
        ref = torch.softmax(s, -1) @ vv
        got = _grouped(q, k, v, m, 0.0, causal, None, softcap)
        assert float((got - ref).abs().max()) <= 1e-5
