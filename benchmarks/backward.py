"""Training speed and memory: forward + backward of the generated Metal kernels against torch's
scaled_dot_product_attention on MPS.

On a Mac (MPS available): N = 512 ... 8192, d = 64/128/256, causal and not, fp16; prints ms for forward +
backward, the speed-up over SDPA, and peak MPS memory of each (torch.mps.current_allocated_memory, sampled
after the backward; the kernels keep O(N d) extra, SDPA's math path O(N^2)). Elsewhere: prints the static
report (threadgroup memory of the backward kernels included) and says that Apple GPU timings need a Mac.
"""

from __future__ import annotations

import time

import torch

from flash_attn_metal.kernels.report import format_report

SEQLENS = (512, 1024, 2048, 4096, 8192)
HEAD_DIMS = (64, 128, 256)


def _train_step(fn, q, k, v) -> tuple[float, int]:
    """Seconds per forward + backward, and the allocated MPS bytes right after it."""
    def step():
        out = fn(q, k, v)
        out.backward(torch.ones_like(out))
        return torch.mps.current_allocated_memory()

    step()
    torch.mps.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        peak = step()
    torch.mps.synchronize()
    return (time.perf_counter() - start) / 5, peak


def main() -> None:
    if not torch.backends.mps.is_available():
        print(format_report())
        print("\nApple GPU timings and memory need a Mac with MPS: run this script there. No timing is reported here.")
        return
    from flash_attn_metal import flash_attn_func

    print(f"{'N':>6} {'d':>4} {'causal':>6} {'ours ms':>9} {'SDPA ms':>9} {'speed-up':>8} {'ours MiB':>9} {'SDPA MiB':>9}")
    for d in HEAD_DIMS:
        for n in SEQLENS:
            for causal in (False, True):
                q, k, v = (torch.randn(1, n, 16, d, device="mps", dtype=torch.float16, requires_grad=True)
                           for _ in range(3))
                ours, ours_mem = _train_step(lambda a, b, c: flash_attn_func(a, b, c, causal=causal), q, k, v)
                sdpa, sdpa_mem = _train_step(
                    lambda a, b, c: torch.nn.functional.scaled_dot_product_attention(
                        a.transpose(1, 2), b.transpose(1, 2), c.transpose(1, 2), is_causal=causal), q, k, v)
                print(f"{n:>6} {d:>4} {causal!s:>6} {ours * 1e3:>9.2f} {sdpa * 1e3:>9.2f} {sdpa / ours:>7.2f}x "
                      f"{ours_mem / 2**20:>9.1f} {sdpa_mem / 2**20:>9.1f}")


if __name__ == "__main__":
    main()
