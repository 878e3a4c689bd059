"""Passes compose: residual schemes nest (AltUp's layers hold DDL updates, in both orders), every
analysis-based pass runs after DDL, AltUp and sdnc (the structure analysis reads a scheme's
updates as the residual sites they replaced), and what the math does not allow is refused by
`Pipeline.parse` before any model loads.

The five pipelines of the composition issue run on every zoo model: exact (fp64
certificate; a post-LN model refuses add-layers, with the reason), exported to ONNX within
the criterion, and saved and reloaded. The default run keeps a few of each; `make test-all`
runs them all."""

import pytest
import torch

from archfx.ir import PassError, capture
from archfx.ir.lower import to_onnx
from archfx.ir.verify import certify
from archfx.passes import Pipeline
from archfx.passes.io.artifact import load, save

from .helpers import ZOO, captured, diagonal, model

NAMED = [
    "altup(k=2),ddl(dv=1,value=compat)",
    "ddl(dv=4,value=compat),altup(k=2)",
    "ddl(dv=1,value=compat),expand-mlp(factor=2),add-heads(n=2),add-layers(n=1)",
    "altup(k=2),expand-hidden(factor=2)",
    "sdnc,expand-mlp(factor=2),altup(k=2),ddl(dv=1,value=compat)",
]
POST_LN = {"tiny-bert", "tiny-roberta", "tiny-distilbert", "tiny-bart"}
FAST = {("tiny-llama", 0), ("tiny-gpt2", 1), ("tiny-t5", 2), ("nanogpt", 4)}


def _cases():
    out = []
    for name in ZOO:
        for i, text in enumerate(NAMED):
            marks = () if (name, i) in FAST else (pytest.mark.slow,)
            out.append(pytest.param(name, text, marks=marks, id=f"{name}-{i}"))
    return out


@pytest.mark.parametrize(("name", "text"), _cases())
def test_named_pipelines_are_exact_on_every_zoo_model(name, text):
    graph = captured(name)
    if "add-layers" in text and name in POST_LN:  # a fact of the model, named by the pass
        with pytest.raises(PassError, match="post-LN"):
            Pipeline.parse(text).run(graph)
        return
    result = Pipeline.parse(text).run(graph)
    assert all(r.preserves and r.certificate.max_abs_diff <= 1e-5 for r in result.records), [
        (str(r.name), r.certificate) for r in result.records
    ]
    again = result.graph.structure  # still recognised: the next pass can follow
    assert len(again.blocks) >= len(graph.structure.blocks)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("tiny-llama", NAMED[0]),
        *(  # every zoo model, except the post-LN refusals the test above checks
            pytest.param(name, text, marks=pytest.mark.slow)
            for name in ZOO
            for text in NAMED
            if (name, text) != ("tiny-llama", NAMED[0])
            and not ("add-layers" in text and name in POST_LN)
        ),
    ],
)
def test_named_pipelines_export_to_onnx_and_reload(tmp_path, name, text):
    m = model(name)
    out = Pipeline.parse(text).run(capture(m)).graph
    assert to_onnx(out, tmp_path / "m.onnx").max_abs_diff <= 1e-4
    path = save(
        out, tmp_path / "saved", source={"kind": "builtin", "name": name}, pipeline=text, model=m
    )
    assert certify(out, load(path), tolerance=0.0).max_abs_diff == 0.0


@pytest.mark.slow
def test_a_new_ddl_layer_exports_to_onnx(tmp_path):
    """A new DDL layer's h is 0, so its k = h / sqrt(‖h‖² + ε²) rests on ε² = 1e-10, which
    onnxscript's no-op rules took for zero (x + c with |c| < 1e-8): the export gave 0 · ∞."""
    out = Pipeline.parse("ddl(dv=1,value=compat),add-layers(n=1)").run(captured("tiny-llama"))
    assert to_onnx(out.graph, tmp_path / "m.onnx").max_abs_diff <= 1e-4


def _sites(graph) -> list[tuple]:
    return [
        (r.kind, r.placement, r.attention is not None, r.mlp is not None)
        for b in graph.structure.blocks
        for r in b.residuals
    ]


@pytest.mark.parametrize(
    ("text", "name"),
    diagonal(
        ["ddl(dv=1)", "ddl(dv=3)", "altup(k=2),ddl(dv=1)", "ddl(dv=2),altup(k=3)"],
        ["tiny-llama", "tiny-gpt2", "tiny-t5", "tiny-gpt-neox"],
    ),
)
def test_the_structure_survives_the_schemes(text, name):
    """The analysis finds the same blocks and sites after the schemes, each DDL site's
    residual add being its delta-rule update."""
    graph = captured(name)
    out = Pipeline.parse(text).run(graph, verify=False).graph
    assert _sites(out) == _sites(graph)
    updates = {n for n in out.gm.graph.nodes if "archfx_site" in n.meta}
    assert {r.add for b in out.structure.blocks for r in b.residuals} == updates


