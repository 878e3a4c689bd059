"""ddl: exact compat mode everywhere, the delta-rule oracles (docs/passes.md, ddl), training,
precision."""

import pytest
import torch

from archfx.ir import capture
from archfx.passes import Pipeline

from .helpers import EVERY_SAMPLED, ZOO, byte_gpt, captured, model, sampled, train

EXACT = ["ddl(dv=1,value=compat)", "ddl(dv=4,value=compat)"]


def writes(graph):
    return [n for n in graph.gm.graph.nodes if "archfx_ddl" in n.meta]


@pytest.mark.parametrize("name", EVERY_SAMPLED)
def test_compat_is_exact_at_init(name):
    graph = captured(name)
    for text in EXACT:
        result = Pipeline.parse(text).run(graph)
        cert = result.records[-1].certificate
        assert cert.max_abs_diff <= 1e-5 and len(cert.input_sets) == 2, (text, cert)
        sites = sum(len(b.residuals) for b in graph.structure.blocks)
        assert result.records[-1].details["sites"] == sites


@pytest.mark.slow
def test_compat_exact_on_smollm2():
    graph = captured("smollm2")
    for text in EXACT:
        assert Pipeline.parse(text).run(graph).records[-1].certificate.max_abs_diff <= 1e-5


@pytest.mark.parametrize("name", sampled(ZOO, ("tiny-llama",)))
def test_onnx_dv1(tmp_path, name):
    from archfx.ir.lower import to_onnx

    out = Pipeline.parse(EXACT[0]).run(captured(name)).graph
    assert to_onnx(out, tmp_path / "m.onnx").max_abs_diff <= 1e-4


@pytest.mark.parametrize("dv", [1, 4])
def test_error_along_k_shrinks_by_one_minus_beta(dv):
    out = Pipeline.parse(f"ddl(dv={dv},value=paper,beta0=0.7)").run(captured("tiny-llama")).graph
    nodes = writes(out)
    metas = [n.meta["archfx_ddl"] for n in nodes]
    flat = [x for m in metas for x in (m["k"], m["beta"], m["v"], m["state_in"])]
    values = out.probe(flat + nodes)
    for i, _ in enumerate(metas):
        k, beta, v, x_in = values[4 * i : 4 * i + 4]
        x_out = values[4 * len(metas) + i].float()
        x_in = x_in.float()
        if dv > 1:  # channels lead the state; v's channels are last
            v = v.movedim(-1, 0).unsqueeze(-1)
            k, beta = k.unsqueeze(0), beta.unsqueeze(0)
        else:
            v = v  # [*tok, 1]
        before = v - (k * x_in).sum(-1, keepdim=True)
        after = v - (k * x_out).sum(-1, keepdim=True)
        kk = (k * k).sum(-1, keepdim=True)
        torch.testing.assert_close(after, (1 - beta * kk) * before, atol=2e-4, rtol=1e-3)
        assert torch.allclose(kk, torch.ones_like(kk), atol=1e-3)  # ‖k‖ ≈ 1
        assert bool(((beta > 0) & (beta < 2)).all())
        torch.testing.assert_close(beta, torch.full_like(beta, 0.7))  # β0 at init


def test_channels_identical_at_init():
    out = Pipeline.parse("ddl(dv=4,value=compat)").run(captured("tiny-llama")).graph
    states = [n for n in out.gm.graph.nodes if "archfx_state" in n.meta]
    for x in out.probe(states):
        assert x.shape[0] == 4 and all(torch.equal(x[0], x[j]) for j in range(1, 4))


def test_expanded_variants_are_exact():
    graph = captured("tiny-llama")
    for text in ["ddl(dv=4,compressor=tc)", "ddl(dv=3,ec=true)", "ddl(dv=2,compressor=tc,ec=true)"]:
        assert Pipeline.parse(text).run(graph).records[-1].certificate.max_abs_diff <= 1e-5, text


def test_lambda_gets_gradient():
    out = Pipeline.parse("ddl(dv=1,value=compat)").run(captured("tiny-llama")).graph
    logits = out(*out.inputs.tensors)[0]
    (logits**2).mean().backward()
    lams = {n: p.grad for n, p in out.gm.named_parameters() if n.endswith(".lam")}
    assert len(lams) == 4 and all(g is not None and g.abs().sum() > 0 for g in lams.values())


def test_paper_and_code_modes_say_they_change_the_function():
    graph = captured("tiny-gpt2")
    for text in ["ddl(value=paper)", "ddl(dv=4,value=code)"]:
        record = Pipeline.parse(text).run(graph).records[-1]
        assert (
            record.certificate is None and not record.preserves and record.details["exact"] is False
        )


@pytest.mark.parametrize("dv", [1, 4])
def test_paper_mode_trains_on_shakespeare(dv):
    graph = byte_gpt(f"ddl(dv={dv},value=paper)")
    losses = train(graph, steps=40)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses


def test_fp32_accumulation_in_bf16_models():
    graph = capture(model("tiny-llama").to(torch.bfloat16))
    out = Pipeline.parse("ddl(dv=2,value=paper)").run(graph).graph
    meta = writes(out)[0].meta["archfx_ddl"]
    k, beta = out.probe([meta["k"], meta["beta"]])
    assert k.dtype == beta.dtype == torch.float32
    assert out.run()[0].dtype == torch.bfloat16
