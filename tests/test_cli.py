"""The CLI contract (README.md): passes / inspect / apply, JSON shapes, errors in one line."""

import json
import subprocess
import sys

import pytest

from archfx.ir import PassError
from archfx.passes import REGISTRY, Option, Pass, PassResult, register
from archfx.passes.cli import main

from .helpers import ZOO, sampled


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv):
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def test_passes_lists_the_registry(capsys):
    data = run_json(capsys, "passes")
    names = [p["name"] for p in data["passes"]]
    assert {"canonicalize", "altup", "ddl"} <= set(names)
    canon = data["passes"][names.index("canonicalize")]
    assert canon["summary"] and canon["exact_when"] == {}  # always exact
    assert data["passes"][names.index("ddl")]["exact_when"] == {"value": ["compat"]}
    sdnc = data["passes"][names.index("sdnc")]["exact_when"]
    assert sdnc == {"addressing": ["dot"], "write": ["once"], "persistent": [False]}
    ddl = data["passes"][names.index("ddl")]
    assert ddl["requires"] == ["site-residual", "structure"] and canon["requires"] == []
    assert set(ddl["invalidates"]) == {"site-residual"}
    altup = data["passes"][names.index("altup")]
    assert {o["name"] for o in altup["options"]} >= {
        "k",
        "schedule",
        "active",
        "coefficients",
        "readout",
    }
    code, out, _ = run(capsys, "passes")
    assert code == 0 and "value=compat" in out and "always" in out and "altup" in out


@pytest.mark.parametrize("name", sampled(ZOO, ("tiny-gpt2", "tiny-llama", "tiny-bert")))
def test_inspect_json(capsys, name):
    data = run_json(capsys, "inspect", name)
    assert data["blocks"] and all(b["residuals"] for b in data["blocks"])
    for b in data["blocks"]:
        assert {"heads", "kv_heads", "head_dim"} <= set(b["attention"])
        assert {"hidden", "gated"} <= set(b["mlp"])
        assert all("kind" in r for r in b["residuals"])


def test_inspect_a_rewritten_model_shows_its_residual_schemes(capsys):
    data = run_json(capsys, "inspect", "tiny-llama", "--pipeline", "hc(n=3),altup(k=2)")
    assert data["schemes"] == [
        {"scheme": "hc", "granularity": "site", "units": 4, "state": [3, 2, 8, 64],
         "parameters": 4 * (3 + 9 + 3)},
        {"scheme": "altup", "granularity": "block", "units": 2, "state": [2, 3, 2, 8, 64],
         "parameters": 2 * (4 + 2)},
    ]  # fmt: skip
    assert len(data["blocks"]) == 2
    assert run_json(capsys, "inspect", "tiny-llama")["schemes"] == []


@pytest.mark.parametrize(
    "name",
    [
        *sampled(ZOO, ()),  # MiniLM is the one in the default run
        "minilm",
        pytest.param("smollm2", marks=pytest.mark.slow),
    ],
)
def test_apply_canonicalize_verify_onnx(capsys, tmp_path, name):
    onnx = str(tmp_path / "m.onnx")
    data = run_json(capsys, "apply", name, "--pipeline", "canonicalize", "--verify", "--onnx", onnx)
    assert data["verify"]["max_abs_diff"] <= 1e-5
    onnx = data["onnx"]
    # one self-contained file, nothing beside it (SmolLM2: 540 MB, under protobuf's 2 GB)
    assert onnx["files"] == [str(tmp_path / "m.onnx")] and onnx["raw_path"] is None
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    # per output: the export in fp64 within 1e-7 of the output's scale (1e-5 where ORT has no
    # fp64 kernel and says so), ORT's fp32 run within 1e-3 of fp64
    assert onnx["ok"] and onnx["failure"] is None and onnx["outputs"], onnx
    for o in onnx["outputs"]:
        assert o["ok"] and o["fp64_error"] <= o["fp64_limit"] <= 1e-5, o
        assert o["onnx_error"] <= onnx["fp32_limit"], o
    if name != "smollm2":  # 30 layers, logits ≈ 33: fp32 noise exceeds 1e-4, PyTorch's included
        assert onnx["max_abs_diff"] <= 1e-4
    assert onnx["fusions"][0].startswith("fused ") and "attention" in onnx["fusions"][0]
    if name == "minilm":  # BERT's LayerNorms leave the exporter as LayerNormalization already
        norms = [line for line in onnx["fusions"] if line.strip().startswith("norm ")]
        assert norms and all(line.endswith("→ LayerNormalization (as exported)") for line in norms)
        n = len(norms)
        assert f"norm {n}/{n} ({n} already so in the export)" in onnx["fusions"][0]
        assert "  group norm: 0 rewrites by archfx, nothing matched" in onnx["fusions"]
    assert data["passes"][0]["name"] == "canonicalize" and data["passes"][0]["changed"]
    assert data["params"]["before"] >= data["params"]["after"] > 0


