"""Attention rewritten into memory ops (`archfx::memory_write` / `memory_read`, ir/memory.py):
the rewrite the `sdnc` pass and the decode form (passes/engines/decode.py) share.

- `from_sdpa`: SDPA(q, k, v, mask, p, causal, scale, gqa) → read(q, write(k, v), …) with the
  same arguments; a GQA repeat of the keys and values (Hugging Face's repeat_kv) is undone so
  that query heads read the shared bank.
- `parse_attention`: a hand-written attention (q·kᵀ, scaling, soft-capping c·tanh(x/c),
  additive biases and masks, softmax, ·v) read as one memory read; anything else between the
  two matmuls is refused with the op named.
- `check_causal`: every read's mask allows exactly the causal slots, on the example inputs.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch import fx

from archfx.ir import Graph, PassError
from archfx.ir.memory import READ, WRITE
from archfx.ir.ops import DROPOUT, IDENTITY, MATMUL, VIEWS, aten, is_call, op_arg

SDPA = aten.scaled_dot_product_attention.default
MASKED = -1e30  # a fill at or below this masks a slot


def from_sdpa(g: fx.Graph, core: fx.Node) -> fx.Node:
    q, k, v, *rest = core.args
    k, v, gqa = _shared_banks(k, v)
    memory = _node(g, core, WRITE, (k, v))
    kwargs = {**core.kwargs, "enable_gqa": True} if gqa else core.kwargs
    read = _node(
        g, core, READ, (q, _item(g, core, memory, 0), _item(g, core, memory, 1), *rest), kwargs
    )
    core.replace_all_uses_with(read)
    g.erase_node(core)  # SDPA is seeded (dropout): dead-code elimination keeps it otherwise
    return read


def _shared_banks(k: fx.Node, v: fx.Node) -> tuple[fx.Node, fx.Node, bool]:
    """The key/value banks before a GQA head repeat (x[:, :, None].expand(…, n, …).reshape(…),
    as Hugging Face's repeat_kv writes it) when keys and values both have one, so query heads
    read the shared bank (enable_gqa, the same arithmetic) instead of n copies of it."""
    (kb, nk), (vb, nv) = _unrepeat(k), _unrepeat(v)
    return (kb, vb, True) if nk == nv > 1 else (k, v, False)


def _unrepeat(x: fx.Node) -> tuple[fx.Node, int]:
    if not is_call(x, VIEWS):
        return x, 1
    e = _skip_full_slices(x.args[0])
    if not is_call(e, {aten.expand.default}):
        return x, 1
    u = _skip_full_slices(e.args[0])
    if not (is_call(u, {aten.unsqueeze.default}) and u.args[1] in (2, -3)):
        return x, 1
    bank = _skip_full_slices(u.args[0])
    b, r, out = (tuple(map(str, n.meta["val"].shape)) for n in (bank, e, x))
    if len(b) != 4 or len(r) != 5 or r[:2] + r[3:] != b or not r[2].isdigit():
        return x, 1
    n = int(r[2])
    if out[0] != b[0] or out[2:] != b[2:] or out[1] != str(int(b[1]) * n):
        return x, 1
    return bank, n


def _skip_full_slices(x: fx.Node) -> fx.Node:
    while (
        is_call(x, {aten.slice.Tensor})
        and op_arg(x, "start") in (None, 0)
        and op_arg(x, "end") in (None, 2**63 - 1)
        and op_arg(x, "step") == 1
    ):
        x = x.args[0]
    return x


def _node(g: fx.Graph, like: fx.Node, target, args, kwargs=None) -> fx.Node:
    n = g.call_function(target, tuple(args), dict(kwargs or {}))
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in like.meta:
            n.meta[key] = like.meta[key]
    return n


def _item(g: fx.Graph, like: fx.Node, tup: fx.Node, i: int) -> fx.Node:
    return _node(g, like, operator.getitem, (tup, i))


# hand-written attention ------------------------------------------------------------------------


@dataclass
class _Plan:
    """A hand-written attention read as read(q, K, V, mask, scale, softcap)."""

    query: fx.Node
    keys_t: fx.Node  # Kᵀ as the scores matmul reads it
    values: fx.Node
    out: fx.Node  # the weights·V matmul the read replaces
    scores: fx.Node  # the q·kᵀ matmul
    replaced: list  # from the weights·V matmul back to the softmax, in reverse order
    scale: float
    softcap: float | None
    biases: list  # (node, factor): additive score biases
    allowed: list  # (node, negate): boolean masks, True where a slot may be read

    def emit(self, g: fx.Graph) -> fx.Node:
        like = self.out

        def unview(x):  # expanded to the view's shape, then merged back into the scores' shape
            if not isinstance(x, _Viewed):
                return x
            full = _node(g, like, aten.expand.default, (x.node, _sizes(g, like, x.view)))
            merged = [-1, *_sizes(g, like, self.scores)[1:]]
            return _node(g, like, aten.reshape.default, (full, merged))

        self.allowed = [(unview(m), negate) for m, negate in self.allowed]
        self.biases = [(unview(b), f) for b, f in self.biases]
        keys, values, gqa = _shared_banks(_untranspose(g, like, self.keys_t), self.values)
        memory = _node(g, like, WRITE, (keys, values))
        mask = None
        for node, negate in self.allowed:
            m = _node(g, like, aten.logical_not.default, (node,)) if negate else node
            mask = m if mask is None else _node(g, like, aten.logical_and.default, (mask, m))
        bias = None
        for node, factor in self.biases:
            b = node if factor == 1 else _node(g, like, aten.mul.Tensor, (node, factor))
            bias = b if bias is None else _node(g, like, aten.add.Tensor, (bias, b))
        if bias is not None and mask is not None:
            mask = _node(g, like, aten.where.ScalarOther, (mask, bias, float("-inf")))
        elif bias is not None:
            mask = bias
        kwargs = {"scale": self.scale, **({"enable_gqa": True} if gqa else {})}
        if self.softcap is not None:
            kwargs["softcap"] = self.softcap
        args = (self.query, _item(g, like, memory, 0), _item(g, like, memory, 1), mask)
        read = _node(g, like, READ, args, kwargs)
        self.out.replace_all_uses_with(read)
        for n in self.replaced:  # dropout is seeded: dead-code elimination keeps it otherwise
            if not n.users:
                g.erase_node(n)
        return read


def _sizes(g: fx.Graph, like: fx.Node, x: fx.Node) -> list:
    """x's shape as view/expand arguments: ints, and sym_size nodes for symbolic sizes."""
    return [
        s if isinstance(s, int) else _node(g, like, aten.sym_size.int, (x, i))
        for i, s in enumerate(x.meta["val"].shape)
    ]


def _untranspose(g: fx.Graph, like: fx.Node, kt: fx.Node) -> fx.Node:
    """K from the Kᵀ the scores matmul reads (its transpose's input when it is one)."""
    rank = len(kt.meta["val"].shape)
    if is_call(kt, {aten.transpose.int}) and {a % rank for a in kt.args[1:3]} == {
        rank - 2,
        rank - 1,
    }:
        return kt.args[0]
    return _node(g, like, aten.transpose.int, (kt, -2, -1))


def parse_attention(graph, softmax: fx.Node, where: str) -> _Plan:
    """Read the chain q·kᵀ → … → softmax → … → ·v of a hand-written attention."""

    def refuse(why: str):
        raise PassError(f"{where}: {why}; this attention has no memory-read form")

    out, n, path = softmax, softmax, [softmax]
    while True:  # softmax → identity ops → the weights·V matmul
        users = [u for u in n.users if "_assert" not in str(u.target)]
        if len(users) != 1:
            refuse(f"the attention weights {n.name} have {len(users)} uses")
        n = users[0]
        if is_call(n, MATMUL) and n.args[0] is out:
            break
        if not is_call(n, IDENTITY | DROPOUT | VIEWS):
            refuse(f"{n.target} between softmax and the read")
        out = n
        path.append(n)
    out_mm = n
    if softmax.args[1] not in (-1, len(softmax.meta["val"].shape) - 1):
        refuse("softmax over an axis other than the last")
    chain, mm = _chain_to_scores(softmax.args[0], refuse)
    if out.meta["val"].shape != mm.meta["val"].shape:
        refuse("the weights are read in another shape than the scores were computed in")
    scale, softcap, biases, allowed, view = 1.0, None, [], [], None
    if is_call(mm, {aten.baddbmm.default}):
        beta, alpha = mm.kwargs.get("beta", 1), mm.kwargs.get("alpha", 1)
        q, kt = mm.args[1:3]
        scale = float(alpha)
        biases.append((mm.args[0], beta))
    else:
        q, kt = mm.args[:2]
    i = 0
    while i < len(chain):
        n, prev = chain[i], (mm if i == 0 else chain[i - 1])
        cap = _softcap(chain, i, prev)
        if cap is not None:
            if biases or allowed or softcap is not None:
                refuse("a bias or mask before the soft-capping")
            softcap, i = cap, i + 3
            continue
        factor = _factor(n, prev)
        if is_call(n, IDENTITY):
            pass
        elif is_call(n, VIEWS):
            if view is not None:
                refuse(f"the scores are reshaped twice ({view.name}, {n.name})")
            view = n
        elif factor is not None:
            if softcap is not None or factor <= 0:
                refuse(f"{n.name} scales the scores after soft-capping or by {factor}")
            scale *= factor
            biases = [(b, f * factor) for b, f in biases]
        elif is_call(n, {aten.add.Tensor}):
            other = n.args[1] if n.args[0] is prev else n.args[0]
            if not isinstance(other, fx.Node):
                refuse(f"{n.name} adds a constant to the scores")
            biases.append((_in_scores_space(other, view), 1))
        elif is_call(n, {aten.masked_fill.Scalar, aten.masked_fill.Tensor}):
            if _value(graph, n.args[2]) > MASKED:
                refuse(f"{n.name} fills scores with a finite value")
            allowed.append((_in_scores_space(n.args[1], view), True))
        elif is_call(n, {aten.where.self}) and prev in n.args[1:]:
            fill = n.args[2] if n.args[1] is prev else n.args[1]
            if _value(graph, fill) > MASKED:
                refuse(f"{n.name} selects a finite value into the scores")
            allowed.append((_in_scores_space(n.args[0], view), n.args[1] is not prev))
        else:
            refuse(f"{n.target} ({n.name}) on the scores")
        i += 1
    replaced = [out_mm, *path[::-1]]
    return _Plan(q, kt, out_mm.args[1], out_mm, mm, replaced, scale, softcap, biases, allowed)


def _chain_to_scores(n: fx.Node, refuse) -> tuple[list[fx.Node], fx.Node]:
    """The ops from the q·kᵀ matmul (excluded, returned second) up to the softmax's input."""
    chain = []
    for _ in range(16):
        if is_call(n, MATMUL | {aten.baddbmm.default}):
            return chain[::-1], n
        if is_call(n, VIEWS) and n.meta["val"].shape[-2:] != n.args[0].meta["val"].shape[-2:]:
            refuse(f"the scores are reshaped ({n.name}) across their last two axes")
        chain.append(n)
        on_path = [a for a in n.all_input_nodes if _scores_like(a, n)]
        if len(on_path) != 1:
            refuse(f"cannot follow the scores through {n.target} ({n.name})")
        n = on_path[0]
    refuse("more than 16 ops between q·kᵀ and softmax")


@dataclass
class _Viewed:
    """A mask or bias given in the shape of a reshaped view of the scores (`view`)."""

    node: fx.Node
    view: fx.Node


def _in_scores_space(node, view: fx.Node | None):
    return node if view is None else _Viewed(node, view)


def _scores_like(a: fx.Node, n: fx.Node) -> bool:
    """`a` is the scores operand of `n` (a full-size float input, not a mask or bias)."""
    va, vn = a.meta.get("val"), n.meta.get("val")
    return (
        isinstance(va, torch.Tensor)
        and isinstance(vn, torch.Tensor)
        and va.is_floating_point()
        and (va.shape == vn.shape or is_call(n, VIEWS))
        and not (is_call(n, {aten.add.Tensor}) and _is_bias(a))
    )


def _is_bias(a: fx.Node) -> bool:
    return not any(is_call(x, MATMUL | {aten.baddbmm.default}) for x in _upstream(a, 16))


def _upstream(n: fx.Node, depth: int) -> list[fx.Node]:
    seen, todo = [n], [n]
    for _ in range(depth):
        todo = [a for t in todo for a in t.all_input_nodes if a not in seen]
        seen += todo
    return seen


def _factor(n: fx.Node, prev: fx.Node) -> float | None:
    """The constant a mul/div applies to the scores, if it is one."""
    if is_call(n, {aten.mul.Tensor, aten.mul.Scalar}):
        other = n.args[1] if n.args[0] is prev else n.args[0]
        return float(other) if isinstance(other, (int, float)) else None
    if is_call(n, {aten.div.Tensor, aten.div.Scalar}) and n.args[0] is prev:
        other = n.args[1]
        return 1.0 / float(other) if isinstance(other, (int, float)) and other else None
    return None


def _softcap(chain: list, i: int, prev: fx.Node) -> float | None:
    """c when chain[i:i+3] is x / c → tanh → · c."""
    if i + 2 >= len(chain) or not is_call(chain[i + 1], {aten.tanh.default}):
        return None
    down, up = _factor(chain[i], prev), _factor(chain[i + 2], chain[i + 1])
    if down is None or up is None or not math.isclose(down * up, 1.0, rel_tol=1e-6):
        return None
    return up


def _value(graph, x) -> float:
    """A fill value: a number, or a one-element constant tensor of the graph."""
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, fx.Node):
        if x.op == "get_attr":
            t = graph.tensor(x.target)
            if t.numel() == 1:
                return float(t)
        if is_call(x, {aten.lift_fresh_copy.default, aten.clone.default, *IDENTITY}):
            return _value(graph, x.args[0])
        if is_call(x, {aten.full.default, aten.scalar_tensor.default}):
            return float(x.args[1] if x.target is aten.full.default else x.args[0])
    return math.inf


