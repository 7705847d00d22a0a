"""`sinks=` through flash_attn_func, flash_attn_varlen_func and flash_attn_with_kvcache in the emulator, against the
fp32 reference under the upstream rule: forward, lse and gradients, the sinks' own included (ops.sink_gradient).

Strict mode: a fallback fails the test. The forward starts each row's softmax at its sink (or, split over keys, the
combine kernel adds it once); the backward needs nothing of its own for them.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import flash_attn_metal
from flash_attn_metal import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
from flash_attn_metal.problem import AttentionProblem, KVCache
from flash_attn_metal.reference import attention

SLACK = 1e-4


pytestmark = pytest.mark.usefixtures("emulator_strict")


def run_quietly(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def problem(q, k, v, sinks, causal, **varlen):
    return AttentionProblem(q=q, k=k, v=v, softmax_scale=q.shape[-1] ** -0.5, causal=causal, window_left=-1,
                            window_right=0 if causal else -1, softcap=0.0, alibi_slopes=None, dropout_p=0.0,
                            sinks=sinks, **varlen)


def assert_within_rule(ours, exact, low, factor, name):
    err = (ours.float() - exact.float()).abs().max().item()
    bound = factor * (low.float() - exact.float()).abs().max().item() + SLACK
    assert err <= bound, f"{name}: max error {err:.3e} exceeds {bound:.3e}"


def check(leaves, run, make_problem, grads=True):
    """`run(*leaves)` -> (out, lse) against the reference on `make_problem(*leaves)`, and gradients for every leaf."""
    out, lse = run(*leaves)
    assert flash_attn_metal.stats()["launches"]
    results = {}
    for upcast in (True, False):
        copies = [t.detach().clone().requires_grad_(grads) for t in leaves]
        ref_out, ref_lse = attention(make_problem(*copies), upcast=upcast)
        results[upcast] = copies, ref_out, ref_lse
    (exact_leaves, exact, exact_lse), (low_leaves, low, _) = results[True], results[False]
    assert_within_rule(out, exact, low, 2, "out")
    assert torch.allclose(lse, exact_lse) or (lse - exact_lse).abs().max() <= 1e-4
    if not grads:
        return
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, leaves, grad)
    exacts = torch.autograd.grad(exact, exact_leaves, grad.to(exact.dtype))
    lows = torch.autograd.grad(low, low_leaves, grad.to(low.dtype))
    for name, g, e, lo in zip(("dq", "dk", "dv", "dsinks"), ours, exacts, lows):
        assert_within_rule(g, e, lo, 3, name)
    assert ours[3].abs().max() > 1e-3


def test_padded_sinks_with_rows_that_see_no_key():
    torch.manual_seed(0)
    q = torch.randn(2, 40, 4, 64, dtype=torch.float16, requires_grad=True)
    k, v = (torch.randn(2, 24, 2, 64, dtype=torch.float16, requires_grad=True) for _ in range(2))
    sinks = torch.randn(4, requires_grad=True)

    def run(q, k, v, sinks):  # causal, bottom-right: query rows 0..15 see no key, only the sink
        out, lse, _ = run_quietly(flash_attn_func, q, k, v, causal=True, sinks=sinks, return_attn_probs=True)
        return out, lse

    check([q, k, v, sinks], run, lambda q, k, v, s: problem(q, k, v, s, True, max_seqlen_q=40, max_seqlen_k=24))


def test_varlen_sinks():
    torch.manual_seed(1)
    cu_q, cu_k = torch.tensor([0, 17, 50], dtype=torch.int32), torch.tensor([0, 30, 41], dtype=torch.int32)
    q = torch.randn(50, 4, 64, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(41, 4, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    sinks = torch.randn(4, requires_grad=True)
    varlen = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=33, max_seqlen_k=30)

    def run(q, k, v, sinks):
        out, lse, _ = run_quietly(flash_attn_varlen_func, q, k, v, cu_q, cu_k, 33, 30, causal=True, sinks=sinks,
                                  return_attn_probs=True)
        return out, lse

    check([q, k, v, sinks], run, lambda q, k, v, s: problem(q, k, v, s, True, **varlen))


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("sq, path", [(3, "attention_decode"), (12, "attention_forward")])
def test_kvcache_sinks(sq, path, splits):
    """The decode kernels (short queries) and the block forward: unsplit, each row's softmax starts at (or, in
    decode, ends with) its sink; split over keys, the combine kernel adds it once."""
    torch.manual_seed(2)
    q = torch.randn(2, sq, 4, 32)
    k_cache, v_cache = torch.randn(2, 40, 2, 32), torch.randn(2, 40, 2, 32)
    sinks = torch.randn(4)
    seqlens = torch.tensor([17, 40], dtype=torch.int32)

    def run(q, sinks):
        return run_quietly(flash_attn_with_kvcache, q, k_cache, v_cache, cache_seqlens=seqlens, causal=True,
                           sinks=sinks, return_softmax_lse=True, num_splits=splits)

    def make_problem(q, sinks):
        return AttentionProblem(q=q, k=k_cache, v=v_cache, softmax_scale=32**-0.5, causal=True, window_left=-1,
                                window_right=0, softcap=0.0, alibi_slopes=None, dropout_p=0.0, max_seqlen_q=sq,
                                max_seqlen_k=40, sinks=sinks,
                                kv_cache=KVCache(seqlens, torch.zeros(2, dtype=torch.int32),
                                                 torch.arange(2, dtype=torch.int32), None))

    check([q, sinks], run, make_problem, grads=False)
    launched = flash_attn_metal.stats()["launches"]
    assert all(name.startswith(path) for name in launched)
    assert any(name.endswith("_combine") for name in launched) == (splits > 1)
