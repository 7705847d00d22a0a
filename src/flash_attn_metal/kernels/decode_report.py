"""Static figures of the decode kernels for `python -m flash_attn_metal kernels --report` (and `--json`), and their
representative set for `--dump`.

Traffic is counted for one decode step (one new token: one query row) of one sequence through a Llama-3-8B-shaped
cache (LLAMA_3_8B: every layer's attention), with the launch geometry `decode.plan` would choose on each chip:

    bytes  = K and V rows read by every row block + q read + out and LSE written
             + split partials (fp32 O and LSE, written by the splits and read back by the combine)
    bound  = each K and V element read once per K/V head + q read + out and LSE written

and the bandwidth-limited time per token is bytes / the chip's bandwidth (runtime/device.py's CHIPS). These are
static figures from the launch geometry, not timings.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..runtime.device import CHIPS, ChipFigures, family_from_name
from . import decode, decode_kernel
from .decode import Geometry
from .decode_kernel import DecodeSpec
from .tiles import DTYPE_BYTES

FAMILIES = ("apple7", "apple9")  # apple8 chips run apple7's figures here, apple10 apple9's (the kernels are the same)
DTYPES = ("half", "bfloat", "float")
HEAD_DIMS = (64, 128, 256)
CACHE_ROWS = (4096, 32768, 131072)
TARGET = 1.05  # bytes per token at most this times the bound for caches of 1,024 rows or more (CACHE_ROWS are)
DUMP_HEAD_DIMS = (40, 64, 96, 128, 256)
DUMP_FEATURES = (  # (varlen, masked, softcap, alibi, kv_cache)
    (False, False, False, False, ""),
    (True, True, False, False, ""),
    (False, True, False, False, "dense"),
    (False, True, False, False, "paged"),
    (False, True, True, True, "dense"),
)


@dataclass(frozen=True)
class Model:
    name: str
    layers: int
    nheads: int
    nheads_k: int


LLAMA_3_8B = Model("Llama-3-8B", 32, 32, 8)


def report_spec(dtype: str, head_dim: int) -> DecodeSpec:
    """The kernel a causal decode step over a dense kv cache runs (aligned tensors: the widest loads)."""
    return DecodeSpec.for_call(dtype, head_dim, masked=True, kv_cache="dense")


def family_chips(family: str) -> dict[str, ChipFigures]:
    """The chips of CHIPS whose kernels are `family`'s: apple7 also stands for apple8, apple9 for apple10."""
    runs = {"apple7": ("apple7", "apple8"), "apple9": ("apple9", "apple10")}[family]
    return {chip: figures for chip, figures in CHIPS.items() if family_from_name(f"Apple {chip}") in runs}


def step_traffic(spec: DecodeSpec, geo: Geometry, cache_rows: int, nheads: int, nheads_k: int,
                 head_dim: int) -> tuple[int, int]:
    """(bytes, bound) of one query row of one sequence over `cache_rows` rows in one layer."""
    s = DTYPE_BYTES[spec.dtype]
    kv_once = 2 * nheads_k * cache_rows * head_dim * s
    q_and_out = 2 * nheads * head_dim * s + 4 * nheads  # q read, out written, fp32 LSE written
    partials = 0 if geo.splits == 1 else 2 * geo.splits * nheads * 4 * (spec.head_dim + 1)
    return geo.row_blocks * kv_once + q_and_out + partials, kv_once + q_and_out


def token_traffic(spec: DecodeSpec, cache_rows: int, head_dim: int, cores: int, model: Model = LLAMA_3_8B
                  ) -> tuple[int, int, Geometry]:
    """(bytes, bound, geometry) of one token of one sequence through every layer of `model`, on `cores` GPU cores."""
    geo = decode.geometry(spec, 1, 1, model.nheads, model.nheads_k, cache_rows, cores)
    moved, bound = step_traffic(spec, geo, cache_rows, model.nheads, model.nheads_k, head_dim)
    return model.layers * moved, model.layers * bound, geo


def int64_ops_per_key_block(spec: DecodeSpec) -> int:
    """64-bit integer types in the key loop's MSL, whose body each SIMD group runs once per key: a proxy for
    64-bit integer operations there (the target is none)."""
    return len(decode_kernel.INT64_TYPES.findall(decode_kernel.key_loop(spec)))


