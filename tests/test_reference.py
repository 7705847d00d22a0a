"""The reference path (through the public functions, FLASH_ATTN_METAL_BACKEND=reference) and its plain-tensor
entry against the independent naive implementation in naive.py, for every mask and feature."""

from __future__ import annotations

import math

import pytest
import torch

from flash_attn_metal import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
    reference,
)
from flash_attn_metal.bert_padding import index_first_axis, pad_input, unpad_input
from naive import naive_attention


pytestmark = pytest.mark.usefixtures("reference_backend")


def padded_naive(q, k, v, **kw):
    """naive_attention over a padded batch; alibi (h,) or (b, h); keep (b, h, sq, sk)."""
    outs, lses = [], []
    alibi, keep = kw.pop("alibi", None), kw.pop("keep", None)
    for b in range(q.shape[0]):
        slopes = None if alibi is None else (alibi if alibi.dim() == 1 else alibi[b])
        o, l = naive_attention(q[b], k[b], v[b], alibi=slopes, keep=None if keep is None else keep[b], **kw)
        outs.append(o)
        lses.append(l)
    return torch.stack(outs), torch.stack(lses)


def assert_matches(out, lse, expected, expected_lse, atol=1e-5):
    assert torch.allclose(out.double(), expected, atol=atol)
    finite = torch.isfinite(expected_lse)
    assert torch.equal(torch.isfinite(lse), finite)  # fully masked rows: lse = +inf
    assert torch.isposinf(lse[~finite]).all()
    assert torch.allclose(lse.double()[finite], expected_lse[finite], atol=atol)


CASES = [
    dict(),
    dict(causal=True),
    dict(window=(5, 3)),
    dict(window=(0, 0)),
    dict(window=(7, -1)),
    dict(window=(-1, 2)),
    dict(causal=True, window=(4, -1)),
    dict(softcap=2.0),
    dict(alibi="h"),
    dict(alibi="bh", causal=True),
    dict(scale=0.3),
    dict(softcap=1.5, alibi="h", window=(3, 1)),
]


def case_args(case, b, h):
    case = dict(case)
    alibi = {"h": torch.rand(h) * 0.5, "bh": torch.rand(b, h) * 0.5}.get(case.pop("alibi", None))
    return case, alibi


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
@pytest.mark.parametrize("sq, sk", [(9, 9), (5, 13), (13, 5), (1, 7)])
def test_padded_matches_naive(case, sq, sk):
    torch.manual_seed(0)
    b, h, hk, d = 2, 4, 2, 16
    q, k, v = torch.randn(b, sq, h, d), torch.randn(b, sk, hk, d), torch.randn(b, sk, hk, d)
    case, alibi = case_args(case, b, h)
    out, lse, probs = flash_attn_func(q, k, v, softmax_scale=case.get("scale"), causal=case.get("causal", False),
                                      window_size=case.get("window", (-1, -1)), softcap=case.get("softcap", 0.0),
                                      alibi_slopes=alibi, return_attn_probs=True)
    assert lse.dtype == torch.float32 and lse.shape == (b, h, sq) and probs.shape == (0,)
    expected, expected_lse = padded_naive(q, k, v, alibi=alibi, **case)
    assert_matches(out, lse, expected, expected_lse)


def test_a_wrong_alignment_would_be_caught():
    """Negative control: top-left causal alignment differs from flash-attn's bottom-right one."""
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 3, 1, 8), torch.randn(1, 6, 1, 8), torch.randn(1, 6, 1, 8)
    out = flash_attn_func(q, k, v, causal=True)
    bottom_right, _ = padded_naive(q, k, v, causal=True)
    top_left, _ = padded_naive(q, k[:, :3], v[:, :3], causal=True)
    assert torch.allclose(out.double(), bottom_right, atol=1e-6)
    assert not torch.allclose(out.double(), top_left, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_keep_their_dtype_and_stay_within_the_rule(dtype):
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 33, 4, 32, dtype=dtype) for _ in range(3))
    out = flash_attn_func(q, k, v, causal=True)
    assert out.dtype == dtype
    expected, _ = padded_naive(q, k, v, causal=True)
    low, _ = reference.attention_ref(q, k, v, causal=True, upcast=False, reorder_ops=True)
    ours_err = (out.double() - expected).abs().max().item()
    low_err = (low.double() - expected).abs().max().item()
    assert low.dtype == dtype and low_err > 0  # the low-precision baseline really is low precision
    assert ours_err <= 2 * low_err + 1e-5


