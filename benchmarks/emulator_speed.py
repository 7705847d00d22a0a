"""How fast the CPU emulator runs Metal threads.

Prints microseconds per barrier round (one threadgroup_barrier crossed by every thread of a 128-thread
threadgroup) and the wall time of a FlashAttention-forward-sized launch: B=1, H=2, N=256, D=64, 128-thread
threadgroups of 32 query rows, K/V blocks of 32 keys staged through threadgroup memory behind barriers,
QK^T and PV on 8x8 simdgroup matrices. Target: the launch takes well under a second once compiled.
"""

from __future__ import annotations

import time

import torch

from flash_attn_metal.emulator import compile_shader

BARRIER_ROUNDS = 200
BARRIER_SOURCE = """
#include <metal_stdlib>
using namespace metal;
kernel void rounds(device float* out [[buffer(0)]], constant long& n [[buffer(1)]],
                   uint tid [[thread_index_in_threadgroup]], uint gid [[threadgroup_position_in_grid]]) {
  threadgroup float cell[128];
  float acc = 0.0f;
  for (long r = 0; r < n; ++r) {
    cell[tid] = acc + float(r);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    acc += cell[(tid + 1) % 128];
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  out[gid * 128 + tid] = acc;
}
"""

# One query block of 32 rows per threadgroup (8 rows per SIMD group), fp32, online softmax in base 2.
ATTENTION_SOURCE = """
#include <metal_stdlib>
using namespace metal;
constant int D = 64;         // head dim
constant int BLOCK_Q = 32;   // query rows per threadgroup: 4 SIMD groups x 8 rows
constant int BLOCK_K = 32;   // keys per K/V block
constant int THREADS = 128;

kernel void attention(device const float* Q [[buffer(0)]], device const float* K [[buffer(1)]],
                      device const float* V [[buffer(2)]], device float* O [[buffer(3)]],
                      constant long& N [[buffer(4)]], constant float& scale_log2 [[buffer(5)]],
                      uint2 group [[threadgroup_position_in_grid]], ushort sg [[simdgroup_index_in_threadgroup]],
                      ushort tid [[thread_index_in_threadgroup]]) {
  threadgroup float K_tile[BLOCK_K * D];
  threadgroup float V_tile[BLOCK_K * D];
  const long head_offset = long(group.y) * N * D;
  const long q_row = long(group.x) * BLOCK_Q + sg * 8;
  simdgroup_float8x8 q[D / 8], o[D / 8];
  for (int d = 0; d < D / 8; ++d) {
    simdgroup_load(q[d], Q + head_offset + q_row * D, D, ulong2(d * 8, 0));
    o[d] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  }
  float m = -INFINITY, l = 0.0f;
  for (long k0 = 0; k0 < N; k0 += BLOCK_K) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int i = tid; i < BLOCK_K * D; i += THREADS) {
      K_tile[i] = K[head_offset + k0 * D + i];
      V_tile[i] = V[head_offset + k0 * D + i];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    simdgroup_float8x8 s[BLOCK_K / 8];
    float m_new = m;
    for (int j = 0; j < BLOCK_K / 8; ++j) {
      s[j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      for (int d = 0; d < D / 8; ++d) {
        simdgroup_float8x8 kt;
        simdgroup_load(kt, K_tile + j * 8 * D + d * 8, D, ulong2(0, 0), true);
        simdgroup_multiply_accumulate(s[j], q[d], kt, s[j]);
      }
      float2 e = s[j].thread_elements() * scale_log2;
      m_new = max(m_new, max(e.x, e.y));
    }
    m_new = max(m_new, simd_shuffle_xor(m_new, 1));
    m_new = max(m_new, simd_shuffle_xor(m_new, 8));
    float correction = exp2(m - m_new);
    float row_sum = 0.0f;
    for (int j = 0; j < BLOCK_K / 8; ++j) {
      float2 p = exp2(s[j].thread_elements() * scale_log2 - m_new);
      s[j].thread_elements() = p;
      row_sum += p.x + p.y;
    }
    row_sum += simd_shuffle_xor(row_sum, 1);
    row_sum += simd_shuffle_xor(row_sum, 8);
    l = l * correction + row_sum;
    m = m_new;
    for (int d = 0; d < D / 8; ++d) {
      o[d].thread_elements() *= correction;
      for (int j = 0; j < BLOCK_K / 8; ++j) {
        simdgroup_float8x8 v;
        simdgroup_load(v, V_tile, D, ulong2(d * 8, j * 8));
        simdgroup_multiply_accumulate(o[d], s[j], v, o[d]);
      }
    }
  }
  for (int d = 0; d < D / 8; ++d) {
    o[d].thread_elements() /= l;
    simdgroup_store(o[d], O + head_offset + q_row * D, D, ulong2(d * 8, 0));
  }
}
"""


def _time(fn, repeats: int = 3) -> float:
    fn()  # warm-up (also compiles nothing: the library is built already)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    groups = 4
    lib = compile_shader(BARRIER_SOURCE)
    out = torch.empty(groups * 128)
    seconds = _time(lambda: lib.rounds(out, BARRIER_ROUNDS, threads=[groups * 128], group_size=[128]))
    rounds = 2 * BARRIER_ROUNDS * groups
    print(f"barrier round (128 threads): {seconds / rounds * 1e6:.1f} us")

    heads, n, d = 2, 256, 64
    q, k, v = (torch.randn(heads, n, d) for _ in range(3))
    o = torch.empty_like(q)
    start = time.perf_counter()
    lib = compile_shader(ATTENTION_SOURCE)
    print(f"attention kernel build (or cache load): {time.perf_counter() - start:.2f} s")
    scale_log2 = d**-0.5 * 1.4426950408889634
    seconds = _time(lambda: lib.attention(q, k, v, o, n, scale_log2, threads=[n // 32 * 128, heads], group_size=[128, 1]))
    expected = torch.softmax(q @ k.transpose(1, 2) * d**-0.5, dim=-1) @ v
    print(f"FlashAttention-forward-sized launch (B=1, H={heads}, N={n}, D={d}): {seconds:.3f} s; "
          f"max error vs torch {float((o - expected).abs().max()):.2e}")


if __name__ == "__main__":
    main()
