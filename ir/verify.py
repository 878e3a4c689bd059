"""Checks run after every pass: lint, shape propagation, and the numerical certificate."""

from __future__ import annotations

import copy
import operator
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch
from torch import fx
from torch._dispatch.python import enable_python_dispatcher
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.node import map_aggregate, map_arg
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.utils import _pytree as pytree

from .errors import VerificationError
from .graph import Graph
from .ops import is_assert

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def tolerance_for(graph: Graph) -> float:
    """The certificate's tolerance for a graph: by the dtype of its floating-point parameters."""
    dtypes = {p.dtype for p in graph.gm.parameters() if p.is_floating_point()}
    return max((TOLERANCE.get(d, 1e-5) for d in dtypes), default=1e-5)


def lint(graph: Graph) -> None:
    """Structural checks: well-formed fx graph, every get_attr resolves to a tensor."""
    try:
        graph.gm.graph.lint()
    except Exception as exc:
        raise VerificationError(f"malformed graph: {exc}") from exc
    for node in graph.gm.graph.nodes:
        if node.op == "get_attr":
            try:
                graph.tensor(node.target)
            except AttributeError as exc:
                raise VerificationError(
                    f"node {node.name} reads {node.target!r}, which does not exist"
                ) from exc


def shape_signature(graph: Graph) -> dict[fx.Node, str]:
    """What each node's propagated shape depends on besides its inputs' shapes: its op, target
    and arguments. Taken before a pass, it lets `refresh_shapes` re-propagate only what the
    pass touched."""
    return {n: _signature(n) for n in graph.gm.graph.nodes}


def _signature(n: fx.Node) -> str:
    return repr((n.op, n.target, map_arg((n.args, n.kwargs), id)))


def refresh_shapes(graph: Graph, since: dict[fx.Node, str] | None = None) -> None:
    """Re-propagate symbolic shapes through the graph (`meta['val']` of every node).

    This is the shape check: a rewrite whose ops do not compose at the traced symbolic shapes
    fails here with the node that broke. With `since` (a `shape_signature` taken before the
    rewrite), only nodes that are new, have new arguments, or read a value whose shape, stride
    or dtype changed are propagated again; every other node keeps its shape. The result is
    the full propagation's: a node is skipped only when nothing it is computed from changed.
    A rewrite usually repeats itself in every layer: an operator applied to inputs of the same
    layout as one already propagated in this run (same op, same arguments, same symbolic
    shapes, strides, dtypes) takes that node's result instead of dispatching again; ops that
    introduce new (data-dependent) symbols or read a constant's value are always propagated.
    """
    vals = [n.meta["val"] for n in graph.placeholders]
    mode = next((v.fake_mode for v in vals if hasattr(v, "fake_mode")), None)
    if mode is None:
        return
    prop = FakeTensorProp(graph.gm, mode) if since is None else _Incremental(graph.gm, mode, since)
    try:
        with mode, enable_python_dispatcher():
            prop.propagate_dont_convert_inputs(*vals)
    except Exception as exc:
        node = getattr(exc, "node", None)
        where = f" at node {node}" if node is not None else ""
        raise VerificationError(f"shape check failed{where}: {str(exc).splitlines()[0]}") from exc