def test_window_size_may_be_a_tensor():
    torch.manual_seed(3)
    q, k, v = torch.randn(1, 8, 2, 8), torch.randn(1, 8, 2, 8), torch.randn(1, 8, 2, 8)
    a = flash_attn_func(q, k, v, window_size=torch.tensor([2, 1]))
    b = flash_attn_func(q, k, v, window_size=(2, 1))
    c = flash_attn_func(q, k, v)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_packed_forms_match_the_unpacked_call():
    torch.manual_seed(4)
    qkv = torch.randn(2, 7, 3, 4, 16)
    kv = torch.randn(2, 9, 2, 2, 16)
    q = torch.randn(2, 7, 4, 16)
    expected = flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True)
    assert torch.equal(flash_attn_qkvpacked_func(qkv, causal=True), expected)
    assert torch.equal(flash_attn_kvpacked_func(q, kv, causal=True), flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], causal=True))
    cu = torch.tensor([0, 7, 14], dtype=torch.int32)
    varlen = flash_attn_varlen_qkvpacked_func(qkv.flatten(0, 1), cu, 7, causal=True)
    assert torch.allclose(varlen, expected.flatten(0, 1), atol=1e-6)
    cu_k = torch.tensor([0, 9, 18], dtype=torch.int32)
    varlen_kv = flash_attn_varlen_kvpacked_func(q.flatten(0, 1), kv.flatten(0, 1), cu, cu_k, 7, 9, causal=True)
    assert torch.allclose(varlen_kv, flash_attn_kvpacked_func(q, kv, causal=True).flatten(0, 1), atol=1e-6)


def test_packed_gradients_reach_the_packed_tensor():
    torch.manual_seed(5)
    qkv = torch.randn(1, 5, 3, 2, 8, requires_grad=True)
    flash_attn_qkvpacked_func(qkv, causal=True).sum().backward()
    leaves = [qkv.detach()[:, :, i].clone().requires_grad_() for i in range(3)]
    flash_attn_func(*leaves, causal=True).sum().backward()
    assert torch.allclose(qkv.grad, torch.stack([t.grad for t in leaves], dim=2), atol=1e-6)


def test_seqlen_k_zero_gives_zeros_infinite_lse_and_zero_gradients():
    q = torch.randn(2, 4, 2, 8, requires_grad=True)
    k = torch.randn(2, 0, 2, 8, requires_grad=True)
    out, lse, _ = flash_attn_func(q, k, k, return_attn_probs=True)
    assert out.shape == q.shape and (out == 0).all() and torch.isposinf(lse).all()
    (dq,) = torch.autograd.grad(out.sum(), (q,))
    assert (dq == 0).all()


def test_empty_batches_and_empty_queries():
    q = torch.randn(0, 4, 2, 8)
    out, lse, _ = flash_attn_func(q, q, q, return_attn_probs=True)
    assert out.shape == (0, 4, 2, 8) and lse.shape == (0, 2, 4)
    q, k = torch.randn(2, 0, 2, 8), torch.randn(2, 5, 2, 8)
    out, lse, _ = flash_attn_func(q, k, k, return_attn_probs=True)
    assert out.shape == (2, 0, 2, 8) and lse.shape == (2, 2, 0)
    none = torch.zeros(1, dtype=torch.int32)
    out = flash_attn_varlen_func(torch.randn(0, 2, 8), torch.randn(0, 2, 8), torch.randn(0, 2, 8), none, none, 0, 0)
    assert out.shape == (0, 2, 8)


VARLEN_CASES = [dict(causal=True), dict(window=(2, 1)), dict(softcap=3.0, alibi="bh"), dict(alibi="h", window=(-1, 0))]


