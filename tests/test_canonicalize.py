"""canonicalize: exact on every model, one form for linear maps, input never mutated."""

import pytest
import torch

from archfx.ir import capture
from archfx.ir.ops import aten
from archfx.passes import Pipeline
from archfx.passes.io.zoo import build

from .families import build_family
from .helpers import EVERY_SAMPLED, captured


def run(model):
    graph = capture(model)
    result = Pipeline.parse("canonicalize").run(graph)
    return graph, result


def _projection_free(j):
    for b in j["blocks"]:
        for key in ("attention", "cross_attention", "mlp"):
            if b[key]:
                b[key].pop("projection")
        for r in b["residuals"]:
            for key in ("attention", "mlp"):
                r.get(key, {}).pop("projection", None)
    return j


@pytest.mark.parametrize("name", EVERY_SAMPLED)
def test_exact_and_structure_kept(name):
    model = build_family(name.split(":")[1]) if name.startswith("family:") else build(name)
    graph, result = run(model)
    cert = result.records[0].certificate
    assert cert.max_abs_diff <= 1e-5
    assert len(cert.input_sets) == 2, cert.notes  # example shape and a second shape
    assert _projection_free(result.graph.structure.to_json()) == _projection_free(
        graph.structure.to_json()
    )
    ops = {n.target for n in result.graph.gm.graph.nodes if n.op == "call_function"}
    assert not any("_assert" in str(t) for t in ops)
    assert aten.addmm.default not in ops  # Conv1D became linear
    assert aten.dropout.default not in ops


def test_gpt2_conv1d_becomes_linear_with_transposed_weight():
    model = build("tiny-gpt2")
    graph, result = run(model)
    w = dict(result.graph.gm.named_parameters())["transformer.h.0.mlp.c_fc.weight"]
    assert torch.equal(w, model.transformer.h[0].mlp.c_fc.weight.t())
    assert result.records[0].details["linear"] == 4 * model.config.n_layer
    assert all(b.attention.q.op == "linear" for b in result.graph.structure.blocks)


def test_input_model_and_graph_are_never_mutated():
    model = build("tiny-gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph, result = run(model)
    code = graph.gm.code
    with torch.no_grad():
        for p in result.graph.gm.parameters():
            p.add_(1.0)  # editing the result touches neither the graph nor the model
    assert graph.gm.code == code
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    ids = graph.inputs.tensors[0]
    assert torch.equal(graph.run()[0], model(ids).logits.detach())


def test_idempotent():
    graph = captured("tiny-llama")
    once = Pipeline.parse("canonicalize").run(graph).graph
    twice = Pipeline.parse("canonicalize").run(once)
    assert not twice.records[0].changed
    assert twice.graph.gm.code == once.gm.code
