"""Static figures of every kernel configuration (`python -m flash_attn_metal kernels --report`) and the
representative set of generated forward and backward kernels (`--dump DIR`), for review and for compiling with
`xcrun metal`.

Device-memory traffic of the forward per (batch, head), with N = seqlen_q = seqlen_k and s bytes per element:
Q is read once, K and V once per block of BLOCK_Q query rows, O is written once and LSE in fp32, so
    bytes(N) = (2 d s + 4) N + (2 d s / BLOCK_Q) N^2.
FlashAttention's I/O analysis (Dao et al. 2022, Algorithm 1 and Theorem 2) moves the same terms with its own
row block B_r = min(ceil(M / 4d), d) for an on-chip memory of M elements; the table puts both side by side
with M = 32 KiB (Apple's threadgroup memory) and evaluates them at N = 4096.
"""

from __future__ import annotations

from pathlib import Path

from .backward import backward_source
from .forward import forward_source
from .spec import ForwardSpec
from .tiles import (
    DTYPE_BYTES,
    THREADGROUP_MEMORY_LIMIT,
    THREADS_LIMIT,
    backward_threadgroup_bytes,
    forward_threadgroup_bytes,
    forward_tiles,
    packed_heads,
)

FAMILIES = ("apple7", "apple9")  # apple8 shares apple7's tiles, apple10 apple9's
DTYPES = ("half", "bfloat", "float")
HEAD_DIMS = (32, 40, 64, 80, 96, 128, 160, 192, 224, 256)  # the dumped set
REPORT_HEAD_DIMS = tuple(range(8, 257, 8))  # every padded head dim: the report covers the whole tile table
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
DECODE_SHAPE = (32, 8, 128)  # (query heads, K/V heads, head dim) of the decode figure: a Llama-3-8B layer


def representative_specs() -> list[ForwardSpec]:
    return [
        ForwardSpec.for_call(dtype, d, family, varlen=varlen, masked=masked, softcap=softcap, alibi=alibi,
                             kv_cache=kv_cache, split_kv=split_kv)
        for family in FAMILIES for dtype in DTYPES for d in HEAD_DIMS
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


def kernel_sources(spec: ForwardSpec) -> dict[str, str]:
    """File name -> MSL of a spec's kernels: the forward (with its combine kernel when split), and the backward
    unless the spec is forward only (a kv cache: flash_attn_with_kvcache is inference only; a split)."""
    out = {f"{spec.name}.metal": forward_source(spec)}
    if not spec.kv_cache and not spec.split_kv:
        out[f"{spec.name.replace('forward', 'backward')}.metal"] = backward_source(spec)
    return out


def sources() -> dict[str, str]:
    """File name -> MSL for the kernels of every representative spec."""
    return {name: source for spec in dict.fromkeys(representative_specs())
            for name, source in kernel_sources(spec).items()}


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


def report_rows() -> list[dict]:
    rows = []
    for family in FAMILIES:
        for dtype in DTYPES:
            for d in REPORT_HEAD_DIMS:
                tiles = forward_tiles(family, d)
                s = DTYPE_BYTES[dtype]
                linear, quadratic = kernel_traffic(tiles.block_q, d, s)
                fa_rows = flash_attention_rows(d, s)
                _, fa_quadratic = kernel_traffic(fa_rows, d, s)
                rows.append({
                    "family": family, "dtype": dtype, "head_dim": d, "block_q": tiles.block_q,
                    "block_k": tiles.block_k, "threads": tiles.threads,
                    "threadgroup_bytes": forward_threadgroup_bytes(tiles, d, dtype),
                    "backward_threadgroup_bytes": backward_threadgroup_bytes(tiles, d, dtype),
                    # Q and O fragments across the head dim plus S fragments across a key block, 2 floats each
                    "fragments_per_thread": 2 * (d // 8) + tiles.block_k // 8,
                    "bytes_per_n": linear, "bytes_per_n2": quadratic, "fa_block_rows": fa_rows,
                    "fa_bytes_per_n2": fa_quadratic,
                    "bytes_at_n": linear * REPORT_N + quadratic * REPORT_N**2,
                    "fa_bytes_at_n": linear * REPORT_N + fa_quadratic * REPORT_N**2,
                })
    return rows


def decode_traffic(cached_rows: int, nheads: int, nheads_k: int, head_dim: int, elem_bytes: int,
                   block_q: int) -> tuple[int, int]:
    """(kernel, bound): device bytes one decode step (one query row) of one sequence reads from a kv cache of
    `cached_rows` rows. Every forward threadgroup reads its K/V head's rows once, in place; GQA packing puts a
    group's query heads in one threadgroup. The bound reads each K/V row once."""
    per_head = 2 * cached_rows * head_dim * elem_bytes
    packed = packed_heads(1, nheads, nheads_k, block_q)
    threadgroups = nheads // packed * -(-packed // block_q)
    return per_head * threadgroups, per_head * nheads_k


def format_report() -> str:
    header = (f"{'family':<7} {'dtype':<6} {'d':>4} {'BQ':>3} {'BK':>3} {'threads':>7} {'tg bytes':>8} "
              f"{'bwd tg':>6} {'frags/thr':>9} {'bytes(N) = a N + b N^2':>22} {'FA B_r':>6} {'FA b':>6} "
              f"{'MB @N=' + str(REPORT_N):>10} {'FA MB':>7}")
    lines = [header, "-" * len(header)]
    for r in report_rows():
        traffic = f"{r['bytes_per_n']:>7} N + {r['bytes_per_n2']:>5.1f} N^2"
        lines.append(f"{r['family']:<7} {r['dtype']:<6} {r['head_dim']:>4} {r['block_q']:>3} {r['block_k']:>3} "
                     f"{r['threads']:>7} {r['threadgroup_bytes']:>8} {r['backward_threadgroup_bytes']:>6} "
                     f"{r['fragments_per_thread']:>9} {traffic:>22} {r['fa_block_rows']:>6} "
                     f"{r['fa_bytes_per_n2']:>6.1f} {r['bytes_at_n'] / 1e6:>10.1f} {r['fa_bytes_at_n'] / 1e6:>7.1f}")
    h, hk, d = DECODE_SHAPE
    for family in FAMILIES:
        kernel, bound = decode_traffic(REPORT_N, h, hk, d, DTYPE_BYTES["half"], forward_tiles(family, d).block_q)
        lines.append(f"{family}: kv-cache decode, one step of one sequence over {REPORT_N} cached rows (h={h}, "
                     f"hk={hk}, d={d}, half), read in place with GQA packing: {kernel / 1e6:.1f} MB (bound "
                     f"{bound / 1e6:.1f} MB)")
    lines.append(f"limits: {THREADGROUP_MEMORY_LIMIT} bytes of threadgroup memory and {THREADS_LIMIT} threads per "
                 "threadgroup; apple8 uses apple7's tiles, apple10 apple9's")
    return "\n".join(lines)