def test_human_output_and_draw(capsys, tmp_path):
    code, out, _ = run(capsys, "inspect", "tiny-llama", "--draw", str(tmp_path / "s.svg"))
    assert (
        code == 0
        and "model.layers.0" in out
        and (tmp_path / "s.svg").read_text().startswith("<?xml")
    )
    code, out, _ = run(capsys, "apply", "tiny-gpt2", "--pipeline", "canonicalize", "--verify")
    assert code == 0 and "canonicalize" in out and "verify: in float64 max |Δ|" in out
    assert "in the model's dtype max |Δ|" in out and out.rstrip().endswith("equal")


@pytest.fixture
def ranged_pass():
    class Ranged(Pass):
        name = "ranged-test"
        summary = "test-only pass with a bounded option"
        options = (Option("k", int, 2, "≥ 1", minimum=1),)

        def run(self, graph):
            return PassResult(changed=False)

    register(Ranged)
    yield
    del REGISTRY["ranged-test"]


def _truncated_checkpoint(tmp_path):
    import transformers as tf

    d = tmp_path / "ckpt"
    tf.GPT2LMHeadModel(
        tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    ).save_pretrained(d)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    return d


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["inspect", "/no/such/path"], "does not exist"),
        (["inspect", "{notamodel}"], "config.json"),
        (["inspect", "{truncated}"], ""),
        (["inspect", "no_such_module_xyz:make"], "no_such_module_xyz"),
        (["apply", "tiny-gpt2", "--pipeline", "canonicalise"], "did you mean canonicalize"),
        (["apply", "tiny-gpt2", "--pipeline", "ranged-test(q=1)"], "unknown option 'q'"),
        (["apply", "tiny-gpt2", "--pipeline", "ranged-test(k=2"], "malformed pipeline"),
        (["apply", "tiny-gpt2", "--pipeline", "ranged-test(k=0)"], "must be ≥ 1"),
        (["apply", "tiny-gpt2", "--pipeline", "canonicalize", "--out", "{nonempty}"], "--force"),
        (["apply", "tiny-gpt2"], "--pipeline"),
        (["inspect", "tiny-gpt2", "--draw", "{tmp}/x.gif"], ".svg or .png"),
    ],
)
def test_bad_input_exits_nonzero_with_one_line(capsys, tmp_path, ranged_pass, argv, fragment):
    (tmp_path / "notamodel").mkdir()
    (tmp_path / "nonempty").mkdir()
    (tmp_path / "nonempty" / "keep.txt").write_text("precious")
    paths = {
        "notamodel": tmp_path / "notamodel",
        "nonempty": tmp_path / "nonempty",
        "tmp": tmp_path,
    }
    paths["truncated"] = _truncated_checkpoint(tmp_path)
    try:
        code = main([a.format(**paths) for a in argv])
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    _, err = capsys.readouterr()
    assert code != 0
    assert (
        err.count("archfx: error:") == 1
        and len(err.split("archfx: error:")[1].strip().splitlines()) == 1
    ), err
    assert "Traceback" not in err
    assert fragment in err
    assert (tmp_path / "nonempty" / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize(
    ("pipeline", "fragment"),
    [
        ("expand-mlp", "expand-mlp: give exactly one of factor or size"),
        ("canonicalize,expand-mlp(factor=2,size=300)", "exactly one of factor or size"),
        ("expand-hidden", "expand-hidden: give exactly one of size or factor"),
        ("expand-head-dim", "expand-head-dim: give size"),
        ("expand-qk(layers=0)", "expand-qk: give size"),
        ("altup(k=2,schedule=same,active=2)", "active=2 must be < k=2"),
        ("sdnc(write=delta,persistent=true)", "does not combine"),
        ("sdnc(write=delta,addressing=cosine)", "does not combine"),
        ("expand-mlp(factor=2,layers=x)", "expand-mlp: layers must be 'all' or indices"),
        ("add-heads(layers=1-0)", "add-heads: layers '1-0' names no blocks"),
        ("ddl,ddl", "has made updates of its state yet, and ddl before it leaves none"),
        ("altup(k=2),ddl(dv=2)", "inside a block scheme's blocks would make every AltUp block"),
    ],
)
def test_option_errors_come_before_the_model_loads(capsys, monkeypatch, pipeline, fragment):
    from archfx.passes import Pipeline
    from archfx.passes.io import models

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the pipeline was checked")

    with pytest.raises(PassError, match=fragment):  # at parse time, not in run()
        Pipeline.parse(pipeline)
    for spec in ("/no/such/model", "tiny-llama"):  # a bogus model: the pipeline error wins
        monkeypatch.setattr(models, "load", never)
        code, _, err = run(capsys, "apply", spec, "--pipeline", pipeline)
        assert code == 1 and err.count("archfx: error:") == 1 and fragment in err, err
        assert "does not exist" not in err and "loaded before" not in err


def test_console_script_and_debug_flag(tmp_path):
    exe = [sys.executable, "-m", "archfx.passes.cli"]
    proc = subprocess.run(
        [*exe, "apply", "tiny-gpt2", "--pipeline", "nope"], capture_output=True, text=True
    )
    assert (
        proc.returncode != 0
        and proc.stderr.strip().count("\n") == 0
        and "unknown pass 'nope'" in proc.stderr
    )
    proc = subprocess.run(
        [*exe, "--debug", "apply", "tiny-gpt2", "--pipeline", "nope"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_out_saves_and_force_replaces(capsys, tmp_path):
    out = tmp_path / "saved"
    data = run_json(capsys, "apply", "tiny-llama", "--pipeline", "canonicalize", "--out", str(out))
    assert (
        (out / "recipe.json").exists()
        and (out / "model.safetensors").exists()
        and data["out"] == str(out)
    )
    code, _, err = run(
        capsys, "apply", "tiny-llama", "--pipeline", "canonicalize", "--out", str(out)
    )
    assert code != 0 and "--force" in err
    code, _, _ = run(
        capsys, "apply", "tiny-llama", "--pipeline", "canonicalize", "--out", str(out), "--force"
    )
    assert code == 0 and not [p for p in tmp_path.iterdir() if p.name.startswith(".saved")]


def test_apply_growth_saves_both_formats(capsys, tmp_path):
    import torch
    import transformers

    from archfx.passes.io.artifact import load

    text = "expand-hidden(size=96),expand-mlp(factor=2),add-layers(n=1)"
    out, hf = tmp_path / "artifact", tmp_path / "hf"
    data = run_json(
        capsys,
        "apply",
        "tiny-llama",
        "--pipeline",
        text,
        "--verify",
        "--out",
        str(out),
        "--save-pretrained",
        str(hf),
    )
    assert data["verify"]["ok"] and data["params"]["after"] > data["params"]["before"]
    assert data["save_pretrained_tokenizer"] is None  # built from a config: no tokenizer
    assert not [p for p in hf.iterdir() if p.name.startswith("tokenizer")]
    back = transformers.LlamaForCausalLM.from_pretrained(str(hf))
    assert back.config.hidden_size == 96 and back.config.num_hidden_layers == 3
    graph = load(out)  # the recipe replays the growth, then loads the weights
    ids = graph.inputs.tensors[0]
    with torch.no_grad():
        assert (back(input_ids=ids).logits - graph(ids)[0]).abs().max() <= 1e-5
    code, _, err = run(
        capsys,
        "apply",
        "nanogpt",
        "--pipeline",
        "expand-mlp(factor=2)",
        "--save-pretrained",
        str(tmp_path / "x"),
    )
    assert code != 0 and "not one" in err.strip().splitlines()[-1]


def test_keep_intermediate_keeps_the_exports_models_and_lists_every_file(capsys, tmp_path):
    onnx = tmp_path / "m.onnx"
    argv = ["apply", "tiny-llama", "--pipeline", "canonicalize", "--onnx", str(onnx)]
    code, out, err = run(capsys, *argv, "--keep-intermediate")
    assert code == 0, err
    kept = ["m.onnx", "m.raw.onnx", "m.fused.onnx", "m.fused.onnx.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    for name in kept:  # human output: every file written, with its size
        assert f"  wrote {tmp_path / name} (" in out, out
    code, _, err = run(
        capsys, "apply", "tiny-llama", "--pipeline", "canonicalize", "--keep-intermediate"
    )
    assert code != 0 and "give --onnx" in err


def test_save_pretrained_copies_the_tokenizer(capsys, tmp_path):
    """MiniLM (packaged, with its tokenizer files): the grown checkpoint loads with AutoTokenizer
    and encodes as the source's tokenizer does."""
    from transformers import AutoTokenizer

    from archfx.passes.io.zoo.packaged import minilm_dir

    hf = tmp_path / "hf"
    argv = ["apply", "minilm", "--pipeline", "expand-mlp(factor=2)", "--save-pretrained", str(hf)]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert f"saved Hugging Face checkpoint: {hf} (with the source model's tokenizer" in out, out
    text = "The quick brown fox jumps over the lazy dog, doesn't it?"
    source, saved = (
        AutoTokenizer.from_pretrained(str(minilm_dir())),
        AutoTokenizer.from_pretrained(str(hf)),
    )
    assert saved(text)["input_ids"] == source(text)["input_ids"]
    assert len(source(text)["input_ids"]) > 10
