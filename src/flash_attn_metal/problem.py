"""The normalised attention call that routing hands to a backend (kernels or reference).

The public functions in `interface` validate user input and build one `AttentionProblem`; everything
below them (the reference, the kernel dispatch) reads only this.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionProblem:
    """One validated attention call.

    Padded layout: q (b, sq, h, d), k/v (b, sk, hk, d), cu_seqlens_* None.
    Varlen layout: q (total_q, h, d), k/v (total_k, hk, d), cu_seqlens_* int32 (b + 1,).
    Only the last dim of q/k/v is guaranteed contiguous. The head dim is the caller's (not padded).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    softmax_scale: float
    causal: bool
    window_left: int  # -1: unbounded on the left
    window_right: int  # -1: unbounded on the right (causal sets 0)
    softcap: float  # 0.0: off
    alibi_slopes: torch.Tensor | None  # fp32 (h,) or (b, h)
    dropout_p: float
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0

    @property
    def is_varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def batch(self) -> int:
        return self.cu_seqlens_q.numel() - 1 if self.is_varlen else self.q.shape[0]

    @property
    def nheads(self) -> int:
        return self.q.shape[-2]

    @property
    def nheads_k(self) -> int:
        return self.k.shape[-2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[-1]
