"""A planned forward launch: the kernels with their packed arguments and grids, replayable on new tensors; and the
run-time arguments every forward family packs the same way.

dispatch.py plans one per call (and `fastpath` keeps it for repeated calls); any kernel family (the block
forward, split-KV with its combine kernel, the decode kernels) describes its launch with this one class, and
starts its `ints` with `sequence_ints` (msl.locate_sequence reads them) and its `floats` with `score_floats`.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..problem import AttentionProblem
from ..runtime.backend import Kernel

LOG2E = math.log2(math.e)

# The first run-time integer arguments of every forward family's `ints` buffer, in order: lengths, the (batch,
# row, head) element strides of q, k, v and out, lse's (batch, head) strides, the window, ALiBi's batch stride,
# and a paged kv cache's rows per block and block-table row stride.
SEQUENCE_INT_ARGS = (
    "SEQLEN_Q", "SEQLEN_K", "HEAD_DIM_REAL", "KV_GROUP",
    "Q_BATCH", "Q_ROW", "Q_HEAD", "K_BATCH", "K_ROW", "K_HEAD", "V_BATCH", "V_ROW", "V_HEAD",
    "O_BATCH", "O_ROW", "O_HEAD", "LSE_BATCH", "LSE_HEAD", "WINDOW_LEFT", "WINDOW_RIGHT", "ALIBI_BATCH",
    "PAGE_SIZE", "TABLE_STRIDE",
)
# SCORE_SCALE multiplies q.k (softmax_scale * log2(e), or softmax_scale / softcap before the tanh); SOFTCAP_LOG2 =
# softcap * log2(e) multiplies the tanh.
SCORE_FLOAT_ARGS = ("SCORE_SCALE", "SOFTCAP_LOG2")


def sequence_ints(p: AttentionProblem, out_strides: Sequence[int], lse_strides: Sequence[int]) -> list[int]:
    """The SEQUENCE_INT_ARGS of a call whose out and lse have these strides."""
    varlen = p.is_varlen
    alibi = p.alibi_slopes
    return [
        0 if varlen else p.q.shape[1], 0 if varlen else p.k.shape[1], p.head_dim, p.nheads // p.nheads_k,
        *row_strides(p.q.stride(), varlen), *row_strides(p.k.stride(), varlen), *row_strides(p.v.stride(), varlen),
        *row_strides(out_strides, varlen), *([0, lse_strides[0]] if varlen else lse_strides[:2]),
        *windows(p), alibi.shape[-1] if alibi is not None and alibi.dim() == 2 else 0, *_paging(p),
    ]


def score_floats(p: AttentionProblem) -> list[float]:
    """SCORE_FLOAT_ARGS."""
    return [p.softmax_scale / p.softcap if p.softcap > 0 else p.softmax_scale * LOG2E, p.softcap * LOG2E]


def windows(p: AttentionProblem) -> tuple[int, int]:
    """The window as the kernels take it, -1 where unbounded: a side at least as long as any query and key sequence
    together lets every row see every key in either alignment (and keeps the kernels' 32-bit mask arithmetic in
    range)."""
    longest = p.max_seqlen_q + p.max_seqlen_k
    return tuple(-1 if w < 0 or w >= longest else w for w in (p.window_left, p.window_right))  # type: ignore[return-value]


def row_strides(strides: Sequence[int], varlen: bool) -> list[int]:
    """(batch, row, head) element strides; varlen tensors have no batch dimension. A kv cache's "batch" is its
    slot or block."""
    return [0, strides[0], strides[1]] if varlen else [strides[0], strides[1], strides[2]]


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _paging(p: AttentionProblem) -> list[int]:
    """PAGE_SIZE and TABLE_STRIDE: a paged cache's rows per block and its block table's row stride."""
    if p.kv_cache is None or not p.kv_cache.paged:
        return [0, 0]
    return [p.k.shape[1], p.kv_cache.block_table.shape[1]]  # dispatch.side_buffers makes the table contiguous


class ForwardLaunch:
    """One forward call with everything but its tensors decided: the kernels, their packed arguments and grids.

    Calling it on q, k, v (and the side buffers) of the shapes, strides, dtype and device it was planned for
    allocates out (contiguous, as ops' fake allocates it), lse, the backward's statistics (lse's shape + (2,): the
    row maximum and log2 of the row sum, in log2 units) and any split-KV partial outputs, and encodes the kernels in
    order. `steps` are (kernel, threads, group_size); a split-KV call has two, the forward writing fp32 partials of
    `partial_rows` x `partial_cols` in decode_combine.py's layout and the combine kernel merging them.

    A varlen call's query rows past cu_seqlens_q[-1] belong to no sequence and no threadgroup writes them, so its
    outputs start as those rows must end: out 0, LSE +inf, statistics (0, 0)."""

    __slots__ = ("steps", "ints", "floats", "lse_shape", "varlen", "partial_rows", "partial_cols")

    def __init__(self, steps: list[tuple[Kernel, list[int], list[int]]], ints: list[int], floats: list[float],
                 lse_shape: tuple[int, ...], varlen: bool, partial_rows: int = 0, partial_cols: int = 0) -> None:
        self.steps, self.ints, self.floats, self.lse_shape, self.varlen = steps, ints, floats, lse_shape, varlen
        self.partial_rows, self.partial_cols = partial_rows, partial_cols

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 extra: Sequence[torch.Tensor] = ()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(out, lse, stats)."""
        if self.varlen:
            out = torch.zeros_like(q, memory_format=torch.contiguous_format)
            lse = q.new_full(self.lse_shape, math.inf, dtype=torch.float32)
            stats = q.new_zeros((*self.lse_shape, 2), dtype=torch.float32)
        else:
            out = torch.empty_like(q, memory_format=torch.contiguous_format)
            lse = q.new_empty(self.lse_shape, dtype=torch.float32)
            stats = q.new_empty((*self.lse_shape, 2), dtype=torch.float32)
        if self.partial_rows:
            o_partial = q.new_empty((self.partial_rows, self.partial_cols), dtype=torch.float32)
            lse_partial = q.new_empty((self.partial_rows,), dtype=torch.float32)
            args = (q, k, v, o_partial, lse_partial, self.ints, self.floats, *extra, out, lse, stats)
        else:
            args = (q, k, v, out, lse, stats, self.ints, self.floats, *extra)
        for kernel, threads, group_size in self.steps:
            kernel(*args, threads=threads, group_size=group_size)
        return out, lse, stats
