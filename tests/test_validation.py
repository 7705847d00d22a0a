"""Bad input raises TypeError (a wrong Python type) or ArgumentError (a ValueError and a RuntimeError: a wrong
value, shape, dtype or device) naming the argument, before anything runs; each case is paired with the same call
made valid."""

from __future__ import annotations

import pytest
import torch

import flash_attn_metal
from flash_attn_metal import (
    ArgumentError,
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)


pytestmark = pytest.mark.usefixtures("reference_backend")


def qkv(b=2, s=8, h=4, hk=2, d=16, dtype=torch.float16):
    return torch.randn(b, s, h, d, dtype=dtype), torch.randn(b, s, hk, d, dtype=dtype), torch.randn(b, s, hk, d, dtype=dtype)


def check(good, bad, error, match):
    good()
    with pytest.raises(error, match=match):
        bad()


def test_dtypes():
    q, k, v = qkv()
    check(lambda: flash_attn_func(q, k, v), lambda: flash_attn_func(q.int(), k, v), ArgumentError, "q must be float16")
    check(lambda: flash_attn_func(q.float(), k.float(), v.float()),
          lambda: flash_attn_func(q.double(), k, v), ArgumentError, "q must be float16, bfloat16 or float32")
    check(lambda: flash_attn_func(q, k, v), lambda: flash_attn_func(q, k.bfloat16(), v), ArgumentError, "k has dtype")
    check(lambda: flash_attn_func(q, k, v), lambda: flash_attn_func(q, k, v.float()), ArgumentError, "v has dtype")
    check(lambda: flash_attn_func(q, k, v), lambda: flash_attn_func(q.tolist(), k, v), TypeError, "q must be a torch.Tensor")


def test_devices_differ():
    q, k, v = qkv()
    check(lambda: flash_attn_func(q, k, v), lambda: flash_attn_func(q, k.to("meta"), v), ArgumentError, "k is on meta")


def test_ranks_and_head_dims():
    q, k, v = qkv()
    check(lambda: flash_attn_func(q, k, v), lambda: flash_attn_func(q[0], k, v), ArgumentError, "q must have 4 dimensions")
    check(lambda: flash_attn_func(q, k, v), lambda: flash_attn_func(q, k[..., :8], v), ArgumentError, "share the head dim")
    big = torch.randn(1, 4, 2, 264, dtype=torch.float16)
    ok = torch.randn(1, 4, 2, 256, dtype=torch.float16)
    check(lambda: flash_attn_func(ok, ok, ok), lambda: flash_attn_func(big, big, big), ArgumentError, "between 1 and 256")
    empty_d = torch.randn(1, 4, 2, 0, dtype=torch.float16)
    check(lambda: flash_attn_func(ok, ok, ok), lambda: flash_attn_func(empty_d, empty_d, empty_d), ArgumentError,
          "between 1 and 256, got 0")
    odd = torch.randn(1, 4, 2, 59, dtype=torch.float16)  # any head dim up to 256, not only multiples of 8
    check(lambda: flash_attn_func(odd, odd, odd), lambda: flash_attn_func(odd, odd, ok), ArgumentError, "share the head dim")


def test_shapes_that_must_agree():
    q, k, v = qkv()
    check(lambda: flash_attn_func(q, k, v), lambda: flash_attn_func(q, k, v[:, :5]), ArgumentError,
          "k and v must have the same batch and sequence sizes")
    check(lambda: flash_attn_func(q, k, v), lambda: flash_attn_func(q, k[:1], v[:1]), ArgumentError,
          "q and k must have the same batch size")
    check(lambda: flash_attn_func(q, k, v), lambda: flash_attn_func(q, k, v[:, :, :1]), ArgumentError,
          "k and v must have the same number of heads")


def test_heads_must_divide():
    q, k, v = qkv(h=4, hk=2)
    k3, v3 = torch.randn(2, 8, 3, 16, dtype=torch.float16), torch.randn(2, 8, 3, 16, dtype=torch.float16)
    check(lambda: flash_attn_func(q, k, v), lambda: flash_attn_func(q, k3, v3), ArgumentError, "multiple of the number")


