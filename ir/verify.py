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

from .errors import VerificationError, first_line
from .graph import Graph
from .inputs import Inputs
from .ops import is_assert


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
    at: list[fx.Node] = []
    run_node = prop.run_node

    def tracked(n: fx.Node):
        at[:] = [n]
        return run_node(n)

    prop.run_node = tracked
    try:
        with mode, enable_python_dispatcher():
            prop.propagate_dont_convert_inputs(*vals)
    except Exception as exc:
        where = f" at node {at[0].name} ({at[0].target})" if at else ""
        raise VerificationError(f"shape check failed{where}: {first_line(exc)}") from exc


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
    """The evidence that a rewrite preserved the function.

    The math is checked in `precision` (fp64 unless the graph cannot run there): the rewrite is
    applied to an fp64 copy of its input, and the two fp64 graphs must agree on every output,
    on the example inputs and a second shape, within `tolerance` of that output's own scale
    (`per_output`). The rewritten model in its own dtype is tied to that fp64 rewrite by its
    parameters (`rounding`): every parameter or buffer the pass created or changed must be the
    fp64 rewrite's value rounded once to its dtype. `max_abs_diff` is the model's own-dtype
    figure (rewritten against input, in the model's dtype), reported beside the input's own
    rounding error against fp64 (`input_rounding`) and the rewrite's (`output_rounding`).
    """

    per_output: dict[str, float]  # relative |Δ| per output in `precision`
    precision: str  # "float64", or "float32" where the graph cannot run in fp64
    tolerance: float  # relative, per output, in `precision`
    input_sets: list[str]
    max_abs_diff: float  # in the model's own dtype
    dtype_per_output: dict[str, float] = field(default_factory=dict)
    rounding: dict | None = None  # parameters the pass changed against the fp64 rewrite's
    input_rounding: float | None = None  # the input model in its dtype against fp64, relative
    output_rounding: float | None = None  # the rewritten model in its dtype against fp64, relative
    notes: list[str] = field(default_factory=list)

    @property
    def math_diff(self) -> float:
        return max(self.per_output.values(), default=0.0)

    @property
    def ok(self) -> bool:
        return self.math_diff <= self.tolerance and (
            self.rounding is None or not self.rounding["violations"]
        )

    def reason(self) -> str:
        """One line: why the certificate failed (empty when it holds)."""
        if self.math_diff > self.tolerance:
            name = max(self.per_output, key=self.per_output.get)
            return (
                f"output {name!r} differs by {self.math_diff:.3g} of its scale in "
                f"{self.precision} (allowed {self.tolerance:g})"
            )
        if self.rounding and self.rounding["violations"]:
            v = self.rounding["violations"][0]
            return (
                f"{len(self.rounding['violations'])} parameter(s) are not the {self.precision} "
                f"rewrite rounded once to their dtype: {v['name']} off by {v['diff']:.3g} "
                f"where rounding explains {v['bound']:.3g}"
            )
        return ""

    def to_json(self) -> dict:
        return {
            "ok": self.ok,
            "precision": self.precision,
            "tolerance": self.tolerance,
            "math_diff": self.math_diff,
            "per_output": self.per_output,
            "max_abs_diff": self.max_abs_diff,
            "dtype_per_output": self.dtype_per_output,
            "input_rounding": self.input_rounding,
            "output_rounding": self.output_rounding,
            "rounding": self.rounding,
            "inputs": self.input_sets,
            "notes": self.notes,
        }


MATH_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5}


def compare(
    expected, actual, names: list[str], widened: bool = False, notes=None, relative=False
) -> dict[str, float]:
    """Max |Δ| per output (with `relative`, divided by the output's largest |value|); a
    missing output or a shape mismatch is an error. With `widened` (a pass that grows the
    model width), an output whose last axis grew is compared on its leading features: the
    original output must be there, unchanged."""
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
            diff = float((e.double() - a.double()).abs().max())
            if relative:
                scale = float(e.double().abs().max())
                diff = diff / scale if scale > 0 else diff
            out[name] = diff
        else:
            out[name] = 0.0 if torch.equal(e, a) else float("inf")
    return out


