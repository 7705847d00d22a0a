"""The tile table stays within Apple's limits, every kernel that `kernels --dump` writes is public ASCII MSL
that type-checks, and the emulator's builds use the threadgroup memory the table promises."""

from __future__ import annotations

import pytest

from flash_attn_metal.emulator import MSLCompileError, compile_shader, typecheck
from flash_attn_metal.kernels import report
from flash_attn_metal.kernels.backward import backward_source
from flash_attn_metal.kernels.backward import kernel_names as backward_kernel_names
from flash_attn_metal.kernels.forward import forward_source
from flash_attn_metal.kernels.spec import ForwardSpec
from flash_attn_metal.kernels.tiles import (
    FAMILIES,
    THREADGROUP_MEMORY_LIMIT,
    THREADS_LIMIT,
    backward_threadgroup_bytes,
    candidates,
    forward_threadgroup_bytes,
    forward_tiles,
)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_configuration_fits(family):
    for d in range(8, 257, 8):
        for dtype in ("half", "bfloat", "float"):
            tiles = forward_tiles(family, d)
            assert tiles.threads <= THREADS_LIMIT and tiles.threads % 32 == 0
            assert tiles.block_q % 8 == 0 and tiles.block_k % 8 == 0
            assert forward_threadgroup_bytes(tiles, d, dtype) <= THREADGROUP_MEMORY_LIMIT
            assert backward_threadgroup_bytes(tiles, d, dtype) <= THREADGROUP_MEMORY_LIMIT
            assert tiles.reason


def test_the_limit_check_can_fail():
    oversized = forward_tiles("apple7", 256).__class__(64, 64, "too big")
    assert forward_threadgroup_bytes(oversized, 256, "float") > THREADGROUP_MEMORY_LIMIT


def test_report_covers_every_configuration():
    rows = report.report_rows()
    assert len(rows) == len(report.FAMILIES) * len(report.DTYPES) * len(report.REPORT_HEAD_DIMS)
    assert {r["head_dim"] for r in rows} == set(range(8, 257, 8))
    assert all(max(r["threadgroup_bytes"], r["backward_threadgroup_bytes"]) <= THREADGROUP_MEMORY_LIMIT for r in rows)
    assert "limits" in report.format_report()


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
        typecheck(source)


def test_the_typecheck_catches_an_address_space_mistake():
    """Negative control: a dumped kernel that passes device memory where threadgroup memory belongs fails."""
    source = forward_source(report.representative_specs()[0])
    broken = source.replace("load_tile(kv_tile, BLOCK_K, k_seq", "load_tile(k_seq, BLOCK_K, k_seq")
    assert broken != source
    with pytest.raises(MSLCompileError):
        typecheck(broken)


@pytest.mark.parametrize("family", ["apple7", "apple9"])
def test_built_kernels_use_the_threadgroup_memory_the_table_promises(family):
    """The tables' byte counts against the emulator's build of the generated source, for every dtype at the
    smallest and largest tile (one compile each: the count is linear in the head dim and the key block)."""
    for dtype, d in (("half", 40), ("bfloat", 256), ("float", 256)):
        spec = ForwardSpec.for_call(dtype, d, family, varlen=False, masked=False, softcap=False, alibi=False)
        kernels = (
            (forward_source(spec), [spec.name], forward_threadgroup_bytes(spec.tiles, d, dtype)),
            (backward_source(spec), backward_kernel_names(spec)[1:], backward_threadgroup_bytes(spec.tiles, d, dtype)),
        )
        for source, names, promised in kernels:
            lib = compile_shader(source)
            for name in names:
                assert getattr(lib, name).static_thread_group_memory_length == promised


def test_same_spec_gives_byte_identical_source():
    spec = report.representative_specs()[7]
    assert forward_source(spec) == forward_source(spec)


def test_decode_traffic_figures():
    """One decode step over 1000 cached rows at d = 64 in fp16: 2 * 1000 * 64 * 2 bytes per K/V read."""
    assert report.decode_traffic(1000, 8, 2, 64, 2, block_q=16) == (2 * 256_000, 2 * 256_000)  # packed: the bound
    assert report.decode_traffic(1000, 64, 1, 64, 2, block_q=16) == (4 * 256_000, 256_000)  # 64 heads: 4 blocks
    assert report.decode_traffic(1000, 8, 8, 64, 2, block_q=16) == (8 * 256_000, 8 * 256_000)  # no GQA
    assert "kv-cache decode" in report.format_report()


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


@pytest.mark.parametrize("kind", ["forward", "backward"])
def test_candidates_fit_and_start_with_the_table(kind):
    for family in FAMILIES:
        for d in (64, 128, 256):
            for dtype in ("half", "float"):
                found = candidates(kind, family, dtype, d)
                assert found[0] == forward_tiles(family, d)
                assert len(set((t.block_q, t.block_k) for t in found)) == len(found)
                size = forward_threadgroup_bytes if kind == "forward" else backward_threadgroup_bytes
                assert all(size(t, d, dtype) <= THREADGROUP_MEMORY_LIMIT for t in found)
    assert len(candidates(kind, "apple9", "half", 64)) > 1
    with pytest.raises(ValueError, match="kind"):
        candidates("sideways", "apple9", "half", 64)
