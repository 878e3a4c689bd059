"""onnxruntime-genai's configuration for an exported decode form (passes/io/generate.py).

`write_genai_config(decoder, onnx_path, model)` writes `genai_config.json` beside the ONNX
file so that `onnxruntime_genai.Model(directory)` runs it with its own generation loop
(search, sampling, key/value cache management). The model type is genai's generic
decoder-only one ("decoder"): the file is read through the names it declares, which are the
decode form's (`input_ids`, `attention_mask`, `position_ids`, `past_key_values.%d.key/value`
in; `logits`, `present.%d.key/value` out). genai grows the cache by concatenation
(`past_present_share_buffer: false`), as the decode form's `present` outputs do.

The sizes are the decode form's, not the Hugging Face configuration's (a pipeline may have
changed them): the cached sites counted and their key/value heads and head size read from
the past inputs, the vocabulary from the logits; the hidden size and the query heads from
the graph's recognised structure where it has one. Token ids come from the model's
generation configuration.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from archfx.ir import AnalysisError, Graph, PassError

from ..engines.decode import PAST, PRESENT, is_decoder

CONFIG = "genai_config.json"
MODEL_TYPE = "decoder"  # genai's generic decoder-only type (ModelType::IsLLM)


def write_genai_config(
    decoder_graph: Graph,
    onnx_path: str | Path,
    model,
    tokenizer=None,
    *,
    context_length: int | None = None,
) -> Path:
    """Write `genai_config.json` (and the tokenizer's files, when given) into the directory
    of `onnx_path`, the decode form `decoder_graph` exported (passes/io/generate.py's
    `onnx_decoder`). `model`: the Hugging Face model it came from (its generation config
    gives the special tokens, its config the context length). Returns the config's path."""
    if not is_decoder(decoder_graph):
        raise PassError(
            "write_genai_config needs a graph in decode form (passes/engines/decode.py)"
        )
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise PassError(f"{onnx_path}: no such ONNX file")
    names = decoder_graph.inputs.names
    outputs = decoder_graph.output_names
    count = sum(n.startswith(f"{PAST}.") and n.endswith(".key") for n in names)
    expected_in = ["input_ids", "attention_mask", "position_ids"]
    for i in range(count):
        expected_in += [f"{PAST}.{i}.key", f"{PAST}.{i}.value"]
    expected_out = [f"{PRESENT}.{i}.{p}" for i in range(count) for p in ("key", "value")]
    if names != expected_in or outputs[0] != "logits" or outputs[1:] != expected_out:
        raise PassError(
            "genai reads the decode form through its names: inputs input_ids, attention_mask, "
            "position_ids, past_key_values.{i}.key/.value; outputs logits, present.{i}.key/"
            f".value; this graph has {names} -> {outputs}"
        )
    _check_file(onnx_path, expected_in, ["logits", *expected_out])

    pasts = decoder_graph.inputs.tensors[3:]
    banks = {(int(t.shape[1]), int(t.shape[-1])) for t in pasts if t.dim() == 4}
    if len(banks) != 1 or any(t.dim() != 4 for t in pasts):
        shapes = sorted({tuple(t.shape[1:]) for t in pasts})
        raise PassError(
            "genai keeps one [batch, kv_heads, length, head_size] cache shape for every layer; "
            f"this decode form's past inputs are {shapes}"
        )
    kv_heads, head_size = banks.pop()
    out = next(n for n in decoder_graph.gm.graph.nodes if n.op == "output")
    vocab = int(out.args[0][0].meta["val"].shape[-1])
    hidden, heads = _widths(decoder_graph, model, kv_heads)

    hf = getattr(model, "config", None)
    gen = getattr(model, "generation_config", None)
    bos = _token(gen, hf, "bos_token_id")
    eos = _token(gen, hf, "eos_token_id")
    pad = _token(gen, hf, "pad_token_id")
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    if context_length is None:
        context_length = int(getattr(hf, "max_position_embeddings", None) or 2048)

    config = {
        "model": {
            "bos_token_id": bos,
            "context_length": context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": onnx_path.name,
                "head_size": head_size,
                "hidden_size": hidden,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": f"{PAST}.%d.key",
                    "past_value_names": f"{PAST}.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": f"{PRESENT}.%d.key",
                    "present_value_names": f"{PRESENT}.%d.value",
                },
                "num_attention_heads": heads,
                "num_hidden_layers": count,
                "num_key_value_heads": kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": MODEL_TYPE,
            "vocab_size": vocab,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context_length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }
    path = onnx_path.parent / CONFIG
    path.write_text(json.dumps(config, indent=4) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(onnx_path.parent)
    return path


def _check_file(path: Path, inputs: list[str], outputs: list[str]) -> None:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    got_in = [i.name for i in proto.graph.input]
    got_out = [o.name for o in proto.graph.output]
    if got_in != inputs or got_out != outputs:
        raise PassError(
            f"{path}: its inputs {got_in} and outputs {got_out} are not the decode form's "
            f"({inputs} -> {outputs})"
        )


def _widths(graph: Graph, model, kv_heads: int) -> tuple[int, int]:
    """(hidden size, query heads): the recognised structure's, else the model config's."""
    hf = getattr(model, "config", None)
    hidden = getattr(hf, "hidden_size", None)
    heads = getattr(hf, "num_attention_heads", None)
    with contextlib.suppress(AnalysisError):
        st = graph.structure
        hidden = st.hidden_size
        attention = [
            r.attention
            for s in st.stacks
            for b in s.blocks
            for r in b.residuals
            if r.attention is not None
        ]
        if attention:
            heads = attention[0].heads
    if hidden is None:
        raise PassError("the hidden size is neither recognised in the graph nor in model.config")
    return int(hidden), int(heads if heads is not None else kv_heads)


def _token(gen, hf, name: str):
    for source in (gen, hf):
        value = getattr(source, name, None) if source is not None else None
        if value is not None:
            return [int(v) for v in value] if isinstance(value, (list, tuple)) else int(value)
    return None
