"""onnxruntime-genai runs the exported decode form (passes/io/genai.py): with the written
genai_config.json its own generation loop gives transformers' greedy tokens on the original
model, a prompt at a time and as one right-padded batch (genai's padding convention)."""

import json

import numpy as np
import onnxruntime_genai as og
import pytest
import torch

from archfx.ir import PassError, capture
from archfx.passes import Pipeline
from archfx.passes.engines.decode import decode_form
from archfx.passes.io.genai import write_genai_config
from archfx.passes.io.generate import onnx_decoder

from .helpers import model

PROMPTS = [[5, 17, 33, 2, 9], [44, 12, 7], [3, 3, 90, 100, 21, 8, 1]]
NEW = 16


def reference(m, prompt: list[int]) -> list[int]:
    """transformers' greedy `generate` on the original model (stops after end-of-sequence)."""
    with torch.no_grad():
        out = m.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False)
    return out[0, len(prompt) :].tolist()


def genai_generate(directory, prompts: list[list[int]], pad: int) -> list[list[int]]:
    """onnxruntime-genai's greedy search, the prompts right-padded with `pad` into one batch;
    each row's new tokens up to its end-of-sequence (genai pads finished rows)."""
    gm = og.Model(str(directory))
    n = max(len(p) for p in prompts)
    ids = np.full((len(prompts), n), pad, np.int32)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    params = og.GeneratorParams(gm)
    params.set_search_options(do_sample=False, max_length=n + NEW, batch_size=len(prompts))
    gen = og.Generator(gm, params)
    gen.append_tokens(ids)
    while not gen.is_done():
        gen.generate_next_token()
    return [[int(t) for t in gen.get_sequence(i)][n:] for i in range(len(prompts))]


def trimmed(row: list[int], eos: int, length: int) -> list[int]:
    end = next((i + 1 for i, t in enumerate(row) if t == eos), len(row))
    return row[: min(end, length)]


@pytest.mark.parametrize(
    "pipeline",
    [
        None,
        pytest.param("altup(k=2)", marks=pytest.mark.slow),
        pytest.param("add-layers(n=1)", marks=pytest.mark.slow),
    ],
)
def test_genai_greedy_tokens_equal_transformers_generate(pipeline, tmp_path):
    m = model("tiny-llama").eval()
    graph = capture(m)
    if pipeline:
        graph = Pipeline.parse(pipeline).run(graph).graph
    decoder = decode_form(graph)
    path = onnx_decoder(decoder, tmp_path / "model.onnx")
    config = json.loads(write_genai_config(decoder, path, m).read_text())

    layers = sum(n.endswith(".key") for n in decoder.inputs.names)
    assert config["model"]["type"] == "decoder"
    assert config["model"]["decoder"]["num_hidden_layers"] == layers
    assert config["model"]["decoder"]["num_key_value_heads"] == m.config.num_key_value_heads
    assert config["model"]["vocab_size"] == m.config.vocab_size

    eos = m.generation_config.eos_token_id
    pad = config["model"]["pad_token_id"]
    refs = [reference(m, p) for p in PROMPTS]
    for p, ref in zip(PROMPTS, refs, strict=True):
        assert trimmed(genai_generate(tmp_path, [p], pad)[0], eos, NEW) == ref
    batch = genai_generate(tmp_path, PROMPTS, pad)
    assert [trimmed(row, eos, NEW) for row in batch] == refs


def test_write_genai_config_needs_a_decode_form(tmp_path):
    m = model("tiny-llama").eval()
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(PassError, match="decode form"):
        write_genai_config(capture(m), tmp_path / "model.onnx", m)
