"""flash-attn's other names, as code written for flash-attn calls them: `flash_attn.layers.rotary` against a
float64 reference, and `flash_attn_interface`'s private forward/backward functions against the public functions
and autograd (kernels through the emulator, strict; dropout on the reference)."""

from __future__ import annotations

import math

import pytest
import torch

import flash_attn_metal
from flash_attn_metal import flash_attn_func, flash_attn_interface as fi, flash_attn_varlen_func
from flash_attn_metal.layers.rotary import (
    RotaryEmbedding,
    apply_rotary_emb,
    apply_rotary_emb_kv_,
    apply_rotary_emb_qkv_,
    apply_rotary_emb_torch,
)


pytestmark = pytest.mark.usefixtures("emulator_strict")


# ---- rotary ------------------------------------------------------------------------------------------------


def rotary_truth(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: list[list[int]],
                 interleaved: bool) -> torch.Tensor:
    """Float64, token by token: rotate feature pairs of the first rotary_dim features by the position's angle
    (positions past the table: unrotated)."""
    x = x.double().clone()
    half = cos.shape[1]
    pairs = [(2 * i, 2 * i + 1) if interleaved else (i, i + half) for i in range(half)]
    for b, row in enumerate(positions):
        for s, p in enumerate(row):
            if p >= cos.shape[0]:
                continue
            for i, (a, c) in enumerate(pairs):
                x1, x2 = x[b, s, :, a].clone(), x[b, s, :, c].clone()
                x[b, s, :, a] = x1 * cos[p, i].double() - x2 * sin[p, i].double()
                x[b, s, :, c] = x1 * sin[p, i].double() + x2 * cos[p, i].double()
    return x


def tables(seqlen_ro: int, rotary_dim: int, dtype=torch.float32):
    angle = torch.rand(seqlen_ro, rotary_dim // 2) * 2 * math.pi
    return torch.cos(angle).to(dtype), torch.sin(angle).to(dtype)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("offsets", ["zero", "int", "tensor"])
def test_apply_rotary_emb_matches_float64(interleaved, offsets):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 32)
    cos, sin = tables(12, 16)  # rotary_dim 16 < headdim 32: the rest passes through
    offset = {"zero": 0, "int": 3, "tensor": torch.tensor([2, 9], dtype=torch.int32)}[offsets]
    per_sequence = offset.tolist() if isinstance(offset, torch.Tensor) else [offset] * 2
    positions = [[o + s for s in range(5)] for o in per_sequence]  # 9 + 4 > 11: past the table, unrotated
    out = apply_rotary_emb(x, cos, sin, interleaved=interleaved, seqlen_offsets=offset)
    truth = rotary_truth(x, cos, sin, positions, interleaved)
    assert out.dtype == x.dtype and (out.double() - truth).abs().max().item() <= 1e-6
    assert (x.double() - truth).abs().max().item() > 0.1  # the rotation is not the identity


def test_apply_rotary_emb_fp16_within_the_upstream_rule():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 2, 64, dtype=torch.float16)
    cos, sin = tables(7, 64, torch.float16)
    truth = rotary_truth(x, cos, sin, [list(range(7))] * 2, False)
    plain = apply_rotary_emb_torch(x, cos, sin)  # fp16 PyTorch
    ours = apply_rotary_emb(x, cos, sin)
    assert (ours.double() - truth).abs().max() <= 2 * (plain.double() - truth).abs().max() + 1e-5


def test_apply_rotary_emb_varlen_restarts_positions_per_sequence():
    torch.manual_seed(0)
    cos, sin = tables(8, 32)
    x = torch.randn(9, 2, 32)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    out = apply_rotary_emb(x, cos, sin, seqlen_offsets=torch.tensor([1, 0]), cu_seqlens=cu, max_seqlen=5)
    first = rotary_truth(x[None, :4], cos, sin, [[1, 2, 3, 4]], False)[0]
    second = rotary_truth(x[None, 4:], cos, sin, [[0, 1, 2, 3, 4]], False)[0]
    assert (out.double() - torch.cat((first, second))).abs().max().item() <= 1e-6


