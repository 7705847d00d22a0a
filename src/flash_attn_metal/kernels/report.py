"""Static figures of every kernel configuration (`python -m flash_attn_metal kernels --report`) and the
representative set of generated forward and backward kernels (`--dump DIR`), for review and for compiling with `xcrun metal`.

Device-memory traffic per (batch, head), with s bytes per element: the forward reads Q once, K and V once
per query block, and writes O once and LSE:  bytes(N) = 2 N d s + 2 (N / BLOCK_Q) N d s + 4 N.
FlashAttention's I/O analysis (Dao et al. 2022) gives Theta(N^2 d^2 s / M) accesses for on-chip memory of M
bytes; the table shows both at N = 4096 with M = 32 KiB of threadgroup memory.
"""

from __future__ import annotations

from pathlib import Path

from .backward import backward_source
from .forward import forward_source
from .spec import ForwardSpec
from .tiles import (
    DTYPE_BYTES,
    THREADGROUP_MEMORY_LIMIT,
    backward_threadgroup_bytes,
    forward_threadgroup_bytes,
    forward_tiles,
)

FAMILIES = ("apple7", "apple9")  # apple8 shares apple7's tiles, apple10 apple9's
DTYPES = ("half", "bfloat", "float")
HEAD_DIMS = (32, 40, 64, 80, 96, 128, 160, 192, 224, 256)
FEATURES = (  # (varlen, masked, softcap, alibi)
    (False, False, False, False),
    (False, True, False, False),
    (False, True, True, True),
    (True, True, False, False),
)
REPORT_N = 4096


def representative_specs() -> list[ForwardSpec]:
    return [
        ForwardSpec.for_call(dtype, d, family, varlen=varlen, masked=masked, softcap=softcap, alibi=alibi)
        for family in FAMILIES for dtype in DTYPES for d in HEAD_DIMS
        for varlen, masked, softcap, alibi in FEATURES
    ]


def sources() -> dict[str, str]:
    """File name -> MSL for the forward and backward kernels of every representative spec."""
    out = {}
    for spec in dict.fromkeys(representative_specs()):
        out[f"{spec.name}.metal"] = forward_source(spec)
        out[f"{spec.name.replace('forward', 'backward')}.metal"] = backward_source(spec)
    return out


def dump(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, source in sources().items():
        path = directory / name
        path.write_text(source)
        written.append(path)
    return written


def report_rows() -> list[dict]:
    rows = []
    for family in FAMILIES:
        for dtype in DTYPES:
            for d in HEAD_DIMS:
                tiles = forward_tiles(family, d)
                s = DTYPE_BYTES[dtype]
                n = REPORT_N
                moved = 2 * n * d * s + 2 * (n // tiles.block_q) * n * d * s + 4 * n
                bound = n * n * d * d * s / THREADGROUP_MEMORY_LIMIT
                rows.append({
                    "family": family, "dtype": dtype, "head_dim": d, "block_q": tiles.block_q,
                    "block_k": tiles.block_k, "threads": tiles.threads,
                    "threadgroup_bytes": forward_threadgroup_bytes(tiles, d, dtype),
                    "backward_threadgroup_bytes": backward_threadgroup_bytes(tiles, d, dtype),
                    # Q and O fragments across the head dim plus S fragments across a key block, 2 floats each
                    "fragments_per_thread": 2 * (d // 8) + tiles.block_k // 8,
                    "bytes_at_n": moved, "io_bound_at_n": bound,
                })
    return rows


def format_report() -> str:
    header = (f"{'family':<7} {'dtype':<6} {'d':>4} {'BQ':>3} {'BK':>3} {'threads':>7} {'tg bytes':>8} "
              f"{'bwd tg':>6} {'frags/thr':>9} {'MB moved @N=' + str(REPORT_N):>16} {'FA bound MB':>11}")
    lines = [header, "-" * len(header)]
    for r in report_rows():
        lines.append(f"{r['family']:<7} {r['dtype']:<6} {r['head_dim']:>4} {r['block_q']:>3} {r['block_k']:>3} "
                     f"{r['threads']:>7} {r['threadgroup_bytes']:>8} {r['backward_threadgroup_bytes']:>6} "
                     f"{r['fragments_per_thread']:>9} "
                     f"{r['bytes_at_n'] / 1e6:>16.1f} {r['io_bound_at_n'] / 1e6:>11.1f}")
    lines.append(f"limits: {THREADGROUP_MEMORY_LIMIT} bytes of threadgroup memory and 1024 threads per threadgroup")
    return "\n".join(lines)