class _Incremental(FakeTensorProp):
    """Fake-tensor propagation that reuses the shapes of nodes nothing changed for."""

    def __init__(self, gm: fx.GraphModule, mode, since: dict[fx.Node, str]):
        super().__init__(gm, mode)
        self.since = since
        self.changed: set[fx.Node] = set()
        self.seen: dict[tuple, tuple] = {}

    def run_node(self, n: fx.Node):
        if n.op in ("call_function", "call_method", "call_module") and not self._dirty(n):
            return n.meta["val"]
        if n.op == "get_attr" and "val" in n.meta:
            value = self.fetch_attr(n.target)
            if _same_tensor(value, n.meta["val"]):  # the pass left this attribute alone
                return value
        old = _layout(n.meta.get("val"))
        key = self._key(n)
        if key in self.seen:
            result, n.meta["val"] = self.seen[key]
        else:
            n.meta.pop("unbacked_bindings", None)
            result = super().run_node(n)
            if key is not None and "unbacked_bindings" not in n.meta:
                self.seen[key] = result, n.meta["val"]
        if n not in self.since or _layout(n.meta.get("val")) != old:
            self.changed.add(n)
        return result

    def _key(self, n: fx.Node) -> tuple | None:
        """What an operator's result is a function of under fake tensors: the op and the
        layouts of its arguments. None for nodes that are not plain operator calls."""
        if n.op != "call_function" or not (
            isinstance(n.target, torch._ops.OpOverload) or n.target is operator.getitem
        ):
            return None
        args = map_arg((n.args, n.kwargs), self.env.__getitem__)
        if any(map(_may_hold_value, pytree.tree_leaves(args))):
            return None
        return n.target, _layout(args)

    def _dirty(self, n: fx.Node) -> bool:
        return (
            "val" not in n.meta
            or self.since.get(n) != _signature(n)
            or any(a in self.changed for a in n.all_input_nodes)
        )


def _may_hold_value(v) -> bool:
    """Whether fake propagation may read this argument's value, not just its layout: a
    one-element tensor with data (fake tensors keep such constants, `item()` reads them)."""
    if isinstance(v, FakeTensor):
        return v.constant is not None
    return isinstance(v, torch.Tensor) and v.device.type != "meta" and v.numel() <= 1


def _same_tensor(value, val) -> bool:
    """Whether a (static-shaped) attribute still has the layout its propagated value records."""
    return (
        isinstance(value, torch.Tensor)
        and isinstance(val, torch.Tensor)
        and value.shape == val.shape
        and value.stride() == val.stride()
        and value.storage_offset() == val.storage_offset()
        and value.dtype == val.dtype
        and value.device == val.device
    )


def _layout(val):
    """Shape, stride, offset, dtype, device and grad flag of a propagated value, symbolic sizes
    as their expressions; other values with their type (1, 1.0 and True differ). Hashable."""
    return map_aggregate(val, _value)


def _value(v):
    if isinstance(v, torch.Tensor):
        return (
            tuple(map(_scalar, v.shape)),
            tuple(map(_scalar, v.stride())),
            _scalar(v.storage_offset()),
            v.dtype,
            v.device,
            v.requires_grad,
        )
    return _scalar(v)


def _scalar(v):
    if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return "symbolic", v.node.expr
    return type(v), v if isinstance(v, Hashable) else repr(v)


@dataclass
class Certificate:
    """Max |Δ| of every output between two graphs, on the example inputs and a second shape."""

    max_abs_diff: float
    per_output: dict[str, float]
    input_sets: list[str]
    tolerance: float
    notes: list[str] = field(default_factory=list)
    scale: float = 1.0  # max(1, largest |output|): rounding is relative, so is the tolerance
    fp64_diff: float | None = None  # both graphs run in fp64, when the fp32 diff exceeds tolerance

    @property
    def ok(self) -> bool:
        """Within tolerance in the model's dtype; or, where fp32 rounding alone exceeds it (deep
        models with large outputs: another summation order, weights rescaled by irrational
        factors), the two graphs run in fp64 agree within tolerance × the output magnitude."""
        if self.max_abs_diff <= self.tolerance:
            return True
        return self.fp64_diff is not None and self.fp64_diff <= self.tolerance * self.scale

    def to_json(self) -> dict:
        return {
            "max_abs_diff": self.max_abs_diff,
            "per_output": self.per_output,
            "inputs": self.input_sets,
            "tolerance": self.tolerance,
            "scale": self.scale,
            "fp64_diff": self.fp64_diff,
            "ok": self.ok,
            "notes": self.notes,
        }


