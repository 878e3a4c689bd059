"""Capture a PyTorch model as an archfx `Graph`.

torch.export (non-strict) by default: the ATen-level training IR keeps `aten.linear` and
`scaled_dot_product_attention` whole and records each node's `nn_module_stack`. On request,
torch.fx symbolic tracing checks a hand-written model's Python, then the same ATen tracing
gives the graph the analyses expect. The input model is never mutated: it is captured in eval
mode (its own mode is restored) and the graph owns copies of every parameter and buffer.
"""

from __future__ import annotations

import operator
import re
import traceback

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from . import inputs as _inputs
from .errors import CaptureError, first_line
from .graph import Graph
from .ops import INPLACE

METHODS = ("export", "fx")


def capture(
    model: nn.Module, example_inputs=None, *, method: str = "export", dynamic: bool = True
) -> Graph:
    """Capture `model` on `example_inputs` (derived from the model when None) as a `Graph`."""
    if method not in METHODS:
        raise CaptureError(f"unknown capture method {method!r}; choose one of {', '.join(METHODS)}")
    if not isinstance(model, nn.Module):
        raise CaptureError(f"expected a torch.nn.Module, got {type(model).__name__}")
    ins = (
        _inputs.derive(model)
        if example_inputs is None
        else _inputs.from_user(model, example_inputs)
    )
    was_training = model.training
    state = _state(model)
    model.eval()
    try:
        if method == "fx":
            _check_fx_traceable(model)
        ep = _export(model, ins, dynamic)
    finally:
        model.train(was_training)
        _restore(model, state)
    gm, out_spec = _flatten(ep.module())
    _own_tensors(gm)
    _out_of_place(gm)
    _inline_autocast_off(gm)
    _einsum_as_matmul(gm)
    _views_as_reshapes(gm)
    return Graph(
        gm=gm,
        inputs=ins,
        output_names=_output_names(out_spec),
        provenance={
            "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "method": method,
        },
        range_constraints=dict(ep.range_constraints),
    )


def _state(model: nn.Module) -> dict:
    """Each module's buffers and tensor attributes, before the export runs its forward."""
    return {
        m: (dict(m._buffers), {k for k, v in vars(m).items() if isinstance(v, torch.Tensor)})
        for m in model.modules()
    }


def _restore(model: nn.Module, state: dict) -> None:
    """Undo what the traced forward left on the model: buffers and tensors a module creates
    lazily on its first call (PaLM's rotary tables, causal masks) hold the export's fake
    tensors, and the model must stay as the user gave it."""
    for m in model.modules():
        buffers, tensors = state.get(m, ({}, set()))
        m._buffers.clear()
        m._buffers.update(buffers)
        for k in [k for k, v in vars(m).items() if isinstance(v, torch.Tensor)]:
            if k not in tensors:
                delattr(m, k)


def _export(model: nn.Module, ins: _inputs.Inputs, dynamic: bool) -> torch.export.ExportedProgram:
    args, kwargs = ins.as_call()
    shapes = ins.dynamic_shapes() if dynamic else None
    if shapes is not None and not ins.positional:
        shapes = {k: shapes[k] for k in kwargs}
    try:
        with torch.no_grad():
            return torch.export.export(model, args, kwargs, dynamic_shapes=shapes, strict=False)
    except Exception as exc:  # torch.export raises many types; all become one clear error
        raise CaptureError(_explain(model, exc)) from exc


def _check_fx_traceable(model: nn.Module) -> None:
    try:
        fx.symbolic_trace(model)
    except Exception as exc:
        raise CaptureError(
            f"torch.fx could not trace {type(model).__name__}: {first_line(exc)}; "
            "use method='export' (the default), which handles Python control flow on shapes"
        ) from exc


def _explain(model: nn.Module, exc: BaseException) -> str:
    """One line: what failed, where in the user's code, and what to try."""
    msg = str(exc)
    where = ""
    frames = re.findall(r'File "([^"]+)", line (\d+)', msg)
    if not frames:
        frames = [(f.filename, str(f.lineno)) for f in traceback.extract_tb(exc.__traceback__)]
    user = [
        f for f in frames if "/torch/" not in f[0] and "/archfx/" not in f[0] and "/ir/" not in f[0]
    ]
    if user:
        where = f" at {user[-1][0]}:{user[-1][1]}"
    hint = "check that the example inputs match the model's forward"
    low = msg.lower()
    if "data-dependent" in low or "guardondatadependent" in low or "could not guard" in low:
        hint = "the model branches on tensor values; make that branch static or pass example inputs that avoid it"
    elif "constraint" in low or "specializ" in low:
        hint = "a dynamic dimension was fixed by the model; pass dynamic=False"
    elif "unsupported" in low or "not supported" in low:
        hint = "rewrite that construct, or try method='fx' for plain Python modules"
    return f"cannot capture {type(model).__name__}: {first_line(exc)}{where}; {hint}"


