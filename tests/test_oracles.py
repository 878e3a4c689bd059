"""Oracles for every claim a pass makes, not only "the output is unchanged" (issue 15, item 3).

A function-preserving rewrite can be exact and still not be the rewrite it claims to be: an
AltUp whose every layer updates block 0, a DDL value with the wrong gate, a growth whose zero
and drawn sides are swapped all leave the outputs unchanged at init. Each test here perturbs
the rewritten model (or reads its intermediate values) so that the claim itself is observable,
and compares with the formula computed directly from probed inputs:

- altup: which block each layer reads and writes (l mod K, or `active`), blocks identical at
  init, P and g get gradients, K = 1 is the identity rewrite;
- ddl: each value mode's update formula (paper, code, compat), the gate's initial value,
  k's normalisation, the (1 − β) error identity, λ's gradient;
- the six growths: which new entries are exactly zero and which are drawn, old entries kept or
  rescaled as claimed, and every new entry gets a gradient (no "double zero");
- a grown Hugging Face model saved with `save_pretrained` generates the same tokens with and
  without a KV cache, and the same as the model before growth;
- the certificate rejects a rewrite that is off by 2% (AltUp with g = 0.98).

`tests/mutants.py` (`make mutants`) breaks each of these claims in the source and checks
that these tests fail.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import transformers as tf

from archfx.ir import capture
from archfx.ir.verify import certify
from archfx.passes import Pipeline

from .helpers import model, perturb_ddl

# helpers -----------------------------------------------------------------------------------


def llama(layers: int = 2, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = tf.LlamaConfig(
        **{
            "vocab_size": 64,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 64,
            **kw,
        }
    )
    return tf.LlamaForCausalLM(config).eval()


@functools.cache
def captured_llama(layers: int = 2):
    return capture(llama(layers), {"input_ids": torch.randint(0, 64, (2, 6)), "use_cache": False})


@functools.cache
def captured(name: str, trained_like: bool = False):
    """A zoo model, captured; `trained_like`: its biases and gains moved off their init values
    (0 and 1 in a fresh Hugging Face model, where a copied bias and a zero one look alike)."""
    torch.manual_seed(0)
    m = model(name)
    if trained_like:
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() == 1:
                    p.add_(0.1 * torch.randn_like(p))
    return capture(m)


def params(graph) -> dict[str, torch.Tensor]:
    return dict(graph.gm.named_parameters())


def close(got: torch.Tensor, want: torch.Tensor, what, rtol: float = 1e-4) -> None:
    scale = float(want.abs().max()) or 1.0
    err = float((got.double() - want.double()).abs().max())
    assert err <= rtol * scale, f"{what}: max |Δ| = {err:.3g} (scale {scale:.3g})"


def by_name(graph, name: str):
    return next(n for n in graph.gm.graph.nodes if n.name == name)


# altup -------------------------------------------------------------------------------------


def _perturb_altup(graph, seed: int = 1) -> None:
    """Random P (near I) and g (near 1) at every layer: the K blocks become all different."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in graph.gm.named_parameters():
            if name.startswith("altup.") and name.endswith((".predict", ".correct")):
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


