"""Large-N forward runs of the generated MSL kernels on an NVIDIA GPU through the CUDA emulator.

    python benchmarks/forward_large_cuda.py            # N = 8192 and 32768, d = 128 and 256, causal and not

Each run goes through `flash_attn_func` with FLASH_ATTN_METAL_BACKEND=emulator and STRICT=1 on CUDA tensors,
and is checked against the fp32 reference with the upstream tolerance rule (also on the GPU). Prints one line
per configuration and exits non-zero if any fails. These are emulator timings, not Apple GPU timings.
"""

from __future__ import annotations

import os
import sys
import time

import torch

os.environ["FLASH_ATTN_METAL_BACKEND"] = "emulator"
os.environ["FLASH_ATTN_METAL_STRICT"] = "1"

from flash_attn_metal import flash_attn_func, stats  # noqa: E402
from flash_attn_metal.problem import AttentionProblem  # noqa: E402
from flash_attn_metal.reference import attention  # noqa: E402

CONFIGS = [(n, d, causal) for n in (8192, 32768) for d in (128, 256) for causal in (False, True)]


def main() -> int:
    if not torch.cuda.is_available():
        print("needs an NVIDIA GPU with CuPy")
        return 2
    failures = 0
    for n, d, causal in CONFIGS:
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, n, 2, d, device="cuda", dtype=torch.float16) for _ in range(3))
        torch.cuda.synchronize()
        start = time.perf_counter()
        out, lse, _ = flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        problem = AttentionProblem(q=q, k=k, v=v, softmax_scale=d**-0.5, causal=causal, window_left=-1,
                                   window_right=0 if causal else -1, softcap=0.0, alibi_slopes=None, dropout_p=0.0)
        ref, ref_lse = attention(problem, upcast=True)
        low, _ = attention(problem, upcast=False)
        err = (out.float() - ref.float()).abs().max().item()
        bound = 2 * (low.float() - ref.float()).abs().max().item() + 1e-5
        lse_err = (lse - ref_lse).abs().max().item()
        ok = err <= bound and lse_err <= 1e-3
        failures += not ok
        print(f"N={n:6d} d={d} causal={causal!s:5}: {seconds:7.2f} s  max err {err:.2e} (bound {bound:.2e})  "
              f"lse err {lse_err:.2e}  {'PASS' if ok else 'FAIL'}", flush=True)
    print("kernels launched:", stats()["launches"])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
