"""The vector path's launch plan: which forward calls the decode kernels (decode_kernel.py) run, and how their rows
and keys spread over threadgroups.

    plan(problem, backend) -> ForwardLaunch | None    # None: the block forward runs the call

Short calls fill the GPU by splitting the keys (flash-decoding): a split launch asks for THREADGROUPS_PER_CORE
threadgroups per core, but never so many splits that their partial outputs cost more than PARTIAL_SHARE of the
K/V bytes they read; decode_combine's kernel merges the splits.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..problem import AttentionProblem
from ..runtime.backend import Backend, Kernel
from ..runtime.device import gpu_cores, gpu_family
from . import decode_combine, tuning
from .decode_kernel import FLOAT_ARGS, INT_ARGS, SIMDGROUPS, THREADS, DecodeSpec, decode_source, widest_vec
from .launch import ForwardLaunch, contiguous_strides, score_floats, sequence_ints, windows
from .spec import cache_kind, msl_type, padded_head_dim
from .tiles import DTYPE_BYTES, MAX_SPLITS, THREADGROUPS_PER_CORE

MAX_QUERY_ROWS = 8  # query rows per sequence that take the vector path (MLX's sdpa_vector: the same 8)
PARTIAL_SHARE = 1 / 32  # an auto split keeps its partial outputs (written and read back) under this share of K/V
INT32_LIMIT = 2**31 - 1  # in-loop offsets are `int`


@dataclass(frozen=True)
class Geometry:
    """How a call's rows and keys spread over threadgroups and SIMD groups."""

    row_groups: int  # SIMD groups of a threadgroup that split its rows
    row_blocks: int  # threadgroups (per split) that split the packed rows; each reads the K/V head's keys
    splits: int  # key splits per row block


