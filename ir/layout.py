"""Layout normalisation shared by canonicalize and the ONNX lowering."""

from __future__ import annotations

import torch
from torch import fx

from .ops import PERMUTES, aten, is_call


def explicit_reshape_copies(graph: fx.Graph) -> int:
    """Give every `reshape` of a transposed or permuted tensor an explicit contiguous copy.

    reshape copies such inputs anyway; with the copy in the graph the layout every consumer
    sees is fixed, and re-tracing at symbolic shapes cannot turn the reshape into a view that
    fails (as the ONNX exporter otherwise does on T5's attention output). Returns the count.
    """
    count = 0
    for n in list(graph.nodes):
        if is_call(n, {aten.reshape.default}) and is_call(n.args[0], PERMUTES):
            with graph.inserting_before(n):
                copy = graph.call_function(
                    aten.clone.default, (n.args[0],), {"memory_format": torch.contiguous_format}
                )
            copy.meta.update(
                {k: v for k, v in n.meta.items() if k in ("nn_module_stack", "stack_trace")}
            )
            n.replace_input_with(n.args[0], copy)
            count += 1
    return count
