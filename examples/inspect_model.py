"""Capture a model and print what archfx recognises in it.

python examples/inspect_model.py [BUILTIN] [--draw structure.png]
"""

import argparse
import json

from archfx.ir import capture
from archfx.ir.draw import draw
from archfx.passes.io.zoo import build


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="tiny-llama", help="a built-in model name")
    ap.add_argument("--draw", help="write a picture of the block structure (.png or .svg)")
    args = ap.parse_args(argv)

    model = build(args.model)
    graph = capture(model)  # torch.export; example inputs derived from the config
    structure = graph.structure  # cached analysis
    print(f"{len(structure.blocks)} blocks, hidden size {structure.hidden_size}")
    for block in structure.blocks:
        sites = ", ".join(f"{r.kind}({r.placement})" for r in block.residuals)
        att = block.attention
        print(
            f"  {block.path}: {sites}; heads {att.heads}/{att.kv_heads}×{att.head_dim}; mlp {block.mlp.hidden}"
        )
    print(json.dumps(structure.to_json()["head"]))
    if args.draw:
        draw(structure, args.draw)
        print(f"drew {args.draw}")
    return structure


if __name__ == "__main__":
    main()
