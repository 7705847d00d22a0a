"""The reference against the independent naive implementation, for every mask and feature."""

from __future__ import annotations

import math

import pytest
import torch

from flash_attn_metal import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
from flash_attn_metal.bert_padding import pad_input, unpad_input
from naive import naive_attention


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch):
    monkeypatch.setenv("FLASH_ATTN_METAL_BACKEND", "reference")


def padded_naive(q, k, v, **kw):
    outs, lses = [], []
    alibi = kw.pop("alibi", None)
    for b in range(q.shape[0]):
        slopes = None if alibi is None else (alibi if alibi.dim() == 1 else alibi[b])
        o, l = naive_attention(q[b], k[b], v[b], alibi=slopes, **kw)
        outs.append(o)
        lses.append(l)
    return torch.stack(outs), torch.stack(lses)


CASES = [
    dict(),
    dict(causal=True),
    dict(window=(5, 3)),
    dict(window=(0, 0)),
    dict(window=(7, -1)),
    dict(causal=True, window=(4, -1)),
    dict(softcap=2.0),
    dict(alibi="h"),
    dict(alibi="bh", causal=True),
    dict(scale=0.3),
]


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
@pytest.mark.parametrize("sq, sk", [(9, 9), (5, 13), (13, 5), (1, 7)])
def test_padded_matches_naive(case, sq, sk):
    torch.manual_seed(0)
    b, h, hk, d = 2, 4, 2, 16
    q, k, v = torch.randn(b, sq, h, d), torch.randn(b, sk, hk, d), torch.randn(b, sk, hk, d)
    case = dict(case)
    alibi = {"h": torch.rand(h) * 0.5, "bh": torch.rand(b, h) * 0.5}.get(case.pop("alibi", None))
    window = case.get("window", (-1, -1))
    out, lse, _ = flash_attn_func(q, k, v, softmax_scale=case.get("scale"), causal=case.get("causal", False),
                                  window_size=window, softcap=case.get("softcap", 0.0), alibi_slopes=alibi,
                                  return_attn_probs=True)
    expected, expected_lse = padded_naive(q, k, v, alibi=alibi, **case)
    assert torch.allclose(out.double(), expected, atol=1e-5)
    finite = torch.isfinite(expected_lse)
    assert torch.equal(torch.isfinite(lse), finite)  # fully masked rows: lse = +inf
    assert torch.allclose(lse.double()[finite], expected_lse[finite], atol=1e-5)
    assert (out[~finite.permute(0, 2, 1)] == 0).all()


def test_a_wrong_alignment_would_be_caught():
    """Negative control: top-left causal alignment differs from flash-attn's bottom-right one."""
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 3, 1, 8), torch.randn(1, 6, 1, 8), torch.randn(1, 6, 1, 8)
    out = flash_attn_func(q, k, v, causal=True)
    bottom_right, _ = padded_naive(q, k, v, causal=True)
    top_left, _ = padded_naive(q, k[:, :3], v[:, :3], causal=True)
    assert torch.allclose(out.double(), bottom_right, atol=1e-6)
    assert not torch.allclose(out.double(), top_left, atol=1e-3)


def test_window_size_may_be_a_tensor():
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 8, 2, 8), torch.randn(1, 8, 2, 8), torch.randn(1, 8, 2, 8)
    a = flash_attn_func(q, k, v, window_size=torch.tensor([2, 1]))
    b = flash_attn_func(q, k, v, window_size=(2, 1))
    assert torch.equal(a, b)


def test_seqlen_k_zero_gives_zeros_and_infinite_lse():
    q = torch.randn(2, 4, 2, 8)
    k = torch.randn(2, 0, 2, 8)
    out, lse, _ = flash_attn_func(q, k, k, return_attn_probs=True)
    assert (out == 0).all() and torch.isposinf(lse).all()


def test_varlen_with_zero_length_sequences_matches_naive():
    torch.manual_seed(3)
    lens_q, lens_k = [3, 0, 5, 2], [4, 2, 0, 6]
    h, hk, d = 4, 1, 8
    q = torch.randn(sum(lens_q), h, d)
    k, v = torch.randn(sum(lens_k), hk, d), torch.randn(sum(lens_k), hk, d)
    cu_q = torch.tensor([0, 3, 3, 8, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 6, 6, 12], dtype=torch.int32)
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 6, causal=True, return_attn_probs=True)
    assert lse.shape == (h, sum(lens_q))
    for b in range(4):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        expected, expected_lse = naive_attention(q[qs], k[ks], v[ks], causal=True)
        assert torch.allclose(out[qs].double(), expected, atol=1e-5)
        assert torch.equal(torch.isinf(lse[:, qs]), torch.isinf(expected_lse))


