"""The decode form of a causal language model: a key/value cache in, the grown cache out.

An attention site's keys and values are its memory (sDNC's view, docs/passes.md: the KV
cache *is* the write-once memory), so the decode form is one rewrite of the memory ops
`sdnc` introduces, for any graph — the original model's or one any pipeline rewrote:

    inputs   input_ids [B, q]; attention_mask [B, P + q] (1: a token, 0: padding);
             position_ids [B, q]; past_key_values.{i}.key / .value [B, kv_heads, P, d]
    outputs  the graph's outputs (logits [B, q, V]); present.{i}.key / .value
             [B, kv_heads, P + q, d]

Rewrite: every attention becomes a memory read (sdnc's exact rewrite: SDPA and hand-written
attention alike); each site's new keys and values are appended to the past ones before the
write (GQA models cache one bank per key head, keys as the model computes them: RoPE and
QK-norm included); token positions are `position_ids` wherever the graph computed them as an
arange over its tokens; every read's mask is `j ≤ P + i and attention_mask[b, j]` (each query
reads every earlier slot that is not padding and the causal part of its own segment), plus
its own slot, so that a padding row stays finite. One set of weights serves prefill (P = 0)
and decode (q = 1); with P = 0 and no padding the decode form computes what the graph did.

Refused, naming the site or the construct: attention that is not exactly causal on the
example (cross-attention, bidirectional encoders, position biases added to the scores),
sdnc's delta-rule memory (a d_k × d_v state, not a cache), models that take more than token
ids. The claim is checked on the example tokens before the form is returned: a prefill and
three one-token steps, and a left-padded row, give the whole sequence's outputs
(≤ 1e-4 × max |output|); a graph that derives positions some other way, or an attention the
rewrite did not reach, fails there with the difference named.
"""

from __future__ import annotations

import contextlib
import copy
import operator
from collections.abc import Callable

import torch
from torch import fx
from torch._dynamo.source import ConstantSource
from torch.fx.experimental.symbolic_shapes import DimDynamic
from torch.utils._sympy.value_ranges import ValueRanges

from archfx.ir import AnalysisError, Graph, Inputs, PassError
from archfx.ir.errors import first_line
from archfx.ir.memory import DELTA, READ, WRITE
from archfx.ir.ops import ARANGES, IDENTITY, PUBLIC, SOFTMAX, aten, is_call, is_pointwise, op_arg
from archfx.ir.verify import refresh_shapes, shape_signature

from .attention_memory import _needs_values, _node, check_causal, from_sdpa, parse_attention

PAST = "past_key_values"
PRESENT = "present"
EXAMPLE_PAST = 2  # the example's cached slots: the export keeps the length dynamic
TOLERANCE = 1e-4
WHY = (
    "the model derives positions from something other than an arange over its tokens, "
    "or attends in a way archfx did not turn into a cache"
)


def is_decoder(graph: Graph) -> bool:
    """Whether `graph` is in decode form (takes and returns its key/value cache)."""
    return f"{PAST}.0.key" in graph.inputs.names


def decode_form(graph: Graph) -> Graph:
    """The decode form of `graph` (a new graph on the same parameters; `graph` is untouched and
    a graph already in decode form is returned as is). Raises PassError naming what makes the model undecodable."""
    if is_decoder(graph):
        return graph
    out = _sharing(graph, copy.deepcopy(graph.gm.graph), graph.inputs, graph.output_names)
    persist(out, memory_reads(out))
    return out


def _sharing(graph: Graph, g: fx.Graph, inputs: Inputs, output_names: list[str]) -> Graph:
    """A Graph running `g` on `graph`'s parameters (shared, not copied: the decode form and
    the first call change no weight)."""
    return Graph(
        fx.GraphModule(graph.gm, g),
        inputs,
        list(output_names),
        dict(graph.provenance),
        dict(graph.range_constraints),
    )


