"""The decode (vector) kernels: calls of at most 8 query rows per sequence, in every form, run in the emulator
(strict: a fallback fails the test) against the fp32 reference with the upstream tolerance rule; the combine
kernel against its documented partial layout; the launch plan; the generated MSL's conventions; the report."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

import flash_attn_metal
from flash_attn_metal import flash_attn_func, flash_attn_varlen_func
from flash_attn_metal.emulator import typecheck
from flash_attn_metal.kernels import decode, decode_combine, decode_kernel, decode_report, dispatch
from flash_attn_metal.problem import AttentionProblem, KVCache
from flash_attn_metal.runtime import get_backend
from test_forward_kernels import assert_within_rule, problem_of, varlen_inputs

FP16 = torch.float16


pytestmark = pytest.mark.usefixtures("emulator_strict")


def launched() -> dict[str, int]:
    return flash_attn_metal.stats()["launches"]


def took_the_vector_path() -> None:
    names = launched()
    assert names and all(name.startswith("attention_decode") for name in names), names


def cache_problem(*, dtype=FP16, d=64, sq=1, h=4, hk=2, ends=(37, 1, 70), leftpad=None, slots=None, page=0,
                  causal=True, window=(-1, -1), softcap=0.0, alibi=False, num_splits=0, seed=0) -> AttentionProblem:
    """Sequences attending to rows leftpad[b] .. ends[b] - 1 of a dense cache (slots: cache_batch_idx) or, with
    `page` rows per block, of a paged cache whose blocks are shuffled."""
    torch.manual_seed(seed)
    b, rows = len(ends), max(max(ends), 1)
    q = torch.randn(b, sq, h, d, dtype=dtype) * (4 if softcap else 1)
    seqlens = torch.tensor(ends, dtype=torch.int32)
    if page:
        per_sequence = -(-rows // page)
        blocks = b * per_sequence + 1  # one block nobody uses
        table = torch.randperm(blocks)[: b * per_sequence].reshape(b, per_sequence).to(torch.int32)
        k, v = (torch.randn(blocks, page, hk, d, dtype=dtype) for _ in range(2))
        layout = KVCache(seqlens=seqlens, leftpad=None, batch_idx=None, block_table=table)
        first = [0] * b
    else:
        first = list(leftpad or (0,) * b)
        slot = torch.tensor(slots or range(b), dtype=torch.int32)
        k, v = (torch.randn(int(slot.max()) + 1, rows + 2, hk, d, dtype=dtype) for _ in range(2))
        layout = KVCache(seqlens=seqlens, leftpad=torch.tensor(first, dtype=torch.int32), batch_idx=slot,
                         block_table=None)
    return AttentionProblem(q=q, k=k, v=v, softmax_scale=d**-0.5, causal=causal, window_left=window[0],
                            window_right=0 if causal else window[1], softcap=softcap,
                            alibi_slopes=torch.rand(h) * 0.3 if alibi else None, dropout_p=0.0, max_seqlen_q=sq,
                            max_seqlen_k=max(e - f for e, f in zip(ends, first)), kv_cache=layout,
                            num_splits=num_splits)


def run_and_check(problem: AttentionProblem) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse, _ = dispatch.forward(problem, "emulator")
    took_the_vector_path()
    assert_within_rule(out, lse, problem)
    return out, lse


# ---- every form and feature, on the vector path --------------------------------------------------------------


@pytest.mark.parametrize("sq", range(1, 9))
def test_query_lengths_1_to_8_with_gqa_ratios_1_to_16(sq):
    """One compiled variant (fp16, d=64, causal, dense cache) over every query length and GQA ratio."""
    for group in (1, 2, 3, 4, 8, 16):
        run_and_check(cache_problem(sq=sq, h=2 * group, hk=2, seed=sq * 100 + group))


@pytest.mark.parametrize("page", [1, 2, 3, 5, 16, 64])
def test_paged_caches_with_page_sizes_down_to_1(page):
    run_and_check(cache_problem(page=page, sq=3, h=8, hk=2, seed=page))
    flash_attn_metal.reset_stats()
    run_and_check(cache_problem(page=page, sq=1, h=8, hk=2, num_splits=3, seed=page + 1))  # splits cross pages
    assert any(name.endswith("_combine") for name in launched())


@pytest.mark.parametrize("layout", ["dense", "paged"])
@pytest.mark.parametrize("num_splits", [0, 4])
def test_empty_caches_give_zeros_and_infinite_lse(layout, num_splits):
    page = 4 if layout == "paged" else 0
    for ends in ((0, 0), (0, 9, 0, 40)):
        problem = cache_problem(ends=ends, sq=2, page=page, num_splits=num_splits, seed=len(ends))
        out, lse = run_and_check(problem)
        for b, end in enumerate(ends):
            if end == 0:
                assert torch.equal(out[b], torch.zeros_like(out[b])) and torch.isposinf(lse[b]).all()
            else:
                assert torch.isfinite(lse[b]).all() and out[b].abs().max() > 0


def test_leftpad_and_batch_idx_select_rows_and_slots():
    problem = cache_problem(ends=(37, 30, 70), leftpad=(5, 30, 21), slots=(3, 0, 1), sq=4, seed=4)
    out, lse = run_and_check(problem)
    assert torch.isposinf(lse[1]).all()  # leftpad == seqlen: no row to attend to
    moved = dataclasses.replace(problem, kv_cache=dataclasses.replace(problem.kv_cache, batch_idx=torch.tensor(
        [0, 3, 1], dtype=torch.int32)))
    assert (dispatch.forward(moved, "emulator")[0][0] - out[0]).abs().max() > 1e-2  # another slot: another answer


@pytest.mark.parametrize("mask", ["full", "causal", "window", "window-left"])
def test_masks_softcap_and_alibi(mask):
    causal = mask == "causal"
    window = {"window": (9, 2), "window-left": (20, -1)}.get(mask, (-1, -1))
    run_and_check(cache_problem(sq=5, h=4, hk=1, causal=causal, window=window, seed=7))
    flash_attn_metal.reset_stats()
    run_and_check(cache_problem(sq=3, h=4, hk=2, causal=causal, window=window, softcap=6.0, alibi=True, seed=8))


@pytest.mark.parametrize("d, dtype", [(8, torch.bfloat16), (13, torch.float32), (96, FP16), (128, torch.bfloat16),
                                      (160, torch.float32), (250, FP16), (256, torch.bfloat16)])
def test_head_dims_and_dtypes(d, dtype):
    run_and_check(cache_problem(d=d, dtype=dtype, sq=2, h=6, hk=2, seed=d))


def test_padded_and_varlen_forms_take_the_vector_path():
    torch.manual_seed(11)
    q, k, v = torch.randn(2, 6, 8, 64, dtype=FP16), torch.randn(2, 90, 2, 64, dtype=FP16), torch.randn(2, 90, 2, 64, dtype=FP16)
    out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    took_the_vector_path()
    assert_within_rule(out, lse, problem_of(q, k, v, causal=True))
    flash_attn_metal.reset_stats()
    lens_q, lens_k = [1, 8, 0, 3], [50, 0, 20, 200]
    q, k, v, cu_q, cu_k = varlen_inputs(lens_q, lens_k, 8, 2, 64, FP16)
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 8, 200, window_size=(30, 0), return_attn_probs=True)
    took_the_vector_path()
    assert_within_rule(out, lse, problem_of(q, k, v, window=(30, 0), cu_q=cu_q, cu_k=cu_k, max_q=8, max_k=200))


def test_nine_query_rows_take_the_block_forward():
    """The control for took_the_vector_path: one row more and the block forward runs."""
    out, lse, _ = dispatch.forward(cache_problem(sq=9, seed=9), "emulator")
    assert launched() and not any(name.startswith("attention_decode") for name in launched())


def test_calls_that_may_be_differentiated_stay_on_the_block_kernels():
    """Their backward recomputes P with the block kernels' arithmetic; inference calls take the vector path."""
    torch.manual_seed(12)
    q = torch.randn(1, 4, 4, 32, requires_grad=True)
    k, v = (torch.randn(1, 40, 2, 32, requires_grad=True) for _ in range(2))
    out = flash_attn_func(q, k, v, causal=True)
    torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert launched() and not any(name.startswith("attention_decode") for name in launched())
    flash_attn_metal.reset_stats()
    with torch.no_grad():
        flash_attn_func(q.detach(), k.detach(), v.detach(), causal=True)
    took_the_vector_path()


