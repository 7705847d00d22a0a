"""transformers' own tiny random-config models run with `register()`'s attention (the kernels, through the
emulator, strict) against `attn_implementation="eager"`: padded batches, packed sequences, greedy generation,
static caches and loss gradients. All fp32 with head dim 32, so a few kernel specs serve every test."""

from __future__ import annotations


import pytest
import torch

import flash_attn_metal

transformers = pytest.importorskip("transformers")
from transformers import AttentionInterface  # noqa: E402

from flash_attn_metal.integrations import transformers as integration  # noqa: E402

TOL = 1e-4  # fp32 logits through two layers: the kernels match eager to ~1e-6


pytestmark = pytest.mark.usefixtures("emulator_strict")


def tiny(kind: str):
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=32, max_position_embeddings=64)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif kind == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=4))
    elif kind == "gemma2":  # alternating sliding (window 4) and global layers, logits softcapped at 50 in both
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**common, sliding_window=4,
                                                                         query_pre_attn_scalar=32))
    else:
        raise ValueError(kind)
    return model.eval()


def logits(model, implementation: str, **inputs) -> torch.Tensor:
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model(**inputs).logits


def left_padded_batch():
    torch.manual_seed(1)
    ids = torch.randint(3, 64, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :6] = 0
    return ids, mask


def test_register_returns_a_usable_name_without_flash():
    name = integration.register()
    assert "flash" not in name and name in AttentionInterface._global_mapping
    assert integration.register("mac_attention") == "mac_attention"
    for bad in ("my_flash_attention", "sdpa_metal", "org/repo", "eager", ""):
        with pytest.raises(ValueError, match="name must be"):
            integration.register(bad)


@pytest.mark.parametrize("kind", ["llama", "mistral", "gemma2"])
def test_logits_on_a_left_padded_batch_match_eager(kind):
    model = tiny(kind)
    ids, mask = left_padded_batch()
    name = integration.register()
    ours = logits(model, name, input_ids=ids, attention_mask=mask)
    eager = logits(model, "eager", input_ids=ids, attention_mask=mask)
    real = mask.bool()
    assert (ours[real] - eager[real]).abs().max().item() <= TOL
    assert set(flash_attn_metal.stats()["launches"]) and not flash_attn_metal.stats()["fallbacks"]


def test_without_the_mask_function_padding_would_be_lost():
    """The trap register() avoids: an attention function registered alone gets no mask from transformers."""
    model = tiny("llama")
    ids, mask = left_padded_batch()
    AttentionInterface.register("metal_no_mask", integration.attention)
    unmasked = logits(model, "metal_no_mask", input_ids=ids, attention_mask=mask)
    eager = logits(model, "eager", input_ids=ids, attention_mask=mask)
    real = mask.bool()
    assert (unmasked[real] - eager[real]).abs().max().item() > 100 * TOL


def test_mistral_sliding_window_matters():
    """The window reaches the kernels: Mistral's logits differ from the same weights without a window."""
    model = tiny("mistral")
    ids, mask = left_padded_batch()
    name = integration.register()
    windowed = logits(model, name, input_ids=ids, attention_mask=mask)
    model.config.sliding_window = None
    unwindowed = logits(model, name, input_ids=ids, attention_mask=mask)
    assert (windowed - unwindowed).abs().max().item() > 100 * TOL


def packed_inputs():
    """Three sequences (4, 3 and 3 tokens) packed into a batch of one, as in training (no kv cache: transformers'
    eager masks see packing only then)."""
    torch.manual_seed(2)
    ids = torch.randint(3, 64, (1, 10))
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]])
    return dict(input_ids=ids, position_ids=position_ids, use_cache=False)


def test_packed_sequences_via_position_ids_match_eager():
    model = tiny("llama")
    packed = packed_inputs()
    name = integration.register()
    ours = logits(model, name, **packed)
    eager = logits(model, "eager", **packed)
    assert (ours - eager).abs().max().item() <= TOL
    # Attending across the packed sequences would be caught: one causal sequence differs.
    unpacked = logits(model, name, **dict(packed, position_ids=torch.arange(10)[None]))
    assert (unpacked[0, 4:] - eager[0, 4:]).abs().max().item() > 100 * TOL


