"""Every script in examples/ runs (they are what users copy from)."""

import importlib.util
from pathlib import Path

import pytest

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


def test_train_shakespeare():
    out = load("train_shakespeare").main(["--steps", "30", "--batch", "8"])
    assert out["losses"][-1] < out["losses"][0] and all(d > 0 for d in out["drift"])


def test_memory(tmp_path):
    out = load("memory").main(["tiny-llama", "--picture", str(tmp_path / "m.png")])
    assert len(out["layers"]) == 2 and out["segment_diff"] <= 1e-5
    assert (tmp_path / "m.png").stat().st_size > 5000
