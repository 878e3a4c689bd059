"""The growth engine every expansion pass shares: grow atomic dimensions of a graph.

A growth names atomic dimension ids (from `archfx.ir.dims`), their new sizes and how the new
features start:

- ``zero``: new features are exactly zero wherever they appear (the residual stream grown by
  zero padding). Tensors that *produce* them get zero rows; tensors that only *read* them get
  new columns drawn at the scale of the existing weights (free side, breaks symmetry).
- ``free``: new features may be anything (new MLP units, new heads): producers get new rows
  drawn at scale; every weight that contracts them away gets zero columns (the zero side).
- ``tile``: the dimension is repeated m times (duplication); producers copy, readers take
  W/m per copy plus zero-sum noise (exact, and the copies train apart).

`zero` ids mark composite axes whose new positions are zero although their atom is `free`
(the key side of a grown query/key dimension). Reductions over grown dimensions are checked:
RMS statistics over zero-padded features are compensated exactly (eps × d/d̂, gain × √(d/d̂));
LayerNorm's mean, softmax and max over them, and any normalisation over free features, are
refused with the reason. So are dimensions an op archfx does not understand touches, and
dimensions split inconsistently. Literal sizes in the graph (view sizes, split sizes, slice
bounds, norm shapes, repeat counts) follow.
"""

from __future__ import annotations

import math
import operator
import zlib
from dataclasses import dataclass, field

import torch
from torch import fx

from archfx.ir import Graph, PassError
from archfx.ir.dims import Dims
from archfx.ir.ops import (
    GROWTH_MATRIX,
    GROWTH_TRANSPARENT,
    SHAPE,
    SIZE_ARITHMETIC,
    SPLITS,
    aten,
    is_assert,
    is_call,
    is_identity,
    param_target,
)

from ..infra.base import Remark, layer_indices


@dataclass
class Growth:
    sizes: dict[int, int]  # atom -> new size
    modes: dict[int, str]  # atom -> "zero" | "free" | "tile"
    # composite ids, or (concatenation id, part index), whose new positions are zero
    zero: set = field(default_factory=set)
    scale: dict = field(default_factory=dict)  # the same keys: their entries are multiplied
    param_scale: dict[str, float] = field(default_factory=dict)  # tensors multiplied as a whole
    approximate: bool = False  # allow LayerNorm over zero-padded features (not exact)
    seed: int = 0


@dataclass
class _Axis:
    src: torch.Tensor  # for each new index: the old index it comes from, or -1
    zero: torch.Tensor  # for each new index: the new feature there is zero
    tiled: bool
    mult: torch.Tensor  # for each new index: a factor its entries are multiplied by


