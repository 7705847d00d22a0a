"""diffusers' `flash` and `flash_varlen` backends after `enable()`: dispatch_attention_fn against the `native`
backend, and a tiny random Flux transformer with set_attention_backend, on the kernels (emulator, strict)."""

from __future__ import annotations

import pytest
import torch

import flash_attn_metal

pytest.importorskip("diffusers")
from diffusers import FluxTransformer2DModel  # noqa: E402
from diffusers.models import attention_dispatch  # noqa: E402
from diffusers.models.attention_dispatch import attention_backend, dispatch_attention_fn  # noqa: E402

from flash_attn_metal.integrations import diffusers as integration  # noqa: E402

TOL = 1e-5  # fp32


@pytest.fixture(autouse=True)
def disabled_after(emulator_strict):
    yield
    integration.disable()


def qkv(seqlen_q: int = 12, seqlen_k: int = 20):
    torch.manual_seed(0)
    return torch.randn(2, seqlen_q, 2, 32), torch.randn(2, seqlen_k, 2, 32), torch.randn(2, seqlen_k, 2, 32)


def test_flash_backend_is_refused_until_enabled_then_matches_native():
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match="flash-attn"):
        with attention_backend("flash"):
            pass
    integration.enable()
    with attention_backend("native"):
        native = dispatch_attention_fn(q, k, v)
    with attention_backend("flash"):
        ours = dispatch_attention_fn(q, k, v)
    assert (ours - native).abs().max().item() <= TOL
    assert flash_attn_metal.stats()["launches"]


def test_flash_backend_causal_matches_native():
    integration.enable()
    q, k, v = qkv(16, 16)
    with attention_backend("native"):
        native = dispatch_attention_fn(q, k, v, is_causal=True)
    with attention_backend("flash"):
        ours = dispatch_attention_fn(q, k, v, is_causal=True)
        noncausal = dispatch_attention_fn(q, k, v)
    assert (ours - native).abs().max().item() <= TOL
    assert (noncausal - native).abs().max().item() > 1e-2  # the causal flag reaches the kernels


def test_flash_varlen_backend_with_a_key_padding_mask_matches_native():
    integration.enable()
    q, k, v = qkv()
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, 13:] = False  # diffusers' varlen backend takes each row's valid keys as a prefix
    with attention_backend("native"):
        native = dispatch_attention_fn(q, k, v, attn_mask=mask[:, None, None, :])
        unmasked = dispatch_attention_fn(q, k, v)
    with attention_backend("flash_varlen"):
        ours = dispatch_attention_fn(q, k, v, attn_mask=mask)
    assert (ours - native).abs().max().item() <= TOL
    assert (unmasked[1] - native[1]).abs().max().item() > 1e-2  # the mask matters to this check
    assert any("varlen" in name for name in flash_attn_metal.stats()["launches"])


def tiny_flux():
    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                   attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, axes_dims_rope=(4, 14, 14)).eval()
    inputs = dict(hidden_states=torch.randn(2, 16, 4), encoder_hidden_states=torch.randn(2, 8, 32),
                  pooled_projections=torch.randn(2, 32), timestep=torch.tensor([0.5, 0.7]),
                  img_ids=torch.randn(16, 3), txt_ids=torch.zeros(8, 3))
    return model, inputs


@pytest.mark.parametrize("backend", ["flash", "flash_varlen"])
def test_a_tiny_flux_transformer_matches_native(backend):
    integration.enable()
    model, inputs = tiny_flux()
    with torch.no_grad():
        native = model(**inputs).sample
        model.set_attention_backend(backend)
        ours = model(**inputs).sample
    assert (ours - native).abs().max().item() <= 1e-4
    assert flash_attn_metal.stats()["launches"] and not flash_attn_metal.stats()["fallbacks"]


def test_disable_restores_diffusers():
    before = attention_dispatch.flash_attn_func
    integration.enable()
    integration.enable()  # idempotent: disable still restores the original
    assert attention_dispatch.flash_attn_func is flash_attn_metal.flash_attn_func
    integration.disable()
    assert attention_dispatch.flash_attn_func is before
