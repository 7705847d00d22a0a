"""Tile sizes per GPU family and head dim, with the reason for each entry.

A forward threadgroup owns BLOCK_Q query rows (8 per SIMD group) and streams K and V through one shared
threadgroup tile of BLOCK_K rows. The backward kernels use the same tiles with two such tiles (K and V, or Q and
dO); the fp32 entries fill exactly 32 KiB there. Every configuration must stay within Apple's limits: 32 KiB of threadgroup
memory and 1024 threads per threadgroup (tests/test_kernels_tiles.py checks the whole table).
"""

from __future__ import annotations

from dataclasses import dataclass

THREADGROUP_MEMORY_LIMIT = 32 * 1024  # bytes, Apple7/8/9 (Metal feature set tables)
THREADS_LIMIT = 1024
SIMD_WIDTH = 32
ROWS_PER_SIMDGROUP = 8  # one 8x8 simdgroup_matrix row block per SIMD group
DTYPE_BYTES = {"half": 2, "bfloat": 2, "float": 4}
FAMILIES = ("apple7", "apple8", "apple9", "apple10")


@dataclass(frozen=True)
class Tiles:
    block_q: int  # query rows per threadgroup
    block_k: int  # keys per K/V block
    reason: str

    @property
    def simdgroups(self) -> int:
        return self.block_q // ROWS_PER_SIMDGROUP

    @property
    def threads(self) -> int:
        return self.simdgroups * SIMD_WIDTH


def forward_tiles(family: str, head_dim: int) -> Tiles:
    """The forward kernel's tiles for a padded head dim (a multiple of 8, at most 256)."""
    if family in ("apple7", "apple8"):
        # M1/M2: 32 query rows and 128 threads per threadgroup, as metal-flash-attention's M1 tables and
        # MLX's steel attention use. Keys: 32 per block up to d=128, 16 beyond (MLX: bk = d < 128 ? 32 : 16),
        # which keeps the shared K/V tile at 8 KiB (fp16) to 16 KiB (fp32) and the S fragments per thread low.
        block_k = 32 if head_dim <= 128 else 16
        return Tiles(32, block_k, "M1/M2: 32 rows x 128 threads (MFA Apple7/8, MLX); BLOCK_K 32, 16 past d=128")
    # M3/M4 and newer: 16 query rows and 64 threads per threadgroup, as metal-flash-attention chose for
    # Apple9 (Dynamic Caching favours smaller threadgroups and more of them); wider key blocks at small d.
    block_k = 64 if head_dim <= 64 else (32 if head_dim <= 128 else 16)
    return Tiles(16, block_k, "M3/M4+: 16 rows x 64 threads (MFA Apple9); BLOCK_K 64 to d=64, 32 to 128, then 16")


KERNEL_KINDS = ("forward", "backward")  # what `candidates` and the tuner choose tiles for


def candidates(kind: str, family: str, dtype: str, head_dim: int) -> list[Tiles]:
    """Every tile choice a kernel of `kind` can be built with at this padded head dim and dtype on `family`
    (within Apple's limits), the table's own choice first: what `python -m flash_attn_metal tune` times."""
    if kind not in KERNEL_KINDS:
        raise ValueError(f"kind must be one of {KERNEL_KINDS}, got {kind!r}")
    chosen = forward_tiles(family, head_dim)
    bytes_of = forward_threadgroup_bytes if kind == "forward" else backward_threadgroup_bytes
    found = [chosen]
    for block_q in (16, 32):
        for block_k in (16, 32, 64):
            tiles = Tiles(block_q, block_k, f"candidate: {block_q} rows, {block_k} keys per block")
            if (block_q, block_k) != (chosen.block_q, chosen.block_k) and \
                    bytes_of(tiles, head_dim, dtype) <= THREADGROUP_MEMORY_LIMIT:
                found.append(tiles)
    return found


def forward_threadgroup_bytes(tiles: Tiles, head_dim: int, dtype: str) -> int:
    """One shared K/V tile in the input dtype."""
    return tiles.block_k * head_dim * DTYPE_BYTES[dtype]


def backward_threadgroup_bytes(tiles: Tiles, head_dim: int, dtype: str) -> int:
    """Two tiles: K and V (the dq kernel) or Q and dO (the dkdv kernel)."""
    return 2 * forward_threadgroup_bytes(tiles, head_dim, dtype)


def packed_heads(seqlen_q: int, nheads: int, nheads_k: int, block_q: int) -> int:
    """Query heads per forward threadgroup: the whole GQA group when packing its heads into the query block takes
    fewer threadgroups (short queries, as in decoding: one threadgroup then reads each K/V block for the group
    instead of once per query head), else 1. Packed rows are (query row, head) pairs."""
    group = nheads // nheads_k
    if group == 1:
        return 1
    blocks = lambda rows: -(-rows // block_q)  # noqa: E731
    return group if blocks(seqlen_q * group) * nheads_k < blocks(seqlen_q) * nheads else 1


MAX_SPLITS = 32  # key splits per query block; the combine kernel keeps one weight per split in registers
THREADGROUPS_PER_CORE = 4  # what a split launch aims for: several resident threadgroups per GPU core
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
