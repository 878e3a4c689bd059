"""The pipeline's shape check: incremental propagation (only what a pass touched) gives the
shapes a full propagation gives, and every pass runs on a model on the meta device (structure
only, no values), keeping its new parameters there."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from archfx.ir import Graph, PassError, capture
from archfx.ir.verify import refresh_shapes
from archfx.passes import Pipeline
from archfx.passes.io.zoo import BUILTINS

from .helpers import captured
from .test_precision import MODEL_OF, PIPELINES


def shapes(graph) -> dict[str, str]:
    """Each node's symbolic shape, dtype and device. Not strides: a full propagation may write
    the same stride as another expression (64 vs Min(64, 64*s0) for s0 ≥ 1)."""

    def one(v):
        if isinstance(v, torch.Tensor):
            return f"{tuple(map(str, v.shape))} {v.dtype} {v.device}"
        if isinstance(v, (tuple, list)):
            return "(" + ", ".join(one(x) for x in v) + ")"
        return str(v)

    return {n.name: one(n.meta.get("val")) for n in graph.gm.graph.nodes}


def on_meta(name: str) -> Graph:
    """A built-in model built on the meta device (structure only) and captured there."""
    with torch.device("meta"):
        return capture(BUILTINS[name].factory().eval())


@pytest.mark.parametrize(
    "name", [pytest.param("tiny-llama", marks=pytest.mark.slow), "tiny-gpt2", "tiny-bert"]
)
def test_incremental_shapes_equal_a_full_propagation(name):
    graph = captured(name)
    growth = "expand-hidden(size=96),add-layers(n=1),expand-mlp(factor=2)"
    for text in [*PIPELINES, growth]:
        if MODEL_OF.get(text, name) != name or (name == "tiny-bert" and text not in MODEL_OF):
            continue  # tiny-bert runs the post-LN pipelines, the decoders every other one
        if name == "tiny-gpt2":  # LayerNorm: hidden growth by duplication only
            text = text.replace("expand-hidden(size=96)", "expand-hidden(size=128)")
        out = Pipeline.parse(text).run(graph, verify=False).graph
        incremental = shapes(out)
        refresh_shapes(out)  # from scratch
        assert shapes(out) == incremental, text


def test_every_pass_runs_on_the_meta_device():
    graphs = {name: on_meta(name) for name in {"tiny-llama", *MODEL_OF.values()}}
    for text in PIPELINES:
        graph = graphs[MODEL_OF.get(text, "tiny-llama")]
        if text in ("sdnc(write=delta)", "sdnc(persistent=true)"):  # check by running: refused
            with pytest.raises(PassError, match="meta device"):
                Pipeline.parse(text).run(graph, verify=False)
            continue
        out = Pipeline.parse(text).run(graph, verify=False).graph
        devices = {t.device.type for t in [*out.gm.parameters(), *out.gm.buffers()]}
        assert devices == {"meta"}, (text, devices)


def test_repeated_ops_on_different_constants_keep_their_own_shapes():
    """Propagation reuses the result of an op repeated on same-layout inputs, but not when it
    reads a value: `item()` of the constants 3 and 5 sizes two different tensors."""
    root = torch.nn.Module()
    root.register_buffer("c3", torch.tensor(3))
    root.register_buffer("c5", torch.tensor(5))
    g = torch.fx.Graph()
    x = g.placeholder("x")
    outs = []
    for name in ["c3", "c5"]:
        lifted = g.call_function(torch.ops.aten.lift_fresh_copy.default, (g.get_attr(name),))
        size = g.call_function(torch.ops.aten._local_scalar_dense.default, (lifted,))
        outs.append(g.call_function(torch.ops.aten.new_zeros.default, (x, [size])))
    g.output(tuple(outs))
    mode = FakeTensorMode(shape_env=ShapeEnv())
    x.meta["val"] = mode.from_tensor(torch.zeros(2))
    graph = Graph(torch.fx.GraphModule(root, g), None, ["a", "b"], {}, {})
    refresh_shapes(graph, since={})  # every node new: all propagated incrementally
    assert [tuple(o.meta["val"].shape) for o in outs] == [(3,), (5,)]