@pytest.mark.parametrize(
    "text,which",
    [
        ("altup(k=3)", lambda layer: layer % 3),
        ("altup(k=2)", lambda layer: layer % 2),
        ("altup(k=3,schedule=same,active=1)", lambda layer: 1),
        ("altup(k=2,schedule=same)", lambda layer: 0),
    ],
    ids=["k3-alternating", "k2-alternating", "k3-same-1", "k2-same-0"],
)
def test_altup_layer_l_reads_and_writes_its_block(text, which):
    """With P and g moved off their init, every block of the state differs; layer l must
    compute on block j(l) of P_l S_{l-1} and write S_l = x̂ + g (x̃ − x̂_j) to every block."""
    graph = captured_llama(5)
    out = Pipeline.parse(text).run(graph, verify=False).graph
    _perturb_altup(out)
    k = int(text.split("k=")[1].split(",")[0].rstrip(")"))
    blocks = out.structure.blocks
    states = [n for n in out.gm.graph.nodes if "archfx_state" in n.meta]
    assert len(blocks) == len(states) == 5
    readout = next(n for n in out.gm.graph.nodes if "archfx_readout" in n.meta)
    embedding = by_name(out, graph.structure.blocks[0].input.name)
    values = out.probe(
        [embedding, *states, *(b.input for b in blocks), *(b.output for b in blocks), readout]
    )
    x0, s, ins, outs, read = values[0], values[1:6], values[6:11], values[11:16], values[16]
    p = params(out)
    prev = x0.unsqueeze(0).expand(k, *x0.shape)
    for layer in range(5):
        pred = p[f"altup.s0.l{layer}.predict"].detach()
        gain = p[f"altup.s0.l{layer}.correct"].detach()
        xhat = torch.einsum("ij,j...->i...", pred.double(), prev.double())
        j = which(layer)
        close(ins[layer], xhat[j], f"layer {layer} reads block {j}")
        g = gain.double().view(k, *[1] * x0.dim())
        close(s[layer], xhat + g * (outs[layer].double() - xhat[j]), f"layer {layer} writes")
        prev = s[layer]
    close(read, prev.double().mean(0), "the model reads the mean of the blocks")


def test_altup_blocks_identical_at_init_and_coefficients_get_gradients():
    graph = captured_llama(5)
    out = Pipeline.parse("altup(k=3)").run(graph, verify=False).graph
    p = params(out)
    for layer in range(5):
        assert torch.equal(p[f"altup.s0.l{layer}.predict"], torch.eye(3)), f"layer {layer}: P ≠ I"
        assert torch.equal(p[f"altup.s0.l{layer}.correct"], torch.ones(3)), f"layer {layer}: g ≠ 1"
    states = [n for n in out.gm.graph.nodes if "archfx_state" in n.meta]
    for layer, v in enumerate(out.probe(states)):
        assert all(torch.equal(v[0], v[i]) for i in range(1, 3)), layer
    out.gm.zero_grad()
    logits = out(*out.inputs.tensors)[0]
    (logits**2).mean().backward()
    for name, t in p.items():
        if name.startswith("altup."):
            assert t.grad is not None and bool((t.grad != 0).all()), name


def test_altup_k1_is_the_identity_rewrite():
    graph = captured_llama(2)
    out = Pipeline.parse("altup(k=1)").run(graph, verify=False).graph
    assert certify(graph, out, tolerance=0.0).max_abs_diff == 0.0
    assert {n for n in params(out) if n.startswith("altup.")} == {  # P, g: 1 × 1 and 1
        f"altup.s0.l{i}.{w}" for i in range(2) for w in ("predict", "correct")
    }


def test_certificate_rejects_altup_with_gain_off_by_two_percent():
    """g = 0.98 instead of 1 (a real bug once): the fp32 certificate must say no."""
    graph = captured("tiny-llama")
    out = Pipeline.parse("altup(k=2)").run(graph, verify=False).graph
    with torch.no_grad():
        for name, t in params(out).items():
            if name.endswith(".correct"):
                t.fill_(0.98)
    assert not certify(graph, out).ok


# ddl ---------------------------------------------------------------------------------------


def _ddl_sites(graph, out):
    """Per residual site of `graph` (in order): the probed stream state entering it, the branch
    output h, the normalised input c, the state after it, and the site's parameter prefix."""
    sites = [(b, i, r) for b in graph.structure.blocks for i, r in enumerate(b.residuals)]
    states = [n for n in out.gm.graph.nodes if "archfx_state" in n.meta]
    assert len(states) == len(sites)
    first = by_name(out, sites[0][2].carry.name)
    hs = [by_name(out, r.branches[0].name) for _, _, r in sites]
    cs = [by_name(out, r.pre_norm.output.name) for _, _, r in sites]
    values = out.probe([first, *hs, *cs, *states])
    n = len(sites)
    x0, h, c, s = values[0], values[1 : 1 + n], values[1 + n : 1 + 2 * n], values[1 + 2 * n :]
    return [
        (x0 if i == 0 else s[i - 1], h[i], c[i], s[i], f"ddl.s0.l{b.index}.r{j}")
        for i, (b, j, _) in enumerate(sites)
    ]


