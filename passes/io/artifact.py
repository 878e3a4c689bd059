"""Save and load rewritten models: weights as safetensors plus a recipe (source model,
capture inputs, pipeline text, library versions). Loading rebuilds the source architecture,
captures it on the recorded inputs, replays the pipeline and loads the weights: no pickle,
no code in the recipe, nothing evaluated; a recipe whose source runs code (a `module:callable`,
a checkpoint's own model code) is refused unless the caller passes trust_remote_code=True."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
import transformers

from archfx.ir import ArtifactError, Graph, Inputs, ModelSpecError, capture
from archfx.ir.serialize import load_tensors, read_json, save_tensors, state, write_dir, write_json

from ..infra.pipeline import Pipeline

FORMAT = "archfx-model"
FORMAT_VERSION = 1


def save(
    graph: Graph,
    out: str | Path,
    *,
    source: dict,
    pipeline: str,
    model: torch.nn.Module | None = None,
    force: bool = False,
) -> Path:
    """Write `graph` (the result of `pipeline` on the model described by `source`) to `out`.

    For Hugging Face models pass the source `model` too: its config is stored beside the
    weights, so loading needs neither the original checkpoint nor a hub.
    """
    for key, value in graph.inputs.fixed.items():
        if not isinstance(value, (bool, int, float, str, type(None))):
            raise ArtifactError(
                f"cannot record the fixed input {key}={value!r}: only JSON scalars are supported"
            )
    config = getattr(model, "config", None)
    if isinstance(model, transformers.PreTrainedModel) and config is not None:
        source = {
            "kind": "hf-config",
            "class": type(model).__name__,
            "config": "config.json",
            "origin": source,
        }

    def fill(tmp: Path) -> None:
        tensors, aliases = state(graph.gm)
        weights_sha = save_tensors(tmp / "model.safetensors", tensors)
        inputs = dict(zip(graph.inputs.names, graph.inputs.tensors, strict=True))
        inputs_sha = save_tensors(tmp / "inputs.safetensors", inputs)
        if source["kind"] == "hf-config":
            config.to_json_file(str(tmp / "config.json"))
        write_json(
            tmp / "recipe.json",
            {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "source": source,
                "capture": {
                    "method": graph.provenance.get("method", "export"),
                    "inputs": graph.inputs.names,
                    "positional": graph.inputs.positional,
                    "fixed": graph.inputs.fixed,
                },
                "pipeline": pipeline,
                "dtype": _dtype(graph),
                "outputs": graph.output_names,
                "weights": {"file": "model.safetensors", "sha256": weights_sha, "aliases": aliases},
                "example_inputs": {"file": "inputs.safetensors", "sha256": inputs_sha},
                "versions": _versions(),
            },
        )

    return write_dir(out, fill, force=force)


def load(path: str | Path, *, trust_remote_code: bool = False) -> Graph:
    """Rebuild a saved model as a runnable `Graph` with the saved weights.

    The recipe is data: a source that rebuilds the model by running code — a `module:callable`,
    or a checkpoint that ships its own model code — is refused unless `trust_remote_code`."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path} is not a directory saved by archfx (`archfx apply --out`)")
    recipe = read_json(path / "recipe.json")
    if recipe.get("format") != FORMAT:
        raise ArtifactError(
            f"{path}/recipe.json is not an archfx recipe (format {recipe.get('format')!r})"
        )
    if recipe.get("version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} was saved in recipe version {recipe.get('version')}; this archfx reads {FORMAT_VERSION}"
        )
    try:
        cap, weights, ex = recipe["capture"], recipe["weights"], recipe["example_inputs"]
        source, text = recipe["source"], recipe["pipeline"]
    except KeyError as exc:
        raise ArtifactError(f"{path}/recipe.json lacks the field {exc}") from None
    tensors = load_tensors(path / weights["file"], weights.get("sha256"))
    inputs = load_tensors(path / ex["file"], ex.get("sha256"))
    missing = [n for n in cap["inputs"] if n not in inputs]
    if missing:
        raise ArtifactError(f"{path}/{ex['file']} lacks the example inputs {missing}")
    model = _rebuild(source, path, trust_remote_code)
    dtype = getattr(torch, str(recipe.get("dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype):
        raise ArtifactError(f"{path}/recipe.json names an unknown dtype {recipe.get('dtype')!r}")
    model = model.to(dtype)
    ins = Inputs(
        list(cap["inputs"]),
        [inputs[n] for n in cap["inputs"]],
        bool(cap["positional"]),
        dict(cap["fixed"]),
    )
    graph = capture(model, ins, method=cap.get("method", "export"))
    if text:
        graph = Pipeline.parse(text).run(graph, verify=False).graph
    _load_weights(graph, tensors, weights.get("aliases", {}), path)
    graph.provenance.update({"loaded_from": str(path), "pipeline": text})
    return graph


def _rebuild(source: dict, path: Path, trust_remote_code: bool) -> torch.nn.Module:
    if not isinstance(source, dict):
        raise ArtifactError(f"{path}/recipe.json: source must be an object, got {source!r}")
    if source.get("kind") == "callable" and not trust_remote_code:
        raise ArtifactError(
            f"{path}/recipe.json rebuilds the model by calling {source.get('target')!r}, which "
            "runs code the artifact names; pass trust_remote_code=True if you trust it"
        )
    if source.get("kind") == "hf-dir":  # only the caller's flag counts, never the recipe's
        source = {**source, "trust_remote_code": trust_remote_code}
    if source.get("kind") == "hf-config":
        cls_name = source.get("class", "")
        cls = getattr(transformers, cls_name, None)
        if not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel):
            raise ArtifactError(
                f"{path}/recipe.json names {cls_name!r}, which is not a transformers model class"
            )
        config_path = path / source.get("config", "config.json")
        if not config_path.exists():
            raise ArtifactError(f"{config_path} is missing")
        try:
            config = transformers.AutoConfig.from_pretrained(str(path))
        except Exception as exc:
            raise ArtifactError(f"{config_path} is not a readable config: {exc}") from exc
        return cls(config).eval()
    from .models import rebuild

    try:
        return rebuild(source).eval()
    except ModelSpecError as exc:
        raise ArtifactError(f"{path}: cannot rebuild the saved model: {exc}") from None


def _load_weights(graph: Graph, tensors: dict, aliases: dict, path: Path) -> None:
    own, own_aliases = state(graph.gm)
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ArtifactError(
            f"{path} does not match the rebuilt model: missing {missing[:3]}{'…' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'…' if len(unexpected) > 3 else ''}"
        )
    if own_aliases != aliases:
        raise ArtifactError(
            f"{path}: tied weights differ from the rebuilt model ({aliases} vs {own_aliases})"
        )
    with torch.no_grad():
        for name, t in tensors.items():
            target = graph.tensor(name)
            if target.shape != t.shape:
                raise ArtifactError(
                    f"{path}: {name} has shape {tuple(t.shape)}, the rebuilt model {tuple(target.shape)}"
                )
            if target.dtype != t.dtype:
                raise ArtifactError(
                    f"{path}: {name} is {t.dtype}, the rebuilt model {target.dtype}"
                )
            target.copy_(t)


def _dtype(graph: Graph) -> str:
    floats = [p.dtype for p in graph.gm.parameters() if p.is_floating_point()]
    return str(floats[0]).removeprefix("torch.") if floats else "float32"


def _versions() -> dict:
    out = {}
    for pkg in ("archfx", "torch", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out
