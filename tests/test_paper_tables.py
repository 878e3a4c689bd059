"""The paper-tables harness (benchmarks/paper_tables.py) at its smoke size: every table runs,
writes its markdown, JSON and plot, and its numbers are sane — losses finite and falling, the
grown model's loss continuous across the growth point, the upcycled models starting exactly
where the original model is.

    python -m pytest -q tests/test_paper_tables.py
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).parent.parent / "benchmarks" / "paper_tables.py"


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("paper_tables", HARNESS)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("paper_tables", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("tables")
    results = module.main(["all", "--smoke", "--out", str(out)])
    # growth runs added to a stored table (same settings) replace those of their kind
    merged = module.main(
        ["growth", "--smoke", "--kinds", "grown-rewarm", "--merge", "--out", str(out)]
    )["growth"]
    results["growth"] = merged
    merge = ["residual", "--smoke", "--schemes", "hc(n=4)", "--merge", "--out", str(out / "m")]
    (out / "m").mkdir()
    (out / "m" / "residual.json").write_text((out / "residual.json").read_text())
    results["residual_merged"] = module.main(merge)["residual"]
    return out, results


def _files_written(out: Path, name: str):
    assert (out / f"{name}.png").stat().st_size > 10_000
    md = (out / f"{name}.md").read_text()
    assert md.count("\n|") >= 3  # a header, a rule and rows
    assert json.loads((out / f"{name}.json").read_text())["runs"]
    return md


def test_residual_table(tables):
    out, results = tables
    res = results["residual"]
    md = _files_written(out, "residual")
    assert [r["scheme"] for r in res["rows"]] == [
        "baseline",
        "altup(k=2)",
        "ddl(dv=1,value=paper)",
        "ddl(dv=4,value=paper)",
        "baseline (2d)",
        "hc(n=4)",
        "mhc(n=4,pre=alternating)",
        "baseline (post-LN)",
        "resi-dual (post-LN)",
    ]
    assert len(res["runs"]) == 9 * len(res["settings"]["seeds"])
    tokens = {r["tokens"] for r in res["runs"]}
    assert len(tokens) == 1  # equal tokens per configuration
    for run in res["runs"]:
        assert all(math.isfinite(v) for v in run["train_loss"])
        first, last = run["val_curve"][0][1], run["val_curve"][-1][1]
        assert math.isfinite(last) and last < first, run["scheme"]
        assert run["tokens_per_s"] > 0
    for baseline in (res["rows"][0], res["rows"][7]):  # the tiny Llama's, the post-LN model's
        assert baseline["throughput_ratio_mean"] == 1.0 and baseline["throughput_ratio_std"] == 0
        assert baseline["interleaved_ratio"] == 1.0
    assert all(0 < r["interleaved_ratio"] < 10 for r in res["rows"])
    # altup adds K² + K scalars per layer; ddl adds parameters too
    params = {r["scheme"]: r["params"] for r in res["rows"]}
    layers = res["settings"]["large"]["layers"]
    assert params["altup(k=2)"] - params["baseline"] == 6 * layers
    assert params["ddl(dv=4,value=paper)"] > params["ddl(dv=1,value=paper)"] > params["baseline"]
    for row in res["rows"]:
        assert f"{row['val_mean']:.4f}" in md
    # AltUp's own comparison: the plain model at 2d costs about 4× the FLOPs of width d
    flops = {r["scheme"]: r["flops_per_token"] for r in res["rows"]}
    assert flops["altup(k=2)"] < 1.01 * flops["baseline"] < flops["baseline (2d)"] / 2


def test_residual_rows_merge_into_a_stored_table(tables):
    out, results = tables
    before = json.loads((out / "residual.json").read_text())
    merged = results["residual_merged"]
    assert [r["scheme"] for r in merged["rows"]] == [r["scheme"] for r in before["rows"]]
    again = [r for r in merged["runs"] if r["scheme"] == "hc(n=4)"]
    assert len(again) == len(merged["settings"]["seeds"]) and merged["merged"][-1]["schemes"] == [
        "hc(n=4)"
    ]


def test_growth_table(tables):
    out, results = tables
    res = results["growth"]
    md = _files_written(out, "growth")
    seeds = res["settings"]["seeds"]
    assert [r["kind"] for r in res["rows"]] == ["scratch", "grown", "grown-rewarm"]
    for seed in seeds:
        scratch = next(r for r in res["runs"] if r["kind"] == "scratch" and r["seed"] == seed)
        for kind in ("grown", "grown-rewarm"):
            g = next(r for r in res["runs"] if r["kind"] == kind and r["seed"] == seed)
            growth = g["growth"]
            assert growth["step"] == res["grow_step"]
            assert growth["val_abs_diff"] <= 1e-5  # no jump at the growth point
            assert growth["certificate_max_abs_diff"] <= 1e-5
            assert growth["params_before"] < growth["params_after"] == scratch["params_final"]
            assert g["flops"] < scratch["flops"]  # trained small for a while
            assert len(g["train_loss"]) == len(scratch["train_loss"])  # equal tokens
            assert all(math.isfinite(v) for v in g["train_loss"])
            assert g["val_curve"][-1][2] < growth["val_after"]  # and it keeps learning
            assert len(growth["train_loss_around"]) >= 2 and g["minus_scratch_around"]
        # the first batch after growing: both grown runs have the same model, same loss
        step = res["grow_step"]
        a, b = (
            next(r for r in res["runs"] if r["kind"] == k and r["seed"] == seed)
            for k in ("grown", "grown-rewarm")
        )
        assert a["train_loss"][step] == b["train_loss"][step]
        assert a["train_loss"][step + 1] != b["train_loss"][step + 1]  # re-warm changed the step
    assert "val before" in md and res["pipeline"] in md
    assert len(res["runs"]) == 3 * len(seeds) and res["merged"][0]["kinds"] == ["grown-rewarm"]


def test_upcycle_table(tables):
    out, results = tables
    res = results["upcycle"]
    md = _files_written(out, "upcycle")
    assert [r["pipeline"] for r in res["runs"]] == ["original", "altup(k=2)", "ddl(dv=1)"]
    for run in res["runs"]:
        assert abs(run["val_before"] - res["original_val"]) <= 1e-5
        if run["pipeline"] != "original":
            assert run["certificate_max_abs_diff"] <= 1e-5
            assert run["params"] > res["params"]
        assert run["final_val"] < run["val_before"]
    assert f"{res['original_val']:.6f}" in md