def _ddl_expected(mode: str, eps: float, x, h, c, p, prefix):
    """Deep Delta Learning written out (docs/passes.md, ddl): k = h/√(‖h‖²+ε²), β = 2σ(w·c + b), v = W_v c (paper, compat) or
    4σ(W_v x_in + b) (code); X ← X + β k (v − kᵀX), or with compat X + λh + (1−λ)β(v − kᵀX)k."""
    x, h, c = x.double(), h.double(), c.double()
    w = {n[len(prefix) + 1 :]: t.detach().double() for n, t in p.items() if n.startswith(prefix)}
    k = h / torch.sqrt((h * h).sum(-1, keepdim=True) + eps**2)
    beta = 2 * torch.sigmoid((c * w["beta_weight"]).sum(-1, keepdim=True) + w["beta_bias"])
    if mode == "code":
        v = 4 * torch.sigmoid(x @ w["value_weight"].T + w["value_bias"])
    else:
        v = c @ w["value_weight"].T
    if x.dim() == h.dim():  # d_v = 1: the state is the stream
        error = v - (k * x).sum(-1, keepdim=True)
    else:  # [d_v, *tok, d]
        error = v.movedim(-1, 0).unsqueeze(-1) - (k * x).sum(-1, keepdim=True)
    if mode == "compat":
        lam = w["lam"]
        return x + lam * h + (1 - lam) * beta * k * error
    return x + beta * k * error


@pytest.mark.parametrize(
    "mode,dv,eps",
    [
        ("paper", 1, 1e-5),
        ("code", 1, 1e-5),
        ("compat", 1, 1e-5),
        ("paper", 1, 0.5),
        ("paper", 4, 1e-5),
        ("compat", 4, 1e-5),
    ],
)
def test_ddl_update_is_the_value_modes_formula(mode, dv, eps):
    graph = captured_llama(2)
    out = Pipeline.parse(f"ddl(value={mode},dv={dv},eps={eps})").run(graph, verify=False).graph
    perturb_ddl(out)
    p = params(out)
    for x, h, c, new, prefix in _ddl_sites(graph, out):
        if dv > 1 and x.dim() == h.dim():  # the first site reads the embedding, replicated
            x = x.unsqueeze(0).expand(dv, *x.shape)
        close(new, _ddl_expected(mode, eps, x, h, c, p, prefix), f"{mode} update at {prefix}")


@pytest.mark.parametrize("beta0", [0.5, 1.0, 1.5])
def test_ddl_gate_starts_at_beta0_and_shrinks_the_error_by_one_minus_beta(beta0):
    """At init β = β0 at every token: along k the error v − kᵀX shrinks by exactly
    (1 − β‖k‖²) with ‖k‖ ≈ 1, read from the probed states, not from the parameters."""
    graph = captured_llama(2)
    out = Pipeline.parse(f"ddl(value=paper,beta0={beta0})").run(graph, verify=False).graph
    p = params(out)
    for x, h, c, new, prefix in _ddl_sites(graph, out):
        assert not p[f"{prefix}.beta_weight"].any()
        h, x, new = h.double(), x.double(), new.double()
        k = h / h.norm(dim=-1, keepdim=True)
        v = c.double() @ p[f"{prefix}.value_weight"].detach().double().T
        before = v - (k * x).sum(-1, keepdim=True)
        after = v - (k * new).sum(-1, keepdim=True)
        close(after, (1 - beta0) * before, f"error shrinks by 1 − β0 at {prefix}", rtol=1e-3)
        delta = new - x  # the update is along k
        close(delta - (delta * k).sum(-1, keepdim=True) * k, torch.zeros_like(delta), prefix)


