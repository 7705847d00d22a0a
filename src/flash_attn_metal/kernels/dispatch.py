"""What routing calls to run an `AttentionProblem` on the Metal kernels.

    unsupported_reason(problem, needs_grad) -> str | None   # None: the kernels run it
    forward(problem, backend_name) -> (out, lse)            # backend_name: "mps" or "emulator"
    forward_launch(problem, backend_name) -> ForwardLaunch  # the same launch, replayable on other tensors
    side_buffers(problem) -> [tensor]                       # what a launch takes after q, k, v
    backward(problem, out, lse, dout, backend_name) -> (dq, dk, dv)
"""

from __future__ import annotations

import functools
import math

import torch

from ..problem import AttentionProblem
from ..runtime.backend import Backend, Kernel, get_backend
from ..runtime.device import gpu_cores, gpu_family
from .backward import backward_source
from .backward import kernel_names as backward_kernel_names
from .forward import FLOAT_ARGS, INT_ARGS, combine_name, forward_source
from .msl import side_buffer_names
from .launch import ForwardLaunch
from .spec import MSL_TYPES, ForwardSpec
from .tiles import key_splits, packed_heads

LOG2E = math.log2(math.e)
PREPROCESS_THREADS = 128  # one thread per query row
COMBINE_THREADS = 64  # split-KV combine: one thread per (query row, head)


def native_features() -> str:
    return ("forward and backward in fp16/bf16/fp32, head dims up to 256, causal and local masks, softcap, "
            "ALiBi, GQA/MQA, varlen, kv caches (dense and paged, read in place), strided inputs; dropout runs "
            "the PyTorch reference")


def unsupported_reason(problem: AttentionProblem, needs_grad: bool) -> str | None:
    if problem.q.device.type == "mps" and gpu_family() is None:
        return "the Metal device is not Apple silicon (the kernels need simdgroup_matrix: Apple7/M1 or newer)"
    if problem.dropout_p > 0:
        return "dropout runs on the PyTorch reference"
    return None


@functools.lru_cache(maxsize=1024)
def _cached_spec(dtype: torch.dtype, head_dim: int, varlen: bool, masked: bool, softcap: bool,
                 alibi: bool, kv_cache: str, split_kv: bool) -> ForwardSpec:
    return ForwardSpec.for_call(MSL_TYPES[str(dtype).removeprefix("torch.")], head_dim, gpu_family(),
                                varlen=varlen, masked=masked, softcap=softcap, alibi=alibi, kv_cache=kv_cache,
                                split_kv=split_kv)


def _spec(p: AttentionProblem, split_kv: bool = False) -> ForwardSpec:
    cache = "" if p.kv_cache is None else "paged" if p.kv_cache.paged else "dense"
    return _cached_spec(p.q.dtype, p.head_dim, p.is_varlen, p.window_left >= 0 or p.window_right >= 0,
                        p.softcap > 0, p.alibi_slopes is not None, cache, split_kv)


def _strides(strides: tuple[int, ...], varlen: bool) -> list[int]:
    """(batch, row, head) element strides; varlen tensors have no batch dimension."""
    return [0, strides[0], strides[1]] if varlen else [strides[0], strides[1], strides[2]]


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _launch_arguments(p: AttentionProblem, out_strides: tuple[int, ...], lse_strides: tuple[int, ...], *,
                      packed_heads: int, splits: int) -> tuple[list[int], list[float]]:
    """The forward's int and float arguments (kernels/forward.py INT_ARGS and FLOAT_ARGS order)."""
    varlen = p.is_varlen
    alibi = p.alibi_slopes
    ints = [
        0 if varlen else p.q.shape[1], 0 if varlen else p.k.shape[1], p.head_dim, p.nheads // p.nheads_k,
        *_strides(p.q.stride(), varlen), *_strides(p.k.stride(), varlen), *_strides(p.v.stride(), varlen),
        *_strides(out_strides, varlen), *([0, lse_strides[0]] if varlen else lse_strides[:2]),
        p.window_left, p.window_right, alibi.shape[-1] if alibi is not None and alibi.dim() == 2 else 0,
        *_paging(p), packed_heads, splits, p.nheads, p.max_seqlen_q, p.batch * p.nheads * p.max_seqlen_q,
    ]
    score_scale = p.softmax_scale / p.softcap if p.softcap > 0 else p.softmax_scale * LOG2E
    floats = [score_scale, p.softcap * LOG2E]
    assert len(ints) == len(INT_ARGS) and len(floats) == len(FLOAT_ARGS)
    return ints, floats


def _paging(p: AttentionProblem) -> list[int]:
    """PAGE_SIZE and TABLE_STRIDE: a paged cache's rows per block and its block table's row stride."""
    if p.kv_cache is None or not p.kv_cache.paged:
        return [0, 0]
    return [p.k.shape[1], p.kv_cache.block_table.shape[1]]  # side_buffers makes the table contiguous


