"""MODEL resolution: checkpoint directories, built-in names, module:callable, and their errors."""

import sys

import pytest
import torch
import transformers as tf

from archfx.ir import ModelSpecError
from archfx.passes.io.models import load, rebuild
from archfx.passes.io.zoo import packaged


def _checkpoint(tmp_path, bin_format=False):
    d = tmp_path / "ckpt"
    tf.LlamaForCausalLM(
        tf.LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
        )
    ).save_pretrained(d, safe_serialization=not bin_format)
    return d


def test_checkpoint_directory(tmp_path):
    loaded = load(str(_checkpoint(tmp_path)))
    assert isinstance(loaded.model, tf.LlamaForCausalLM) and loaded.source["kind"] == "hf-dir"
    assert type(rebuild(loaded.source)) is tf.LlamaForCausalLM


def test_pytorch_bin_checkpoint_loads_without_pickle_code(tmp_path):
    loaded = load(str(_checkpoint(tmp_path, bin_format=True)))
    assert isinstance(loaded.model, tf.LlamaForCausalLM)


def test_real_packaged_checkpoint_directory():
    assert load(str(packaged.minilm_dir())).model.config.hidden_size == 384


def test_builtin_and_callable(tmp_path, monkeypatch):
    assert load("nanogpt").source == {"kind": "builtin", "name": "nanogpt"}
    (tmp_path / "mymodels.py").write_text(
        "import torch\n"
        "from archfx.passes.io.zoo import build\n"
        "def plain():\n    return build('tiny-gpt2')\n"
        "def with_inputs():\n    return build('nanogpt'), (torch.randint(0, 128, (3, 7)),)\n"
        "def broken():\n    raise RuntimeError('boom')\n"
        "def not_a_model():\n    return 42\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert isinstance(load("mymodels:plain").model, tf.GPT2LMHeadModel)
    loaded = load("mymodels:with_inputs")
    assert (
        loaded.example_inputs[0].shape == (3, 7)
        and loaded.source["target"] == "mymodels:with_inputs"
    )
    with pytest.raises(ModelSpecError, match="raised RuntimeError: boom"):
        load("mymodels:broken")
    with pytest.raises(ModelSpecError, match="returned int, not a torch.nn.Module"):
        load("mymodels:not_a_model")
    with pytest.raises(ModelSpecError, match="has no callable 'missing'"):
        load("mymodels:missing")
    sys.modules.pop("mymodels", None)


def test_errors(tmp_path):
    with pytest.raises(ModelSpecError, match="does not exist"):
        load(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSpecError, match="no config.json"):
        load(str(tmp_path / "empty"))
    bad = tmp_path / "badjson"
    bad.mkdir()
    (bad / "config.json").write_text("{")
    with pytest.raises(ModelSpecError, match="not valid JSON"):
        load(str(bad))
    ckpt = _checkpoint(tmp_path)
    (ckpt / "config.json").write_text(
        (ckpt / "config.json").read_text().replace("LlamaForCausalLM", "NoSuchForCausalLM")
    )
    with pytest.raises(ModelSpecError, match="unknown architecture 'NoSuchForCausalLM'"):
        load(str(ckpt))
    with pytest.raises(ModelSpecError, match="did you mean tiny-llama"):
        load("tiny-lama")
    with pytest.raises(ModelSpecError, match="cannot import 'no_such_pkg_xyz.mod'"):
        load("no_such_pkg_xyz.mod:make")


def test_weights_missing_truncated_or_remote_code(tmp_path):
    ckpt = _checkpoint(tmp_path)
    w = ckpt / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelSpecError, match="truncated"):
        load(str(ckpt))
    w.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ModelSpecError, match="corrupted"):
        load(str(ckpt))
    w.unlink()
    with pytest.raises(ModelSpecError, match="no weights"):
        load(str(ckpt))
    (ckpt / "config.json").write_text('{"auto_map": {"AutoModel": "x.Y"}, "architectures": ["Y"]}')
    with pytest.raises(ModelSpecError, match="--trust-remote-code"):
        load(str(ckpt))


def test_loading_writes_nothing(tmp_path):
    ckpt = _checkpoint(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in ckpt.iterdir()}
    load(str(ckpt))
    assert {p: p.stat().st_mtime_ns for p in ckpt.iterdir()} == before
    assert torch.is_tensor(next(load(str(ckpt)).model.parameters()))


@pytest.mark.parametrize(
    ("name", "expected"),
    [("tiny-gpt2", 116_480), pytest.param("smollm2", 134_515_008, marks=pytest.mark.slow)],
)
def test_one_parameter_count_everywhere(capsys, name, expected):
    """Parameters as Hugging Face counts them (tied weights once, no buffers), in the graph,
    `inspect --json`, `apply --json` and a growth refusal; buffers reported apart."""
    import json

    from archfx.ir import capture
    from archfx.passes.cli import main
    from archfx.passes.io.zoo import build

    model = build(name)
    assert sum(p.numel() for p in model.parameters()) == expected
    graph = capture(model)
    assert graph.num_parameters() == expected
    assert graph.num_buffers() == sum(b.numel() for b in model.buffers())
    assert main(["inspect", name, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["parameters"] == expected and data["buffers"] == graph.num_buffers()
    if name != "tiny-gpt2":
        return
    assert main(["apply", name, "--pipeline", "canonicalize", "--json"]) == 0
    params = json.loads(capsys.readouterr().out)["params"]
    assert params["before"] == params["after"] == expected
    assert params["buffers"] == {"before": 0, "after": 0}
    assert main(["apply", name, "--pipeline", "expand-mlp(factor=1000)"]) != 0
    assert f"from {expected:,} to" in capsys.readouterr().err
