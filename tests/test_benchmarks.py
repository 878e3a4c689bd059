"""benchmarks/run.py, the one performance entry point, runs end to end (a --quick smoke run)."""

import importlib.util
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).parent.parent / "benchmarks" / "run.py"


@pytest.mark.slow
def test_quick_run_writes_the_tables_and_plots(tmp_path):
    sys.path.insert(0, str(RUN.parent))
    spec = importlib.util.spec_from_file_location("run", RUN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--quick", "--rounds", "2", "--out", str(tmp_path)])
    assert [r["layers"] for r in result["cost"]] == [2, 4, 8]
    assert set(result["overhead"]) == {"eager", "compiled", "ort"}
    (gpt2,) = result["backends"]
    assert "archfx ONNX (fusions + ORT)" in gpt2["seconds"] and gpt2["archfx_diff"] <= 1e-4
    assert 0 < gpt2["matmul_share"] < 1
    text = (tmp_path / "results.md").read_text()
    assert "## 1." in text and "## 2." in text and "## 3." in text and "MultiHeadAttention" in text
    assert "Matrix products (MatMul, FusedMatMul, Gemm) take" in text
    assert (tmp_path / "backends.png").stat().st_size > 1000
    assert (tmp_path / "pipeline_cost.png").stat().st_size > 1000


def test_generation_lockstep_steps_every_session_in_turn(tmp_path):
    """benchmarks/generate.py's lockstep: torch and ONNX Runtime decode forms (the latter with
    threads that sleep between runs) each generate after the same prompt, one token in turn."""
    import torch

    from archfx.ir import capture
    from archfx.passes import Pipeline
    from archfx.passes.io.generate import Session

    from .helpers import model

    sys.path.insert(0, str(RUN.parent))
    spec = importlib.util.spec_from_file_location("generate_bench", RUN.parent / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    graph = capture(model("tiny-llama"))
    ddl = Pipeline.parse("ddl(dv=1,value=compat)").run(graph).graph
    sessions = {
        "torch": Session(graph),
        "torch ddl": Session(ddl),
        "onnx": Session(graph, "onnx", onnx=tmp_path / "m.onnx").with_threads(2, spinning=False),
    }
    medians = module.lockstep(sessions, torch.tensor([[5, 17, 33, 2, 9]]), new=6)
    assert set(medians) == set(sessions) and all(0 < s < 1 for s in medians.values())


def test_compiled_training_flop_bound_counts_the_mhc_projection():
    """benchmarks/compiled_training.py's FLOP bound: mHC adds exactly its projection's matmuls,
    6 · tokens · n·d · (2n + n²) per residual site (forward, and the input and weight gradients),
    and the plain model's count is unchanged by a scheme without matmuls (hc)."""
    sys.path.insert(0, str(RUN.parent))
    from compiled_training import SCHEMES, matmul_flops
    from paper_tables import build_graph, byte_corpus, settings

    s = settings(smoke=True)
    x, y = next(byte_corpus().batches(s.batch, s.seq, 0))
    flops = {
        name: matmul_flops(build_graph(s.large, s.seq, 0, SCHEMES[name])[0].gm, x, y)
        for name in ("baseline", "hc(n=4)", "mhc(n=4)")
    }
    n, d, sites = 4, s.large.hidden, 2 * s.large.layers
    assert flops["hc(n=4)"] == flops["baseline"] > 0
    assert flops["mhc(n=4)"] - flops["baseline"] == sites * 6 * x.numel() * n * d * (2 * n + n * n)
