"""ONNX Runtime fusions for dynamo-exported models, each group checked, every site reported.

ONNX Runtime's own graph optimizer fuses no attention in a dynamo export (its patterns are
those of the TorchScript exporter). This stage rewrites the exporter's model into ONNX
Runtime's contrib operators before ONNX Runtime optimises it:

- ``norm``: RMSNorm written out (pow, mean, rsqrt, mul) → ``SimplifiedLayerNormalization``;
- ``skip-norm`` (CUDA only): residual add + norm → ``Skip(Simplified)LayerNormalization``.
  On CPU this group is left out: its fp32 CPU kernels are 7.5× (LayerNorm) and 1.9× (RMSNorm)
  slower than the add and norm they replace (``benchmarks/ort_kernels.py``);
- ``rotary``: x·cos + rotate_half(x)·sin → ``RotaryEmbedding``;
- ``attention``: softmax(q·kᵀ·s + mask)·v → ``MultiHeadAttention`` / ``GroupQueryAttention`` /
  ``Attention`` (with the projections' bias);
- ``gelu``: erf / tanh GELU → ``Gelu`` / ``FastGelu`` / ``BiasGelu``.

The rewrite rules are onnxscript's (``onnxscript.rewriter.ort_fusions``), plus one of archfx's
that lets hand-written attention (masked_fill with −inf) match them. After each group that
changed the model, the model runs under ONNX Runtime on the example inputs and each output is
compared with PyTorch's fp64 run, relative to its max |value|; a group that leaves any output
further from it than twice the unfused export did (and beyond ``TOLERANCE``) is undone and
reported with its error. The report names every site (attention,
norm, rotary embedding, GELU) by the module that computes it, and says which operator it became
or why it stayed as it was: the group was left out for this provider, it was undone, or the
pattern's own reason for not matching there.
"""

from __future__ import annotations

import ast
import contextlib
import io
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import first_line

GROUP_OPS = {
    "norm": {"SimplifiedLayerNormalization", "LayerNormalization"},
    "skip-norm": {"SkipLayerNormalization", "SkipSimplifiedLayerNormalization"},
    "rotary": {"RotaryEmbedding"},
    "attention": {"MultiHeadAttention", "GroupQueryAttention", "Attention"},
    "gelu": {"Gelu", "FastGelu", "BiasGelu"},
}
SITE_GROUPS = {  # the groups whose operators a site of each kind can become
    "attention": ("attention",),
    "norm": ("skip-norm", "norm"),
    "rotary": ("rotary",),
    "gelu": ("gelu",),
}
CPU_SLOW = {
    "skip-norm": "left out on CPU: ONNX Runtime's fp32 Skip(Simplified)LayerNormalization CPU "
    "kernels are 7.5× / 1.9× slower than the add and norm (benchmarks/ort_kernels.py)"
}


@contextlib.contextmanager
def exact_no_ops():
    """onnxscript's optimiser without its no-op rules while the block runs. They remove
    `x + c`, `x − c`, `x · c`, `x / c` when c is *close to* 0 or 1 (onnxscript 0.7 matches
    pattern constants with abs_tol 1e-8, rel_tol 1e-5): DDL's ‖h‖² + ε² (ε² = 1e-10) lost its
    ε², and a new layer's h = 0 then gave 0 · ∞. ONNX Runtime's own optimiser still removes the
    exact identities. Where onnxscript's layout differs nothing changes, and the ONNX check
    still compares every export with PyTorch."""
    try:
        from onnxscript import rewriter
        from onnxscript.rewriter.rules.common import _no_op

        saved = rewriter._DEFAULT_REWRITE_RULES
        no_ops = set(_no_op.rules)
    except (ImportError, AttributeError):
        yield
        return
    rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in saved if r not in no_ops)
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = saved


