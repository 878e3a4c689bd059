"""hc and mhc: exact at init everywhere, the update oracles with moved coefficients, Sinkhorn's
residue, gradients, growth after a trained scheme, training, ONNX, torch.compile, safetensors,
generation."""

import functools
import itertools

import pytest
import torch
import torch.nn.functional as F

from archfx.ir import PassError, capture
from archfx.ir.sinkhorn import SINKHORN, explicit_sinkhorn
from archfx.ir.verify import certify
from archfx.passes import Pipeline
from archfx.passes.io.artifact import load, save
from archfx.passes.io.generate import generate
from archfx.passes.io.zoo import build

from .helpers import EVERY, ZOO, byte_gpt, captured, model, sampled, train

EXACT = ["hc", "hc(n=2,dynamic=true)", "mhc", "mhc(n=3,pre=alternating,sinkhorn_iters=5)"]


def states(graph):
    nodes = [n for n in graph.gm.graph.nodes if "archfx_state" in n.meta]
    return nodes, graph.probe(nodes)


@pytest.mark.parametrize(
    "name", sampled([*EVERY, "minilm"], ("tiny-gpt2", "tiny-llama", "tiny-bert"))
)
def test_exact_at_init_with_replicated_streams(name):
    """fp64 certificate on every zoo model and family; every residual site rewritten; the
    streams equal at every site (bit-equal where 1/n is exact in binary)."""
    graph = captured(name)
    sites = sum(len(b.residuals) for b in graph.structure.blocks)
    for text in EXACT:
        result = Pipeline.parse(text).run(graph)
        rec = result.records[-1]
        cert = rec.certificate
        # n = 3 weighs by fl(1/3): on mT5's large activations that rounding is 1.9e-5 absolute,
        # the rewritten model as close to fp64 as the original is (3.9e-7 against 5.1e-7)
        rounds = "n=3" in text and cert.output_rounding <= 2 * cert.input_rounding
        assert cert.ok and cert.math_diff <= 1e-9, (text, cert)
        assert cert.max_abs_diff <= 1e-5 or rounds, (text, cert)
        assert rec.details["sites"] == sites
        nodes, values = states(result.graph)
        assert len(nodes) == sites
        for v in values:
            for i in range(1, v.shape[0]):
                if "n=3" in text:  # averages with weights fl(1/3): within rounding
                    torch.testing.assert_close(v[i], v[0], rtol=1e-6, atol=1e-6)
                else:
                    assert torch.equal(v[0], v[i]), text
        assert len(result.graph.structure.blocks) == len(graph.structure.blocks)


def test_a_site_whose_tokens_are_flattened_gets_its_own_rank():
    """OPT runs its MLP on [batch·sequence, d] (a reshape before, a view back after): every
    scheme's coefficients follow each site's own token axes; DDL's token convolution, which
    needs the sequence axis, is refused there by name."""
    graph = captured("family:opt")
    for text in ["hc(n=2,dynamic=true)", "mhc(n=2)", "altup(k=2)", "ddl(dv=2,value=compat)"]:
        cert = Pipeline.parse(text).run(graph).records[-1].certificate
        assert cert.ok and cert.math_diff <= 1e-9 and cert.max_abs_diff <= 1e-5, (text, cert)
    with pytest.raises(PassError, match="need a .batch, sequence, features. stream; .* rank 2"):
        Pipeline.parse("ddl(dv=2,value=compat,compressor=tc)").run(graph)


def test_readout_sum_absorbs_n_in_the_final_norm_and_is_refused_without_one():
    out = Pipeline.parse("hc(n=4,readout=sum)").run(captured("tiny-llama"))
    assert out.records[-1].certificate.math_diff <= 1e-9
    with pytest.raises(PassError, match="readout=sum is exact only before a final norm"):
        Pipeline.parse("hc(readout=sum)").run(captured("tiny-bert"))


def moved(text: str, name="tiny-llama", scale=0.3, seed=0):
    """`text` applied, then every scheme parameter moved at random (as by training)."""
    graph = captured(name)
    out = Pipeline.parse(text).run(graph).graph
    gen = torch.Generator().manual_seed(seed)
    owner = text.split("(")[0].split(",")[-1] + "."
    with torch.no_grad():
        for key, p in out.gm.named_parameters():
            if key.startswith(owner):
                p.add_(scale * torch.randn(p.shape, generator=gen))
    return graph, out