def grow(graph: Graph, growth: Growth) -> tuple[dict, dict]:
    """Apply `growth` to `graph` in place; returns what changed (details, tensor maps). Raises
    PassError, naming the site and the reason, before changing anything if it cannot be exact."""
    d = graph.dims
    atoms = {d.find(a): n for a, n in growth.sizes.items()}
    modes = {d.find(a): m for a, m in growth.modes.items()}
    zero = {_key(d, z) for z in growth.zero}
    scale = {_key(d, i): f for i, f in growth.scale.items()}
    _check(d, graph, atoms, modes, growth.approximate)
    new_size = _sizes(d, atoms)
    _check_scale(d, graph, new_size)
    axes: dict[int, _Axis] = {}

    def axis(i: int) -> _Axis:
        i = d.find(i)
        if i not in axes:
            axes[i] = _layout(d, i, atoms, modes, zero, scale, axis)
        return axes[i]

    rescale, eps_edits, gainless = _norm_compensation(d, atoms, modes, new_size)
    for target, f in growth.param_scale.items():
        offset, s = rescale.get(target, (False, 1.0))
        rescale[target] = (offset, s * f)
    final_scale, head_scale = _tied_tile_compensation(d, graph, atoms, modes)
    for node, index, value in eps_edits:  # every check has passed: now edit
        node.args = (*node.args[:index], value, *node.args[index + 1 :])
    by_tensor: dict[int, list[str]] = {}
    for target in d.params:
        by_tensor.setdefault(id(graph.tensor(target)), []).append(target)
    # every name of each tensor (tied weights share one list)
    names = {name: group for group in by_tensor.values() for name in group}
    attrs: dict[str, list[fx.Node]] = {}
    for node in graph.gm.graph.nodes:
        if node.op == "get_attr":
            attrs.setdefault(node.target, []).append(node)
    changed = []
    layouts: dict[str, list] = {}
    done: set[int] = set()
    for target, ids in d.params.items():
        t = graph.tensor(target)
        touched = any(_grows(d, i, atoms) or _scaled(d, i, scale) for i in ids)
        if id(t) in done or not (touched or target in growth.param_scale):
            continue
        done.add(id(t))
        aliases = names[target]
        roles = _roles(d, [n for name in aliases for n in attrs.get(name, [])])
        new = _wide(t.detach())  # surgery in fp64, rounded once to the tensor's dtype
        # draws seeded by the tensor's name, not by the order tensors are visited in (which
        # follows the graph's sets and may differ between two copies of one model)
        gen = torch.Generator().manual_seed(
            (growth.seed * 1_000_003 + zlib.crc32(min(aliases).encode())) % 2**63
        )
        layouts[target] = [axis(i).src if _grows(d, i, atoms) else None for i in ids]
        for k, i in enumerate(ids):
            if _grows(d, i, atoms) or _scaled(d, i, scale):
                new = _resize(
                    new,
                    k,
                    axis(i),
                    roles.get(k, "free-elementwise"),
                    isinstance(t, torch.nn.Parameter),
                    gen,
                    target,
                )
        if target in rescale and not new.is_meta:
            offset, s = rescale[target]
            new = (1 + new) * s - 1 if offset else new * s
        _set(graph, aliases, t, new.to(t.dtype))
        changed.append(target)
    for target, s in final_scale.items():
        t = graph.tensor(target)
        if not t.is_meta:
            _set(graph, names[target], t, (t.detach().double() * s).to(t.dtype))
    literals = _literals(d, new_size, atoms)
    details = {"tensors": changed, "literals": literals}
    if head_scale:
        details["head_scale"] = (_scale_head_input(graph, head_scale), 1 / head_scale)
    if gainless:
        details["norm_scales"] = {
            _insert_scale(graph, node, f, list(node.users), node): (node.name, f)
            for node, f in gainless
        }
    graph.gm.recompile()
    graph.invalidate()
    return details, {"layouts": layouts}


# checks ----------------------------------------------------------------------------------


def _check(d: Dims, graph: Graph, atoms: dict, modes: dict, approximate: bool) -> None:
    for node in graph.gm.graph.find_nodes(op="placeholder"):
        for i in d.axes.get(node) or []:
            if any(d.contains(i, a) and atoms[a] != d.size[a] for a in atoms):
                raise PassError(
                    f"the model's input {node.name} carries the grown dimension (it is fed "
                    "features of that width, not token ids); its callers would have to widen it"
                )
    for a, n in atoms.items():
        old = d.size[a]
        if d.parts(a) is not None:
            raise PassError(f"dimension {a} is composite; grow one of its parts")
        if not isinstance(old, int):
            raise PassError("a dynamic (batch or sequence) dimension cannot grow")
        if n < old:
            raise PassError(f"new size {n} is smaller than the current {old}")
        if modes[a] == "tile" and n % old:
            raise PassError(f"duplication needs a multiple of {old}, got {n}")
        why = d.frozen_reason(a)
        if why:
            raise PassError(f"cannot grow this dimension: {why}")
        for node, ids in d.opaque:
            if any(isinstance(d.size[d.find(i)], int) and d.contains(i, a) for i in ids):
                raise PassError(
                    f"{node.name} ({node.target}) touches the grown dimension and "
                    "archfx does not know how it behaves under growth"
                )
    sizes = {d.size[i] for i in d.parent if d.find(i) == i and any(d.contains(i, a) for a in atoms)}
    for node in graph.gm.graph.nodes:
        if node.op == "call_function" and node.target in SIZE_ARITHMETIC:
            hit = [a for a in node.args if type(a) is int and a in sizes and a > 1]
            if hit:
                raise PassError(
                    f"{node.name} computes a shape with the constant {hit[0]}, which may be "
                    "the grown dimension; archfx cannot tell"
                )
    for r in d.reductions:
        grown = [
            a for a in atoms if any(d.contains(i, a) for i in r.dims) and atoms[a] != d.size[a]
        ]
        for a in grown:
            mode = modes[a]
            ok = (
                (mode == "zero" and r.kind in ("mean_sq", "rms_norm", "sum", "norm2"))
                or (
                    mode == "tile"
                    and r.kind in ("mean", "mean_sq", "var", "layer_norm", "rms_norm")
                )
                or (approximate and mode == "zero" and r.kind in ("layer_norm", "var", "mean"))
            )
            if not ok:
                raise PassError(
                    f"{r.node.name} takes a {r.kind} over the grown dimension; {_why(r.kind, mode)}"
                )