def _needs_values(graph) -> None:
    if graph.device.type == "meta":
        raise PassError(
            "it checks its claim by running the example inputs, which a model on "
            "the meta device (structure only, no values) cannot do; load the weights first"
        )


def check_causal(graph: Graph, reads: list, paths: list) -> None:
    """Every read's mask allows exactly the causal slots (checked on the example inputs)."""
    _needs_values(graph)
    masks = [op_arg(c, "attn_mask") for c in reads]
    probed = graph.probe([m for m in masks if isinstance(m, fx.Node)])
    values = iter(probed)
    for core, mask, path in zip(reads, masks, paths, strict=True):
        causal = op_arg(core, "is_causal")
        if mask is None:
            if causal:
                continue
            raise PassError(f"{path} reads every slot (not causal)")
        m = next(values)
        allowed = m if m.dtype == torch.bool else m == 0
        if m.dtype != torch.bool and not bool(((m == 0) | (m <= MASKED)).all()):
            raise PassError(
                f"{path} adds a position bias to the scores, which a causal memory cannot carry"
            )
        n = allowed.shape[-1]
        tril = torch.ones(n, n, dtype=torch.bool).tril()
        if causal or allowed.shape[-2] != n or not bool((allowed == tril).all()):
            raise PassError(
                f"{path}'s mask is not exactly causal "
                "(cross-attention, padding, a sliding window or bidirectional attention)"
            )