def sites(graph):
    """(unit name, residual site) in model order: the update's stream, what the sublayer read,
    its output and the update, probed."""
    out = []
    for b in graph.structure.blocks:
        for k, r in enumerate(b.residuals):
            out.append((f"s0.l{b.index}.r{k}", r))
    flat = [x for _, r in out for x in (r.carry, r.pre_norm.input, r.branches[0], r.add)]
    values = graph.probe(flat)
    return [(name, *values[4 * i : 4 * i + 4]) for i, (name, _) in enumerate(out)]


def param(graph, prefix, key):
    return graph.tensor(f"{prefix}.{key}").detach()


@pytest.mark.parametrize("dynamic", [False, True])
def test_hc_update_oracle(dynamic):
    """SPEC §6 with moved coefficients: h0 = A_mᵀH, H ← Bᵀ T(h0) + A_rᵀH, dynamic terms
    s·tanh(RMSNorm(H) W) added to A_m, A_r, B."""
    _, out = moved(f"hc(n=3,dynamic={str(dynamic).lower()})")
    for name, H, h0, t, new in sites(out):
        p = functools.partial(param, out, f"hc.{name}")
        a = p("read").view(3, 1, 1, 1)
        r = p("carry").view(3, 3, 1, 1, 1)
        b = p("write").view(3, 1, 1, 1)
        if dynamic:
            hbar = F.rms_norm(H, [H.shape[-1]], eps=1e-6)
            a = a + p("read_scale") * torch.tanh(hbar @ p("read_dynamic").T)
            dyn = p("read_scale") * torch.tanh(hbar @ p("carry_dynamic").T)  # [i, B, S, j]
            r = r + dyn.permute(0, 3, 1, 2).unsqueeze(-1)
            b = b + p("write_scale") * torch.tanh(hbar @ p("write_dynamic").T)
        torch.testing.assert_close(h0, (a * H).sum(0), rtol=1e-5, atol=1e-5)
        want = (r * H.unsqueeze(1)).sum(0) + b * t.unsqueeze(0)
        torch.testing.assert_close(new, want, rtol=1e-5, atol=1e-5)
        assert float((H[0] - H[1]).abs().max()) > 0 or name == "s0.l0.r0"  # the streams differ


def sinkhorn(m, iters):
    for _ in range(iters):
        m = m / m.sum(-1, keepdim=True)
        m = m / m.sum(-2, keepdim=True)
    return m


