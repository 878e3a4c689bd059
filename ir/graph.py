"""`Graph`: a captured model as a flat GraphModule, its example inputs, provenance and analyses.

The GraphModule takes the example tensors positionally and returns a flat tuple of tensors
(named by `output_names`). Passes edit a copy; analyses are cached until invalidated.
"""

from __future__ import annotations

import copy
import heapq
from dataclasses import dataclass, field

import torch
from torch import fx

from .errors import AnalysisError
from .inputs import Inputs, resized


@dataclass
class Graph:
    gm: fx.GraphModule
    inputs: Inputs
    output_names: list[str]
    provenance: dict = field(default_factory=dict)
    range_constraints: dict = field(default_factory=dict)
    _analyses: dict = field(default_factory=dict, repr=False)

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.gm(*tensors))

    def run(self, inputs: Inputs | None = None) -> tuple[torch.Tensor, ...]:
        inputs = inputs or self.inputs
        with torch.no_grad():
            return self(*inputs.tensors)

    def probe(self, nodes: list[fx.Node], inputs: Inputs | None = None) -> list[torch.Tensor]:
        """The values of `nodes` when the graph runs on `inputs` (the example inputs by default)."""
        wanted: dict[fx.Node, list[int]] = {}
        for i, n in enumerate(nodes):
            wanted.setdefault(n, []).append(i)
        found: list = [None] * len(nodes)

        class _Probe(fx.Interpreter):
            def run_node(self, n):
                value = super().run_node(n)
                for i in wanted.get(n, ()):
                    found[i] = value
                return value

        with torch.no_grad():
            _Probe(self.gm).run(*(inputs or self.inputs).tensors)
        return found

    @property
    def placeholders(self) -> list[fx.Node]:
        return [n for n in self.gm.graph.nodes if n.op == "placeholder"]

    def second_inputs(self) -> Inputs | None:
        """The example inputs redrawn at another size of every dynamic dimension."""
        shapes = [n.meta["val"].shape for n in self.placeholders]
        return resized(self.inputs, shapes, self.range_constraints)

    def copy(self) -> Graph:
        """A deep copy: a new GraphModule whose parameters share nothing with this one."""
        gm = copy.deepcopy(self.gm)
        return Graph(
            gm,
            self.inputs,
            list(self.output_names),
            dict(self.provenance),
            dict(self.range_constraints),
        )

    # analyses -------------------------------------------------------------------------------

    def analysis(self, name: str, compute):
        """A cached analysis result, computed on first use."""
        if name not in self._analyses:
            self._analyses[name] = compute(self)
        return self._analyses[name]

    def invalidate(self) -> None:
        self._analyses.clear()

    @property
    def structure(self):
        """The recognised Structure; a partial one (constructs the analysis could not account
        for) raises AnalysisError naming them: passes rewrite whole models or nothing."""
        found = self.found_structure
        if found.partial:
            raise AnalysisError(
                "the structure is partial, archfx will not rewrite part of a model: "
                + "; ".join(found.unrecognised)
            )
        return found

    @property
    def found_structure(self):
        """What the analysis found, partial or not (what `inspect` shows)."""
        from .analyze import analyze

        return self.analysis("structure", analyze)

    @property
    def dims(self):
        """The coupled-dimension analysis (ir/dims.py): which tensor axes must grow together."""
        from .dims import analyze_dims

        return self.analysis("dims", lambda g: analyze_dims(g.gm))

    # bookkeeping ----------------------------------------------------------------------------

    def num_parameters(self) -> int:
        """Parameters only, each tied tensor once: `sum(p.numel() for p in model.parameters())`
        of the captured model (buffers such as rotary frequencies: `num_buffers`)."""
        return sum(p.numel() for p in self.gm.parameters())

    def num_buffers(self) -> int:
        """Buffers (rotary frequencies, causal masks, AltUp's fixed coefficients …), each once."""
        return sum(b.numel() for b in self.gm.buffers())

    def num_nodes(self) -> int:
        return len(self.gm.graph.nodes)

    @property
    def device(self) -> torch.device:
        """Where the model's parameters live (CPU, GPU or meta): new parameters go there too."""
        first = next(self.gm.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    def set_tensor(self, target: str, value: torch.Tensor) -> None:
        """Replace (or create) the parameter or buffer behind a get_attr target."""
        *path, leaf = target.split(".")
        mod = self.gm
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        if isinstance(value, torch.nn.Parameter) or leaf in mod._parameters:
            value = (
                value
                if isinstance(value, torch.nn.Parameter)
                else torch.nn.Parameter(value, value.requires_grad or value.is_floating_point())
            )
            if leaf in mod._buffers:
                del mod._buffers[leaf]
            mod._parameters[leaf] = value
        else:
            mod.register_buffer(leaf, value)

    def delete_tensor(self, target: str) -> None:
        *path, leaf = target.split(".")
        mod = self.gm
        for part in path:
            mod = getattr(mod, part)
        delattr(mod, leaf)

    def tensor(self, target: str) -> torch.Tensor:
        """The parameter, buffer or constant behind a get_attr target."""
        obj = self.gm
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj


def reorder(g: fx.Graph) -> None:
    """Put `g`'s nodes in a topological order that keeps the current one wherever it is
    already valid (a node moves only after what it reads): for a rewrite that inserted nodes
    before a value they read."""
    index = {n: i for i, n in enumerate(g.nodes)}
    waiting = {n: len(set(n.all_input_nodes)) for n in g.nodes}
    ready = [(index[n], n.name) for n, k in waiting.items() if k == 0]
    by_name = {n.name: n for n in g.nodes}
    heapq.heapify(ready)
    order = []
    while ready:
        n = by_name[heapq.heappop(ready)[1]]
        order.append(n)
        for u in n.users:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, (index[u], u.name))
    if len(order) != len(index):
        raise AnalysisError("the graph has a cycle: it cannot be ordered")
    prev = order[0]
    for n in order[1:]:
        if prev.next is not n:
            prev.append(n)
        prev = n
