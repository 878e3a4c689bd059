"""The pass contract and the pipeline text: parsing, printing, options, errors; what a run
leaves behind: the input graph untouched, a reproducer when a pass fails."""

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from archfx.ir import PassError, PassFailure, VerificationError
from archfx.passes import REGISTRY, Option, Pass, PassResult, Pipeline, register

from .helpers import captured


@pytest.fixture
def toy_pass():
    """A pass with one option of every kind (registered for the test only)."""

    class Toy(Pass):
        name = "toy-pass"
        summary = "test-only"
        options = (
            Option("k", int, 2, "an integer ≥ 1", minimum=1),
            Option("beta", float, 1.0, "in (0, 2]", minimum=0.0, maximum=2.0),
            Option("flag", bool, False, "a switch"),
            Option("mode", str, "static", "a choice", choices=("static", "router")),
        )

        def run(self, graph):
            return PassResult(changed=False)

    register(Toy)
    yield Toy
    del REGISTRY["toy-pass"]


def test_canonicalize_is_registered_and_documented():
    cls = REGISTRY["canonicalize"]
    assert cls.exact_when == {} and cls().claims_exact()
    import archfx.passes.rewrites.canonicalize as module

    assert "Exactness" in module.__doc__ and "Rewrite" in module.__doc__


def test_round_trip(toy_pass):
    for text in [
        "canonicalize",
        "toy-pass(k=3)",
        "toy-pass(k=3,mode=router),canonicalize",
        "toy-pass(beta=0.5,flag=true)",
    ]:
        assert str(Pipeline.parse(text)) == text


def test_whitespace_and_empty_parens(toy_pass):
    assert (
        str(Pipeline.parse(" toy-pass ( k = 4 ) , canonicalize() ")) == "toy-pass(k=4),canonicalize"
    )


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {},
            optional={
                "k": st.integers(1, 64),
                "beta": st.floats(0.0, 2.0, allow_nan=False).map(lambda x: round(x, 3)),
                "flag": st.booleans(),
                "mode": st.sampled_from(["static", "router"]),
            },
        ),
        min_size=1,
        max_size=4,
    )
)
def test_round_trip_property(opts_list):
    class Toy(Pass):
        name = "toy-prop"
        summary = "test-only"
        options = (
            Option("k", int, 2, "", minimum=1),
            Option("beta", float, 1.0, "", minimum=0.0, maximum=2.0),
            Option("flag", bool, False, ""),
            Option("mode", str, "static", "", choices=("static", "router")),
        )

        def run(self, graph):
            return PassResult(changed=False)

    REGISTRY["toy-prop"] = Toy
    try:
        pipeline = Pipeline([Toy(**o) for o in opts_list])
        text = str(pipeline)
        again = Pipeline.parse(text)
        assert str(again) == text
        assert [p.opts for p in again.passes] == [p.opts for p in pipeline.passes]
    finally:
        del REGISTRY["toy-prop"]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty pipeline"),
        ("canonicalise", "did you mean canonicalize"),
        ("toy-pass(k=0)", "must be ≥ 1"),
        ("toy-pass(k=two)", "expects an integer"),
        ("toy-pass(beta=3)", "must be ≤ 2"),
        ("toy-pass(flag=maybe)", "true or false"),
        ("toy-pass(mode=dynamic)", "must be one of static, router"),
        ("toy-pass(kk=2)", "unknown option 'kk' (did you mean k"),
        ("toy-pass(k=2,k=3)", "given twice"),
        ("toy-pass(k=2", "column 13: expected ',' or ')'"),
        ("toy-pass(k 2)", "expected '='"),
        ("toy-pass,,canonicalize", "column 10: expected a pass name"),
        ("toy-pass canonicalize", "expected ',' between passes"),
        ("toy-pass(=2)", "expected an option name"),
    ],
)
def test_bad_pipelines_say_why(toy_pass, text, fragment):
    with pytest.raises(PassError) as info:
        Pipeline.parse(text)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_options_checked_when_built_from_python(toy_pass):
    with pytest.raises(PassError, match="must be ≥ 1"):
        toy_pass(k=0)
    with pytest.raises(PassError, match="unknown option"):
        toy_pass(q=1)
    assert toy_pass(k=5).opts == {"k": 5, "beta": 1.0, "flag": False, "mode": "static"}


@pytest.fixture
def breaking_pass():
    """A pass that rewires the graph, then fails like a buggy pass would."""

    class Breaking(Pass):
        name = "breaking-pass"
        summary = "test-only"

        def run(self, graph):
            out = graph.gm.graph.output_node()
            out.args = (tuple(reversed(out.args[0])),)  # a change the failure leaves behind
            raise RuntimeError("bug in the pass")

    register(Breaking)
    yield Breaking
    del REGISTRY["breaking-pass"]


def _state(graph):
    return graph.gm.code, {k: v.clone() for k, v in graph.gm.state_dict().items()}


@pytest.mark.parametrize("verify", [False, True])
def test_the_input_graph_is_never_modified(verify):
    graph = captured("tiny-llama")
    code, tensors = _state(graph)
    # ddl(value=paper) claims no exactness: with verify on too, it edits the copy add-layers made
    text = "canonicalize,expand-mlp(factor=2),add-layers(n=1),ddl(dv=1,value=paper)"
    out = Pipeline.parse(text).run(graph, verify=verify).graph
    assert out.gm.code != code
    assert graph.gm.code == code
    after = graph.gm.state_dict()
    assert after.keys() == tensors.keys()
    assert all(torch.equal(after[k], t) for k, t in tensors.items())