def memory_reads(graph: Graph) -> list[fx.Node]:
    """Every attention of `graph` as a memory read (sdnc's exact rewrite, in place): SDPA calls
    found in the graph itself, hand-written attentions where the structure names them."""
    g = graph.gm.graph
    before = shape_signature(graph)
    if any(n.target is DELTA for n in g.nodes):
        raise PassError(
            "sdnc(write=delta) keeps a d_k × d_v state per key head, not a key/value cache: "
            "its decode form is not built"
        )
    st = None  # hand-written attentions are found by the structure (SDPA calls below)
    if any(is_call(n, SOFTMAX) for n in g.nodes):
        # a residual scheme's rewrite may not be analysable: an attention left out fails the check
        with contextlib.suppress(AnalysisError):
            st = graph.structure
    plans = []
    if st is not None:
        for block in st.blocks:
            for r in block.residuals:
                if r.attention is not None and is_call(r.attention.core, SOFTMAX):
                    plans.append(parse_attention(graph, r.attention.core, block.path))
    for plan in plans:
        with g.inserting_before(plan.out):
            plan.emit(g)
    for core in [n for n in g.nodes if n.target is aten.scaled_dot_product_attention.default]:
        with g.inserting_before(core):
            from_sdpa(g, core)
    g.eliminate_dead_code()
    graph.gm.recompile()
    graph.invalidate()
    refresh_shapes(graph, before)
    reads = [n for n in g.nodes if n.target is READ]
    if not reads:
        raise PassError("no attention found: there is no key/value cache to keep")
    return reads


def persist(graph: Graph, reads: list[fx.Node]) -> None:
    """Rewrite `graph` (whose attentions are the memory `reads`) into its decode form, in place,
    and check the claim on the example tokens."""
    _needs_values(graph)
    phs = graph.placeholders
    val = phs[0].meta["val"] if len(phs) == 1 else None
    if val is None or val.dim() != 2 or val.is_floating_point():
        raise PassError(
            "a decode form needs a model that takes one (batch, tokens) input of token ids; "
            f"this one takes {', '.join(graph.inputs.names)}"
        )
    where = [_where(r) for r in reads]
    for read, path in zip(reads, where, strict=True):
        if (
            not is_call(read.args[1], {operator.getitem})
            or read.args[1].args[0].target is not WRITE
        ):
            raise PassError(f"{path}: its memory is not written by this graph's tokens")
    check_causal(graph, reads, where)
    tokens = graph.inputs.tensors[0]
    with torch.no_grad():
        whole = graph(tokens)
        row = tokens[:1, : max(1, tokens.shape[1] - 2)]
        alone = graph(row)
    for name, ref in zip(graph.output_names, whole, strict=True):
        if ref.dim() < 2 or ref.shape[:2] != tokens.shape:
            raise PassError(f"output {name} is not one value per token: nothing to decode")

    g = graph.gm.graph
    before = shape_signature(graph)
    ids = phs[0]
    mode = val.fake_mode
    batch, seq = val.shape
    past_len = _new_length(graph, mode)
    with g.inserting_after(ids):
        mask_in = g.placeholder("attention_mask")
    with g.inserting_after(mask_in):
        pos_in = g.placeholder("position_ids")
    with mode:
        mask_in.meta["val"] = torch.empty(batch, past_len + seq, dtype=torch.int64)
        pos_in.meta["val"] = torch.empty(batch, seq, dtype=torch.int64)
    last, pasts, presents, names = pos_in, [], [], []
    for i, read in enumerate(reads):
        memory = read.args[1].args[0]
        fresh = []
        for j, part in enumerate(("key", "value")):
            new = memory.args[j]
            v = new.meta["val"]
            with g.inserting_after(last):
                last = g.placeholder(f"{PAST}_{i}_{part}")
            with mode:
                last.meta["val"] = torch.empty(
                    batch, *v.shape[1:-2], past_len, v.shape[-1], dtype=v.dtype
                )
            pasts.append(last)
            names.append(f"{PAST}.{i}.{part}")
            with g.inserting_before(memory):
                fresh.append(_node(g, memory, aten.cat.default, ([last, new], -2)))
        memory.args = tuple(fresh)
        presents += [read.args[1], read.args[2]]
    with g.inserting_before(reads[0]):
        allowed = _allowed(g, reads[0], pasts[0], ids, mask_in)
    for read in reads:
        read.args = (*read.args[:3], allowed, op_arg(read, "dropout_p"), False)
        read.kwargs = {
            k: v for k, v in read.kwargs.items() if k not in ("attn_mask", "dropout_p", "is_causal")
        }
    _drop_dead_asserts(g)
    _positions(g, str(seq), pos_in)
    out = next(n for n in g.nodes if n.op == "output")
    out.args = ((*out.args[0], *presents),)
    g.eliminate_dead_code()
    graph.gm.recompile()
    graph.output_names = [
        *graph.output_names,
        *(n.replace(PAST, PRESENT, 1) for n in names),
    ]
    try:
        graph.inputs = _example(graph, tokens, names)
        graph.invalidate()
        refresh_shapes(graph, before)
        _check(graph, tokens, whole, row, alone)
    except PassError:
        raise
    except Exception as exc:  # the form does not even run: a refusal, with what broke
        raise PassError(
            f"decode form: it does not run on the example tokens ({first_line(exc)}): {WHY}"
        ) from exc