def test_last_dim_contiguous():
    q, k, v = qkv()
    strided = torch.randn(2, 8, 4, 32, dtype=torch.float16)[..., ::2]
    transposed = torch.randn(2, 4, 8, 16, dtype=torch.float16).transpose(1, 2)  # other strides are fine
    check(lambda: flash_attn_func(transposed, k, v), lambda: flash_attn_func(strided, k, v), ArgumentError,
          "contiguous last dimension")


def test_packed_layouts():
    packed = torch.randn(2, 8, 3, 4, 16)
    check(lambda: flash_attn_qkvpacked_func(packed), lambda: flash_attn_qkvpacked_func(packed[:, :, :2]), ArgumentError,
          r"qkv must be laid out as \(batch, seqlen, 3, nheads, headdim\)")
    check(lambda: flash_attn_qkvpacked_func(packed), lambda: flash_attn_qkvpacked_func(packed[0]), ArgumentError,
          "qkv must have 5 dimensions")
    q, kv = torch.randn(2, 8, 4, 16), torch.randn(2, 8, 2, 2, 16)
    check(lambda: flash_attn_kvpacked_func(q, kv), lambda: flash_attn_kvpacked_func(q, kv.int()), ArgumentError,
          "kv must be float16")
    cu = torch.tensor([0, 16], dtype=torch.int32)
    check(lambda: flash_attn_varlen_qkvpacked_func(packed.flatten(0, 1), cu, 16),
          lambda: flash_attn_varlen_qkvpacked_func(packed, cu, 16), ArgumentError, "qkv must have 4 dimensions")


def test_scalar_options():
    q, k, v = qkv()
    check(lambda: flash_attn_func(q, k, v, window_size=(-1, 3)),
          lambda: flash_attn_func(q, k, v, window_size=(-2, 3)), ArgumentError, "window_size entries must be between -1")
    check(lambda: flash_attn_func(q, k, v, window_size=torch.tensor([2, 3])),
          lambda: flash_attn_func(q, k, v, window_size=torch.tensor([2.0, 3.0])), TypeError, "window_size must hold integers")
    check(lambda: flash_attn_func(q, k, v, window_size=[2, 3]),
          lambda: flash_attn_func(q, k, v, window_size=(2, 3, 4)), TypeError, r"window_size must be a pair")
    check(lambda: flash_attn_func(q, k, v, dropout_p=0.5),
          lambda: flash_attn_func(q, k, v, dropout_p=1.0), ArgumentError, r"dropout_p must be in \[0, 1\)")
    check(lambda: flash_attn_func(q, k, v, dropout_p=0),
          lambda: flash_attn_func(q, k, v, dropout_p=-0.1), ArgumentError, r"dropout_p must be in \[0, 1\)")
    check(lambda: flash_attn_func(q, k, v, dropout_p=torch.tensor(0.1)),
          lambda: flash_attn_func(q, k, v, dropout_p="0.1"), TypeError, "dropout_p must be a real number")
    check(lambda: flash_attn_func(q, k, v, softcap=5.0),
          lambda: flash_attn_func(q, k, v, softcap=5.0, dropout_p=0.1), ArgumentError, "softcap does not support dropout")
    check(lambda: flash_attn_func(q, k, v, softcap=5),
          lambda: flash_attn_func(q, k, v, softcap=None), TypeError, "softcap must be a real number")
    check(lambda: flash_attn_func(q, k, v, softmax_scale=0.5),
          lambda: flash_attn_func(q, k, v, softmax_scale="0.5"), TypeError, "softmax_scale must be a real number")


