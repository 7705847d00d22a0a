"""The reference's attention masks, sinks and top-left alignment against the float64 naive attention in naive.py,
forward and gradients (sinks included), through AttentionProblem and through the public functions' `sinks=`."""

from __future__ import annotations

import math

import pytest
import torch

from flash_attn_metal import ArgumentError, flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
from flash_attn_metal.ops import sink_gradient
from flash_attn_metal.problem import AttentionProblem
from flash_attn_metal.reference import attention
from naive import naive_attention


pytestmark = pytest.mark.usefixtures("reference_backend")


def problem(q, k, v, *, causal=False, window=(-1, -1), alibi=None, mask=None, sinks=None, top_left=False):
    return AttentionProblem(q=q, k=k, v=v, softmax_scale=q.shape[-1] ** -0.5, causal=causal, window_left=window[0],
                            window_right=0 if causal else window[1], softcap=0.0, alibi_slopes=alibi, dropout_p=0.0,
                            max_seqlen_q=q.shape[1], max_seqlen_k=k.shape[1], attn_mask=mask, sinks=sinks,
                            top_left=top_left)


def naive_batch(q, k, v, mask=None, **kw):
    """naive_attention per batch entry; mask (b, h, sq, sk)."""
    runs = [naive_attention(q[b], k[b], v[b], mask=None if mask is None else mask[b], **kw) for b in range(q.shape[0])]
    return torch.stack([o for o, _ in runs]), torch.stack([lse for _, lse in runs])


def assert_close(out, lse, expected, expected_lse, atol=1e-5):
    assert torch.allclose(out.double(), expected, atol=atol), (out.double() - expected).abs().max()
    assert torch.equal(torch.isposinf(lse), torch.isposinf(expected_lse))
    finite = torch.isfinite(expected_lse)
    assert torch.allclose(lse.double()[finite], expected_lse[finite], atol=atol)


def masks(b, h, sq, sk):
    """Bool and float masks of every broadcast shape, as the strided views the problem holds, with a fully
    masked row (query row 1 of batch entry 0) in each."""
    torch.manual_seed(3)
    shapes = {"(sq, sk)": (1, 1, sq, sk), "(b, 1, 1, sk)": (b, 1, 1, sk), "(1, h, sq, sk)": (1, h, sq, sk),
              "(b, h, sq, sk)": (b, h, sq, sk)}
    out = {}
    for name, shape in shapes.items():
        keep = torch.rand(shape) > 0.3
        keep[0, :, min(1, shape[2] - 1)] = False
        bias = torch.randn(shape).masked_fill(~keep, -math.inf)
        out[f"bool {name}"] = keep
        out[f"float {name}"] = bias
    return out


MASKS = masks(2, 4, 6, 9)


@pytest.mark.parametrize("name", MASKS)
def test_masks_of_every_broadcast_shape_match_naive(name):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 4, 16), torch.randn(2, 9, 2, 16), torch.randn(2, 9, 2, 16)
    view = MASKS[name].expand(2, 4, 6, 9)  # stride 0 on the broadcast dims, as the problem holds it
    out, lse = attention(problem(q, k, v, mask=view))
    expected, expected_lse = naive_batch(q, k, v, mask=view)
    assert_close(out, lse, expected, expected_lse)
    if view.shape[2] > 1:  # the row masked out everywhere: torch's math path gives out = 0
        assert (out[0, 1] == 0).all() and torch.isposinf(lse[0, :, 1]).all()