def _rule_sets() -> dict[str, list]:
    """onnxscript's rule sets, in the order onnxscript's own ORT pipeline applies them."""
    from onnxscript.rewriter.ort_fusions import (
        attention,
        bias_gelu,
        cos_sin_cache,
        erfgelu,
        gelu,
        gqa,
        gqa_packed_qkv,
        mha,
        mha_bias,
        mha_scale,
        rms_normalization,
        rotary_embedding,
        sdpa,
        sdpa_via_mha,
        skip_normalization,
    )

    return {
        "norm": [rms_normalization.rms_normalization_ruleset],
        "skip-norm": [
            skip_normalization.skip_layer_normalization_ruleset,
            skip_normalization.skip_rms_normalization_ruleset,
        ],
        "rotary": [
            rotary_embedding.rotary_embedding_rules,
            cos_sin_cache.cos_sin_cache_rules,
            rotary_embedding.partial_embedding_rules,
        ],
        "attention": [
            _masked_fill_rules(),
            sdpa.sdpa_rules,
            gqa.gqa_rules,
            gqa_packed_qkv.fuse_qkv_gqa_rules,
            mha.mha_rules_with_past,
            mha.mha_rules_no_past,
            mha_scale._mha_scale_rules,
            mha_bias.mha_bias_rules,
            attention.attention_rules,
            sdpa_via_mha._rules,
        ],
        "gelu": [erfgelu.rules, gelu.gelu_rules, bias_gelu.bias_gelu_rules],
    }


def _masked_fill_rules():
    """archfx's one rule: a hand-written attention's masked_fill with −inf,
    ``Where(m, −inf, s)``, as the additive mask the attention patterns expect,
    ``s + Where(m, −inf, 0)``. Exact: s + 0 = s and s + (−inf) = −inf for every finite s (a
    finite fill is not rewritten: s + fill differs from fill)."""
    import onnx_ir as ir
    from onnxscript.rewriter import pattern

    def where(op, mask, fill, scores):
        return op.Where(mask, fill, scores)

    def minus_inf(context, mask, fill, scores, **_):
        value = fill.const_value
        if value is None or value.numpy().size != 1 or value.numpy().reshape(()) != -np.inf:
            return pattern.MatchResult().fail("the fill is not the constant −inf", fill)
        if scores.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
            return pattern.MatchResult().fail("the scores are not floating point", scores)
        return True

    def as_bias(op, mask, fill, scores):
        zero = op.CastLike(op.Constant(value_float=0.0), fill)
        return op.Add(scores, op.Where(mask, fill, zero))

    return pattern.RewriteRuleSet(
        [pattern.RewriteRule(where, as_bias, minus_inf, name="MaskedFillAsBias")]
    )


@dataclass
class Site:
    """One attention, norm, rotary embedding or GELU of the model."""

    kind: str
    scope: str  # the module that computes it, from the exporter's name scopes
    fused: str | None = None  # the ONNX Runtime operator it became
    exported: str | None = None  # the operator the exporter already emitted for it, if fused
    reason: str | None = None  # why it did not


@dataclass
class GroupResult:
    name: str
    fusions: int = 0  # rewrites applied
    max_abs_diff: float | None = None  # the largest of `errors`
    errors: dict[str, float] = field(default_factory=dict)  # check's figure per output
    kept: bool = True
    reason: str | None = None  # why it was left out or undone
    misses: dict[str, tuple[int, str]] = field(default_factory=dict)  # scope → best failed match


@dataclass
class FusionReport:
    sites: list[Site] = field(default_factory=list)
    groups: list[GroupResult] = field(default_factory=list)
    baseline_diff: float = 0.0  # the unfused export's check figure (the largest over outputs)
    baseline: dict[str, float] = field(default_factory=dict)  # the same, per output
    runtime_ops: dict[str, int] = field(default_factory=dict)  # contrib ops after ORT's optimizer
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, tuple[int, int]]:
        """{kind: (fused sites, all sites)}."""
        out: dict[str, tuple[int, int]] = {}
        for s in self.sites:
            f, n = out.get(s.kind, (0, 0))
            out[s.kind] = (f + (s.fused is not None), n + 1)
        return out

    def summary(self) -> str:
        """Sites that run as one ONNX Runtime operator, per kind, and how many of them the
        exporter already emitted as that operator (archfx's own rewrites: the group lines)."""
        parts = []
        for k, (f, n) in self.counts().items():
            e = sum(s.kind == k and _as_exported(s) for s in self.sites)
            parts.append(f"{k} {f}/{n}" + (f" ({e} already so in the export)" if e else ""))
        return "fused sites: " + (", ".join(parts) if parts else "none (no sites)")

    def lines(self) -> list[str]:
        """The report, one line per group and per site. The first line counts sites (an
        attention, a norm …) by the operator they end on, including those the exporter
        already emitted fused; a group line counts the pattern rewrites archfx's fusion made
        (several per site, or intermediate ones a later stage inlines again)."""
        out = [self.summary(), *(f"  note: {n}" for n in self.notes)]
        for g in self.groups:
            state = "not applied" if not g.kept else "kept" if g.fusions else "nothing matched"
            diff = "" if g.max_abs_diff is None else f", error {g.max_abs_diff:.1e}"
            why = f": {g.reason}" if g.reason else ""
            ops = GROUP_OPS.get(g.name, set())
            ended = sum(s.fused in ops and not _as_exported(s) for s in self.sites)
            landed = (
                f" ({ended} site{'s' * (ended != 1)} end on its operators)" if g.fusions else ""
            )
            out.append(
                f"  group {g.name}: {g.fusions} rewrites by archfx{landed}, {state}{diff}{why}"
            )
        for s in self.sites:
            what = f"→ {s.fused}" if s.fused else f"not fused: {s.reason}"
            what += " (as exported)" if _as_exported(s) else ""
            out.append(f"  {s.kind:9s} {s.scope or '(top level)'}: {what}")
        if self.runtime_ops:
            ops = ", ".join(f"{op} ×{n}" for op, n in sorted(self.runtime_ops.items()))
            out.append(f"  after ONNX Runtime's own optimizer: {ops}")
        return out