def last_position(decoder: Graph) -> Graph:
    """`decoder` computing its token outputs at the last position only — all generation reads,
    so a prefill of n tokens projects one row onto the vocabulary, not n (transformers'
    `logits_to_keep=1`). Each token output's head, the projection by a weight it ends in
    (through casts and elementwise ops such as soft-capping), reads the last token's hidden
    state instead of every token's. A new graph on the same parameters, checked on the
    example against the decode form's last position; raises PassError naming an output that
    does not end in such a head."""
    if not is_decoder(decoder):
        raise PassError("last_position needs a graph in decode form")
    g = copy.deepcopy(decoder.gm.graph)
    count = sum(n.startswith(f"{PRESENT}.") for n in decoder.output_names)
    out = next(n for n in g.nodes if n.op == "output")
    ids = next(n for n in g.nodes if n.op == "placeholder")
    seq = str(ids.meta["val"].shape[1])
    heads = {}
    for name, x in zip(decoder.output_names, out.args[0][:-count], strict=False):
        head = _head(x, seq)
        if head is None:
            raise PassError(
                f"last_position: output {name} does not end in a projection of each token's "
                "hidden state by a weight"
            )
        heads[head] = head.args[0]
    for head, h in heads.items():
        with g.inserting_before(head):
            last = _node(g, h, aten.slice.Tensor, (h, 1, -1, 2**63 - 1))
        head.args = (last, *head.args[1:])
    result = _sharing(decoder, g, decoder.inputs, decoder.output_names)
    refresh_shapes(result)
    with torch.no_grad():
        whole = decoder(*decoder.inputs.tensors)
        got = result(*result.inputs.tensors)
    for name, ref, value in zip(decoder.output_names[:-count], whole, got, strict=False):
        _compare(name, value, ref[:, -1:], "at the last position alone")
    return result


ONE_TOKEN: list[Callable[[fx.Node], tuple[Callable, tuple] | None]] = []
"""Recognisers of one-token kernels, registered by the passes whose ops they read: given a node
of a decode form, `(kernel, args)` — a Python function computing the node's value from the
args' values for one token of one sequence (shapes [1, 1, …]) — or None when the node is not
exactly what the pass emitted. At batch 1 a step's element-wise ops on a few hundred numbers
cost their dispatch, not their arithmetic: a residual site's dozen ATen calls become a few dot
products and Python float arithmetic."""


