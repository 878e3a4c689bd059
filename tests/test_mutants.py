"""The mutation harness stays in step with the code: every mutant's snippet occurs exactly once
in its file (a refactor that moves or rewrites the code it breaks makes the mutant stale, and
`make mutants` would report it only when run), and the tests it names exist."""

import pathlib
import re

import pytest

from .mutants import MUTANTS

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_mutant_is_current(mutant):
    source = (ROOT / mutant.file).read_text()
    assert source.count(mutant.snippet) == 1, (
        f"{mutant.file}: snippet found {source.count(mutant.snippet)} times"
    )
    for test in mutant.tests:
        path, _, name = test.partition("::")
        text = (ROOT / path).read_text()
        if name:
            function = re.sub(r"\[.*$", "", name)
            assert f"def {function}(" in text, test
