"""Hostile input: pipeline text and option values from a fuzzer never produce a traceback —
either a result whose certificates hold, or an ArchfxError naming what is wrong."""

import functools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from archfx.ir import PassError
from archfx.passes import REGISTRY, Pipeline

from .helpers import captured

VALID = [
    "canonicalize",
    "altup(k=2)",
    "ddl(dv=2,value=compat)",
    "expand-mlp(factor=2),add-layers(n=1)",
    "expand-qk(size=24,layers=0-1)",
]
ALPHABET = "abcdefghijklmnopqrstuvwxyz-_(),=.0123456789 \t'\"[]{}+*/\\é"


@functools.cache
def llama():
    return captured("tiny-llama")


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(ALPHABET, max_size=40), st.sampled_from(VALID)), st.data())
def test_pipeline_text_parses_or_says_where(text, data):
    ops = data.draw(
        st.lists(
            st.tuples(st.integers(0, 2), st.integers(0, 200), st.sampled_from(ALPHABET)), max_size=4
        )
    )
    chars = list(text)
    for op, at, ch in ops:
        if op == 0:
            chars.insert(at % (len(chars) + 1), ch)
        elif chars:
            i = at % len(chars)
            if op == 1:
                del chars[i]
            else:
                chars[i] = ch
    text = "".join(chars)
    try:
        pipeline = Pipeline.parse(text)
    except PassError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert str(Pipeline.parse(str(pipeline))) == str(pipeline)


values = st.one_of(
    st.integers(-3, 12).map(str),
    st.sampled_from(
        [
            "0.5",
            "1.5",
            "2",
            "-1",
            "1e9",
            "nan",
            "inf",
            "true",
            "false",
            "all",
            "0-1",
            "1-0",
            "x",
            "",
        ]
    ),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(REGISTRY)), st.data())
def test_random_options_run_or_refuse(name, data):
    cls = REGISTRY[name]
    chosen = (
        data.draw(st.lists(st.sampled_from([o.name for o in cls.options]), unique=True, max_size=3))
        if cls.options
        else []
    )
    args = ",".join(f"{k}={data.draw(values)}" for k in chosen)
    text = f"{name}({args})" if args else name
    try:
        result = Pipeline.parse(text).run(llama())
    except PassError as exc:
        assert str(exc) and "\n" not in str(exc), text
        return
    assert all(r.certificate is None or r.certificate.ok for r in result.records), text