def eager(decoder: Graph, *, one_token: bool = False) -> Graph:
    """`decoder` as eager PyTorch runs it fastest, a new graph on the same parameters: each
    memory write becomes the keys and values it holds and each read without soft-capping the
    SDPA call it runs — the same ops, without a custom op's dispatch per call — and ops with a
    public torch function call that function (`archfx.ir.ops.PUBLIC`: the same kernel
    without the OpOverload's Python dispatch). `one_token`: also every node a recogniser of
    `ONE_TOKEN` recognises calls its kernel (marked `archfx_one_token` in its meta), and what
    only it read is dropped; the graph then runs one token of one sequence only."""
    g = copy.deepcopy(decoder.gm.graph)
    if one_token:
        for n in list(g.nodes):
            found = next((k for k in (r(n) for r in ONE_TOKEN) if k is not None), None)
            if found is not None:
                with g.inserting_before(n):
                    kernel = g.call_function(*found)
                kernel.meta = {**n.meta, "archfx_one_token": True}
                n.replace_all_uses_with(kernel)
                g.erase_node(n)
        g.eliminate_dead_code()
    for n in list(g.nodes):
        if (
            n.target is READ
            and n.kwargs.get("softcap") is None
            and n.args[0].meta["val"].dim() == 4
        ):
            kwargs = {k: v for k, v in n.kwargs.items() if k != "softcap"}
            with g.inserting_before(n):
                sdpa = g.call_function(aten.scaled_dot_product_attention.default, n.args, kwargs)
            sdpa.meta = dict(n.meta)
            n.replace_all_uses_with(sdpa)
            g.erase_node(n)
    for n in [n for n in g.nodes if n.target is WRITE]:
        for u in list(n.users):  # getitem(write, i): the i-th bank
            u.replace_all_uses_with(n.args[u.args[1]])
            g.erase_node(u)
        g.erase_node(n)
    for n in g.nodes:
        if n.op == "call_function" and n.target in PUBLIC:
            n.target = PUBLIC[n.target]
    return _sharing(decoder, g, decoder.inputs, decoder.output_names)


def _head(x: fx.Node, seq: str) -> fx.Node | None:
    """The projection `x` ends in: a linear map by a weight of a [batch, tokens, features]
    value, reached from `x` through casts and elementwise ops of that one value."""
    while x.op == "call_function":
        if is_call(x, {aten.linear.default, aten.matmul.default}) and _weight(x.args[1]):
            h = x.args[0].meta.get("val")
            ok = h is not None and h.dim() == 3 and str(h.shape[1]) == seq
            return x if ok else None
        values = [a for a in x.args if isinstance(a, fx.Node) and not _weight(a)]
        if len(values) != 1 or not (is_call(x, IDENTITY) or is_pointwise(x)):
            return None
        x = values[0]
    return None


def _weight(x) -> bool:
    """`x` is a parameter (or a transposed or cast view of one)."""
    while isinstance(x, fx.Node) and is_call(x, {aten.t.default, aten.permute.default, *IDENTITY}):
        x = x.args[0]
    return isinstance(x, fx.Node) and x.op == "get_attr"


def _new_length(graph: Graph, mode) -> torch.SymInt:
    """A new symbolic size for the cached length (its range recorded with the graph's)."""
    env = mode.shape_env
    sym = env.create_symbol(
        EXAMPLE_PAST, ConstantSource(f"{PAST}_length"), dynamic_dim=DimDynamic.DYNAMIC
    )
    graph.range_constraints[sym] = ValueRanges(0, int(2**62))
    return env.create_symintnode(sym, hint=EXAMPLE_PAST)


def _example(graph: Graph, tokens: torch.Tensor, names: list[str]) -> Inputs:
    """Example inputs of the decode form: the example tokens after EXAMPLE_PAST cached slots
    (written by a first call on other tokens), so that no size is 0 or 1 when exported."""
    b, n = tokens.shape
    stream = MemoryStream(graph, names=["input_ids", "attention_mask", "position_ids", *names])
    with torch.no_grad():
        stream(tokens[:, :EXAMPLE_PAST].flip(0))
    return Inputs(
        ["input_ids", "attention_mask", "position_ids", *names],
        [
            tokens,
            torch.ones(b, EXAMPLE_PAST + n, dtype=torch.int64),
            torch.arange(EXAMPLE_PAST, EXAMPLE_PAST + n).expand(b, n).contiguous(),
            *stream.memory,
        ],
        positional=True,
    )


