"""Precision: fp16 and bf16 models keep their dtype through every pass; the certificate checks
the math in fp64 (the pass applied to an fp64 copy of its input) and ties the model's own
dtype to it by rounding, so an arithmetic error is rejected in every dtype."""

import pytest
import torch

from archfx.ir import VerificationError, capture
from archfx.passes import REGISTRY, Pipeline
from archfx.passes.rewrites.altup import AltUp

from .helpers import captured, diagonal, model

GROWTHS = [
    "expand-mlp(factor=2)",
    "add-heads(n=2)",
    "expand-head-dim(size=24)",
    "expand-qk(size=24)",
    "expand-hidden(size=96)",
    "add-layers(n=1)",
]


PIPELINES = [
    "canonicalize",
    "altup(k=2)",
    "ddl(dv=1)",
    "ddl(dv=4)",
    *GROWTHS,
    "sdnc",
    "sdnc(addressing=cosine)",
    "sdnc(write=delta)",
    "sdnc(persistent=true)",
    "hc(n=2,dynamic=true)",
    "mhc(n=2,pre=alternating)",
    "resi-dual",
]
MODEL_OF = {"resi-dual": "tiny-bert"}  # post-LN only; every other pipeline runs on tiny-llama


def test_every_registered_pass_is_covered():
    assert {text.split("(")[0] for text in PIPELINES} == set(REGISTRY)


@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, pytest.param(torch.float16, marks=pytest.mark.slow)]
)
def test_low_precision_models_keep_their_dtype(dtype):
    graphs = {}
    for text in PIPELINES:
        name = MODEL_OF.get(text, "tiny-llama")
        if name not in graphs:
            graphs[name] = capture(model(name).to(dtype))
        result = Pipeline.parse(text).run(graphs[name])
        out, record = result.graph, result.records[-1]
        assert out.run()[0].dtype == dtype, text
        for name, p in out.gm.named_parameters():  # DDL's gates: fp32 by design (docs/passes.md)
            assert p.dtype == dtype or (name.startswith("ddl.") and p.dtype == torch.float32), (
                text,
                name,
            )
        if record.preserves:
            cert = record.certificate
            assert cert.ok and cert.precision == "float64" and cert.math_diff <= 1e-9, text
            assert cert.rounding["violations"] == [], text


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _bugged(base, edit, only_low_precision=False):
    """`base` with `edit(name, tensor)` applied to the parameters it creates or changes: an
    arithmetic bug in a pass. `only_low_precision`: the bug is in the pass's low-precision path
    only (its fp64 run is right), which only the rounding check can see."""

    class Bugged(base):
        def run(self, graph):
            before = {k: v.clone() for k, v in graph.gm.state_dict().items()}
            result = super().run(graph)
            low = next(graph.gm.parameters()).dtype != torch.float64
            if low or not only_low_precision:
                with torch.no_grad():
                    for name, t in graph.gm.named_parameters():
                        old = before.get(name)
                        if old is None or old.shape != t.shape or not torch.equal(old, t):
                            edit(name, t)
            return result

    return Bugged


@pytest.mark.parametrize("dtype", [*DTYPES[:2], pytest.param(DTYPES[2], marks=pytest.mark.slow)])
def test_altup_gain_error_rejected_in_every_dtype(dtype):
    """AltUp's correction gain g = 0.98 instead of 1 changes the function by ~1e-2: in fp32,
    bf16 and fp16 alike the certificate must reject it (bf16's own rounding is larger)."""
    graph = capture(model("tiny-llama").to(dtype))
    assert Pipeline([AltUp(k=2)]).run(graph).records[-1].certificate.ok

    def gain(name, t):
        if name.endswith(".correct"):
            t.mul_(0.98)

    with pytest.raises(VerificationError, match="of its scale in float64"):
        Pipeline([_bugged(AltUp, gain)(k=2)]).run(graph)


@pytest.mark.parametrize(("text", "dtype"), diagonal(GROWTHS, DTYPES))
def test_one_percent_growth_error_rejected_in_every_dtype(text, dtype):
    """A 1% error in the weights a growth creates or rescales: rejected in every dtype, both when
    the error is in the math (the fp64 rewrite differs) and when it is only in the model's
    dtype (the parameters are then not the fp64 rewrite rounded once)."""
    graph = capture(model("tiny-llama").to(dtype))
    (p,) = Pipeline.parse(text).passes
    base, options = type(p), p.given
    assert Pipeline([base(**options)]).run(graph).records[-1].certificate.ok

    def one_percent(name, t):  # off by 1% of the tensor's scale (a zero tensor: of 0.02)
        scale = float(t.abs().max())
        t.add_(0.01 * (scale if scale > 0 else 0.02))

    with pytest.raises(VerificationError, match="of its scale in float64"):
        Pipeline([_bugged(base, one_percent)(**options)]).run(graph)

    def one_percent_low(name, t):
        t.mul_(1.01)

    with pytest.raises(VerificationError, match="rounded once to their dtype"):
        Pipeline([_bugged(base, one_percent_low, only_low_precision=True)(**options)]).run(graph)


def test_every_exact_pass_gets_a_tight_fp64_certificate():
    """The math of an exact rewrite agrees in fp64 to ~1e-15: the certificate holds it to 1e-9
    of each output's own scale, and reports the model's own dtype beside it."""
    graphs = {"tiny-gpt2": captured("tiny-gpt2"), "tiny-bert": captured("tiny-bert")}
    for text in PIPELINES:
        text = text.replace("expand-hidden(size=96)", "expand-hidden(factor=2)")  # LayerNorm
        graph = graphs["tiny-bert" if text in MODEL_OF else "tiny-gpt2"]
        record = Pipeline.parse(text).run(graph).records[-1]
        if not record.preserves:
            continue
        cert = record.certificate
        assert cert.precision == "float64" and cert.tolerance == 1e-9, text
        assert cert.math_diff <= 1e-12, (text, cert.per_output)
        assert cert.max_abs_diff <= 1e-5 and cert.input_rounding > 0, text
