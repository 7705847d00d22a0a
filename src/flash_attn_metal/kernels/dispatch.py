"""What routing calls to run an `AttentionProblem` on the Metal kernels.

    unsupported_reason(problem, needs_grad) -> str | None   # None: the kernels run it
    forward(problem, backend_name) -> (out, lse, stats)     # backend_name: "mps" or "emulator"
    forward_launch(problem, backend_name) -> ForwardLaunch  # the same launch, replayable on other tensors
    side_buffers(problem) -> [tensor]                       # what a launch takes after q, k, v
    backward(problem, out, stats, dout, backend_name) -> (dq, dk, dv)
    stats_from_lse(lse) -> stats                            # for callers that kept only the LSE
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import torch

from ..problem import AttentionProblem
from ..runtime.backend import Backend, Kernel, get_backend
from ..runtime.device import gpu_cores, gpu_family
from . import decode, decode_combine, dropout
from .backward import PREPROCESS_ROWS, backward_source
from .backward import kernel_names as backward_kernel_names
from .forward import FLOAT_ARGS, INT_ARGS, combine_name, forward_source
from .launch import LOG2E, ForwardLaunch, contiguous_strides, row_strides, score_floats, sequence_ints
from .spec import MAX_VEC, BackwardSpec, ForwardSpec, cache_kind, msl_type, side_buffer_names
from .tiles import key_splits, packed_heads


def native_features() -> str:
    return ("forward and backward in fp16/bf16/fp32, head dims up to 256, causal and local masks (bottom-right or "
            "top-left), attention masks (bool or float, broadcast), sinks, dropout, softcap, ALiBi, GQA/MQA, varlen, "
            "kv caches (dense and paged, read in place), decode vector kernels, strided inputs")


def unsupported_reason(problem: AttentionProblem, needs_grad: bool) -> str | None:
    if problem.q.device.type == "mps" and gpu_family() is None:
        return "the Metal device is not Apple silicon (the kernels need simdgroup_matrix: Apple7/M1 or newer)"
    if problem.attn_mask is not None and (problem.is_varlen or problem.kv_cache is not None):
        return "attention masks apply to the padded layout only"
    return None


@functools.lru_cache(maxsize=1024)
def _cached_spec(dtype: torch.dtype, head_dim: int, varlen: bool, masked: bool, softcap: bool, alibi: bool,
                 kv_cache: str, split_kv: bool, vec: int, wide: bool, mask: str, sinks: bool,
                 dropout: bool) -> ForwardSpec:
    return ForwardSpec.for_call(msl_type(dtype), head_dim, gpu_family(), varlen=varlen, masked=masked,
                                softcap=softcap, alibi=alibi, kv_cache=kv_cache, split_kv=split_kv, vec=vec,
                                wide=wide, mask=mask, sinks=sinks, dropout=dropout)


def _spec(p: AttentionProblem, split_kv: bool = False) -> ForwardSpec:
    tensors = (p.q, p.k, p.v)
    spanned = tensors if p.attn_mask is None else (*tensors, p.attn_mask)
    return _cached_spec(p.q.dtype, p.head_dim, p.is_varlen, p.window_left >= 0 or p.window_right >= 0,
                        p.softcap > 0, p.alibi_slopes is not None, cache_kind(p), split_kv, load_vec(tensors),
                        any(_span(t) >= WIDE_ELEMENTS for t in spanned),
                        "" if p.attn_mask is None else msl_type(p.attn_mask.dtype), p.sinks is not None,
                        p.dropout_p > 0)


def forget_tiles() -> None:
    """Drop the specs chosen so far and the launches remembered with them (kernels/tuning.py calls this when the
    tuned table or a trial changes the tiles)."""
    from .. import fastpath

    _cached_spec.cache_clear()
    decode._cached_spec.cache_clear()
    _backward_spec.cache_clear()
    fastpath.clear()


WIDE_ELEMENTS = 1 << 32  # a tensor spanning this many elements needs 64-bit offsets (ForwardSpec.wide)


def _span(t: torch.Tensor) -> int:
    """Elements between the start of t's storage and its last element: what an offset into it can reach."""
    return t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if n > 0) + 1


