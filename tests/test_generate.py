"""Generation with a key/value cache (passes/engines/decode.py, passes/io/generate.py): greedy tokens equal
transformers' `generate` on the original model, for every pipeline, both runtimes, prompts
alone and as one left-padded batch; at every step the logits with the cache equal the
original model's without it."""

import json

import pytest
import torch

from archfx.ir import PassError, capture
from archfx.passes import Pipeline
from archfx.passes.cli import main as cli
from archfx.passes.engines.decode import (
    MemoryStream,
    decode_form,
    is_decoder,
    last_position,
    one_token_sites,
)
from archfx.passes.io.generate import Session, generate, left_padded

from .helpers import captured, model, perturb_ddl

PIPELINES = [
    "canonicalize",
    "altup(k=2)",
    "ddl(dv=1,value=compat)",
    "sdnc",
    "expand-mlp(factor=2),add-layers(n=2)",
    "canonicalize,expand-hidden(factor=2),add-heads(n=2),expand-mlp(factor=2),add-layers(n=1),"
    "altup(k=2)",
]
FAMILIES = [
    "tiny-llama",
    "tiny-gpt2",
    "tiny-qwen2",
    "tiny-gemma",
    "tiny-phi",
    "tiny-gpt-neox",
    "family:gemma2",  # soft-capped scores: the explicit read (matmul, softmax, matmul)
]
PROMPTS = [[5, 17, 33, 2, 9], [44, 12, 7], [3, 3, 90, 100, 21, 8, 1]]
NEW = 32


def cases():
    """Every family × pipeline; a representative few in the default run."""
    default = {("tiny-llama", p) for p in PIPELINES[1:3]} | {
        ("tiny-llama", PIPELINES[-1]),
        ("tiny-gpt2", "altup(k=2)"),
    }
    return [
        (f, p) if (f, p) in default else pytest.param(f, p, marks=pytest.mark.slow)
        for f in FAMILIES
        for p in PIPELINES
    ]


def reference(m, prompts, new=NEW) -> list[list[int]]:
    """transformers' greedy `generate` on the original model, one left-padded batch, each
    sequence cut after its end-of-sequence token as archfx reports it."""
    ids, mask = left_padded(prompts, 0)
    with torch.no_grad():
        out = m.generate(
            ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0
        )
    eos = m.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or ())
    rows = out[:, ids.shape[1] :].tolist()
    return [row[: next((i + 1 for i, t in enumerate(row) if t in eos), len(row))] for row in rows]


def ours(graph, m, prompts, runtime=None, new=NEW):
    return generate(
        graph,
        prompts,
        max_new_tokens=new,
        runtime=runtime,
        eos_token_id=m.generation_config.eos_token_id,
        pad_token_id=0,
    ).new_tokens


def check_steps(session: Session, m, prompt, steps=8, tolerance=1e-4):
    """At every step the last position's logits with the cache (`session`: PyTorch or ONNX
    Runtime) equal the original model's on the whole sequence so far, within `tolerance` of
    their scale (fp32: 1e-4; ONNX Runtime: the ONNX criterion, 1e-3)."""
    step = session.stream()
    seq = torch.tensor([prompt])
    with torch.no_grad():
        logits = step(seq, torch.ones_like(seq))
        for _ in range(steps):
            ref = m(seq).logits[:, -1]
            diff = float((logits - ref).abs().max())
            assert diff <= tolerance * max(1.0, float(ref.abs().max())), (seq.shape, diff)
            token = ref.argmax(-1, keepdim=True)
            seq = torch.cat([seq, token], 1)
            logits = step(token, torch.ones_like(token))


@pytest.mark.parametrize(("family", "pipeline"), cases())
def test_greedy_tokens_equal_transformers_generate(family, pipeline):
    m = model(family).eval()
    graph = Pipeline.parse(pipeline).run(capture(m), verify=False).graph
    assert ours(graph, m, PROMPTS) == reference(m, PROMPTS)  # one padded batch
    session = Session(graph)  # the same decode form, built once for the other calls
    for p in PROMPTS:
        assert ours(session, m, [p]) == reference(m, [p])
    check_steps(session, m, PROMPTS[2])


