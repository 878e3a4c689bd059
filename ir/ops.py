"""Op vocabulary of the ATen graphs torch.export produces: what each node *is* to the analyses.

Everything here reads dataflow (ops, argument positions, parameter shapes), never module or
parameter names.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from .memory import READ

aten = torch.ops.aten

IDENTITY = {
    aten.to.dtype,
    aten.to.dtype_layout,
    aten.to.device,
    aten._to_copy.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.alias.default,
    aten.detach.default,
    aten.type_as.default,
}
DROPOUT = {aten.dropout.default, aten.native_dropout.default, aten.feature_dropout.default}
SHAPE = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.transpose.int,
    aten.permute.default,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.default,
    aten.expand.default,
    aten.slice.Tensor,
    aten.flatten.using_ints,
    aten.unflatten.int,
    aten.t.default,
    aten.numpy_T.default,
    aten.broadcast_to.default,
    aten.select.int,
    aten.split.Tensor,
    aten.split_with_sizes.default,
    aten.chunk.default,
    aten.unbind.int,
    operator.getitem,
}
ADD = {aten.add.Tensor, aten.add_.Tensor}
MATMUL = {aten.matmul.default, aten.bmm.default, aten.mm.default}
LINEAR_OPS = {aten.linear.default, aten.addmm.default, *MATMUL}
ATTENTION_OPS = {
    aten.scaled_dot_product_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_efficient_attention.default,
    READ,  # sDNC's memory read: SDPA's arguments (ir/memory.py)
}
SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
NORM_OPS = {aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default}
ACTIVATIONS = {
    aten.silu.default: "silu",
    aten.gelu.default: "gelu",
    aten.relu.default: "relu",
    aten.sigmoid.default: "sigmoid",
    aten.tanh.default: "tanh",
    aten.erf.default: "erf",
}

# aranges
ARANGES = {aten.arange.default, aten.arange.start, aten.arange.start_step}

# ops that make token positions
POSITION_OPS = {*ARANGES, aten.cumsum.default}

# clamps (and the broadcasts around them) the analysis looks through
CLAMPS = {
    aten.clamp_min.default,
    aten.clamp.default,
    aten.expand.default,
    aten.expand_as.default,
}

# in-place arithmetic → its out-of-place op (capture rewrites x.add_(y))
INPLACE = {
    aten.add_.Tensor: aten.add.Tensor,
    aten.mul_.Tensor: aten.mul.Tensor,
    aten.sub_.Tensor: aten.sub.Tensor,
    aten.div_.Tensor: aten.div.Tensor,
}

# element-wise ops (broadcasting): the dims analysis couples their operands axis by axis
ELEMENTWISE = {
    aten.add.Tensor,
    aten.sub.Tensor,
    aten.mul.Tensor,
    aten.div.Tensor,
    aten.where.self,
    aten.where.ScalarOther,
    aten.where.ScalarSelf,
    aten.masked_fill.Scalar,
    aten.masked_fill.Tensor,
    aten.__and__.Tensor,
    aten.__or__.Tensor,
    aten.eq.Tensor,
    aten.eq.Scalar,
    aten.ne.Scalar,
    aten.ne.Tensor,
    aten.lt.Scalar,
    aten.lt.Tensor,
    aten.le.Scalar,
    aten.le.Tensor,
    aten.gt.Scalar,
    aten.gt.Tensor,
    aten.ge.Scalar,
    aten.ge.Tensor,
    aten.min.other,
    aten.max.other,
    aten.maximum.default,
    aten.minimum.default,
    aten.pow.Tensor_Scalar,
    aten.pow.Tensor_Tensor,
    aten.neg.default,
    aten.abs.default,
    aten.cos.default,
    aten.sin.default,
    aten.exp.default,
    aten.log.default,
    aten.sqrt.default,
    aten.rsqrt.default,
    aten.reciprocal.default,
    aten.gelu.default,
    aten.silu.default,
    aten.relu.default,
    aten.tanh.default,
    aten.sigmoid.default,
    aten.erf.default,
    *IDENTITY,
    aten.lift_fresh_copy.default,
    aten.dropout.default,
    aten.full_like.default,
    aten.zeros_like.default,
    aten.ones_like.default,
    aten.cumsum.default,
    aten.clamp.default,
    aten.bitwise_not.default,
    aten.logical_not.default,
}

# reductions over axes, by kind
REDUCTIONS = {
    aten.mean.dim: "mean",
    aten.sum.dim_IntList: "sum",
    aten.amax.default: "max",
    aten.var.correction: "var",
    aten.var.dim: "var",
}

# ops that make a new tensor from sizes
CONSTRUCTORS = {
    aten.full.default,
    aten.zeros.default,
    aten.ones.default,
    aten.empty.memory_format,
    aten.new_ones.default,
    aten.new_zeros.default,
    aten.new_empty.default,
    aten.new_full.default,
}

# ops the dims analysis has no axes to couple for
DIMS_IGNORED = {aten.sym_size.int, aten._assert_tensor_metadata.default, aten.arange.default}

# axis permutations
PERMUTES = {aten.transpose.int, aten.permute.default}

# casts that can be no-ops
NOOP_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.alias.default}

# matrix products canonicalize turns into linear
MATMULS_2D = {aten.matmul.default, aten.mm.default}

# splits of one tensor into parts
CHUNKS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default}

# splits into parts, unbind included
SPLITS = {*CHUNKS, aten.unbind.int}

# Python arithmetic on symbolic sizes (a shape computed in the graph: growth cannot tell
# whether a constant operand is the grown dimension)
SIZE_ARITHMETIC = {operator.mul, operator.floordiv, operator.truediv, operator.add, operator.sub}
# ops whose operands growth reads axis by axis (products, lookups, concatenations)
GROWTH_MATRIX = {
    aten.linear.default,
    aten.addmm.default,
    aten.mm.default,
    aten.bmm.default,
    aten.matmul.default,
    aten.baddbmm.default,
    aten.embedding.default,
    aten.conv2d.default,
    aten.convolution.default,
    aten.cat.default,
}

# ops growth follows an axis through
GROWTH_TRANSPARENT = {
    aten.t.default,
    aten.numpy_T.default,
    aten.transpose.int,
    aten.permute.default,
    aten.view.default,
    aten.reshape.default,
    aten.unsqueeze.default,
    aten.expand.default,
    aten.slice.Tensor,
    *IDENTITY,
    aten.lift_fresh_copy.default,
}

# ops that act on each position of the residual stream alone
STREAM_LOCAL = {
    aten.layer_norm.default,
    aten.rms_norm.default,
    aten.add.Tensor,
    aten.sub.Tensor,
    aten.mul.Tensor,
    aten.div.Tensor,
    aten.pow.Tensor_Scalar,
    aten.mean.dim,
    aten.rsqrt.default,
    aten.sqrt.default,
    aten.to.dtype,
    aten.dropout.default,
    aten.clone.default,
}

# reshapes
RESHAPES = {aten.view.default, aten.reshape.default}

# reshapes and views
VIEWS = {*RESHAPES, aten._unsafe_view.default}


def is_call(node, targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def is_assert(node) -> bool:
    """Runtime checks torch.export leaves in the graph (no value, no users)."""
    return (
        isinstance(node, fx.Node) and node.op == "call_function" and "_assert" in str(node.target)
    )


def is_dropout_identity(node: fx.Node) -> bool:
    """A dropout that does nothing (eval mode or p = 0)."""
    if not is_call(node, DROPOUT):
        return False
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
    return p == 0 or train is False


def is_identity(node) -> bool:
    """Ops that return their first input unchanged in value (fp32 casts, copies, eval dropout)."""
    if is_call(node, IDENTITY):
        val, src = (
            node.meta.get("val"),
            node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None,
        )
        return (
            isinstance(val, torch.Tensor)
            and isinstance(src, torch.Tensor)
            and val.dtype == src.dtype
        )
    return is_dropout_identity(node)


def is_pointwise(node) -> bool:
    """An op ATen declares element-wise (its `pointwise` tag): whatever its name, it commutes
    with growing a feature axis, and its inputs broadcast to its output."""
    return (
        isinstance(node, fx.Node)
        and node.op == "call_function"
        and torch.Tag.pointwise in getattr(node.target, "tags", ())
    )


def strip(node: fx.Node) -> fx.Node:
    """The node behind a chain of identity ops."""
    while is_identity(node):
        node = node.args[0]
    return node


def val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def shape(node) -> tuple:
    v = val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else ()


def last_dim(node) -> int | None:
    s = shape(node)
    return s[-1] if s and isinstance(s[-1], int) else None


def is_float(node) -> bool:
    v = val(node)
    return isinstance(v, torch.Tensor) and v.is_floating_point()


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [
        a for a in node.all_input_nodes if isinstance(val(a), torch.Tensor) or a.op == "get_attr"
    ]


def param_target(node) -> str | None:
    """The get_attr target behind a node (through transposes, casts and views), if any."""
    while isinstance(node, fx.Node):
        if node.op == "get_attr":
            return node.target
        if (
            node.op == "call_function"
            and (node.target in IDENTITY or node.target in SHAPE)
            and node.args
        ):
            node = node.args[0]
            continue
        return None
    return None


def is_param(node) -> bool:
    return param_target(node) is not None


@dataclass
class Linear:
    """A linear map y = x W^T + b found in the graph, whatever op expressed it."""

    node: fx.Node  # the op
    input: fx.Node  # x (before any flattening view)
    weight: str  # get_attr target
    bias: str | None
    in_features: int
    out_features: int
    layout: str  # "out_in" (nn.Linear) or "in_out" (Conv1D / x @ W)
    output: fx.Node  # the node carrying y at x's leading shape

    @property
    def op(self) -> str:
        return "linear" if self.layout == "out_in" else "conv1d"


def as_linear(node: fx.Node, params: dict[str, torch.Tensor]) -> Linear | None:
    """Recognise aten.linear, addmm (GPT-2 Conv1D) and x @ W with a parameter W."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target == aten.linear.default:
        w = param_target(node.args[1])
        if w is None or params[w].dim() != 2:
            return None
        b = param_target(node.args[2]) if len(node.args) > 2 and node.args[2] is not None else None
        out_f, in_f = params[w].shape
        return Linear(node, node.args[0], w, b, in_f, out_f, "out_in", node)
    if node.target == aten.addmm.default:
        b, x, wn = node.args[:3]
        w = param_target(wn)
        if w is None or params[w].dim() != 2 or wn.op != "get_attr":
            return None
        in_f, out_f = params[w].shape
        src = x.args[0] if is_call(x, {aten.view.default, aten.reshape.default}) else x
        out = node
        users = list(node.users)
        if len(users) == 1 and is_call(users[0], {aten.view.default, aten.reshape.default}):
            out = users[0]
        return Linear(node, src, w, param_target(b), in_f, out_f, "in_out", out)
    if node.target in MATMUL:
        x, wn = node.args[:2]
        w = param_target(wn)
        if w is None or params[w].dim() != 2 or is_param(x):
            return None
        transposed = is_call(
            wn, {aten.t.default, aten.numpy_T.default, aten.transpose.int, aten.permute.default}
        )
        if transposed:
            out_f, in_f = params[w].shape
            return Linear(node, x, w, None, in_f, out_f, "out_in", node)
        in_f, out_f = params[w].shape
        return Linear(node, x, w, None, in_f, out_f, "in_out", node)
    return None


