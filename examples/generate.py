"""Generate text with a rewritten model: rewrite, then decode with a key/value cache in PyTorch
and in ONNX Runtime, and check the tokens against transformers' `generate` on the original.

    python examples/generate.py                                   # SmolLM2, altup(k=2)
    python examples/generate.py tiny-llama --pipeline 'ddl(dv=1,value=compat)' --ids 5,17,33
"""

from __future__ import annotations

import argparse

import torch

from archfx.ir import capture
from archfx.passes import Pipeline
from archfx.passes.io.generate import Session, generate, left_padded
from archfx.passes.io.models import load, tokenizer


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default="smollm2")
    p.add_argument("--pipeline", default="altup(k=2)")
    p.add_argument("--prompt", nargs="+", default=["The capital of France is", "Once upon a time"])
    p.add_argument(
        "--ids", help="token ids instead of prompts: 1,2,3;4,5 (models with no tokenizer)"
    )
    p.add_argument("--new", type=int, default=24)
    args = p.parse_args(argv)

    loaded = load(args.model)
    model = loaded.model
    tok = tokenizer(loaded)
    if args.ids:
        prompts = [[int(t) for t in row.split(",")] for row in args.ids.split(";")]
    else:
        prompts = [tok(text).input_ids for text in args.prompt]
    graph = Pipeline.parse(args.pipeline).run(capture(model)).graph  # the rewritten model

    eos = model.generation_config.eos_token_id
    pad = model.generation_config.pad_token_id or (tok.pad_token_id if tok else 0) or 0
    options = dict(max_new_tokens=args.new, eos_token_id=eos, pad_token_id=pad, tokenizer=tok)
    out = {}
    for runtime in ("torch", "onnx"):
        session = Session(graph, runtime)  # decode form built and checked (and exported) once
        result = generate(session, prompts, **options)
        out[runtime] = result
        print(f"{runtime}: {result.decode_tokens_per_second:.1f} tokens/s after prefill")
        for i, new in enumerate(result.new_tokens):
            print(f"  [{i}]", repr(result.text[i]) if result.text else new)

    ids, mask = left_padded(prompts, pad)  # the same batch for transformers, on the original
    with torch.no_grad():
        ref = model.generate(
            ids, attention_mask=mask, max_new_tokens=args.new, do_sample=False, pad_token_id=pad
        )[:, ids.shape[1] :].tolist()
    same = {
        rt: r.new_tokens == [row[: len(n)] for row, n in zip(ref, r.new_tokens, strict=True)]
        for rt, r in out.items()
    }
    print("same tokens as transformers' generate on the original model:", same)
    return {"same": same, "new_tokens": out["torch"].new_tokens}


if __name__ == "__main__":
    main()