@pytest.mark.parametrize(
    ("shape", "iters"), [((2, 37, 4, 4), 20), ((1, 1, 4, 4), 5), ((5, 3, 3), 1)]
)
def test_the_sinkhorn_op_is_the_chain_it_replaces_with_its_gradient(shape, iters):
    """`archfx::sinkhorn` (tokens-last kernel, recomputing backward) against the ATen chain the
    ONNX export writes (`explicit_sinkhorn`) and the plain reference, in fp64 with peaked
    entries: the values and the gradient; gradcheck; the input left alone; no second
    derivative."""
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(shape, generator=gen, dtype=torch.float64)).requires_grad_()
    grad = torch.randn(shape, generator=gen, dtype=torch.float64)
    before = logits.detach().clone()
    got = SINKHORN(logits, iters)
    assert torch.equal(logits.detach(), before) and got.is_contiguous()
    want = sinkhorn(torch.exp(logits), iters)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-15)
    (g_got,) = torch.autograd.grad(got, logits, grad)
    (g_want,) = torch.autograd.grad(want, logits, grad)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)
    small = logits.detach()[..., :2, :, :].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: SINKHORN(x, iters), (small,))

    g = torch.fx.Graph()
    x = g.placeholder("x")
    g.output(g.call_function(SINKHORN, (x, iters)))
    assert explicit_sinkhorn(g) and all(n.target is not SINKHORN for n in g.nodes)
    torch.testing.assert_close(torch.fx.GraphModule({}, g)(logits), want, rtol=0, atol=0)

    (first,) = torch.autograd.grad(SINKHORN(logits, iters), logits, grad, create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        first.sum().backward()


def test_the_sinkhorn_op_under_torch_compile():
    """Inductor runs the op and its backward as kernels (the fake and autograd registrations):
    values and gradient equal eager's; the whole mHC training step is
    tests/test_lower.py::test_a_compiled_training_step_matches_eager (make test-all)."""
    x = torch.randn(2, 5, 4, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    grad = torch.randn(2, 5, 4, 4, generator=torch.Generator().manual_seed(1))

    def f(x):
        return SINKHORN(torch.tanh(x), 5) * 3

    want = f(x)
    got = torch.compile(f, dynamic=False)(x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(
        torch.autograd.grad(got, x, grad)[0], torch.autograd.grad(want, x, grad)[0]
    )


def test_mhc_update_oracle_and_doubly_stochastic_mixing():
    """x ← H_res x + H_postᵀ F(H_pre x) with moved φ, α, biases; H_res = Sinkhorn(exp(·)):
    columns sum to 1 (normalised last), rows only as closely as 20 iterations bring them —
    with coefficients moved this far (exp(·) entries from 1e-6 to 0.9) 5e-2 was measured."""
    n = 4
    _, out = moved(f"mhc(n={n},pre=alternating)", scale=0.5)
    worst = 0.0
    for name, H, h_in, f, new in sites(out):
        p = functools.partial(param, out, f"mhc.{name}")
        flat = H.permute(1, 2, 0, 3).flatten(2)  # [B, S, n·d]
        proj = F.rms_norm(flat, [flat.shape[-1]], eps=1e-6) @ p("phi").T
        alpha = p("alpha")
        pre = torch.sigmoid(alpha[0] * proj[..., :n] + p("pre_bias"))
        post = 2 * torch.sigmoid(alpha[1] * proj[..., n : 2 * n] + p("post_bias"))
        logits = (alpha[2] * proj[..., 2 * n :] + p("res_bias")).unflatten(-1, [n, n])
        res = sinkhorn(torch.exp(logits), 20)
        assert float((res.sum(-2) - 1).abs().max()) <= 1e-6
        worst = max(worst, float((res.sum(-1) - 1).abs().max()))
        lead = lambda c: c.permute(2, 0, 1).unsqueeze(-1)  # noqa: E731  [B, S, n] → [n, B, S, 1]
        torch.testing.assert_close(h_in, (lead(pre) * H).sum(0), rtol=1e-5, atol=1e-5)
        mixed = torch.einsum("bsij,jbsd->ibsd", res, H)
        torch.testing.assert_close(new, mixed + lead(post) * f.unsqueeze(0), rtol=1e-5, atol=1e-5)
    assert 0 < worst <= 0.1, worst


def test_mhc_sinkhorn_leaves_no_residue_at_init():
    """At init exp(b_res) is the all-ones matrix: the first row normalisation makes it 1/n,
    which every later normalisation keeps — no residue from stopping after finite iterations,
    only 1/n's rounding (none for n = 4; n = 3 within an ulp)."""
    for n, iters in ((4, 1), (4, 20), (3, 20)):
        m = sinkhorn(torch.exp(torch.zeros(n, n, dtype=torch.float64)), iters)
        assert float((m - 1 / n).abs().max()) <= (0.0 if n == 4 else 1e-16)
        m32 = sinkhorn(torch.ones(n, n), iters)
        assert float((m32 - 1 / n).abs().max()) <= (0.0 if n == 4 else 3e-8)


def test_add_layers_after_mhc_is_refused_when_parsed_and_allowed_after_hc():
    with pytest.raises(PassError, match="never the identity"):
        Pipeline.parse("mhc,add-layers(n=1)")
    graph, out = moved("hc(n=3,dynamic=true)")
    # the new layer's carry starts at A_r = I, W_r = 0 whatever its neighbour learned
    cert = Pipeline.parse("add-layers(n=2,at=1)").run(out).records[-1].certificate
    assert cert.ok and cert.math_diff <= 1e-9, cert


@pytest.mark.parametrize(
    ("name", "text"),
    [
        pytest.param("tiny-llama", "hc(n=3,dynamic=true)", marks=pytest.mark.slow),
        ("tiny-llama", "mhc(n=2,pre=alternating)"),
        # post-LN, tied head, two stacks
        pytest.param("tiny-bart", "hc(n=2)", marks=pytest.mark.slow),
    ],
)
@pytest.mark.parametrize(
    "grow",
    [
        "expand-hidden(factor=2),expand-mlp(factor=2)",
        pytest.param("expand-mlp(factor=2),add-heads(n=2)", marks=pytest.mark.slow),
    ],
)
def test_growth_after_a_trained_scheme_is_exact(name, text, grow):
    """Growth after hc / mhc whose coefficients moved: the streams widen together, the
    coefficient weights (W, φ over n·d features) take zero columns, the RMSNorms over the
    stream are rescaled."""
    _, out = moved(text, name)
    records = Pipeline.parse(grow).run(out).records
    for rec in records:
        assert rec.certificate.ok and rec.certificate.math_diff <= 1e-9, (grow, rec.certificate)


def test_every_coefficient_gets_a_gradient_at_init():
    """No double zero: every hc parameter but the dynamic scales s (tanh(0) = 0 at init) gets
    a gradient; mhc's φ and its H_pre, H_post biases do. H_res's bias gets none while the
    streams are equal (every doubly stochastic matrix maps equal streams to themselves) and
    does once training has moved them apart, except at the first and last sites."""
    x = torch.randint(0, 256, (2, 16))
    for text, none in (
        ("hc(n=2,dynamic=true)", ("_scale",)),
        ("mhc(n=2,pre=alternating)", ("alpha", "res_bias")),
    ):
        out = byte_gpt(text)
        (out(x)[0].float() ** 2).mean().backward()
        owner = text.split("(")[0] + "."
        for key, p in out.gm.named_parameters():
            if key.startswith(owner) and not any(s in key for s in none):
                assert p.grad is not None and float(p.grad.abs().max()) > 0, key
    losses = train(out, steps=10)
    out.gm.zero_grad()
    (out(x)[0].float() ** 2).mean().backward()
    grads = [float(p.grad.abs().max()) for k, p in out.gm.named_parameters() if "res_" in k]
    # the first site's H_res mixes the replicated embedding, and the last's is invisible to the
    # mean readout (its columns sum to 1): those never get a gradient; every other site's does
    assert losses[-1] < losses[0] and grads[0] == grads[-1] == 0 and all(grads[1:-1]), grads


@pytest.mark.parametrize(
    ("text", "separate"),
    [("hc(n=4,dynamic=true)", True), ("mhc(n=4,pre=alternating)", True), ("mhc(n=4)", False)],
)
def test_training_separates_the_streams_unless_the_init_is_symmetric(text, separate):
    """Hamlet, 30 steps: the streams come apart under hc and mhc(pre=alternating); under the
    paper's mhc init they stay bit-equal (every stream alike, so is every gradient step), as
    the pass's remark says."""
    out = byte_gpt(text)
    losses = train(out, steps=30)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.5, losses
    _, values = states(out)
    spread = max(float((v[0] - v[1]).abs().max()) for v in values)
    assert (spread > 1e-4) if separate else (spread == 0.0), spread


def test_the_symmetric_mhc_init_is_remarked():
    result = Pipeline.parse("mhc").run(captured("tiny-llama"))
    assert any("stay equal in training" in str(r) for r in result.records[-1].remarks)
    result = Pipeline.parse("mhc(pre=alternating)").run(captured("tiny-llama"))
    assert not result.records[-1].remarks


# the default run exports mHC with 3 Sinkhorn iterations (the graph's size, not its kind, grows
# with them); hc and every zoo model under `make test-all`
MHC_ONNX = "mhc(n=2,sinkhorn_iters=3)"
ONNX_CASES = [("tiny-llama", MHC_ONNX)]


@pytest.mark.parametrize(
    ("name", "text"),
    [
        case if case in ONNX_CASES else pytest.param(*case, marks=pytest.mark.slow)
        for case in itertools.product(ZOO, ["hc(n=2,dynamic=true)", MHC_ONNX])
    ],
)
def test_onnx(tmp_path, name, text):
    from archfx.ir.lower import to_onnx

    out = Pipeline.parse(text).run(captured(name)).graph
    assert to_onnx(out, tmp_path / "m.onnx").max_abs_diff <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("text", ["hc(dynamic=true)", "mhc(sinkhorn_iters=5)"])
def test_torch_compile(text):
    from archfx.ir.lower import compile_graph

    out = Pipeline.parse(text).run(captured("tiny-llama")).graph
    assert compile_graph(out).max_abs_diff <= 1e-5


@pytest.mark.parametrize(
    "text", [pytest.param("hc(n=3,dynamic=true)", marks=pytest.mark.slow), "mhc(n=2)"]
)
def test_safetensors_round_trip_keeps_trained_coefficients(tmp_path, text):
    _, out = moved(text)
    path = save(
        out,
        tmp_path / "m",
        source={"kind": "builtin", "name": "tiny-llama"},
        pipeline=text,
        model=build("tiny-llama"),
    )
    assert certify(out, load(path), tolerance=0.0).max_abs_diff == 0.0


@pytest.mark.parametrize(
    "text", [pytest.param("hc(n=2,dynamic=true)", marks=pytest.mark.slow), "mhc(n=2)"]
)
def test_generation_with_a_kv_cache(text):
    """Greedy tokens of the rewritten model, decoded with the cache, equal the original's."""
    m = model("tiny-llama").eval()
    prompts = [[5, 17, 33, 2, 9], [44, 12, 7]]
    want = generate(capture(m), prompts, max_new_tokens=12).new_tokens
    out = Pipeline.parse(text).run(capture(m), verify=False).graph
    assert generate(out, prompts, max_new_tokens=12).new_tokens == want
