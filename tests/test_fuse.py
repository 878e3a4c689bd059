"""archfx's ONNX Runtime fusion stage (ir/fuse.py): what fuses, the report, and the check that
undoes a wrong rewrite."""

import functools

import numpy as np
import onnx
import pytest
import torch
from onnxscript.rewriter import pattern

from archfx.ir.fuse import fuse
from archfx.ir.lower import TOLERANCE, ort_session, run_onnx, to_onnx
from archfx.ir.verify import compare
from archfx.passes import Pipeline

from .helpers import captured


@functools.cache
def graph(name):
    return Pipeline.parse("canonicalize").run(captured(name)).graph


def ops(path):
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


@pytest.mark.parametrize(
    "name, attention, fused_kinds",
    [
        pytest.param(
            "tiny-llama", "MultiHeadAttention", {"attention", "norm"}, marks=pytest.mark.slow
        ),
        ("tiny-gpt2", "MultiHeadAttention", {"attention", "norm"}),
        ("tiny-bert", "Attention", {"attention", "norm", "gelu"}),
    ],
)
def test_attention_fuses_and_every_site_is_accounted_for(tmp_path, name, attention, fused_kinds):
    g = graph(name)
    result = to_onnx(g, tmp_path / "m.onnx")
    report = result.fusions
    assert result.max_abs_diff <= TOLERANCE
    assert attention in ops(result.path)
    layers = len(g.structure.stacks[0].blocks)
    sites = [s for s in report.sites if s.kind == "attention"]
    assert len(sites) == layers and all(s.fused == attention for s in sites)
    for kind in fused_kinds:
        assert all(s.fused for s in report.sites if s.kind == kind), report.lines()
    for s in report.sites:  # a site either became an operator or says why not
        assert s.fused or s.reason, s
        assert s.scope  # named by the module that computes it
    kept = [gr for gr in report.groups if gr.fusions and gr.kept]
    assert kept and all(gr.max_abs_diff <= TOLERANCE for gr in kept)
    text = "\n".join(report.lines())
    assert f"attention {sites[0].scope}: → {attention}" in text


def test_hand_written_attention_fuses_through_masked_fill_as_bias(tmp_path):
    # nanoGPT: masked_fill(mask, -inf) of the scores; archfx's MaskedFillAsBias makes it match
    report = to_onnx(graph("nanogpt"), tmp_path / "m.onnx").fusions
    assert [s.fused for s in report.sites if s.kind == "attention"] == ["MultiHeadAttention"] * 2


def test_unfused_sites_say_why(tmp_path):
    # BLOOM adds ALiBi through baddbmm on 3-D scores: no attention pattern takes it
    g = Pipeline.parse("canonicalize").run(captured("family:bloom")).graph
    report = to_onnx(g, tmp_path / "m.onnx").fusions
    missed = [s for s in report.sites if s.kind == "attention"]
    assert len(missed) == 2 and all(s.fused is None for s in missed)
    assert all(s.reason.startswith(("GQA", "SDPA", "MHA")) for s in missed), missed


def test_a_model_onnxscripts_clean_up_breaks_is_fused_as_exported(tmp_path):
    # OPT: onnxscript's pre-fusion optimisation yields a Reshape ONNX Runtime refuses
    g = Pipeline.parse("canonicalize").run(captured("family:opt")).graph
    result = to_onnx(g, tmp_path / "m.onnx")
    assert result.max_abs_diff <= TOLERANCE
    assert any("pre-fusion optimisation broke" in n for n in result.fusions.notes)
    assert all(s.fused for s in result.fusions.sites if s.kind == "attention")


def test_skip_norm_is_left_out_on_cpu(tmp_path):
    report = to_onnx(graph("tiny-llama"), tmp_path / "m.onnx").fusions
    skip = next(gr for gr in report.groups if gr.name == "skip-norm")
    assert not skip.kept and "slower" in skip.reason
    assert not ops(tmp_path / "m.onnx") & {
        "SkipLayerNormalization",
        "SkipSimplifiedLayerNormalization",
    }


def _softmax(op, x):
    return op.Softmax(x, axis=-1)


def _sigmoid(op, x):
    return op.Sigmoid(x)


def test_a_rewrite_that_changes_the_outputs_is_undone(tmp_path):
    g = graph("tiny-gpt2")
    raw = to_onnx(g, tmp_path / "raw.onnx", optimize=False).path
    expected = g.run(g.inputs)

    def check(path):  # per output; "steady" stands for an output no rewrite touches
        got = [torch.from_numpy(np.asarray(a)) for a in run_onnx(ort_session(path), g.inputs)]
        return {**compare(expected, got, g.output_names), "steady": 1e-5}

    wrong = pattern.RewriteRuleSet([pattern.RewriteRule(_softmax, _sigmoid)])
    report = fuse(
        raw,
        tmp_path / "fused.onnx",
        providers=["CPUExecutionProvider"],
        check=check,
        tolerance=TOLERANCE,
        groups={"attention": [wrong]},
    )
    group = report.groups[0]
    assert group.fusions == 2 and not group.kept and group.max_abs_diff > 0.01
    assert "changed the outputs" in group.reason and f"output {g.output_names[0]}:" in group.reason
    assert group.errors["steady"] == 1e-5 and report.baseline["steady"] == 1e-5
    assert "Softmax" in ops(tmp_path / "fused.onnx") and "Sigmoid" not in ops(
        tmp_path / "fused.onnx"
    )
    assert max(check(tmp_path / "fused.onnx").values()) <= TOLERANCE
    assert all("undone" in s.reason for s in report.sites if s.kind == "attention")


def test_fuse_can_be_turned_off(tmp_path):
    result = to_onnx(graph("tiny-gpt2"), tmp_path / "m.onnx", fuse=False)
    assert result.fusions is None and "MultiHeadAttention" not in ops(result.path)


@pytest.mark.parametrize(
    "pipeline", ["altup(k=2)", pytest.param("ddl(dv=4)", marks=pytest.mark.slow)]
)
def test_rewritten_models_fuse_the_same_sites(tmp_path, pipeline):
    g = Pipeline.parse(pipeline + ",canonicalize").run(graph("tiny-llama")).graph
    result = to_onnx(g, tmp_path / "m.onnx")
    assert result.max_abs_diff <= TOLERANCE
    assert result.fusions.counts()["attention"] == (2, 2)
    assert result.fusions.counts()["norm"] == (5, 5)
