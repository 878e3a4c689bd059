"""Recognises embeddings: token, position and token-type tables read by the first block.

A mixin of the structure analysis (`ir/analyze.py`): its methods read the graph through the
analyser's shared state."""

from __future__ import annotations

from ..ops import (
    POSITION_OPS,
    SHAPE,
    aten,
    is_call,
    is_identity,
    param_target,
)
from ..structure import (
    Embedding,
)

_MAX_TOKEN_TYPES = 16


class EmbeddingRecogniser:
    def _embeddings(self, outside: set) -> list[Embedding]:
        out = []
        for n in self.nodes:
            if n not in outside:
                continue
            if is_call(n, {aten.embedding.default}):
                w = param_target(n.args[0])
                if w is None:
                    continue
                num, dim = self.params[w].shape
                idx = n.args[1]
                while is_call(idx, SHAPE) or is_identity(idx):
                    idx = idx.args[0]
                anc = self._value_ancestors(n.args[1]) | {n.args[1], idx}  # the index too
                if idx.op == "placeholder":
                    kind = "token"
                elif num <= _MAX_TOKEN_TYPES:
                    kind = "token_type"  # a position table covers every position; a type table a few ids
                elif any(a.op == "get_attr" or is_call(a, POSITION_OPS) for a in anc):
                    kind = "position"  # arange / cumsum over the sequence, or position-id buffers
                else:
                    kind = "other"
                out.append(Embedding(kind, n, w, num, dim))
            elif is_call(n, {aten.conv2d.default, aten.convolution.default}) and any(
                a.op == "placeholder" for a in self._value_ancestors(n)
            ):
                w = param_target(n.args[1])
                out.append(
                    Embedding("patch", n, w, self.params[w].shape[0], self.params[w].shape[0])
                )
        return out