def test_ddl_blocks_read_the_mean_of_the_channels():
    """d_v > 1 (compressor cc): a block reads x_in = the mean of the state's channels (weights
    1/d_v at init). In paper mode the channels differ after the first site (v differs per
    channel), so the pre-norm of every later site must normalise that mean."""
    graph = captured_llama(2)
    out = Pipeline.parse("ddl(value=paper,dv=4)").run(graph, verify=False).graph
    p = params(graph)
    checked = 0
    for x, _, c, _, prefix in _ddl_sites(graph, out)[1:]:
        block, site = (int(part[1:]) for part in prefix.split(".")[2:4])
        norm = ("input_layernorm", "post_attention_layernorm")[site]
        gain = p[f"model.layers.{block}.{norm}.weight"].detach().double()
        assert float((x[0] - x[1]).abs().max()) > 0  # the channels differ
        m = x.double().mean(0)
        want = m * torch.rsqrt((m * m).mean(-1, keepdim=True) + 1e-6) * gain
        close(c, want, f"{prefix} reads the mean of the channels")
        checked += 1
    assert checked == 3


def test_ddl_k_unit_norm_beta_in_range_and_lambda_gets_gradient():
    graph = captured_llama(2)
    out = Pipeline.parse("ddl").run(graph, verify=False).graph
    p = params(out)
    assert all(bool((t == 1).all()) for n, t in p.items() if n.endswith(".lam")), "λ ≠ 1 at init"
    metas = [n.meta["archfx_ddl"] for n in out.gm.graph.nodes if "archfx_ddl" in n.meta]
    got = out.probe([m[key] for m in metas for key in ("k", "beta")])
    for k, beta in zip(got[::2], got[1::2], strict=True):
        close(k.norm(dim=-1), torch.ones(k.shape[:-1]), "‖k‖ = 1", rtol=1e-4)
        assert bool(((beta > 0) & (beta < 2)).all())
    perturb_ddl(out)  # β varies: check the range where the gate has moved too
    for beta in out.probe([m["beta"] for m in metas]):
        assert bool(((beta > 0) & (beta < 2)).all())
    out.gm.zero_grad()
    (out(*out.inputs.tensors)[0] ** 2).mean().backward()
    lams = [t for n, t in p.items() if n.endswith(".lam")]
    assert len(lams) == 4 and all(t.grad is not None and bool(t.grad.abs().sum() > 0) for t in lams)


# growth ------------------------------------------------------------------------------------

L = "model.layers.{}."
ATT, MLP = "self_attn.", "mlp."


def _new_mask(shape, axes) -> torch.Tensor:
    """Positions that are new along some grown axis: no source (-1), or a second copy of one."""
    mask = torch.zeros(shape, dtype=torch.bool)
    for k, src in enumerate(axes):
        if src is None:
            continue
        seen, fresh = set(), []
        for s in src.tolist():
            fresh.append(s < 0 or s in seen)
            seen.add(s)
        view = [1] * len(shape)
        view[k] = -1
        mask |= torch.tensor(fresh).view(view)
    return mask


def _old_part(new: torch.Tensor, axes) -> torch.Tensor:
    """The entries of `new` at the first copy of every old position, in the old layout."""
    for k, src in enumerate(axes):
        if src is None:
            continue
        first = {}
        for i, s in enumerate(src.tolist()):
            if s >= 0:
                first.setdefault(s, i)
        new = new.index_select(k, torch.tensor([first[s] for s in sorted(first)]))
    return new


def _check_drawn(values: torch.Tensor, old: torch.Tensor, what: str) -> None:
    assert values.numel() and bool((values != 0).all()), f"{what}: new entries must be drawn"
    assert values.unique().numel() > values.numel() // 2, f"{what}: drawn entries repeat"
    ratio = float(values.float().std() / old.float().std())
    assert 0.2 < ratio < 5, f"{what}: drawn at {ratio:.2f}× the scale of the old entries"


