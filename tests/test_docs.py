"""The code in the docs runs: the "Extending archfx" example pass (docs/architecture.md)."""

import re
from pathlib import Path

import pytest
import torch

from archfx.ir import capture
from archfx.passes import REGISTRY, Pipeline

from .helpers import model

DOC = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"


@pytest.fixture
def temperature_pass():
    text = DOC.read_text().split("### A new pass", 1)[1]
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    exec(compile(code, str(DOC), "exec"), {})
    yield REGISTRY["temperature"]
    del REGISTRY["temperature"]


def test_the_example_pass_in_the_docs_runs_and_is_certified(temperature_pass):
    m = model("tiny-llama").eval()
    graph = capture(m)
    exact = Pipeline.parse("temperature(t=1.0)").run(graph)
    assert exact.records[0].certificate.ok
    hot = Pipeline.parse("ddl,temperature(t=2.0)").run(graph)  # after any pass
    assert not hot.records[-1].preserves and hot.records[-1].certificate is None
    x = graph.inputs.tensors[0]
    with torch.no_grad():
        want = m(x).logits / 2
    assert torch.allclose(hot.graph(x)[0], want, atol=1e-5)
    assert temperature_pass.exact_when_text() == "t=1.0"


def test_the_pass_tables_in_the_docs_are_the_registrys():
    # README's overview and docs/passes.md's options are `archfx passes --markdown` output:
    # a pass whose declaration changed without regenerating them fails here
    from archfx.passes.infra.base import markdown_overview, markdown_reference

    root = DOC.parent.parent
    assert markdown_overview() in (root / "README.md").read_text()
    assert markdown_reference() in (root / "docs" / "passes.md").read_text()