def side_buffers(p: AttentionProblem) -> list[torch.Tensor]:
    """The spec's side buffers (cu_seqlens, the kv cache's per-sequence rows, ALiBi slopes) in its order, dense:
    a buffer binds storage without strides, and these are tiny."""
    tensors = {"cu_seqlens_q": p.cu_seqlens_q, "cu_seqlens_k": p.cu_seqlens_k, "alibi_slopes": p.alibi_slopes}
    if p.kv_cache is not None:
        c = p.kv_cache
        tensors.update(cache_seqlens=c.seqlens, cache_leftpad=c.leftpad, cache_batch_idx=c.batch_idx,
                       block_table=c.block_table)
    return [tensors[name].contiguous() for name in side_buffer_names(_spec(p))]


def _backend(p: AttentionProblem, backend_name: str) -> Backend:
    return get_backend("mps" if backend_name == "mps" else ("cuda-emulator" if p.q.is_cuda else "emulator"))


@functools.lru_cache(maxsize=256)
def _forward_kernels(spec: ForwardSpec, backend: Backend) -> tuple[Kernel, ...]:
    """The compiled forward kernel of a spec, and a split-KV spec's combine kernel (generated and looked up once
    per process and backend)."""
    library = backend.compile(forward_source(spec))
    return tuple(getattr(library, name) for name in (spec.name, combine_name(spec))[: 2 if spec.split_kv else 1])


@functools.lru_cache(maxsize=256)
def _backward_kernels(spec: ForwardSpec, backend: Backend):
    library = backend.compile(backward_source(spec))
    return tuple(getattr(library, name) for name in backward_kernel_names(spec))


def forward_launch(p: AttentionProblem, backend_name: str) -> ForwardLaunch:
    tiles = _spec(p).tiles
    packed = packed_heads(p.max_seqlen_q, p.nheads, p.nheads_k, tiles.block_q)
    query_blocks = -(-p.max_seqlen_q * packed // tiles.block_q)
    head_groups = p.nheads // packed
    threadgroups = query_blocks * head_groups * p.batch
    splits = key_splits(threadgroups, -(-p.max_seqlen_k // tiles.block_k), gpu_cores(),
                        p.num_splits) if threadgroups else 1  # no query rows: nothing to split
    spec = _spec(p, split_kv=splits > 1)
    lse_shape = (p.nheads, p.q.shape[0]) if p.is_varlen else (p.batch, p.nheads, p.q.shape[1])
    ints, floats = _launch_arguments(p, _contiguous_strides(p.q.shape), _contiguous_strides(lse_shape),
                                     packed_heads=packed, splits=splits)
    kernels = _forward_kernels(spec, _backend(p, backend_name))
    steps = [(kernels[0], [query_blocks * splits * tiles.threads, head_groups, p.batch], [tiles.threads, 1, 1])]
    if splits == 1:
        return ForwardLaunch(steps, ints, floats, lse_shape)
    rows = COMBINE_THREADS * -(-p.max_seqlen_q // COMBINE_THREADS)
    steps.append((kernels[1], [rows, p.nheads, p.batch], [COMBINE_THREADS, 1, 1]))
    return ForwardLaunch(steps, ints, floats, lse_shape, partial_rows=splits * p.batch * p.nheads * p.max_seqlen_q,
                         partial_cols=spec.head_dim)


def forward(p: AttentionProblem, backend_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    return forward_launch(p, backend_name)(p.q, p.k, p.v, side_buffers(p))


def backward(p: AttentionProblem, out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
             backend_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv for the gradient `dout` of `out` (P is recomputed from `lse`; nothing N x N is stored)."""
    spec = _spec(p)
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (p.q, p.k, p.v))
    row_sums = torch.empty_like(lse)  # D = rowsum(dO * O)
    ints, floats = _launch_arguments(p, out.stride(), lse.stride(), packed_heads=1, splits=1)  # neither applies here
    for t in (dout, dq, dk, dv):
        ints += _strides(t.stride(), p.is_varlen)
    floats += [p.softmax_scale, 1.0 / p.softcap if p.softcap > 0 else 0.0]
    preprocess, dq_kernel, dkdv_kernel = _backward_kernels(spec, _backend(p, backend_name))
    args = (p.q, p.k, p.v, out, dout, lse, row_sums, dq, dk, dv, ints, floats, *side_buffers(p))
    rows = PREPROCESS_THREADS * -(-p.max_seqlen_q // PREPROCESS_THREADS)
    preprocess(*args, threads=[rows, p.nheads, p.batch], group_size=[PREPROCESS_THREADS, 1, 1])
    threads = spec.tiles.threads
    query_blocks = -(-p.max_seqlen_q // spec.block_q)
    dq_kernel(*args, threads=[query_blocks * threads, p.nheads, p.batch], group_size=[threads, 1, 1])
    key_blocks = -(-p.max_seqlen_k // spec.block_q)
    dkdv_kernel(*args, threads=[key_blocks * threads, p.nheads_k, p.batch], group_size=[threads, 1, 1])
    return dq, dk, dv