def _check(graph: Graph, tokens, whole, row, alone) -> None:
    """The claim on the example tokens: prefill then one token at a time, and a row with two
    padding tokens on its left, give the whole sequence's outputs."""
    n = tokens.shape[1]
    stream = MemoryStream(graph)
    cuts = [0, max(1, n - 3), *range(max(2, n - 2), n + 1)]
    with torch.no_grad():
        parts = [stream(tokens[:, a:b]) for a, b in zip(cuts, cuts[1:], strict=False)]
        stream.reset()
        pad = torch.cat([row[:, :1].expand(1, 2), row], 1)
        mask = torch.cat([torch.zeros(1, 2, dtype=torch.int64), torch.ones_like(row)], 1)
        padded = stream(pad, mask)
    names = graph.output_names[: len(whole)]
    for name, ref, *pieces in zip(names, whole, *parts, strict=True):
        _compare(name, torch.cat(pieces, 1), ref, "computed token by token with the cache")
    for name, ref, got in zip(names, alone, padded, strict=True):
        _compare(name, got[:, 2:], ref, "of a left-padded row")


def _compare(
    name: str,
    got: torch.Tensor,
    ref: torch.Tensor,
    how: str,
    against: str = "the whole sequence's",
    why: str = WHY,
) -> None:
    diff = float((got - ref).abs().max())
    # a cache computes the same sums in other chunks: in bf16 and fp16 their rounding alone
    # differs by a few units of the dtype's precision (a broken cache differs by the scale)
    tolerance = max(TOLERANCE, 4 * torch.finfo(ref.dtype).eps) if ref.is_floating_point() else 0
    if not diff <= tolerance * max(1.0, float(ref.abs().max())):
        raise PassError(
            f"decode form: {name} {how} differs from {against} by {diff:.2e} on the "
            f"example tokens: {why}"
        )


def _allowed(g: fx.Graph, like: fx.Node, past: fx.Node, ids: fx.Node, mask: fx.Node) -> fx.Node:
    """allowed[b, 0, i, j] = (j ≤ P + i and mask[b, j]) or j = P + i."""
    device = ids.meta["val"].device
    p = _node(g, like, aten.sym_size.int, (past, -2))
    q = _node(g, like, aten.sym_size.int, (ids, 1))
    total = _node(g, like, operator.add, (p, q))
    rows = _node(g, like, aten.arange.start, (p, total), {"device": device})
    rows = _node(g, like, aten.unsqueeze.default, (rows, -1))
    cols = _node(g, like, aten.arange.default, (total,), {"device": device})
    causal = _node(g, like, aten.le.Tensor, (cols, rows))
    own = _node(g, like, aten.eq.Tensor, (cols, rows))
    real = _node(g, like, aten.ne.Scalar, (mask, 0))
    real = _node(g, like, aten.unsqueeze.default, (real, 1))
    real = _node(g, like, aten.unsqueeze.default, (real, 1))
    seen = _node(g, like, aten.logical_and.default, (causal, real))
    return _node(g, like, aten.logical_or.default, (seen, own))


