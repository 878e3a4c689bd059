"""Property-based: random Transformer architectures — the hand-written `RandomArch`
(passes/io/zoo/random_arch.py: norm placement, norm kind, MHA/GQA, gated MLP, tying, biases,
positions all drawn independently) and random small Hugging Face configs (tests/random_configs.py)
— are captured; the recognised Structure must match what the config says; every
function-preserving pass that applies, and random short pipelines of them, must stay exact
(certificate ok, and the rewritten graph equals the original nn.Module on fresh inputs of
another shape within 1e-5 relative); where archfx refuses, the refusal must be one the rules
below predict, raised as a PassError with a one-line reason — never a crash, never a wrong
result.

Examples per test: the hypothesis profile (tests/conftest.py): `ci` by default (a few per test,
the file in about a minute on one core); `HYPOTHESIS_PROFILE=long` for hundreds.
"""

import functools
import re

import torch
from hypothesis import Phase, given, note, settings
from hypothesis import strategies as st

from archfx.ir import AnalysisError, ArchfxError, PassError, capture
from archfx.passes import REGISTRY, Pipeline
from archfx.passes.io.zoo.random_arch import (
    KV_REPEATS,
    NORMS,
    PLACEMENTS,
    POSITIONS,
    ArchConfig,
    build_random,
)

from .helpers import ZOO, captured
from .random_configs import random_hf

# -- drawing architectures -----------------------------------------------------------------


@st.composite
def arch_configs(draw) -> ArchConfig:
    kv = draw(st.sampled_from([1, 2, 3]))
    head_dim = draw(st.sampled_from([4, 8, 16]))
    positions = draw(st.sampled_from(POSITIONS))
    rotary = None
    if positions == "rope" and head_dim > 4 and draw(st.booleans()):
        rotary = head_dim // 2
    return ArchConfig(
        hidden=draw(st.sampled_from([16, 24, 32])),
        layers=draw(st.integers(1, 3)),
        heads=kv * draw(st.integers(1, 3)),
        kv_heads=kv,
        head_dim=head_dim,
        mlp_hidden=draw(st.sampled_from([16, 40])),
        placement=draw(st.sampled_from(PLACEMENTS)),
        norm=draw(st.sampled_from(NORMS)),
        gated=draw(st.booleans()),
        tied=draw(st.booleans()),
        bias=draw(st.booleans()),
        positions=positions,
        rotary_dim=rotary,
        fused_qkv=draw(st.booleans()),
        kv_repeat=draw(st.sampled_from(KV_REPEATS)),
    )


@functools.lru_cache(maxsize=8)
def captured_arch(config: ArchConfig):
    model = build_random(config)
    return model, capture(model)


# -- what the config says ------------------------------------------------------------------


def arch_expectation(c: ArchConfig) -> dict:
    return dict(
        blocks=c.layers,
        hidden=c.hidden,
        heads=c.heads,
        kv=c.kv_heads,
        head_dim=c.head_dim,
        mlp=c.mlp_hidden,
        gated=c.gated,
        activation="silu" if c.gated else "gelu",
        tied=c.tied,
        placement=c.placement,
        norm="layernorm" if c.norm == "layernorm" else "rmsnorm",
        gain="1+w" if c.norm == "rmsnorm-1p" else "w",
        rope=c.positions == "rope",
        rotary_dim=(c.rotary_dim or c.head_dim) if c.positions == "rope" else None,
        qk_norm=False,
        fused_qkv=c.fused_qkv,
        final_norm=c.placement != "post",
        embeddings=["token", "position"] if c.positions == "learned" else ["token"],
    )


