"""The consistency gate: a Structure is checked against the whole graph before anyone uses it.

Recognised, or refused — never guessed. What the analysis found must account for the graph:

* every `x + f(x)` with a projection or attention in f (a residual site) lies in a block;
* every attention kernel (SDPA, or a softmax over a product of two activations) inside a
  block is a recognised site's attention; kernels outside every block (attention pooling, a
  head) are declared, not rewritten;
* the model's outputs depend on the last block of every stack;
* the blocks of one stack hold the same sites and geometry, or the difference is named.

A violation of the first three makes the structure *partial*: `Structure.unrecognised` names
each construct, `inspect` shows it, and passes refuse (`Graph.structure` raises) rather than
rewrite part of a model and call it done. Differences between blocks are remarks.
"""

from __future__ import annotations

from torch import fx

from .structure import Structure


def check(
    structure: Structure,
    sites: list[tuple[fx.Node, fx.Node, set]],
    kernels: list[fx.Node],
    outputs: list[fx.Node],
    skipped: list[str],
) -> None:
    """Fill `structure.unrecognised` and add remarks (`sites`: the graph's candidate residual
    sites as (add, stream, branch); `kernels`: its attention kernels; `skipped`: blocks the
    analysis found and could not read)."""
    unrecognised = structure.unrecognised
    unrecognised.extend(skipped)
    blocks = structure.blocks
    block_of = {n: b for b in blocks for n in b.nodes}
    adds = {r.add for b in blocks for r in b.residuals}
    reach = _ancestors(outputs)  # what the outputs read (dead code, e.g. a rewrite's leftover
    # read only by asserts, is not the model's)
    for add, _, _ in sites:
        if add not in reach:
            continue
        if add not in adds and add not in block_of and "archfx_scheme" not in add.meta:
            unrecognised.append(
                f"residual add {add.name} ({_where(add)}) lies outside every recognised block"
            )
    cores = {r.attention.core for b in blocks for r in b.residuals if r.attention is not None}
    for k in kernels:
        if k in cores or k not in reach:
            continue
        block = block_of.get(k)
        if block is not None:
            unrecognised.append(
                f"{block.path}: attention kernel {k.name} ({_kernel(k)}) belongs to no "
                "recognised residual site"
            )
        else:
            structure.remarks.append(
                f"attention kernel {k.name} ({_where(k)}) runs outside the blocks "
                "(pooling or a head): passes leave it as it is"
            )
    for stack in structure.stacks:
        if stack.blocks[-1].output not in reach:
            unrecognised.append(
                f"no model output depends on the last block of {stack.path or 'the model'} "
                f"({stack.blocks[-1].path})"
            )
    for stack in structure.stacks:
        _compare(stack, structure.remarks)


def _compare(stack, remarks: list[str]) -> None:
    first = stack.blocks[0]
    ref = _signature(first)
    for b in stack.blocks[1:]:
        sig = _signature(b)
        if sig != ref:
            diff = "; ".join(
                f"{k}: {ref.get(k)} in {first.path}, {sig.get(k)} here"
                for k in sorted(set(ref) | set(sig))
                if ref.get(k) != sig.get(k)
            )
            remarks.append(f"{b.path} differs from {first.path}: {diff}")


def _signature(block) -> dict:
    sig = {"sites": " → ".join(r.kind for r in block.residuals)}
    a = block.attention
    if a is not None:
        sig["attention"] = f"{a.heads}/{a.kv_heads}×{a.head_dim}"
    m = block.mlp
    if m is not None:
        sig["mlp"] = f"{m.hidden}{' gated' if m.gated else ''} {m.activation}"
    sig["width"] = block.input.meta["val"].shape[-1]
    return sig


def _ancestors(nodes: list[fx.Node]) -> set:
    seen, todo = set(nodes), list(nodes)
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return seen


def _where(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    path = list(stack.values())[-1][0] if stack else ""
    return f"in {path}" if path else "in the model's own forward"


def _kernel(node: fx.Node) -> str:
    return "SDPA" if "scaled_dot_product" in str(node.target) else "softmax over q·kᵀ"
