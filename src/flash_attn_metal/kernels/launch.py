"""A planned forward launch: the kernels with their packed arguments and grids, replayable on new tensors.

dispatch.py plans one per call (and `fastpath` keeps it for repeated calls); any kernel family (the block
forward, split-KV with its combine kernel, the decode kernels) describes its launch with this one class.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..runtime.backend import Kernel


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
