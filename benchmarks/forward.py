"""Forward attention speed: the generated Metal kernels against torch's scaled_dot_product_attention on MPS.

On a Mac (MPS available): times N = 512 ... 16384, d = 64/128/256, causal and not, fp16, and prints ms,
TFLOPS, % of the chip's fp16 peak and the speed-up over SDPA. Elsewhere: prints the static report of every
kernel configuration (`python -m flash_attn_metal kernels --report`) and says that Apple GPU timings need a Mac.
"""

from __future__ import annotations

import torch

from flash_attn_metal.bench import _time
from flash_attn_metal.kernels.report import format_report
from flash_attn_metal.runtime.device import fp16_peak_tflops

SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
HEAD_DIMS = (64, 128, 256)
REPEATS = 10  # timed runs per measurement, after a warm-up one


def main() -> None:
    if not torch.backends.mps.is_available():
        print(format_report())
        print("\nApple GPU timings need a Mac with MPS: run this script there. No timing is reported here.")
        return
    from flash_attn_metal import flash_attn_func

    name = torch.backends.mps.get_name()
    peak = fp16_peak_tflops(name)
    print(f"{name}: fp16 peak {peak or '?'} TFLOPS")
    print(f"{'N':>6} {'d':>4} {'causal':>6} {'ours ms':>9} {'TFLOPS':>7} {'% peak':>7} {'SDPA ms':>9} {'speed-up':>8}")
    for d in HEAD_DIMS:
        for n in SEQLENS:
            for causal in (False, True):
                q, k, v = (torch.randn(1, n, 16, d, device="mps", dtype=torch.float16) for _ in range(3))
                ours = _time(lambda: flash_attn_func(q, k, v, causal=causal), "mps", REPEATS)
                qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
                sdpa = _time(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal),
                             "mps", REPEATS)
                flops = 4 * n * n * d * 16 / (2 if causal else 1)
                tflops = flops / ours / 1e12
                pct = f"{100 * tflops / peak:6.1f}%" if peak else "     ?"
                print(f"{n:>6} {d:>4} {causal!s:>6} {ours * 1e3:>9.2f} {tflops:>7.2f} {pct:>7} {sdpa * 1e3:>9.2f} "
                      f"{sdpa / ours:>7.2f}x")


if __name__ == "__main__":
    main()