def load_vec(tensors: Sequence[torch.Tensor], widest: int = MAX_VEC) -> int:
    """The widest vector (elements) the block loaders may read from all of `tensors`: their storage offsets and
    strides (but the last, 1) must be multiples of it, so every vector read is naturally aligned (buffers
    themselves are 16-byte aligned). ForwardSpec.for_call narrows it further to divide the real head dim."""
    vec = widest
    for t in tensors:
        while vec > 1 and (t.storage_offset() % vec or any(s % vec for s in t.stride()[:-1])):
            vec //= 2
    return vec


def _launch_arguments(p: AttentionProblem, out_strides: tuple[int, ...], lse_strides: tuple[int, ...], *,
                      packed_heads: int, splits: int) -> tuple[list[int], list[float]]:
    """The forward's int and float arguments (kernels/forward.py INT_ARGS and FLOAT_ARGS order)."""
    ints = [
        *sequence_ints(p, out_strides, lse_strides), packed_heads, splits, p.nheads, p.max_seqlen_q,
        p.batch * p.nheads * p.max_seqlen_q, 0 if p.top_left else 1,
        *(p.attn_mask.stride() if p.attn_mask is not None else (0, 0, 0, 0)), *_dropout(p),
    ]
    floats = [*score_floats(p), 1.0 / (1.0 - p.dropout_p)]
    assert len(ints) == len(INT_ARGS) and len(floats) == len(FLOAT_ARGS)
    return ints, floats


def _dropout(p: AttentionProblem) -> tuple[int, int, int]:
    """DROPOUT_SEED, DROPOUT_OFFSET (the call's draw, as int64 bits) and DROPOUT_THRESHOLD (kernels/dropout.py)."""
    if p.dropout_p <= 0:
        return 0, 0, 0
    seed, offset = p.dropout_rng
    return dropout.as_int64(seed), dropout.as_int64(offset), dropout.threshold(p.dropout_p)


def side_buffers(p: AttentionProblem) -> list[torch.Tensor]:
    """The spec's side buffers in its order: the attention mask as it is (the kernels read it through its strides,
    stride 0 where it broadcasts), the others dense (a buffer binds storage without strides, and they are tiny:
    cu_seqlens, the kv cache's per-sequence rows, ALiBi slopes, sinks)."""
    tensors = {"cu_seqlens_q": p.cu_seqlens_q, "cu_seqlens_k": p.cu_seqlens_k, "alibi_slopes": p.alibi_slopes,
               "sinks": p.sinks}
    if p.kv_cache is not None:
        c = p.kv_cache
        tensors.update(cache_seqlens=c.seqlens, cache_leftpad=c.leftpad, cache_batch_idx=c.batch_idx,
                       block_table=c.block_table)
    names = side_buffer_names(varlen=p.is_varlen, kv_cache=cache_kind(p), alibi=p.alibi_slopes is not None,
                              mask=p.attn_mask is not None, sinks=p.sinks is not None)
    return [p.attn_mask if name == "attn_mask" else tensors[name].contiguous() for name in names]


def _backend(p: AttentionProblem, backend_name: str) -> Backend:
    return get_backend("mps" if backend_name == "mps" else ("cuda-emulator" if p.q.is_cuda else "emulator"))


@functools.lru_cache(maxsize=256)
def _forward_kernels(spec: ForwardSpec, backend: Backend) -> tuple[Kernel, ...]:
    """The compiled forward kernel of a spec, and a split-KV spec's combine kernel (generated and looked up once
    per process and backend)."""
    library = backend.compile(forward_source(spec))
    return tuple(getattr(library, name) for name in (spec.name, combine_name(spec))[: 2 if spec.split_kv else 1])


@functools.lru_cache(maxsize=256)
def _backward_spec(forward_spec: ForwardSpec) -> BackwardSpec:
    return BackwardSpec.of(forward_spec, gpu_family())


@functools.lru_cache(maxsize=256)
def _backward_kernels(spec: BackwardSpec, backend: Backend) -> tuple[Kernel, ...]:
    library = backend.compile(backward_source(spec))
    return tuple(getattr(library, name) for name in backward_kernel_names(spec))


