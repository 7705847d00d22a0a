"""Peak memory of a training step (forward + backward) through flash_attn_metal.scaled_dot_product_attention
against torch's own SDPA, N = 1k to 16k, batch 1, 16 heads, d = 64, fp16, causal.

On a Mac (MPS): measured. Each step's peak is the driver's allocation growth from an emptied cache
(flash_attn_metal.bench); torch's SDPA takes its composite math path on MPS whenever a gradient is needed.

Elsewhere: static bytes that each keeps for the backward beyond q, k, v and out, from the formulas
    ours:  the lse, fp32 per (row, head)                                  4 N H
    torch: fp32 copies of q, k and v (its math path upcasts fp16/bf16)    3 * 4 N H d
           and the fp32 attention probabilities, N x N per head           + 4 N^2 H
checked first by counting what autograd saves (saved-tensor hooks) at a small N on the CPU: torch's math path and
our kernels in the emulator. These are lower bounds of the peak (the backward adds transients: torch's gradient of
the N x N matrix, our row sums D). No Apple GPU figure is reported off a Mac.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flash_attn_metal
from flash_attn_metal.bench import _peak_mib

SEQLENS = (1024, 2048, 4096, 8192, 16384)
HEADS, HEAD_DIM, DTYPE = 16, 64, torch.float16
CHECK_N = 128  # the small N at which the formulas are checked on the CPU
MIB = 2**20


def ours_kept(n: int) -> int:
    return 4 * n * HEADS


def torch_kept(n: int) -> int:
    return 3 * 4 * n * HEADS * HEAD_DIM + 4 * n * n * HEADS


def _kept_for_backward(sdpa, device: str, n: int) -> int:
    """Bytes autograd saves for the backward of one SDPA call beyond q, k, v and out (distinct storages)."""
    q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, device=device, dtype=DTYPE, requires_grad=True) for _ in range(3))
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = sdpa(q, k, v, is_causal=True)
    for t in (q, k, v, out):
        saved.pop(t.untyped_storage().data_ptr(), None)
    return sum(saved.values())


def check_formulas() -> None:
    """The static formulas against what autograd saves at N = CHECK_N on the CPU."""
    with sdpa_kernel(SDPBackend.MATH):
        counted_torch = _kept_for_backward(F.scaled_dot_product_attention, "cpu", CHECK_N)
    os.environ["FLASH_ATTN_METAL_BACKEND"] = "emulator"
    counted_ours = _kept_for_backward(flash_attn_metal.scaled_dot_product_attention, "cpu", CHECK_N)
    print(f"Checked at N = {CHECK_N} on the CPU (autograd's saved tensors): torch {counted_torch} B "
          f"(formula {torch_kept(CHECK_N)}), ours {counted_ours} B (formula {ours_kept(CHECK_N)}).")
    assert (counted_torch, counted_ours) == (torch_kept(CHECK_N), ours_kept(CHECK_N)), "a formula is off"


def static_table() -> None:
    check_formulas()
    print(f"\nBytes kept for the backward beyond q, k, v and out (batch 1, {HEADS} heads, d = {HEAD_DIM}, fp16):")
    print(f"{'N':>6} {'ours MiB':>10} {'torch MiB':>10} {'torch / ours':>12}")
    for n in SEQLENS:
        print(f"{n:>6} {ours_kept(n) / MIB:>10.2f} {torch_kept(n) / MIB:>10.1f} {torch_kept(n) / ours_kept(n):>11.0f}x")
    print("\nMeasured peak memory of a training step needs a Mac with MPS: run this script there.")


def measured_table() -> None:
    print(f"Peak MiB of one forward + backward on MPS (batch 1, {HEADS} heads, d = {HEAD_DIM}, fp16, causal):")
    print(f"{'N':>6} {'ours':>10} {'torch SDPA':>11}")
    for n in SEQLENS:
        q, k, v = (torch.randn(1, n, HEADS, HEAD_DIM, device="mps", dtype=DTYPE).transpose(1, 2).requires_grad_()
                   for _ in range(3))
        row = []
        for sdpa in (flash_attn_metal.scaled_dot_product_attention, F.scaled_dot_product_attention):
            def step():
                sdpa(q, k, v, is_causal=True).sum().backward()

            try:
                row.append(f"{_peak_mib(step, 'mps'):>10.1f}")
            except RuntimeError as error:  # torch's N x N matrices outgrow the GPU first
                row.append(f"{'OOM':>10}" if "out of memory" in str(error).lower() else f"{'error':>10}")
            q.grad = k.grad = v.grad = None
        print(f"{n:>6} {row[0]} {row[1]:>11}")


if __name__ == "__main__":
    measured_table() if torch.backends.mps.is_available() else static_table()