def test_gradients_flow_and_match_naive():
    torch.manual_seed(4)
    q = torch.randn(1, 6, 2, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 7, 1, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 7, 1, 8, dtype=torch.float64, requires_grad=True)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    g = torch.randn(1, 6, 2, 8)
    flash_attn_func(q32, k32, v32, causal=True, softcap=3.0).backward(g)
    expected, _ = padded_naive(q, k, v, causal=True, softcap=3.0)
    expected.backward(g.double())
    for ours, theirs in ((q32, q), (k32, k), (v32, v)):
        assert torch.allclose(ours.grad.double(), theirs.grad, atol=1e-5)


def test_dropout_drops_the_requested_fraction_and_rescales():
    torch.manual_seed(5)
    q, k, v = torch.randn(2, 64, 2, 16), torch.randn(2, 64, 2, 16), torch.ones(2, 64, 2, 16)
    out, lse, probs = flash_attn_func(q, k, v, dropout_p=0.25, return_attn_probs=True)
    assert probs.shape == (2, 2, 128, 128)
    dropped = (probs[:, :, :64, :64] < 0).float().mean().item()
    assert abs(dropped - 0.25) < 0.02
    # v = 1: each row sums its kept probabilities / (1 - p), which averages to 1.
    assert abs(out.mean().item() - 1.0) < 0.05
    no_dropout = flash_attn_func(q, k, v)
    assert torch.allclose(no_dropout, torch.ones_like(no_dropout), atol=1e-5)


def test_unpad_and_pad_round_trip():
    x = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    unpadded, indices, cu, max_len, used = unpad_input(x, mask)
    assert unpadded.shape == (8, 4) and cu.tolist() == [0, 3, 8, 8] and max_len == 5 and used.tolist() == [3, 5, 0]
    back = pad_input(unpadded, indices, 3, 5)
    assert torch.equal(back[mask], x[mask]) and (back[~mask] == 0).all()


def rotate(x, cos, sin, positions, interleaved):
    """Naive rotary embedding of x (s, h, d) at integer positions."""
    x = x.double().clone()
    half = cos.shape[1]
    for s, pos in enumerate(positions):
        for i in range(half):
            a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + half)
            c, n = float(cos[pos, i]), float(sin[pos, i])
            xa, xb = x[s, :, a].clone(), x[s, :, b].clone()
            x[s, :, a], x[s, :, b] = xa * c - xb * n, xa * n + xb * c
    return x


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("layout", ["dense", "batch_idx", "leftpad", "paged"])
def test_kvcache_appends_in_place_and_attends(interleaved, layout):
    torch.manual_seed(6)
    b, h, hk, d, sq, new = 2, 4, 2, 32, 3, 2
    seqlens = torch.tensor([5, 9], dtype=torch.int32)
    q = torch.randn(b, sq, h, d)
    k_new, v_new = torch.randn(b, new, hk, d), torch.randn(b, new, hk, d)
    cos, sin = torch.randn(16, 8), torch.randn(16, 8)
    leftpad = torch.tensor([2, 0], dtype=torch.int32) if layout == "leftpad" else None
    batch_idx = torch.tensor([2, 0], dtype=torch.int32) if layout == "batch_idx" else None
    if layout == "paged":
        page, blocks = 4, torch.tensor([[5, 1, 3], [0, 4, 2]], dtype=torch.int32)
        k_cache, v_cache = torch.randn(6, page, hk, d), torch.randn(6, page, hk, d)
        logical_k = lambda bb: k_cache[blocks[bb].long()].flatten(0, 1)  # noqa: E731
        logical_v = lambda bb: v_cache[blocks[bb].long()].flatten(0, 1)  # noqa: E731
    else:
        blocks = None
        k_cache, v_cache = torch.randn(3, 12, hk, d), torch.randn(3, 12, hk, d)
        row = lambda bb: int(batch_idx[bb]) if batch_idx is not None else bb  # noqa: E731
        logical_k = lambda bb: k_cache[row(bb)]  # noqa: E731
        logical_v = lambda bb: v_cache[row(bb)]  # noqa: E731
    before_k = [logical_k(bb).clone() for bb in range(b)]
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cos, sin, cache_seqlens=seqlens,
                                       cache_batch_idx=batch_idx, cache_leftpad=leftpad, block_table=blocks,
                                       causal=True, rotary_interleaved=interleaved, return_softmax_lse=True)
    for bb in range(b):
        start = int(leftpad[bb]) if leftpad is not None else 0
        end = int(seqlens[bb])
        positions = list(range(end - start, end - start + new))
        appended = rotate(k_new[bb], cos, sin, positions, interleaved)
        keys = logical_k(bb)
        assert torch.allclose(keys[end : end + new].double(), appended, atol=1e-5)  # written in place
        assert torch.equal(keys[:end], before_k[bb][:end])
        q_rot = rotate(q[bb], cos, sin, list(range(end - start, end - start + sq)), interleaved)
        expected, expected_lse = naive_attention(q_rot, keys[start : end + new], logical_v(bb)[start : end + new], causal=True)
        assert torch.allclose(out[bb].double(), expected, atol=1e-4)
        assert torch.allclose(lse[bb].double(), expected_lse, atol=1e-4)
    assert math.isfinite(out.abs().max().item())