def test_alibi_slopes():
    q, k, v = qkv()
    check(lambda: flash_attn_func(q, k, v, alibi_slopes=torch.rand(2, 4)),
          lambda: flash_attn_func(q, k, v, alibi_slopes=torch.rand(3)), ArgumentError, r"alibi_slopes must have shape \(4,\)")
    check(lambda: flash_attn_func(q, k, v, alibi_slopes=torch.rand(4)),
          lambda: flash_attn_func(q, k, v, alibi_slopes=torch.rand(4).half()), ArgumentError, "alibi_slopes must be float32")
    check(lambda: flash_attn_func(q, k, v, alibi_slopes=torch.rand(4)),
          lambda: flash_attn_func(q, k, v, alibi_slopes=torch.rand(4, device="meta")), ArgumentError, "alibi_slopes is on meta")
    check(lambda: flash_attn_func(q, k, v, alibi_slopes=torch.rand(4)),
          lambda: flash_attn_func(q, k, v, alibi_slopes=[0.1] * 4), TypeError, "alibi_slopes must be a torch.Tensor")


def varlen(cu_q=None, max_q=5, cu_k=None, max_k=5):
    q = torch.randn(8, 4, 16, dtype=torch.float16)
    k = torch.randn(8, 2, 16, dtype=torch.float16)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    return flash_attn_varlen_func(q, k, k, cu if cu_q is None else cu_q, cu if cu_k is None else cu_k, max_q, max_k)


def test_cu_seqlens_and_max_seqlen():
    check(varlen, lambda: varlen(torch.tensor([0, 3, 8], dtype=torch.int64)), ArgumentError, "cu_seqlens_q must be int32")
    check(varlen, lambda: varlen(torch.tensor([[0, 3, 8]], dtype=torch.int32)), ArgumentError, "cu_seqlens_q must be 1-D")
    check(varlen, lambda: varlen(torch.tensor([1, 3, 8], dtype=torch.int32)), ArgumentError, "must start at 0")
    check(varlen, lambda: varlen(torch.tensor([0, 5, 3], dtype=torch.int32)), ArgumentError, "non-decreasing")
    check(varlen, lambda: varlen(cu_k=torch.tensor([0, 3, 9], dtype=torch.int32)), ArgumentError,
          "cu_seqlens_k ends at 9 but the tensor holds only 8 tokens")
    check(varlen, lambda: varlen(cu_k=torch.tensor([0, 8], dtype=torch.int32)), ArgumentError,
          "cu_seqlens_q and cu_seqlens_k must have the same length")
    check(varlen, lambda: varlen(cu_k=torch.tensor([0, 3, 8], dtype=torch.int32, device="meta")), ArgumentError,
          "cu_seqlens_k is on meta")
    check(varlen, lambda: varlen(cu_q=[0, 3, 8]), TypeError, "cu_seqlens_q must be a torch.Tensor")
    check(varlen, lambda: varlen(max_q=4), ArgumentError, "max_seqlen_q is 4 but the longest sequence has 5")
    check(varlen, lambda: varlen(max_k=2), ArgumentError, "max_seqlen_k is 2 but the longest sequence has 5")
    check(lambda: varlen(max_q=torch.tensor(5)), lambda: varlen(max_q=2.5), TypeError, "max_seqlen_q must be an int")


def test_varlen_block_table():
    q = torch.randn(5, 4, 16)
    pages = torch.randn(6, 4, 2, 16)
    cu_q = torch.tensor([0, 2, 5], dtype=torch.int32)
    cu_k = torch.tensor([0, 8, 13], dtype=torch.int32)
    table = torch.tensor([[0, 1, 2, 3], [4, 5, 0, 1]], dtype=torch.int32)
    check(lambda: flash_attn_varlen_func(q, pages, pages, cu_q, cu_k, 3, 8, block_table=table),
          lambda: flash_attn_varlen_func(q, pages, pages, cu_q, cu_k, 3, 8, block_table=table[:, :1]),
          ArgumentError, "block_table")
    check(lambda: flash_attn_varlen_func(q, pages, pages, cu_q, cu_k, 3, 8, block_table=table),
          lambda: flash_attn_varlen_func(q, pages, pages, cu_q, cu_k, 3, 8, block_table=table.long()),
          ArgumentError, "block_table must be a 2-D int32 tensor")
    check(lambda: flash_attn_varlen_func(q, pages, pages, cu_q, cu_k, 3, 8, block_table=table),
          lambda: flash_attn_varlen_func(q, pages, pages, cu_q, cu_k, 3, 8, block_table=table + 3),
          ArgumentError, "block_table addresses cache entries outside 0..5")


