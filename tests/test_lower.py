"""Lowering: ONNX export + ONNX Runtime checked against PyTorch; device selection; compile."""

import pytest
import torch

from archfx.ir import LoweringError, capture
from archfx.ir.errors import OnnxMismatchError
from archfx.ir.lower import (
    FP32_LIMIT,
    check_onnx,
    compile_graph,
    device,
    disabled_fusions,
    ort_session,
    providers,
    run_onnx,
    to_onnx,
)
from archfx.passes.io.zoo import build

from .helpers import captured


def test_provider_and_device_selection():
    assert providers()[-1] == "CPUExecutionProvider"
    assert device() == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        assert providers() == ["CPUExecutionProvider"]


def test_onnx_files_sessions_and_dynamic_shapes(tmp_path):
    g = captured("tiny-llama")
    result = to_onnx(g, tmp_path / "m.onnx", keep_intermediate=True)
    assert result.path.exists() and result.raw_path.exists() and result.max_abs_diff <= 1e-4
    assert result.nodes["optimized"] <= result.nodes["raw"]
    kept = {"m.onnx", "m.raw.onnx", "m.fused.onnx", "m.fused.onnx.data"}  # intermediates beside
    assert {p.name for p in tmp_path.iterdir()} == kept
    assert sorted(result.files) == sorted(str(tmp_path / f) for f in kept)
    assert result.files[0] == str(result.path) and result.to_json()["files"] == result.files
    session = ort_session(result.path, threads=1)
    second = g.second_inputs()
    out = run_onnx(session, second)
    assert out[0].shape == tuple(g.run(second)[0].shape)  # dynamic batch and sequence


def _run_alone(file, graph, tmp_path, *, data=False):
    """Copy the ONNX model `file` (and `<file>.data` when `data`) alone to a fresh directory and
    run it there with ONNX Runtime on the graph's inputs: its outputs."""
    import shutil

    import onnxruntime as ort

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(file, elsewhere)
    if data:
        shutil.copy(f"{file}.data", elsewhere)
    session = ort.InferenceSession(str(elsewhere / file.name), providers=["CPUExecutionProvider"])
    feed = {
        i.name: t.numpy() for i, t in zip(session.get_inputs(), graph.inputs.tensors, strict=True)
    }
    return session.run(None, feed)


def test_the_onnx_file_is_self_contained(tmp_path):
    """The exported file alone, copied to another directory, runs and matches PyTorch; no
    intermediate is left beside it."""
    g = captured("tiny-llama")
    out = tmp_path / "out"
    result = to_onnx(g, out / "m.onnx")
    assert [p.name for p in out.iterdir()] == ["m.onnx"]
    assert result.files == [str(out / "m.onnx")] and result.raw_path is None
    assert result.to_json()["files"] == result.files and result.to_json()["raw_path"] is None
    got = _run_alone(result.path, g, tmp_path)
    for expected, actual in zip(g.run(), got, strict=True):
        assert (torch.from_numpy(actual) - expected).abs().max() <= 1e-4


