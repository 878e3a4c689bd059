"""Grow an optimizer with the model, so a training run can grow mid-way.

After `Pipeline.run` has grown a graph, `grow_optimizer` builds the same optimizer (class,
hyper-parameters, parameter groups) over the grown graph's parameters and carries its state
over: every per-parameter state tensor shaped like its parameter (Adam's moments, momentum
buffers) keeps its entries at the positions the weights moved to, and new entries are zero;
scalar state (Adam's step) is kept. New parameters (inserted blocks) start with no state and
join the first parameter group.
"""

from __future__ import annotations

import torch

from archfx.ir import Graph, PassError

from ..infra.pipeline import PipelineResult


def grow_optimizer(
    optimizer: torch.optim.Optimizer, before: Graph, result: PipelineResult
) -> torch.optim.Optimizer:
    """`optimizer` (over `before`'s parameters) rebuilt over `result.graph`'s parameters."""
    names = {id(p): n for n, p in before.gm.named_parameters()}
    after = dict(result.graph.gm.named_parameters())
    groups, placed, steps = [], set(), {}
    for group in optimizer.param_groups:
        params = []
        for p in group["params"]:
            if id(p) not in names:
                raise PassError(
                    "grow_optimizer: the optimizer holds a tensor that is not a parameter of `before`"
                )
            new, steps[id(p)] = _trace(names[id(p)], result)
            if new not in after:
                raise PassError(
                    f"grow_optimizer: parameter {names[id(p)]} has no counterpart after growth"
                )
            params.append(after[new])
            placed.add(new)
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
    fresh = [p for n, p in after.items() if n not in placed and p.requires_grad]
    if fresh and groups:
        groups[0]["params"] = groups[0]["params"] + fresh
    grown = type(optimizer)(groups)  # every group carries its hyper-parameters
    grown.defaults = dict(optimizer.defaults)
    for group, old_group in zip(grown.param_groups, optimizer.param_groups, strict=False):
        for new_p, old_p in zip(group["params"], old_group["params"], strict=False):
            old_state = optimizer.state.get(old_p)
            if not old_state:
                continue
            moves = steps[id(old_p)]
            grown.state[new_p] = {k: _move(v, old_p, new_p, moves) for k, v in old_state.items()}
    return grown


def _trace(name: str, result: PipelineResult) -> tuple[str, list[list]]:
    """A parameter's name after the pipeline, and every growth step's per-axis source
    indices for it, in order."""
    steps = []
    for record in result.records:
        name = record.tensor_maps.get("renamed", {}).get(name, name)
        layout = record.tensor_maps.get("layouts", {}).get(name)
        if layout is not None:
            steps.append(layout)
    return name, steps


def _move(value, old_p, new_p, steps):
    if not isinstance(value, torch.Tensor) or value.shape != old_p.shape:
        return value.clone() if isinstance(value, torch.Tensor) else value
    out = value.detach()
    for layout in steps:
        for k, src in enumerate(layout):
            if src is None:
                continue
            moved = out.index_select(k, src.clamp(min=0))
            keep = (src >= 0) & _first_copy(src)
            shape = [1] * out.dim()
            shape[k] = -1
            out = torch.where(keep.reshape(shape), moved, torch.zeros_like(moved))
    if out.shape != new_p.shape:
        raise PassError(
            f"grow_optimizer: state of shape {tuple(out.shape)} for a parameter of {tuple(new_p.shape)}"
        )
    return out.clone()


def _first_copy(src: torch.Tensor) -> torch.Tensor:
    """True where a source index appears for the first time (duplicates are new entries)."""
    kept = src.clamp(min=0)
    position = torch.arange(src.numel())
    first = torch.full((int(kept.max()) + 1,), src.numel()).scatter_reduce(
        0, kept, torch.where(src >= 0, position, src.numel()), "amin"
    )
    return (src >= 0) & (first[kept] == position)
