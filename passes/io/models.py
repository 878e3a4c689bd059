"""MODEL, as the CLI takes it: a Hugging Face checkpoint directory, a built-in name, or
`package.module:callable`. Loading never executes code from a checkpoint unless asked
(`trust_remote_code`), never unpickles (safetensors, or torch.load with weights_only=True),
and never writes to disk."""

from __future__ import annotations

import importlib
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from archfx.ir import ModelSpecError
from archfx.ir.serialize import read_json

from .zoo import BUILTINS, build

_CALLABLE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
FORMS = (
    "a checkpoint directory (config.json + weights), a built-in name, or package.module:callable"
)


@dataclass
class Loaded:
    model: torch.nn.Module
    example_inputs: object | None
    source: dict  # JSON record from which `rebuild` makes the same architecture


def load(spec: str, *, trust_remote_code: bool = False) -> Loaded:
    if spec in BUILTINS:
        return Loaded(build(spec), None, {"kind": "builtin", "name": spec})
    if _CALLABLE.match(spec) and not Path(spec).exists():
        model, example = _call(spec)
        return Loaded(model, example, {"kind": "callable", "target": spec})
    path = Path(spec)
    if path.exists() or "/" in spec or spec.startswith("."):
        return _load_dir(path, trust_remote_code)
    import difflib

    close = difflib.get_close_matches(spec, list(BUILTINS), n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise ModelSpecError(f"{spec!r} is not {FORMS}{hint}")


def rebuild(source: dict) -> torch.nn.Module:
    """The architecture a `Loaded.source` describes (weights are the caller's business)."""
    kind = source.get("kind")
    if kind == "builtin":
        return build(source["name"])
    if kind == "callable":
        return _call(source["target"])[0]
    if kind == "hf-dir":
        return _load_dir(Path(source["path"]), source.get("trust_remote_code", False)).model
    raise ModelSpecError(f"cannot rebuild a model from source {source!r}")


# A checkpoint directory has a tokenizer when it holds one of these (AutoTokenizer decides)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def tokenizer(loaded: Loaded, *, trust_remote_code: bool = False):
    """The source model's own tokenizer, or None: a checkpoint directory's (AutoTokenizer from
    its files), the packaged models' (MiniLM's files, SmolLM2's from its GGUF), a callable's
    model's when `name_or_path` is a directory that has one. Models built from configs (the
    zoo) have none."""
    from .zoo import packaged

    kind = loaded.source.get("kind")
    if kind == "builtin":
        name = loaded.source["name"]
        if name == "minilm":
            return tokenizer_from(packaged.minilm_dir())
        if name == "smollm2":
            return packaged.smollm2_tokenizer()
        return None
    if kind == "hf-dir":
        return tokenizer_from(loaded.source["path"], trust_remote_code=trust_remote_code)
    return tokenizer_from(getattr(loaded.model, "name_or_path", None))


def tokenizer_from(directory, *, trust_remote_code: bool = False):
    """AutoTokenizer from the local directory `directory` (no hub), or None when it has no
    tokenizer files; files that do not load are an error, not a missing tokenizer."""
    if not directory or not Path(directory).is_dir():
        return None
    directory = Path(directory)
    if not any((directory / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            str(directory), local_files_only=True, trust_remote_code=trust_remote_code
        )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelSpecError(f"{directory} has tokenizer files that do not load: {first}") from exc


def _call(spec: str):
    module_name, attr = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelSpecError(f"cannot import {module_name!r} (from {spec}): {exc}") from exc
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise ModelSpecError(f"{module_name} has no callable {attr!r}")
    try:
        out = fn()
    except Exception as exc:
        raise ModelSpecError(f"{spec} raised {type(exc).__name__}: {exc}") from exc
    model, example = out if isinstance(out, tuple) and len(out) == 2 else (out, None)
    if not isinstance(model, torch.nn.Module):
        raise ModelSpecError(
            f"{spec} returned {type(model).__name__}, not a torch.nn.Module (or a (model, example_inputs) pair)"
        )
    return model.eval(), example


def _load_dir(path: Path, trust_remote_code: bool) -> Loaded:
    if not path.exists():
        raise ModelSpecError(f"{path} does not exist")
    if not path.is_dir():
        raise ModelSpecError(
            f"{path} is a file; give the checkpoint directory that holds config.json"
        )
    if not (path / "config.json").exists():
        raise ModelSpecError(f"{path} is not a model directory: no config.json")
    raw = read_json(path / "config.json", ModelSpecError)
    if "auto_map" in raw and not trust_remote_code:
        raise ModelSpecError(
            f"{path} ships its own model code (auto_map); pass --trust-remote-code if you trust it"
        )
    _check_weights(path)
    import transformers as tf
    from transformers.utils import logging

    logging.disable_progress_bar()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    archs = raw.get("architectures") or []
    cls = getattr(tf, archs[0], None) if archs else tf.AutoModel
    if cls is None or not isinstance(cls, type):
        if not trust_remote_code:
            raise ModelSpecError(
                f"{path}: unknown architecture {archs[0]!r} (not in transformers {tf.__version__})"
            )
        cls = tf.AutoModel
    try:
        model = cls.from_pretrained(
            str(path), trust_remote_code=trust_remote_code, dtype="auto", use_safetensors=None
        )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelSpecError(f"cannot load {path}: {type(exc).__name__}: {first}") from exc
    return Loaded(
        model.eval(),
        None,
        {"kind": "hf-dir", "path": str(path.resolve()), "class": type(model).__name__},
    )


def _check_weights(path: Path) -> None:
    """Refuse missing or truncated weight files before transformers sees them."""
    safes = sorted(path.glob("*.safetensors"))
    bins = sorted(path.glob("pytorch_model*.bin"))
    if not safes and not bins:
        raise ModelSpecError(
            f"{path} has a config.json but no weights (model.safetensors or pytorch_model.bin)"
        )
    for f in safes:
        size = f.stat().st_size
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
        except (
            struct.error,
            json.JSONDecodeError,
            UnicodeDecodeError,
            MemoryError,
            OverflowError,
            ValueError,
        ) as exc:
            raise ModelSpecError(f"{f} is corrupted: unreadable safetensors header") from exc
        end = max(
            (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0
        )
        if 8 + n + end > size:
            raise ModelSpecError(f"{f} is truncated: {size} bytes, the header needs {8 + n + end}")
    for f in bins:
        try:
            torch.load(f, map_location="meta", weights_only=True, mmap=True)
        except Exception as exc:
            raise ModelSpecError(
                f"{f} is not a readable weights file: {type(exc).__name__}"
            ) from exc
