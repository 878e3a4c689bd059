"""Every script in examples/ runs (they are what users copy from)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_inspect_model(tmp_path):
    structure = load("inspect_model").main(["tiny-llama", "--draw", str(tmp_path / "s.png")])
    assert len(structure.blocks) == 2 and (tmp_path / "s.png").stat().st_size > 1000


@pytest.mark.parametrize("pipeline", ["canonicalize", "canonicalize,altup(k=2)"])
def test_verify_pipeline(pipeline):
    result = load("verify_pipeline").main(["tiny-gpt2", "--pipeline", pipeline])
    assert all(r.certificate.ok for r in result.records)


def test_export_onnx(tmp_path):
    result = load("export_onnx").main(["tiny-bert", "--out", str(tmp_path / "bert.onnx")])
    assert result.max_abs_diff <= 1e-4 and (tmp_path / "bert.onnx").exists()


def test_demo_on_the_real_model(tmp_path):
    report = load("demo").main(["--out", str(tmp_path)])
    assert report["ok"]
    assert report["verify"]["max_abs_diff"] <= 1e-5 and report["onnx"]["max_abs_diff"] <= 1e-4
    assert report["embeddings"]["max_abs_diff_rewritten"] <= 1e-5
    assert (tmp_path / "report.md").exists() and (tmp_path / "minilm-structure.png").exists()
    written = json.loads((tmp_path / "report.json").read_text())
    assert written["ok"] is True and all(written["checks"].values())
    assert "mean of 10 calls" in written["latency_note"] and written["latency_seconds"]
    assert written["params"]["before"] == 22_713_216  # all-MiniLM-L6-v2, as Hugging Face counts
    assert "**ok**" in (tmp_path / "report.md").read_text()


def test_demo_reports_a_failed_check_and_exits_nonzero(tmp_path, monkeypatch):
    demo = load("demo")
    reload = demo.load

    def perturbed(path):  # the saved model comes back with one weight moved
        graph = reload(path)
        with torch.no_grad():
            next(graph.gm.parameters()).add_(1e-3)
        return graph

    monkeypatch.setattr(demo, "load", perturbed)
    with pytest.raises(SystemExit) as exc:
        demo.main(["--out", str(tmp_path), "--model", "tiny-gpt2", "--pipeline", "canonicalize"])
    assert exc.value.code not in (0, None) and "reload_bit_identical" in str(exc.value.code)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] is False and report["checks"]["reload_bit_identical"] is False
    first = (tmp_path / "report.md").read_text().splitlines()[2]
    assert first.startswith("- **FAILED: ") and "reload_bit_identical" in first


def test_train_shakespeare():
    out = load("train_shakespeare").main(["--steps", "30", "--batch", "8"])
    assert out["losses"][-1] < out["losses"][0] and all(d > 0 for d in out["drift"])


def test_memory(tmp_path):
    out = load("memory").main(["tiny-llama", "--picture", str(tmp_path / "m.png")])
    assert len(out["layers"]) == 2 and out["segment_diff"] <= 1e-5
    assert (tmp_path / "m.png").stat().st_size > 5000


def test_generate():
    out = load("generate").main(["tiny-llama", "--ids", "5,17,33;44,12", "--new", "12"])
    assert out["same"] == {"torch": True, "onnx": True}
    assert all(0 < len(t) <= 12 for t in out["new_tokens"])  # up to 12, or to an end token