def _positions(g: fx.Graph, seq: str, position_ids: fx.Node) -> None:
    """Token positions become `position_ids`: every arange from 0 over the sequence, or the
    (batch or 1, tokens) rows the graph makes of it (through `+ 0`, unsqueeze, expand, casts)."""
    for n in list(g.nodes):
        if not (
            is_call(n, ARANGES)
            and "val" in n.meta  # the reads' new mask is not a position
            and str(n.meta["val"].shape[0]) == seq
            and (n.target is aten.arange.default or n.args[0] == 0)
            and (n.target is not aten.arange.start_step or n.args[2] == 1)
        ):
            continue
        rows, todo = [], [n]
        while todo:
            x = todo.pop()
            ahead = [u for u in x.users if _keeps_positions(u, x)]
            todo += ahead
            shape = x.meta["val"].shape
            if (
                len(shape) == 2
                and str(shape[1]) == seq
                and not any(len(u.meta["val"].shape) == 2 for u in ahead)
            ):
                rows.append(x)
        for x in rows or [n]:
            like = position_ids
            if x.meta["val"].dtype != torch.int64:
                with g.inserting_after(position_ids):
                    like = _node(
                        g, x, aten._to_copy.default, (position_ids,), {"dtype": x.meta["val"].dtype}
                    )
            x.replace_all_uses_with(like)


def _keeps_positions(u: fx.Node, x: fx.Node) -> bool:
    """`u` passes the positions `x` on unchanged in value (a copy, a cast, `+ 0`, a leading
    axis or its expansion, a full slice)."""
    if is_call(u, {aten.add.Tensor, aten.add.Scalar}):
        return u.args[0] is x and u.args[1] == 0
    if is_call(u, {aten.unsqueeze.default}):
        return u.args[1] == 0
    if is_call(u, {aten.slice.Tensor}):
        return op_arg(u, "start") in (None, 0) and op_arg(u, "end") in (None, 2**63 - 1)
    return is_call(
        u, {aten.expand.default, aten._to_copy.default, aten.clone.default, aten.alias.default}
    )


def _drop_dead_asserts(g: fx.Graph) -> None:
    """Erase assertions about values nothing else uses any more (the masks the reads dropped),
    so dead-code elimination can remove what computed them."""
    changed = True
    while changed:
        changed = False
        g.eliminate_dead_code()
        for n in list(g.nodes):
            checked = n.args[0] if "_assert" in str(n.target) and n.args else None
            if isinstance(checked, fx.Node) and all(
                "_assert" in str(u.target) for u in checked.users
            ):
                g.erase_node(n)
                changed = True


def _where(read: fx.Node) -> str:
    """The module a read sits in (its innermost module path), for messages."""
    stack = read.meta.get("nn_module_stack") or {}
    paths = [p for p, _ in stack.values()] if stack else []
    return paths[-1] if paths else read.name


def first_call(graph: Graph) -> Graph:
    """A decode-form graph as its first call, comparable with the graph it was made from: an
    empty cache, no padding, positions from 0; the cache outputs dropped. Then the decode form
    computes what the model computed, so `certify(original, first_call(decoder))` checks it.
    Shares the parameters."""
    if not is_decoder(graph):
        raise PassError("first_call needs a graph in decode form (sdnc(persistent=true))")
    g = copy.deepcopy(graph.gm.graph)
    phs = [n for n in g.nodes if n.op == "placeholder"]
    ids, mask, positions, pasts = phs[0], phs[1], phs[2], phs[3:]
    device = ids.meta["val"].device
    with g.inserting_after(phs[-1]):
        batch = g.call_function(aten.sym_size.int, (ids, 0))
    with g.inserting_after(batch):
        seq = g.call_function(aten.sym_size.int, (ids, 1))
    with g.inserting_after(seq):
        ones = g.call_function(
            aten.ones.default, ([batch, seq],), {"dtype": torch.int64, "device": device}
        )
    with g.inserting_after(ones):
        row = g.call_function(aten.arange.default, (seq,), {"device": device})
    with g.inserting_after(row):
        rows = g.call_function(aten.expand.default, (row, [batch, seq]))
    mask.replace_all_uses_with(ones)
    positions.replace_all_uses_with(rows)
    last = rows
    for ph, t in zip(pasts, graph.inputs.tensors[3:], strict=True):
        with g.inserting_after(last):
            last = g.call_function(
                aten.zeros.default,
                ([batch, *t.shape[1:-2], 0, t.shape[-1]],),
                {"dtype": t.dtype, "device": device},
            )
        ph.replace_all_uses_with(last)
    for ph in phs[1:]:
        g.erase_node(ph)
    count = len(pasts)
    out = next(n for n in g.nodes if n.op == "output")
    out.args = (tuple(out.args[0][:-count]),)
    g.eliminate_dead_code()
    result = _sharing(
        graph,
        g,
        Inputs(graph.inputs.names[:1], graph.inputs.tensors[:1], True, graph.inputs.fixed),
        graph.output_names[:-count],
    )
    refresh_shapes(result)
    return result