def test_a_mask_is_indexed_by_batch_head_query_and_key():
    """Negative control: the transposed mask (keys and queries swapped) gives another answer."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 8, 2, 16) for _ in range(3))
    keep = torch.rand(1, 2, 8, 8) > 0.5
    keep |= torch.eye(8, dtype=torch.bool)  # no fully masked row
    expected, _ = naive_batch(q, k, v, mask=keep)
    assert torch.allclose(attention(problem(q, k, v, mask=keep))[0].double(), expected, atol=1e-5)
    assert not torch.allclose(attention(problem(q, k, v, mask=keep.transpose(2, 3)))[0].double(), expected, atol=1e-2)


@pytest.mark.parametrize("case", [dict(causal=True), dict(window=(2, 1)), dict(causal=True, alibi=True)],
                         ids=["causal", "window", "causal-alibi"])
@pytest.mark.parametrize("sq, sk", [(5, 9), (9, 5)])
def test_top_left_alignment_matches_naive(case, sq, sk):
    torch.manual_seed(2)
    q, k, v = torch.randn(2, sq, 2, 16), torch.randn(2, sk, 2, 16), torch.randn(2, sk, 2, 16)
    alibi = torch.rand(2) * 0.5 if case.pop("alibi", False) else None
    out, lse = attention(problem(q, k, v, alibi=alibi, top_left=True, **case))
    expected, expected_lse = naive_batch(q, k, v, alibi=alibi, top_left=True, **case)
    assert_close(out, lse, expected, expected_lse)
    bottom_right, _ = naive_batch(q, k, v, alibi=alibi, **case)
    assert not torch.allclose(out.double(), bottom_right, atol=1e-2)  # the alignment is not a no-op here


def test_top_left_causal_is_torchs_is_causal():
    torch.manual_seed(4)
    q, k, v = torch.randn(1, 7, 2, 16), torch.randn(1, 11, 2, 16), torch.randn(1, 11, 2, 16)
    out, _ = attention(problem(q, k, v, causal=True, top_left=True))
    views = (t.transpose(1, 2) for t in (q, k, v))
    torch_out = torch.nn.functional.scaled_dot_product_attention(*views, is_causal=True)
    assert torch.allclose(out, torch_out.transpose(1, 2), atol=1e-5)


SINK_CASES = [dict(), dict(causal=True), dict(window=(3, 0)), dict(causal=True, mask=True)]


@pytest.mark.parametrize("case", SINK_CASES, ids=["full", "causal", "window", "causal-mask"])
@pytest.mark.parametrize("sq, sk", [(6, 6), (9, 4)])  # 9 x 4 causal: rows 0..4 see no key, only the sink
def test_sinks_forward_and_gradients_match_naive(case, sq, sk):
    torch.manual_seed(5)
    case = dict(case)
    q, k, v = (torch.randn(2, n, h, 16, dtype=torch.float64, requires_grad=True)
               for n, h in ((sq, 4), (sk, 2), (sk, 2)))
    sinks = torch.randn(4, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(2, 4, sq, sk) > 0.4) if case.pop("mask", False) else None
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v, sinks)]
    out, lse = attention(problem(*leaves[:3], sinks=leaves[3], mask=mask, **case))
    expected, expected_lse = naive_batch(q, k, v, sinks=sinks, mask=mask, **case)
    assert_close(out, lse, expected, expected_lse)
    grad = torch.randn_like(expected)
    ours = torch.autograd.grad(out, leaves, grad.float())
    theirs = torch.autograd.grad(expected, (q, k, v, sinks), grad)
    for name, a, b in zip(("dq", "dk", "dv", "dsinks"), ours, theirs):
        assert torch.allclose(a.double(), b, atol=1e-5), name
    assert ours[3].abs().max() > 1e-3  # the sinks do get a gradient


def test_a_row_with_no_key_gives_zero_out_and_the_sink_as_lse():
    torch.manual_seed(6)
    q, k = torch.randn(1, 5, 2, 8), torch.randn(1, 2, 2, 8)
    sinks = torch.tensor([0.5, -math.inf])
    out, lse = attention(problem(q, k, k, causal=True, sinks=sinks))  # rows 0..2 see no key
    assert (out[:, :3] == 0).all()
    assert torch.equal(lse[0, :, :3], torch.tensor([[0.5] * 3, [math.inf] * 3]))  # a -inf sink is no sink
    empty = torch.randn(1, 0, 2, 8)
    out, lse = attention(problem(q, empty, empty, sinks=sinks))
    assert (out == 0).all() and torch.equal(lse[0, :, 0], torch.tensor([0.5, math.inf]))


def test_fully_masked_rows_have_zero_gradients_without_nan():
    """A float mask of -inf everywhere in a row (and a -inf sink) must not turn the logsumexp's gradient to NaN."""
    q, k, v = (torch.randn(1, 3, 1, 8, requires_grad=True) for _ in range(3))
    bias = torch.zeros(1, 1, 3, 3)
    bias[0, 0, 1] = -math.inf
    sinks = torch.tensor([-math.inf], requires_grad=True)
    out, _ = attention(problem(q, k, v, mask=bias, sinks=sinks))
    grads = torch.autograd.grad(out.sum(), (q, k, v, sinks))
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][0, 1] == 0).all() and (out[0, 1] == 0).all()