def report_records() -> list[dict]:
    """One record per family, dtype and head dim (`--json`)."""
    records = []
    for family in FAMILIES:
        chips = family_chips(family)
        for dtype in DTYPES:
            for d in HEAD_DIMS:
                spec = report_spec(dtype, d)
                traffic = []
                for rows in CACHE_ROWS:
                    per_chip = {chip: token_traffic(spec, rows, d, figures.max_gpu_cores) for chip, figures in chips.items()}
                    traffic.append({
                        "cache_rows": rows,
                        "bytes_per_token": max(moved for moved, _, _ in per_chip.values()),  # the most splits
                        "io_bound_bytes_per_token": next(iter(per_chip.values()))[1],
                        "bandwidth_limited_ms_per_token": {
                            chip: round(moved / (chips[chip].bandwidth_gbs * 1e9) * 1e3, 4)
                            for chip, (moved, _, _) in per_chip.items()},
                    })
                records.append({
                    "kernel": "decode", "family": family, "dtype": dtype, "head_dim": d,
                    "model": f"{LLAMA_3_8B.name}: {LLAMA_3_8B.layers} layers, {LLAMA_3_8B.nheads} query heads, "
                             f"{LLAMA_3_8B.nheads_k} K/V heads; one token of one sequence, dense cache, causal",
                    "vec": spec.vec, "rows_per_simdgroup": spec.rows, "threads": decode_kernel.THREADS,
                    "threadgroup_bytes": spec.threadgroup_bytes,
                    "registers_per_thread": decode_kernel.registers_per_thread(spec),
                    "int64_ops_per_key_block": int64_ops_per_key_block(spec),
                    "decode_traffic": traffic,
                })
    return records


def format_report(records: list[dict] | None = None) -> str:
    """The plain table's lines for the decode kernels (of `records`, default report_records())."""
    sizes = "".join(f"{f'{rows // 1024}k rows: MB (x bound)':>24}" for rows in CACHE_ROWS)
    header = (f"{'family':<7} {'dtype':<6} {'d':>4} {'vec':>3} {'rows':>4} {'threads':>7} {'tg bytes':>8} "
              f"{'regs':>4} {'i64':>3}{sizes}")
    lines = [f"decode kernels (at most {decode.MAX_QUERY_ROWS} query rows): one token of one sequence through a "
             f"{LLAMA_3_8B.name}-shaped cache ({LLAMA_3_8B.layers} layers, {LLAMA_3_8B.nheads}/{LLAMA_3_8B.nheads_k} "
             "heads), dense, causal; the bound reads each K/V element once", header, "-" * len(header)]
    records = report_records() if records is None else records
    for r in records:
        cells = "".join(f"{t['bytes_per_token'] / 1e6:>14.1f} ({t['bytes_per_token'] / t['io_bound_bytes_per_token']:.3f})"
                        for t in r["decode_traffic"])
        lines.append(f"{r['family']:<7} {r['dtype']:<6} {r['head_dim']:>4} {r['vec']:>3} {r['rows_per_simdgroup']:>4} "
                     f"{r['threads']:>7} {r['threadgroup_bytes']:>8} {r['registers_per_thread']:>4} "
                     f"{r['int64_ops_per_key_block']:>3}{cells}")
    for r in records:
        if r["dtype"] != "half":
            continue
        times = "  ".join(f"{chip} " + "/".join(f"{t['bandwidth_limited_ms_per_token'][chip]:.2f}" for t in r["decode_traffic"])
                          for chip in r["decode_traffic"][0]["bandwidth_limited_ms_per_token"])
        sizes_k = "/".join(f"{rows // 1024}k" for rows in CACHE_ROWS)
        lines.append(f"{r['family']} half d={r['head_dim']}: bandwidth-limited ms per token at {sizes_k}: {times}")
    return "\n".join(lines)


def representative_specs() -> list[DecodeSpec]:
    """What `--dump` writes: every dtype at common head dims, plain, varlen, dense and paged caches, and
    softcap with ALiBi (the kernels are the same on every family)."""
    return [DecodeSpec.for_call(dtype, d, varlen=varlen, masked=masked, softcap=softcap, alibi=alibi, kv_cache=cache)
            for dtype in DTYPES for d in DUMP_HEAD_DIMS for varlen, masked, softcap, alibi, cache in DUMP_FEATURES]


def common_specs() -> list[DecodeSpec]:
    """What `cache warm` should precompile: fp16 and bf16 decoding over dense and paged caches at d = 64 and 128."""
    return [DecodeSpec.for_call(dtype, d, masked=True, kv_cache=cache)
            for dtype in ("half", "bfloat") for d in (64, 128) for cache in ("dense", "paged")]


def kernel_sources(spec: DecodeSpec) -> dict[str, str]:
    return {f"{spec.name}.metal": decode_kernel.decode_source(spec)}


def sources() -> dict[str, str]:
    """File name -> MSL of every representative decode kernel library."""
    return {name: source for spec in representative_specs() for name, source in kernel_sources(spec).items()}
