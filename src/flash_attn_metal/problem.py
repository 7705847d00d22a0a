"""The normalised attention call that routing hands to a backend (kernels or reference).

The public functions in `interface` validate user input and build one `AttentionProblem`; everything
below them (the reference, the kernel dispatch) reads only this.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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

    `attn_mask` (padded layout only; torch SDPA's): bool, True where a key takes part, or float (float32 or q's
    dtype, as torch's SDPA accepts), added to the scores after scale and softcap. It is a 4-D strided view of the
    caller's mask broadcast to (b, h, sq, sk), stride 0 on broadcast dimensions, indexed [batch, query head,
    query row, key]; it takes no gradient.
    `sinks`: fp32 (h,) per-head sink logits, in the units of the (scaled, softcapped, biased, masked) scores. Each
    joins its head's softmax denominator and carries no value (gpt-oss, MLX): p_ij = exp(s_ij) / (exp(sink_h)
    + sum_j exp(s_ij)). The lse includes it, so P = exp(s - lse) holds unchanged (the backward needs nothing
    more), and a row with no key has out = 0 and lse = sink_h.
    `top_left`: causal/local windows and ALiBi distances are measured from the top-left diagonal (query i sits at
    key i, torch SDPA's is_causal) instead of flash-attn's bottom-right (query i sits at key i + sk - sq).
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
    attn_mask: torch.Tensor | None = None  # bool or float, (b, h, sq, sk) view; padded layout only
    sinks: torch.Tensor | None = None  # fp32 (h,)
    top_left: bool = False

    def with_dropout_rng(self, generator: torch.Generator | None = None) -> AttentionProblem:
        """This problem with its dropout's (seed, offset) drawn from `generator` (kernels/dropout.py) if it drops
        and has none yet; otherwise this problem."""
        if self.dropout_p <= 0 or self.dropout_rng is not None:
            return self
        from .kernels import dropout  # only for dropout: importing the package stays light

        return replace(self, dropout_rng=dropout.draw_seed_offset(generator))

    @property
    def top_left_matters(self) -> bool:
        """Whether top-left alignment changes what any query sees: a causal/local window (or ALiBi) with some
        sequence whose seqlen_q differs from its seqlen_k (assumed for varlen and kv-cache layouts)."""
        if not self.top_left:
            return False
        windowed = self.window_left >= 0 or self.window_right >= 0 or self.alibi_slopes is not None
        uneven = self.is_varlen or self.kv_cache is not None or self.q.shape[1] != self.k.shape[1]
        return windowed and uneven

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
