"""altup: exact at init everywhere, replicated blocks, K = 1 identity, gradients, training."""

import pytest
import torch

from archfx.ir import PassError
from archfx.ir.verify import certify
from archfx.passes import Pipeline

from .helpers import EVERY_SAMPLED, ZOO, byte_gpt, captured, sampled, train

ACCEPTANCE = ["altup(k=2)", "altup(k=4,schedule=same)", "altup(k=4,coefficients=router)"]


def states(graph):
    nodes = [n for n in graph.gm.graph.nodes if "archfx_state" in n.meta]
    return nodes, graph.probe(nodes)


@pytest.mark.parametrize("name", EVERY_SAMPLED)
def test_exact_at_init_with_replicated_blocks(name):
    graph = captured(name)
    for text in ACCEPTANCE:
        result = Pipeline.parse(text).run(graph)
        cert = result.records[-1].certificate
        assert cert.max_abs_diff <= 1e-5 and len(cert.input_sets) == 2, (text, cert)
        nodes, values = states(result.graph)
        assert len(nodes) == len(graph.structure.blocks)
        for v in values:
            assert all(torch.equal(v[0], v[i]) for i in range(1, v.shape[0])), text
        assert len(result.graph.structure.blocks) == len(graph.structure.blocks)  # still analysable


# the headline claims in every run (make test): one pipeline on the real SmolLM2, one compile;
# the rest under make test-all
HEADLINE = [ACCEPTANCE[0], *(pytest.param(t, marks=pytest.mark.slow) for t in ACCEPTANCE[1:])]


@pytest.fixture(scope="module")
def smollm2():
    return captured("smollm2")


@pytest.mark.parametrize("text", HEADLINE)
def test_exact_on_smollm2(smollm2, text):
    """The real pretrained SmolLM2 (30 layers, GQA, RoPE, tied): exact in fp64, and in fp32."""
    cert = Pipeline.parse(text).run(smollm2).records[-1].certificate
    assert cert.ok and cert.precision == "float64" and cert.math_diff <= 1e-9, cert
    assert cert.max_abs_diff <= 1e-5 and len(cert.input_sets) == 2


@pytest.mark.parametrize(
    "name", ["tiny-llama", pytest.param("tiny-t5", marks=pytest.mark.slow), "tiny-bert"]
)
def test_k1_is_the_identity(name):
    graph = captured(name)
    out = Pipeline.parse("altup(k=1)").run(graph).graph
    assert certify(graph, out, tolerance=0.0).max_abs_diff == 0.0


@pytest.mark.parametrize("name", sampled(ZOO, ("tiny-gpt2", "tiny-t5")))
def test_onnx(tmp_path, name):
    from archfx.ir.lower import to_onnx

    graph = captured(name)
    for i, text in enumerate(ACCEPTANCE if name == "tiny-llama" else ACCEPTANCE[:1]):
        out = Pipeline.parse(text).run(graph).graph
        assert to_onnx(out, tmp_path / f"m{i}.onnx").max_abs_diff <= 1e-4


@pytest.mark.parametrize("text", HEADLINE)
def test_torch_compile(text):
    from archfx.ir.lower import compile_graph

    out = Pipeline.parse(text).run(captured("tiny-llama")).graph
    assert compile_graph(out).max_abs_diff <= 1e-5


def _grads(graph, prefix="altup."):
    graph.gm.zero_grad()
    logits = graph(*graph.inputs.tensors)[0]
    (logits.float() ** 2).mean().backward()
    return {n: p.grad for n, p in graph.gm.named_parameters() if n.startswith(prefix)}


def test_static_coefficients_get_gradients():
    out = Pipeline.parse("altup(k=2)").run(captured("tiny-llama")).graph
    grads = _grads(out)
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_router_weights_get_gradients():
    out = Pipeline.parse("altup(k=4,coefficients=router)").run(captured("tiny-llama")).graph
    grads = _grads(out)
    predict = {n: g for n, g in grads.items() if n.endswith((".predict", ".correct"))}
    assert predict and all(g.abs().sum() > 0 for g in predict.values())
    # W_r feeds only through W_p and W_c, which start at zero: its gradient appears after one step
    with torch.no_grad():
        for n, p in out.gm.named_parameters():
            if n in grads and grads[n] is not None:
                p -= 0.1 * grads[n]
    routers = {n: g for n, g in _grads(out).items() if n.endswith(".router")}
    assert routers and all(g.abs().sum() > 0 for g in routers.values())


def test_training_on_shakespeare_diverges_the_blocks():
    graph = byte_gpt("altup(k=2)")
    losses = train(graph, steps=40)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    _, values = states(graph)
    assert all((v[0] - v[1]).abs().max() > 1e-3 for v in values)


def test_bad_options_and_order():
    graph = captured("tiny-gpt2")
    with pytest.raises(PassError, match="active=2 must be < k=2"):
        Pipeline.parse("altup(k=2,schedule=same,active=2)").run(graph)
    with pytest.raises(PassError, match="already run inside a block scheme"):  # before any model
        Pipeline.parse("altup(k=2),altup(k=2)")
    with pytest.raises(PassError, match="readout=sum is exact only before a final norm"):
        Pipeline.parse("altup(k=2,readout=sum)").run(captured("tiny-bert"))


def test_readout_sum_rescales_the_final_norm():
    graph = captured("tiny-llama")
    out = Pipeline.parse("altup(k=4,readout=sum)").run(graph)
    assert out.records[-1].certificate.max_abs_diff <= 1e-5