def check_structure(graph, exp: dict) -> None:
    s = graph.structure
    j = s.to_json()
    assert j["remarks"] == []
    assert len(s.stacks) == 1 and len(s.blocks) == exp["blocks"]
    assert s.hidden_size == exp["hidden"]
    kinds = ["parallel"] if exp["placement"] == "parallel" else ["attention", "mlp"]
    for b in j["blocks"]:
        att, mlp = b["attention"], b["mlp"]
        assert [r["kind"] for r in b["residuals"]] == kinds, b["path"]
        for r in b["residuals"]:
            assert r["placement"] == exp["placement"], (b["path"], r)
            assert (r["norm"]["kind"], r["norm"]["gain"]) == (exp["norm"], exp["gain"]), r
        got = (att["heads"], att["kv_heads"], att["head_dim"], att["rope"], att["qk_norm"])
        assert got == (exp["heads"], exp["kv"], exp["head_dim"], exp["rope"], exp["qk_norm"])
        assert (mlp["hidden"], mlp["gated"]) == (exp["mlp"], exp["gated"]), b["path"]
        for key in ("rotary_dim", "fused_qkv"):
            if key in exp:
                assert att[key] == exp[key], (b["path"], key)
        if "activation" in exp:
            assert mlp["activation"] == exp["activation"]
    assert s.head is not None and s.head.tied == exp["tied"]
    if "final_norm" in exp:
        final = s.stacks[0].final_norm
        assert (final is not None) == exp["final_norm"]
        if final is not None:
            assert final.kind == exp["norm"]
    if "embeddings" in exp:
        assert [e.kind for e in s.embeddings] == exp["embeddings"]


# -- which passes apply, and which refusals are expected -----------------------------------

# Facts of one architecture, predicted from its config so that a refusal the model does not
# explain fails the test: (predicate on (expectation, pipeline so far, this pass), the reason
# the pass gives). No ordering rule lives here: orders no model allows are the passes'
# declared contracts, refused by Pipeline.parse before a model loads.
MODEL_FACTS = [
    # Norm(x + 0) ≠ x, so an inserted post-LN block cannot start as the identity
    (lambda e, before, p: p.startswith("add-layers") and e["placement"] == "post", r"post-LN"),
    # EXCLUDED (limitation found by this test, not a wrong result): GPT-NeoX and Phi with a
    # rotary fraction of 1.0 slice the head dim into a rotary part and an *empty* pass-through
    # part and concatenate them back; expand-qk cannot follow that layout and refuses
    # (minimal example: tests/test_growth.py::test_neox_full_rotary_expand_qk_is_refused).
    (
        lambda e, before, p: p.startswith("expand-qk") and e.get("full_rotary_slice"),
        r"laid out in a way archfx cannot grow",
    ),
    # LayerNorm-based qk-norm (Phi's qk_layernorm) reads the query/key dimension: zero
    # padding shifts its mean (docs/passes.md, Growth); duplication is not offered for q/k
    (
        lambda e, before, p: (
            p.startswith("expand-qk") and e["qk_norm"] and e["norm"] == "layernorm"
        ),
        r"LayerNorm subtracts the mean",
    ),
    # DDL sums over the stream (‖h‖², w_β·c, kᵀX); on LayerNorm models expand-hidden duplicates
    # the features, which changes those sums (exact only while λ = 1), so it refuses
    (
        lambda e, before, p: (
            p.startswith("expand-hidden")
            and e["norm"] == "layernorm"
            and any(b.startswith("ddl") for b in before)
        ),
        r"a sum, max or softmax over duplicated features is not preserved",
    ),
    # ResiDual starts from a post-LN stream; a pre-LN one already is its accumulator
    (lambda e, before, p: p.startswith("resi-dual") and e["placement"] != "post", r"not post-LN"),
    # a sum of n streams is absorbed by a final norm's eps; post-LN stacks end without one
    (
        lambda e, before, p: (
            p.startswith("hc")
            and "readout=sum" in p
            and "n=1" not in p
            and e["placement"] == "post"
        ),
        r"readout=sum is exact only before a final norm",
    ),
]


def expected_refusal(exp: dict, before: list[str], text: str) -> str | None:
    for rule, reason in MODEL_FACTS:
        if rule(exp, before, text):
            return reason
    return None


