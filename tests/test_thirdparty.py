"""Recognition on Transformers written outside Hugging Face transformers (issue 16).

The third-party zoo (tests/thirdparty.py): 23 tiny random models from x-transformers, litgpt,
torchtune, ibm-fms, PaLM-rlhf-pytorch, fair-esm, vit-pytorch and torch.nn, each with the truth
read from the library's own config and modules. For every model:

- the structure archfx recognises equals that truth (blocks per stack, width, heads, key/value
  heads, head size, MLP, activation, norm and its gain, placement, cross-attention, RoPE,
  experts, shared weights, tied head), or archfx refuses the model naming the construct;
- every pass in the registry is exact (fp64 certificate) or refused with its reason — never a
  shape-check or certificate failure;
- the passes that rewrite sites rewrite all of them (AltUp every block, DDL every residual
  site, sDNC every attention), or say why in their remarks.

`make test` checks every structure and runs every pass on a sample (`SAMPLE`); `make test-all`
runs every pass on every model. A library that does not
import here skips its models with the import error (tests/thirdparty-requirements.txt, which
`make install` installs, has them all).
"""

from __future__ import annotations

import functools

import pytest
import torch

from archfx.ir import AnalysisError, PassError, VerificationError, capture
from archfx.passes import Pipeline

from .helpers import sampled
from .thirdparty import (
    AVAILABLE,
    HF_HELD_OUT,
    MISSING,
    THIRDPARTY,
    mismatches,
    pass_texts,
    recognised,
)

# every pass on these in the default run (structures of the whole zoo are checked in every
# run): einsum attention in alternating layer lists, litgpt's fused GQA with RoPE outside the
# blocks, and a ModuleList-pairs ViT whose adds run in the owner (Qwen2-MoE's experts and
# Phi-3's q | k | v slices of one GQA projection under `make test-all`)
SAMPLE = ("xt-gqa-swiglu", "litgpt-llama", "vitp-vit")
# models archfx refuses as a whole, and what the refusal must name
REFUSED_MODELS = {
    "esm2": "branches on tensor values",  # capture: `padding_mask.any()` decides a branch
}
ENTRIES = {**THIRDPARTY, **HF_HELD_OUT}


@functools.cache
def _captured(name: str):
    if name in THIRDPARTY and name not in AVAILABLE:
        pytest.skip(f"{THIRDPARTY[name].library} does not import: {MISSING[name]}")
    model, example = ENTRIES[name].build()
    truth = ENTRIES[name].truth(model)
    return truth, capture(model, example)


@pytest.mark.parametrize("name", list(THIRDPARTY))
def test_structure_is_the_librarys_or_refused(name):
    if name in REFUSED_MODELS:
        with pytest.raises(Exception, match=REFUSED_MODELS[name]):
            _captured(name)
        return
    truth, graph = _captured(name)
    found = graph.found_structure
    assert not found.partial, f"{name}: refused ({'; '.join(found.unrecognised)})"
    assert mismatches(truth, recognised(found.to_json())) == []


_DEFAULTS = {"heads": None, "kv_heads": None, "head_dim": None}


def _rewrites_all_sites(text: str, record, structure) -> None:
    """The sites a pass rewrote against the sites the structure holds (or remarks saying why
    fewer)."""
    name, details = text.split("(")[0], record.details
    blocks = structure.blocks
    expected = {
        "altup": ("layers", len(blocks)),
        "ddl": ("sites", sum(len(b.residuals) for b in blocks)),
        "hc": ("sites", sum(len(b.residuals) for b in blocks)),
        "mhc": ("sites", sum(len(b.residuals) for b in blocks)),
        "resi-dual": ("sites", sum(len(b.residuals) for b in blocks)),
        "sdnc": ("sites", sum(1 for b in blocks for r in b.residuals if r.attention)),
    }.get(name)
    if expected is None:
        return
    key, count = expected
    assert details[key] == count or record.remarks, (
        f"{text} rewrote {details[key]} of {count} sites with no remark"
    )


