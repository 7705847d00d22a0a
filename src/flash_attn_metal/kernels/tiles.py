"""Tile sizes and operand placement per kernel, GPU family, dtype and head dim, with the reason for each choice,
and the threadgroup memory each choice takes.

Every kernel owns BLOCK_Q rows (8 per SIMD group: one 8x8 simdgroup_matrix row block) and streams the other side
through threadgroup memory BLOCK_K rows at a time:

    forward   owns query rows,  streams K (stored transposed) and V           stationary operand: Q
    dq        owns query rows,  streams K and V (stored transposed)            stationary operands: Q, dO
    dkdv      owns key rows,    streams Q and dO, and each query's statistics  stationary operands: K, V

The stationary operands are read at every step. `stationary` says where they live: "registers" (loaded once),
"threadgroup" (staged once, read from threadgroup memory at every step, as MLX's steel attention does with Q) or
"device" (read from device memory at every step, where threadgroup memory cannot hold them). The accumulators
(O, dQ, dK and dV) are always in registers; at large head dims the dkdv kernel splits into a dK and a dV kernel
(`split`) so that one accumulator fits the register budget (kernels/cost.py estimates registers).

Threadgroup tiles pad each row by 16 bytes, as MLX's steel attention does (`padQ = 16 / sizeof(T)`), so that rows
do not start on the same bank (Apple's bank layout is undocumented: metal-benchmarks lists it as TBD). Everything
stays within Apple7-9's limits: 32 KiB of threadgroup memory and 1024 threads (tests/test_kernels_tiles.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


THREADGROUP_MEMORY_LIMIT = 32 * 1024  # bytes, Apple7/8/9 (Metal feature set tables)
THREADS_LIMIT = 1024
SIMD_WIDTH = 32
ROWS_PER_SIMDGROUP = 8  # one 8x8 simdgroup_matrix row block per SIMD group
DTYPE_BYTES = {"half": 2, "bfloat": 2, "float": 4}
FAMILIES = ("apple7", "apple8", "apple9", "apple10")
KERNEL_KINDS = ("forward", "dq", "dkdv")
STATIONARY = ("registers", "threadgroup", "device")
ROW_PAD_BYTES = 16  # MLX's threadgroup row padding
STATS_PER_QUERY = 3  # the dkdv kernel stages M, log2(l) and D per query row (fp32)


@dataclass(frozen=True)
class Tiles:
    block_q: int  # rows a threadgroup owns: queries (forward, dq) or keys (dkdv); 8 per SIMD group
    block_k: int  # rows of the other side per step: keys (forward, dq) or queries (dkdv)
    stationary: str = "registers"  # where the owned operands live (see the module docstring)
    split: bool = False  # dkdv only: dK and dV in two kernels, each with one accumulator
    reason: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.block_q % ROWS_PER_SIMDGROUP or self.block_k % ROWS_PER_SIMDGROUP or self.stationary not in STATIONARY:
            raise ValueError(f"invalid tiles {self}")

    @property
    def simdgroups(self) -> int:
        return self.block_q // ROWS_PER_SIMDGROUP

    @property
    def threads(self) -> int:
        return self.simdgroups * SIMD_WIDTH


@dataclass(frozen=True)
class DecodeTiles:
    """The decode kernels' tunable choice (decode_kernel.py): the block tiles above do not apply to them."""

    rows: int  # (query row, head) pairs per SIMD group, one of decode_kernel.ROW_CHOICES


def row_stride(cols: int, dtype: str) -> int:
    """Elements between the rows of a padded threadgroup tile with `cols` columns."""
    return cols + ROW_PAD_BYTES // DTYPE_BYTES[dtype]


def threadgroup_bytes(kind: str, tiles: Tiles, head_dim: int, dtype: str) -> int:
    """Threadgroup memory of one kernel: the staged stationary operands plus the streamed tiles."""
    s = DTYPE_BYTES[dtype]
    owned = tiles.block_q * row_stride(head_dim, dtype) * s  # one stationary operand staged in threadgroup memory
    rows = tiles.block_k * row_stride(head_dim, dtype) * s  # a streamed block, row-major
    columns = head_dim * row_stride(tiles.block_k, dtype) * s  # a streamed block, transposed
    staged = tiles.stationary == "threadgroup"
    if kind == "forward":  # Q, and one tile that holds K^T, then V
        return staged * owned + max(columns, rows)
    if kind == "dq":  # Q and dO; K row-major and V transposed
        return 2 * staged * owned + rows + columns
    if kind == "dkdv":  # K and V; Q and dO row-major; each query's statistics
        return 2 * staged * owned + 2 * rows + tiles.block_k * STATS_PER_QUERY * 4
    raise ValueError(f"kind must be one of {KERNEL_KINDS}, got {kind!r}")


