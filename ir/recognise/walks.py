"""Graph walks and small readers the recognisers share."""

from __future__ import annotations

import re

from torch import fx

INDEX = re.compile(r"^\d+$")


def common_path(paths: list[str], strip_last: bool = True) -> str:
    """The module path the blocks share: their common prefix ("model.layers" for
    model.layers.0 … model.layers.5; a repeated call's own path, without its call number)."""
    split = [p.split("@")[0].split(".") for p in paths]
    common = []
    for parts in zip(*split, strict=False):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    if strip_last and len(common) == min(len(s) for s in split) and len(set(map(tuple, split))) > 1:
        common = common[:-1]
    if strip_last and len(paths) == 1 and INDEX.match(common[-1] if common else ""):
        common = common[:-1]
    return ".".join(common)


def reach(node: fx.Node, within: set, step) -> set:
    """Nodes of `within` reachable from `node` by repeated `step` (inputs or users)."""
    seen, todo = set(), [node]
    while todo:
        for m in step(todo.pop()):
            if m in within and m not in seen:
                seen.add(m)
                todo.append(m)
    return seen
