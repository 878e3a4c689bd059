"""Recognises the head: the linear map after the last block, tied or not, and the norm it reads.

A mixin of the structure analysis (`ir/analyze.py`): its methods read the graph through the
analyser's shared state."""

from __future__ import annotations

from collections import deque

from ..ops import (
    SHAPE,
    Linear,
    is_call,
    is_identity,
    strip,
)
from ..structure import (
    Embedding,
    Head,
    Stack,
)


class HeadRecogniser:
    def _head(self, stack: Stack, outside: set, embeddings: list[Embedding]) -> Head | None:
        """The first projection after the last stack, or, past a transform (BERT's dense →
        GELU → LayerNorm), the one that shares the token embedding's weight (tied)."""
        tokens = [self.params[e.weight] for e in embeddings if e.kind == "token"]

        def tied(lin: Linear) -> bool:
            w = self.params[lin.weight]
            return any(t is w or t.data_ptr() == w.data_ptr() for t in tokens)

        found: list[Linear] = []
        seen, todo = set(), deque([stack.output])
        while todo:
            n = todo.popleft()
            for u in self.sorted(n.users):
                if u in seen or u not in outside:
                    continue
                seen.add(u)
                lin = self.linear(u)
                if lin is not None:
                    found.append(lin)
                todo.append(u)
        if not found:
            return None
        lin = next((f for f in found if tied(f)), found[0])
        end = lin.input
        while is_identity(end) or is_call(end, SHAPE):
            end = end.args[0]
        last = stack.blocks[-1]
        known = [stack.final_norm, *(r.post_norm for r in reversed(last.residuals))]
        norm = next(
            (k for k in known if k is not None and end in (k.output, strip(k.output))),
            None,
        ) or self._norm_ending_at(end, self._all)
        return Head(lin, tied(lin), norm)
