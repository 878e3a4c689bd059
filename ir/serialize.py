"""Artifacts on disk without pickle: safetensors for tensors, JSON for everything else,
written atomically (a temporary directory renamed into place)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import ArtifactError


def cache_dir() -> Path:
    """Where archfx keeps what it derives once: converted models, failure reproducers.
    $ARCHFX_CACHE, or ~/.cache/archfx."""
    return Path(os.environ.get("ARCHFX_CACHE", Path.home() / ".cache" / "archfx"))


def state(module: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Unique tensors by name, and the aliases (tied names) pointing at them."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[int, str] = {}
    named = list(module.named_parameters(remove_duplicate=False)) + list(
        module.named_buffers(remove_duplicate=False)
    )
    for name, t in named:
        if id(t) in seen:
            aliases[name] = seen[id(t)]
            continue
        seen[id(t)] = name
        tensors[name] = t.detach().contiguous()
    return tensors, aliases


def write_dir(out: str | Path, fill: Callable[[Path], None], *, force: bool = False) -> Path:
    """Create `out` atomically: `fill(tmp)` writes into a temporary sibling that is renamed.

    An existing non-empty `out` is replaced only with `force`; an interrupted write leaves
    the old directory (or nothing) in place, never a half-written one.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ArtifactError(
            f"{out} exists and is not empty; choose another directory or pass --force"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        fill(tmp)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """Write a safetensors file; returns its sha256."""
    save_file({k: v.cpu() for k, v in tensors.items()}, str(path))
    return sha256(path)


def load_tensors(path: Path, expected_sha: str | None = None) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise ArtifactError(f"{path} is missing")
    if expected_sha is not None and sha256(path) != expected_sha:
        raise ArtifactError(
            f"{path} does not match its recipe (checksum differs): the file was changed or truncated"
        )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{path} is not a readable safetensors file: {exc}") from exc


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(
    path: Path,
    error: type[Exception] = ArtifactError,
    missing: str = "not an archfx model directory",
) -> dict:
    """A JSON object from `path`; every problem raises `error` with a one-line reason."""
    if not path.exists():
        raise error(f"{path} is missing: {missing}")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise error(f"{path} does not hold a JSON object")
    return obj