GROWTH_LIMIT = 64  # larger single-step growth is almost surely a typo; grow in steps


def _check_scale(d: Dims, graph: Graph, new_size: dict) -> None:
    """Refuse, before allocating, a growth that multiplies the model's size by more than 64.
    Counted as `Graph.num_parameters` counts: parameters only, each tied tensor once."""
    before = after = 0
    seen = set()
    for target, ids in d.params.items():
        t = graph.tensor(target)
        if not isinstance(t, torch.nn.Parameter) or id(t) in seen:
            continue
        seen.add(id(t))
        before += math.prod(d.size[d.find(i)] for i in ids)
        after += math.prod(new_size.get(d.find(i), d.size[d.find(i)]) for i in ids)
    if after > GROWTH_LIMIT * max(before, 1):
        raise PassError(
            f"this would grow the model from {before:,} to {after:,} parameters "
            f"(×{after / max(before, 1):.0f}); archfx refuses more than ×{GROWTH_LIMIT} in one step"
        )


def _why(kind: str, mode: str) -> str:
    if mode == "zero" and kind in ("layer_norm", "var", "mean"):
        return "LayerNorm subtracts the mean, which zero features shift: grow by duplication (integer factors)"
    if mode == "tile":
        return "a sum, max or softmax over duplicated features is not preserved"
    if mode == "free":
        return "the new features would change that statistic"
    return "new zero features change it"


def _grows(d: Dims, i: int, atoms: dict) -> bool:
    return any(d.contains(i, a) and atoms[a] != d.size[a] for a in atoms)


def _key(d: Dims, k):
    return (d.find(k[0]), k[1]) if isinstance(k, tuple) else d.find(k)


def _scaled(d: Dims, i: int, scale: dict) -> bool:
    within = d.within(i)
    return any((s[0] if isinstance(s, tuple) else s) in within for s in scale)


def _sizes(d: Dims, atoms: dict) -> dict[int, int]:
    memo: dict[int, object] = {}

    def size(i: int):
        i = d.find(i)
        if i not in memo:
            p = d.parts(i)
            if i in atoms:
                memo[i] = atoms[i]
            elif p is None:
                memo[i] = d.size[i]
            elif p[0] == "prod":
                memo[i] = math.prod(size(x) for x in p[1])
            else:
                memo[i] = sum(size(x) for x in p[1])
        return memo[i]

    return {i: size(i) for i in list(d.parent) if isinstance(d.size[d.find(i)], int)}


# layouts ---------------------------------------------------------------------------------


