"""Static figures of every kernel configuration (`python -m flash_attn_metal kernels --report [--json]`) and the
representative set of generated kernels (`--dump DIR`), for review and for compiling with `xcrun metal`.

One record per (family, dtype, head dim, kernel) with the figures kernels/cost.py defines: threads, threadgroup
memory, estimated registers per thread, 64-bit integer operations in the hot loop (read off the generated MSL),
and the issue-slot model's MMA share. The forward records add its device-memory traffic per (batch, head), with
N = seqlen_q = seqlen_k and s bytes per element: Q is read once, K and V once per block of BLOCK_Q query rows, O
is written once and LSE in fp32, so
    bytes(N) = (2 d s + 4) N + (2 d s / BLOCK_Q) N^2,
beside FlashAttention's own traffic (Dao et al. 2022, Algorithm 1 and Theorem 2) with its row block
B_r = min(ceil(M / 4d), d) for M = 32 KiB of on-chip memory (Apple's threadgroup memory), at N = 4096.

Targets (the design's, checked by tests/test_kernels_tiles.py): registers <= 128, no 64-bit integer operation in
a hot loop, threadgroup memory <= 32 KiB, threads <= 1024, forward MMA share >= 0.75 at d = 64 and 128 and
>= 0.6 at d = 256, dq and dkdv MMA share >= 0.6. These are static figures, not timings.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from . import decode_report
from .backward import backward_source
from .backward import kernel_names as backward_kernel_names
from .cost import int64_ops_in_hot_loop, mlx_threadgroup_bytes_per_mma, registers, step_cost
from .forward import forward_source
from .spec import BackwardSpec, ForwardSpec
from .tiles import (
    DTYPE_BYTES,
    THREADGROUP_MEMORY_LIMIT,
    THREADS_LIMIT,
    TILE_TABLES,
    Tiles,
    threadgroup_bytes,
)

FAMILIES = ("apple7", "apple9")  # apple8 shares apple7's tables, apple10 apple9's
DTYPES = ("half", "bfloat", "float")
HEAD_DIMS = (32, 40, 64, 80, 96, 128, 160, 192, 224, 256)  # the dumped set
REPORT_HEAD_DIMS = tuple(range(8, 257, 8))  # every padded head dim: the report covers the whole tile table
KERNELS = ("forward", "dq", "dkdv")
FEATURES = (  # (varlen, masked, softcap, alibi, kv_cache, split_kv)
    (False, False, False, False, "", False),
    (False, True, False, False, "", False),
    (False, True, True, True, "", False),
    (True, True, False, False, "", False),
    (True, True, False, False, "", True),
    (False, True, False, False, "dense", False),
    (False, True, False, False, "dense", True),
    (False, False, False, False, "paged", True),
)
REPORT_N = 4096
TARGETS = {"registers_per_thread": 128, "int64_ops_per_key_block": 0, "threadgroup_bytes": THREADGROUP_MEMORY_LIMIT,
           "threads": THREADS_LIMIT}


def representative_specs(families: tuple[str, ...] = FAMILIES) -> list[ForwardSpec]:
    return [
        ForwardSpec.for_call(dtype, d, family, varlen=varlen, masked=masked, softcap=softcap, alibi=alibi,
                             kv_cache=kv_cache, split_kv=split_kv)
        for family in families for dtype in DTYPES for d in HEAD_DIMS
        for varlen, masked, softcap, alibi, kv_cache, split_kv in FEATURES
    ]


def common_specs(family: str) -> list[ForwardSpec]:
    """What `cache warm` precompiles: fp16 and bf16 at d = 64 and 128, with and without a mask, padded and
    varlen, and causal attention over dense and paged kv caches, split (decoding) and not (prefill): the
    shapes language models train and serve with most."""
    return [
        ForwardSpec.for_call(dtype, d, family, varlen=varlen, masked=masked, softcap=False, alibi=False)
        for dtype in ("half", "bfloat") for d in (64, 128) for masked in (False, True) for varlen in (False, True)
    ] + [
        ForwardSpec.for_call(dtype, d, family, varlen=False, masked=True, softcap=False, alibi=False, kv_cache=cache,
                             split_kv=split)
        for dtype in ("half", "bfloat") for d in (64, 128) for cache in ("dense", "paged") for split in (False, True)
    ]


def backward_spec(spec: ForwardSpec, family: str) -> BackwardSpec | None:
    """The backward of a spec, unless it is forward only (a kv cache: flash_attn_with_kvcache is inference only;
    a split)."""
    return None if spec.kv_cache or spec.split_kv else BackwardSpec.of(spec, family)


def kernel_sources(spec: ForwardSpec, family: str = "apple9") -> dict[str, str]:
    """File name -> MSL of a spec's kernels: the forward (with its combine kernel when split), and the backward
    unless the spec is forward only."""
    out = {f"{spec.name}.metal": forward_source(spec)}
    backward = backward_spec(spec, family)
    if backward is not None:
        out[f"{backward.name}.metal"] = backward_source(backward)
    return out


def sources() -> dict[str, str]:
    """File name -> MSL for the kernels of every representative spec, the decode kernels' too."""
    return {**{name: source for family in FAMILIES for spec in representative_specs((family,))
               for name, source in kernel_sources(spec, family).items()}, **decode_report.sources()}