def test_apply_rotary_emb_inplace_and_gradient():
    torch.manual_seed(0)
    cos, sin = tables(6, 32)
    x = torch.randn(1, 6, 2, 32, dtype=torch.float64)
    leaf = x.clone().float().requires_grad_()
    inplace = leaf.clone()
    out = apply_rotary_emb(inplace, cos, sin, inplace=True)
    assert out is inplace
    grad = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, leaf, grad)
    # The float64 truth's gradient: the rotation's transpose (the conjugate rotation).
    x64 = x.clone().requires_grad_()
    truth = apply_rotary_emb_torch(x64, cos.double(), sin.double())
    (dx64,) = torch.autograd.grad(truth, x64, grad.double())
    assert (dx.double() - dx64).abs().max().item() <= 1e-6
    assert (dx.double() - grad.double()).abs().max().item() > 0.1


def test_apply_rotary_emb_qkv_and_kv_rotate_q_and_k_in_place():
    torch.manual_seed(0)
    cos, sin = tables(6, 32)
    qkv = torch.randn(2, 6, 3, 2, 32)
    before = qkv.clone()
    assert apply_rotary_emb_qkv_(qkv, cos, sin, seqlen_offsets=0) is qkv
    for part in (0, 1):
        assert torch.allclose(qkv[:, :, part], apply_rotary_emb(before[:, :, part], cos, sin), atol=1e-6)
    assert torch.equal(qkv[:, :, 2], before[:, :, 2])  # v untouched
    gqa = torch.randn(2, 6, 4 + 2 * 1, 32)  # 4 query heads, 1 kv head
    before = gqa.clone()
    apply_rotary_emb_qkv_(gqa, cos, sin, num_heads_q=4)
    assert torch.allclose(gqa[:, :, :5], apply_rotary_emb(before[:, :, :5], cos, sin), atol=1e-6)
    assert torch.equal(gqa[:, :, 5:], before[:, :, 5:])
    kv = torch.randn(2, 6, 2, 2, 32)
    before = kv.clone()
    apply_rotary_emb_kv_(kv, cos, sin)
    assert torch.allclose(kv[:, :, 0], apply_rotary_emb(before[:, :, 0], cos, sin), atol=1e-6)
    assert torch.equal(kv[:, :, 1], before[:, :, 1])


