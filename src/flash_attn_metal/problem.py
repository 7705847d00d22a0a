"""The normalised attention call that routing hands to a backend (kernels or reference).

The public functions in `interface` validate user input and build one `AttentionProblem`; everything
below them (the reference, the kernel dispatch) reads only this.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVCache:
    """Where each sequence's keys and values sit in a kv cache (`flash_attn_with_kvcache`, after the append).

    Sequence b attends to logical cache rows leftpad[b] .. seqlens[b] - 1. A dense cache (slots, rows, hk, d)
    keeps sequence b in slot batch_idx[b]; a paged cache (blocks, page_size, hk, d) keeps its logical row r in
    block block_table[b, r // page_size], row r % page_size (no leftpad, no batch_idx).
    """

    seqlens: torch.Tensor  # int32 (b,)
    leftpad: torch.Tensor | None  # int32 (b,); dense caches only
    batch_idx: torch.Tensor | None  # int32 (b,); dense caches only
    block_table: torch.Tensor | None  # int32 (b, max_blocks); paged caches only

    @property
    def paged(self) -> bool:
        return self.block_table is not None

    def locate(self, seq: torch.Tensor, row: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cache coordinates (slot or block, row within it) of logical rows `row` of sequences `seq`."""
        if self.paged:
            return self.block_table.long()[seq, row // page_size], row % page_size
        return self.batch_idx.long()[seq], row


@dataclass(frozen=True)
class AttentionProblem:
    """One validated attention call.

    Padded layout: q (b, sq, h, d), k/v (b, sk, hk, d), cu_seqlens_* None.
    Varlen layout: q (total_q, h, d), k/v (total_k, hk, d), cu_seqlens_* int32 (b + 1,).
    KV-cache layout: q (b, sq, h, d), k/v the whole cache, `kv_cache` saying which rows each sequence sees.
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
    kv_cache: KVCache | None = None
    num_splits: int = 0  # key splits of the forward (flash_attn_with_kvcache's knob); 0: the kernels choose
    dropout_rng: tuple[int, int] | None = None  # dropout's (seed, offset), drawn per call (kernels/dropout.py)

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