# ---- the launch plan ------------------------------------------------------------------------------------------


def test_a_gqa_group_of_16_with_8_query_rows_spreads_over_row_groups_and_blocks():
    problem = cache_problem(d=256, sq=8, h=16, hk=1, ends=(60, 33), seed=13)  # 128 (row, head) pairs, 4 per SIMD group
    launch = dispatch.forward_launch(problem, "emulator")
    ints = dict(zip(decode_kernel.INT_ARGS, launch.ints))
    assert ints["ROW_GROUPS"] == decode_kernel.SIMDGROUPS and ints["KV_GROUP"] == 16
    row_blocks = launch.steps[0][1][0] // decode_kernel.THREADS // ints["NUM_SPLITS"]
    assert row_blocks == 128 // (4 * decode_kernel.SIMDGROUPS)
    run_and_check(problem)


@pytest.mark.parametrize("requested, expected", [(1, 1), (2, 2), (5, 5), (32, 32), (40, 32)])
def test_num_splits_is_honoured(requested, expected):
    problem = cache_problem(num_splits=requested, ends=(300, 150), seed=requested)
    launch = dispatch.forward_launch(problem, "emulator")
    assert launch.ints[decode_kernel.INT_ARGS.index("NUM_SPLITS")] == expected
    assert len(launch.steps) == (1 if expected == 1 else 2)
    run_and_check(problem)
    assert any(name.endswith("_combine") for name in launched()) == (expected > 1)