def dump(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, source in sources().items():
        path = directory / name
        path.write_text(source)
        written.append(path)
    return written


def kernel_traffic(block_q: int, head_dim: int, elem_bytes: int) -> tuple[int, float]:
    """(a, b) with bytes(N) = a N + b N^2: a query block of `block_q` rows reads K and V once."""
    return 2 * head_dim * elem_bytes + 4, 2 * head_dim * elem_bytes / block_q


def flash_attention_rows(head_dim: int, elem_bytes: int) -> int:
    """FlashAttention's row block B_r = min(ceil(M / 4d), d) for M elements of 32 KiB on-chip memory."""
    m = THREADGROUP_MEMORY_LIMIT // elem_bytes
    return min(-(-m // (4 * head_dim)), head_dim)


@functools.lru_cache(maxsize=None)
def _int64_ops(family: str, dtype: str, head_dim: int) -> dict[str, int]:
    """Per kernel, the most 64-bit integer operations any feature set puts in its hot loop."""
    worst = dict.fromkeys(KERNELS, 0)
    for varlen, masked, softcap, alibi, kv_cache, split_kv in FEATURES:
        spec = ForwardSpec.for_call(dtype, head_dim, family, varlen=varlen, masked=masked, softcap=softcap,
                                    alibi=alibi, kv_cache=kv_cache, split_kv=split_kv)
        worst["forward"] = max(worst["forward"], int64_ops_in_hot_loop(forward_source(spec), spec.name))
        backward = backward_spec(spec, family)
        if backward is not None:
            source = backward_source(backward)
            dq, *dkdv = backward_kernel_names(backward)[1:]
            worst["dq"] = max(worst["dq"], int64_ops_in_hot_loop(source, dq))
            worst["dkdv"] = max(worst["dkdv"], *(int64_ops_in_hot_loop(source, name) for name in dkdv))
    return worst


def record(family: str, dtype: str, head_dim: int, kernel: str) -> dict:
    tiles: Tiles = TILE_TABLES[kernel](family, dtype, head_dim)
    parts = ("dk", "dv") if kernel == "dkdv" and tiles.split else (kernel,)
    costs = [step_cost(part, tiles, head_dim, dtype) for part in parts]
    out = {
        "family": family, "dtype": dtype, "head_dim": head_dim, "kernel": kernel,
        "threads": tiles.threads, "threadgroup_bytes": threadgroup_bytes(kernel, tiles, head_dim, dtype),
        "registers_per_thread": max(registers(part, tiles, head_dim) for part in parts),
        "int64_ops_per_key_block": _int64_ops(family, dtype, head_dim)[kernel],
        "mma_share": round(min(c.mma_share for c in costs), 3),
        "threadgroup_bytes_per_mma": round(max(c.threadgroup_bytes_per_mma for c in costs), 1),
        "block_q": tiles.block_q, "block_k": tiles.block_k, "stationary": tiles.stationary, "split": tiles.split,
        "tiles": tiles.reason,
    }
    if kernel == "forward":
        s = DTYPE_BYTES[dtype]
        linear, quadratic = kernel_traffic(tiles.block_q, head_dim, s)
        fa_rows = flash_attention_rows(head_dim, s)
        _, fa_quadratic = kernel_traffic(fa_rows, head_dim, s)
        out.update(bytes_per_n=linear, bytes_per_n2=quadratic, fa_block_rows=fa_rows, fa_bytes_per_n2=fa_quadratic,
                   bytes_at_n=linear * REPORT_N + quadratic * REPORT_N**2,
                   fa_bytes_at_n=linear * REPORT_N + fa_quadratic * REPORT_N**2)
    return out


def report_records() -> list[dict]:
    """The block kernels' records, then the decode kernels' (decode_report.py: their traffic per token against the
    I/O bound in place of an MMA share)."""
    return [record(family, dtype, d, kernel) for family in FAMILIES for dtype in DTYPES for d in REPORT_HEAD_DIMS
            for kernel in KERNELS] + decode_report.report_records()


def mma_share_target(kernel: str, head_dim: int) -> float | None:
    """The design's floor on the MMA share: forward 0.75 at d = 64 and 128 and 0.6 at d = 256 (the head dims the
    anchors were measured at), dq and dkdv 0.6 at every head dim."""
    if kernel != "forward":
        return 0.6
    return {64: 0.75, 128: 0.75, 256: 0.6}.get(head_dim)


def missed_targets(records: list[dict]) -> list[str]:
    """Every record's figure that misses its target, in words (empty when all hold)."""
    missed = []
    for r in records:
        where = f"{r['family']} {r['dtype']} d={r['head_dim']} {r['kernel']}"
        for key, limit in TARGETS.items():
            if r[key] > limit:
                missed.append(f"{where}: {key} {r[key]} > {limit}")
        target = mma_share_target(r["kernel"], r["head_dim"]) if "mma_share" in r else None
        if target is not None and r["mma_share"] < target:
            missed.append(f"{where}: mma_share {r['mma_share']} < {target}")
        for t in r.get("decode_traffic", ()):
            if t["bytes_per_token"] > decode_report.TARGET * t["io_bound_bytes_per_token"]:
                missed.append(f"{where}: {t['cache_rows']} cache rows move {t['bytes_per_token']} bytes per token > "
                              f"{decode_report.TARGET} x the bound {t['io_bound_bytes_per_token']}")
    return missed


def format_json() -> str:
    return json.dumps(report_records(), indent=1)


def format_report() -> str:
    header = (f"{'family':<7} {'dtype':<6} {'d':>4} {'kernel':<7} {'rows':>4} {'step':>4} {'thr':>4} "
              f"{'stationary':<11} {'tg bytes':>8} {'regs':>4} {'i64':>3} {'MMA share':>9} {'tg B/MMA':>8} "
              f"{'bytes(N) = a N + b N^2':>22} {'MB @N=' + str(REPORT_N):>10} {'FA MB':>7}")
    lines = [
        "Static figures per kernel (kernels/cost.py): rows a threadgroup owns and rows per step of its hot loop,",
        "threads, where the stationary operands live, threadgroup memory, estimated registers per thread, 64-bit",
        "integer operations in the hot loop, the issue-slot model's share of MMA cycles (metal-benchmarks",
        "throughputs), threadgroup bytes per MMA, and the forward's device traffic against FlashAttention's.",
        "No Apple GPU timing is implied.", "", header, "-" * len(header)]
    records = report_records()
    for r in records:
        if r["kernel"] == "decode":
            continue  # decode_report.format_report() below
        traffic = (f"{r['bytes_per_n']:>7} N + {r['bytes_per_n2']:>5.1f} N^2" if r["kernel"] == "forward" else "")
        mb = (f"{r['bytes_at_n'] / 1e6:>10.1f} {r['fa_bytes_at_n'] / 1e6:>7.1f}" if r["kernel"] == "forward" else "")
        stationary = r["stationary"] + (", split" if r["split"] else "")
        lines.append(f"{r['family']:<7} {r['dtype']:<6} {r['head_dim']:>4} {r['kernel']:<7} {r['block_q']:>4} "
                     f"{r['block_k']:>4} {r['threads']:>4} {stationary:<11} {r['threadgroup_bytes']:>8} "
                     f"{r['registers_per_thread']:>4} {r['int64_ops_per_key_block']:>3} {r['mma_share']:>9.3f} "
                     f"{r['threadgroup_bytes_per_mma']:>8.1f} {traffic:>22} {mb}")
    lines += ["", decode_report.format_report([r for r in records if r["kernel"] == "decode"]), ""]
    lines.append(f"threadgroup bytes per MMA of MLX's steel attention forward (fp16, d=64; measured at 83% of an M3 "
                 f"Max) through the same model: {mlx_threadgroup_bytes_per_mma():.1f}")
    missed = missed_targets(records)
    lines.append("targets: " + ("all met" if not missed else f"{len(missed)} missed: " + "; ".join(missed[:5])))
    lines.append(f"limits: {THREADGROUP_MEMORY_LIMIT} bytes of threadgroup memory and {THREADS_LIMIT} threads per "
                 "threadgroup; apple8 uses apple7's tables, apple10 apple9's")
    return "\n".join(lines)
