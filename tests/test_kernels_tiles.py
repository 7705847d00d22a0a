"""The tile table stays within Apple's limits, every kernel that `kernels --dump` writes is public ASCII MSL
that type-checks, and the emulator's builds use the threadgroup memory the table promises."""

from __future__ import annotations

import json

import pytest

from flash_attn_metal.emulator import MSLCompileError, compile_shader, typecheck
from flash_attn_metal.kernels import cost, report
from flash_attn_metal.kernels.backward import backward_source
from flash_attn_metal.kernels.backward import kernel_names as backward_kernel_names
from flash_attn_metal.kernels.forward import forward_source
from flash_attn_metal.kernels.spec import BackwardSpec, ForwardSpec
from flash_attn_metal.kernels.tiles import (
    FAMILIES,
    KERNEL_KINDS,
    THREADGROUP_MEMORY_LIMIT,
    THREADS_LIMIT,
    TILE_TABLES,
    Tiles,
    candidates,
    threadgroup_bytes,
)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_configuration_fits(family):
    for kind, table in TILE_TABLES.items():
        for d in range(8, 257, 8):
            for dtype in ("half", "bfloat", "float"):
                tiles = table(family, dtype, d)
                assert tiles.threads <= THREADS_LIMIT and tiles.threads % 32 == 0
                assert tiles.block_q % 8 == 0 and tiles.block_k % 8 == 0
                assert threadgroup_bytes(kind, tiles, d, dtype) <= THREADGROUP_MEMORY_LIMIT
                assert tiles.reason


def test_the_limit_check_can_fail():
    oversized = Tiles(64, 64, "threadgroup")
    assert threadgroup_bytes("forward", oversized, 256, "float") > THREADGROUP_MEMORY_LIMIT
    with pytest.raises(ValueError):
        Tiles(12, 16)  # rows come in SIMD groups of 8


def test_report_covers_every_configuration_and_its_targets_hold():
    records = report.report_records()
    block = [r for r in records if r["kernel"] in report.KERNELS]
    assert len(block) == len(report.FAMILIES) * len(report.DTYPES) * len(report.REPORT_HEAD_DIMS) * len(report.KERNELS)
    assert {r["head_dim"] for r in block} == set(range(8, 257, 8))
    assert any(r["kernel"] == "decode" and r["decode_traffic"] for r in records)
    assert report.missed_targets(records) == []
    for key in ("family", "dtype", "head_dim", "kernel", "threads", "threadgroup_bytes", "registers_per_thread",
                "int64_ops_per_key_block", "mma_share"):
        assert all(key in r for r in block)
    # The target check can fail: one record past each limit is named.
    bad = dict(records[0], registers_per_thread=200, int64_ops_per_key_block=3, mma_share=0.1, head_dim=64,
               kernel="forward")
    missed = report.missed_targets([bad])
    assert len(missed) == 3 and "registers_per_thread 200" in missed[0]
    decode = next(r for r in records if r["kernel"] == "decode")
    traffic = decode["decode_traffic"][0]
    heavy = dict(decode, decode_traffic=[dict(traffic, bytes_per_token=2 * traffic["io_bound_bytes_per_token"])])
    (missed,) = report.missed_targets([heavy])
    assert f"{traffic['cache_rows']} cache rows move" in missed
    assert "targets: all met" in report.format_report()
    assert json.loads(report.format_json())[0]["kernel"] == "forward"


def test_int64_operations_are_read_off_the_generated_hot_loops():
    """No 64-bit integer arithmetic in any hot loop of ordinary specs; a `wide` spec (a tensor spanning 2^32
    elements) really has some, and the scan finds them."""
    for wide in (False, True):
        spec = ForwardSpec.for_call("half", 128, "apple9", varlen=True, masked=True, softcap=True, alibi=True,
                                    wide=wide)
        backward = BackwardSpec.of(spec, "apple9")
        counts = [cost.int64_ops_in_hot_loop(forward_source(spec), spec.name)] + [
            cost.int64_ops_in_hot_loop(backward_source(backward), name) for name in backward_kernel_names(backward)[1:]]
        assert all(c > 0 for c in counts) if wide else counts == [0] * len(counts)
    paged = ForwardSpec.for_call("half", 64, "apple7", varlen=False, masked=False, softcap=False, alibi=False,
                                 kv_cache="paged")
    source = forward_source(paged)
    assert cost.int64_ops_in_hot_loop(source, paged.name) == 0
    assert cost.int64_ops_in_hot_loop(source.replace("const int key0", "const long key0"), paged.name) > 0


def test_register_estimates_follow_the_operands():
    """Caching Q in registers costs d/4 registers; splitting dK and dV halves the accumulators."""
    q_cached, q_staged = Tiles(32, 32, "registers"), Tiles(32, 32, "threadgroup")
    assert cost.registers("forward", q_cached, 128) - cost.registers("forward", q_staged, 128) == 2 * 16 - 2
    fused, split = Tiles(32, 16, "threadgroup"), Tiles(32, 16, "threadgroup", split=True)
    assert cost.registers("dkdv", fused, 256) - cost.registers("dk", split, 256) == 2 * 32
    assert cost.registers("dkdv", fused, 256) > 128 >= cost.registers("dk", split, 256)


def test_issue_slot_model():
    """MMAs per step follow the algorithm: forward 2 (BK/8)(d/8) per SIMD group, dq 3, dkdv 4 (dk 3, dv 2)."""
    t = Tiles(32, 32, "registers")
    assert cost.step_cost("forward", t, 64, "half").mma == 2 * 4 * 8
    assert cost.step_cost("dq", t, 64, "half").mma == 3 * 4 * 8
    assert [cost.step_cost(k, t, 64, "half").mma for k in ("dkdv", "dk", "dv")] == [4 * 32, 3 * 32, 2 * 32]
    step = cost.step_cost("forward", t, 64, "half")
    assert 0 < step.mma_share < 1 and step.cycles > step.mma * cost.MMA_CYCLES


