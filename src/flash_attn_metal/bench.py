"""`python -m flash_attn_metal bench`: the kernels against PyTorch's scaled_dot_product_attention.

On a Mac: forward, backward and forward + backward over seqlens 512-16384, d = 64/128/256, causal and not,
fp16 and bf16, against SDPA's default and math paths on MPS, with ms, TFLOPS, % of the chip's fp16 peak, the
speed-up and the step's peak memory. Elsewhere the same harness runs the kernels in the CPU
emulator at small sizes, labelled as emulator timings (they say nothing about Apple GPUs), and prints the
static kernel report. Results go to a CSV, and to a PNG plot when matplotlib is installed (extra `bench`).
"""

from __future__ import annotations

import csv
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from . import settings

MAC_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
MAC_HEAD_DIMS = (64, 128, 256)
EMULATOR_SEQLENS = (128, 256)
EMULATOR_HEAD_DIMS = (64,)
HEADS = 16
MODES = ("forward", "backward", "forward+backward")


@dataclass
class Row:
    device: str
    impl: str
    mode: str
    dtype: str
    seqlen: int
    head_dim: int
    causal: bool
    ms: float
    tflops: float
    percent_of_peak: float | None
    speedup_vs_sdpa: float | None
    peak_mib: float | None


def _flops(mode: str, n: int, d: int, causal: bool, heads: int) -> float:
    forward = 4 * n * n * d * heads / (2 if causal else 1)
    return {"forward": forward, "backward": 2.5 * forward, "forward+backward": 3.5 * forward}[mode]


def _sync(device: str) -> None:
    if device == "mps":
        torch.mps.synchronize()


def _peak_mib(step: Callable[[], object], device: str) -> float | None:
    """The memory one step adds at its peak on MPS (torch.mps has no peak counter). The caching allocator keeps
    the blocks a step frees, so after emptying the cache the driver's allocation grows by the step's high-water
    mark, rounded up to the allocator's heap sizes."""
    if device != "mps":
        return None
    torch.mps.synchronize()
    torch.mps.empty_cache()
    before = torch.mps.driver_allocated_memory()
    step()
    torch.mps.synchronize()
    return (torch.mps.driver_allocated_memory() - before) / 2**20


def _time(step: Callable[[], object], device: str, repeats: int) -> float:
    step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def _implementations(causal: bool) -> dict[str, Callable]:
    from . import flash_attn_func
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=causal).transpose(1, 2)

    def sdpa_math(q, k, v):
        with sdpa_kernel(SDPBackend.MATH):
            return sdpa(q, k, v)

    return {"flash-attn-metal": lambda q, k, v: flash_attn_func(q, k, v, causal=causal), "sdpa": sdpa,
            "sdpa-math": sdpa_math}


def _step(fn: Callable, mode: str, q, k, v) -> Callable[[], object]:
    if mode == "forward":
        return lambda: fn(q, k, v)
    out = fn(q, k, v)
    grad = torch.ones_like(out)
    if mode == "backward":
        return lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)
    return lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), grad)


def run(device: str, seqlens, head_dims, dtypes, repeats: int, progress: Callable[[int, int], None]) -> list[Row]:
    from .runtime.device import fp16_peak_tflops

    peak = fp16_peak_tflops(torch.backends.mps.get_name()) if device == "mps" else None
    configs = [(n, d, dt, c) for dt in dtypes for d in head_dims for n in seqlens for c in (False, True)]
    rows: list[Row] = []
    for i, (n, d, dtype, causal) in enumerate(configs):
        q, k, v = (torch.randn(1, n, HEADS, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        for mode in MODES:
            baseline = None
            for impl, fn in _implementations(causal).items():
                step = _step(fn, mode, q, k, v)
                seconds = _time(step, device, repeats)
                tflops = _flops(mode, n, d, causal, HEADS) / seconds / 1e12
                if impl == "sdpa":
                    baseline = seconds
                rows.append(Row(device, impl, mode, str(dtype).removeprefix("torch."), n, d, causal, seconds * 1e3,
                                tflops, 100 * tflops / peak if peak else None, None, _peak_mib(step, device)))
            ours = next(r for r in rows[-3:] if r.impl == "flash-attn-metal")
            ours.speedup_vs_sdpa = baseline / (ours.ms / 1e3) if baseline else None
        progress(i + 1, len(configs))
    return rows


def write(rows: list[Row], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / "bench.csv"
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    written = [table]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    fig, ax = plt.subplots(figsize=(8, 5))
    for impl in dict.fromkeys(r.impl for r in rows):
        pts = [(r.seqlen, r.tflops) for r in rows if r.impl == impl and r.mode == "forward" and not r.causal]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("forward TFLOPS (non-causal)")
    ax.set_title(f"flash-attn-metal vs SDPA on {rows[0].device}" + (" (emulator)" if rows[0].device == "cpu" else ""))
    ax.legend()
    plot = out_dir / "bench.png"
    fig.savefig(plot, dpi=120)
    written.append(plot)
    return written


def main(out_dir: Path, repeats: int) -> int:
    if torch.backends.mps.is_available():
        device, seqlens, head_dims, dtypes = "mps", MAC_SEQLENS, MAC_HEAD_DIMS, (torch.float16, torch.bfloat16)
        print(f"benchmarking on {torch.backends.mps.get_name()}")
    else:
        from .kernels.report import format_report

        print(format_report())
        print("\nNo Metal GPU: timing the kernels in the CPU emulator at small sizes. These are EMULATOR timings; "
              "they say nothing about Apple GPU speed.")
        os.environ[settings.BACKEND] = "emulator"
        device, seqlens, head_dims, dtypes = "cpu", EMULATOR_SEQLENS, EMULATOR_HEAD_DIMS, (torch.float16,)

    def progress(done: int, total: int) -> None:
        print(f"\r[{'#' * (30 * done // total):<30}] {done}/{total} configurations", end="", flush=True)

    rows = run(device, seqlens, head_dims, dtypes, repeats, progress)
    print()
    print(f"{'impl':<17} {'mode':<17} {'dtype':<8} {'N':>6} {'d':>4} {'causal':>6} {'ms':>9} {'TFLOPS':>7} "
          f"{'% peak':>7} {'vs SDPA':>8} {'peak MiB':>8}")
    for r in rows:
        pct = f"{r.percent_of_peak:6.1f}%" if r.percent_of_peak is not None else "      -"
        speed = f"{r.speedup_vs_sdpa:7.2f}x" if r.speedup_vs_sdpa is not None else "       -"
        mem = f"{r.peak_mib:8.1f}" if r.peak_mib is not None else "       -"
        print(f"{r.impl:<17} {r.mode:<17} {r.dtype:<8} {r.seqlen:>6} {r.head_dim:>4} {r.causal!s:>6} {r.ms:>9.2f} "
              f"{r.tflops:>7.3f} {pct} {speed} {mem}")
    for path in write(rows, out_dir):
        print(f"wrote {path}")
    return 0