def one_token_sites(graph: Graph) -> int:
    """How many nodes of `graph` (from `eager(…, one_token=True)`) call a one-token kernel."""
    return sum(bool(n.meta.get("archfx_one_token")) for n in graph.gm.graph.nodes)


def check_one_token(general: Graph, single: Graph) -> None:
    """The one-token graph's step after a prefill gives the general graph's outputs (the
    example's first row; ≤ 1e-4 × max |output|)."""
    ids = general.inputs.tensors[0][:1]
    outs = []
    with torch.no_grad():
        for last in (general, single):
            stream = MemoryStream(general)
            stream(ids)
            stream.module = last.gm
            outs.append(stream(ids[:, -1:]))
    for name, ref, got in zip(general.output_names, *outs, strict=False):
        _compare(
            name,
            got,
            ref,
            "of a one-token step by its kernels",
            "the general graph's",
            "a one-token kernel does not compute the ops it replaced",
        )


def positions(mask: torch.Tensor, q: int) -> torch.Tensor:
    """The position ids of the last `q` tokens under an attention mask [B, P + q]: tokens that
    are not padding count from 0, padding takes 1 (transformers' `generate` rule)."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, -q:]


class MemoryStream:
    """Runs a decode-form graph call after call: each call reads the cache (the sDNC memory)
    the earlier calls wrote and appends its own tokens' slots — a text segment by segment, or
    token by token as in generation. `attention_mask` marks the new tokens that are padding
    (0); positions count the tokens that are not, as transformers' `generate` counts them.
    Gradients flow within a call; earlier calls' slots are kept detached (truncated
    backpropagation through time). `reset()` forgets everything. `module` runs the calls
    instead of the graph's own module (torch.compile of it)."""

    def __init__(
        self, graph: Graph, names: list[str] | None = None, *, module: Callable | None = None
    ):
        names = names or graph.inputs.names
        if f"{PAST}.0.key" not in names:
            raise PassError(
                "MemoryStream needs a graph in decode form (decode_form, or sdnc(persistent=true))"
            )
        self.graph = graph
        self.module = graph.gm if module is None else module
        self.count = sum(n.startswith(f"{PAST}.") for n in names)
        self.memory: list[torch.Tensor] | None = None
        self.mask: torch.Tensor | None = None

    def reset(self) -> None:
        self.memory = self.mask = None

    @property
    def slots(self) -> int:
        return 0 if self.memory is None else self.memory[0].shape[-2]

    def __call__(
        self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        b, q = tokens.shape
        if self.memory is None:
            self.memory = [
                torch.zeros(b, *v.shape[1:-2], 0, v.shape[-1], dtype=v.dtype, device=tokens.device)
                for v in self._banks()
            ]
            self.mask = torch.zeros(b, 0, dtype=torch.int64, device=tokens.device)
        if b != self.memory[0].shape[0]:
            raise PassError(
                f"MemoryStream: batch {b}, but the memory holds {self.memory[0].shape[0]}"
            )
        new = (
            torch.ones(b, q, dtype=torch.int64, device=tokens.device)
            if attention_mask is None
            else attention_mask.to(torch.int64)
        )
        mask = torch.cat([self.mask, new], 1)
        out = tuple(self.module(tokens, mask, positions(mask, q), *self.memory))
        self.memory = [m.detach() for m in out[-self.count :]]
        self.mask = mask
        return out[: -self.count]

    def _banks(self) -> list:
        phs = self.graph.placeholders[3:]
        return [ph.meta["val"] for ph in phs]
