"""Bad input raises TypeError or ValueError naming the argument, before anything runs; each case is paired
with the same call made valid."""

from __future__ import annotations

import pytest
import torch

from flash_attn_metal import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch):
    monkeypatch.setenv("FLASH_ATTN_METAL_BACKEND", "reference")


def qkv(b=2, s=8, h=4, hk=2, d=16, dtype=torch.float16):
    return torch.randn(b, s, h, d, dtype=dtype), torch.randn(b, s, hk, d, dtype=dtype), torch.randn(b, s, hk, d, dtype=dtype)


def check(good, bad, error, match):
    good()
    with pytest.raises(error, match=match):
        bad()


def test_dtypes():
    q, k, v = qkv()
    check(lambda: flash_attn_func(q, k, v), lambda: flash_attn_func(q.int(), k, v), TypeError, "q must be float16")
    check(lambda: flash_attn_func(q.float(), k.float(), v.float()),
          lambda: flash_attn_func(q.double(), k, v), TypeError, "q must be float16, bfloat16 or float32")
    check(lambda: flash_attn_func(q, k, v), lambda: flash_attn_func(q, k.bfloat16(), v), TypeError, "k has dtype")


def test_devices_differ():
    q, k, v = qkv()
    check(lambda: flash_attn_func(q, k, v), lambda: flash_attn_func(q, k.to("meta"), v), ValueError, "k is on meta")


def test_ranks_and_head_dims():
    q, k, v = qkv()
    check(lambda: flash_attn_func(q, k, v), lambda: flash_attn_func(q[0], k, v), ValueError, "q must have 4 dimensions")
    check(lambda: flash_attn_func(q, k, v), lambda: flash_attn_func(q, k[..., :8], v), ValueError, "share the head dim")
    big = torch.randn(1, 4, 2, 264, dtype=torch.float16)
    ok = torch.randn(1, 4, 2, 256, dtype=torch.float16)
    check(lambda: flash_attn_func(ok, ok, ok), lambda: flash_attn_func(big, big, big), ValueError, "between 1 and 256")
    empty_d = torch.randn(1, 4, 2, 0, dtype=torch.float16)
    check(lambda: flash_attn_func(ok, ok, ok), lambda: flash_attn_func(empty_d, empty_d, empty_d), ValueError,
          "between 1 and 256, got 0")


def test_heads_must_divide():
    q, k, v = qkv(h=4, hk=2)
    k3, v3 = torch.randn(2, 8, 3, 16, dtype=torch.float16), torch.randn(2, 8, 3, 16, dtype=torch.float16)
    check(lambda: flash_attn_func(q, k, v), lambda: flash_attn_func(q, k3, v3), ValueError, "multiple of the number")


def test_last_dim_contiguous():
    q, k, v = qkv()
    strided = torch.randn(2, 8, 4, 32, dtype=torch.float16)[..., ::2]
    check(lambda: flash_attn_func(q, k, v), lambda: flash_attn_func(strided, k, v), ValueError, "contiguous last dimension")


def test_window_and_dropout_and_softcap():
    q, k, v = qkv()
    check(lambda: flash_attn_func(q, k, v, window_size=(-1, 3)),
          lambda: flash_attn_func(q, k, v, window_size=(-2, 3)), ValueError, "window_size entries must be >= -1")
    check(lambda: flash_attn_func(q, k, v, dropout_p=0.5),
          lambda: flash_attn_func(q, k, v, dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)")
    check(lambda: flash_attn_func(q, k, v, softcap=5.0),
          lambda: flash_attn_func(q, k, v, softcap=5.0, dropout_p=0.1), ValueError, "softcap does not support dropout")


def test_alibi_slopes():
    q, k, v = qkv()
    check(lambda: flash_attn_func(q, k, v, alibi_slopes=torch.rand(2, 4)),
          lambda: flash_attn_func(q, k, v, alibi_slopes=torch.rand(3)), ValueError, r"alibi_slopes must have shape \(4,\)")
    check(lambda: flash_attn_func(q, k, v, alibi_slopes=torch.rand(4)),
          lambda: flash_attn_func(q, k, v, alibi_slopes=torch.rand(4).half()), TypeError, "alibi_slopes must be float32")


def varlen(cu_q=None, max_q=5):
    q = torch.randn(8, 4, 16, dtype=torch.float16)
    k = torch.randn(8, 2, 16, dtype=torch.float16)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    return flash_attn_varlen_func(q, k, k, cu if cu_q is None else cu_q, cu, max_q, 5)


def test_cu_seqlens_and_max_seqlen():
    check(varlen, lambda: varlen(torch.tensor([0, 3, 8], dtype=torch.int64)), TypeError, "cu_seqlens_q must be int32")
    check(varlen, lambda: varlen(torch.tensor([[0, 3, 8]], dtype=torch.int32)), ValueError, "cu_seqlens_q must be 1-D")
    check(varlen, lambda: varlen(torch.tensor([1, 3, 8], dtype=torch.int32)), ValueError, "must start at 0")
    check(varlen, lambda: varlen(torch.tensor([0, 5, 3], dtype=torch.int32)), ValueError, "non-decreasing")
    check(varlen, lambda: varlen(max_q=4), ValueError, "max_seqlen_q is 4 but the longest sequence has 5")
    check(lambda: varlen(max_q=torch.tensor(5)), lambda: varlen(max_q=2.5), TypeError, "max_seqlen_q must be an int")


def test_block_table_too_short():
    q = torch.randn(2, 1, 4, 16, dtype=torch.float16)
    k_cache = torch.randn(6, 4, 2, 16, dtype=torch.float16)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    seqlens = torch.tensor([8, 5], dtype=torch.int32)
    check(lambda: flash_attn_with_kvcache(q, k_cache, k_cache, cache_seqlens=seqlens, block_table=table),
          lambda: flash_attn_with_kvcache(q, k_cache, k_cache, cache_seqlens=seqlens + 1, block_table=table),
          ValueError, "block_table")


def test_inputs_are_not_modified():
    q, k, v = qkv()
    copies = [t.clone() for t in (q, k, v)]
    flash_attn_func(q, k, v, causal=True)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), copies))