def test_auto_splits_fill_the_gpu_but_keep_partials_small():
    spec = decode_kernel.DecodeSpec.for_call("half", 128)
    keys = decode.min_split_keys(4, spec)
    assert 4 * 2 * 4 * (128 + 1) <= decode.PARTIAL_SHARE * keys * 2 * 128 * 2  # the partials' share holds
    assert decode.key_splits(8, 4096, 4, spec, cores=32) == min(16, 4096 // keys)  # 4 x 32 cores / 8 groups
    assert decode.key_splits(8, keys - 1, 4, spec, cores=32) == 1  # too few keys to split
    assert decode.key_splits(1024, 100_000, 4, spec, cores=32) == 1  # enough threadgroups already


def test_vector_loads_are_used_only_when_aligned():
    aligned = cache_problem(d=128, seed=14)
    assert decode.spec_for(aligned).vec == 4
    shifted = dataclasses.replace(aligned, k=torch.randn(aligned.k.numel() + 1, dtype=FP16)[1:].view(aligned.k.shape))
    assert decode.spec_for(shifted).vec == 1  # a storage offset of one element
    odd = cache_problem(d=126, seed=15)
    assert decode.spec_for(odd).vec == 2  # 126 = 2 x 63
    run_and_check(shifted)
    assert all("_v1_" in name for name in launched())


def test_caches_past_32_bit_offsets_take_the_block_forward():
    rows, hk, d = 2**21, 8, 128  # (rows + 1) x 1024 elements > 2**31
    assert decode.in_loop_span((1, rows, hk, d), (rows * hk * d, hk * d, d, 1), rows, paged=False) > decode.INT32_LIMIT
    assert decode.in_loop_span((1, rows // 2 - 1, hk, d), (0, hk * d, d, 1), rows // 2 - 1, paged=False) <= decode.INT32_LIMIT
    q = torch.empty(1, 1, 32, d, dtype=FP16, device="meta")
    k = torch.empty(1, rows, hk, d, dtype=FP16, device="meta")
    seqlens = torch.tensor([rows], dtype=torch.int32)
    big = AttentionProblem(q=q, k=k, v=k, softmax_scale=1.0, causal=True, window_left=-1, window_right=0, softcap=0.0,
                           alibi_slopes=None, dropout_p=0.0, max_seqlen_q=1, max_seqlen_k=rows,
                           kv_cache=KVCache(seqlens, seqlens * 0, seqlens * 0, None))
    assert decode.plan(big, get_backend("emulator")) is None


def test_debug_build_stays_in_bounds(debug_emulator):
    run_and_check(cache_problem(page=1, sq=2, h=4, hk=2, num_splits=3, seed=16))
    run_and_check(cache_problem(ends=(37, 30, 70), leftpad=(5, 30, 21), slots=(3, 0, 1), sq=3, seed=17))


# ---- the combine kernel against its documented layout -------------------------------------------------------


def test_combine_kernel_merges_the_documented_partial_layout():
    """Partials written by hand in decode_combine's layout (including splits and rows that saw no key) merge as
    its formula says. This is the contract the block forward's split-KV relies on."""
    torch.manual_seed(18)
    b, sq, h, d, splits = 2, 3, 5, 40, 6
    spec = decode_kernel.DecodeSpec.for_call("float", d)
    library = get_backend("emulator").compile(decode_kernel.decode_source(spec))
    rows = b * h * sq
    o_partial = torch.randn(splits, rows, spec.head_dim)
    lse_partial = torch.randn(splits, rows) * 3
    lse_partial[torch.rand(splits, rows) < 0.3] = -torch.finfo(torch.float32).max  # splits that saw no key
    lse_partial[:, 7] = -torch.finfo(torch.float32).max  # a row that saw nothing at all
    q = torch.zeros(b, sq, h, d)
    out, lse = torch.full_like(q, float("nan")), torch.full((b, h, sq), float("nan"))
    stats = torch.full((b, h, sq, 2), float("nan"))
    ints = dict.fromkeys(decode_kernel.INT_ARGS, 0) | dict(SEQLEN_Q=sq, HEAD_DIM_REAL=d, KV_GROUP=1, O_BATCH=sq * h * d,
                                                    O_ROW=h * d, O_HEAD=d, LSE_BATCH=h * sq, LSE_HEAD=sq,
                                                    NUM_SPLITS=splits, NHEADS=h, MAX_SEQLEN_Q=sq, SPLIT_STRIDE=rows)
    threads, group = decode_combine.combine_grid(sq, h, b)
    library.attention_decode_float_d40_v2_r16_combine(q, q, q, o_partial, lse_partial, list(ints.values()), [0.0, 0.0],
                                                      out, lse, stats, threads=threads, group_size=group)
    seen = lse_partial > -torch.finfo(torch.float32).max
    top = torch.where(seen, lse_partial, -math.inf).amax(0)
    weights = torch.where(seen, torch.exp2(lse_partial - top), 0.0)
    total = weights.sum(0)
    expected = (weights[..., None] * o_partial).sum(0)[:, :d] / total.clamp_min(1e-30)[:, None]
    expected_lse = torch.where(total > 0, (top + torch.log2(total)) * math.log(2), math.inf)
    # part = (sequence * NHEADS + head) * MAX_SEQLEN_Q + row; out is (b, sq, h, d)
    assert torch.allclose(out.permute(0, 2, 1, 3).reshape(rows, d), expected, atol=1e-5)
    assert torch.equal(torch.isinf(lse.reshape(rows)), total == 0) and total[7] == 0
    assert torch.allclose(lse.reshape(rows)[total > 0], expected_lse[total > 0], atol=1e-5)
    assert (out.permute(0, 2, 1, 3).reshape(rows, d)[7] == 0).all()
    # The backward's statistics: (top, log2 total), (0, 0) for the row that saw nothing.
    flat = stats.reshape(rows, 2)
    assert torch.allclose(flat[total > 0], torch.stack((top, torch.log2(total)), -1)[total > 0], atol=1e-5)
    assert (flat[7] == 0).all()


# ---- the generated MSL's conventions ------------------------------------------------------------------------

COMPILE_TIME_LOOP = re.compile(r"for \(int (\w+) = 0; \1 < (ROWS|CHUNKS|REDUCE|VEC|COLUMNS);")


def test_generated_msl_follows_the_kernel_conventions():
    for name, source in decode_report.sources().items():
        assert not re.search(r"\bINFINITY\b|\bisinf\b|\bisnan\b|\bisfinite\b", source), name
        lines = source.splitlines()
        kernels = [i for i, line in enumerate(lines) if line.startswith("kernel void")]
        assert len(kernels) == 3 and all(lines[i - 1].startswith("[[max_total_threads_per_threadgroup(") for i in kernels)
        loops = [i for i, line in enumerate(lines) if COMPILE_TIME_LOOP.search(line)]
        assert loops and all(lines[i - 1].strip() == "#pragma clang loop unroll(full)" for i in loops), name
        assert "as_type<float>(0x7f800000u)" in source  # +inf only in the final LSE stores
    # The checks can fail: a loop without its pragma is found.
    assert COMPILE_TIME_LOOP.search("  for (int c = 0; c < CHUNKS; ++c) {")


def test_dumped_decode_kernels_typecheck():
    for name, source in decode_report.sources().items():
        if "_half_" in name:
            typecheck(source)


# ---- the report ------------------------------------------------------------------------------------------------


def test_report_records_carry_the_issue_fields_and_meet_the_targets():
    records = decode_report.report_records()
    assert len(records) == len(decode_report.FAMILIES) * len(decode_report.DTYPES) * len(decode_report.HEAD_DIMS)
    for r in records:
        assert r["kernel"] == "decode" and r["head_dim"] in (64, 128, 256)
        assert r["registers_per_thread"] <= decode_kernel.REGISTER_BUDGET and r["int64_ops_per_key_block"] == 0
        assert r["threads"] == decode_kernel.THREADS and 0 < r["threadgroup_bytes"] <= 32 * 1024
        assert [t["cache_rows"] for t in r["decode_traffic"]] == [4096, 32768, 131072]
        for t in r["decode_traffic"]:
            assert t["io_bound_bytes_per_token"] <= t["bytes_per_token"] <= 1.05 * t["io_bound_bytes_per_token"]
            chips = decode_report.family_chips(r["family"])
            assert set(t["bandwidth_limited_ms_per_token"]) == set(chips)
    lines = decode_report.format_report().splitlines()
    assert len([line for line in lines if line.startswith(("apple7 ", "apple9 "))]) >= len(records)


@pytest.mark.parametrize("dtype", decode_report.DTYPES)
@pytest.mark.parametrize("d", [64, 128, 256])
def test_decode_traffic_is_at_the_bound_from_1024_rows(dtype, d):
    spec = decode_report.report_spec(dtype, d)
    for rows in (1024, 2048, 4096, 131072):
        for cores in (8, 10, 40, 80):
            moved, bound, _ = decode_report.token_traffic(spec, rows, d, cores)
            assert moved <= decode_report.TARGET * bound
    # The check can fail: 32 splits of a 1,024-row cache move too many partial bytes.
    geo = dataclasses.replace(decode.geometry(spec, 1, 1, 32, 8, 1024, 80), splits=32)
    moved, bound = decode_report.step_traffic(spec, geo, 1024, 32, 8, d)
    assert moved > decode_report.TARGET * bound


def test_every_decode_spec_stays_within_the_register_budget():
    for d in range(8, 257, 8):
        for alibi in (False, True):
            for cache in ("", "paged"):
                spec = decode_kernel.DecodeSpec.for_call("half", d, masked=True, softcap=True, alibi=alibi, kv_cache=cache)
                assert decode_kernel.registers_per_thread(spec) <= decode_kernel.REGISTER_BUDGET and spec.rows >= decode_kernel.REDUCE
