"""Host overhead of one forward call with a backend whose kernels do nothing, against the same harness
calling torch's scaled_dot_product_attention on CPU. Tiny tensors (1 x 1 x 1 x 8) keep the attention
arithmetic itself negligible on both sides.

Target: at most 15 us per call more than SDPA's own Python overhead, for the repeated call of a model's
forward pass (its launch replayed by `fastpath`: key, lookup, output allocation, launch). The full path
(validation, routing, kernel lookup and argument packing), which a signature's first call and every call
fastpath does not serve take, is printed beside it, timed with a window given as a list.
"""

from __future__ import annotations

import os
import time

import torch

from flash_attn_metal import flash_attn_func
from flash_attn_metal.runtime import backend

CALLS = 20000
TARGET_US = 15.0


class NullKernels:
    """A compiled library whose every kernel accepts its arguments and does nothing."""

    def __getattr__(self, name: str):
        return lambda *args, threads=None, group_size=None: None


def per_call_us(fn) -> float:
    for _ in range(200):
        fn()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(CALLS // 5):
            fn()
        best = min(best, (time.perf_counter() - start) / (CALLS // 5))
    return best * 1e6


def main() -> None:
    os.environ["FLASH_ATTN_METAL_BACKEND"] = "emulator"
    os.environ["FLASH_ATTN_METAL_STRICT"] = "1"
    null = backend.Backend("emulator", lambda source: NullKernels())
    original = backend.get_backend
    backend.get_backend = lambda name: null  # type: ignore[assignment]
    import flash_attn_metal.kernels.dispatch as dispatch

    dispatch.get_backend = backend.get_backend
    try:
        q = torch.randn(1, 1, 1, 8)
        qt = q.transpose(1, 2)
        with torch.no_grad():
            ours = per_call_us(lambda: flash_attn_func(q, q, q))
            sdpa = per_call_us(lambda: torch.nn.functional.scaled_dot_product_attention(qt, qt, qt))
            full = per_call_us(lambda: flash_attn_func(q, q, q, window_size=[-1, -1]))  # a list: never replayed
    finally:
        backend.get_backend = original
        dispatch.get_backend = original
    extra = ours - sdpa
    print(f"flash_attn_func with null kernels, repeated call: {ours:7.1f} us per call")
    print(f"flash_attn_func with null kernels, full path:     {full:7.1f} us per call")
    print(f"scaled_dot_product_attention (CPU):               {sdpa:7.1f} us per call")
    print(f"overhead beyond SDPA: {extra:.1f} us (target <= {TARGET_US} us): {'MET' if extra <= TARGET_US else 'NOT MET'}")


if __name__ == "__main__":
    main()