@pytest.mark.parametrize("case", VARLEN_CASES, ids=[str(c) for c in VARLEN_CASES])
def test_varlen_with_zero_length_sequences_matches_naive(case):
    torch.manual_seed(6)
    lens_q, lens_k = [3, 0, 5, 2, 4], [4, 2, 0, 6, 1]
    b, h, hk, d = 5, 4, 1, 8
    q = torch.randn(sum(lens_q), h, d)
    k, v = torch.randn(sum(lens_k), hk, d), torch.randn(sum(lens_k), hk, d)
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    case, alibi = case_args(case, b, h)
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, torch.tensor(5), 6, causal=case.get("causal", False),
                                         window_size=case.get("window", (-1, -1)), softcap=case.get("softcap", 0.0),
                                         alibi_slopes=alibi, return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (h, sum(lens_q))
    for i in range(b):
        qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        slopes = None if alibi is None else (alibi if alibi.dim() == 1 else alibi[i])
        expected, expected_lse = naive_attention(q[qs], k[ks], v[ks], alibi=slopes, **case)
        assert_matches(out[qs], lse[:, qs], expected, expected_lse)


def test_varlen_query_rows_after_the_last_sequence_get_zeros():
    torch.manual_seed(7)
    q, k = torch.randn(6, 2, 8), torch.randn(4, 2, 8)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    out, lse, _ = flash_attn_varlen_func(q, k, k, cu, cu, 4, 4, return_attn_probs=True)
    assert out.shape == q.shape and (out[4:] == 0).all() and torch.isposinf(lse[:, 4:]).all()
    expected, _ = naive_attention(q[:4], k, k)
    assert torch.allclose(out[:4].double(), expected, atol=1e-5)


def test_varlen_through_unpad_input_matches_the_padded_call():
    torch.manual_seed(8)
    b, s, h, d = 3, 6, 2, 8
    q, k, v = (torch.randn(b, s, h, d) for _ in range(3))
    mask = torch.arange(s)[None, :] < torch.tensor([6, 2, 4])[:, None]
    q_unpad, indices, cu, max_len, used = unpad_input(q, mask)
    k_unpad, v_unpad = unpad_input(k, mask)[0], unpad_input(v, mask)[0]
    out = pad_input(flash_attn_varlen_func(q_unpad, k_unpad, v_unpad, cu, cu, max_len, max_len, causal=True),
                    indices, b, s)
    for i, n in enumerate((6, 2, 4)):
        expected = flash_attn_func(q[i : i + 1, :n], k[i : i + 1, :n], v[i : i + 1, :n], causal=True)
        assert torch.allclose(out[i, :n], expected[0], atol=1e-6)
        assert (out[i, n:] == 0).all()


@pytest.mark.parametrize("page", [3, 4])
def test_paged_varlen_matches_naive(page):
    torch.manual_seed(9)
    h, hk, d = 4, 2, 8
    lens_q, lens_k = [2, 3], [5, 7]
    k_pages, v_pages = torch.randn(8, page, hk, d), torch.randn(8, page, hk, d)
    table = torch.tensor([[6, 1, 3], [0, 7, 2]], dtype=torch.int32)
    q = torch.randn(sum(lens_q), h, d)
    cu_q = torch.tensor([0, 2, 5], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 12], dtype=torch.int32)
    out = flash_attn_varlen_func(q, k_pages, v_pages, cu_q, cu_k, 3, 7, causal=True, block_table=table)
    for i in range(2):
        keys = k_pages[table[i].long()].flatten(0, 1)[: lens_k[i]]
        values = v_pages[table[i].long()].flatten(0, 1)[: lens_k[i]]
        expected, _ = naive_attention(q[cu_q[i] : cu_q[i + 1]], keys, values, causal=True)
        assert torch.allclose(out[cu_q[i] : cu_q[i + 1]].double(), expected, atol=1e-5)


@pytest.mark.parametrize("case", [dict(causal=True, softcap=3.0), dict(window=(2, 1), alibi="h")],
                         ids=["causal-softcap", "window-alibi"])