def test_traffic_figures():
    """bytes(N) by hand for one tile, and FlashAttention's row block for 32 KiB (Dao et al. 2022, Algorithm 1)."""
    a, b = report.kernel_traffic(block_q=32, head_dim=64, elem_bytes=2)
    n = 1000
    q_o_lse = 2 * n * 64 * 2 + 4 * n
    k_v = (n // 32 + 1) * 2 * n * 64 * 2  # ceil(n / 32) query blocks each read K and V
    assert a * n + b * n * n <= q_o_lse + k_v < a * n + b * n * n + 2 * n * 64 * 2
    assert report.flash_attention_rows(64, 2) == 64  # ceil(16384 / 256) = 64 = d
    assert report.flash_attention_rows(256, 4) == 8  # ceil(8192 / 1024)
    assert report.flash_attention_rows(8, 2) == 8  # capped at d


def test_dumped_kernels_are_public_ascii_msl_and_typecheck(tmp_path):
    written = report.dump(tmp_path)
    sources = report.sources()
    assert sorted(p.name for p in written) == sorted(sources)
    for path in written:
        source = path.read_text()
        assert source == sources[path.name]
        assert source.isascii() and "__asm" not in source and "#pragma METAL" not in source
        assert "INFINITY" not in source and "isinf" not in source and "isfinite" not in source and "isnan" not in source
        typecheck(source)


def test_the_typecheck_catches_an_address_space_mistake():
    """Negative control: a dumped kernel that passes device memory where threadgroup memory belongs fails."""
    source = forward_source(report.representative_specs()[0])
    broken = source.replace("(kv_tile, k_seq", "(k_seq, k_seq")
    assert broken != source
    with pytest.raises(MSLCompileError):
        typecheck(broken)


@pytest.mark.parametrize("family", ["apple7", "apple9"])
def test_built_kernels_use_the_threadgroup_memory_the_table_promises(family):
    """The tables' byte counts against the emulator's build of the generated source, for every dtype at a small
    and the largest head dim (one compile each)."""
    def promised(kind: str, tiles: Tiles, d: int, dtype: str) -> int:
        return -(-threadgroup_bytes(kind, tiles, d, dtype) // 16) * 16

    for dtype, d in (("half", 40), ("bfloat", 256), ("float", 256)):
        spec = ForwardSpec.for_call(dtype, d, family, varlen=False, masked=False, softcap=False, alibi=False)
        backward = BackwardSpec.of(spec, family)
        names = backward_kernel_names(backward)
        kernels = [(forward_source(spec), {spec.name: promised("forward", spec.tiles, d, dtype)}),
                   (backward_source(backward), {names[1]: promised("dq", backward.dq, d, dtype),
                                                **{n: promised("dkdv", backward.dkdv, d, dtype) for n in names[2:]}})]
        for source, expected in kernels:
            lib = compile_shader(source)
            for name, size in expected.items():
                assert getattr(lib, name).static_thread_group_memory_length == size


def test_same_spec_gives_byte_identical_source():
    spec = report.representative_specs()[7]
    assert forward_source(spec) == forward_source(spec)


def test_gqa_packing_fills_query_blocks_only_when_it_saves_threadgroups():
    from flash_attn_metal.kernels.tiles import packed_heads

    assert packed_heads(1, 32, 8, 16) == 4  # decoding: the group's 4 heads fill one block (8 threadgroups, not 32)
    assert packed_heads(1, 64, 1, 16) == 64  # MQA: 4 blocks of 16 packed rows instead of 64 threadgroups
    assert packed_heads(1, 32, 32, 16) == 1  # no GQA, nothing to pack
    assert packed_heads(4096, 32, 8, 16) == 1  # long queries fill their blocks already
    assert packed_heads(16, 32, 8, 16) == 1  # exactly full blocks: packing would save nothing


def test_key_splits_occupy_the_gpu_only_when_a_launch_is_too_small():
    from flash_attn_metal.kernels.tiles import MAX_SPLITS, key_splits

    assert key_splits(threadgroups=8, key_blocks=256, gpu_cores=10) == 5  # decoding: 40 threadgroups wanted
    assert key_splits(threadgroups=8, key_blocks=8, gpu_cores=10) == 2  # at least 4 key blocks per split
    assert key_splits(threadgroups=1, key_blocks=10_000, gpu_cores=80) == MAX_SPLITS
    assert key_splits(threadgroups=4096, key_blocks=256, gpu_cores=10) == 1  # prefill fills the GPU already
    assert key_splits(threadgroups=8, key_blocks=256, gpu_cores=10, requested=1) == 1  # num_splits=1: never
    assert key_splits(threadgroups=4096, key_blocks=3, gpu_cores=10, requested=7) == 3  # a block per split at least


@pytest.mark.parametrize("kind", KERNEL_KINDS)
def test_candidates_fit_and_start_with_the_table(kind):
    for family in FAMILIES:
        for d in (64, 128, 256):
            for dtype in ("half", "float"):
                found = candidates(kind, family, dtype, d)
                assert found[0] == TILE_TABLES[kind](family, dtype, d)
                assert len(set(found)) == len(found)
                assert all(threadgroup_bytes(kind, t, d, dtype) <= THREADGROUP_MEMORY_LIMIT for t in found)
    assert len(candidates(kind, "apple9", "half", 64)) > 1
    with pytest.raises(ValueError, match="kind"):
        candidates("sideways", "apple9", "half", 64)