def _layout(d: Dims, i: int, atoms, modes, zero, scale, axis) -> _Axis:
    p = d.parts(i)
    if p is None:
        old = d.size[i]
        n = atoms.get(i, old)
        mode = modes.get(i, "free")
        if mode == "tile":
            src = torch.arange(n) % old
        else:
            src = torch.cat([torch.arange(old), torch.full((n - old,), -1)])
        z = (src < 0) & torch.tensor(mode == "zero")
        out = _Axis(src, z, mode == "tile" and n != old, torch.ones(n, dtype=torch.float64))
    elif p[0] == "cat":
        subs = [axis(x) for x in p[1]]
        for j, sub in enumerate(subs):
            if (i, j) in zero or (i, j) in scale:
                sub = subs[j] = _Axis(sub.src, sub.zero.clone(), sub.tiled, sub.mult.clone())
                if (i, j) in zero:
                    sub.zero |= sub.src < 0
                sub.mult *= scale.get((i, j), 1.0)
        offs, at = [], 0
        for x in p[1]:
            offs.append(at)
            at += d.size[d.find(x)]
        src = torch.cat(
            [torch.where(s.src >= 0, s.src + o, -1) for s, o in zip(subs, offs, strict=True)]
        )
        out = _Axis(
            src,
            torch.cat([s.zero for s in subs]),
            any(s.tiled for s in subs),
            torch.cat([s.mult for s in subs]),
        )
    else:
        subs = [axis(x) for x in p[1]]
        src, z = torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.bool)
        mult = torch.ones(1, dtype=torch.float64)
        for x, s in zip(p[1], subs, strict=True):
            old = d.size[d.find(x)]
            src = torch.where(
                (src[:, None] >= 0) & (s.src[None, :] >= 0), src[:, None] * old + s.src[None, :], -1
            ).reshape(-1)
            z = (z[:, None] | s.zero[None, :]).reshape(-1)
            mult = (mult[:, None] * s.mult[None, :]).reshape(-1)
        out = _Axis(src, z, any(s.tiled for s in subs), mult)
    if i in zero:
        out.zero = out.zero | (out.src < 0)
    if i in scale:
        out.mult = out.mult * scale[i]
    return out


# roles -----------------------------------------------------------------------------------


def _roles(d: Dims, nodes: list[fx.Node]) -> dict[int, str]:
    """How each axis (by position) of a parameter read by the get_attr `nodes` is used:
    'producer' (its values become new features), 'consumer' (contracted away), 'gain', 'bias'
    or 'offset' (gain used as 1 + w). An axis is a producer when the use's output carries its
    dimension; a square matrix whose two axes are one dimension (a d × d transform) is read by
    position instead: rows produce, columns are contracted."""
    roles: dict[int, str] = {}
    for node in nodes:
        ids = d.axes[node]
        for use, arg, flipped in _uses(node):
            out = {d.find(i) for i in d.axes.get(use, [])}
            square = len(ids) == 2 and d.find(ids[0]) == d.find(ids[1])
            for k, i in enumerate(ids):
                if square and use.target in GROWTH_MATRIX and not _is_bias(use, arg):
                    produces = k == _produced_axis(use, arg) ^ flipped
                    role = "producer" if produces else "consumer"
                else:
                    role = _role(use, arg, d.find(i) in out)
                roles[k] = _merge(roles[k], role) if roles.get(k) not in (None, role) else role
    return roles


def _produced_axis(use: fx.Node, arg: fx.Node) -> int:
    """Which axis of a 2-d weight `arg` a matrix op writes out: nn.Linear's (out, in) row,
    or the column of x @ W (addmm, mm, matmul with W second)."""
    return 0 if use.target in (aten.linear.default, aten.embedding.default) else 1


def _uses(node: fx.Node):
    """(use, the argument it reads, whether the path there transposed a 2-d value)."""
    stack = [(u, node, False) for u in node.users]
    while stack:
        use, arg, flipped = stack.pop()
        if use.op == "call_function" and use.target in SPLITS and use.args[0] is arg:
            # a fused weight split into parts (nn.MultiheadAttention's q and kv): each part
            # is read by its own use
            stack.extend(
                (part, item, flipped)
                for item in use.users
                if item.target is operator.getitem
                for part in item.users
            )
        elif use.op == "call_function" and use.target in GROWTH_TRANSPARENT and use.args[0] is arg:
            flip = use.target in (aten.t.default, aten.numpy_T.default, aten.transpose.int) or (
                use.target is aten.permute.default and list(use.args[1]) == [1, 0]
            )
            stack.extend((u, use, flipped ^ flip) for u in use.users)
        else:
            yield use, arg, flipped