# per pass, per parameter (suffix after the block prefix): how its new entries start, and the
# factor its old entries are multiplied by (1: kept)
def _llama_growth_specs(size_qk: int = 24, head_dim: int = 8, width: int = 32, grown: int = 48):
    rms = math.sqrt(width / grown)
    return {
        "expand-mlp(factor=2)": {
            MLP + "gate_proj.weight": ("drawn", 1),
            MLP + "up_proj.weight": ("drawn", 1),
            MLP + "down_proj.weight": ("zero", 1),
        },
        "add-heads(n=2)": {
            ATT + "q_proj.weight": ("drawn", 1),
            ATT + "o_proj.weight": ("zero", 1),
        },
        "add-heads(n=4)": {
            ATT + "q_proj.weight": ("drawn", 1),
            ATT + "o_proj.weight": ("zero", 1),
        },
        f"expand-head-dim(size={size_qk})": {
            ATT + "v_proj.weight": ("drawn", 1),
            ATT + "o_proj.weight": ("zero", 1),
        },
        f"expand-qk(size={size_qk})": {
            ATT + "q_proj.weight": ("drawn", 1),
            ATT + "k_proj.weight": ("zero", math.sqrt(size_qk / head_dim)),
        },
        f"expand-hidden(size={grown})": {
            "model.embed_tokens.weight": ("zero", 1),
            ATT + "q_proj.weight": ("drawn", 1),
            ATT + "k_proj.weight": ("drawn", 1),
            ATT + "v_proj.weight": ("drawn", 1),
            ATT + "o_proj.weight": ("zero", 1),
            MLP + "gate_proj.weight": ("drawn", 1),
            MLP + "up_proj.weight": ("drawn", 1),
            MLP + "down_proj.weight": ("zero", 1),
            "input_layernorm.weight": ("any", rms),
            "post_attention_layernorm.weight": ("any", rms),
            "model.norm.weight": ("any", rms),
            "lm_head.weight": ("drawn", 1),
        },
    }


def _spec_for(specs: dict, name: str):
    for suffix, spec in specs.items():
        if name.endswith(suffix) or name == suffix:
            return spec
    return None


def _check_growth(graph, result, specs: dict, what: str) -> None:
    before = params(graph)
    after = params(result.graph)
    layouts = result.records[-1].tensor_maps["layouts"]
    grown = {n for n in layouts if n in after}
    expected = {n for n in before if _spec_for(specs, n) is not None}
    assert grown == expected, f"{what}: grew {sorted(grown ^ expected)} unexpectedly"
    for name in sorted(grown):
        kind, factor = _spec_for(specs, name)
        new, axes = after[name].detach(), layouts[name]
        old = before[name].detach()
        close(_old_part(new, axes), old * factor, f"{what}: old entries of {name} × {factor:.4g}")
        fresh = new[_new_mask(new.shape, axes)]
        if kind == "zero":
            assert bool((fresh == 0).all()), f"{what}: new entries of {name} must be zero"
        elif kind == "drawn":
            _check_drawn(fresh, old, f"{what}: {name}")
    for name in after:
        if name not in grown and name in before:
            assert torch.equal(after[name], before[name]), f"{what}: {name} changed"


GROWTHS = list(_llama_growth_specs())


@pytest.mark.parametrize("text", GROWTHS)
def test_growth_zero_and_drawn_sides(text):
    graph = captured_llama(2)
    result = Pipeline.parse(text).run(graph, verify=False)
    _check_growth(graph, result, _llama_growth_specs()[text], text)


