"""`emulator.typecheck` rejects what Apple's compiler rejects for types and address spaces. Every must-fail
case has a must-pass twin, so a broken compiler call that rejects everything cannot pass."""

from __future__ import annotations

import pytest

from flash_attn_metal.emulator import MSLCompileError, typecheck

HEADER = "#include <metal_stdlib>\nusing namespace metal;\n"

PAIRS = {
    "threadgroup pointer where a device pointer is expected": (
        "inline float first(threadgroup float* p) { return p[0]; }",
        "inline float first(device float* p) { return p[0]; }",
        "no matching function",
    ),
    "implicit conversion between vector element types": (
        "inline float first(threadgroup float* p) { float4 f = float4(half4(1.0h)); return f.x + p[0]; }",
        "inline float first(threadgroup float* p) { half4 h = half4(1.0h); float4 f = h; return f.x + p[0]; }",
        "cannot initialize",
    ),
    "unknown function": (
        "inline float first(threadgroup float* p) { return exp2(p[0]); }",
        "inline float first(threadgroup float* p) { return exp3(p[0]); }",
        "undeclared identifier 'exp3'",
    ),
    "simdgroup_load from the wrong element type": (
        "inline float first(threadgroup float* p) { simdgroup_float8x8 m; simdgroup_load(m, p, 8); return p[0]; }",
        "inline float first(threadgroup float* p) { simdgroup_half8x8 m; simdgroup_load(m, p, 8); return p[0]; }",
        "no matching function",
    ),
    "implicit float to bfloat vector": (
        "inline float first(threadgroup float* p) { bfloat2 b = bfloat2(p[0], 1.0f); return float(b.x); }",
        "inline float first(threadgroup float* p) { bfloat2 b = float2(p[0], 1.0f); return float(b.x); }",
        "cannot initialize",
    ),
}

KERNEL = """
kernel void k(device float* out [[buffer(0)]], uint i [[thread_position_in_grid]]) {
  threadgroup float tile[32];
  tile[i % 32] = float(i);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[i] = first(tile);
}
"""


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_must_pass_and_must_fail(name):
    good, bad, message = PAIRS[name]
    typecheck(HEADER + good + KERNEL)
    with pytest.raises(MSLCompileError, match=message) as info:
        typecheck(HEADER + bad + KERNEL)
    assert info.value.diagnostics[0].line in (3, 8)  # the helper, or the kernel line that calls it


ATTENTION_LIKE = HEADER + """
constant int D = 64;
template <typename T> inline float load(const device T* p, long i) { return float(p[i]); }
kernel void attn(device const bfloat* q [[buffer(0)]], device half* o [[buffer(1)]], constant long* ints [[buffer(2)]],
                 uint3 group [[threadgroup_position_in_grid]], ushort lane [[thread_index_in_simdgroup]],
                 ushort sg [[simdgroup_index_in_threadgroup]]) {
  threadgroup float tile[8 * D];
  simdgroup_float8x8 acc = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  simdgroup_float8x8 a;
  a.thread_elements() = float2(load(q, lane), load(q, lane + 1));
  simdgroup_load(a, tile, D, ulong2(8, 0));
  simdgroup_multiply_accumulate(acc, a, a, acc);
  float m = max(acc.thread_elements().x, acc.thread_elements().y);
  m = max(m, simd_shuffle_xor(m, 1));
  o[group.x * 32 + lane] = half(exp2(m - 1.0f)) + static_cast<half>(float(bfloat(m)));
  threadgroup_barrier(mem_flags::mem_threadgroup);
}
"""


def test_a_realistic_attention_kernel_passes():
    typecheck(ATTENTION_LIKE)
    with pytest.raises(MSLCompileError):
        typecheck(ATTENTION_LIKE.replace("simdgroup_load(a, tile,", "simdgroup_load(a, q,"))


def test_private_metal_is_rejected():
    good = HEADER + KERNEL.replace("first(tile)", "tile[0]")
    typecheck(good)
    with pytest.raises(MSLCompileError, match="#pragma METAL"):
        typecheck("#pragma METAL internals : enable\n" + good)
    with pytest.raises(MSLCompileError, match="__asm"):
        typecheck(good.replace("tile[i % 32] = float(i);", 'tile[i % 32] = float(i); __asm("nop");'))
