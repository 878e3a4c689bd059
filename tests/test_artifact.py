"""Save → load: identical outputs, no pickle, clear errors for damaged or mismatched artifacts."""

import json

import pytest
import torch

from archfx.ir import ArtifactError, capture
from archfx.ir.serialize import write_dir
from archfx.ir.verify import certify
from archfx.passes import Pipeline
from archfx.passes.artifact import load, save
from archfx.passes.zoo import build


def saved(tmp_path, name="tiny-gpt2", pipeline="canonicalize"):
    model = build(name)
    graph = capture(model)
    result = Pipeline.parse(pipeline).run(graph).graph
    out = save(
        result,
        tmp_path / name,
        source={"kind": "builtin", "name": name},
        pipeline=pipeline,
        model=model,
    )
    return result, out


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-t5", "tiny-vit", "nanogpt", "minilm"])
def test_round_trip_is_identical(tmp_path, name):
    result, out = saved(tmp_path, name)
    again = load(out)
    cert = certify(result, again, tolerance=0.0)
    assert cert.max_abs_diff == 0.0 and len(cert.input_sets) == 2
    assert not list(out.glob("*.pt")) and not list(out.glob("*.bin"))  # safetensors and JSON only
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["pipeline"] == "canonicalize" and recipe["versions"]["torch"]


def test_tied_weights_stay_tied(tmp_path):
    _, out = saved(tmp_path, "tiny-gpt2")
    again = load(out)
    emb, head = again.structure.embeddings[0], again.structure.head
    assert head.tied and again.tensor(emb.weight) is again.tensor(head.linear.weight)


def test_corrupted_weights_are_refused(tmp_path):
    _, out = saved(tmp_path)
    w = out / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum"):
        load(out)


def test_truncated_weights_are_refused_even_without_checksum(tmp_path):
    _, out = saved(tmp_path)
    recipe = json.loads((out / "recipe.json").read_text())
    recipe["weights"]["sha256"] = None
    (out / "recipe.json").write_text(json.dumps(recipe))
    w = out / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="not a readable safetensors"):
        load(out)


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda r: r.update(format="something-else"), "not an archfx recipe"),
        (lambda r: r.update(version=99), "recipe version 99"),
        (lambda r: r.pop("pipeline"), "lacks the field"),
        (lambda r: r["source"].update({"class": "os.system"}), "not a transformers model class"),
        (lambda r: r.update(dtype="float16"), "is torch.float32, the rebuilt model torch.float16"),
    ],
)
def test_mismatched_recipes_are_refused(tmp_path, edit, fragment):
    _, out = saved(tmp_path)
    recipe = json.loads((out / "recipe.json").read_text())
    edit(recipe)
    (out / "recipe.json").write_text(json.dumps(recipe))
    with pytest.raises(ArtifactError, match=fragment):
        load(out)


def test_bad_json_and_missing_dir(tmp_path):
    with pytest.raises(ArtifactError, match="not a directory"):
        load(tmp_path / "nope")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "recipe.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load(tmp_path / "d")


def test_weights_of_another_model_are_refused(tmp_path):
    _, out = saved(tmp_path, "tiny-gpt2")
    _, other = saved(tmp_path, "tiny-llama")
    (out / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    recipe = json.loads((out / "recipe.json").read_text())
    recipe["weights"]["sha256"] = None
    (out / "recipe.json").write_text(json.dumps(recipe))
    with pytest.raises(ArtifactError, match="does not match the rebuilt model"):
        load(out)


def test_writes_are_atomic(tmp_path):
    out = tmp_path / "art"

    def fill(d):
        (d / "a.txt").write_text("partial")
        raise KeyboardInterrupt  # interrupted half-way

    with pytest.raises(KeyboardInterrupt):
        write_dir(out, fill)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    write_dir(out, lambda d: (d / "a.txt").write_text("v1"))
    with pytest.raises(ArtifactError, match="--force"):
        write_dir(out, lambda d: (d / "a.txt").write_text("v2"))
    with pytest.raises(KeyboardInterrupt):
        write_dir(out, fill, force=True)
    assert (out / "a.txt").read_text() == "v1"  # the old version survives an interrupted replace
    write_dir(out, lambda d: (d / "a.txt").write_text("v2"), force=True)
    assert (out / "a.txt").read_text() == "v2" and sorted(p.name for p in tmp_path.iterdir()) == [
        "art"
    ]


def test_loaded_model_trains(tmp_path):
    _, out = saved(tmp_path, "tiny-llama")
    graph = load(out)
    logits = graph(*graph.inputs.tensors)[0]
    logits.float().pow(2).mean().backward()
    assert all(p.grad is not None for p in graph.gm.parameters())
    assert isinstance(graph.gm, torch.nn.Module)