@pytest.mark.parametrize("name", list(HF_HELD_OUT))
def test_hugging_face_families_outside_the_zoo(name):
    """Phi-3, Granite, Mixtral, OLMoE, Qwen2-MoE, Persimmon, Nemotron, ModernBERT, DeBERTa-v2,
    CLIP text, Whisper, Swin: blocks per stack, widths and heads as their configs say."""
    truth, graph = _captured(name)
    found = recognised(graph.structure.to_json())
    tb = truth["blocks"]
    assert found["blocks"] == (tb if isinstance(tb, list) else [tb])
    assert found["hidden_size"] == truth["hidden_size"]
    heads = truth["heads"][0] if isinstance(truth["heads"], list) else truth["heads"]
    assert found["heads"] == heads
    for key in ("kv_heads", "head_dim"):
        if key in truth:
            assert found[key] == truth[key], key


@pytest.mark.parametrize("name", sampled(sorted(set(ENTRIES) - set(REFUSED_MODELS)), SAMPLE))
def test_every_pass_is_exact_or_refused(name):
    truth, graph = _captured(name)
    found = graph.found_structure
    texts = pass_texts({**_DEFAULTS, **truth}, recognised(found.to_json()))
    for text in texts:
        try:
            result = Pipeline.parse(text).run(graph)
        except (PassError, AnalysisError) as exc:  # a refusal: its reason is in the message
            assert str(exc).startswith(text.split("(")[0]) or "structure is partial" in str(exc)
            continue
        except VerificationError as exc:  # a shape check or a certificate: a broken claim
            pytest.fail(f"{name}: {exc}")
        record = result.records[-1]
        assert record.certificate is not None and record.certificate.ok, (name, text)
        _rewrites_all_sites(text, record, graph.structure)


@pytest.mark.parametrize("name", sampled(sorted(set(ENTRIES) - set(REFUSED_MODELS)), SAMPLE))
def test_dnc_options_run_or_refuse(name):
    """sdnc's options that change the function (cosine addressing, the delta-rule write) run on
    every model or are refused naming the reason; a delta-rule memory stays causal: a later
    token leaves the outputs at earlier positions as they were."""
    _, graph = _captured(name)
    for text in ("sdnc(addressing=cosine)", "sdnc(write=delta)"):
        try:
            out = Pipeline.parse(text).run(graph).graph
        except (PassError, AnalysisError) as exc:
            assert str(exc).startswith("sdnc") or "structure is partial" in str(exc), exc
            continue
        ids = out.inputs.tensors[0]
        a = out.run()[0]
        assert a.isfinite().all(), (name, text)
        if text == "sdnc(write=delta)" and a.shape[:2] == ids.shape:  # per-token outputs
            later = ids.clone()
            later[:, -1] = (later[:, -1] + 1) % int(ids.max() + 1)
            with torch.no_grad():
                b = out(later, *out.inputs.tensors[1:])[0]
            # equal up to rounding: experts batch the tokens routed to them, which moves bits
            torch.testing.assert_close(a[:, :-1], b[:, :-1], atol=1e-5, rtol=0)


def test_the_zoo_spans_four_libraries_and_twelve_models():
    libraries = {e.library for e in THIRDPARTY.values()}
    assert len(THIRDPARTY) >= 12 and len(libraries - {"torch"}) >= 4, libraries


def test_capture_leaves_the_users_model_as_it_was():
    """PaLM creates its rotary tables and causal mask on the first call: export ran that call
    on fake tensors, which stayed on the model (issue 16's survey: 2.5× off afterwards)."""
    if "palm" not in AVAILABLE:
        pytest.skip(MISSING["palm"])
    model, example = THIRDPARTY["palm"].build()
    reference, _ = THIRDPARTY["palm"].build()
    capture(model, example)
    with torch.no_grad():
        assert torch.equal(model(*example), reference(*example))
