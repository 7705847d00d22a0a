"""The tile table stays within Apple's limits, and every kernel that `kernels --dump` writes type-checks and
builds in the emulator, with the threadgroup memory the table promises."""

from __future__ import annotations

import pytest

from flash_attn_metal.emulator import compile_shader, typecheck
from flash_attn_metal.kernels import report
from flash_attn_metal.kernels.backward import backward_source
from flash_attn_metal.kernels.backward import kernel_names as backward_kernel_names
from flash_attn_metal.kernels.forward import forward_source
from flash_attn_metal.kernels.tiles import (
    FAMILIES,
    THREADGROUP_MEMORY_LIMIT,
    THREADS_LIMIT,
    backward_threadgroup_bytes,
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
    assert len(rows) == len(report.FAMILIES) * len(report.DTYPES) * len(report.HEAD_DIMS)
    assert all(max(r["threadgroup_bytes"], r["backward_threadgroup_bytes"]) <= THREADGROUP_MEMORY_LIMIT for r in rows)
    assert "limits" in report.format_report()


def test_dumped_kernels_typecheck_and_build(tmp_path):
    written = report.dump(tmp_path)
    sources = report.sources()
    assert sorted(p.name for p in written) == sorted(sources)
    for spec in dict.fromkeys(report.representative_specs()):
        for source, names, limit in (
            (forward_source(spec), [spec.name], forward_threadgroup_bytes(spec.tiles, spec.head_dim, spec.dtype)),
            (backward_source(spec), backward_kernel_names(spec)[1:],
             backward_threadgroup_bytes(spec.tiles, spec.head_dim, spec.dtype)),
        ):
            assert source.isascii() and "__asm" not in source and "#pragma METAL" not in source
            typecheck(source)
            lib = compile_shader(source)
            for name in names:
                assert getattr(lib, name).static_thread_group_memory_length == limit


def test_same_spec_gives_byte_identical_source():
    spec = report.representative_specs()[7]
    assert forward_source(spec) == forward_source(spec)