@pytest.mark.parametrize("verify", [False, True])
def test_a_failing_pass_leaves_the_ir_it_received(breaking_pass, tmp_path, verify):
    graph = captured("tiny-llama")
    code = graph.gm.code
    received = Pipeline.parse("canonicalize,altup(k=2)").run(graph, verify=False).graph.gm.code
    with pytest.raises(PassFailure, match="bug in the pass; reproducer in") as err:
        Pipeline.parse("canonicalize,altup(k=2),breaking-pass").run(
            graph, verify=verify, dump_dir=tmp_path
        )
    assert str(tmp_path) in str(err.value)
    assert (tmp_path / "input-graph.py").read_text() == received
    assert "failed at pass 2: breaking-pass" in (tmp_path / "pipeline.txt").read_text()
    assert "RuntimeError: bug in the pass" in (tmp_path / "error.txt").read_text()
    assert graph.gm.code == code


def test_a_refusal_names_the_pass_once():
    graph = captured("tiny-gpt2")  # LayerNorm: only duplication is exact
    with pytest.raises(PassError) as err:
        Pipeline.parse("canonicalize,expand-hidden(size=96)").run(graph)
    message = str(err.value)
    assert message.startswith("expand-hidden(size=96): this model normalises its stream")
    assert message.count("expand-hidden") == 1 and "\n" not in message


def test_a_broken_ir_names_the_pass_and_its_reproducer(tmp_path, monkeypatch):
    """A pass whose ops do not compose fails the shape check: one line naming the pass and the
    reproducer, which lies under $ARCHFX_CACHE/reproducers (not loose in the temp directory)."""
    monkeypatch.setenv("ARCHFX_CACHE", str(tmp_path))

    class BadExpand(Pass):
        name = "bad-expand"
        summary = "test-only"

        def run(self, graph):
            ids = graph.placeholders[0]
            with graph.gm.graph.inserting_after(ids):
                graph.gm.graph.call_function(torch.ops.aten.expand.default, (ids, [5, 8]))
            graph.gm.recompile()
            return PassResult(changed=True)

    graph = captured("tiny-llama")
    with pytest.raises(VerificationError) as err:
        Pipeline([BadExpand()]).run(graph, verify=False)
    message = str(err.value)
    assert message.startswith("bad-expand: shape check failed at node expand")
    assert "\n" not in message and message.count("bad-expand") == 1
    where = Path(message.rsplit("reproducer in ", 1)[1])
    assert where.parent == tmp_path / "reproducers"
    assert "failed at pass 0: bad-expand" in (where / "pipeline.txt").read_text()


def test_exactness_is_declared_once_and_checked_at_registration():
    sdnc = REGISTRY["sdnc"]
    assert sdnc().claims_exact() and not sdnc(write="delta").claims_exact()
    assert sdnc.exact_when_text() == "addressing=dot, write=once, persistent=false"
    assert REGISTRY["canonicalize"].exact_when_text() == "always"

    class Wrong(Pass):
        name = "wrong-exactness"
        summary = "test-only"
        options = (Option("mode", str, "a", "a choice", choices=("a", "b")),)
        exact_when = {"mode": ("c",)}

    with pytest.raises(PassError, match="must be one of a, b"):
        register(Wrong)
    Wrong.exact_when = {"method": ("a",)}
    with pytest.raises(ValueError, match="not an option"):
        register(Wrong)
    assert "wrong-exactness" not in REGISTRY


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("ddl(dv=1),ddl(dv=2)", "ddl.*needs residual adds.*ddl\\(dv=1\\) before it.*DDL"),
        ("altup(k=2),altup(k=3)", "altup.*needs layers.*altup\\(k=2\\) before it.*AltUp"),
        (
            "altup(k=2),ddl(dv=4)",
            "ddl\\(dv=4\\): a site state wider .* apply the site scheme before altup",
        ),
        ("sdnc,canonicalize,sdnc", "sdnc: needs attention that is not yet a memory read"),
        ("expand-qk(size=32),expand-qk(size=24)", "24 is smaller than the 32"),
    ],
)
def test_orders_no_model_allows_are_refused_when_parsed(text, why):
    with pytest.raises(PassError, match=why):
        Pipeline.parse(text)


def test_orders_the_passes_allow_parse():
    for text in (
        "ddl,canonicalize",
        "expand-mlp(factor=2),ddl",
        "altup(k=2),expand-hidden(factor=2),add-layers(n=1)",
        "sdnc,expand-mlp(factor=2),altup(k=2)",
        "altup(k=2),ddl(dv=1,value=compat)",
        "ddl(dv=4,value=compat),altup(k=2)",
        "ddl,expand-mlp(factor=2),add-heads(n=2),add-layers(n=1)",
        "sdnc,expand-mlp(factor=2),altup(k=2),ddl(dv=1,value=compat)",
        "expand-qk(size=24,layers=0),expand-qk(size=16,layers=1)",
    ):
        Pipeline.parse(text)  # not refused


def test_a_graph_remembers_its_passes_and_refuses_an_order_after_them():
    first = Pipeline.parse("ddl").run(captured("tiny-llama"), verify=False).graph
    assert first.provenance["pipeline"] == "ddl"
    with pytest.raises(PassError, match="ddl\\(dv=2\\): needs residual adds.*ddl before it"):
        Pipeline.parse("ddl(dv=2)").run(first)
    again = Pipeline.parse("canonicalize").run(first, verify=False).graph
    assert again.provenance["pipeline"] == "ddl,canonicalize"
