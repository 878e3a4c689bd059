"""Write a grown Hugging Face model as a plain Hugging Face checkpoint: a config whose sizes
match the graph, and the graph's weights under the model's own names, so that
`from_pretrained` rebuilds it with no archfx installed.

This is the thin config adapter docs/architecture.md allows (principle 1): the sizes come
from the graph's Structure (hidden width, MLP width, heads, KV heads, head dim, blocks per
stack, norm eps, RoPE frequencies); they are written under whichever of the usual config
keys the model's config has. Nothing is trusted: the model is rebuilt from the new config,
every tensor must match in name and shape, and its outputs must equal the graph's before
anything is written.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import transformers

from archfx.ir import ArtifactError, Graph
from archfx.ir.serialize import state, write_dir
from archfx.ir.verify import compare, in_precision

KEYS = {
    "hidden": ("hidden_size", "n_embd", "d_model", "dim", "embed_dim"),
    "mlp": ("intermediate_size", "n_inner", "d_ff", "ffn_dim", "hidden_dim"),
    "heads": ("num_attention_heads", "n_head", "num_heads"),
    "kv_heads": ("num_key_value_heads", "num_kv_heads"),
    "head_dim": ("head_dim", "d_kv", "kv_channels"),
    "layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "eps": (
        "rms_norm_eps",
        "layer_norm_eps",
        "layer_norm_epsilon",
        "norm_eps",
        "layernorm_epsilon",
    ),
}
STACK_KEYS = {  # encoder-decoder models count their stacks' blocks and MLPs separately
    "encoder": {
        "layers": ("encoder_layers", "num_layers"),
        "mlp": ("encoder_ffn_dim",),
        "heads": ("encoder_attention_heads",),
    },
    "decoder": {
        "layers": ("decoder_layers", "num_decoder_layers"),
        "mlp": ("decoder_ffn_dim",),
        "heads": ("decoder_attention_heads",),
    },
}


def grown_config(graph: Graph, config: transformers.PretrainedConfig):
    """`config` with every size the graph's Structure determines set to the graph's value."""
    config = copy.deepcopy(config)
    st = graph.structure
    old_hidden = next((getattr(config, k) for k in KEYS["hidden"] if hasattr(config, k)), None)
    if getattr(config, "word_embed_proj_dim", None) == old_hidden:  # OPT: no projection
        config.word_embed_proj_dim = st.hidden_size
    _put(config, KEYS["hidden"], st.hidden_size)
    for stack in st.stacks:
        role = next((r for r in STACK_KEYS if r in stack.path.split(".")), None)
        own = STACK_KEYS.get(role, {})
        keys = {k: own.get(k, ()) + v for k, v in KEYS.items()}
        blocks = stack.blocks
        _put(config, keys["layers"], len(blocks))
        mlps = {b.mlp.hidden for b in blocks if b.mlp}
        _put(config, keys["mlp"], _one(mlps, "MLP widths"))
        atts = [a for b in blocks for a in (b.attention, b.cross_attention) if a]
        _put(config, keys["heads"], _one({a.heads for a in atts}, "head counts"))
        if len({a.kv_heads for a in atts}) == 1:
            _put(config, KEYS["kv_heads"], atts[0].kv_heads)
        dims = {a.head_dim for a in atts}
        values = {a.o.in_features // a.heads for a in atts if a.o}
        if dims != values:
            raise ArtifactError(
                f"queries/keys have {sorted(dims)} and values {sorted(values)} dimensions per head; "
                f"{type(config).__name__} has one head_dim: grow both to the same size"
            )
        if any(hasattr(config, k) and getattr(config, k) is not None for k in KEYS["head_dim"]):
            _put(config, KEYS["head_dim"], _one(dims, "head dims"))
        _rotary(config, atts)
    eps = {
        n.eps
        for b in st.blocks
        for r in b.residuals
        for n in (r.pre_norm, r.post_norm)
        if n and n.eps
    }
    if len(eps) == 1:
        _put(config, KEYS["eps"], eps.pop())
    if hasattr(config, "layer_types") and isinstance(config.layer_types, list):
        n = len(st.blocks)
        if len(config.layer_types) != n:
            config.layer_types = _layer_types(graph, config.layer_types, n)
    return config


def save_pretrained(
    graph: Graph,
    model: transformers.PreTrainedModel,
    out,
    *,
    force: bool = False,
    tokenizer=None,
) -> Path:
    """Write `graph` as a Hugging Face checkpoint of `model`'s class, checked to reproduce it,
    with `tokenizer` beside it (`tokenizer.save_pretrained`, so that AutoTokenizer loads it
    from `out`). By default the tokenizer is the source model's own when its checkpoint
    directory (`model.name_or_path`) has one (models.tokenizer_from); False: none."""
    if not isinstance(model, transformers.PreTrainedModel):
        raise ArtifactError(
            f"a Hugging Face checkpoint needs a Hugging Face model; {type(model).__name__} is "
            "not one (use --out for an archfx artifact)"
        )
    try:
        rebuilt = rebuild(graph, model)
    except ArtifactError:
        raise
    except Exception as exc:  # config validators raise their own types
        raise ArtifactError(
            f"the grown sizes are not a valid {type(model.config).__name__}: {exc}"
        ) from exc

    if tokenizer is None:
        from .models import tokenizer_from

        tokenizer = tokenizer_from(getattr(model, "name_or_path", None))

    def fill(tmp: Path) -> None:
        rebuilt.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None and tokenizer is not False:
            tokenizer.save_pretrained(str(tmp))

    return write_dir(out, fill, force=force)


def rebuild(graph: Graph, model: transformers.PreTrainedModel) -> transformers.PreTrainedModel:
    """A fresh `type(model)` from the grown config with the graph's weights, checked equal."""
    config = grown_config(graph, model.config)
    config = type(config).from_dict(config.to_dict())  # validated as from_pretrained will
    new = _with_weights(graph, model, config)
    freqs = _graph_inv_freq(graph)
    if freqs is not None and not _same_freqs(new, freqs):
        _set_theta(config, freqs)
        new = _with_weights(graph, model, config)
    # both in fp64, whatever the model's dtype: the weights are the graph's, so the two agree to
    # what fp64 rounding (and the fp32 islands Hugging Face code keeps, e.g. RoPE) leaves; a
    # config that cannot express the growth differs at the scale of the new weights
    exact = in_precision(graph, torch.float64)
    expected = exact.run()
    args, kwargs = exact.inputs.as_call()
    with torch.no_grad():
        out = copy.deepcopy(new).double()(*args, **kwargs)
    got = [out[k] for k in graph.output_names] if isinstance(out, dict) else list(out)
    got = [g for g in got if isinstance(g, torch.Tensor)][: len(expected)]
    diffs = compare(expected, got, graph.output_names, relative=True)
    worst = max(diffs.values(), default=0.0)
    if worst > REBUILD_TOLERANCE:
        raise ArtifactError(
            f"{type(model).__name__} rebuilt from the grown config differs from the graph by "
            f"{worst:.3g} of the output's scale in fp64; the change is not expressible as a "
            f"{type(model.config).__name__}"
        )
    return new