def compare(
    expected, actual, names: list[str], widened: bool = False, notes=None
) -> dict[str, float]:
    """Max |Δ| per output; a missing output or a shape mismatch is an error. With `widened`
    (a pass that grows the model width), an output whose last axis grew is compared on its
    leading features: the original output must be there, unchanged."""
    if len(expected) != len(actual):
        raise VerificationError(
            f"the rewritten graph returns {len(actual)} outputs, the original {len(expected)}"
        )
    out = {}
    for name, e, a in zip(names, expected, actual, strict=True):
        if (
            widened
            and e.dim() == a.dim() > 0
            and e.shape[:-1] == a.shape[:-1]
            and a.shape[-1] > e.shape[-1]
        ):
            if notes is not None:
                notes.append(
                    f"{name} grew from {e.shape[-1]} to {a.shape[-1]} features; "
                    f"compared on the first {e.shape[-1]}"
                )
            a = a[..., : e.shape[-1]]
        if e.shape != a.shape:
            raise VerificationError(
                f"output {name!r} changed shape: {tuple(e.shape)} → {tuple(a.shape)}"
            )
        if e.numel() == 0:
            out[name] = 0.0
        elif e.is_floating_point():
            out[name] = float((e.double() - a.double()).abs().max())
        else:
            out[name] = 0.0 if torch.equal(e, a) else float("inf")
    return out


def certify(
    reference: Graph, candidate: Graph, tolerance: float | None = None, widened: bool = False
) -> Certificate:
    """Run both graphs on the reference's example inputs and on a second input shape."""
    tolerance = tolerance_for(reference) if tolerance is None else tolerance
    sets = [("example " + _describe(reference.inputs.tensors), reference.inputs)]
    notes = []
    second = reference.second_inputs()
    if second is not None:
        sets.append(("second " + _describe(second.tensors), second))
    else:
        notes.append("the graph has static shapes: checked at the example shape only")
    per: dict[str, float] = {}
    scale = 1.0
    runs = []
    for _, ins in sets:
        expected = reference.run(ins)
        runs.append((ins, expected))
        scale = max(
            [scale]
            + [float(e.abs().max()) for e in expected if e.is_floating_point() and e.numel()]
        )
        diffs = compare(expected, candidate.run(ins), reference.output_names, widened, notes)
        for k, v in diffs.items():
            per[k] = max(per.get(k, 0.0), v)
    notes = list(dict.fromkeys(notes))
    worst = max(per.values(), default=0.0)
    fp64 = None
    if worst > tolerance:
        fp64 = own = 0.0
        ref64, cand64 = in_fp64(reference.gm), in_fp64(candidate.gm)
        for ins, expected in runs:
            args = [t.double() if t.is_floating_point() else t for t in ins.tensors]
            with torch.no_grad():
                exact = ref64(*args)
                diffs = compare(exact, cand64(*args), reference.output_names, widened)
            own = max([own, *compare(exact, expected, reference.output_names).values()])
            fp64 = max([fp64, *diffs.values()])
        notes.append(
            f"max |Δ| {worst:.3g} > {tolerance:g} on outputs up to |{scale:.3g}|; the input "
            f"graph's own fp32 error (against itself in fp64) is {own:.3g}; in fp64 the two "
            f"graphs differ by {fp64:.3g}"
        )
    return Certificate(worst, per, [s for s, _ in sets], tolerance, notes, scale, fp64)


def in_fp64(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A float64 copy of a graph: no dtype asserts, no casts back to fp32."""
    gm = copy.deepcopy(gm).double()
    for node in list(gm.graph.nodes):
        if is_assert(node):
            gm.graph.erase_node(node)
            continue
        node.args = tuple(torch.float64 if a is torch.float32 else a for a in node.args)
        node.kwargs = {
            k: torch.float64 if v is torch.float32 else v for k, v in node.kwargs.items()
        }
    gm.recompile()
    return gm


def _describe(tensors) -> str:
    return " ".join("x".join(str(d) for d in t.shape) for t in tensors)