def test_gradients_match_naive(case):
    torch.manual_seed(10)
    q = torch.randn(1, 6, 2, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 7, 1, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 7, 1, 8, dtype=torch.float64, requires_grad=True)
    case, alibi = case_args(case, 1, 2)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    g = torch.randn(1, 6, 2, 8)
    flash_attn_func(q32, k32, v32, causal=case.get("causal", False), window_size=case.get("window", (-1, -1)),
                    softcap=case.get("softcap", 0.0), alibi_slopes=alibi).backward(g)
    expected, _ = padded_naive(q, k, v, alibi=alibi, **case)
    expected.backward(g.double())
    for ours, theirs in ((q32, q), (k32, k), (v32, v)):
        assert torch.allclose(ours.grad.double(), theirs.grad, atol=1e-5)


def test_lse_and_probs_carry_no_gradient():
    q, k, v = (torch.randn(1, 4, 2, 8, requires_grad=True) for _ in range(3))
    out, lse, probs = flash_attn_func(q, k, v, dropout_p=0.1, return_attn_probs=True)
    assert out.requires_grad and not lse.requires_grad and not probs.requires_grad


def test_chunked_queries_give_the_unchunked_result_and_gradients(monkeypatch):
    torch.manual_seed(11)
    q, k, v = (torch.randn(2, 40, 4, 16, requires_grad=True) for _ in range(3))
    whole = flash_attn_func(q, k, v, causal=True)
    whole_grads = torch.autograd.grad(whole.sum(), (q, k, v))
    chunks = []
    forward = reference._chunk_forward
    monkeypatch.setattr(reference, "_chunk_forward", lambda *a: chunks.append(len(a[3])) or forward(*a))
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 2 * 4 * 40 * 7)  # 7 query rows per chunk
    chunked = flash_attn_func(q, k, v, causal=True)
    assert chunks == [7, 7, 7, 7, 7, 5]  # really chunked
    assert torch.allclose(chunked, whole, atol=1e-6)
    for a, b in zip(torch.autograd.grad(chunked.sum(), (q, k, v)), whole_grads):
        assert torch.allclose(a, b, atol=1e-5)


def test_nan_propagates_to_the_rows_that_read_it():
    torch.manual_seed(12)
    q, k, v = torch.randn(1, 3, 2, 8), torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 8)
    q[0, 1, 0, 0] = math.nan
    out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True)
    assert torch.isnan(out[0, 1, 0]).all() and torch.isnan(lse[0, 0, 1])
    assert torch.isfinite(out[0, [0, 2]]).all() and torch.isfinite(out[0, 1, 1]).all()


def test_dropout_drops_the_requested_fraction_and_rescales():
    torch.manual_seed(13)
    q, k, v = torch.randn(2, 64, 4, 16), torch.randn(2, 64, 2, 16), torch.ones(2, 64, 2, 16)
    out, lse, probs = flash_attn_func(q, k, v, dropout_p=0.25, return_attn_probs=True)
    assert probs.shape == (2, 4, 128, 128)
    dropped = (probs[:, :, :64, :64] < 0).float().mean().item()
    assert abs(dropped - 0.25) < 0.01
    assert (probs[:, :, 64:] == 0).all() and (probs[:, :, :, 64:] == 0).all()  # the rounded-up padding
    # v = 1: each row sums its kept probabilities / (1 - p), which averages to 1.
    assert abs(out.mean().item() - 1.0) < 0.05 and out.std().item() > 0.05
    no_dropout = flash_attn_func(q, k, v)
    assert torch.allclose(no_dropout, torch.ones_like(no_dropout), atol=1e-5)
    # lse is taken before dropout
    assert torch.allclose(lse, flash_attn_func(q, k, v, return_attn_probs=True)[1], atol=1e-6)


