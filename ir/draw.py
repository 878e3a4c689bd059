"""A picture of a Structure: embeddings, each block's residual sites in order, final norms, head."""

from __future__ import annotations

from pathlib import Path

from .errors import ArchfxError
from .structure import Structure

COLORS = {
    "attention": "#4C72B0",
    "cross_attention": "#8172B3",
    "mlp": "#55A868",
    "parallel": "#C44E52",
    "other": "#8C8C8C",
}
FORMATS = (".svg", ".png")


def check_path(path: str | Path) -> Path:
    """The picture's path, if its suffix names a format archfx draws."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise ArchfxError(f"cannot draw to {path.name}: use a .svg or .png file name")
    return path


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw(structure: Structure, path: str | Path, title: str | None = None) -> Path:
    """Draw the block structure to an SVG or PNG file (chosen by the suffix)."""
    path = check_path(path)
    plt = pyplot()
    from matplotlib.patches import FancyBboxPatch

    rows = []  # (label, [(text, color)])
    rows.append(
        ("embeddings", [(f"{e.kind} {e.num}×{e.dim}", "#DD8452") for e in structure.embeddings])
    )
    for stack in structure.stacks:
        for b in stack.blocks:
            cells = []
            for r in b.residuals:
                text = r.kind.replace("_", "-")
                if r.attention is not None:
                    a = r.attention
                    text += f"\n{a.heads}h/{a.kv_heads}kv×{a.head_dim}" + (
                        " rope" if a.rope else ""
                    )
                if r.mlp is not None and r.kind != "attention":
                    text += f"\n{r.mlp.hidden}{' gated' if r.mlp.gated else ''} {r.mlp.activation or ''}"
                norm = r.norm.kind if r.norm else "no norm"
                text += f"\n{r.placement} {norm}"
                cells.append((text, COLORS.get(r.kind, COLORS["other"])))
            rows.append((b.path, cells))
        if stack.final_norm is not None:
            rows.append((f"{stack.path} final", [(stack.final_norm.kind, "#937860")]))
    if structure.head is not None:
        h = structure.head
        rows.append(
            (
                "head",
                [
                    (
                        f"{h.linear.in_features}→{h.linear.out_features}{' tied' if h.tied else ''}",
                        "#DA8BC3",
                    )
                ],
            )
        )
    width = max(len(c) for _, c in rows) or 1
    fig_h = 0.75 * len(rows) + 0.8
    fig, ax = plt.subplots(figsize=(3.0 + 2.6 * width, fig_h))
    ax.set_xlim(0, 2.4 + 2.6 * width)
    ax.set_ylim(0, len(rows))
    ax.axis("off")
    for i, (label, cells) in enumerate(rows):
        y = len(rows) - i - 1
        ax.text(2.2, y + 0.45, label, ha="right", va="center", fontsize=8, family="monospace")
        for j, (text, color) in enumerate(cells):
            x = 2.4 + 2.6 * j
            ax.add_patch(
                FancyBboxPatch(
                    (x, y + 0.08),
                    2.4,
                    0.74,
                    boxstyle="round,pad=0.02",
                    fc=color,
                    ec="none",
                    alpha=0.85,
                )
            )
            ax.text(x + 1.2, y + 0.45, text, ha="center", va="center", fontsize=6.5, color="white")
    ax.set_title(
        title or f"{len(structure.blocks)} blocks, hidden {structure.hidden_size}", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def draw_memory(layers, path: str | Path, title: str | None = None, sample: int = 0) -> Path:
    """Draw each memory's read weightings (one row per attention site, one panel per read
    head: queries × memory slots) for batch element `sample`, to an SVG or PNG file."""
    path = check_path(path)
    plt = pyplot()
    if not layers:
        raise ArchfxError("no memories to draw")
    heads = max(m.weightings.shape[-3] for m in layers)
    fig, axes = plt.subplots(
        len(layers),
        heads,
        figsize=(1.6 * heads + 1.2, 1.6 * len(layers) + 0.6),
        squeeze=False,
    )
    for row, m in zip(axes, layers, strict=True):
        w = m.weightings[sample].float().cpu()
        for h, ax in enumerate(row):
            ax.set_xticks([])
            ax.set_yticks([])
            if h >= w.shape[0]:
                ax.axis("off")
                continue
            ax.imshow(w[h].numpy(), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
            if h == 0:
                label = m.path + (" (cross)" if m.cross else "")
                ax.set_ylabel(f"{label}\nqueries", fontsize=7)
            if m is layers[-1]:
                ax.set_xlabel(f"head {h}: slots", fontsize=7)
    fig.suptitle(title or "read weightings", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