def test_altup_layers_hold_ddl_updates_and_both_train():
    """altup(k=2),ddl: every site of every layer is a DDL update inside AltUp's block; the K
    blocks are identical at init; λ (DDL) and P, g (AltUp) get gradients."""
    graph = captured("tiny-llama")
    out = Pipeline.parse("altup(k=2),ddl(dv=1,value=compat)").run(graph).graph
    params = dict(out.gm.named_parameters())
    sites = sum(len(b.residuals) for b in graph.structure.blocks)
    assert sum(n.endswith(".lam") for n in params) == sites
    assert sum(n.endswith(".predict") for n in params) == len(graph.structure.blocks)
    states = [
        n
        for n in out.gm.graph.nodes
        if n.meta.get("archfx_scheme") == "altup" and "archfx_state" in n.meta
    ]
    for s in out.probe(states):
        assert torch.equal(s[0], s[1])
    (out(*out.inputs.tensors)[0] ** 2).mean().backward()
    for suffix in (".lam", ".predict", ".correct"):
        grads = [p.grad for n, p in params.items() if n.endswith(suffix)]
        assert grads and all(g is not None and bool(g.abs().sum() > 0) for g in grads), suffix


@pytest.mark.parametrize(
    "text",
    ["ddl(dv=1,value=compat),add-layers(n=2)", "ddl(dv=3,value=compat),add-layers(n=2,at=0)"],
)
def test_inserted_layers_own_their_scheme_parameters(text):
    """add-layers after ddl: the copy's DDL gates are new parameters (not the neighbour's,
    tied), its update is read as a site of the new block, and the model is exact — also
    inserted before the first block, whose state read runs after the rotary tables."""
    graph = captured("tiny-llama")
    result = Pipeline.parse(text).run(graph)
    out = result.graph
    assert result.records[-1].certificate.max_abs_diff == 0.0
    assert len(out.structure.blocks) == len(graph.structure.blocks) + 2
    lams = [p for n, p in out.gm.named_parameters() if n.endswith(".lam")]
    assert len(lams) == 2 * len(out.structure.blocks)
    assert len({id(p) for p in lams}) == len(lams)  # every layer's own


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("altup(k=2)", marks=pytest.mark.slow),
        "altup(k=3,coefficients=router)",
        "altup(k=2),ddl(dv=1,value=compat)",
        pytest.param("ddl(dv=3,value=compat),altup(k=2)", marks=pytest.mark.slow),
    ],
)
def test_inserted_layers_after_altup_are_altup_layers_started_at_the_identity(text):
    """add-layers after altup, on a model whose scheme parameters have moved (as in training):
    every inserted block is an AltUp layer of its own, its predict and correct coefficients at
    their initial (identity) values, not its trained neighbour's; the model is exact; a second
    add-layers copies a copy and still gives it its own coefficients."""
    graph = Pipeline.parse(text).run(captured("tiny-llama")).graph
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in graph.gm.named_parameters():
            if name.startswith(("altup.", "ddl.")):
                p.add_(0.1 * torch.randn_like(p))
    result = Pipeline.parse("add-layers(n=2,at=1),add-layers(n=1,at=1)").run(graph)
    assert all(r.certificate.ok for r in result.records), [r.certificate for r in result.records]
    out = result.graph
    coefficients = {
        n: p for n, p in out.gm.named_parameters() if n.endswith((".predict", ".correct"))
    }
    assert (
        len(coefficients) == 2 * len(out.structure.blocks) == 2 * (len(graph.structure.blocks) + 3)
    )
    assert len({id(p) for p in coefficients.values()}) == len(coefficients)
    before = dict(graph.gm.named_parameters())
    for name, p in coefficients.items():
        if name in before:
            assert torch.equal(p, before[name]), name  # the trained layers keep theirs
            continue
        static = "router" not in text
        start = {
            ".predict": torch.eye(p.shape[0]) if static else torch.zeros_like(p),
            ".correct": torch.ones_like(p) if static else torch.zeros_like(p),
        }[name[name.rindex(".") :]]
        assert torch.equal(p.detach(), start.to(p)), name


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("altup(k=2),ddl(dv=4)", "apply the site scheme before altup"),
        ("ddl,ddl(dv=2)", "ddl before it leaves none"),
        ("altup(k=2),sdnc,altup(k=2)", "altup\\(k=2\\) before it leaves none"),
    ],
)
def test_what_the_math_does_not_allow_is_refused_when_parsed(text, why):
    with pytest.raises(PassError, match=why):
        Pipeline.parse(text)