def _flatten(gm: fx.GraphModule) -> tuple[fx.GraphModule, pytree.TreeSpec]:
    """Make the exported module take its tensors positionally and return a flat tuple."""
    graph = gm.graph
    out_spec = graph._codegen.pytree_info.out_spec
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op == "placeholder" and not isinstance(node.meta.get("val"), torch.Tensor):
            if node.users:
                raise CaptureError(f"input {node.name!r} is not a tensor but the graph uses it")
            graph.erase_node(node)
    graph._codegen = fx.graph.CodeGen()
    out = graph.output_node()
    flat = out.args[0]
    out.args = (tuple(flat) if isinstance(flat, (list, tuple)) else (flat,),)
    # a plain GraphModule: without the exported module's input-spec hooks and guards
    return fx.GraphModule(
        gm, graph, class_name=type(gm).__name__.replace("Impl", "") or "GraphModule"
    ), out_spec


def _output_names(out_spec: pytree.TreeSpec) -> list[str]:
    leaves = pytree.tree_unflatten(list(range(out_spec.num_leaves)), out_spec)
    names = []
    for path, _ in pytree.tree_flatten_with_path(leaves)[0]:
        names.append(pytree.keystr(path).strip("[]'.\"") or "output")
    return names


def _out_of_place(gm: fx.GraphModule) -> None:
    """`x.add_(y)` becomes `x + y`, and what reads x after it reads the sum: the same values,
    no mutation a rewrite could trip over (Falcon's `mlp_output += attention_output`, PaLM's
    residual `x.add_(branch)` after a norm read x). Left alone when a view of x (which would
    see the mutation) is read after it."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in INPLACE:
            continue
        x = node.args[0]
        if not isinstance(x, fx.Node) or x.op != "call_function":
            continue
        later = [u for u in x.users if u is not node and order[u] > order[node]]
        views = [u for u in x.users if u is not node and order[u] < order[node] and _aliases(u)]
        if any(order[v2] > order[node] for v in views for v2 in v.users):
            continue
        node.target = INPLACE[node.target]
        for u in later:
            u.replace_input_with(x, node)
        changed = True
    if changed:
        gm.recompile()


def _aliases(node: fx.Node) -> bool:
    """Ops whose output shares memory with their input."""
    return node.op == "call_function" and node.target in (
        torch.ops.aten.view.default,
        torch.ops.aten.transpose.int,
        torch.ops.aten.permute.default,
        torch.ops.aten.slice.Tensor,
        torch.ops.aten.select.int,
        torch.ops.aten.unsqueeze.default,
        torch.ops.aten.squeeze.dim,
        torch.ops.aten.expand.default,
        torch.ops.aten.t.default,
        torch.ops.aten.alias.default,
        torch.ops.aten.unflatten.int,
        operator.getitem,
    )


def _views_as_reshapes(gm: fx.GraphModule) -> None:
    """A `view` of a transposed or permuted tensor becomes a `reshape` (the same values). The
    model's `.transpose(1, 2).contiguous().view(b, s, -1)` is exported without the
    `.contiguous()` when the tensor happens to be laid out contiguously already — SDPA's
    output is — and a rewrite that changes that layout (another value head size selects
    another kernel) would leave a view the runtime refuses."""
    layout = {torch.ops.aten.transpose.int, torch.ops.aten.permute.default}
    changed = False
    for node in gm.graph.nodes:
        if (
            node.op == "call_function"
            and node.target is torch.ops.aten.view.default
            and isinstance(node.args[0], fx.Node)
            and node.args[0].op == "call_function"
            and node.args[0].target in layout
        ):
            node.target = torch.ops.aten.reshape.default
            changed = True
    if changed:
        gm.recompile()


def _inline_autocast_off(gm: fx.GraphModule) -> None:
    """`with torch.autocast(..., enabled=False)` regions (x-transformers' rotary embedding)
    become ordinary ops: torch.export wraps them in a higher-order op the analyses cannot see
    into, and with autocast off the region computes in the dtypes it is given, as inlined
    ops do. Regions with autocast on stay wrapped."""
    wrap = getattr(torch.ops.higher_order, "wrap_with_autocast", None)
    changed = False
    for node in list(gm.graph.nodes):
        if wrap is None or node.op != "call_function" or node.target is not wrap:
            continue
        if node.args[2] is not False:
            continue
        sub = getattr(gm, node.args[4].target)
        env = dict(zip(sub.graph.find_nodes(op="placeholder"), node.args[5:], strict=True))
        outputs = None
        with gm.graph.inserting_before(node):
            for inner in sub.graph.nodes:
                if inner.op == "placeholder":
                    continue
                if inner.op == "output":
                    outputs = fx.node.map_arg(inner.args[0], env.__getitem__)
                    continue
                if inner.op == "get_attr":
                    raise CaptureError(f"{node.name}: an autocast region reads {inner.target}")
                env[inner] = gm.graph.node_copy(inner, env.__getitem__)
                stack = node.meta.get("nn_module_stack")
                if stack is not None:
                    env[inner].meta.setdefault("nn_module_stack", stack)
        for user in list(node.users):
            user.replace_all_uses_with(outputs[user.args[1]])
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.recompile()


def _einsum_as_matmul(gm: fx.GraphModule) -> None:
    """A two-operand `einsum` that is a batched matrix product (one contracted index, shared
    batch indices, free indices of one operand broadcast over the other's) becomes permute →
    unsqueeze → matmul → permute: the form attention written as
    `einsum("bhid,bhjd->bhij", q, k)` — or multi-query `einsum("bhid,bjd->bhij", q, k)` — is
    recognised in. Other einsums stay as they are (and are named by the analyses that meet
    them)."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != torch.ops.aten.einsum.default:
            continue
        plan = _matmul_plan(node.args[0], node.args[1])
        if plan is None:
            continue
        (a, b), (perm_a, unsq_a, perm_b, unsq_b, perm_out) = node.args[1], plan
        with gm.graph.inserting_before(node):
            pa, pb = (
                _unsqueezed(gm, node, _permuted(gm, node, t, p), at, n)
                for t, p, (at, n) in ((a, perm_a, unsq_a), (b, perm_b, unsq_b))
            )
            out = _fake_call(gm, node, torch.ops.aten.matmul.default, pa, pb)
            out = _permuted(gm, node, out, perm_out)
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.recompile()


def _matmul_plan(equation, operands):
    """(A's permutation, (where, how many) unit axes A gets, the same for B, the product's
    permutation) computing a two-operand einsum with one broadcasting matmul, or None."""
    if not isinstance(equation, str) or len(operands) != 2 or "..." in equation:
        return None
    lhs, _, out = equation.replace(" ", "").partition("->")
    terms = lhs.split(",")
    if not out or len(terms) != 2 or any(len(set(t)) != len(t) for t in (*terms, out)):
        return None
    ta, tb = terms
    batch = [i for i in ta if i in tb and i in out]
    contracted = [i for i in ta if i in tb and i not in out]
    free_a = [i for i in ta if i not in tb]
    free_b = [i for i in tb if i not in ta]
    if len(contracted) != 1 or not free_a or not free_b or set(out) != {*batch, *free_a, *free_b}:
        return None
    (*extra_a, fa), (*extra_b, fb), c = free_a, free_b, contracted[0]
    product = [*batch, *extra_a, *extra_b, fa, fb]
    return (
        [ta.index(i) for i in [*batch, *extra_a, fa, c]],
        (len(batch) + len(extra_a), len(extra_b)),
        [tb.index(i) for i in [*batch, *extra_b, c, fb]],
        (len(batch), len(extra_a)),
        [product.index(i) for i in out],
    )


def _unsqueezed(gm: fx.GraphModule, like: fx.Node, node: fx.Node, at: int, n: int) -> fx.Node:
    if at == 0:
        return node  # matmul broadcasts over missing leading axes itself (x @ W)
    for _ in range(n):
        node = _fake_call(gm, like, torch.ops.aten.unsqueeze.default, node, at)
    return node


def _permuted(gm: fx.GraphModule, like: fx.Node, node: fx.Node, perm: list) -> fx.Node:
    if perm == sorted(perm):
        return node
    return _fake_call(gm, like, torch.ops.aten.permute.default, node, perm)


def _fake_call(gm: fx.GraphModule, like: fx.Node, target, *args) -> fx.Node:
    """A new node computing target(*args), with the metadata of `like` and its fake value."""
    node = gm.graph.call_function(target, args)
    node.meta = {k: v for k, v in like.meta.items() if k != "val"}
    fake = [a.meta["val"] if isinstance(a, fx.Node) else a for a in args]
    with like.meta["val"].fake_mode:
        node.meta["val"] = target(*fake)
    return node


def _own_tensors(gm: fx.GraphModule) -> None:
    """Replace every parameter, buffer and tensor constant by a copy (ties kept)."""
    memo: dict[int, torch.Tensor] = {}

    def own(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in memo:
            c = t.detach().clone()
            memo[id(t)] = (
                nn.Parameter(c, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else c
            )
        return memo[id(t)]

    for mod in gm.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None:
                mod._parameters[name] = own(p)
        for name, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[name] = own(b)
        for name, v in list(vars(mod).items()):
            if isinstance(v, torch.Tensor) and not name.startswith("_"):
                setattr(mod, name, own(v))
