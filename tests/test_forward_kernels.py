"""The generated forward kernels, run through the public functions in the emulator (strict: a fallback would
fail the test), against the fp32 reference with the upstream tolerance rule:

    max |ours - fp32 reference| <= 2 * max |plain low-precision PyTorch - fp32 reference| + 1e-5

(fp32 inputs: within 1e-5 of the reference, relative to the output's scale). LSE is checked too.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import flash_attn_metal
from flash_attn_metal import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)
from flash_attn_metal.emulator import KernelExecutionError
from flash_attn_metal.kernels import decode_kernel, dispatch
from flash_attn_metal.problem import AttentionProblem, KVCache
from flash_attn_metal.reference import attention

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


pytestmark = pytest.mark.usefixtures("emulator_strict")


def problem_of(q, k, v, causal=False, window=(-1, -1), softcap=0.0, alibi=None, cu_q=None, cu_k=None, max_q=0, max_k=0):
    return AttentionProblem(q=q, k=k, v=v, softmax_scale=q.shape[-1] ** -0.5, causal=causal, window_left=window[0],
                            window_right=0 if causal else window[1], softcap=softcap, alibi_slopes=alibi,
                            dropout_p=0.0, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k)


def assert_within_rule(out, lse, problem: AttentionProblem):
    ref_out, ref_lse = attention(problem, upcast=True)
    pt_out, _ = attention(problem, upcast=False)
    err = (out.float() - ref_out.float()).abs().max().item() if out.numel() else 0.0
    if out.dtype == torch.float32:
        bound = 1e-5 * max(1.0, ref_out.abs().max().item() if out.numel() else 1.0)
    else:
        bound = 2 * (pt_out.float() - ref_out.float()).abs().max().item() + 1e-5
    assert err <= bound, f"max error {err:.3e} exceeds {bound:.3e}"
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "fully masked rows must have lse = +inf"
    finite = torch.isfinite(ref_lse)
    if finite.any():
        assert (lse[finite] - ref_lse[finite]).abs().max().item() <= 1e-4
    assert torch.isfinite(out).all()


def kernels_ran():
    launches = flash_attn_metal.stats()["launches"]
    assert launches and all(name.startswith(("attention_forward", "attention_decode")) for name in launches)


@dataclasses.dataclass(frozen=True)
class Case:
    dtype: str
    d: int
    sq: int
    sk: int
    h: int = 2
    hk: int = 2
    causal: bool = False
    window: tuple = (-1, -1)
    softcap: float = 0.0
    alibi: str = ""  # "", "h" or "bh"
    b: int = 2


CASES = [
    # seqlens below, equal to and above each other, ragged against the tiles
    Case("fp16", 64, 1, 7), Case("fp16", 64, 7, 1), Case("bf16", 64, 113, 128), Case("fp32", 64, 128, 113),
    Case("fp16", 64, 255, 255, causal=True), Case("bf16", 32, 1000, 113, b=1, h=1, hk=1, causal=True),
    Case("fp16", 32, 113, 1000, b=1, h=1, hk=1),
    # head dims (multiples of 8 natively; others padded in the kernel)
    Case("fp16", 32, 65, 70), Case("fp16", 40, 65, 70), Case("bf16", 80, 65, 70), Case("fp32", 96, 65, 70),
    Case("fp16", 128, 65, 70), Case("bf16", 160, 40, 50), Case("fp16", 192, 40, 50), Case("fp32", 256, 40, 50),
    Case("fp16", 256, 40, 50, causal=True), Case("bf16", 59, 33, 45), Case("fp32", 111, 33, 45),
    # masks
    Case("fp16", 64, 97, 97, window=(16, 8)), Case("bf16", 64, 60, 130, window=(10, 0)),
    Case("fp32", 64, 130, 60, window=(-1, 5)), Case("fp16", 64, 130, 60, causal=True),
    Case("fp16", 64, 50, 90, causal=True, window=(7, -1)),
    # GQA 2 and 8, MQA
    Case("fp16", 64, 70, 70, h=4, hk=2, causal=True), Case("bf16", 64, 70, 70, h=16, hk=2, causal=True),
    Case("bf16", 64, 70, 70, h=8, hk=1),
    Case("fp32", 64, 40, 40, h=8, hk=1, causal=True),
    # softcap and ALiBi
    Case("fp16", 64, 70, 90, softcap=10.0), Case("bf16", 64, 70, 90, softcap=5.0, causal=True),
    Case("fp16", 64, 70, 90, alibi="h"), Case("fp32", 64, 90, 70, alibi="bh", causal=True),
    Case("bf16", 128, 40, 40, h=4, hk=2, softcap=3.0, alibi="h", window=(9, 4)),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.dtype}-d{c.d}-{c.sq}x{c.sk}-h{c.h}/{c.hk}" + ("-causal" if c.causal else "")
                                             + (f"-w{c.window}" if c.window != (-1, -1) else "")
                                             + ("-softcap" if c.softcap else "") + (f"-alibi{c.alibi}" if c.alibi else "")
                                             for c in CASES])
def test_forward_matches_the_reference(case: Case):
    torch.manual_seed(hash(case) % 1000)
    dtype = DTYPES[case.dtype]
    q = torch.randn(case.b, case.sq, case.h, case.d, dtype=dtype)
    k = torch.randn(case.b, case.sk, case.hk, case.d, dtype=dtype)
    v = torch.randn(case.b, case.sk, case.hk, case.d, dtype=dtype)
    if case.softcap:
        q = q * 4
    alibi = {"": None, "h": torch.rand(case.h) * 0.3, "bh": torch.rand(case.b, case.h) * 0.3}[case.alibi]
    out, lse, _ = flash_attn_func(q, k, v, causal=case.causal, window_size=case.window, softcap=case.softcap,
                                  alibi_slopes=alibi, return_attn_probs=True)
    kernels_ran()
    assert_within_rule(out, lse, problem_of(q, k, v, case.causal, case.window, case.softcap, alibi))


GRID_SEQLENS = (1, 7, 113, 128, 255, 1000)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_every_pair_of_grid_seqlens(causal):
    """seqlen_q below, equal to and above seqlen_k, ragged against every tile size (one compiled variant)."""
    torch.manual_seed(14)
    for sq in GRID_SEQLENS:
        for sk in GRID_SEQLENS:
            q = torch.randn(1, sq, 2, 32, dtype=torch.float16)
            k, v = (torch.randn(1, sk, 1, 32, dtype=torch.float16) for _ in range(2))
            out, lse, _ = flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
            assert_within_rule(out, lse, problem_of(q, k, v, causal))
    kernels_ran()


@pytest.mark.parametrize("d", [*range(8, 257, 8), 1, 13, 250])
def test_every_head_dim(d):
    """Multiples of 8 natively, other head dims padded inside the kernel; dtypes and masks rotate over d."""
    torch.manual_seed(d)
    dtype = list(DTYPES.values())[d % 3]
    q = torch.randn(1, 19, 2, d, dtype=dtype)
    k, v = (torch.randn(1, 37, 2, d, dtype=dtype) for _ in range(2))
    causal = d % 16 == 0
    out, lse, _ = flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    kernels_ran()
    assert_within_rule(out, lse, problem_of(q, k, v, causal))


def test_the_tolerance_check_can_fail():
    """Negative control for assert_within_rule: a small error in out or in lse is caught."""
    torch.manual_seed(15)
    q, k, v = (torch.randn(1, 40, 2, 64, dtype=torch.float16) for _ in range(3))
    out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True)
    problem = problem_of(q, k, v)
    assert_within_rule(out, lse, problem)
    off_by_one_hundredth = out.clone()
    off_by_one_hundredth[0, 5, 1, 7] += 0.01
    with pytest.raises(AssertionError, match="exceeds"):
        assert_within_rule(off_by_one_hundredth, lse, problem)
    with pytest.raises(AssertionError):
        assert_within_rule(out, lse + 1e-3, problem)


def test_a_wrong_mask_alignment_would_be_caught():
    """Negative control: the kernel's causal output differs from a top-left aligned reference."""
    torch.manual_seed(7)
    q, k, v = torch.randn(1, 20, 2, 32), torch.randn(1, 45, 2, 32), torch.randn(1, 45, 2, 32)
    out = flash_attn_func(q, k, v, causal=True)
    right = attention(problem_of(q, k, v, causal=True))[0]
    top_left = attention(problem_of(q, k[:, :20], v[:, :20], causal=True))[0]  # query i sees keys 0..i
    assert (out - right).abs().max() < 1e-5
    assert (out - top_left).abs().max() > 1e-2


