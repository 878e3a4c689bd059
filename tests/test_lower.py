"""Lowering: ONNX export + ONNX Runtime checked against PyTorch; device selection; compile."""

import pytest
import torch

from archfx.ir import LoweringError, capture
from archfx.ir.lower import (
    compile_graph,
    device,
    disabled_fusions,
    ort_session,
    providers,
    run_onnx,
    to_onnx,
)
from archfx.passes.zoo import build


def test_provider_and_device_selection():
    assert providers()[-1] == "CPUExecutionProvider"
    assert device() == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        assert providers() == ["CPUExecutionProvider"]


def test_onnx_files_sessions_and_dynamic_shapes(tmp_path):
    g = capture(build("tiny-llama"))
    result = to_onnx(g, tmp_path / "m.onnx")
    assert result.path.exists() and result.raw_path.exists() and result.max_abs_diff <= 1e-4
    assert result.nodes["optimized"] <= result.nodes["raw"]
    session = ort_session(result.path, threads=1)
    second = g.second_inputs()
    out = run_onnx(session, second)
    assert out[0].shape == tuple(g.run(second)[0].shape)  # dynamic batch and sequence


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU choice")
def test_cpu_sessions_leave_out_the_slow_skip_layer_norm(tmp_path):
    import onnx
    import onnxruntime as ort

    result = to_onnx(capture(build("tiny-gpt2")), tmp_path / "m.onnx")
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "ort-default.onnx")
    ort.InferenceSession(str(result.raw_path), so, providers=["CPUExecutionProvider"])
    ops = {
        f: [n.op_type for n in onnx.load(str(f)).graph.node]
        for f in (so.optimized_model_filepath, result.path)
    }
    assert "SkipLayerNormalization" in ops[so.optimized_model_filepath]  # ORT's default fuses
    assert "SkipLayerNormalization" not in ops[result.path]
    assert disabled_fusions(["CUDAExecutionProvider", "CPUExecutionProvider"]) == []


def test_export_failure_is_a_lowering_error(tmp_path):
    class Unexportable(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.eig(x)[0].real

    g = capture(Unexportable(), (torch.randn(2, 3, 3),))
    with pytest.raises(LoweringError, match="ONNX export failed"):
        to_onnx(g, tmp_path / "bad.onnx")


def test_broken_file_is_a_lowering_error(tmp_path):
    (tmp_path / "x.onnx").write_bytes(b"not onnx")
    with pytest.raises(LoweringError, match="cannot load"):
        ort_session(tmp_path / "x.onnx")


@pytest.mark.slow
def test_torch_compile():
    result = compile_graph(capture(build("tiny-gpt2")))
    assert result.max_abs_diff <= 1e-5


def test_fp64_reference_runs_on_raw_graphs():
    from archfx.ir.lower import _against_fp64

    g = capture(build("tiny-llama"))  # not canonicalized: dtype asserts and fp32 casts inside
    outputs = g.run()
    reference, other = _against_fp64(g, [(g.inputs, outputs, outputs)])
    assert reference == other and 0 <= reference < 1e-5
