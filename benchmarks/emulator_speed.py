"""How fast the CPU emulator runs Metal threads.

Prints microseconds per barrier round (one threadgroup_barrier crossed by every thread of a 128-thread
threadgroup) and the wall time of the package's own generated forward kernel on a FlashAttention-forward-sized
problem: B=1, H=2, N=256, D=64, fp32, with this machine's tiles (K/V blocks staged through threadgroup memory
behind barriers, QK^T and PV on 8x8 simdgroup matrices). Target: the launch takes well under a second once
compiled.
"""

from __future__ import annotations

import time

import torch

from flash_attn_metal.emulator import compile_shader
from flash_attn_metal.kernels import dispatch
from flash_attn_metal.problem import AttentionProblem
from flash_attn_metal.reference import attention

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
    q, k, v = (torch.randn(1, n, heads, d) for _ in range(3))
    problem = AttentionProblem(q=q, k=k, v=v, softmax_scale=d**-0.5, causal=False, window_left=-1, window_right=-1,
                               softcap=0.0, alibi_slopes=None, dropout_p=0.0, max_seqlen_q=n, max_seqlen_k=n)
    start = time.perf_counter()
    launch = dispatch.forward_launch(problem, "emulator")
    print(f"attention kernel build (or cache load): {time.perf_counter() - start:.2f} s")
    seconds = _time(lambda: launch(q, k, v))
    error = float((launch(q, k, v)[0] - attention(problem)[0]).abs().max())
    print(f"FlashAttention-forward-sized launch (B=1, H={heads}, N={n}, D={d}): {seconds:.3f} s; "
          f"max error vs the reference {error:.2e}")

if __name__ == "__main__":
    main()