# relative, per output, both run in fp64: Hugging Face's fp32 islands leave ~1e-7; an error in
# bf16 weights or a config that drops part of the growth is far above
REBUILD_TOLERANCE = 1e-5


def _with_weights(graph, model, config):
    new = type(model)(config).eval().to(next(model.parameters()).dtype)
    tensors = {k: v for k, v in state(graph.gm)[0].items() if "lifted_tensor" not in k}
    own = {**dict(new.named_buffers()), **new.state_dict()}
    groups: dict[int, list[str]] = {}
    for k, v in own.items():
        groups.setdefault(v.data_ptr(), []).append(k)
    missing = [
        k
        for k in own
        if k not in tensors and not any(a in tensors for a in groups[own[k].data_ptr()])
    ]
    unexpected = [k for k in tensors if k not in own]
    if missing or unexpected:
        raise ArtifactError(
            f"the grown graph's tensors do not match {type(model).__name__}: missing "
            f"{missing[:3]}, unexpected {unexpected[:3]}"
        )
    bad = [k for k in tensors if own[k].shape != tensors[k].shape and "inv_freq" not in k]
    if bad:
        k = bad[0]
        raise ArtifactError(
            f"{k}: the graph has {tuple(tensors[k].shape)}, {type(model).__name__} from the grown "
            f"config {tuple(own[k].shape)}; this growth is not expressible in its config"
        )
    persistent = set(new.state_dict())
    for k, v in tensors.items():
        if k not in persistent and "inv_freq" not in k and not torch.equal(own[k], v):
            raise ArtifactError(
                f"{k} is recomputed from the config on load and would not equal the grown "
                f"model's (e.g. an embedding scale of √width); not expressible in its config"
            )
    with torch.no_grad():
        for k, v in tensors.items():
            if k in persistent:
                own[k].copy_(v)
    return new


def _put(config, keys, value) -> None:
    """Set the first of `keys` the config has (sizes it does not carry need no update)."""
    if value is None:
        return
    for k in keys:
        if hasattr(config, k):
            try:
                setattr(config, k, value)
            except AttributeError:  # a derived property (Falcon's head_dim): follows the others
                continue
            return


def _one(values: set, what: str):
    if len(values) > 1:
        raise ArtifactError(
            f"blocks differ in {what} ({sorted(values)}); a Hugging Face config has one value: "
            "grow every block alike to save in its format"
        )
    return values.pop() if values else None


def _rotary(config, atts) -> None:
    rotary = {a.rotary_dim for a in atts if a.rope and a.rotary_dim}
    dims = {a.head_dim for a in atts}
    if len(rotary) != 1 or len(dims) != 1:
        return
    factor = rotary.pop() / dims.pop()
    for k in ("partial_rotary_factor", "rotary_pct"):
        if hasattr(config, k) and getattr(config, k) is not None:
            setattr(config, k, factor)
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "partial_rotary_factor" in params:
        params["partial_rotary_factor"] = factor


def _graph_inv_freq(graph):
    for name, b in graph.gm.named_buffers():
        if name.endswith("inv_freq"):
            return b
    return None


def _same_freqs(model, freqs) -> bool:
    for name, b in model.named_buffers():
        if name.endswith("inv_freq"):
            return b.shape == freqs.shape and torch.allclose(b, freqs, rtol=1e-5)
    return True


def _set_theta(config, freqs) -> None:
    """RoPE base from frequencies 1/θ^(2i/r): the grown model keeps the old frequencies and
    continues their sequence, which is the default RoPE of the grown rotary dim with θ' = θ^(r'/r)."""
    r = 2 * freqs.numel()
    theta = float((freqs[0] / freqs[1]).double() ** (r / 2))
    if not math.isfinite(theta):
        raise ArtifactError("the graph's RoPE frequencies do not define a base")
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict):
        params["rope_theta"] = theta
    if hasattr(config, "rope_theta"):
        config.rope_theta = theta


def _layer_types(graph, types: list, n: int) -> list:
    inserted = graph.provenance.get("inserted_layers", [])
    types = list(types)
    for at, template in inserted:
        types.insert(at, types[template])
    if len(types) != n:
        raise ArtifactError(f"config.layer_types has {len(types)} entries for {n} blocks")
    return types
