"""A tiny random-config transformers LlamaForCausalLM with attn_implementation="sdpa" under patch_sdpa(), against
the same weights with attn_implementation="eager" (the emulator on CPU; no download).

An unpadded batch reaches SDPA with is_causal and seqlen_q == seqlen_k; a left-padded batch brings a (B, 1, L, S)
bool mask with fully masked query rows at the padding. The kernels serve both (strict mode).
"""

from __future__ import annotations

import copy

import pytest
import torch

import flash_attn_metal
from flash_attn_metal import patch_sdpa, routing

transformers = pytest.importorskip("transformers")

@pytest.fixture(autouse=True)
def emulator(monkeypatch):
    monkeypatch.setenv("FLASH_ATTN_METAL_BACKEND", "emulator")
    monkeypatch.setattr(routing, "_warned", set())  # each reason warns once per process
    flash_attn_metal.reset_stats()


@pytest.fixture(scope="module")
def models():
    """(sdpa, eager): one random tiny Llama (GQA: 4 query heads over 2 key/value heads, head dim 32) twice."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    sdpa = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
    eager = copy.deepcopy(sdpa)
    eager.set_attn_implementation("eager")
    assert (sdpa.config._attn_implementation, eager.config._attn_implementation) == ("sdpa", "eager")
    return sdpa, eager


def batch(left_padding: int):
    torch.manual_seed(1)
    input_ids = torch.randint(0, 97, (2, 16))
    attention_mask = torch.ones(2, 16, dtype=torch.long)
    attention_mask[1, :left_padding] = 0
    labels = input_ids.clone()
    labels[1, : left_padding + 1] = -100  # the loss reads logits t for label t + 1: no padding row's logits
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def logits_and_grads(model, inputs):
    model.zero_grad()
    result = model(**inputs)
    result.loss.backward()
    return result.logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def check_against_eager(models, left_padding: int):
    sdpa, eager = models
    inputs = batch(left_padding)
    with patch_sdpa():
        logits, grads = logits_and_grads(sdpa, inputs)
    counts = flash_attn_metal.stats()
    expected_logits, expected_grads = logits_and_grads(eager, inputs)
    real = inputs["attention_mask"].bool()  # padding rows differ by design (eager's mask leaves them uniform)
    assert torch.allclose(logits[real], expected_logits[real], atol=1e-4)
    for name, g in grads.items():
        assert torch.allclose(g, expected_grads[name], atol=1e-4), name
    return counts


def test_unpadded_batch_runs_on_the_kernels(models, monkeypatch):
    monkeypatch.setenv("FLASH_ATTN_METAL_STRICT", "1")
    counts = check_against_eager(models, left_padding=0)
    kernels = counts["launches"]
    assert any(name.startswith("attention_forward") for name in kernels)
    assert any(name.startswith("attention_backward") for name in kernels)


def test_left_padded_batch_on_the_kernels(models, monkeypatch):
    monkeypatch.setenv("FLASH_ATTN_METAL_STRICT", "1")
    counts = check_against_eager(models, left_padding=5)
    assert any(name.startswith("attention_forward") and "_bool_mask" in name for name in counts["launches"])


def test_a_wrong_attention_would_be_caught(models):
    """Negative control: without the padding mask the padded sequence's logits differ from eager's."""
    sdpa, eager = models
    inputs = batch(left_padding=5)
    with patch_sdpa():
        logits = sdpa(input_ids=inputs["input_ids"]).logits.detach()
    expected = eager(**inputs).logits.detach()
    real = inputs["attention_mask"].bool()
    assert torch.allclose(logits[0], expected[0], atol=1e-4)
    assert not torch.allclose(logits[real], expected[real], atol=1e-2)
