"""Text generation with a rewritten causal language model, in PyTorch (eager, or compiled by
torch.compile) or ONNX Runtime.

`generate(graph, prompts, …)` decodes with the graph's decode form (passes/engines/decode.py): the
prompts, left-padded into one batch, are prefilled in one call; each new token is one call
that reads the key/value cache the earlier calls wrote. Positions count the tokens that are
not padding, as transformers' `generate` counts them, so greedy decoding gives its tokens.
Greedy unless a temperature is given; then temperature, top-k and top-p are transformers'
logits warpers, sampled with a seeded generator. A sequence that emits an end-of-sequence
token is finished (its later positions are padding); generation stops when all are.

`compile` runs the same decode form through torch.compile (Inductor, dynamic shapes): the
first calls compile it (the prefill, the first one-token step and the first growing cache:
a few compilations, seconds each on small models, minutes on large ones), later calls reuse it.
Inductor fuses the element-wise ops a residual scheme adds per site, which eager PyTorch
dispatches one by one.

ONNX Runtime keeps the cache on its side: each call's `present.*` outputs are bound as the
next call's `past_key_values.*` inputs (I/O binding), never copied through Python.
"""

from __future__ import annotations

import copy
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from archfx.ir import Graph, PassError

from ..engines.decode import (
    PAST,
    MemoryStream,
    check_one_token,
    decode_form,
    eager,
    last_position,
    one_token_sites,
    positions,
)


@dataclass
class Generation:
    new_tokens: list[list[int]]  # generated ids only, each sequence up to its end-of-sequence
    text: list[str] | None  # decoded new tokens, when a tokenizer is given
    prefill_seconds: float
    decode_tokens_per_second: float  # generated tokens (all sequences) per second after prefill
    runtime: str

    def to_json(self) -> dict:
        out = {
            "new_tokens": self.new_tokens,
            "prefill_seconds": round(self.prefill_seconds, 4),
            "decode_tokens_per_second": round(self.decode_tokens_per_second, 3),
            "runtime": self.runtime,
        }
        if self.text is not None:
            out["text"] = self.text
        return out


RUNTIMES = ("torch", "compile", "onnx")


class Session:
    """A causal language model ready to generate: its decode form (built and checked once; its
    outputs at the last position only, which is all generation reads) in PyTorch (`torch`:
    eager, and `one_token`: the graph with the passes' one-token kernels for steps of one token
    of one sequence, when some node has one — checked here; `compile`: torch.compile of the
    eager graph), or exported to ONNX (`onnx`: the file; by default one of the Session's own,
    deleted with it; checked against PyTorch) and loaded in ONNX Runtime with `threads`
    intra-op threads."""

    def __init__(
        self,
        graph: Graph,
        runtime: str = "torch",
        *,
        onnx: str | Path | None = None,
        threads: int | None = None,
    ):
        if runtime not in RUNTIMES:
            raise PassError(f"unknown runtime {runtime!r}: {', '.join(RUNTIMES)}")
        self.runtime = runtime
        form = decode_form(graph)
        try:  # generation reads the last position's logits only
            self.decoder = last_position(form)
        except PassError as exc:
            warnings.warn(f"{exc}: the prefill computes every position's outputs", stacklevel=2)
            self.decoder = form
        self.onnx = self.ort = self.compiled = self.one_token = None
        if runtime != "onnx":
            self.eager = eager(self.decoder)
            if runtime == "compile":
                self.compiled = torch.compile(self.eager.gm, dynamic=True)
            else:
                single = eager(self.decoder, one_token=True)
                if one_token_sites(single):
                    check_one_token(self.eager, single)
                    self.one_token = single
        else:
            from archfx.ir.lower import ort_session

            if onnx is None:  # a file of the Session's own, deleted with it
                self._tmp = tempfile.TemporaryDirectory(prefix="archfx-decoder-")
                onnx = Path(self._tmp.name) / "decoder.onnx"
            self.onnx = onnx_decoder(self.decoder, onnx)
            self.ort = ort_session(self.onnx, threads=threads)

    def with_threads(self, threads: int | None, *, spinning: bool = True) -> Session:
        """The same decode form (and ONNX file) in a new ONNX Runtime session (`spinning`:
        `archfx.ir.lower.ort_session`'s)."""
        other = copy.copy(self)
        if self.onnx is not None:
            from archfx.ir.lower import ort_session

            other.ort = ort_session(self.onnx, threads=threads, spinning=spinning)
        return other

    def stream(self):
        """A fresh cache: a callable (new tokens, their attention mask) → last logits."""
        if self.ort is None:
            return _TorchStep(self.eager, self.compiled, self.one_token)
        return _OrtStep(self.ort, self.decoder.device)