def test_fully_masked_rows_and_empty_keys():
    torch.manual_seed(8)
    q, k = torch.randn(2, 9, 2, 32, dtype=torch.float16), torch.randn(2, 4, 2, 32, dtype=torch.float16)
    out, lse, _ = flash_attn_func(q, k, k, causal=True, return_attn_probs=True)  # rows 0..4 see no key
    assert (out[:, :5] == 0).all() and torch.isposinf(lse[:, :, :5]).all()
    assert_within_rule(out, lse, problem_of(q, k, k, causal=True))
    empty = torch.randn(2, 0, 2, 32, dtype=torch.float16)
    out, lse, _ = flash_attn_func(q, empty, empty, return_attn_probs=True)
    assert (out == 0).all() and torch.isposinf(lse).all()
    kernels_ran()


def test_packed_and_strided_inputs_are_read_in_place():
    torch.manual_seed(9)
    qkv = torch.randn(2, 77, 3, 4, 64, dtype=torch.float16)
    out = flash_attn_qkvpacked_func(qkv, causal=True)
    q, k, v = qkv.unbind(2)
    ref = flash_attn_metal.reference.attention(problem_of(q, k, v, causal=True))
    assert_within_rule(out, ref[1], problem_of(q, k, v, causal=True))
    kv = torch.randn(2, 50, 2, 2, 64, dtype=torch.bfloat16)
    q2 = torch.randn(2, 40, 4, 64, dtype=torch.bfloat16).transpose(1, 2).contiguous().transpose(1, 2)  # head-major
    out, lse, _ = flash_attn_kvpacked_func(q2, kv, return_attn_probs=True)
    assert_within_rule(out, lse, problem_of(q2, kv[:, :, 0], kv[:, :, 1]))
    kernels_ran()