def op_arg(node: fx.Node, name: str):
    """The argument `name` of an ATen/archfx op call, whether given by position or keyword,
    else its schema default."""
    for i, a in enumerate(node.target._schema.arguments):
        if a.name == name:
            if not a.kwarg_only and i < len(node.args):
                return node.args[i]
            return node.kwargs.get(name, a.default_value if a.has_default_value() else None)
    raise KeyError(f"{node.target} has no argument {name!r}")


def is_heavy(node) -> bool:
    """Ops that end a norm region: projections, attention, convolutions, lookups."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    if node.target in ATTENTION_OPS or node.target in SOFTMAX or node.target in NORM_OPS:
        return True
    return (
        node.target in (aten.embedding.default, aten.conv2d.default, aten.convolution.default)
        or node.target in LINEAR_OPS
    )


# the public torch function that runs an op on the same positional and keyword arguments (the
# same kernel, bit-equal): in eager PyTorch it skips the OpOverload's Python dispatch, which
# costs about as much again per call (3.4 µs against 1.9 µs for a mul of 576 floats)
PUBLIC = {
    aten.mul.Tensor: torch.mul,
    aten.add.Tensor: torch.add,
    aten.sub.Tensor: torch.sub,
    aten.div.Tensor: torch.div,
    aten.rsub.Scalar: torch.rsub,
    aten.addcmul.default: torch.addcmul,
    aten.neg.default: torch.neg,
    aten.rsqrt.default: torch.rsqrt,
    aten.sigmoid.default: torch.sigmoid,
    aten.pow.Tensor_Scalar: torch.pow,
    aten.sum.dim_IntList: torch.sum,
    aten.mean.dim: torch.mean,
    aten.linear.default: torch._C._nn.linear,
    aten.silu.default: torch._C._nn.silu,
    aten.scaled_dot_product_attention.default: torch._C._nn.scaled_dot_product_attention,
    aten.view.default: torch.Tensor.view,
    aten.reshape.default: torch.reshape,
    aten.transpose.int: torch.transpose,
    aten.unsqueeze.default: torch.unsqueeze,
    aten.select.int: torch.select,
    aten.cat.default: torch.cat,
    aten.clone.default: torch.clone,
}
