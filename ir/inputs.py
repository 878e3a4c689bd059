"""Example inputs: derived from a model when not given, and re-drawn at a second shape.

`Inputs` holds named tensors in the order of the captured graph's placeholders, plus the
non-tensor keyword arguments (such as ``use_cache=False``) the capture fixed as constants.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import sympy
import torch
from torch import nn

from .errors import CaptureError

BATCH = 2
SEQ = 8
DECODER_SEQ = 6


@dataclass
class Inputs:
    """Named example tensors; `positional` says whether the model takes them positionally."""

    names: list[str]
    tensors: list[torch.Tensor]
    positional: bool = False
    fixed: dict = field(default_factory=dict)

    def as_call(self) -> tuple[tuple, dict]:
        """(args, kwargs) to call the original model with."""
        if self.positional:
            return tuple(self.tensors), dict(self.fixed)
        return (), {**dict(zip(self.names, self.tensors, strict=True)), **self.fixed}

    def dynamic_shapes(self):
        """torch.export dynamic shapes: batch and sequence dims left to export (Dim.AUTO)."""
        auto = torch.export.Dim.AUTO
        specs = []
        for t in self.tensors:
            dims = {0: auto} if t.dim() >= 1 else {}
            if t.dim() >= 2 and (not t.is_floating_point() or t.dim() == 3):
                dims[1] = auto
            specs.append(dims)
        if self.positional:
            return tuple(specs)
        shapes = dict(zip(self.names, specs, strict=True))
        shapes.update(dict.fromkeys(self.fixed))
        return shapes

    def to(self, device) -> Inputs:
        return Inputs(self.names, [t.to(device) for t in self.tensors], self.positional, self.fixed)


def from_user(model: nn.Module, example) -> Inputs:
    """Normalise user-given example inputs: a tensor, a tuple of tensors, or a dict of kwargs."""
    if isinstance(example, Inputs):
        return example
    if isinstance(example, torch.Tensor):
        example = (example,)
    if isinstance(example, (tuple, list)):
        params = [
            p.name
            for p in inspect.signature(model.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        if not all(isinstance(t, torch.Tensor) for t in example):
            raise CaptureError(
                "positional example inputs must all be tensors; pass a dict of keyword inputs for other values"
            )
        names = (
            params[: len(example)]
            if len(params) >= len(example)
            else [f"arg{i}" for i in range(len(example))]
        )
        return Inputs(list(names), list(example), positional=True)
    if isinstance(example, dict):
        tensors = {k: v for k, v in example.items() if isinstance(v, torch.Tensor)}
        fixed = {k: v for k, v in example.items() if not isinstance(v, torch.Tensor)}
        return Inputs(list(tensors), list(tensors.values()), positional=False, fixed=fixed)
    raise CaptureError(
        f"example inputs must be a tensor, tuple or dict, not {type(example).__name__}"
    )


def derive(model: nn.Module, seed: int = 0) -> Inputs:
    """Example inputs a model accepts, read from its config or its first layers.

    Hugging Face models: token ids within the vocabulary (plus decoder ids for
    encoder-decoders), or pixel values at the configured image size; caches off.
    Other modules: token ids if the first parameterised layer is an embedding,
    images if it is a 2-d convolution.
    """
    gen = torch.Generator().manual_seed(seed)
    config = getattr(model, "config", None)
    sig = inspect.signature(model.forward).parameters
    fixed = {"use_cache": False} if "use_cache" in sig else {}
    if config is not None and hasattr(model, "main_input_name"):
        main = model.main_input_name
        cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        if main == "input_ids":
            vocab = getattr(cfg, "vocab_size", None)
            if not vocab:
                raise CaptureError(
                    f"{type(model).__name__}: config has no vocab_size; pass example inputs"
                )
            limit = (
                getattr(cfg, "max_position_embeddings", None)
                or getattr(cfg, "n_positions", None)
                or SEQ
            )
            seq = min(SEQ, limit)
            names = ["input_ids"]
            tensors = [torch.randint(0, vocab, (BATCH, seq), generator=gen)]
            if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in sig:
                names.append("decoder_input_ids")
                tensors.append(
                    torch.randint(0, vocab, (BATCH, min(DECODER_SEQ, seq)), generator=gen)
                )
            return Inputs(names, tensors, positional=False, fixed=fixed)
        if main == "pixel_values":
            size = getattr(config, "image_size", 224)
            size = size if isinstance(size, int) else size[0]
            channels = getattr(config, "num_channels", 3)
            t = torch.randn(BATCH, channels, size, size, generator=gen)
            return Inputs(["pixel_values"], [t], positional=False, fixed=fixed)
        raise CaptureError(
            f"{type(model).__name__} takes {main!r}, which archfx cannot invent; pass example inputs"
        )
    first = next(
        (m for m in model.modules() if isinstance(m, (nn.Embedding, nn.Conv2d, nn.Linear))), None
    )
    name = next(iter(sig), "x")
    if isinstance(first, nn.Embedding):
        seq = SEQ
        block_size = getattr(getattr(model, "config", None), "block_size", None) or getattr(
            model, "block_size", None
        )
        if block_size:
            seq = min(seq, block_size)
        t = torch.randint(0, first.num_embeddings, (BATCH, seq), generator=gen)
        return Inputs([name], [t], positional=True)
    if isinstance(first, nn.Conv2d):
        size = getattr(model, "image_size", 32)
        t = torch.randn(BATCH, first.in_channels, size, size, generator=gen)
        return Inputs([name], [t], positional=True)
    raise CaptureError(
        f"cannot derive example inputs for {type(model).__name__} (no config, embedding or conv found); "
        "pass example_inputs"
    )


def resized(
    graph_inputs: Inputs, placeholder_shapes: list, range_constraints: dict, seed: int = 1
) -> Inputs | None:
    """Inputs at a second shape: every dynamic dim moved to another value within its range.

    Values are drawn like the examples: integers within the observed range (constant
    tensors such as all-ones masks stay constant), floats from a normal distribution.
    Returns None when the graph has no dynamic dimension.
    """
    gen = torch.Generator().manual_seed(seed)
    choice: dict = {}
    for shape, t in zip(placeholder_shapes, graph_inputs.tensors, strict=True):
        for dim, size in zip(shape, t.shape, strict=True):
            if isinstance(dim, torch.SymInt) and isinstance(dim.node.expr, sympy.Symbol):
                sym = dim.node.expr
                if sym in choice:
                    continue
                rng = range_constraints.get(sym)
                lo = int(rng.lower) if rng is not None else 2
                hi = _finite(rng.upper) if rng is not None else None
                new = size + 3
                if hi is not None and new > hi:
                    new = size - 1 if size - 1 >= lo else size
                choice[sym] = new
    if not choice or all(choice[s] == 0 for s in choice):
        return None
    tensors = []
    for shape, t in zip(placeholder_shapes, graph_inputs.tensors, strict=True):
        new_shape = []
        for dim, size in zip(shape, t.shape, strict=True):
            if isinstance(dim, torch.SymInt):
                new_shape.append(int(dim.node.expr.subs(choice)))
            else:
                new_shape.append(size)
        tensors.append(_draw_like(t, new_shape, gen))
    return Inputs(graph_inputs.names, tensors, graph_inputs.positional, graph_inputs.fixed)


def _finite(bound) -> int | None:
    try:
        return int(bound)
    except (TypeError, ValueError, AttributeError, OverflowError):
        return None


def _draw_like(t: torch.Tensor, shape: list[int], gen: torch.Generator) -> torch.Tensor:
    if t.numel() and bool((t == t.flatten()[0]).all()):
        return torch.full(shape, t.flatten()[0].item(), dtype=t.dtype)
    if t.is_floating_point():
        return torch.randn(shape, generator=gen).to(t.dtype)
    if t.dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    lo, hi = int(t.min()), int(t.max())
    return torch.randint(lo, hi + 1, shape, generator=gen, dtype=t.dtype)