def pass_texts(exp: dict) -> dict[str, st.SearchStrategy[str]]:
    """Per function-preserving pass, its options drawn within what the architecture admits."""
    h, kv, dqk = exp["heads"], exp["kv"], exp["head_dim"]
    r = h // kv
    # GQA: per-group (multiple of the groups) or whole groups (multiple of queries per group)
    head_ns = st.integers(1, 3) if h == kv else st.sampled_from([kv, r, 2 * kv])
    return {
        "canonicalize": st.just("canonicalize"),
        "altup": st.builds(
            "altup(k={},schedule={},coefficients={})".format,
            st.integers(1, 3),
            st.sampled_from(["alternating", "same"]),
            st.sampled_from(["static", "router"]),
        ),
        "ddl": st.builds(
            "ddl(dv={},compressor={})".format, st.integers(1, 3), st.sampled_from(["cc", "tc"])
        ),
        "expand-mlp": st.builds("expand-mlp(factor={})".format, st.integers(2, 3)),
        "add-heads": head_ns.map("add-heads(n={})".format),
        "expand-head-dim": st.integers(1, 8).map(lambda j: f"expand-head-dim(size={dqk + j})"),
        "expand-qk": st.integers(1, 4).map(lambda j: f"expand-qk(size={dqk + 2 * j})"),
        "expand-hidden": st.builds("expand-hidden(factor={})".format, st.integers(2, 3)),
        "add-layers": st.builds(
            "add-layers(n={},at={})".format, st.integers(1, 2), st.integers(-1, exp["blocks"])
        ),
        "sdnc": st.just("sdnc"),
        "hc": st.builds(
            "hc(n={},dynamic={},readout={})".format,
            st.integers(1, 3),
            st.sampled_from(["true", "false"]),
            st.sampled_from(["mean", "sum"]),
        ),
        "mhc": st.builds(
            "mhc(n={},pre={})".format,
            st.integers(2, 3),
            st.sampled_from(["uniform", "alternating"]),
        ),
        "resi-dual": st.just("resi-dual"),
    }


def test_every_pass_is_drawn():
    """pass_texts covers every registered pass (with its default options, or the exact ones:
    `exact_when`)."""
    assert set(pass_texts(dict(heads=2, kv=1, head_dim=8, blocks=2))) == set(REGISTRY)


def crashed(exc: BaseException) -> bool:
    """A bug, not a refusal: the pipeline wraps a pass's unexpected exception in a PassError
    whose cause is not an archfx error."""
    return exc.__cause__ is not None and not isinstance(exc.__cause__, ArchfxError)


def fresh_inputs(graph, batch=3, seq=5):
    gen = torch.Generator().manual_seed(7)
    ids = graph.inputs.tensors[0]
    return torch.randint(0, int(ids.max()) + 1, (batch, seq), generator=gen)


def run_and_check(model, graph, exp: dict, texts: list[str]) -> None:
    """Run `texts` as one pipeline: refused by `Pipeline.parse` (an order no model allows, by
    a rule the passes declare), or exact, or refused where (and as) MODEL_FACTS predicts (what
    this model does not allow)."""
    text = ",".join(texts)
    note(f"pipeline: {text}")
    try:
        Pipeline.parse(text)
    except PassError as exc:
        assert re.search(
            r"needs .* before it leaves none|is smaller than|apply the site scheme before", str(exc)
        ), str(exc)
        return
    expected = next(
        (
            reason
            for i, t in enumerate(texts)
            if (reason := expected_refusal(exp, texts[:i], t)) is not None
        ),
        None,
    )
    try:
        result = Pipeline.parse(text).run(graph)
    except ArchfxError as exc:  # a refusal: a pass's, or the analysis' a pass asked for
        assert isinstance(exc, (PassError, AnalysisError)), f"{text}: {type(exc).__name__}: {exc}"
        assert not crashed(exc), f"{text}: crashed: {exc}"
        assert str(exc) and "\n" not in str(exc)
        assert expected is not None, f"{text}: unexpected refusal: {exc}"
        assert re.search(expected, str(exc)), f"{text}: refused for another reason: {exc}"
        return
    assert expected is None, f"{text}: should have been refused ({expected})"
    assert all(r.preserves and r.certificate.ok for r in result.records), text
    if model is None:  # the certificates only (inputs other than token ids)
        return
    x = fresh_inputs(graph)
    with torch.no_grad():
        want = model(x)
        want = want.logits if hasattr(want, "logits") else want
        got = result.graph(x)[0]
    assert got.shape == want.shape
    scale = max(1.0, float(want.abs().max()))
    assert float((got - want).abs().max()) <= 1e-5 * scale, text