def _fit(kind: str, tiles: Tiles, head_dim: int, dtype: str) -> Tiles:
    """`tiles`, with BLOCK_K and then BLOCK_Q halved (down to 8) until the kernel fits in threadgroup memory, and
    the stationary operands moved from threadgroup to device memory when even that does not fit."""
    while threadgroup_bytes(kind, tiles, head_dim, dtype) > THREADGROUP_MEMORY_LIMIT:
        if tiles.block_k > 8:
            tiles = replace(tiles, block_k=tiles.block_k // 2)
        elif tiles.block_q > 16:
            tiles = replace(tiles, block_q=tiles.block_q // 2)
        elif tiles.stationary == "threadgroup":
            tiles = replace(tiles, stationary="device", reason=tiles.reason + "; stationary operands read from device "
                            "memory (threadgroup memory cannot hold them)")
        else:
            raise AssertionError(f"no {kind} tiles fit for d={head_dim} {dtype}")
    return tiles


# The forward follows MLX's steel attention, the fastest Metal attention forward measured with public MSL:
# 32 query rows and 4 SIMD groups per threadgroup on every non-NAX device, K/V blocks of 32 keys below d=128 and 16
# from d=128 (`bk = bd < 128 ? 32 : 16`), measured at 11.7 TFLOPS, 83% of an M3 Max (fp16, d=64, MLX PR #1610).
# metal-flash-attention's Apple9 tables use 16 rows and 64 threads instead; `tune` times that as a candidate.
# Q stays in registers up to d=128, as metal-flash-attention caches it on Apple7 (its row `128: 32/128/32 Q`);
# beyond, it is re-read from threadgroup memory at every block, as MLX always does, to keep within 128 registers.
FORWARD_Q_IN_REGISTERS_MAX_D = 128


def forward_tiles(family: str, dtype: str, head_dim: int) -> Tiles:
    """The forward kernel's tiles for a padded head dim (a multiple of 8, at most 256)."""
    _check(family, dtype, head_dim)
    block_k = 32 if head_dim < 128 else 16
    registers = head_dim <= FORWARD_Q_IN_REGISTERS_MAX_D
    tiles = Tiles(32, block_k, "registers" if registers else "threadgroup",
                  reason=f"MLX steel attention: 32 rows x 4 SIMD groups, {block_k} keys per block; Q in "
                         f"{'registers (MFA Apple7)' if registers else 'threadgroup memory (MLX)'}")
    return _fit("forward", tiles, head_dim, dtype)


# The backward follows metal-flash-attention's three kernels without atomics (62-64% of peak for forward+backward
# on an M1 Max, 61-71% on M3), with its rule of caching only what fits: dQ needs Q and dO at every key block,
# dK/dV need K and V at every query block. They stay in registers while the estimate stays within 128 registers
# (kernels/cost.py), else in threadgroup memory; at large head dims dK and dV get a kernel each (MFA caches only dV
# there and spills dK to device memory; two kernels keep both accumulators in registers at the cost of computing
# P^T twice).
DQ_REGISTERS_MAX_D = 96  # dQ + Q + dO: 3 d/4 floats per thread, 72 at d = 96
DKDV_REGISTERS_MAX_D = 64  # dK + dV + K + V: d floats per thread, 64 at d = 64
DKDV_FUSED_MAX_D = 144  # dK + dV alone: d/2 floats per thread, 72 at d = 144 (MFA Apple9: `144: dV, dK`); split beyond


def dq_tiles(family: str, dtype: str, head_dim: int) -> Tiles:
    _check(family, dtype, head_dim)
    registers = head_dim <= DQ_REGISTERS_MAX_D
    tiles = Tiles(32, 32 if head_dim < 128 else 16, "registers" if registers else "threadgroup",
                  reason=f"MFA backwardQuery: 32 rows; Q and dO in {'registers' if registers else 'threadgroup memory'}")
    return _fit("dq", tiles, head_dim, dtype)


def dkdv_tiles(family: str, dtype: str, head_dim: int) -> Tiles:
    _check(family, dtype, head_dim)
    registers = head_dim <= DKDV_REGISTERS_MAX_D
    split = head_dim > DKDV_FUSED_MAX_D
    tiles = Tiles(32, 32 if head_dim < 128 else 16, "registers" if registers else "threadgroup", split,
                  reason=f"MFA backwardKeyValue: 32 key rows; K and V in "
                         f"{'registers' if registers else 'threadgroup memory'}"
                         f"{'; dK and dV in separate kernels' if split else ''}")
    return _fit("dkdv", tiles, head_dim, dtype)


TILE_TABLES = {"forward": forward_tiles, "dq": dq_tiles, "dkdv": dkdv_tiles}


def candidates(kind: str, family: str, dtype: str, head_dim: int) -> list[Tiles]:
    """Every tile choice a kernel of `kind` can be built with at this padded head dim and dtype on `family`
    (within Apple's limits), the table's own choice first: what `python -m flash_attn_metal tune` times."""
    if kind not in KERNEL_KINDS:
        raise ValueError(f"kind must be one of {KERNEL_KINDS}, got {kind!r}")
    chosen = TILE_TABLES[kind](family, dtype, head_dim)
    found = [chosen]
    splits = (False, True) if kind == "dkdv" else (False,)
    for block_q in (16, 32):
        for block_k in (8, 16, 32, 64):
            for stationary in STATIONARY:
                for split in splits:
                    tiles = Tiles(block_q, block_k, stationary, split,
                                  reason=f"candidate: {block_q} rows, {block_k} per step, {stationary}"
                                         f"{', split' if split else ''}")
                    if tiles not in found and threadgroup_bytes(kind, tiles, head_dim, dtype) <= THREADGROUP_MEMORY_LIMIT:
                        found.append(tiles)
    return found


def _check(family: str, dtype: str, head_dim: int) -> None:
    if family not in FAMILIES or dtype not in DTYPE_BYTES or head_dim % 8 or not 8 <= head_dim <= 256:
        raise ValueError(f"no tiles for family={family!r} dtype={dtype!r} head_dim={head_dim}")


def packed_heads(seqlen_q: int, nheads: int, nheads_k: int, block_q: int) -> int:
    """Query heads per forward threadgroup: the whole GQA group when packing its heads into the query block takes
    fewer threadgroups (short queries, as in decoding: one threadgroup then reads each K/V block for the group
    instead of once per query head), else 1. Packed rows are (query row, head) pairs."""
    group = nheads // nheads_k
    if group == 1:
        return 1
    blocks = lambda rows: -(-rows // block_q)  # noqa: E731
    return group if blocks(seqlen_q * group) * nheads_k < blocks(seqlen_q) * nheads else 1


MAX_SPLITS = SIMD_WIDTH  # key splits per query block: the combine kernel (decode_combine.py) holds one per lane
THREADGROUPS_PER_CORE = 4  # what a split launch aims for: 1,024 resident threads per GPU core (decode's too)
MIN_KEY_BLOCKS_PER_SPLIT = 4  # fewer keys per split and the partial outputs cost more than the split saves


def key_splits(threadgroups: int, key_blocks: int, gpu_cores: int, requested: int = 0) -> int:
    """How many parts each query block's keys are split into (flash-decoding): each part runs as a threadgroup
    of its own, and a combine kernel merges the parts' outputs through their LSE. `requested` > 0 asks for that
    many (flash_attn_with_kvcache's num_splits; 1: never split); 0 splits only a launch of too few threadgroups
    to occupy the GPU, such as decoding."""
    if requested > 0:
        return max(1, min(requested, key_blocks, MAX_SPLITS))
    wanted = -(-THREADGROUPS_PER_CORE * gpu_cores // max(threadgroups, 1))
    return max(1, min(wanted, key_blocks // MIN_KEY_BLOCKS_PER_SPLIT, MAX_SPLITS))