def fuse(
    raw: str | Path,
    out: str | Path,
    *,
    providers: list[str],
    check: Callable[[Path], float | dict[str, float]],
    tolerance: float,
    groups: dict[str, list] | None = None,
) -> FusionReport:
    """Rewrite the exporter's model `raw` into ONNX Runtime's fused operators, save it to `out`.

    `check(path)` runs a saved model and returns its error per output ({name: error}; archfx's:
    ONNX Runtime's fp32 run against PyTorch's fp64 run, relative to the output's max |value|),
    or one number for all; a group is undone when it raises or, for any output, its error
    exceeds max(`tolerance`, 2 × the unfused model's own error on that output). `groups`
    replaces onnxscript's rule sets (tests use it to feed a wrong rewrite).
    """
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    from onnxscript.optimizer import optimize
    from onnxscript.rewriter.ort_fusions import shape_optimization

    out = Path(out)
    groups = _rule_sets() if groups is None else groups
    on_gpu = "CUDAExecutionProvider" in providers
    report = FusionReport()
    with (
        tempfile.TemporaryDirectory() as tmp,
        contextlib.redirect_stdout(io.StringIO()),
        exact_no_ops(),
    ):
        model = ir.load(str(raw))
        common.ShapeInferencePass()(model)
        optimize(model)
        shape_optimization.rules.apply_to_model(model)
        optimize(model)
        last = _save(model, Path(tmp) / "stage0.onnx")
        try:
            report.baseline = _per_output(check(last))
        except Exception as exc:  # onnxscript's clean-up broke it: fuse the export as it is
            report.notes.append(
                f"onnxscript's pre-fusion optimisation broke the model ({first_line(exc, 160)}); "
                "the exporter's model was fused as it is"
            )
            model, last = ir.load(str(raw)), Path(raw)
            report.baseline = _per_output(check(last))
        report.baseline_diff = max(report.baseline.values(), default=0.0)
        sites = _find_sites(model)
        limits = {k: max(tolerance, 2 * v) for k, v in report.baseline.items()}
        for i, (name, rule_sets) in enumerate(groups.items(), start=1):
            result = GroupResult(name)
            report.groups.append(result)
            if name in CPU_SLOW and not on_gpu:
                result.kept, result.reason = False, CPU_SLOW[name]
                continue
            for rules in rule_sets:
                result.fusions += rules.apply_to_model(model)
                common.ShapeInferencePass()(model)
            result.misses = _misses(model, rule_sets)
            if not result.fusions:
                continue
            common.CommonSubexpressionEliminationPass()(model)
            stage = _save(model, Path(tmp) / f"stage{i}.onnx")
            try:
                result.errors, error = _per_output(check(stage)), None
            except Exception as exc:  # ONNX Runtime refuses or fails on the rewritten model
                result.errors, error = (
                    {"": float("inf")},
                    f"broke the model ({first_line(exc, 160)}); undone",
                )
            result.max_abs_diff = max(result.errors.values(), default=0.0)
            over = [
                (k, e, limits.get(k, tolerance))
                for k, e in result.errors.items()
                if not e <= limits.get(k, tolerance)
            ]
            if not over:
                last = stage
                continue
            result.kept = False
            output, e, lim = over[0]
            result.reason = error or (
                f"changed the outputs by {e:.1e} ({f'output {output}: ' if output else ''}limit "
                f"{lim:.1e}); undone"
            )
            model = ir.load(str(last))
        optimize(model)  # inline what a later group did not consume
        common.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1)(model)
        common.RemoveInitializersFromInputsPass()(model)
        common.ShapeInferencePass()(model)
        _save(model, out)
        report.sites = _judge(sites, ir.load(str(out)), report)
    return report