def cache_call(**overrides):
    """A valid flash_attn_with_kvcache call on fresh tensors, with `overrides` replacing arguments."""
    b, h, hk, d = 2, 4, 2, 32
    args = dict(q=torch.randn(b, 1, h, d), k_cache=torch.zeros(b, 8, hk, d), v_cache=torch.zeros(b, 8, hk, d),
                k=torch.randn(b, 1, hk, d), v=torch.randn(b, 1, hk, d), rotary_cos=torch.randn(8, 8),
                rotary_sin=torch.randn(8, 8), cache_seqlens=torch.tensor([3, 7], dtype=torch.int32))
    args.update(overrides)
    return flash_attn_with_kvcache(**args)


KVCACHE_CASES = [
    (dict(v=None), ArgumentError, "k and v must be given together"),
    (dict(cache_seqlens=None), ArgumentError, "cache_seqlens is required"),
    (dict(cache_seqlens=torch.tensor([3, 7])), ArgumentError, "cache_seqlens must be an int or an int32 tensor"),
    (dict(cache_seqlens=torch.tensor([-1, 7], dtype=torch.int32)), ArgumentError, "cache_seqlens must be >= 0"),
    (dict(cache_seqlens=torch.tensor([3, 8], dtype=torch.int32)), ArgumentError, "sequence 1 needs 9 cache rows"),
    (dict(cache_leftpad=torch.tensor([4, 0], dtype=torch.int32)), ArgumentError, "cache_leftpad"),
    (dict(cache_batch_idx=torch.tensor([0, 2], dtype=torch.int32)), ArgumentError, "cache_batch_idx addresses"),
    (dict(cache_batch_idx=torch.tensor([0, 1])), ArgumentError, "cache_batch_idx must be an int or an int32 tensor"),
    (dict(k=torch.randn(2, 1, 4, 32), v=torch.randn(2, 1, 4, 32)), ArgumentError, "k and v must have shape"),
    (dict(v_cache=torch.zeros(2, 7, 2, 32)), ArgumentError, "k_cache and v_cache must have the same shape"),
    (dict(k_cache=torch.zeros(1, 8, 2, 32), v_cache=torch.zeros(1, 8, 2, 32)), ArgumentError, "k_cache holds 1 sequences"),
    (dict(rotary_cos=torch.randn(8, 4), rotary_sin=torch.randn(8, 4)), ArgumentError, "rotary_dim"),
    (dict(rotary_cos=torch.randn(6, 8), rotary_sin=torch.randn(6, 8)), ArgumentError, "rotary_cos/rotary_sin have 6 positions"),
    (dict(rotary_sin=None), ArgumentError, "rotary_cos and rotary_sin must be given together"),
    (dict(k=None, v=None), ArgumentError, "rotary_cos/rotary_sin apply only when new k and v are appended"),
    (dict(alibi_slopes=torch.rand(3)), ArgumentError, "alibi_slopes must have shape"),
    (dict(window_size=(-3, 0)), ArgumentError, "window_size entries must be between -1"),
    (dict(q=torch.randn(2, 1, 4, 32, dtype=torch.float16)), ArgumentError, "k_cache has dtype"),
    (dict(num_splits=-1), ArgumentError, "num_splits must be an int >= 0"),
    (dict(num_splits=2.0), TypeError, "num_splits must be an int >= 0"),
]


@pytest.mark.parametrize("overrides, error, match", KVCACHE_CASES, ids=[m for _, _, m in KVCACHE_CASES])
def test_kvcache_bad_input_raises_before_the_cache_is_written(overrides, error, match):
    cache_call()
    k_cache, v_cache = torch.zeros(2, 8, 2, 32), torch.zeros(2, 8, 2, 32)
    overrides = {"k_cache": k_cache, "v_cache": v_cache, **overrides}
    with pytest.raises(error, match=match):
        cache_call(**overrides)
    assert (k_cache == 0).all() and (v_cache == 0).all()


