"""`python -m flash_attn_metal bench`: the kernels against PyTorch's scaled_dot_product_attention.

On a Mac: forward, backward and forward + backward over seqlens 512-16384, d = 64/128/256, causal and not,
fp16 and bf16 (or the sizes asked for), against SDPA's default and math paths on MPS, with ms, TFLOPS, % of the
chip's fp16 peak, the speed-up and the step's peak memory. Elsewhere the same harness runs the kernels in the
CPU emulator at small sizes (the CLI sets FLASH_ATTN_METAL_BACKEND=emulator), labelled as emulator timings: they
say nothing about Apple GPUs. One line per configuration as it finishes; the whole table on request. Results go
to a CSV, and to a PNG plot when matplotlib is installed (extra `bench`).
"""

from __future__ import annotations

import csv
import dataclasses
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

MODES = ("forward", "backward", "forward+backward")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class Sizes:
    """The configurations to time: every seqlen x head dim x dtype x causal, (batch, seqlen, heads, head dim)."""

    seqlens: tuple[int, ...]
    head_dims: tuple[int, ...]
    dtypes: tuple[str, ...]  # keys of DTYPES
    heads: int = 16
    batch: int = 1
    causal: tuple[bool, ...] = (False, True)

    def configurations(self) -> list[tuple[int, int, str, bool]]:
        return [(n, d, dt, c) for dt in self.dtypes for d in self.head_dims for n in self.seqlens for c in self.causal]


MAC_SIZES = Sizes((512, 1024, 2048, 4096, 8192, 16384), (64, 128, 256), ("fp16", "bf16"))
EMULATOR_SIZES = Sizes((128, 256), (64,), ("fp16",))


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
    forward = 4 * n * n * d * heads / (2 if causal else 1)  # per sequence
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


def run(device: str, sizes: Sizes, repeats: int, progress: Callable[[int, int, list[Row]], None]) -> list[Row]:
    """Time every configuration; `progress(done, total, rows)` after each with that configuration's rows."""
    from .runtime.device import fp16_peak_tflops

    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    peak = fp16_peak_tflops(torch.backends.mps.get_name()) if device == "mps" else None
    configs = sizes.configurations()
    rows: list[Row] = []
    for i, (n, d, dtype, causal) in enumerate(configs):
        shape = (sizes.batch, n, sizes.heads, d)
        q, k, v = (torch.randn(shape, device=device, dtype=DTYPES[dtype], requires_grad=True) for _ in range(3))
        done = len(rows)
        for mode in MODES:
            baseline = None
            for impl, fn in _implementations(causal).items():
                step = _step(fn, mode, q, k, v)
                seconds = _time(step, device, repeats)
                tflops = sizes.batch * _flops(mode, n, d, causal, sizes.heads) / seconds / 1e12
                if impl == "sdpa":
                    baseline = seconds
                rows.append(Row(device, impl, mode, str(DTYPES[dtype]).removeprefix("torch."), n, d, causal,
                                seconds * 1e3, tflops, 100 * tflops / peak if peak else None, None,
                                _peak_mib(step, device)))
            ours = next(r for r in rows[-3:] if r.impl == "flash-attn-metal")
            ours.speedup_vs_sdpa = baseline / (ours.ms / 1e3) if baseline else None
        progress(i + 1, len(configs), rows[done:])
    return rows


def summary(rows: list[Row]) -> str:
    """One configuration's rows in a line: our time per mode, with SDPA's and the speed-up."""
    first = rows[0]
    parts = []
    for mode in MODES:
        ours = next(r for r in rows if r.mode == mode and r.impl == "flash-attn-metal")
        sdpa = next(r for r in rows if r.mode == mode and r.impl == "sdpa")
        parts.append(f"{mode} {ours.ms:.2f} ms (SDPA {sdpa.ms:.2f} ms, {ours.speedup_vs_sdpa:.2f}x)")
    return (f"{first.dtype} N={first.seqlen} d={first.head_dim}{' causal' if first.causal else ''}: "
            + "; ".join(parts))


