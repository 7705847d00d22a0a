"""Static figures of the generated kernels: registers per thread, 64-bit integer operations in the hot loop, and an
issue-slot model of one step of the hot loop per SIMD group. No Apple GPU has run these kernels here: these are
design figures, not timings.

The issue-slot model counts, per SIMD group and per step of the hot loop (a key block of the forward and dq
kernels, a query block of dkdv), the instructions the generated MSL issues, each weighted by its throughput in
cycles per SIMD-group instruction from philipturner/metal-benchmarks (README, "Instruction Throughputs", M1 Max):

    MATMUL<8x8xF32> ~18, FFMA32/FMUL32/FADD32/FMAX32/FCMPSEL32 1, EXP2_32 4.00 (precise and fast alike),
    SHUFFLE/BROADCAST32 2.04, IADD32 1, IMUL32 4, IADD64 4.68, IMUL64 16.06.

metal-benchmarks publishes no throughput for loads, stores and barriers; the model charges each such instruction
one issue slot (an assumption: the memory pipelines run beside the ALU). How many bytes go through threadgroup
memory is reported apart, per MMA, next to the same figure for MLX's steel attention forward, the design measured
at 83% of an M3 Max (MLX PR #1610): Apple's threadgroup bandwidth is unmeasured ("Shared BW/Cycle: TBD").

    mma_share = cycles of MMAs / cycles of everything counted

Registers: a simdgroup_float8x8 holds two fp32 elements per lane (2 registers); scalars are listed per kernel
below with their sizes (a 64-bit value counts 2). The MSL compiler allocates registers itself; this estimate is
what the design asks for, the figure metal-benchmarks' advice is about ("ALU utilization maxes out at 24
simds/core").
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from .tiles import DTYPE_BYTES, Tiles

# Throughputs, cycles per SIMD-group instruction (metal-benchmarks, M1 Max).
MMA_CYCLES = 18.0  # MATMUL<8x8xF32> ~18
ALU_CYCLES = 1.0  # FFMA32, FMUL32, FADD32, FMAX32, FCMPSEL32, IADD32
EXP2_CYCLES = 4.0  # EXP2_32
SHUFFLE_CYCLES = 2.04  # SHUFFLE_NOROTATE32
IMUL_CYCLES = 4.0  # IMUL32
MEMORY_CYCLES = 1.0  # a load, store or barrier: one issue slot (assumed; not in metal-benchmarks)
FRAGMENT_REGISTERS = 2  # fp32 elements per lane of an 8x8 simdgroup_matrix

# Live scalars of each kernel's hot loop, in 32-bit registers (pointers and longs count 2; ushort2 and two ushorts
# share one). Read off the generated MSL: loop bounds and counters, row statistics, masks, strides, base pointers.
SCALARS = {
    "forward": {"k0, key_end, edge": 3, "seqlen_k, diagonal, window_left, window_right": 4, "head_dim": 1,
                "row_max, row_sum, block_max/new_max/correction, block_sum": 6, "score_scale, softcap_log2": 2,
                "k_stride, v_stride": 2, "k_seq, v_seq": 4, "loader column/row, tid/sg/lane, coord": 4,
                "kv_tile, q_tile": 2, "row, first_row, last_row": 3},
    "dq": {"k0, key_end, edge": 3, "seqlen_k, window_left, window_right, diagonal_offset": 4, "head_dim": 1,
           "m, log2 l, D, slope": 4, "softmax_scale": 1, "k_stride, v_stride": 2, "k_seq, v_seq": 4,
           "loader column/row, tid/sg/lane, coord": 4, "k_tile, vt_tile, q_tile, do_tile": 4,
           "row, first_row, last_row": 3},
    "dkdv": {"q0, query_end, edge, head": 4, "seqlen_q, window_left, window_right, diagonal_offset": 4,
             "head_dim, group_size": 2, "slope, softmax_scale": 2, "q_stride, do_stride": 2,
             "q_seq, do_seq, stats_seq, d_seq": 8, "loader column/row, tid/sg/lane, coord": 4,
             "q/do/stats/k/v tiles": 7, "key, first_key": 2},
}


def scalar_registers(kind: str) -> int:
    return sum(SCALARS["dkdv" if kind in ("dk", "dv") else kind].values())


def registers(kind: str, tiles: Tiles, head_dim: int) -> int:
    """Estimated 32-bit registers per thread of a kernel ("forward", "dq", "dkdv", "dk" or "dv")."""
    d_frags, k_frags = head_dim // 8, tiles.block_k // 8
    cached = tiles.stationary == "registers"
    if kind == "forward":  # O; Q if cached; S; one K^T or V fragment in flight (and Q's when it is re-read)
        fragments = d_frags + cached * d_frags + k_frags + 1 + (not cached)
    elif kind == "dq":  # dQ; Q and dO if cached; S and dP; K^T and V^T in flight (and Q's and dO's)
        fragments = d_frags + 2 * cached * d_frags + 2 * k_frags + 2 + 2 * (not cached)
    elif kind in ("dkdv", "dk", "dv"):
        accumulators = 2 if kind == "dkdv" else 1
        stationary = 1 if kind == "dv" else 2  # the dv kernel needs K only
        fragments = (accumulators * d_frags + stationary * cached * d_frags + 2 * k_frags + 2
                     + stationary * (not cached))
    else:
        raise ValueError(f"unknown kernel kind {kind!r}")
    return FRAGMENT_REGISTERS * fragments + scalar_registers(kind)


@dataclass(frozen=True)
class StepCost:
    """Instructions per SIMD group for one step of a kernel's hot loop, and what they cost."""

    mma: int
    threadgroup_reads: int  # fragment reads (two elements per lane each)
    threadgroup_bytes: int  # bytes this SIMD group reads from and writes to threadgroup memory
    loads: int  # device reads of the block loaders
    stores: int  # threadgroup writes of the block loaders
    exp2: int
    alu: int  # fp32 and 32-bit integer arithmetic, compares and selects
    imul: int
    shuffles: int
    barriers: int

    @property
    def cycles(self) -> float:
        return (self.mma * MMA_CYCLES + (self.threadgroup_reads + self.loads + self.stores + self.barriers)
                * MEMORY_CYCLES + self.exp2 * EXP2_CYCLES + self.alu * ALU_CYCLES + self.imul * IMUL_CYCLES
                + self.shuffles * SHUFFLE_CYCLES)

    @property
    def mma_share(self) -> float:
        return self.mma * MMA_CYCLES / self.cycles

    @property
    def threadgroup_bytes_per_mma(self) -> float:
        return self.threadgroup_bytes / self.mma