def _as_exported(site: Site) -> bool:
    """The site's operator is the one the exporter emitted (ONNX's LayerNormalization, Gelu),
    not one archfx's fusion made."""
    return site.fused is not None and site.fused == site.exported


def _per_output(errors: float | dict[str, float]) -> dict[str, float]:
    return dict(errors) if isinstance(errors, dict) else {"": float(errors)}


def _save(model, path: Path) -> Path:
    import onnx_ir as ir

    ir.save(model, str(path), external_data=path.name + ".data")
    return path


def _scope(node) -> str:
    """The module that computed `node` (the exporter's name scopes, without the op's own)."""
    scopes = _scopes(node)
    return scopes[-2] if len(scopes) >= 2 else scopes[0]


def _find_sites(model) -> list[Site]:
    """Attention (its softmax), norms, rotary embeddings (rotate_half's negation feeding a
    concat) and GELUs (ONNX's Gelu, or 1 + erf / 1 + tanh), one site per kind and module."""
    seen: dict[tuple[str, str], Site] = {}
    for node in model.graph:
        kind = _site_kind(node)
        if kind is not None:
            scope = _scope(node)
            done = node.op_type if node.op_type in ("LayerNormalization", "Gelu") else None
            seen.setdefault((kind, scope), Site(kind, scope, exported=done))
    return list(seen.values())


def _site_kind(node) -> str | None:
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return None
    if op == "Softmax":
        return "attention"
    if op == "LayerNormalization":
        return "norm"
    if op == "ReduceMean" and node.inputs and node.inputs[0] is not None:
        src = node.inputs[0].producer()
        if src is not None and (
            src.op_type == "Pow" or (src.op_type == "Mul" and src.inputs[0] is src.inputs[1])
        ):
            return "norm"
    if op == "Neg" and any(u.op_type == "Concat" for u, _ in node.outputs[0].uses()):
        return "rotary"
    if op == "Gelu" or (
        op in ("Erf", "Tanh") and any(u.op_type == "Add" for u, _ in node.outputs[0].uses())
    ):  # a GELU written out: 1 + erf(...) or 1 + tanh(...)
        return "gelu"
    return None


def _judge(sites: list[Site], model, report: FusionReport) -> list[Site]:
    """What each site became in the final model, or why it did not."""
    fused_at = {(node.op_type, scope) for node in model.graph for scope in _scopes(node)}
    by_name = {g.name: g for g in report.groups}
    for site in sites:
        groups = [by_name[g] for g in SITE_GROUPS[site.kind] if g in by_name]
        ops = [op for g in groups for op in sorted(GROUP_OPS[g.name])]
        site.fused = next((op for op in ops if (op, site.scope) in fused_at), None)
        if site.fused is not None:
            continue
        undone = [g for g in groups if not g.kept and g.name not in CPU_SLOW]
        misses = [g.misses[site.scope] for g in groups if site.scope in g.misses]
        if undone:
            site.reason = f"group {undone[0].name} {undone[0].reason}"
        elif misses:
            site.reason = max(misses)[1]
        else:
            site.reason = "no fusion pattern matched any of its nodes"
    return sites


def _scopes(node) -> list[str]:
    """The modules enclosing `node` (the exporter's name scopes), outermost first."""
    text = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    return ast.literal_eval(text) if text else [node.name or ""]


def _misses(model, rule_sets) -> dict[str, tuple[int, str]]:
    """Per module scope, the furthest any of `rule_sets` got without matching and why (a dry
    run: with a tracer, onnxscript's rewriter changes nothing)."""
    from onnxscript.rewriter._basics import MatchingTracer, MatchStatus

    best: dict[str, tuple[int, str]] = {}

    class PerScope(MatchingTracer):
        def log(self, rule, container, node, match_result, status):
            if status == MatchStatus.SUCCESS:
                return
            score = len(match_result.nodes) + int(status.value) * 100
            why = (match_result.reason or "the pattern did not match").splitlines()[0][:200]
            for scope in _scopes(node)[1:-1]:  # enclosing modules, not the root or the op
                if score > best.get(scope, (-1, ""))[0]:
                    best[scope] = (score, f"{rule.name or type(rule).__name__}: {why}")

    for rules in rule_sets:
        rules.apply_to_model(model, tracer=PerScope())
    return best
