"""Capture: derived inputs, dynamic shapes, flat graphs, clear errors, no mutation."""

import pytest
import torch

from archfx.ir import CaptureError, capture
from archfx.passes.io.zoo import build


def test_derived_inputs_and_dynamic_dims():
    g = capture(build("tiny-t5"))
    assert g.inputs.names == ["input_ids", "decoder_input_ids"]
    assert g.output_names == ["logits", "encoder_last_hidden_state"]
    second = g.second_inputs()
    assert [t.shape for t in second.tensors] != [t.shape for t in g.inputs.tensors]
    assert all(int(t.max()) < 128 for t in second.tensors)  # token ids stay in the vocabulary


def test_pixel_inputs():
    g = capture(build("tiny-vit"))
    assert g.inputs.names == ["pixel_values"] and g.inputs.tensors[0].shape[1:] == (3, 32, 32)


class FxFriendly(torch.nn.Module):
    """A plain-Python Transformer with no shape-dependent Python: torch.fx can trace it."""

    def __init__(self, d=32, heads=4, layers=2, vocab=50):
        super().__init__()
        self.heads = heads
        self.emb = torch.nn.Embedding(vocab, d)
        self.blocks = torch.nn.ModuleList(
            torch.nn.ModuleDict(
                {
                    "n1": torch.nn.LayerNorm(d),
                    "q": torch.nn.Linear(d, d),
                    "k": torch.nn.Linear(d, d),
                    "v": torch.nn.Linear(d, d),
                    "o": torch.nn.Linear(d, d),
                    "n2": torch.nn.LayerNorm(d),
                    "up": torch.nn.Linear(d, 4 * d),
                    "down": torch.nn.Linear(4 * d, d),
                }
            )
            for _ in range(layers)
        )
        self.norm = torch.nn.LayerNorm(d)

    def forward(self, ids):
        x = self.emb(ids)
        for b in self.blocks:
            h = b["n1"](x)
            q, k, v = (b[p](h).unflatten(-1, (self.heads, -1)).transpose(1, 2) for p in "qkv")
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + b["o"](a.transpose(1, 2).flatten(-2))
            x = x + b["down"](torch.nn.functional.gelu(b["up"](b["n2"](x))))
        return self.norm(x)


def test_fx_method_on_a_hand_written_model():
    g = capture(FxFriendly(), (torch.randint(0, 50, (2, 8)),), method="fx")
    assert g.provenance["method"] == "fx" and len(g.structure.blocks) == 2
    assert g.structure.blocks[0].attention.heads == 4


def test_fx_method_refuses_untraceable_python_with_the_reason():
    with pytest.raises(CaptureError, match="torch.fx could not trace GPT.*use method='export'"):
        capture(build("nanogpt"), method="fx")  # slices a buffer by a traced size


class Branchy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.lin(x)
        return x


def test_capture_error_names_the_construct_and_what_to_try():
    with pytest.raises(CaptureError) as info:
        capture(Branchy(), (torch.randn(2, 4),))
    msg = str(info.value)
    assert "Branchy" in msg and "test_capture.py" in msg and "branches on tensor values" in msg


def test_bad_arguments():
    with pytest.raises(CaptureError, match="unknown capture method"):
        capture(build("nanogpt"), method="jit")
    with pytest.raises(CaptureError, match="expected a torch.nn.Module"):
        capture(lambda x: x)
    with pytest.raises(CaptureError, match="cannot derive example inputs"):
        capture(torch.nn.Sequential(torch.nn.ReLU()))


def test_training_mode_restored_and_weights_owned():
    model = build("tiny-llama").train()
    g = capture(model)
    assert model.training
    emb = model.model.embed_tokens.weight
    assert all(p.data_ptr() != emb.data_ptr() for p in g.gm.parameters())