def varlen_inputs(lens_q, lens_k, h, hk, d, dtype):
    q = torch.randn(sum(lens_q), h, d, dtype=dtype)
    k, v = torch.randn(sum(lens_k), hk, d, dtype=dtype), torch.randn(sum(lens_k), hk, d, dtype=dtype)
    cu = lambda lens: torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)  # noqa: E731
    return q, k, v, cu(lens_q), cu(lens_k)


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_varlen_with_unequal_and_zero_lengths(dtype):
    torch.manual_seed(10)
    lens_q, lens_k = [17, 0, 70, 33, 5], [40, 9, 0, 33, 64]
    q, k, v, cu_q, cu_k = varlen_inputs(lens_q, lens_k, 4, 2, 64, DTYPES[dtype])
    for causal in (False, True):
        out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                             return_attn_probs=True)
        assert lse.shape == (4, sum(lens_q))
        assert_within_rule(out, lse, problem_of(q, k, v, causal=causal, cu_q=cu_q, cu_k=cu_k,
                                                max_q=max(lens_q), max_k=max(lens_k)))
    kernels_ran()


def test_varlen_packed_forms():
    torch.manual_seed(11)
    lens = [30, 1, 64]
    qkv = torch.randn(sum(lens), 3, 2, 32, dtype=torch.float16)
    cu = torch.tensor([0, 30, 31, 95], dtype=torch.int32)
    out = flash_attn_varlen_qkvpacked_func(qkv, cu, 64, causal=True)
    q, k, v = qkv.unbind(1)
    p = problem_of(q, k, v, causal=True, cu_q=cu, cu_k=cu, max_q=64, max_k=64)
    assert_within_rule(out, attention(p)[1], p)
    kv = torch.randn(50, 2, 1, 32, dtype=torch.bfloat16)  # MQA
    q = torch.randn(sum(lens), 2, 32, dtype=torch.bfloat16)
    cu_k = torch.tensor([0, 0, 20, 50], dtype=torch.int32)
    out, lse, _ = flash_attn_varlen_kvpacked_func(q, kv, cu, cu_k, 64, 30, window_size=(6, 2), return_attn_probs=True)
    assert_within_rule(out, lse, problem_of(q, kv[:, 0], kv[:, 1], window=(6, 2), cu_q=cu, cu_k=cu_k,
                                            max_q=64, max_k=30))
    kernels_ran()