# -- the properties ------------------------------------------------------------------------


@given(arch_configs(), st.data())
def test_random_arch_structure_and_every_pass(config, data):
    """RandomArch: the Structure is what the config says; every preserving pass, with options
    drawn, is exact (or refused exactly where MODEL_FACTS predicts)."""
    model, graph = captured_arch(config)
    exp = arch_expectation(config)
    check_structure(graph, exp)
    for name, texts in pass_texts(exp).items():
        run_and_check(model, graph, exp, [data.draw(texts, label=name)])


@given(arch_configs(), st.data())
def test_random_arch_random_pipelines(config, data):
    """RandomArch: random pipelines of 2–3 preserving passes compose exactly."""
    model, graph = captured_arch(config)
    exp = arch_expectation(config)
    texts = data.draw(st.lists(st.one_of(*pass_texts(exp).values()), min_size=2, max_size=3))
    run_and_check(model, graph, exp, texts)


@functools.lru_cache(maxsize=4)
def captured_hf(seed: int):
    import random

    desc, model, exp = random_hf(random.Random(seed))
    return desc, model, capture(model), exp


# no shrinking: the config comes from a seed, and rebuilding a model per shrink step is slow;
# the failure report names the seed, the config and the pipeline
@settings(phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(st.integers(0, 2**20), st.data())
def test_random_hf_configs(seed, data):
    """Random small Hugging Face configs (Llama, Mistral, Qwen2/3, Gemma 1/2, GPT-2, GPT-NeoX
    parallel or not, Phi): the Structure matches the config; random passes and pipelines of
    length 1–2 are exact or refused as predicted."""
    desc, model, graph, exp = captured_hf(seed)
    note(desc)
    check_structure(graph, exp)
    for _ in range(2):
        texts = data.draw(st.lists(st.one_of(*pass_texts(exp).values()), min_size=1, max_size=2))
        run_and_check(model, graph, exp, texts)


@functools.lru_cache(maxsize=4)
def captured_zoo(name: str):
    graph = captured(name)
    s = graph.structure
    first = s.blocks[0]
    att = first.attention
    norms = [r.norm.kind for r in first.residuals if r.norm is not None]
    exp = dict(
        placement=first.placement,
        norm=norms[0] if norms else None,
        heads=att.heads,
        kv=att.kv_heads,
        head_dim=att.head_dim,
        blocks=len(s.blocks),
        qk_norm=att.qk_norm,
        full_rotary_slice=False,
    )
    return graph, exp


@given(st.sampled_from(ZOO), st.data())
def test_zoo_random_pipelines(name, data):
    """Every zoo model: random pipelines of 2–4 passes drawn from the whole registry, in
    random order, are refused by `Pipeline.parse` with the rule's reason, or exact (every
    pass's fp64 certificate), or refused where MODEL_FACTS predicts a fact of the model."""
    graph, exp = captured_zoo(name)
    texts = data.draw(st.lists(st.one_of(*pass_texts(exp).values()), min_size=2, max_size=4))
    note(name)
    run_and_check(None, graph, exp, texts)