def test_past_the_protobuf_limit_the_weights_go_to_one_data_file(tmp_path, monkeypatch):
    import onnx

    from archfx.ir import lower

    monkeypatch.setattr(lower, "PROTOBUF_LIMIT", 1)  # as if the model were past 2 GB
    g = captured("tiny-gpt2")
    out = tmp_path / "out"
    result = to_onnx(g, out / "m.onnx")
    assert sorted(p.name for p in out.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert result.files == [str(out / "m.onnx"), str(out / "m.onnx.data")]
    model = onnx.load(str(result.path), load_external_data=False)
    locations = {
        e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"
    }
    assert locations == {"m.onnx.data"}  # relative: the two move together
    got = _run_alone(result.path, g, tmp_path, data=True)
    for expected, actual in zip(g.run(), got, strict=True):
        assert (torch.from_numpy(actual) - expected).abs().max() <= 1e-4


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU choice")
def test_cpu_sessions_leave_out_the_slow_skip_layer_norm(tmp_path):
    import onnx
    import onnxruntime as ort

    result = to_onnx(captured("tiny-gpt2"), tmp_path / "m.onnx", keep_intermediate=True)
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
    result = compile_graph(captured("tiny-gpt2"))
    assert result.max_abs_diff <= 1e-5


def test_fp64_reference_runs_on_raw_graphs():
    from archfx.ir.lower import _against_fp64

    g = captured("tiny-llama")  # not canonicalized: dtype asserts and fp32 casts inside
    outputs = g.run()
    reference, other = _against_fp64(g, [(g.inputs, outputs, outputs)])
    assert reference == other and 0 <= reference < 1e-5


# The ONNX check (check_onnx): per output, the export in fp64 against PyTorch's fp64 run, and
# ONNX Runtime's fp32 run within FP32_LIMIT of it


def _perturb(path, pick=None, factor=1 + 1e-3, out=None):
    """Multiply one floating-point initializer of the ONNX model at `path` by `factor`, saved to
    `out` (default in place; `pick` chooses among the 2-D weights, default the middle one)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    weights = [t for t in model.graph.initializer if t.data_type == 1 and len(t.dims) == 2]
    chosen = pick(weights) if pick else weights[len(weights) // 2]
    value = numpy_helper.to_array(chosen).astype(np.float64) * factor
    chosen.CopyFrom(numpy_helper.from_array(value.astype(np.float32), chosen.name))
    onnx.save(model, str(out or path))
    return chosen.name


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory):
    """A 6-layer Llama (RMSNorm, RoPE, GQA), exported once."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    ids = torch.randint(0, 128, (2, 16))
    g = capture(tf.LlamaForCausalLM(config).eval(), {"input_ids": ids, "use_cache": False})
    return g, to_onnx(g, tmp_path_factory.mktemp("deep") / "m.onnx", keep_intermediate=True)


def test_an_exact_export_passes_in_fp64(deep_llama):
    g, result = deep_llama
    assert result.ok and result.failure is None and result.fp64_model == "raw"
    (logits,) = result.outputs
    assert logits.name == "logits" and logits.fp64_error < 1e-11 < logits.fp64_limit
    assert logits.onnx_error < 1e-5 and logits.reference_error < 1e-5
    data = result.to_json()
    assert data["ok"] and data["max_abs_diff"] == result.max_abs_diff
    assert data["outputs"][0]["fp64_error"] == logits.fp64_error and data["fp64_error"]


def test_a_wrong_initializer_fails_the_fp64_check(deep_llama, tmp_path):
    g, result = deep_llama
    raw = tmp_path / "m.raw.onnx"
    name = _perturb(result.raw_path, out=raw)  # one weight off by 1e-3, relative
    with pytest.raises(OnnxMismatchError) as info:
        check_onnx(g, result.path, raw=raw)
    message = str(info.value)
    assert "\n" not in message and "output logits" in message and "fp64" in message, message
    bad = info.value.result
    assert not bad.ok and bad.outputs[0].fp64_error > 1e-6, (name, bad.outputs)
    assert isinstance(info.value, LoweringError)


def test_fp32_error_beyond_the_limit_fails_even_when_fp64_passes(deep_llama, tmp_path):
    g, result = deep_llama
    final = tmp_path / "m.onnx"
    _perturb(result.path, factor=2.0, out=final)  # the optimised model only: the export is exact
    checked = check_onnx(g, final, raw=result.raw_path, strict=False)
    (logits,) = checked.outputs
    assert logits.fp64_error < 1e-11 and logits.onnx_error > FP32_LIMIT
    assert not checked.ok and "ONNX Runtime's fp32 run" in checked.failure
    with pytest.raises(OnnxMismatchError, match="beyond 1e-03"):
        check_onnx(g, final, raw=result.raw_path)


class _TwoScales(torch.nn.Module):
    """Two outputs a thousand times apart."""

    def __init__(self):
        super().__init__()
        self.small = torch.nn.Linear(16, 8)
        self.large = torch.nn.Linear(16, 16)

    def forward(self, x):
        return self.small(x), 1000 * torch.tanh(self.large(x))


def test_each_output_is_checked_at_its_own_scale_and_to_onnx_raises(tmp_path, monkeypatch):
    torch.manual_seed(0)
    g = capture(_TwoScales(), (torch.randn(2, 4, 16),))
    good = to_onnx(g, tmp_path / "good.onnx", fuse=False)
    assert good.ok and len(good.outputs) == 2
    small, large = good.outputs
    assert large.scale > 100 * small.scale
    assert small.fp64_error < 1e-12 and large.fp64_error < 1e-12

    export = torch.onnx.export

    def wrong_export(*args, **kwargs):  # an exporter that gets one weight slightly wrong
        program = export(*args, **kwargs)
        save = program.save

        def perturbed(path, *a, **k):
            save(path, *a, **k)
            _perturb(path, pick=lambda ws: next(w for w in ws if 8 in w.dims))

        program.save = perturbed
        return program

    monkeypatch.setattr(torch.onnx, "export", wrong_export)
    with pytest.raises(OnnxMismatchError) as info:
        to_onnx(g, tmp_path / "bad.onnx", fuse=False)
    bad = info.value.result
    by_name = {o.name: o for o in bad.outputs}
    assert by_name[small.name].failure and by_name[large.name].failure is None
    assert f"output {small.name}:" in str(info.value)


class _Gelus(torch.nn.Module):
    """The tanh GELU (Gemma 2's) and the erf one, side by side."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x):
        h = 4 * self.proj(x)
        return torch.nn.functional.gelu(h, approximate="tanh"), torch.nn.functional.gelu(h)


def test_the_tanh_gelu_runs_in_fp64(tmp_path):
    # ONNX Runtime has no fp64 Gelu: it expands the ONNX function with √(2/π) and 0.044715 in
    # fp32 (1.2e-9 off; Gemma 2's logits 4.6e-9), so the fp64 run writes the tanh GELU out in
    # double; the erf GELU (no fp64 Erf) still runs in fp32, said in notes
    torch.manual_seed(0)
    g = capture(_Gelus(), (torch.randn(2, 4, 16),))
    result = to_onnx(g, tmp_path / "m.onnx", fuse=False, strict=False)
    tanh, erf = result.outputs
    assert tanh.fp64_error < 1e-13, tanh
    assert 1e-12 < erf.fp64_error < erf.fp64_limit and "Gelu (its Erf)" in result.notes[0]


@pytest.mark.slow
def test_smollm2_passes_the_onnx_check(tmp_path):
    # docs/onnx-accuracy.md: 30 layers, fp32 logits ~1e-4 (relative) from fp64 in PyTorch and in
    # ONNX Runtime alike; the export itself agrees with PyTorch in fp64 to ~1e-10
    model = build("smollm2")
    ids = torch.randint(
        0, model.config.vocab_size, (8, 128), generator=torch.Generator().manual_seed(0)
    )
    result = to_onnx(capture(model, {"input_ids": ids, "use_cache": False}), tmp_path / "m.onnx")
    (logits,) = result.outputs
    assert result.ok and result.fp64_model == "raw" and logits.fp64_error < 1e-9
    assert logits.onnx_error < FP32_LIMIT


@pytest.mark.parametrize(
    "text",
    [
        "ddl(dv=4,value=paper)",
        pytest.param("altup(k=2),ddl(dv=1,value=paper)", marks=pytest.mark.slow),
        pytest.param("mhc(n=2,pre=alternating)", marks=pytest.mark.slow),
        pytest.param("hc(n=2,dynamic=true)", marks=pytest.mark.slow),
    ],
)
def test_a_compiled_training_step_matches_eager(text):
    """torch.compile of a rewritten graph trains: the loss and every parameter's gradient of
    one step (forward, cross-entropy, backward; Inductor's generated kernels both ways) equal
    eager PyTorch's (benchmarks/compiled_training.py times it)."""
    from archfx.passes import Pipeline

    out = Pipeline.parse(text).run(captured("tiny-llama")).graph
    x = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))

    def step(module):
        out.gm.zero_grad(set_to_none=True)
        logits = module(x)[0]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in out.gm.named_parameters()}

    want_loss, want = step(out.gm)
    got_loss, got = step(torch.compile(out.gm, dynamic=False))
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-5)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)
