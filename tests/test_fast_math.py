"""Part of the kernel grid under fast math (FLASH_ATTN_METAL_EMULATOR_FAST_MATH=1: the C++ compiler's -ffast-math,
as Metal's fast math may assume no NaN and no infinity). The kernels use a finite sentinel, recognise -inf in
masks and sinks by its bits, and write +inf only as a final LSE, so the cases that exercise those paths still give
the reference's answer: rows and splits that see no key, -inf mask values and sinks, the backward of such rows.
"""

from __future__ import annotations

import math

import pytest
import torch

import flash_attn_metal
import flash_attn_metal.reference
from flash_attn_metal import flash_attn_func, flash_attn_with_kvcache, scaled_dot_product_attention
from flash_attn_metal.emulator import compile_shader


@pytest.fixture(autouse=True)
def fast_math(emulator_strict, monkeypatch):
    monkeypatch.setenv("FLASH_ATTN_METAL_EMULATOR_FAST_MATH", "1")


def test_the_build_really_assumes_finite_math():
    """Control: under this build a kernel that tests for infinity folds the test away (so the cases below would
    catch a kernel that relied on one)."""
    source = """#include <metal_stdlib>
using namespace metal;
kernel void probe(device const float* x [[buffer(0)]], device int* out [[buffer(1)]],
                  uint i [[thread_position_in_grid]]) {
  out[i] = isinf(x[i]) ? 1 : 0;
}"""
    x, out = torch.tensor([math.inf, 1.0]), torch.full((2,), -1, dtype=torch.int32)
    compile_shader(source).probe(x, out, threads=[2], group_size=[2])
    assert out.tolist() == [0, 0]


def test_rows_that_see_no_key_forward_and_backward():
    """A window that leaves the first rows without keys: out 0, LSE +inf, zero gradients; the rest as the
    reference."""
    torch.manual_seed(0)
    q = torch.randn(1, 40, 2, 64, dtype=torch.float16, requires_grad=True)
    k, v = (torch.randn(1, 24, 2, 64, dtype=torch.float16, requires_grad=True) for _ in range(2))
    out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)  # rows 0..15 see no key
    assert (out[:, :16] == 0).all() and torch.isinf(lse[..., :16]).all() and torch.isfinite(lse[..., 16:]).all()
    expected, _ = flash_attn_metal.reference.attention_ref(q.float(), k.float(), v.float(), causal=True)
    assert (out.float() - expected).abs().max() < 1e-2
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert (dq[:, :16] == 0).all() and all(torch.isfinite(g).all() for g in (dq, dk, dv))
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref_out, _ = flash_attn_metal.reference.attention_ref(*leaves, causal=True)
    expected_grads = torch.autograd.grad(ref_out, leaves, torch.ones_like(ref_out))
    for g, e in zip((dq, dk, dv), expected_grads):
        assert (g.float() - e).abs().max() < 5e-2


@pytest.mark.parametrize("sq", [1, 12], ids=["decode", "block"])
def test_splits_that_see_no_key(sq):
    """Split over keys with an empty cache sequence: the splits that saw nothing weigh 0 in the combine."""
    torch.manual_seed(1)
    q = torch.randn(2, sq, 4, 64, dtype=torch.float16)
    k_cache, v_cache = (torch.randn(2, 300, 2, 64, dtype=torch.float16) for _ in range(2))
    seqlens = torch.tensor([0, 300], dtype=torch.int32)
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, num_splits=4, causal=True,
                                       return_softmax_lse=True)
    assert any(name.endswith("_combine") for name in flash_attn_metal.stats()["launches"])
    assert (out[0] == 0).all() and torch.isinf(lse[0]).all()
    expected, _ = flash_attn_metal.reference.attention_ref(q[1:].float(), k_cache[1:].float(), v_cache[1:].float(),
                                                           causal=True)
    assert (out[1:].float() - expected).abs().max() < 1e-2


def test_minus_infinity_in_a_float_mask_and_in_a_sink():
    """A float mask of -inf (a fully masked row among them) and a -inf sink, as torch's SDPA takes them."""
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 2, 6, 32) for _ in range(3))
    mask = torch.zeros(6, 6).masked_fill(torch.rand(6, 6) > 0.6, -math.inf)
    mask[3] = -math.inf
    sinks = torch.tensor([-math.inf, 0.5])
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask, sinks=sinks)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(32) + mask
    with_sink = torch.cat((scores, sinks.view(1, 2, 1, 1).expand(1, 2, 6, 1)), dim=-1)
    weights = torch.softmax(with_sink, dim=-1)[..., :6].nan_to_num(0.0)
    expected = weights @ v
    assert torch.isfinite(out).all() and (out[:, :, 3] == 0).all()
    assert (out - expected).abs().max() < 1e-5