def table(rows: list[Row]) -> str:
    lines = [f"{'impl':<17} {'mode':<17} {'dtype':<8} {'N':>6} {'d':>4} {'causal':>6} {'ms':>9} {'TFLOPS':>7} "
             f"{'% peak':>7} {'vs SDPA':>8} {'peak MiB':>8}"]
    for r in rows:
        pct = f"{r.percent_of_peak:6.1f}%" if r.percent_of_peak is not None else "      -"
        speed = f"{r.speedup_vs_sdpa:7.2f}x" if r.speedup_vs_sdpa is not None else "       -"
        mem = f"{r.peak_mib:8.1f}" if r.peak_mib is not None else "       -"
        lines.append(f"{r.impl:<17} {r.mode:<17} {r.dtype:<8} {r.seqlen:>6} {r.head_dim:>4} {r.causal!s:>6} "
                     f"{r.ms:>9.2f} {r.tflops:>7.3f} {pct} {speed} {mem}")
    return "\n".join(lines)


PLOT_HINT = "no plot: matplotlib is not installed (pip install 'flash-attn-metal[bench]')"


def write(rows: list[Row], out_dir: Path) -> list[Path]:
    """bench.csv, and bench.png when matplotlib is installed (else PLOT_HINT says why not)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "bench.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    written = [csv_path]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    first = rows[0]  # the plot: forward TFLOPS over seqlen at the first dtype, head dim and causal setting
    fig, ax = plt.subplots(figsize=(8, 5))
    for impl in dict.fromkeys(r.impl for r in rows):
        pts = [(r.seqlen, r.tflops) for r in rows if r.impl == impl and r.mode == "forward" and
               (r.dtype, r.head_dim, r.causal) == (first.dtype, first.head_dim, first.causal)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length")
    ax.set_ylabel(f"forward TFLOPS ({first.dtype}, d={first.head_dim}{', causal' if first.causal else ''})")
    ax.set_title(f"flash-attn-metal vs SDPA on {rows[0].device}" + (" (emulator)" if rows[0].device == "cpu" else ""))
    ax.legend()
    plot = out_dir / "bench.png"
    fig.savefig(plot, dpi=120)
    written.append(plot)
    return written


def main(out_dir: Path, repeats: int, sizes: dict | None = None, show_table: bool = False,
         kernel_report: bool = False) -> int:
    """`sizes`: Sizes fields replacing this device's defaults. Run by the CLI, which sets
    FLASH_ATTN_METAL_BACKEND=emulator where there is no Metal GPU."""
    if kernel_report:
        from .kernels.report import format_report

        print(format_report())
    if torch.backends.mps.is_available():
        device, defaults = "mps", MAC_SIZES
        print(f"benchmarking on {torch.backends.mps.get_name()}")
    else:
        device, defaults = "cpu", EMULATOR_SIZES
        print("No Metal GPU: timing the kernels in the CPU emulator. These are EMULATOR timings; they say nothing "
              "about Apple GPU speed.")
    sizes = dataclasses.replace(defaults, **(sizes or {}))
    total = len(sizes.configurations())
    print(f"{total} configurations (batch {sizes.batch}, {sizes.heads} heads), each: forward, backward and "
          f"forward+backward of flash-attn-metal, SDPA and SDPA's math path, {repeats} timed runs")

    def progress(done: int, total: int, rows: list[Row]) -> None:
        print(f"[{done}/{total}] {summary(rows)}", flush=True)

    rows = run(device, sizes, repeats, progress)
    if show_table:
        print(table(rows))
    written = write(rows, out_dir)
    for path in written:
        print(f"wrote {path}")
    if not any(p.suffix == ".png" for p in written):
        print(PLOT_HINT)
    return 0