def test_expand_hidden_rms_norm_eps_follows_the_width():
    """RMS over zero-padded features: eps × d/d̂ (in a fused rms_norm or the `mean + eps` of a
    decomposed one; Llama's is decomposed), so each norm's value is unchanged exactly."""
    graph = captured_llama(2)
    out = Pipeline.parse("expand-hidden(size=48)").run(graph, verify=False).graph

    def eps(g) -> dict[str, float]:
        found = {}
        for n in g.gm.graph.nodes:
            if n.target is torch.ops.aten.rms_norm.default and len(n.args) > 3:
                found[n.name] = n.args[3]
            elif (
                n.target is torch.ops.aten.add.Tensor
                and isinstance(n.args[1], float)
                and getattr(n.args[0], "target", None) is torch.ops.aten.mean.dim
            ):
                found[n.name] = n.args[1]
        return found

    old, new = eps(graph), eps(out)
    assert len(old) == 5 and old.keys() == new.keys()  # 2 blocks × 2 norms, and the final one
    for name, value in old.items():
        assert math.isclose(new[name], value * 32 / 48, rel_tol=1e-12), f"{name}: eps not × d/d̂"


def test_expand_hidden_unit_offset_gains():
    """Gemma's (1 + w) RMSNorm gains: w' = (1 + w)·√(d/d̂) − 1."""
    graph = captured("tiny-gemma")
    result = Pipeline.parse("expand-hidden(size=96)").run(graph, verify=False)
    before, after = params(graph), params(result.graph)
    layouts = result.records[-1].tensor_maps["layouts"]
    norms = [n for n in layouts if n.endswith("norm.weight") and n in after]
    assert norms
    f = math.sqrt(64 / 96)
    for name in norms:
        got = _old_part(after[name].detach(), layouts[name])
        close(1 + got, (1 + before[name].detach()) * f, name)


def test_expand_hidden_duplicates_layernorm_streams():
    """tiny GPT-2 (LayerNorm, tied head): embeddings, writers and norms copied; readers take
    W/2 per copy plus noise that sums to zero over the copies; the final norm ÷ 2."""
    graph = captured("tiny-gpt2", trained_like=True)
    result = Pipeline.parse("expand-hidden(factor=2)").run(graph, verify=False)
    before, after = params(graph), params(result.graph)
    layouts = result.records[-1].tensor_maps["layouts"]
    assert result.records[-1].details["method"] == "duplicate"
    readers = 0
    for name, axes in layouts.items():
        if name not in after:
            continue
        new, old = after[name].detach(), before[name].detach()
        k = next(i for i, s in enumerate(axes) if s is not None and len(axes) > 0)
        assert sum(s is not None for s in axes) == 1, name
        halves = new.chunk(2, dim=k)
        if torch.equal(halves[0], halves[1]):  # producers and norms: two copies
            want = old / 2 if name.startswith("transformer.ln_f") else old
            close(halves[0], want, f"{name}: copied")
        else:  # readers: the copies sum to the old weight and differ
            readers += 1
            close(halves[0] + halves[1], old, f"{name}: copies sum to the old weight")
            assert float((halves[0] - halves[1]).abs().max()) > 1e-3 * float(old.abs().max())
    assert readers >= 4  # attention qkv, MLP up, per block