def generate(
    model: Graph | Session,
    prompts: list[list[int]],
    *,
    max_new_tokens: int = 32,
    runtime: str | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    tokenizer=None,
    onnx: str | Path | None = None,
    on_tokens: Callable[[list[int]], None] | None = None,
) -> Generation:
    """Generate up to `max_new_tokens` after each prompt (token id lists, one batch).

    `model`: a causal language model, captured and rewritten by any pipeline (or already in
    decode form), run with `runtime` ("torch", the default; "compile": torch.compile of the
    decode form; or "onnx": exported to `onnx`, a temporary file by default); or a `Session`
    prepared once for many generations (which fixes the runtime). `on_tokens` receives each step's new ids (one per sequence)."""
    if max_new_tokens < 1:
        raise PassError("max_new_tokens must be at least 1")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise PassError("every prompt needs at least one token")
    if temperature is not None and temperature <= 0:
        raise PassError("temperature must be positive (leave it out for greedy decoding)")
    choose = _chooser(temperature, top_k, top_p, seed)
    if isinstance(model, Session):
        if runtime not in (None, model.runtime) or onnx is not None:
            raise PassError(
                f"this Session runs on {model.runtime}: runtime and onnx are the Session's"
            )
        session = model
    else:
        session = Session(model, runtime or "torch", onnx=onnx)
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    pad = pad_token_id if pad_token_id is not None else (min(eos) if eos else 0)
    ids, mask = left_padded(prompts, pad)
    device = session.decoder.device
    step = session.stream()
    seqs = ids.to(device)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    new: list[torch.Tensor] = []
    t0 = time.perf_counter()
    logits = step(seqs, mask.to(device))
    prefill = time.perf_counter() - t0
    t1, calls = time.perf_counter(), 0
    while True:
        token = choose(seqs, logits)
        token = torch.where(finished, torch.full_like(token, pad), token)
        new.append(token)
        seqs = torch.cat([seqs, token[:, None]], 1)
        finished |= torch.isin(token, torch.tensor(sorted(eos), device=device, dtype=token.dtype))
        if on_tokens is not None:
            on_tokens(token.tolist())
        if len(new) == max_new_tokens or bool(finished.all()):
            break
        logits = step(token[:, None], torch.ones_like(token[:, None]))
        calls += 1
    elapsed = time.perf_counter() - t1
    out = _trimmed(torch.stack(new, 1).tolist(), eos)
    return Generation(
        new_tokens=out,
        text=[tokenizer.decode(t, skip_special_tokens=True) for t in out] if tokenizer else None,
        prefill_seconds=prefill,
        decode_tokens_per_second=calls * len(prompts) / elapsed if calls else 0.0,
        runtime=session.runtime,
    )


def left_padded(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of the prompts as one left-padded batch."""
    n = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), n), pad, dtype=torch.int64)
    mask = torch.zeros((len(prompts), n), dtype=torch.int64)
    for i, p in enumerate(prompts):
        ids[i, n - len(p) :] = torch.tensor(p, dtype=torch.int64)
        mask[i, n - len(p) :] = 1
    return ids, mask


def onnx_decoder(decoder: Graph, path: str | Path) -> Path:
    """The decode form exported to ONNX at `path` (checked against PyTorch)."""
    from archfx.ir.lower import to_onnx

    to_onnx(decoder, path)
    return Path(path)


def _trimmed(rows: list[list[int]], eos: set[int]) -> list[list[int]]:
    out = []
    for row in rows:
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        out.append(row[:end])
    return out


def _chooser(temperature, top_k, top_p, seed):
    """next token ← logits [batch, vocab]: argmax, or a sample after transformers' warpers."""
    if temperature is None:
        if top_k is not None or top_p is not None:
            raise PassError("top_k and top_p apply to sampling: give a temperature too")
        return lambda seqs, logits: logits.argmax(-1)
    from transformers import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k is not None:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None:
        warpers.append(TopPLogitsWarper(top_p))
    gen = torch.Generator().manual_seed(0 if seed is None else seed)

    def sample(seqs, logits):
        probs = torch.softmax(warpers(seqs, logits.float()), -1)
        return torch.multinomial(probs.cpu(), 1, generator=gen)[:, 0].to(logits.device)

    return sample


class _TorchStep:
    """One call of the decode form in PyTorch: the last position's logits; a step of one token
    of one sequence runs the graph with one-token kernels when there is one."""

    def __init__(self, decoder: Graph, compiled: Callable | None, one_token: Graph | None):
        general = decoder.gm if compiled is None else compiled
        if one_token is not None:
            single = one_token.gm

            def module(ids, *rest):
                return (single if ids.shape == (1, 1) else general)(ids, *rest)

        else:
            module = general
        self.stream = MemoryStream(decoder, module=module)

    def __call__(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.stream(tokens, mask)[0][:, -1]


class _OrtStep:
    """One call of the exported decode form in ONNX Runtime with I/O binding: the cache
    outputs stay ONNX Runtime's values and are bound as the next call's inputs."""

    def __init__(self, session, device):
        import onnxruntime as ort

        self.ort = ort
        self.session = session
        self.device = device
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.past = [n for n in self.inputs if n.startswith(f"{PAST}.")]
        self.where = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        self.cache: list | None = None
        self.mask: torch.Tensor | None = None

    def __call__(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b = tokens.shape[0]
        if self.cache is None:
            args = {a.name: a for a in self.session.get_inputs()}
            self.cache = [self._empty(b, args[n]) for n in self.past]
            self.mask = torch.zeros(b, 0, dtype=torch.int64)
        self.mask = torch.cat([self.mask, mask.cpu().to(torch.int64)], 1)
        io = self.session.io_binding()
        feed = {
            "input_ids": tokens.cpu().numpy(),
            "attention_mask": self.mask.numpy(),
            "position_ids": positions(self.mask, tokens.shape[1]).numpy(),
        }
        for name, value in feed.items():
            io.bind_cpu_input(name, np.ascontiguousarray(value))
        for name, value in zip(self.past, self.cache, strict=True):
            io.bind_ortvalue_input(name, value)
        for name in self.outputs:
            io.bind_output(name, self.where)
        self.session.run_with_iobinding(io)
        values = io.get_outputs()
        self.cache = list(values[-len(self.past) :])
        logits = values[0].numpy()[:, -1]
        return torch.from_numpy(np.array(logits)).to(self.device)

    def _empty(self, b: int, arg):
        shape = [b if i == 0 else (0 if i == 2 else d) for i, d in enumerate(arg.shape)]
        dtype = np.float64 if "double" in arg.type else np.float32
        return self.ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype), self.where)