def test_side_inputs_may_be_views():
    """cu_seqlens and ALiBi slopes that are strided views are read by value, not as raw storage."""
    torch.manual_seed(16)
    q = torch.randn(14, 2, 32, dtype=torch.float16)
    cu = torch.tensor([0, 99, 5, 99, 5, 99, 14], dtype=torch.int32)[::2]  # [0, 5, 5, 14], not contiguous
    out, lse, _ = flash_attn_varlen_func(q, q, q, cu, cu, 9, 9, return_attn_probs=True)
    assert_within_rule(out, lse, problem_of(q, q, q, cu_q=cu.contiguous(), cu_k=cu.contiguous(), max_q=9, max_k=9))
    q = torch.randn(2, 10, 3, 32)
    slopes = torch.rand(3, 2).t()  # (b, h), transposed
    out, lse, _ = flash_attn_func(q, q, q, alibi_slopes=slopes, return_attn_probs=True)
    assert_within_rule(out, lse, problem_of(q, q, q, alibi=slopes.contiguous()))
    kernels_ran()


def test_debug_build_bounds_checks_every_access(debug_emulator):
    torch.manual_seed(12)
    q = torch.randn(1, 50, 2, 40, dtype=torch.float16)[:, 3:]  # a view with a storage offset
    k = torch.randn(1, 33, 1, 40, dtype=torch.float16)
    out, lse, _ = flash_attn_func(q, k, k, causal=True, window_size=(5, -1), return_attn_probs=True)
    assert_within_rule(out, lse, problem_of(q, k, k, causal=True, window=(5, -1)))
    lens_q, lens_k = [0, 20, 3, 0], [7, 0, 41, 0]
    q, k, v, cu_q, cu_k = varlen_inputs(lens_q, lens_k, 4, 1, 24, torch.bfloat16)
    slopes = torch.rand(4, 4) * 0.3  # (b, h)
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 20, 41, causal=True, softcap=5.0, alibi_slopes=slopes,
                                         return_attn_probs=True)
    assert_within_rule(out, lse, problem_of(q, k, v, causal=True, softcap=5.0, alibi=slopes, cu_q=cu_q, cu_k=cu_k,
                                            max_q=20, max_k=41))


def test_debug_build_catches_an_out_of_bounds_read(debug_emulator):
    """Negative control: a problem whose cu_seqlens_k claims more keys than k holds (validation would refuse
    it, so it goes to dispatch directly) is stopped by the debug build instead of reading past the buffer."""
    q, k, v, cu_q, _ = varlen_inputs([4, 4], [4, 4], 2, 2, 24, torch.float16)
    too_long = torch.tensor([0, 4, 12], dtype=torch.int32)
    bad = problem_of(q, k, v, cu_q=cu_q, cu_k=too_long, max_q=4, max_k=8)
    with pytest.raises(KernelExecutionError, match="out of bounds"):
        dispatch.forward(bad, "emulator")


def test_empty_batch_and_nan_propagation():
    q = torch.randn(0, 5, 2, 32, dtype=torch.float16)
    assert flash_attn_func(q, q, q).shape == (0, 5, 2, 32)
    torch.manual_seed(13)
    q, k, v = (torch.randn(1, 16, 2, 32, dtype=torch.float16) for _ in range(3))
    v[0, 3, 0, 0] = float("nan")
    out = flash_attn_func(q, k, v)
    ref = attention(problem_of(q, k, v))[0]
    assert torch.equal(torch.isnan(out), torch.isnan(ref))  # NaN reaches the same outputs as in the reference
    assert torch.isnan(out[0, :, 0, 0]).all() and not torch.isnan(out[0, :, 1]).any()


# KV caches: flash_attn_with_kvcache's attention reads the cache in place (problem.KVCache).

@dataclasses.dataclass(frozen=True)
class CacheCase:
    dtype: str
    layout: str  # "dense", "batch_idx", "leftpad" or "paged"
    sq: int = 1  # 1: a decode step
    d: int = 64
    page: int = 0  # rows per block of a paged cache
    h: int = 4
    hk: int = 2
    causal: bool = False
    window: tuple = (-1, -1)
    softcap: float = 0.0
    alibi: bool = False


CACHE_CASES = [
    CacheCase("fp16", "dense"), CacheCase("bf16", "batch_idx", causal=True), CacheCase("fp32", "leftpad", sq=3),
    CacheCase("fp16", "leftpad", sq=40, causal=True), CacheCase("fp16", "paged", page=16),
    CacheCase("bf16", "paged", sq=5, page=5, causal=True), CacheCase("fp32", "paged", sq=33, page=48),
    CacheCase("fp16", "batch_idx", sq=4, window=(12, 0)), CacheCase("fp16", "paged", sq=2, page=7, window=(20, 0)),
    CacheCase("bf16", "dense", d=128, h=8, hk=1, causal=True), CacheCase("fp16", "leftpad", d=40, sq=2),
    CacheCase("fp16", "paged", d=13, sq=3, page=9), CacheCase("fp16", "dense", sq=6, softcap=8.0, alibi=True, causal=True),
]
CACHE_ENDS = (37, 1, 70)  # one past each sequence's last attended row
CACHE_LEFTPAD = (5, 0, 21)