@pytest.mark.parametrize(
    ("family", "pipeline"),
    [
        (f, p)
        if (f, p) == ("tiny-llama", "altup(k=2)")
        else pytest.param(f, p, marks=pytest.mark.slow)
        for f in FAMILIES[:3]
        for p in PIPELINES
    ],
)
def test_onnx_runtime_generates_the_same_tokens(family, pipeline, tmp_path):
    import onnx

    m = model(family).eval()
    graph = Pipeline.parse(pipeline).run(capture(m), verify=False).graph
    path = tmp_path / "decoder.onnx"
    session = Session(graph, "onnx", onnx=path)
    got = generate(
        session,
        PROMPTS,
        max_new_tokens=NEW,
        eos_token_id=m.generation_config.eos_token_id,
        pad_token_id=0,
    )
    assert got.runtime == "onnx" and got.new_tokens == reference(m, PROMPTS)
    for p in PROMPTS:
        assert ours(session, m, [p]) == reference(m, [p])
    check_steps(session, m, PROMPTS[2], tolerance=1e-3)
    proto = onnx.load(str(path), load_external_data=False).graph
    layers = len([i for i in proto.input if i.name.endswith(".key")])
    assert [i.name for i in proto.input] == [
        "input_ids",
        "attention_mask",
        "position_ids",
        *(f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")),
    ]
    assert [o.name for o in proto.output] == [
        "logits",
        *(f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")),
    ]
    past = proto.input[3].type.tensor_type.shape.dim
    assert past[2].dim_param and not past[2].dim_value  # the cached length is dynamic


@pytest.mark.parametrize(
    "pipeline", ["ddl(dv=1,value=compat)", pytest.param("altup(k=2)", marks=pytest.mark.slow)]
)
def test_compiled_decoding_generates_the_same_tokens(pipeline):
    """runtime="compile": torch.compile of the decode form (prefill, one-token steps, a cache
    that grows) gives transformers' tokens for a left-padded batch."""
    m = model("tiny-llama").eval()
    graph = Pipeline.parse(pipeline).run(capture(m), verify=False).graph
    session = Session(graph, "compile")
    got = generate(
        session, PROMPTS, max_new_tokens=NEW, eos_token_id=m.generation_config.eos_token_id
    )
    assert got.runtime == "compile" and got.new_tokens == reference(m, PROMPTS)


def test_smollm2_generates_transformers_tokens_after_altup():
    m = model("smollm2").eval()
    graph = Pipeline.parse("altup(k=2)").run(capture(m), verify=False).graph
    prompts = [[504, 3575, 282, 4649, 314], [1, 4093, 28, 2, 314, 2593], [504, 1978]]
    session = Session(graph)
    assert ours(session, m, prompts) == reference(m, prompts)
    check_steps(session, m, prompts[0], steps=4)


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", PIPELINES)
def test_smollm2_every_pipeline_both_runtimes(pipeline, tmp_path):
    # SmolLM2 has 3 key/value groups of 3 query heads: add-heads grows by whole multiples of 3
    pipeline = pipeline.replace("add-heads(n=2)", "add-heads(n=3)")
    m = model("smollm2").eval()
    graph = Pipeline.parse(pipeline).run(capture(m), verify=False).graph
    prompts = [[504, 3575, 282, 4649, 314], [1, 4093, 28, 2, 314, 2593], [504, 1978]]
    ref = reference(m, prompts)
    onnx = Session(graph, "onnx", onnx=tmp_path / "decoder.onnx")
    for session, tolerance in ((Session(graph), 1e-4), (onnx, 1e-3)):
        assert ours(session, m, prompts) == ref
        for p in prompts:
            assert ours(session, m, [p]) == reference(m, [p])
        check_steps(session, m, prompts[0], steps=4, tolerance=tolerance)


def test_hand_written_attention_decodes_like_the_whole_sequence():
    # nanoGPT (no transformers generate): greedy with the cache equals greedy re-running the
    # whole sequence through the original model
    m = model("nanogpt").eval()
    graph = capture(m)
    seq = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        for _ in range(12):
            out = m(seq)
            logits = out[0] if isinstance(out, tuple) else out
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert generate(graph, [PROMPTS[0]], max_new_tokens=12).new_tokens == [seq[0, 5:].tolist()]


@pytest.mark.parametrize(
    ("name", "pipeline"),
    [
        ("nanogpt", "ddl(dv=1,value=compat)"),
        ("tiny-llama", "altup(k=2),ddl(dv=1,value=compat)"),
        pytest.param("tiny-llama", "ddl(dv=4,value=compat),altup(k=2)", marks=pytest.mark.slow),
    ],
)
def test_nested_schemes_and_hand_written_attention_after_ddl_generate(name, pipeline):
    # the decode form finds the attention through the structure the schemes keep
    m = model(name).eval()
    rewritten = Pipeline.parse(pipeline).run(capture(m)).graph
    want = generate(capture(m), [PROMPTS[0]], max_new_tokens=8).new_tokens
    assert generate(rewritten, [PROMPTS[0]], max_new_tokens=8).new_tokens == want


@pytest.mark.parametrize(
    ("name", "pipeline", "why"),
    [
        ("tiny-bert", "canonicalize", "not exactly causal"),
        ("tiny-t5", "canonicalize", "one \\(batch, tokens\\) input"),
        ("tiny-llama", "sdnc(write=delta)", "not a key/value cache"),
    ],
)
def test_models_that_cannot_decode_are_refused_with_the_reason(name, pipeline, why):
    graph = Pipeline.parse(pipeline).run(captured(name)).graph
    with pytest.raises(PassError, match=why):
        decode_form(graph)


def test_sampling_options():
    graph = decode_form(captured("tiny-llama"))
    assert is_decoder(graph) and decode_form(graph) is graph
    sample = dict(max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9)
    a = generate(graph, PROMPTS, seed=1, **sample).new_tokens
    assert a == generate(graph, PROMPTS, seed=1, **sample).new_tokens  # seeded: reproducible
    assert a != generate(graph, PROMPTS, seed=2, **sample).new_tokens
    greedy = generate(graph, PROMPTS, max_new_tokens=12).new_tokens
    assert (
        generate(graph, PROMPTS, max_new_tokens=12, temperature=0.7, top_k=1).new_tokens == greedy
    )
    for bad, why in [
        (dict(top_k=5), "give a temperature"),
        (dict(temperature=0.0), "positive"),
        (dict(runtime="tpu"), "unknown runtime"),
        (dict(max_new_tokens=0), "at least 1"),
    ]:
        with pytest.raises(PassError, match=why):
            generate(graph, PROMPTS, **{"max_new_tokens": 4, **bad})
    with pytest.raises(PassError, match="at least one token"):
        generate(graph, [[1, 2], []])
    session = Session(graph)
    assert generate(session, PROMPTS, max_new_tokens=12).new_tokens == greedy
    with pytest.raises(PassError, match="runs on torch"):
        generate(session, PROMPTS, runtime="onnx")


def test_cli_generate_json_from_a_pipeline_and_from_a_saved_model(capsys, tmp_path):
    m = model("tiny-llama").eval()
    ids = "5,17,33,2,9;44,12,7"
    code = cli(["generate", "tiny-llama", "--pipeline", "altup(k=2)", "--input-ids", ids, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(out)
    assert data["new_tokens"] == reference(m, PROMPTS[:2])
    assert data["runtime"] == "torch" and data["prefill_seconds"] > 0
    assert data["decode_tokens_per_second"] > 0 and "text" not in data  # no tokenizer
    saved = tmp_path / "saved"
    assert cli(["apply", "tiny-llama", "--pipeline", "altup(k=2)", "--out", str(saved)]) == 0
    capsys.readouterr()
    code = cli(["generate", "tiny-llama", "--from", str(saved), "--input-ids", ids, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["new_tokens"] == data["new_tokens"]


@pytest.mark.parametrize(
    ("argv", "why"),
    [
        (["--prompt", "hello"], "no tokenizer: give --input-ids"),
        (["--input-ids", "1,x"], "comma-separated integers"),
        (["--input-ids", "1,2;"], "every sequence needs"),
        (["--input-ids", "1", "--pipeline", "nope"], "unknown pass"),
    ],
)
def test_cli_generate_errors(capsys, argv, why):
    code = cli(["generate", "tiny-llama", *argv])
    _, err = capsys.readouterr()
    assert code != 0 and why in err


@pytest.mark.slow
def test_cli_streams_smollm2_text(capsys):
    code = cli(
        ["generate", "smollm2", "--prompt", "The capital of France is", "--max-new-tokens", "8"]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Paris" in out and "decode" in err


@pytest.mark.parametrize(
    ("name", "why"),
    [
        (
            "xt-gqa-swiglu",
            "does not run on the example tokens",
        ),  # a reshape of its positions breaks
        ("litgpt-llama", "differs from the whole sequence"),  # positions from elsewhere
    ],
)
def test_third_party_models_outside_transformers_are_refused_not_crashed(name, why):
    from .thirdparty import THIRDPARTY

    built, example = THIRDPARTY[name].build()
    with pytest.raises(PassError, match=why):
        decode_form(capture(built, example))


@pytest.mark.parametrize("name", ["hf-mixtral", "hf-phi3"])
def test_held_out_hugging_face_families_decode(name):
    from .thirdparty import HF_HELD_OUT

    built, example = HF_HELD_OUT[name].build()
    graph = capture(built, example)
    m = built.eval()
    prompts = [[5, 17, 33, 2, 9], [44, 12, 7]]
    assert ours(graph, m, prompts, new=12) == reference(m, prompts, new=12)


@pytest.mark.parametrize("name", ["tiny-llama", "family:gemma2"])
def test_generation_projects_the_last_position_only(name):
    # the prefill projects one row per sequence onto the vocabulary (through Gemma 2's
    # soft-capping too), and that row is the decode form's last one
    graph = captured(name)
    form, session = decode_form(graph), Session(graph)
    tokens = torch.tensor([PROMPTS[2], PROMPTS[2][::-1]])
    mask = torch.ones_like(tokens)
    with torch.no_grad():
        whole = MemoryStream(form)(tokens, mask)[0]
        last = MemoryStream(session.decoder)(tokens, mask)[0]
    assert last.shape == (2, 1, whole.shape[-1])
    assert float((last - whole[:, -1:]).abs().max()) <= 1e-5 * float(whole.abs().max())


@pytest.mark.parametrize(
    ("name", "pipeline"),
    [
        ("tiny-llama", "ddl(dv=1,value=compat)"),
        ("tiny-gpt2", "altup(k=2)"),
        ("family:gemma2", "sdnc"),
    ],
)
def test_the_eager_form_calls_public_torch_functions_and_computes_the_same_bits(name, pipeline):
    """Session.eager runs the decode form with ops retargeted to their public torch functions
    (archfx.ir.ops.PUBLIC): the same kernels, so every call's outputs are bit-equal."""
    from archfx.ir.ops import PUBLIC

    session = Session(Pipeline.parse(pipeline).run(captured(name)).graph)
    targets = {n.target for n in session.eager.gm.graph.nodes if n.op == "call_function"}
    assert not targets & set(PUBLIC) and targets & set(PUBLIC.values())
    ours, theirs = MemoryStream(session.eager), MemoryStream(session.decoder)
    tokens = torch.tensor([PROMPTS[2], PROMPTS[2][::-1]])
    mask = torch.ones_like(tokens)
    with torch.no_grad():
        for _ in range(4):
            a, b = ours(tokens, mask), theirs(tokens, mask)
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
            tokens = a[0][:, -1:].argmax(-1)
            mask = torch.ones_like(tokens)


@pytest.mark.parametrize(
    "pipeline",
    [
        "ddl(dv=1,value=compat)",
        "ddl(value=paper,beta0=0.7)",
        "ddl(value=code)",
        "altup(k=2),ddl(dv=1,value=compat)",
        "ddl(dv=1,value=compat),expand-hidden(factor=2),add-layers(n=1)",
    ],
)
def test_one_token_kernels_compute_every_ddl_update_of_a_batch_one_step(pipeline):
    """Steps of one token of one sequence run Session.one_token: every d_v = 1 DDL update is a
    kernel in Python floats (passes/rewrites/ddl.py), whose steps give the general graph's
    logits, with gates, λ and value biases moved off their initial values so that every term
    of the update counts."""
    out = Pipeline.parse(pipeline).run(captured("tiny-llama")).graph
    perturb_ddl(out)
    session = Session(out)
    updates = sum("archfx_ddl" in n.meta for n in out.gm.graph.nodes)
    assert updates >= 4 and one_token_sites(session.one_token) == updates
    general, step = MemoryStream(session.eager), session.stream()
    tokens = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        ref, got = general(tokens)[0][:, -1], step(tokens, torch.ones_like(tokens))
        for _ in range(6):
            assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
            tokens = ref.argmax(-1, keepdim=True)
            ref, got = general(tokens)[0][:, -1], step(tokens, torch.ones_like(tokens))


def test_a_one_token_kernel_that_computes_something_else_is_refused(monkeypatch):
    from archfx.passes.engines import decode

    def wrong(node):  # the state, without the update
        return (torch.clone, (node.args[0],)) if "archfx_ddl" in node.meta else None

    monkeypatch.setattr(decode, "ONE_TOKEN", [wrong])
    out = Pipeline.parse("ddl(value=paper)").run(captured("tiny-llama")).graph
    with pytest.raises(PassError, match="one-token step by its kernels differs"):
        Session(out)
    assert Session(out, "compile").one_token is None  # compiled steps fuse the ops instead


def test_a_model_without_a_vocabulary_head_generates_every_position_and_says_so():
    from transformers import LlamaConfig, LlamaModel

    base = LlamaModel(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            use_cache=False,
        )
    ).eval()
    graph = capture(base, {"input_ids": torch.tensor([PROMPTS[0]])})
    with pytest.raises(PassError, match="does not end in a projection"):
        last_position(decode_form(graph))
    with pytest.warns(UserWarning, match="every position"):
        session = Session(graph)
    assert session.decoder.output_names[0] == "last_hidden_state"
