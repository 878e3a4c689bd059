"""Save → load: identical outputs, no pickle, clear errors for damaged or mismatched artifacts."""

import json
import shutil

import pytest
import torch

from archfx.ir import ArtifactError, capture
from archfx.ir.serialize import write_dir
from archfx.ir.verify import certify
from archfx.passes import Pipeline
from archfx.passes.io.artifact import load, save
from archfx.passes.io.zoo import build
from archfx.passes.io.zoo.random_arch import build_random

from .helpers import sampled


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


@pytest.fixture(scope="module")
def gpt2_artifact(tmp_path_factory):
    """tiny-gpt2 canonicalized, saved once for the tests that damage a copy of it."""
    return saved(tmp_path_factory.mktemp("artifact"))[1]


@pytest.mark.parametrize(
    "name",
    ["tiny-gpt2", "tiny-vit", "nanogpt", *sampled(["tiny-t5", "minilm"], ())],
)
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
def test_mismatched_recipes_are_refused(tmp_path, gpt2_artifact, edit, fragment):
    out = shutil.copytree(gpt2_artifact, tmp_path / "copy")
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


CALLED = []


def _record_call():
    """Stands for any zero-argument callable a tampered recipe could name."""
    CALLED.append(True)
    return build("tiny-gpt2")


def test_a_recipe_runs_no_code_unless_trusted(tmp_path):
    """The recipe is data: a source that rebuilds the model by calling `module:callable`
    (saved from a user's own model, or put there by whoever edited the file) is refused
    before anything is imported or called, unless the caller passes trust_remote_code=True."""
    graph = capture(build_random())  # the architecture random_config draws from seed 0
    target = "archfx.passes.io.zoo.random_arch:build_random"
    out = save(graph, tmp_path / "arch", source={"kind": "callable", "target": target}, pipeline="")
    with pytest.raises(ArtifactError, match="trust_remote_code=True"):
        load(out)
    again = load(out, trust_remote_code=True)
    assert certify(graph, again, tolerance=0.0).max_abs_diff == 0.0

    recipe = json.loads((out / "recipe.json").read_text())
    recipe["source"]["target"] = f"{__name__}:_record_call"
    (out / "recipe.json").write_text(json.dumps(recipe))
    with pytest.raises(ArtifactError, match="trust_remote_code=True"):
        load(out)
    assert CALLED == []


def test_a_recipe_cannot_turn_on_remote_code(tmp_path):
    """A recipe whose checkpoint source says trust_remote_code=true does not get it: only the
    caller's flag counts (the checkpoint ships its own model code in auto_map)."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"auto_map": {"AutoModel": "x.Y"}, "architectures": ["Y"]}')
    _, out = saved(tmp_path, "nanogpt")
    recipe = json.loads((out / "recipe.json").read_text())
    recipe["source"] = {"kind": "hf-dir", "path": str(ckpt), "trust_remote_code": True}
    (out / "recipe.json").write_text(json.dumps(recipe))
    with pytest.raises(ArtifactError, match="ships its own model code"):
        load(out)