def geometry(spec: DecodeSpec, batch: int, max_seqlen_q: int, nheads: int, nheads_k: int, max_seqlen_k: int,
             cores: int, requested_splits: int = 0) -> Geometry:
    """The rows of a K/V head go to as few threadgroups as the SIMD groups' rows allow (row groups), and the keys
    split as `key_splits` says."""
    packed = max_seqlen_q * (nheads // nheads_k)
    row_groups = 1
    while row_groups < SIMDGROUPS and row_groups * spec.rows < packed:
        row_groups *= 2
    row_blocks = -(-packed // (spec.rows * row_groups))
    splits = key_splits(batch * nheads_k * row_blocks, max_seqlen_k, min(packed, spec.rows * row_groups), spec,
                        cores, requested_splits)
    return Geometry(row_groups, row_blocks, splits)


def key_splits(threadgroups: int, max_seqlen_k: int, rows: int, spec: DecodeSpec, cores: int, requested: int = 0) -> int:
    """Key splits per row block. `requested` > 0 (flash_attn_with_kvcache's num_splits) is honoured up to
    MAX_SPLITS and the key count; 0 splits until the launch has THREADGROUPS_PER_CORE threadgroups per core,
    keeping at least `min_split_keys` keys per split."""
    if requested > 0:
        return max(1, min(requested, MAX_SPLITS, max_seqlen_k))
    wanted = -(-THREADGROUPS_PER_CORE * cores // max(threadgroups, 1))
    return max(1, min(wanted, max_seqlen_k // min_split_keys(rows, spec), MAX_SPLITS))


def min_split_keys(rows: int, spec: DecodeSpec) -> int:
    """The fewest keys a split may take: its `rows` partial outputs (fp32 O and LSE, written, then read by the
    combine) cost at most PARTIAL_SHARE of the K and V bytes it reads."""
    partial_bytes = rows * 2 * 4 * (spec.head_dim + 1)
    kv_bytes_per_key = 2 * spec.head_dim * DTYPE_BYTES[spec.dtype]
    return math.ceil(partial_bytes / (PARTIAL_SHARE * kv_bytes_per_key))


def spec_for(p: AttentionProblem) -> DecodeSpec:
    """The decode kernel a call runs: its dtype, padded head dim, load width and features."""
    left, right = windows(p)
    d = padded_head_dim(p.head_dim)
    return _cached_spec(msl_type(p.q.dtype), d, load_width(p, d), p.is_varlen, left >= 0 or right >= 0,
                        p.softcap > 0, p.alibi_slopes is not None, cache_kind(p), p.sinks is not None)


@functools.lru_cache(maxsize=1024)
def _cached_spec(dtype: str, head_dim: int, vec: int, varlen: bool, masked: bool, softcap: bool, alibi: bool,
                 kv_cache: str, sinks: bool) -> DecodeSpec:
    """Cached until the tuned table or a tuning trial changes (kernels/dispatch.forget_tiles clears it)."""
    tiles = tuning.current("decode", gpu_family(), dtype, head_dim, masked)
    return DecodeSpec(dtype, head_dim, vec, varlen, masked, softcap, alibi, kv_cache, sinks, tiles)


def load_width(p: AttentionProblem, head_dim: int) -> int:
    """The widest VEC (up to widest_vec) dividing the head dim, and every stride and storage offset of q, k and v
    (those of size-1 dimensions are never used): every VEC-wide load is then aligned."""
    vec = widest_vec(head_dim)
    while vec > 1 and not (p.head_dim % vec == 0 and all(_aligned(t, vec) for t in (p.q, p.k, p.v))):
        vec //= 2
    return vec


def _aligned(t: torch.Tensor, vec: int) -> bool:
    return t.storage_offset() % vec == 0 and all(s % vec == 0 for s, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1)


def in_loop_span(shape: tuple[int, ...], strides: tuple[int, ...], rows: int, paged: bool) -> int:
    """One past the largest element offset the key loop forms from a K or V base pointer (32-bit `int`s): `rows`
    rows (one more for the increment after the last), or, paged, anywhere in the cache (blocks, page, hk, d)."""
    if paged:
        return (shape[0] - 1) * strides[0] + shape[1] * strides[1] + shape[-1]
    row_stride = strides[-3]
    return (rows + 1) * row_stride + shape[-1]


def _offsets_fit(p: AttentionProblem) -> bool:
    paged = p.kv_cache is not None and p.kv_cache.paged
    rows = p.max_seqlen_k if p.is_varlen else p.k.shape[1]
    return all(in_loop_span(tuple(t.shape), t.stride(), rows, paged) <= INT32_LIMIT for t in (p.k, p.v))


def _launch_arguments(p: AttentionProblem, geo: Geometry, lse_shape: tuple[int, ...]) -> tuple[list[int], list[float]]:
    ints = [*sequence_ints(p, contiguous_strides(p.q.shape), contiguous_strides(lse_shape)),
            geo.row_groups, geo.splits, p.nheads, p.max_seqlen_q, p.batch * p.nheads * p.max_seqlen_q]
    floats = score_floats(p)
    assert len(ints) == len(INT_ARGS) and len(floats) == len(FLOAT_ARGS)
    return ints, floats


@functools.lru_cache(maxsize=256)
def _kernels(spec: DecodeSpec, backend: Backend) -> tuple[Kernel, Kernel, Kernel]:
    """The unsplit, split and combine kernels of a spec (generated and compiled once per process and backend)."""
    library = backend.compile(decode_source(spec))
    return tuple(getattr(library, name) for name in spec.kernel_names)  # type: ignore[return-value]


def plan(p: AttentionProblem, backend: Backend) -> ForwardLaunch | None:
    """The vector path's launch for a forward call of at most MAX_QUERY_ROWS query rows per sequence, or None
    (the block forward runs it): more rows, no rows, a K/V cache whose in-loop offsets outgrow 32 bits, or a call
    that may be differentiated (q, k or v requires grad): the block backward recomputes P from the LSE with the
    block kernels' score arithmetic, so its forward stays on them too (another summation order moves P off 1.0
    by an ulp where the reference is exact)."""
    if not 0 < p.max_seqlen_q <= MAX_QUERY_ROWS or p.batch == 0 or not _offsets_fit(p):
        return None
    if p.q.requires_grad or p.k.requires_grad or p.v.requires_grad:
        return None
    if p.attn_mask is not None or p.top_left_matters or p.dropout_p > 0:
        return None  # the block forward has these
    spec = spec_for(p)
    geo = geometry(spec, p.batch, p.max_seqlen_q, p.nheads, p.nheads_k, p.max_seqlen_k, gpu_cores(), p.num_splits)
    lse_shape = (p.nheads, p.q.shape[0]) if p.is_varlen else (p.batch, p.nheads, p.q.shape[1])
    ints, floats = _launch_arguments(p, geo, lse_shape)
    unsplit, split, combine = _kernels(spec, backend)
    grid = [geo.row_blocks * geo.splits * THREADS, p.nheads_k, p.batch]
    if geo.splits == 1:
        return ForwardLaunch([(unsplit, grid, [THREADS, 1, 1])], ints, floats, lse_shape, p.is_varlen)
    steps = [(split, grid, [THREADS, 1, 1]), (combine, *decode_combine.combine_grid(p.max_seqlen_q, p.nheads, p.batch))]
    return ForwardLaunch(steps, ints, floats, lse_shape, p.is_varlen,
                         partial_rows=geo.splits * p.batch * p.nheads * p.max_seqlen_q,
                         partial_cols=spec.head_dim)
