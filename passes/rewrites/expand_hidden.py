"""expand-hidden: grow the residual stream, the model width d → d̂ (docs/passes.md, Growth).

Rewrite, `method=zero` (RMSNorm models, any d̂): embeddings and every writer to the stream
(attention output, MLP down projection, their biases) get zero new features; every reader
(q, k, v, up, gate, head) gets new input columns drawn at the scale of the existing weights;
RMS norms over the stream keep their value: eps × d/d̂ and gains × √(d/d̂) ((1 + w) gains:
w' = (1 + w)·√(d/d̂) − 1; an `rms_norm` op with no gain, AltUp's router norm: its output ×
√(d/d̂), one node, with a remark).

`method=duplicate` (any norm, d̂ = m·d): every feature is copied m times: embeddings, writers
and norm gains and biases are tiled, readers take W/m per copy plus zero-sum noise (so the
copies train apart), and with a tied head the final norm's gain and bias are divided by m (where no plain
norm gain comes right before the head, its input is scaled by 1/m instead, with a remark).

`method=auto` picks zero padding when no LayerNorm reads the stream, duplication otherwise.
`method=approximate` zero-pads LayerNorm models too: not exact (the mean shifts), only on
request.

Exactness: zero and duplicate always (duplicate needs an integer factor); approximate never.
"""

from __future__ import annotations

from archfx.ir import PassError

from ..engines.growth import SEED_DOC, Growth, grow
from ..infra.base import Option, Pass, PassResult, Remark, register


@register
class ExpandHidden(Pass):
    name = "expand-hidden"
    summary = "grow the residual stream width: zero padding (RMSNorm) or duplication (LayerNorm)"
    exact_when = {"method": ("auto", "zero", "duplicate")}
    widens_outputs = True
    options = (
        Option("size", int, 0, "new width (give size or factor)", minimum=0),
        Option(
            "factor", float, 0.0, "new width = factor × width (give size or factor)", minimum=0.0
        ),
        Option(
            "method",
            str,
            "auto",
            "how new features start",
            choices=("auto", "zero", "duplicate", "approximate"),
        ),
        Option("seed", int, 0, SEED_DOC),
    )

    def validate(self) -> None:
        if (self.opts["size"] > 0) == (self.opts["factor"] > 0):
            raise PassError("give exactly one of size or factor")

    def run(self, graph) -> PassResult:
        size, factor, method = self.opts["size"], self.opts["factor"], self.opts["method"]
        d = graph.dims
        blocks = graph.structure.blocks
        if not blocks:
            raise PassError("no Transformer blocks found")
        streams: dict[int, list[str]] = {}  # one stream width per stack, unless shared
        for stack in graph.structure.stacks:
            for b in stack.blocks:
                for node in (b.input, b.output):
                    paths = streams.setdefault(d.of(node, -1), [])
                    if stack.path not in paths:
                        paths.append(stack.path)
        for atom, paths in streams.items():
            if d.parts(atom) is not None:
                raise PassError(
                    f"the stream width of {', '.join(paths)} is built from other dimensions"
                )
        olds = {atom: d.size[atom] for atom in streams}
        if size and len(set(olds.values())) > 1:
            widths = ", ".join(f"{', '.join(streams[a])} {w}" for a, w in olds.items())
            raise PassError(f"the stacks' streams have different widths ({widths}): give factor")
        news = {atom: size or round(old * factor) for atom, old in olds.items()}
        for atom, new in news.items():
            if new < olds[atom]:
                raise PassError(f"the stream is {olds[atom]} wide; {new} is smaller")
        layernorm = any(
            r.kind in ("layer_norm", "var", "mean")
            and any(d.contains(i, atom) for i in r.dims for atom in streams)
            for r in d.reductions
        )
        if method == "auto":
            if not layernorm:
                method = "zero"
            elif all(new % olds[a] == 0 for a, new in news.items()):
                method = "duplicate"
            else:
                raise PassError(
                    f"this model normalises its stream with LayerNorm, which is exact only "
                    f"under duplication (a multiple of {min(olds.values())}); "
                    f"{min(news.values())} is not; pass method=approximate to zero-pad anyway "
                    "(not exact)"
                )
        mode = {"zero": "zero", "approximate": "zero", "duplicate": "tile"}[method]
        growth = Growth(
            news,
            {atom: mode for atom in news},
            approximate=method == "approximate",
            seed=self.opts["seed"],
        )
        out, maps = grow(graph, growth)
        out["method"] = method
        remarks = []
        for node, (norm, f) in out.get("norm_scales", {}).items():
            remarks.append(
                Remark(
                    node, f"{norm} normalises the padded stream with no gain: its output × {f:g}"
                )
            )
        if "head_scale" in out:
            node, s = out["head_scale"]
            remarks.append(
                Remark(
                    node,
                    f"the tied head reads duplicated features and no plain norm gain comes "
                    f"right before it: its input is scaled by {s:g}",
                )
            )
        return PassResult(changed=news != olds, remarks=remarks, details=out, tensor_maps=maps)