def cache_problem(case: CacheCase, seed: int = 0) -> AttentionProblem:
    """Three sequences attending to CACHE_ENDS rows of a cache laid out as the case says."""
    torch.manual_seed(seed)
    dtype, b, rows = DTYPES[case.dtype], len(CACHE_ENDS), max(CACHE_ENDS)
    q = torch.randn(b, case.sq, case.h, case.d, dtype=dtype) * (4 if case.softcap else 1)
    ends = torch.tensor(CACHE_ENDS, dtype=torch.int32)
    leftpad = torch.tensor(CACHE_LEFTPAD if case.layout == "leftpad" else (0,) * b, dtype=torch.int32)
    if case.layout == "paged":
        per_sequence = -(-rows // case.page)
        blocks = b * per_sequence + 2  # two unused blocks
        table = torch.randperm(blocks)[: b * per_sequence].reshape(b, per_sequence).to(torch.int32)
        k, v = (torch.randn(blocks, case.page, case.hk, case.d, dtype=dtype) for _ in range(2))
        layout = KVCache(seqlens=ends, leftpad=None, batch_idx=None, block_table=table)
    else:
        slots = torch.tensor((3, 0, 1) if case.layout == "batch_idx" else (0, 1, 2), dtype=torch.int32)
        k, v = (torch.randn(4, rows + 3, case.hk, case.d, dtype=dtype) for _ in range(2))
        layout = KVCache(seqlens=ends, leftpad=leftpad, batch_idx=slots, block_table=None)
    alibi = torch.rand(case.h) * 0.3 if case.alibi else None
    return AttentionProblem(q=q, k=k, v=v, softmax_scale=case.d**-0.5, causal=case.causal,
                            window_left=case.window[0], window_right=0 if case.causal else case.window[1],
                            softcap=case.softcap, alibi_slopes=alibi, dropout_p=0.0, max_seqlen_q=case.sq,
                            max_seqlen_k=max(e - lp for e, lp in zip(CACHE_ENDS, leftpad.tolist())), kv_cache=layout)


@pytest.mark.parametrize("case", CACHE_CASES, ids=[
    f"{c.dtype}-{c.layout}{c.page or ''}-d{c.d}-sq{c.sq}-h{c.h}/{c.hk}" + ("-causal" if c.causal else "")
    + (f"-w{c.window}" if c.window != (-1, -1) else "") + ("-softcap-alibi" if c.softcap else "") for c in CACHE_CASES])
def test_kv_cache_attention_reads_the_cache_in_place(case: CacheCase):
    problem = cache_problem(case)
    out, lse, _ = dispatch.forward(problem, "emulator")
    (name,) = flash_attn_metal.stats()["launches"]
    assert name.endswith("_paged_cache" if case.layout == "paged" else "_dense_cache")
    assert out.shape == problem.q.shape and lse.shape == (3, case.h, case.sq)
    assert_within_rule(out, lse, problem)


def test_a_paged_kernel_follows_the_block_table():
    problem = cache_problem(CacheCase("fp32", "paged", sq=2, page=8))
    out, _, _ = dispatch.forward(problem, "emulator")
    table = problem.kv_cache.block_table
    order = torch.randperm(problem.k.shape[0])  # move every block, and the table with it: the same answer
    moved = dataclasses.replace(problem, k=problem.k[order.argsort()], v=problem.v[order.argsort()],
                                kv_cache=dataclasses.replace(problem.kv_cache, block_table=order[table.long()].int()))
    assert torch.equal(dispatch.forward(moved, "emulator")[0], out)
    swapped = dataclasses.replace(problem, kv_cache=dataclasses.replace(problem.kv_cache, block_table=table.flip(1)))
    assert (dispatch.forward(swapped, "emulator")[0] - out).abs().max() > 1e-2  # the table alone moved: it differs


def test_an_empty_cache_sequence_gives_zeros_and_infinite_lse():
    q = torch.randn(2, 3, 2, 32, dtype=torch.float16)
    k_cache, v_cache = (torch.randn(2, 16, 2, 32, dtype=torch.float16) for _ in range(2))
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor([0, 9], dtype=torch.int32),
                                       return_softmax_lse=True)
    kernels_ran()
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isinf(lse[0]).all()
    assert torch.isfinite(lse[1]).all() and out[1].abs().max() > 0


