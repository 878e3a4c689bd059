"""Precision: fp16 and bf16 models keep their dtype through every pass, and the preserving
ones certify within the dtype's tolerance (ir/verify.py TOLERANCE)."""

import pytest
import torch

from archfx.ir import capture
from archfx.ir.verify import TOLERANCE
from archfx.passes import REGISTRY, Pipeline

from .helpers import model

PIPELINES = [
    "canonicalize",
    "altup(k=2)",
    "ddl(dv=1)",
    "ddl(dv=4)",
    "expand-mlp(factor=2)",
    "add-heads(n=2)",
    "expand-head-dim(size=24)",
    "expand-qk(size=24)",
    "expand-hidden(size=96)",
    "add-layers(n=1)",
    "sdnc",
    "sdnc(addressing=cosine)",
    "sdnc(write=delta)",
    "sdnc(persistent=true)",
]


def test_every_registered_pass_is_covered():
    assert {text.split("(")[0] for text in PIPELINES} == set(REGISTRY)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models_keep_their_dtype(dtype):
    graph = capture(model("tiny-llama").to(dtype))
    for text in PIPELINES:
        result = Pipeline.parse(text).run(graph)
        out, record = result.graph, result.records[-1]
        assert out.run()[0].dtype == dtype, text
        for name, p in out.gm.named_parameters():  # DDL's gates are fp32 by design (SPEC §2)
            assert p.dtype == dtype or (name.startswith("ddl.") and p.dtype == torch.float32), (
                text,
                name,
            )
        if record.preserves:
            assert record.certificate.ok and record.certificate.tolerance == TOLERANCE[dtype], text