def test_dropout_mask_gives_the_naive_dropout_result():
    torch.manual_seed(14)
    b, sq, sk, h, hk, d, p = 2, 5, 7, 4, 2, 8, 0.3
    q, k, v = torch.randn(b, sq, h, d), torch.randn(b, sk, hk, d), torch.randn(b, sk, hk, d)
    keep = torch.rand(b, h, 128, 128) >= p
    out, lse, probs = reference.attention_ref(q, k, v, causal=True, dropout_p=p, dropout_mask=keep, return_probs=True)
    expected, _ = padded_naive(q, k, v, causal=True, dropout_p=p, keep=keep)
    assert torch.allclose(out.double(), expected, atol=1e-5)
    assert torch.equal(probs[:, :, :sq, :sk] < 0, ~keep[:, :, :sq, :sk] & (probs[:, :, :sq, :sk] != 0))
    no_dropout, _ = padded_naive(q, k, v, causal=True)
    assert not torch.allclose(out.double(), no_dropout, atol=1e-3)


def test_varlen_dropout_statistics_and_probs_layout():
    torch.manual_seed(15)
    q, k, v = torch.randn(90, 2, 16), torch.randn(100, 2, 16), torch.randn(100, 2, 16)
    cu_q = torch.tensor([0, 40, 90], dtype=torch.int32)
    cu_k = torch.tensor([0, 30, 100], dtype=torch.int32)
    out, lse, probs = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 50, 70, dropout_p=0.2, return_attn_probs=True)
    assert probs.shape == (2, 2, 128, 128) and out.shape == q.shape
    assert (probs[0, :, 40:] == 0).all() and (probs[0, :, :, 30:] == 0).all()
    used = torch.cat([probs[0, :, :40, :30].flatten(), probs[1, :, :50, :70].flatten()])
    assert abs((used < 0).float().mean().item() - 0.2) < 0.02
    # flash-attn's S_dmask is unnormalised, exp(score - running max): each row's largest score gives 1
    assert torch.equal(probs[1, :, :50, :70].abs().amax(-1), torch.ones(2, 50))


def test_plain_entry_matches_the_problem_entry_in_both_layouts():
    torch.manual_seed(16)
    q, k, v = torch.randn(2, 5, 4, 8), torch.randn(2, 6, 2, 8), torch.randn(2, 6, 2, 8)
    out, lse = reference.attention_ref(q, k, v, causal=True, window_size=(2, -1), softcap=4.0)
    expected, expected_lse = padded_naive(q, k, v, causal=True, window=(2, -1), softcap=4.0)
    assert_matches(out, lse, expected, expected_lse)
    cu_q, cu_k = torch.tensor([0, 5, 10], dtype=torch.int32), torch.tensor([0, 6, 12], dtype=torch.int32)
    out_v, lse_v = reference.attention_ref(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_seqlens_q=cu_q,
                                           cu_seqlens_k=cu_k, causal=True, window_size=(2, -1), softcap=4.0)
    assert torch.allclose(out_v, out.flatten(0, 1), atol=1e-6)
    assert torch.allclose(lse_v, lse.permute(1, 0, 2).flatten(1), atol=1e-6)