def test_kvcache_paged_block_table():
    q = torch.randn(2, 1, 4, 16, dtype=torch.float16)
    k_cache = torch.randn(6, 4, 2, 16, dtype=torch.float16)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    seqlens = torch.tensor([8, 5], dtype=torch.int32)
    check(lambda: flash_attn_with_kvcache(q, k_cache, k_cache, cache_seqlens=seqlens, block_table=table),
          lambda: flash_attn_with_kvcache(q, k_cache, k_cache, cache_seqlens=seqlens + 1, block_table=table),
          ArgumentError, "block_table")
    check(lambda: flash_attn_with_kvcache(q, k_cache, k_cache, cache_seqlens=seqlens, block_table=table),
          lambda: flash_attn_with_kvcache(q, k_cache, k_cache, cache_seqlens=seqlens, block_table=table + 5),
          ArgumentError, "block_table addresses cache entries outside 0..5")
    check(lambda: flash_attn_with_kvcache(q, k_cache, k_cache, cache_seqlens=seqlens, block_table=table),
          lambda: flash_attn_with_kvcache(q, k_cache, k_cache, cache_seqlens=seqlens, block_table=table,
                                          cache_leftpad=torch.zeros(2, dtype=torch.int32)),
          ArgumentError, "cannot be used with a paged kv cache")
    check(lambda: flash_attn_with_kvcache(q, k_cache, k_cache, cache_seqlens=seqlens, block_table=table),
          lambda: flash_attn_with_kvcache(q, k_cache, k_cache, cache_seqlens=seqlens, block_table=table[:1]),
          ArgumentError, "block_table must have 2 rows")


def test_inputs_are_not_modified():
    q, k, v = qkv()
    copies = [t.clone() for t in (q, k, v)]
    flash_attn_func(q, k, v, causal=True, dropout_p=0.1)
    flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1),
                           torch.tensor([0, 8, 16], dtype=torch.int32), torch.tensor([0, 8, 16], dtype=torch.int32), 8, 8)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), copies))
    args = dict(q=torch.randn(2, 1, 4, 32), k=torch.randn(2, 1, 2, 32), v=torch.randn(2, 1, 2, 32),
                rotary_cos=torch.randn(8, 8), rotary_sin=torch.randn(8, 8))
    before = {name: t.clone() for name, t in args.items()}
    cache_call(**args)  # only the caches change
    assert all(torch.equal(args[name], t) for name, t in before.items())


def test_bad_values_raise_what_flash_attn_and_this_package_both_promise():
    """flash-attn's checks raise RuntimeError, this package's ValueError: ArgumentError is both. A wrong Python type
    is still a TypeError and nothing else."""
    q, k, v = qkv()
    flash_attn_func(q, k, v)
    for bad in (lambda: flash_attn_func(q.int(), k, v), lambda: flash_attn_func(q, k[:1], v[:1]),
                lambda: varlen(max_q=4), lambda: cache_call(cache_seqlens=torch.tensor([3, 8], dtype=torch.int32))):
        for caught in (RuntimeError, ValueError):
            with pytest.raises(caught) as info:
                bad()
            assert type(info.value) is ArgumentError
    with pytest.raises(TypeError) as info:
        flash_attn_func(q.tolist(), k, v)
    assert not isinstance(info.value, (ValueError, RuntimeError))
    assert issubclass(flash_attn_metal.ArgumentError, ValueError) and issubclass(ArgumentError, RuntimeError)


def test_max_seqlen_and_windows_must_fit_the_integers_flash_attn_takes():
    check(lambda: varlen(max_q=2**31 - 1), lambda: varlen(max_q=2**31), ArgumentError,
          r"max_seqlen_q must be between 0 and 2\*\*31 - 1")
    q, k, v = qkv()
    check(lambda: flash_attn_func(q, k, v, window_size=(2**63 - 1, 0)),
          lambda: flash_attn_func(q, k, v, window_size=(2**64 + 1, 0)), ArgumentError, "window_size entries")
    check(lambda: cache_call(cache_seqlens=3), lambda: cache_call(cache_seqlens=2**32 + 3), ArgumentError,
          "cache_seqlens must fit in int32")
