"""resi-dual: exact on every post-LN model, refused on the others with the reason, the
accumulator oracle with a trained LN_f, growth after it, the order rules, ONNX, safetensors."""

import pytest
import torch
import torch.nn.functional as F

from archfx.ir import PassError
from archfx.ir.verify import certify
from archfx.passes import Pipeline
from archfx.passes.io.artifact import load, save
from archfx.passes.io.zoo import build

from .helpers import EVERY_SAMPLED, byte_gpt, captured


@pytest.mark.parametrize("name", EVERY_SAMPLED)
def test_exact_on_post_ln_models_and_refused_on_the_others(name):
    graph = captured(name)
    placements = {r.placement for b in graph.structure.blocks for r in b.residuals}
    if placements != {"post"}:
        with pytest.raises(PassError, match="not post-LN: .*a pre-LN stream already is"):
            Pipeline.parse("resi-dual").run(graph)
        return
    result = Pipeline.parse("resi-dual").run(graph)
    cert = result.records[-1].certificate
    assert cert.ok and cert.math_diff == 0.0 and cert.max_abs_diff == 0.0, cert
    assert result.records[-1].details["sites"] == sum(
        len(b.residuals) for b in graph.structure.blocks
    )
    assert len(result.graph.structure.blocks) == len(graph.structure.blocks)


def trained_norm(name="tiny-bert", text="resi-dual"):
    """`text` applied and LN_f's gain and bias moved (as by training): the output now depends
    on the accumulator."""
    graph = captured(name)
    out = Pipeline.parse(text).run(graph).graph
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, p in out.gm.named_parameters():
            if key.startswith("resi_dual."):
                p.copy_(torch.randn(p.shape, generator=gen))
    return graph, out


def test_accumulator_oracle():
    """y = x_post + LN_f(x_acc), x_acc = the stream entering the first block + every
    sublayer's output, unnormalised; x_post the model's own post-LN stream."""
    graph, out = trained_norm()
    s = out.structure
    stack = s.stacks[0]
    branches = [r.branches[0] for b in s.blocks for r in b.residuals]
    probes = [s.blocks[0].input, stack.blocks[-1].output, stack.output, *branches]
    x0, post, y, *hs = out.probe(probes)
    acc = x0 + sum(hs)
    w, b = (out.tensor(f"resi_dual.s0.norm_{k}").detach() for k in ("weight", "bias"))
    want = post + F.layer_norm(acc, [acc.shape[-1]], w, b, eps=1e-12)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    # x_post is the original model's stream: the pass changed nothing else
    (orig,) = graph.probe([graph.structure.stacks[0].output])
    torch.testing.assert_close(post, orig, rtol=0, atol=0)


def test_ln_f_uses_the_models_norm_and_eps():
    out = Pipeline.parse("resi-dual").run(captured("tiny-bert")).graph
    norms = [n for n in out.gm.graph.nodes if n.meta.get("archfx_scheme") == "resi_dual"]
    ln = [n for n in norms if n.target == torch.ops.aten.layer_norm.default]
    post = out.structure.blocks[0].residuals[0].post_norm
    assert len(ln) == 1 and ln[0].args[4] == post.eps


@pytest.mark.parametrize("grow", ["expand-hidden(factor=2)", "expand-mlp(factor=2),add-heads(n=2)"])
def test_growth_after_a_trained_resi_dual_is_exact(grow):
    _, out = trained_norm()
    for rec in Pipeline.parse(grow).run(out).records:
        assert rec.certificate.ok and rec.certificate.math_diff <= 1e-9, (grow, rec.certificate)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("resi-dual,altup(k=2)", "runs beside the stream"),
        ("altup(k=2),resi-dual", "block scheme"),
        ("ddl,resi-dual", "one site scheme per model"),
        ("resi-dual,hc", "one site scheme per model"),
    ],
)
def test_other_schemes_are_refused_when_parsed(text, why):
    with pytest.raises(PassError, match=why):
        Pipeline.parse(text)


def test_the_norm_gain_gets_a_gradient_at_init_and_training_uses_the_accumulator():
    """LN_f(x_acc) ≠ 0, so its zero gain gets a gradient (no double zero); after training the
    gain has moved and the output differs from the post-LN stream alone."""
    graph = captured("tiny-bert")
    out = Pipeline.parse("resi-dual").run(graph).graph
    x = out.inputs.tensors
    (out(*x)[0].float() ** 2).mean().backward()
    grad = out.gm.get_parameter("resi_dual.s0.norm_weight").grad
    assert grad is not None and float(grad.abs().max()) > 0


def test_training_a_post_ln_model_with_resi_dual():
    """GPT-2 is pre-LN (refused). BERT fitted to a fixed random target: the loss falls and the
    accumulator's norm gain moves off zero."""
    with pytest.raises(PassError, match="not post-LN"):
        byte_gpt("resi-dual")
    out = Pipeline.parse("resi-dual").run(captured("tiny-bert")).graph
    x = out.inputs.tensors
    target = torch.randn(out(*x)[0].shape, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in out.gm.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(20):
        loss = F.mse_loss(out(*x)[0], target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    assert float(out.gm.get_parameter("resi_dual.s0.norm_weight").abs().max()) > 0


def test_onnx(tmp_path):
    from archfx.ir.lower import to_onnx

    _, out = trained_norm("tiny-bart")
    assert to_onnx(out, tmp_path / "m.onnx").max_abs_diff <= 1e-4


def test_safetensors_round_trip(tmp_path):
    _, out = trained_norm()
    path = save(
        out,
        tmp_path / "m",
        source={"kind": "builtin", "name": "tiny-bert"},
        pipeline="resi-dual",
        model=build("tiny-bert"),
    )
    assert certify(out, load(path), tolerance=0.0).max_abs_diff == 0.0