def test_expand_qk_keeps_a_fixed_scale():
    """T5's attention scale is 1, not 1/√k: the old key rows are kept, not rescaled."""
    graph = captured("tiny-t5")
    result = Pipeline.parse("expand-qk(size=24)").run(graph, verify=False)
    before, after = params(graph), params(result.graph)
    layouts = result.records[-1].tensor_maps["layouts"]
    keys = [n for n in layouts if n.endswith(".k.weight")]
    queries = [n for n in layouts if n.endswith(".q.weight")]
    assert keys and len(keys) == len(queries)
    for name in keys:
        new = after[name].detach()
        close(_old_part(new, layouts[name]), before[name].detach(), f"{name} kept")
        assert bool((new[_new_mask(new.shape, layouts[name])] == 0).all()), name
    for name in queries:
        new = after[name].detach()
        _check_drawn(new[_new_mask(new.shape, layouts[name])], before[name].detach(), name)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_add_layers_copies_the_neighbour_with_zero_writers(name):
    graph = captured(name, trained_like=True)
    result = Pipeline.parse("add-layers(n=1)").run(graph, verify=False)
    before, after = params(graph), params(result.graph)
    fresh = sorted(set(after) - set(before))
    assert fresh
    writers = ("o_proj.", "down_proj.", "attn.c_proj.", "mlp.c_proj.")
    zeroed = [n for n in fresh if any(w in n for w in writers)]
    assert len(zeroed) == (2 if name == "tiny-llama" else 4), zeroed  # GPT-2: biases too
    for n in fresh:
        template = n.replace(".2.", ".1.", 1)  # the copy of block 1, the last one
        if n in zeroed:
            assert not after[n].any(), n
        else:
            assert torch.equal(after[n], before[template]), n


def _sgd_step(graph, loss_fn, lr: float = 0.1) -> dict[str, torch.Tensor]:
    graph.gm.zero_grad()
    loss_fn(graph).backward()
    grads = {n: p.grad.clone() for n, p in graph.gm.named_parameters() if p.grad is not None}
    with torch.no_grad():
        for n, p in graph.gm.named_parameters():
            if n in grads:
                p.sub_(lr * grads[n])
    return grads


@pytest.mark.parametrize("text", [*GROWTHS, "add-layers(n=1)", "add-layers(n=2,at=1)"])
def test_every_new_entry_gets_a_gradient(text):
    """No double zero: after one backward every new entry that starts at zero has a non-zero
    gradient (its partner is drawn), and after one step every new entry has one."""
    graph = captured_llama(2)
    result = Pipeline.parse(text).run(graph, verify=False)
    out = result.graph
    ids = torch.randperm(64, generator=torch.Generator().manual_seed(0)).view(2, 32)

    def loss(g):  # every token appears, and every position is scored: every row is read
        logits = g(ids)[0]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, 64), ids.roll(-1, 1).flatten())

    before = params(graph)
    layouts = result.records[-1].tensor_maps.get("layouts", {})
    new = {}
    for name, p in out.gm.named_parameters():
        if name not in before:
            new[name] = torch.ones(p.shape, dtype=torch.bool)  # a new block
        elif name in layouts:
            new[name] = _new_mask(p.shape, layouts[name])
    assert new and any(m.any() for m in new.values())
    start = {n: t.detach().clone() for n, t in params(out).items()}
    first = _sgd_step(out, loss)
    for name, mask in new.items():
        zero = mask & (start[name] == 0)
        assert bool((first[name][zero] != 0).all()), (
            f"{text}: zero entries of {name} get no gradient"
        )
    second = _sgd_step(out, loss)
    for name, mask in new.items():
        moved = (first[name] != 0) | (second[name] != 0)
        assert bool(moved[mask].all()), f"{text}: new entries of {name} never get a gradient"


# save_pretrained: generation with and without a KV cache --------------------------------------


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_grown_checkpoint_generates_the_same_with_and_without_kv_cache(tmp_path, name):
    from archfx.passes.io.hf_export import save_pretrained

    torch.manual_seed(0)
    source = model(name)
    graph = capture(source)
    grown = Pipeline.parse("expand-mlp(factor=2),add-layers(n=1)").run(graph, verify=False).graph
    out = save_pretrained(grown, source, tmp_path / "grown")
    back = type(source).from_pretrained(str(out)).eval()
    assert back.config.num_hidden_layers == source.config.num_hidden_layers + 1
    prompt = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(1))

    def generate(m, cache: bool) -> torch.Tensor:
        with torch.no_grad():
            return m.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=12,
                do_sample=False,
                use_cache=cache,
                pad_token_id=0,
            )

    cached, uncached = generate(back, True), generate(back, False)
    assert cached.shape == (2, 17)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, generate(source, True))  # growth is exact