def test_public_functions_take_sinks():
    torch.manual_seed(7)
    q, k, v = torch.randn(2, 5, 4, 16), torch.randn(2, 7, 2, 16), torch.randn(2, 7, 2, 16)
    sinks = torch.randn(4)
    out, lse, _ = flash_attn_func(q, k, v, causal=True, sinks=sinks, return_attn_probs=True)
    expected, expected_lse = naive_batch(q, k, v, causal=True, sinks=sinks)
    assert_close(out, lse, expected, expected_lse)
    assert not torch.allclose(out, flash_attn_func(q, k, v, causal=True), atol=1e-3)  # the sinks took part

    cu_q, cu_k = torch.tensor([0, 5, 10], dtype=torch.int32), torch.tensor([0, 7, 14], dtype=torch.int32)
    out = flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, 5, 7, causal=True,
                                 sinks=sinks)
    assert torch.allclose(out.view(2, 5, 4, 16).double(), expected, atol=1e-5)

    k_cache, v_cache = k.clone(), v.clone()
    out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=7, causal=True, sinks=sinks)
    assert torch.allclose(out.double(), expected, atol=1e-5)


@pytest.mark.parametrize("sinks, error, match", [
    ([0.0] * 4, TypeError, "sinks must be a torch.Tensor"),
    (torch.zeros(4, dtype=torch.float16), ArgumentError, "sinks must be float32"),
    (torch.zeros(2), ValueError, r"sinks must have shape \(4,\)"),
    (torch.zeros(1, 4), ValueError, r"sinks must have shape \(4,\)"),
    (torch.zeros(4, device="meta"), ValueError, "sinks is on meta"),
])
def test_bad_sinks_are_rejected(sinks, error, match):
    q = torch.randn(1, 3, 4, 8)
    flash_attn_func(q, q, q, sinks=torch.zeros(4))  # the must-pass twin
    with pytest.raises(error, match=match):
        flash_attn_func(q, q, q, sinks=sinks)


@pytest.mark.parametrize("varlen", [False, True], ids=["padded", "varlen"])
def test_sink_gradient_formula_matches_autograd(varlen):
    """ops.sink_gradient (the kernels' dsinks, from out, dout and lse) against autograd through the reference."""
    torch.manual_seed(8)
    q, k, v = torch.randn(2, 6, 4, 16), torch.randn(2, 5, 2, 16), torch.randn(2, 5, 2, 16)
    sinks = torch.randn(4, requires_grad=True)
    out, lse = attention(problem(q, k, v, causal=True, sinks=sinks))
    dout = torch.randn_like(out)
    (expected,) = torch.autograd.grad(out, sinks, dout)
    out, lse = out.detach(), lse.detach()
    if varlen:  # (total_q, h, d) rows and (h, total_q) lse
        out, dout, lse = out.flatten(0, 1), dout.flatten(0, 1), lse.permute(1, 0, 2).flatten(1)
    assert torch.allclose(sink_gradient(sinks.detach(), out, dout, lse, varlen), expected, atol=1e-5)
    assert not torch.allclose(sink_gradient(sinks.detach() + 1, out, dout, lse, varlen), expected, atol=1e-3)