def _role(use: fx.Node, arg: fx.Node, in_output: bool) -> str:
    t = use.target
    if t in GROWTH_MATRIX:
        if t in (aten.linear.default, aten.addmm.default) and _is_bias(use, arg):
            return "bias"
        return "producer" if in_output else "consumer"
    if t in (aten.layer_norm.default, aten.rms_norm.default):
        return "gain" if use.args.index(arg) == 2 else "bias"
    if t in (aten.add.Tensor, aten.sub.Tensor):
        other = use.args[1] if use.args[0] is arg else use.args[0]
        if isinstance(other, fx.Node):
            return "bias"
        # w + 1 is a (1 + w) gain; w + 0 a plain one (an offset switched off)
        return (
            "gain" if other == 0 else "offset" if other == 1 and t is aten.add.Tensor else "other"
        )
    if t in (aten.mul.Tensor, aten.div.Tensor):
        return "gain"
    return "other"


def _is_bias(use: fx.Node, arg: fx.Node) -> bool:
    if use.target is aten.linear.default:
        return len(use.args) > 2 and use.args[2] is arg
    return use.args[0] is arg


def _merge(a: str, b: str) -> str:
    pair = {a, b}
    if pair == {"producer", "consumer"}:
        return "tied"
    return a


def _resize(t, k, ax: _Axis, role, trainable, gen, target):
    """`t` with axis k laid out as `ax`: old entries moved, new ones filled by `role`. Only
    the new slice is drawn or filled (no full-size temporaries: growth runs at checkpoint scale)."""
    src = ax.src
    old = t.shape[k]
    if t.is_meta:  # structure only: shapes, no values
        shape = list(t.shape)
        shape[k] = src.numel()
        return torch.empty(shape, dtype=t.dtype, device="meta")
    fresh = torch.nonzero(src < 0).flatten()
    kept = src.clamp(min=0)
    spread = _scale(t)
    new = t.index_select(k, kept)
    shape = [1] * t.dim()
    shape[k] = -1
    if fresh.numel():
        if not trainable and t.is_floating_point():
            return _extend_table(t, k, new, src < 0, target)
        size = list(new.shape)
        size[k] = fresh.numel()
        zero_feat = ax.zero[fresh].reshape(shape)
        noise = torch.randn(size, generator=gen, dtype=torch.float32).to(new.dtype) * spread
        if role in ("producer", "tied"):
            fill = noise.masked_fill_(zero_feat, 0)
        elif role == "consumer":
            fill = noise.masked_fill_(~zero_feat, 0)
        elif role == "gain":
            fill = torch.ones(size, dtype=new.dtype)
        else:  # bias, offset, other element-wise tensors: neutral
            fill = torch.zeros(size, dtype=new.dtype)
        new.index_copy_(k, fresh, fill)
    if ax.tiled and role == "consumer":
        count = torch.bincount(kept, minlength=old).to(new.dtype)
        per = count[kept].reshape(shape)
        eps = torch.randn(new.shape, generator=gen, dtype=torch.float32).to(new.dtype) * spread
        eps = eps / per
        mean = torch.zeros(t.shape, dtype=new.dtype).index_add_(k, kept, eps) / count.reshape(shape)
        eps = eps - mean.index_select(k, kept)
        new = torch.where(per > 1, new / per + eps, new)
    if not bool((ax.mult == 1).all()):
        new.mul_(ax.mult.to(new.dtype).reshape(shape))
    return new