def test_unpad_and_pad_round_trip():
    x = torch.randn(3, 5, 4, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    unpadded, indices, cu, max_len, used = unpad_input(x, mask)
    assert unpadded.shape == (8, 4) and cu.tolist() == [0, 3, 8, 8] and max_len == 5 and used.tolist() == [3, 5, 0]
    assert cu.dtype == torch.int32 and used.dtype == torch.int32 and isinstance(max_len, int)
    back = pad_input(unpadded, indices, 3, 5)
    assert torch.equal(back[mask], x[mask]) and (back[~mask] == 0).all()
    back.sum().backward()
    assert torch.equal(x.grad, mask[..., None].float().expand_as(x))
    assert torch.equal(index_first_axis(x.detach().flatten(0, 1), indices), x.detach()[mask])


def test_unpad_with_unused_tokens_keeps_them_and_reports_used_lengths():
    x = torch.arange(8.0).view(2, 4, 1)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    unused = torch.tensor([[0, 0, 1, 0], [0, 1, 1, 0]], dtype=torch.bool)
    unpadded, indices, cu, max_len, used = unpad_input(x, mask, unused)
    assert unpadded.flatten().tolist() == [0, 1, 2, 4, 5, 6] and cu.tolist() == [0, 3, 6]
    assert max_len == 3 and used.tolist() == [2, 1]


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
    torch.manual_seed(17)
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
    assert lse.shape == (b, h, sq) and lse.dtype == torch.float32
    for bb in range(b):
        start = int(leftpad[bb]) if leftpad is not None else 0
        end = int(seqlens[bb])
        positions = list(range(end, end + new))  # absolute cache rows, leftpad or not
        appended = rotate(k_new[bb], cos, sin, positions, interleaved)
        keys = logical_k(bb)
        assert torch.allclose(keys[end : end + new].double(), appended, atol=1e-5)  # written in place
        assert torch.equal(logical_v(bb)[end : end + new], v_new[bb])
        assert torch.equal(keys[:end], before_k[bb][:end]) and torch.equal(keys[end + new :], before_k[bb][end + new :])
        q_rot = rotate(q[bb], cos, sin, list(range(end, end + sq)), interleaved)
        expected, expected_lse = naive_attention(q_rot, keys[start : end + new], logical_v(bb)[start : end + new], causal=True)
        assert torch.allclose(out[bb].double(), expected, atol=1e-4)
        assert torch.allclose(lse[bb].double(), expected_lse, atol=1e-4)


def test_kvcache_without_new_keys_attends_to_cache_seqlens():
    torch.manual_seed(18)
    q, k_cache, v_cache = torch.randn(2, 1, 6, 16), torch.randn(2, 10, 3, 16), torch.randn(2, 10, 3, 16)
    before = k_cache.clone()
    out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor([4, 10], dtype=torch.int32))
    assert torch.equal(k_cache, before)
    for bb, n in enumerate((4, 10)):
        expected, _ = naive_attention(q[bb], k_cache[bb, :n], v_cache[bb, :n])
        assert torch.allclose(out[bb].double(), expected, atol=1e-5)
    whole = flash_attn_with_kvcache(q, k_cache, v_cache)  # no cache_seqlens: the whole cache
    assert torch.allclose(whole, flash_attn_func(q, k_cache, v_cache), atol=1e-6)
    as_int = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=4)
    assert torch.equal(as_int, flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor([4, 4], dtype=torch.int32)))
    assert torch.equal(as_int[0], out[0]) and not torch.allclose(as_int[1], out[1], atol=1e-3)


def test_kvcache_rotary_without_causal_puts_every_query_at_cache_seqlens():
    torch.manual_seed(19)
    q, k_cache, v_cache = torch.randn(1, 3, 2, 16), torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16)
    k_new, v_new = torch.randn(1, 2, 2, 16), torch.randn(1, 2, 2, 16)
    cos, sin = torch.randn(8, 8), torch.randn(8, 8)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cos, sin, cache_seqlens=3, rotary_interleaved=False)
    q_rot = rotate(q[0], cos, sin, [3, 3, 3], interleaved=False)
    expected, _ = naive_attention(q_rot, k_cache[0, :5], v_cache[0, :5])
    assert torch.allclose(out[0].double(), expected, atol=1e-5)
    per_token = rotate(q[0], cos, sin, [3, 4, 5], interleaved=False)
    assert not torch.allclose(per_token, q_rot, atol=1e-3)  # the two placements differ


def test_kvcache_local_window_rotates_queries_per_token():
    torch.manual_seed(20)
    q, k_cache, v_cache = torch.randn(1, 2, 2, 16), torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16)
    k_new, v_new = torch.randn(1, 2, 2, 16), torch.randn(1, 2, 2, 16)
    cos, sin = torch.randn(8, 8), torch.randn(8, 8)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cos, sin, cache_seqlens=4, window_size=(2, 0))
    q_rot = rotate(q[0], cos, sin, [4, 5], interleaved=True)
    expected, _ = naive_attention(q_rot, k_cache[0, :6], v_cache[0, :6], window=(2, 0))
    assert torch.allclose(out[0].double(), expected, atol=1e-5)