@pytest.mark.parametrize("layout", ["batch_idx", "leftpad", "paged"])
def test_kvcache_calls_append_and_attend_on_the_kernels(monkeypatch, layout):
    """The public call end to end (rotary, in-place append, attention) against the reference backend."""
    torch.manual_seed(5)
    b, h, hk, d, sq, new = 2, 4, 2, 32, 3, 2
    q = torch.randn(b, sq, h, d, dtype=torch.float16)
    k_new, v_new = (torch.randn(b, new, hk, d, dtype=torch.float16) for _ in range(2))
    cos, sin = torch.rand(32, 8), torch.rand(32, 8)
    args = dict(cache_seqlens=torch.tensor([6, 11], dtype=torch.int32), causal=True, return_softmax_lse=True)
    if layout == "paged":
        caches = [torch.randn(9, 4, hk, d, dtype=torch.float16) for _ in range(2)]
        args["block_table"] = torch.tensor([[8, 1, 3, 5], [0, 2, 7, 4]], dtype=torch.int32)
    else:
        caches = [torch.randn(3, 16, hk, d, dtype=torch.float16) for _ in range(2)]
        args["cache_batch_idx"] = torch.tensor([2, 0], dtype=torch.int32)
        if layout == "leftpad":
            args["cache_leftpad"] = torch.tensor([3, 0], dtype=torch.int32)
    ref_caches = [c.clone() for c in caches]
    monkeypatch.setenv("FLASH_ATTN_METAL_BACKEND", "reference")
    ref_out, ref_lse = flash_attn_with_kvcache(q, *ref_caches, k_new, v_new, cos, sin, **args)
    monkeypatch.setenv("FLASH_ATTN_METAL_BACKEND", "emulator")
    out, lse = flash_attn_with_kvcache(q, *caches, k_new, v_new, cos, sin, **args)
    kernels_ran()
    assert all(torch.equal(a, r) for a, r in zip(caches, ref_caches))  # the same append
    assert (out.float() - ref_out.float()).abs().max() < 2e-3 and (lse - ref_lse).abs().max() < 1e-3


@pytest.mark.parametrize("case", [CacheCase("fp16", "leftpad", sq=3, causal=True), CacheCase("bf16", "paged", sq=2, page=7)],
                         ids=["leftpad", "paged"])
def test_kv_cache_kernels_stay_in_bounds_in_the_debug_build(debug_emulator, case):
    problem = cache_problem(case, seed=3)
    out, lse, _ = dispatch.forward(problem, "emulator")
    assert_within_rule(out, lse, problem)


@pytest.mark.parametrize("h, hk", [(8, 1), (8, 8)], ids=["mqa", "mha"])
def test_decode_launches_serve_the_gqa_group_in_one_threadgroup(h, hk):
    problem = cache_problem(CacheCase("fp16", "dense", h=h, hk=hk, causal=True))
    launch = dispatch.forward_launch(problem, "emulator")
    kernel, threads, group_size = launch.steps[0]
    assert kernel.name.startswith("attention_decode") and launch.ints[decode_kernel.INT_ARGS.index("KV_GROUP")] == h // hk
    assert threads[1] == hk and threads[0] == group_size[0]  # one threadgroup per K/V head and sequence
    out, lse, _ = launch(problem.q, problem.k, problem.v, dispatch.side_buffers(problem))
    assert_within_rule(out, lse, problem)


# Split-KV (flash-decoding): a query block's keys split over threadgroups, merged by a combine kernel.

def split_launches() -> list[str]:
    return [name for name in flash_attn_metal.stats()["launches"] if name.endswith("_combine")]


@pytest.mark.parametrize("splits", [2, 3, 7])
@pytest.mark.parametrize("mask", ["full", "causal", "window"])
def test_split_kv_matches_the_reference(splits, mask):
    torch.manual_seed(splits)
    q = torch.randn(2, 3, 4, 64, dtype=torch.float16)
    k, v = (torch.randn(2, 700, 1, 64, dtype=torch.float16) for _ in range(2))
    window = (90, 0) if mask == "window" else (-1, -1)  # the early splits see no key at all
    problem = dataclasses.replace(problem_of(q, k, v, causal=mask == "causal", window=window, max_q=3, max_k=700),
                                  num_splits=splits)
    out, lse, _ = dispatch.forward(problem, "emulator")
    assert split_launches()
    assert_within_rule(out, lse, problem)