@dataclass
class Runs:
    """A graph's outputs on the certificate's input sets, in the model's dtype and in the
    precision the math is checked in (computed once, compared as often as needed)."""

    sets: list[tuple[str, Inputs, Inputs]]  # (label, model-dtype inputs, exact inputs)
    model: list[tuple[torch.Tensor, ...]]
    exact: list[tuple[torch.Tensor, ...]]
    precision: torch.dtype

    @classmethod
    def of(cls, graph: Graph, exact: Graph, sets) -> Runs:
        return cls(
            sets,
            [graph.run(ins) for _, ins, _ in sets],
            [exact.run(ins_x) for _, _, ins_x in sets],
            precision_of(exact),
        )


def input_sets(graph: Graph, exact: Graph, notes: list[str]) -> list[tuple[str, Inputs, Inputs]]:
    """The example inputs and a second shape (where the graph is dynamic), each also in the
    precision of `exact` (a graph made by `in_precision`)."""
    sets = [("example " + _describe(graph.inputs.tensors), graph.inputs, exact.inputs)]
    second = graph.second_inputs()
    if second is not None:
        cast = _cast_inputs(second, precision_of(exact))
        sets.append(("second " + _describe(second.tensors), second, cast))
    else:
        notes.append("the graph has static shapes: checked at the example shape only")
    return sets


def exact_copy(graph: Graph, notes: list[str]) -> tuple[Graph, Runs]:
    """`graph` in fp64 (fp32 where fp64 cannot run, noted) and the runs of both."""
    for dtype in (torch.float64, torch.float32):
        exact = in_precision(graph, dtype)
        sets = input_sets(graph, exact, notes)
        try:
            return exact, Runs.of(graph, exact, sets)
        except Exception as exc:
            if dtype == torch.float32:
                raise VerificationError(
                    f"the graph cannot be certified: it does not run in fp32 ({first_line(exc)})"
                ) from exc
            notes.append(f"fp64 run failed ({first_line(exc, 120)}); checked in fp32")
    raise AssertionError("unreachable")


def certify_runs(
    before: Runs,
    after: Runs,
    names: list[str],
    widened: bool = False,
    notes: list[str] | None = None,
    tolerance: float | None = None,
) -> Certificate:
    """The certificate from two graphs' runs on the same input sets."""
    notes = list(notes or [])
    per: dict[str, float] = {}
    dtype_per: dict[str, float] = {}
    input_rounding = output_rounding = 0.0
    for expected, actual, exp_x, act_x in zip(
        before.model, after.model, before.exact, after.exact, strict=True
    ):
        _merge(dtype_per, compare(expected, actual, names, widened, notes))
        _merge(per, compare(exp_x, act_x, names, widened, notes, relative=True))
        ours = compare(exp_x, expected, names, relative=True).values()
        theirs = compare(act_x, actual, names, widened, relative=True).values()
        input_rounding = max(input_rounding, *ours, 0.0)
        output_rounding = max(output_rounding, *theirs, 0.0)
    if before.precision != torch.float64:
        notes.append(f"checked in {_name(before.precision)}: the graph cannot run in fp64")
    return Certificate(
        per_output=per,
        precision=_name(before.precision),
        tolerance=MATH_TOLERANCE[before.precision] if tolerance is None else tolerance,
        input_sets=[label for label, _, _ in before.sets],
        max_abs_diff=max(dtype_per.values(), default=0.0),
        dtype_per_output=dtype_per,
        input_rounding=input_rounding,
        output_rounding=output_rounding,
        notes=list(dict.fromkeys(notes)),
    )


def certify(
    reference: Graph, candidate: Graph, widened: bool = False, tolerance: float | None = None
) -> Certificate:
    """Certify that `candidate` computes what `reference` computes, two graphs as they are:
    both upcast to fp64, so rounding of the candidate's parameters to the model's dtype counts
    as a difference (right for a reloaded or re-exported model against its source; a pass is
    certified by the pipeline, which applies it to an fp64 copy of its input instead).
    `tolerance` overrides the relative tolerance per output of that precision."""
    notes: list[str] = []
    ref_x, before = exact_copy(reference, notes)
    cand_x = in_precision(candidate, before.precision)
    after = Runs.of(candidate, cand_x, before.sets)
    names = reference.output_names
    return certify_runs(before, after, names, widened, notes, tolerance)