def _extend_table(t, k, new, fresh, target):
    """A constant table (RoPE inverse frequencies): continue its geometric sequence."""
    if t.dim() != 1 or t.numel() < 2:
        raise PassError(f"cannot extend the constant tensor {target} of shape {list(t.shape)}")
    x = t.double()
    ratio = (x[-1] / x[0]) ** (1 / (t.numel() - 1))  # from the ends: robust to rounding
    fit = x[0] * ratio ** torch.arange(t.numel(), dtype=torch.float64)
    # a table stored in bf16/fp16 (a model cast with .to(), or such a table upcast again) is
    # the sequence rounded to the narrowest dtype that holds its values exactly
    held = next(f for f in _FLOATS if torch.equal(x.to(f).double(), x))
    if not torch.allclose(x, fit, rtol=max(1e-4, 4 * torch.finfo(held).eps), atol=0):
        raise PassError(
            f"{target} is not a geometric sequence (scaled RoPE?); archfx cannot choose "
            "frequencies for the new pairs"
        )
    n_new = int(fresh.sum())
    tail = x[-1] * ratio ** torch.arange(1, n_new + 1, dtype=torch.float64)
    new = new.clone()
    new[fresh] = tail.to(new.dtype)
    return new


_FLOATS = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """`t` in fp64, growth's arithmetic precision: every new or rescaled entry is its exact
    value rounded once to the model's dtype (fp32 arithmetic would add several fp32 roundings
    where duplication subtracts a mean). One tensor at a time, so the fp64 temporary is the
    size of the largest tensor, not of the model."""
    return t.double() if t.is_floating_point() else t


def _scale(t: torch.Tensor) -> float:
    if not t.is_floating_point() or t.numel() < 2:
        return 0.02
    s = float(t.float().std())
    return s if s > 0 and math.isfinite(s) else 0.02


def _set(graph: Graph, aliases: list[str], old: torch.Tensor, new: torch.Tensor) -> None:
    """Replace a tensor under every name it has (tied weights stay tied)."""
    value = (
        torch.nn.Parameter(new.contiguous(), old.requires_grad)
        if isinstance(old, torch.nn.Parameter)
        else new.contiguous()
    )
    for name in aliases:
        graph.set_tensor(name, value)


# compensations -----------------------------------------------------------------------------


def _norm_compensation(d: Dims, atoms, modes, new_size):
    """RMS norms over zero-padded features: eps × d/d̂ in the graph, gains × √(d/d̂). Returns
    the gains to rescale, the eps edits (node, argument index, value), and the gainless
    `rms_norm` ops whose output is to be scaled by √(d/d̂) instead (AltUp's router norm),
    applied by the caller once every check has passed."""
    out: dict[str, tuple[bool, float]] = {}
    edits: list[tuple[fx.Node, int, float]] = []
    gainless: list[tuple[fx.Node, float]] = []
    for r in d.reductions:
        if r.kind not in ("mean_sq", "rms_norm"):
            continue
        old = math.prod(d.size[d.find(i)] for i in r.dims)
        new = math.prod(new_size[d.find(i)] for i in r.dims)
        if old == new or not any(modes.get(a) == "zero" for i in r.dims for a in d.atoms(i)):
            continue
        ratio = old / new
        if r.kind == "rms_norm":
            if len(r.node.args) > 3 and r.node.args[3] is not None:
                edits.append((r.node, 3, r.node.args[3] * ratio))
            gain = r.node.args[2] if len(r.node.args) > 2 else None
            if gain is None:
                gainless.append((r.node, math.sqrt(ratio)))
                continue
            found = (param_target(gain), False)
        else:
            eps = next(
                (
                    u
                    for u in r.node.users
                    if u.target is aten.add.Tensor and not isinstance(u.args[1], fx.Node)
                ),
                None,
            )
            if eps is not None:
                edits.append((eps, 1, eps.args[1] * ratio))
            found = _gain_after(r.node, d, r.dims)
        if found is None or found[0] is None:
            raise PassError(
                f"{r.node.name} normalises over the grown features with no gain to rescale"
            )
        out[found[0]] = (found[1], math.sqrt(ratio))
    return out, edits, gainless