def test_packed_sequences_via_cu_seq_lens_match_eager():
    model = tiny("llama")
    packed = packed_inputs()
    name = integration.register()
    cu = torch.tensor([0, 4, 7, 10], dtype=torch.int32)
    ours = logits(model, name, **packed, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=4, max_length_k=4)
    eager = logits(model, "eager", **packed)
    assert (ours - eager).abs().max().item() <= TOL


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_generation_matches_eager_token_for_token(cache):
    model = tiny("llama")
    ids, mask = left_padded_batch()
    options = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0,
                   cache_implementation=cache)
    model.set_attn_implementation("eager")
    eager = model.generate(ids, **options)
    model.set_attn_implementation(integration.register())
    ours = model.generate(ids, **options)
    assert eager.shape == (3, 16) and torch.equal(ours, eager)
    if cache == "static":  # without a padding mask, the unwritten static slots must still be masked
        unpadded = dict(options, attention_mask=torch.ones_like(mask))
        model.set_attn_implementation("eager")
        eager = model.generate(ids, **unpadded)
        model.set_attn_implementation(integration.register())
        assert torch.equal(model.generate(ids, **unpadded), eager)


def test_the_mask_covers_the_written_static_cache_slots_only():
    assert integration.padding_mask(2, 3, 8, q_offset=torch.tensor(2), attention_mask=None).tolist() == [[True] * 5] * 2
    padded = torch.tensor([[False, True, True, True, True, False, False, False]] * 2)
    assert integration.padding_mask(2, 3, 8, q_offset=2, attention_mask=padded).tolist() == [padded[0, :5].tolist()] * 2
    assert integration.padding_mask(2, 3, 5, q_offset=2, attention_mask=None) is None  # a dynamic cache


def test_loss_gradients_match_eager():
    model = tiny("llama")
    ids, mask = left_padded_batch()
    # Padded positions' outputs are padding (eager fills them with an average, the kernels with 0): no loss term
    # may read them, so the first real token of each row (predicted from a padded position) has no label either.
    predicted_from_padding = torch.cat((torch.ones_like(mask[:, :1]), mask[:, :-1]), dim=1) == 0
    labels = ids.masked_fill((mask == 0) | predicted_from_padding, -100)
    grads = {}
    for implementation in ("eager", integration.register()):
        model.zero_grad()
        model.set_attn_implementation(implementation)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        grads[implementation] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    eager, ours = grads.values()
    assert eager.keys() == ours.keys() and len(eager) > 10
    worst = max((ours[n] - eager[n]).abs().max().item() / max(eager[n].abs().max().item(), 1e-6) for n in eager)
    assert worst <= 1e-4
    assert any(name.startswith("attention_backward") for name in flash_attn_metal.stats()["launches"])


def test_a_4d_mask_is_refused_with_a_clear_message():
    model = tiny("llama")
    ids, mask = left_padded_batch()
    name = integration.register()
    full = torch.zeros(3, 1, 10, 10)
    with pytest.raises(ValueError, match="2-D padding mask"):
        logits(model, name, input_ids=ids, attention_mask=full)
    assert logits(model, name, input_ids=ids, attention_mask=mask).shape == (3, 10, 64)


def test_gpt_oss_sinks_match_eager():
    torch.manual_seed(0)
    config = transformers.GptOssConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                       num_local_experts=2, num_experts_per_tok=1, sliding_window=4,
                                       max_position_embeddings=64)
    model = transformers.GptOssForCausalLM(config).eval()
    ids, mask = left_padded_batch()
    ours = logits(model, integration.register(), input_ids=ids, attention_mask=mask)
    eager = logits(model, "eager", input_ids=ids, attention_mask=mask)
    assert (ours[mask.bool()] - eager[mask.bool()]).abs().max().item() <= TOL