def _loader(tiles: Tiles, head_dim: int, vec: int, transposed: bool) -> tuple[int, int, int]:
    """(device reads, threadgroup writes, address arithmetic) per thread for one streamed block."""
    reads = -(-tiles.block_k * head_dim // (vec * tiles.threads))
    return reads, reads * (vec if transposed else 1), 2 * reads


def step_cost(kind: str, tiles: Tiles, head_dim: int, dtype: str, vec: int = 4) -> StepCost:
    """The model of one step of the hot loop of a kernel on an interior block (no mask, no softcap or ALiBi)."""
    s = DTYPE_BYTES[dtype]
    df, kf = head_dim // 8, tiles.block_k // 8
    pair = 32 * 2 * s  # bytes of one fragment read across the SIMD group
    block_bytes = tiles.block_k * head_dim * s * 32 // tiles.threads  # this SIMD group's share of a block copy
    staged = tiles.stationary == "threadgroup"
    device = tiles.stationary == "device"
    if kind == "forward":
        k_reads, k_stores, k_int = _loader(tiles, head_dim, vec, transposed=True)
        v_reads, v_stores, v_int = _loader(tiles, head_dim, vec, transposed=False)
        reads = 2 * kf * df + staged * df
        return StepCost(
            mma=2 * kf * df, threadgroup_reads=reads, threadgroup_bytes=reads * pair + 2 * block_bytes,
            loads=k_reads + v_reads + device * df, stores=k_stores + v_stores, exp2=2 * kf + 1,
            # per element: scale, compare with MASKED, select, max, subtract, sum; O *= correction; loop and flags
            alu=2 * kf * 6 + 2 * df + 8 + k_int + v_int, imul=2, shuffles=4, barriers=3)
    if kind == "dq":
        k_reads, k_stores, k_int = _loader(tiles, head_dim, vec, transposed=False)
        v_reads, v_stores, v_int = _loader(tiles, head_dim, vec, transposed=True)
        reads = 3 * kf * df + 2 * staged * df  # K^T (two scalar reads count as one pair), V^T, K
        return StepCost(
            mma=3 * kf * df, threadgroup_reads=reads + kf * df, threadgroup_bytes=(reads + kf * df) * pair
            + 2 * block_bytes, loads=k_reads + v_reads + 2 * device * df, stores=k_stores + v_stores, exp2=2 * kf,
            # per element: scale, two subtractions, dP - D, two multiplies; loop and flags
            alu=2 * kf * 6 + 8 + k_int + v_int, imul=2, shuffles=0, barriers=2)
    if kind in ("dkdv", "dk", "dv"):
        dk, dv = kind in ("dkdv", "dk"), kind in ("dkdv", "dv")
        q_reads, q_stores, q_int = _loader(tiles, head_dim, vec, transposed=False)
        mma = kf * df * (1 + 2 * dk + dv)  # S^T; dP^T and dK; dV
        stationary_reads = (1 + dk) * df * (staged or device)
        reads = mma + kf * df * dk  # one fragment per MMA; dO^T and Q^T take two scalar reads per pair
        return StepCost(
            mma=mma, threadgroup_reads=reads + staged * stationary_reads + 3 * kf,
            threadgroup_bytes=(reads + staged * stationary_reads) * pair + 2 * block_bytes + 3 * kf * 32 * 8,
            loads=2 * q_reads + device * stationary_reads + 1, stores=2 * q_stores + 3,
            exp2=2 * kf, alu=2 * kf * (3 + 3 * dk) + 8 + 2 * q_int, imul=2, shuffles=0, barriers=2)
    raise ValueError(f"unknown kernel kind {kind!r}")


# MLX's steel attention forward, as measured (fp16, d=64, bq=32, bk=32, 4 SIMD groups; Q re-read from threadgroup
# memory), through the same model: the anchor for the threadgroup-traffic figure.
MLX_FORWARD_ANCHOR = Tiles(32, 32, "threadgroup", reason="MLX steel attention, fp16 d=64 (PR #1610: 83% of an M3 Max)")


def mlx_threadgroup_bytes_per_mma() -> float:
    return step_cost("forward", MLX_FORWARD_ANCHOR, 64, "half").threadgroup_bytes_per_mma


_INT64_TYPES = ("long", "ulong", "int64_t", "uint64_t", "size_t", "ptrdiff_t")
_LOOP_MARK = re.compile(r"//\s*the (key|query) loop")


def int64_ops_in_hot_loop(source: str, kernel: str) -> int:
    """64-bit integer operations in the hot loop of `kernel` (the loop marked `// the key loop` or
    `// the query loop`), read off the MSL: every use of a 64-bit integer type, of a variable declared with one
    (or with index_t when it is 64-bit), and of the `constant long* ints` buffer, inside the loop and inside the
    helper functions the loop calls."""
    types = _int64_types(source)
    body = _kernel_body(source, kernel)
    loop = _marked_loop(body)
    count = _count_wide(loop, types, _declared(body, types))
    for helper, per_call in _helper_int64_ops(source).items():
        if per_call:
            count += per_call * len(re.findall(rf"\b{helper}\s*(<[^;()]*>)?\s*\(", loop))
    return count


def _int64_types(source: str) -> tuple[str, ...]:
    wide_index = re.search(r"typedef\s+(ulong|long)\s+index_t\s*;", source) is not None
    return _INT64_TYPES + (("index_t",) if wide_index else ())


@functools.lru_cache(maxsize=64)
def _helper_int64_ops(source: str) -> dict[str, int]:
    """64-bit integer operations in each helper function of a source."""
    types = _int64_types(source)
    return {name: _count_wide(body, types, _declared(body, types)) for name, body in _helpers(source).items()}


def _declared(text: str, types: tuple[str, ...]) -> set[str]:
    """Names declared in `text` with one of `types` (`const long a = ..., b = ...;` declares a and b)."""
    names: set[str] = set()
    for match in re.finditer(rf"\b(?:{'|'.join(types)})\s+(\w+)\s*=([^;]*);", text):
        names.add(match.group(1))
        names |= set(re.findall(r",\s*(\w+)\s*=", match.group(2)))
    return names


def _count_wide(text: str, types: tuple[str, ...], names: set[str]) -> int:
    words = re.findall(r"\b\w+\b", text)
    return sum(1 for w in words if w in types or w in names) + len(re.findall(r"\bints\s*\[", text))


def _kernel_body(source: str, kernel: str) -> str:
    start = source.index(f"void {kernel}(")
    return _braced(source, source.index("{", source.index(")", start)))


def _marked_loop(body: str) -> str:
    match = _LOOP_MARK.search(body)
    if match is None:
        raise ValueError("kernel has no marked hot loop")
    return _braced(body, body.rindex("{", 0, match.start()))


def _braced(text: str, open_at: int) -> str:
    """text[open_at:] up to the brace that closes the one at open_at."""
    depth = 0
    for match in _BRACE.finditer(text, open_at):
        depth += 1 if match.group() == "{" else -1
        if depth == 0:
            return text[open_at : match.end()]
    raise ValueError("unbalanced braces")


_BRACE = re.compile(r"[{}]")


def _helpers(source: str) -> dict[str, str]:
    """Bodies of the non-kernel inline functions."""
    found = {}
    for match in re.finditer(r"inline\s+[\w:<>, ]+?\s+(\w+)\s*\([^)]*\)\s*\{", source):
        found[match.group(1)] = _braced(source, match.end() - 1)
    return found