def _insert_scale(graph: Graph, node: fx.Node, factor: float, readers, owner: fx.Node) -> str:
    """Insert `node` × factor, read by `readers` instead of `node` (a node of `owner`'s module);
    returns its name."""
    with graph.gm.graph.inserting_after(node):
        scaled = graph.gm.graph.call_function(aten.mul.Tensor, (node, factor))
    if "nn_module_stack" in owner.meta:
        scaled.meta["nn_module_stack"] = dict(owner.meta["nn_module_stack"])
    for u in readers:
        u.replace_input_with(node, scaled)
    return scaled.name


def _gain_after(mean: fx.Node, d: Dims, dims: list[int]):
    """The gain parameter a decomposed RMSNorm applies after its rsqrt (and whether as 1 + w)."""
    frontier, seen = [mean], set()
    for _ in range(8):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u in seen:
                    continue
                seen.add(u)
                if u.target in GROWTH_MATRIX:
                    continue
                if u.target is aten.mul.Tensor:
                    for a in u.args:
                        t = param_target(a)
                        if t is not None and any(
                            d.find(i) in {d.find(x) for x in dims} for i in d.params[t]
                        ):
                            return t, False
                        if isinstance(a, fx.Node) and a.target is aten.add.Tensor:
                            t = next((param_target(x) for x in a.args if param_target(x)), None)
                            if t is not None:
                                return t, True
                nxt.append(u)
        frontier = nxt
    return None


def _tied_tile_compensation(d: Dims, graph: Graph, atoms, modes) -> tuple[dict[str, float], int]:
    """Duplicated features read by a tied embedding give logits × m: the final norm's gain and
    bias are divided by m, or, where no plain norm gain comes right before the head (a post-LN
    stream under AltUp, a (1 + w) gain, a norm output read elsewhere too), the head's input is
    scaled by 1/m (the second value: m when that scale is needed, else 0)."""
    tiled = [a for a, m in modes.items() if m == "tile" and atoms[a] != d.size[a]]
    head = graph.structure.head
    if not tiled or head is None or not head.tied:
        return {}, 0
    m = atoms[tiled[0]] // d.size[tiled[0]]
    norm = head.norm  # the final norm, a transform's norm (BERT's MLM head), a post-LN's last
    if (
        norm is None
        or norm.weight is None
        or norm.unit_offset
        or _read_besides(norm.output, head.linear.node) is not None
    ):
        return {}, m
    out = {norm.weight: 1 / m}
    if norm.bias:
        out[norm.bias] = 1 / m
    return out, 0


def _scale_head_input(graph: Graph, m: int) -> str:
    """Insert x / m between the tied head and the value it reads; returns the new node's name."""
    linear = graph.structure.head.linear
    x = linear.input
    readers = [u for u in x.users if u is linear.node or u in linear.node.all_input_nodes]
    return _insert_scale(graph, x, 1 / m, readers, linear.node)


def _read_besides(start: fx.Node, head: fx.Node) -> str | None:
    """The first thing other than `head` that reads `start`'s value (a model output, another
    op): None when only the head does."""
    seen, todo = set(), [start]
    while todo:
        n = todo.pop()
        for u in n.users:
            if u is head or u in seen or is_assert(u):
                continue
            if u.op == "output":
                return "a model output"
            if not (is_identity(u) or is_call(u, SHAPE)):
                return u.name
            seen.add(u)
            todo.append(u)
    return None


