"""Property-based: random pipelines of the registered passes stay exact, round-trip as text,
and never touch the input graph or model."""

import functools

import torch
from hypothesis import given
from hypothesis import strategies as st

from archfx.ir import capture
from archfx.passes import Pipeline
from archfx.passes.io.zoo import build

MODELS = ["tiny-llama", "tiny-gpt2", "tiny-t5", "tiny-bert", "tiny-gpt-neox"]


@functools.cache
def captured(name):
    model = build(name)
    return model, capture(model)


altup = st.builds(
    lambda k, schedule, coefficients, readout: (
        f"altup(k={k},schedule={schedule},coefficients={coefficients},readout={readout})"
    ),
    st.integers(1, 4),
    st.sampled_from(["alternating", "same"]),
    st.sampled_from(["static", "router"]),
    st.just("mean"),
)
pipelines = st.tuples(st.booleans(), st.one_of(st.none(), altup), st.booleans()).map(
    lambda t: (
        ",".join(
            p
            for p in ["canonicalize" if t[0] else None, t[1], "canonicalize" if t[2] else None]
            if p
        )
        or "canonicalize"
    )
)


@given(st.sampled_from(MODELS), pipelines)
def test_random_pipelines_are_exact_and_leave_the_input_alone(name, text):
    model, graph = captured(name)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    code, params = graph.gm.code, {k: v.clone() for k, v in graph.gm.state_dict().items()}
    pipeline = Pipeline.parse(text)
    assert str(Pipeline.parse(str(pipeline))) == str(pipeline)
    result = pipeline.run(graph)
    assert all(r.certificate.ok for r in result.records)
    assert graph.gm.code == code
    assert all(torch.equal(params[k], v) for k, v in graph.gm.state_dict().items())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert len(result.graph.structure.blocks) == len(graph.structure.blocks)