def in_precision(graph: Graph, dtype: torch.dtype) -> Graph:
    """A copy of `graph` computing in `dtype`: every floating parameter, buffer, input and
    dtype argument converted (casts to lower precisions included), dtype asserts dropped."""
    gm = _convert(graph.gm, dtype, copy_first=True)
    out = Graph(
        gm,
        _cast_inputs(graph.inputs, dtype),
        list(graph.output_names),
        dict(graph.provenance),
        dict(graph.range_constraints),
    )
    _retype_values(out, dtype)
    return out


def align(exact: Graph, graph: Graph) -> bool:
    """Make `exact` (a graph `in_precision`) hold `graph`'s parameter and buffer values, upcast,
    where they differ: the next pass is then applied to an exact copy of the input it really
    gets, rounded weights included. Returns whether anything changed."""
    dtype = precision_of(exact)
    have = _tensors(exact)
    done: dict[int, torch.Tensor] = {}
    changed = False
    for name, t in _tensors(graph).items():
        if not t.is_floating_point() or t.is_meta:
            continue
        x = have.get(name)
        up = t.detach().to(dtype)
        if x is not None and x.shape == up.shape and torch.equal(x.detach(), up):
            continue
        if id(t) not in done:
            done[id(t)] = (
                torch.nn.Parameter(up, t.requires_grad) if isinstance(t, torch.nn.Parameter) else up
            )
        exact.set_tensor(name, done[id(t)])
        changed = True
    return changed


def compose(
    certificates: list[Certificate], before: Runs, after: Runs, names, widened
) -> Certificate:
    """The whole pipeline's certificate from its passes': each pass exact in fp64 on the input it
    got (rounded as the passes before it left it), the figures in the model's dtype end to end."""
    whole = certify_runs(before, before, names)  # the input's own figures
    model = certify_runs(after, after, names)
    dtype_per: dict[str, float] = {}
    for e, a in zip(before.model, after.model, strict=True):
        _merge(dtype_per, compare(e, a, names, widened))
    per: dict[str, float] = {}
    notes: list[str] = []
    violations: list[dict] = []
    checked = 0
    for c in certificates:
        _merge(per, c.per_output)
        notes += c.notes
        violations += c.rounding["violations"] if c.rounding else []
        checked += c.rounding["checked"] if c.rounding else 0
    whole.per_output = per
    whole.max_abs_diff = max(dtype_per.values(), default=0.0)
    whole.dtype_per_output = dtype_per
    whole.output_rounding = model.input_rounding
    whole.rounding = {
        "checked": checked,
        "worst": max((c.rounding["worst"] for c in certificates if c.rounding), default=0.0),
        "violations": violations,
    }
    whole.notes = list(
        dict.fromkeys(
            [
                *notes,
                "the pipeline's passes each certified on the input it received (rounded to the "
                "model's dtype by the passes before it); per_output is the largest of theirs",
            ]
        )
    )
    return whole


def redo_in_precision(graph: Graph, dtype: torch.dtype) -> None:
    """After a pass ran on a graph `in_precision(…, dtype)`: convert what the pass created in
    another precision by design (DDL's fp32 gates, casts) to `dtype`, in place."""
    _convert(graph.gm, dtype)


def check_rounding(before: Graph, after: Graph, after_exact: Graph) -> dict:
    """Every parameter and buffer the pass created or changed (in `after`, against `before`)
    must be the exact rewrite's value rounded once to its dtype.

    A pass does its arithmetic in fp64 and rounds once: the bound per entry is half a unit in
    the last place of the tensor's dtype (plus fp64 roundoff), relative to the exact value, plus half the dtype's subnormal spacing (an exact
    zero stays zero to within underflow). A 1% error in any new
    or rescaled parameter fails in every dtype (bf16's half-ulp is 0.39%)."""
    old = _tensors(before)
    exact = _tensors(after_exact)
    checked, worst, violations = 0, 0.0, []
    for name, t in _tensors(after).items():
        if not t.is_floating_point() or t.is_meta:
            continue
        t = t.detach()
        o = old.get(name)
        if o is not None and o.shape == t.shape and o.dtype == t.dtype and torch.equal(o, t):
            continue
        x = exact.get(name)
        if x is None or x.shape != t.shape:
            violations.append({"name": name, "diff": float("inf"), "bound": 0.0})
            continue
        checked += 1
        x = x.detach().double()
        info = torch.finfo(t.dtype)
        u = info.eps / 2 + 16 * torch.finfo(torch.float64).eps
        diff = (t.double() - x).abs()
        bound = u * x.abs() + info.tiny * info.eps / 2  # + half the subnormal spacing
        ratio = float((diff / bound).max())
        worst = max(worst, ratio)
        if bool((diff > bound).any()):
            i = int((diff - bound).argmax())
            violations.append(
                {
                    "name": name,
                    "diff": float(diff.flatten()[i]),
                    "bound": float(bound.flatten()[i]),
                }
            )
    return {"checked": checked, "worst": worst, "violations": violations}