@pytest.mark.parametrize("scale_base", [None, 512])
def test_rotary_embedding_module(scale_base):
    torch.manual_seed(0)
    module = RotaryEmbedding(32, scale_base=scale_base)
    qkv = torch.randn(1, 5, 3, 2, 32)
    before = qkv.clone()
    module(qkv, seqlen_offset=2)
    positions = torch.arange(7, dtype=torch.float32)
    freqs = torch.outer(positions, 1.0 / 10000 ** (torch.arange(0, 32, 2, dtype=torch.float32) / 32))
    cos, sin = torch.cos(freqs), torch.sin(freqs)
    scale = 1.0
    if scale_base is not None:
        scale = ((torch.arange(0, 32, 2) + 0.4 * 32) / (1.4 * 32)) ** ((positions - 7 // 2) / scale_base)[:, None]
    q = rotary_truth(before[:, :, 0], cos * scale, sin * scale, [list(range(2, 7))], False)
    k = rotary_truth(before[:, :, 1], cos / scale, sin / scale, [list(range(2, 7))], False)
    assert (qkv[:, :, 0].double() - q).abs().max().item() <= 1e-5
    assert (qkv[:, :, 1].double() - k).abs().max().item() <= 1e-5


def test_rotary_refuses_positions_past_the_table_and_a_too_wide_table():
    cos, sin = tables(6, 16)
    x = torch.randn(1, 4, 2, 32)
    assert apply_rotary_emb(x, cos, sin, seqlen_offsets=2).shape == x.shape
    with pytest.raises(ValueError, match="seqlen_offsets"):
        apply_rotary_emb(x, cos, sin, seqlen_offsets=3)
    wide_cos, wide_sin = tables(6, 48)
    with pytest.raises(ValueError, match="rotary_dim"):
        apply_rotary_emb(x, wide_cos, wide_sin)


# ---- private interface functions ---------------------------------------------------------------------------


def padded_inputs():
    torch.manual_seed(0)
    return torch.randn(2, 12, 4, 32), torch.randn(2, 12, 2, 32), torch.randn(2, 12, 2, 32)


def autograd_grads(fn, tensors, dout):
    leaves = [t.clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    return out, torch.autograd.grad(out, leaves, dout)


def test_private_forward_and_backward_match_the_public_function():
    q, k, v = padded_inputs()
    scale = 32**-0.5
    out, lse, s_dmask, rng_state = fi._flash_attn_forward(q, k, v, 0.0, scale, True, -1, 0, 0.0, None, False)
    reference, grads = autograd_grads(lambda *t: flash_attn_func(*t, causal=True), (q, k, v), dout := torch.randn_like(q))
    assert torch.equal(out, reference) and lse.shape == (2, 4, 12) and s_dmask.numel() == 0
    assert not out.requires_grad and isinstance(rng_state, torch.Tensor)
    dq, dk, dv = (torch.full_like(t, math.nan) for t in (q, k, v))
    softmax_d = fi._flash_attn_backward(dout, q, k, v, out, lse, dq, dk, dv, 0.0, scale, True, -1, 0, 0.0, None,
                                        False, rng_state)
    for ours, theirs in zip((dq, dk, dv), grads):
        assert (ours - theirs).abs().max().item() <= 1e-5
    assert softmax_d.shape == (2, 4, 128)
    assert torch.allclose(softmax_d[:, :, :12], (dout * out).sum(-1).transpose(1, 2), atol=1e-5)
    assert any(name.startswith("attention_backward") for name in flash_attn_metal.stats()["launches"])


def test_private_varlen_forward_honours_seqused_k_and_leftpad_k():
    torch.manual_seed(0)
    q, k, v = torch.randn(7, 2, 32), torch.randn(16, 2, 32), torch.randn(16, 2, 32)
    cu_q = torch.tensor([0, 3, 7], dtype=torch.int32)
    cu_k = torch.tensor([0, 8, 16], dtype=torch.int32)
    seqused = torch.tensor([6, 8], dtype=torch.int32)
    leftpad = torch.tensor([1, 3], dtype=torch.int32)
    out, lse, _, _ = fi._flash_attn_varlen_forward(q, k, v, cu_q, cu_k, 4, 8, 0.0, 32**-0.5, True,
                                                   leftpad_k=leftpad, seqused_k=seqused)
    rows = torch.cat((torch.arange(1, 6), torch.arange(11, 16)))  # keys 1..5 and 3..7 of the two sequences
    used_cu = torch.tensor([0, 5, 10], dtype=torch.int32)
    expected = flash_attn_varlen_func(q, k[rows], v[rows], cu_q, used_cu, 4, 5, causal=True)
    assert torch.equal(out, expected) and lse.shape == (2, 7)
    everything = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 4, 8, causal=True)
    assert (everything - expected).abs().max().item() > 1e-3
    with pytest.raises(ValueError, match="seqused_k"):
        fi._flash_attn_varlen_forward(q, k, v, cu_q, cu_k, 4, 8, 0.0, 1.0, True,
                                      seqused_k=torch.tensor([9, 8], dtype=torch.int32))


def test_private_varlen_forward_reads_a_paged_cache_up_to_seqused_k():
    torch.manual_seed(0)
    q, pages = torch.randn(2, 2, 32), torch.randn(4, 4, 2, 32)
    block_table = torch.tensor([[2, 0], [1, 3]], dtype=torch.int32)
    cu_q = torch.tensor([0, 1, 2], dtype=torch.int32)
    cu_k = torch.tensor([0, 8, 16], dtype=torch.int32)
    out, *_ = fi._flash_attn_varlen_forward(q, pages, pages, cu_q, cu_k, 1, 8, 0.0, 32**-0.5, False,
                                            block_table=block_table, seqused_k=torch.tensor([5, 7], dtype=torch.int32))
    k = torch.cat((pages[2], pages[0, :1], pages[1], pages[3, :3]))
    expected = flash_attn_varlen_func(q, k, k, cu_q, torch.tensor([0, 5, 12], dtype=torch.int32), 1, 7)
    assert torch.equal(out, expected)


def test_private_varlen_backward_matches_autograd():
    torch.manual_seed(0)
    q, k, v = torch.randn(9, 2, 32), torch.randn(9, 1, 32), torch.randn(9, 1, 32)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    out, lse, _, rng = fi._flash_attn_varlen_forward(q, k, v, cu, cu, 5, 5, 0.0, 32**-0.5, True)
    dout = torch.randn_like(q)
    _, grads = autograd_grads(lambda *t: flash_attn_varlen_func(*t, cu, cu, 5, 5, causal=True), (q, k, v), dout)
    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
    softmax_d = fi._flash_attn_varlen_backward(dout, q, k, v, out, lse, dq, dk, dv, cu, cu, 5, 5, 0.0, 32**-0.5,
                                               True, -1, 0, 0.0, None, False, rng)
    for ours, theirs in zip((dq, dk, dv), grads):
        assert (ours - theirs).abs().max().item() <= 1e-5
    assert softmax_d.shape == (2, 9 + 2 * 128)
    rows = (dout * out).sum(-1).T
    assert torch.allclose(softmax_d[:, :4], rows[:, :4], atol=1e-5)
    assert torch.allclose(softmax_d[:, 128 + 4 : 128 + 9], rows[:, 4:], atol=1e-5)


def test_private_backward_replays_the_dropout_of_its_forward(monkeypatch):
    monkeypatch.setenv("FLASH_ATTN_METAL_BACKEND", "reference")  # dropout runs on the reference
    q, k, v = padded_inputs()
    torch.manual_seed(7)
    out, lse, _, rng_state = fi._flash_attn_forward(q, k, v, 0.3, 32**-0.5, False, -1, -1, 0.0, None, False)
    dout = torch.randn_like(q)
    torch.manual_seed(7)  # the public function under the same draw
    reference, grads = autograd_grads(lambda *t: flash_attn_func(*t, dropout_p=0.3), (q, k, v), dout)
    assert torch.equal(out, reference)
    torch.manual_seed(123)  # the generator has moved on; the backward replays rng_state
    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
    fi._flash_attn_backward(dout, q, k, v, out, lse, dq, dk, dv, 0.3, 32**-0.5, False, -1, -1, 0.0, None, False,
                            rng_state)
    for ours, theirs in zip((dq, dk, dv), grads):
        assert (ours - theirs).abs().max().item() <= 1e-5
    _, undropped = autograd_grads(flash_attn_func, (q, k, v), dout)
    assert (dv - undropped[2]).abs().max().item() > 1e-2
    with pytest.raises(ValueError, match="rng_state"):
        fi._flash_attn_backward(dout, q, k, v, out, lse, dq, dk, dv, 0.3, 32**-0.5, False, -1, -1, 0.0, None, False)


def test_get_block_size_n():
    assert fi._get_block_size_n("cpu", 64, False, True) == 128 and fi.USE_TRITON_ROCM is False  # S_dmask's blocks
    assert fi._get_block_size_n("cpu", 64, True, True) == 64
    with pytest.raises(ValueError, match="head_dim"):
        fi._get_block_size_n("cpu", 512, False, True)