def forward_launch(p: AttentionProblem, backend_name: str) -> ForwardLaunch:
    launch = decode.plan(p, _backend(p, backend_name))  # short queries: the vector kernels
    if launch is not None:
        return launch
    spec = _spec(p)
    tiles = spec.tiles
    packed = packed_heads(p.max_seqlen_q, p.nheads, p.nheads_k, tiles.block_q)
    query_blocks = -(-p.max_seqlen_q * packed // tiles.block_q)
    head_groups = p.nheads // packed
    threadgroups = query_blocks * head_groups * p.batch
    splits = key_splits(threadgroups, -(-p.max_seqlen_k // tiles.block_k), gpu_cores(),
                        p.num_splits) if threadgroups else 1  # no query rows: nothing to split
    if splits > 1:
        spec = _spec(p, split_kv=True)
    lse_shape = (p.nheads, p.q.shape[0]) if p.is_varlen else (p.batch, p.nheads, p.q.shape[1])
    ints, floats = _launch_arguments(p, contiguous_strides(p.q.shape), contiguous_strides(lse_shape),
                                     packed_heads=packed, splits=splits)
    kernels = _forward_kernels(spec, _backend(p, backend_name))
    steps = [(kernels[0], [query_blocks * splits * tiles.threads, head_groups, p.batch], [tiles.threads, 1, 1])]
    if splits == 1:
        return ForwardLaunch(steps, ints, floats, lse_shape, p.is_varlen)
    steps.append((kernels[1], *decode_combine.combine_grid(p.max_seqlen_q, p.nheads, p.batch)))
    return ForwardLaunch(steps, ints, floats, lse_shape, p.is_varlen,
                         partial_rows=splits * p.batch * p.nheads * p.max_seqlen_q,
                         partial_cols=spec.head_dim)


def forward(p: AttentionProblem, backend_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, lse, stats): stats are what `backward` reads (ForwardLaunch)."""
    return forward_launch(p, backend_name)(p.q, p.k, p.v, side_buffers(p))


def stats_from_lse(lse: torch.Tensor) -> torch.Tensor:
    """The backward's statistics (row maximum, log2 of the row sum; log2 units) that make P = exp(S - lse) from a
    natural-log LSE alone: (lse log2 e, 0), and (0, 0) for rows that saw no key (lse = +inf). Exact statistics
    come from the forward itself (ForwardLaunch); these lose log2 l's bits where |lse| is large."""
    m = torch.where(torch.isinf(lse), 0.0, lse * LOG2E)
    return torch.stack((m, torch.zeros_like(m)), dim=-1).float()


def backward(p: AttentionProblem, out: torch.Tensor, stats: torch.Tensor, dout: torch.Tensor,
             backend_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv for the gradient `dout` of `out` (P is recomputed from the forward's `stats`; nothing N x N is
    stored)."""
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    forward_spec = _spec(p)
    vec = load_vec((dout,), forward_spec.vec)
    if vec != forward_spec.vec:
        forward_spec = dataclasses.replace(forward_spec, vec=vec)
    spec = _backward_spec(forward_spec)
    # A varlen call's rows past the last sequence get zero gradients: no threadgroup writes them.
    allocate = torch.zeros if p.is_varlen else torch.empty
    dq, dk, dv = (allocate(t.shape, dtype=t.dtype, device=t.device) for t in (p.q, p.k, p.v))
    row_sums = stats.new_empty(stats.shape[:-1])  # D = rowsum(dO * O)
    ints, floats = _launch_arguments(p, out.stride(), contiguous_strides(row_sums.shape), packed_heads=1, splits=1)
    for t in (dout, dq, dk, dv):
        ints += row_strides(t.stride(), p.is_varlen)
    floats += [p.softmax_scale, 1.0 / p.softcap if p.softcap > 0 else 0.0]
    preprocess, dq_kernel, *dkdv_kernels = _backward_kernels(spec, _backend(p, backend_name))
    args = (p.q, p.k, p.v, out, dout, stats, row_sums, dq, dk, dv, ints, floats, *side_buffers(p))
    rows = -(-p.max_seqlen_q // PREPROCESS_ROWS)  # a SIMD group per query row
    preprocess(*args, threads=[rows * 32 * PREPROCESS_ROWS, p.nheads, p.batch], group_size=[32 * PREPROCESS_ROWS, 1, 1])
    t = spec.dq
    dq_kernel(*args, threads=[-(-p.max_seqlen_q // t.block_q) * t.threads, p.nheads, p.batch],
              group_size=[t.threads, 1, 1])
    t = spec.dkdv
    for kernel in dkdv_kernels:
        kernel(*args, threads=[-(-p.max_seqlen_k // t.block_q) * t.threads, p.nheads_k, p.batch],
               group_size=[t.threads, 1, 1])
    return dq, dk, dv