def test_decoding_splits_the_keys_by_itself_and_honours_num_splits_1():
    torch.manual_seed(8)
    q = torch.randn(1, 1, 2, 32, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2000, 2, 32, dtype=torch.bfloat16) for _ in range(2))
    out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True)  # 2 threadgroups for 2000 keys
    assert split_launches()
    assert_within_rule(out, lse, problem_of(q, k, v))
    flash_attn_metal.reset_stats()
    caches = [t.clone() for t in (k, v)]
    unsplit = flash_attn_with_kvcache(q, *caches, num_splits=1)
    assert not split_launches() and (unsplit.float() - out.float()).abs().max() < 2e-2


def test_split_kv_of_empty_and_ragged_cache_sequences():
    q = torch.randn(3, 1, 4, 64, dtype=torch.float16)
    k_cache, v_cache = (torch.randn(3, 600, 2, 64, dtype=torch.float16) for _ in range(2))
    seqlens = torch.tensor([0, 600, 77], dtype=torch.int32)
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, num_splits=5,
                                       return_softmax_lse=True)
    assert split_launches()
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isinf(lse[0]).all()
    for b in (1, 2):
        n = int(seqlens[b])
        assert_within_rule(out[b : b + 1], lse[b : b + 1], problem_of(q[b : b + 1], k_cache[b : b + 1, :n],
                                                                      v_cache[b : b + 1, :n]))


def test_varlen_decoding_splits_ragged_sequences():
    torch.manual_seed(23)
    lens_q, lens_k = [1, 2, 0, 1], [1500, 5, 300, 0]
    q, k, v, cu_q, cu_k = varlen_inputs(lens_q, lens_k, 4, 1, 64, torch.float16)
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 2, 1500, causal=True, return_attn_probs=True)
    assert split_launches()
    assert_within_rule(out, lse, problem_of(q, k, v, causal=True, cu_q=cu_q, cu_k=cu_k, max_q=2, max_k=1500))


@pytest.mark.parametrize("case", [CacheCase("fp16", "paged", sq=2, page=7), CacheCase("bf16", "leftpad", sq=3, d=128, causal=True),
                                  CacheCase("fp32", "dense", sq=6, softcap=8.0, alibi=True, causal=True)],
                         ids=["paged", "leftpad-causal", "softcap-alibi"])
def test_split_kv_over_kv_caches(case):
    problem = dataclasses.replace(cache_problem(case, seed=9), num_splits=2)
    out, lse, _ = dispatch.forward(problem, "emulator")
    assert split_launches()
    assert_within_rule(out, lse, problem)


@pytest.mark.parametrize("mask", ["full", "causal", "window"])
def test_block_forward_split_kv_for_longer_queries(mask):
    """More than 8 query rows take the block forward; with num_splits it writes decode_combine's partial layout and
    the shared combine kernel merges it. Its statistics give the same gradients as an unsplit forward's."""
    torch.manual_seed(31)
    q = torch.randn(1, 20, 2, 64, dtype=torch.float16)
    k, v = (torch.randn(1, 900, 2, 64, dtype=torch.float16) for _ in range(2))
    window = (120, 0) if mask == "window" else (-1, -1)  # the early splits of early rows see no key at all
    problem = dataclasses.replace(problem_of(q, k, v, causal=mask == "causal", window=window, max_q=20, max_k=900),
                                  num_splits=3)
    out, lse, stats = dispatch.forward(problem, "emulator")
    launched = flash_attn_metal.stats()["launches"]
    assert any(n.startswith("attention_forward") and n.endswith("_split_combine") for n in launched)
    assert_within_rule(out, lse, problem)
    unsplit = dataclasses.replace(problem, num_splits=1)
    out1, _, stats1 = dispatch.forward(unsplit, "emulator")
    dout = torch.randn_like(out)
    grads = dispatch.backward(problem, out, stats, dout, "emulator")
    grads1 = dispatch.backward(unsplit, out1, stats1, dout, "emulator")
    for a, b in zip(grads, grads1):
        assert (a.float() - b.float()).abs().max() < 2e-2
