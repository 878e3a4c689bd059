"""Train a tiny GPT on Shakespeare bytes after an archfx rewrite, and watch what the rewrite does.

    python examples/train_shakespeare.py [--pipeline 'altup(k=2)'] [--steps 200]

The model is a 2-layer GPT-2 built from a config (byte vocabulary), captured, rewritten and
trained as a plain nn.Module (the GraphModule). For residual schemes the script also reports
how far the stream's blocks have drifted apart (they start identical).
"""

import argparse

import torch
import transformers as tf

from archfx.ir import capture
from archfx.passes import Pipeline
from archfx.passes.io.zoo.text import batches, byte_tokens, shakespeare


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipeline", default="altup(k=2)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    config = tf.GPT2Config(
        vocab_size=256,
        n_positions=args.seq,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = tf.GPT2LMHeadModel(config)
    example = {"input_ids": torch.randint(0, 256, (2, 8)), "use_cache": False}
    graph = Pipeline.parse(args.pipeline).run(capture(model, example)).graph

    tokens = byte_tokens(shakespeare(("hamlet", "macbeth")))
    data = batches(tokens, args.batch, args.seq, torch.Generator().manual_seed(args.seed))
    opt = torch.optim.AdamW(graph.gm.parameters(), lr=args.lr)
    losses = []
    for step in range(args.steps):
        x, y = next(data)
        logits = graph(x)[0]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}")

    states = [n for n in graph.gm.graph.nodes if "archfx_state" in n.meta]
    drift = [float((v[0] - v[1:]).abs().max()) for v in graph.probe(states)] if states else []
    if drift:
        print(
            "largest difference between stream blocks, per layer: "
            + ", ".join(f"{d:.3f}" for d in drift)
        )
    return {"losses": losses, "drift": drift}


if __name__ == "__main__":
    main()