def in_fp64(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A float64 copy of a GraphModule: no dtype asserts, no casts to lower precisions."""
    return _convert(gm, torch.float64, copy_first=True)


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _convert(
    gm: torch.fx.GraphModule, dtype: torch.dtype, copy_first: bool = False
) -> torch.fx.GraphModule:
    """`gm` (or, with `copy_first`, a copy of it) with every floating tensor and dtype argument
    in `dtype`. The copy converts each tensor once (tied tensors stay tied) and never holds a
    second copy in the old dtype."""
    done: dict[int, torch.Tensor] = {}

    def conv(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in done:
            new = t.detach().to(dtype) if t.dtype != dtype else t.detach().clone()
            done[id(t)] = (
                torch.nn.Parameter(new, t.requires_grad)
                if isinstance(t, torch.nn.Parameter)
                else new
            )
        return done[id(t)]

    floats = [
        t
        for mod in gm.modules()
        for store in (mod._parameters, mod._buffers)
        for t in store.values()
        if t is not None and t.is_floating_point()
    ]
    floats += [
        v for v in vars(gm).values() if isinstance(v, torch.Tensor) and v.is_floating_point()
    ]
    if copy_first:
        gm = copy.deepcopy(gm, {id(t): conv(t) for t in floats})
    else:
        for mod in gm.modules():
            for store in (mod._parameters, mod._buffers):
                for k, t in store.items():
                    if t is not None and t.is_floating_point() and t.dtype != dtype:
                        store[k] = conv(t)
        for name, value in list(vars(gm).items()):  # constants held as plain attributes
            if (
                isinstance(value, torch.Tensor)
                and value.is_floating_point()
                and value.dtype != dtype
            ):
                setattr(gm, name, conv(value))

    def swap(a):
        return dtype if a in _FLOATS else a

    for node in list(gm.graph.nodes):
        if is_assert(node):
            gm.graph.erase_node(node)
            continue
        node.args = map_aggregate(node.args, swap)
        node.kwargs = map_aggregate(node.kwargs, swap)
    gm.recompile()
    return gm


def _retype_values(graph: Graph, dtype: torch.dtype) -> None:
    """Give every node's symbolic value its new dtype: after `_convert`, every floating value
    the graph computes is in `dtype` (same shapes and strides)."""
    vals = [n.meta.get("val") for n in graph.placeholders]
    mode = next((v.fake_mode for v in vals if hasattr(v, "fake_mode")), None)
    if mode is None:
        return

    def retype(v):
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != dtype:
            return torch.empty_strided(v.shape, v.stride(), dtype=dtype, device=v.device)
        return v

    with mode:
        for n in graph.gm.graph.nodes:
            if "val" in n.meta:
                n.meta["val"] = map_aggregate(n.meta["val"], retype)


def _cast_inputs(inputs: Inputs, dtype: torch.dtype) -> Inputs:
    return Inputs(
        inputs.names,
        [t.to(dtype) if t.is_floating_point() else t for t in inputs.tensors],
        inputs.positional,
        inputs.fixed,
    )


def _tensors(graph: Graph) -> dict[str, torch.Tensor]:
    return dict(graph.gm.state_dict(keep_vars=True))


def precision_of(graph: Graph) -> torch.dtype:
    """The floating dtype of a graph made by `in_precision` (its first floating tensor's)."""
    return next(
        (t.dtype for t in graph.gm.state_dict().values() if t.is_floating_point()),
        torch.float64,
    )


def _merge(into: dict, new: dict) -> None:
    for k, v in new.items():
        into[k] = max(into.get(k, 0.0), v)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _describe(tensors) -> str:
    return " ".join("x".join(str(d) for d in t.shape) for t in tensors)