def _literals(d: Dims, new_size: dict, atoms: dict) -> int:
    changed = 0
    for lit in d.literals:
        if lit.split_parts:
            sizes = [new_size[d.find(p)] for p in lit.split_parts]
            if sizes != [d.size[d.find(p)] for p in lit.split_parts]:
                lit.node.target = aten.split_with_sizes.default
                _put(lit.node, lit.path, sizes)
                changed += 1
            continue
        if lit.offset_of:
            # a slice bound: the boundary between two parts of the axis. It is found by its
            # old value among the axis's current parts (another slice of the same axis may
            # have cut them finer since this one was read: Phi-3's q | k | v slices)
            cat, _ = lit.offset_of
            parts = d.parts(cat)
            old_value = _get(lit.node, lit.path)
            if parts is None or old_value is None or not isinstance(old_value, int):
                continue
            sizes_old = [d.size[p] for p in parts[1]]
            sizes_new = [new_size[p] for p in parts[1]]
            bounds = [sum(sizes_old[:k]) for k in range(len(sizes_old) + 1)]
            pos = old_value + bounds[-1] if old_value < 0 else old_value
            if pos > bounds[-1] or pos not in bounds:
                continue  # to the end (a sentinel past it), or inside one part: unchanged
            value = sum(sizes_new[: bounds.index(pos)])
            if value != old_value:
                _put(lit.node, lit.path, value)
                changed += 1
            continue
        i = d.find(lit.dim)
        if i in new_size and new_size[i] != d.size[i] and _get(lit.node, lit.path) == d.size[i]:
            _put(lit.node, lit.path, new_size[i])
            changed += 1
    return changed


def _get(node: fx.Node, path: tuple):
    v = node.args
    for p in path:
        if not isinstance(v, (list, tuple)) or p >= len(v):
            return None
        v = v[p]
    return v


def _put(node: fx.Node, path: tuple, value) -> None:
    args = list(node.args)
    if len(path) == 1:
        args[path[0]] = value
    else:
        inner = list(args[path[0]])
        inner[path[1]] = value
        args[path[0]] = (
            type(node.args[path[0]])(inner) if isinstance(node.args[path[0]], tuple) else inner
        )
    node.args = tuple(args)


# targets ---------------------------------------------------------------------------------

LAYERS_DOC = "blocks to grow: all, or indices and ranges such as 0-3,7 (in model order)"
SEED_DOC = "seed of the new parameters, drawn at the scale of the existing weights"


def no_shrinking(p, before: list) -> None:
    """`p` (a pass with `size` and `layers`) after the same pass growing some of its layers to a
    larger size would shrink them: refused (the sizes of one pipeline are the final ones)."""
    mine = layer_indices(p.opts["layers"])
    for q in before:
        if q.name == p.name and q.opts["size"] > p.opts["size"]:
            theirs = layer_indices(q.opts["layers"])
            if mine is None or theirs is None or set(mine) & set(theirs):
                raise PassError(
                    f"size {p.opts['size']} is smaller than the {q.opts['size']} that {q} "
                    "grows the same layers to"
                )


def select_blocks(graph: Graph, text: str) -> list:
    """The blocks named by a `layers` option ("all", "0-3,7"; parsed by `layer_indices`)."""
    blocks = graph.structure.blocks
    if not blocks:
        raise PassError("no Transformer blocks found; `archfx inspect` shows the structure")
    chosen = layer_indices(text)
    if chosen is None:
        return list(blocks)
    if chosen[-1] >= len(blocks):
        raise PassError(
            f"layers {text!r} names blocks outside 0-{len(blocks) - 1} (this model has {len(blocks)})"
        )
    return [blocks[i] for i in chosen]


def shared_remarks(blocks: list) -> list[Remark]:
    """Blocks that call another block's module again (weights shared across depth): their
    tensors are that block's, grown once with it."""
    return [
        Remark(b.path, f"calls the module of {b.shares} again: grown with it (shared weights)")
        for b in blocks
        if b.shares
    ]


def weight_axis(d: Dims, linear, side: str) -> int:
    """The dimension id of a linear map's input ("in") or output ("out") axis."""
    k = {"out_in": {"out": 0, "in": 1}, "in_out": {"out": 1, "in": 0}}[linear.layout][side]
    return d.find(d.params[linear.weight][k])


def check_coupling(d: Dims, graph: Graph, chosen: list, atoms_of) -> None:
    """Refuse when a dimension of a chosen block is shared with a block left out."""
    chosen_atoms = {a for b in chosen for a in atoms_of(b)}
    for b in graph.structure.blocks:
        if b in chosen:
            continue
        shared = chosen_atoms & set(atoms_of(b))
        if shared:
            raise PassError(
                f"block {b.path} shares the grown dimension with the selected blocks "
                "(tied weights or a shared table); select it too"
            )
