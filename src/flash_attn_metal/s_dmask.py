"""flash-attn's S_dmask, the third value of `return_attn_probs=True` with dropout, built in PyTorch from the
call's problem and its dropout seed and offset (N x N by nature; for testing, as flash-attn says of it).

flash-attn 2.8's layout and convention, which its tests decode with `convert_flash_attn_S_to_softmax`,
`normalize_flash_attn_S` and `get_dropout_fraction` (docs/dropout.md):
- shape (batch, nheads, round128(max_seqlen_q), round128(max_seqlen_k)) in q's dtype; sequence b's elements sit
  at [b, :, :seqlen_q_b, :seqlen_k_b] (varlen: positions within the sequence); everything else is 0;
- element (i, j) is exp(s_ij - m_i(j)): the unnormalised probability as the CUDA forward held it when it reached
  key block j // n. That kernel walks the key blocks from last to first, so m_i(j) is the max of row i's scores
  over key blocks j // n .. last, n = `block_size_n(head_dim, is_dropout=True, is_causal)`. s is the score the
  softmax sees (softmax_scale, ALiBi; -inf where masked, which gives 0);
- the element is negated where dropout dropped it (the kernels' mask, kernels/dropout.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .kernels import dropout
from .problem import AttentionProblem
from .reference import CHUNK_ELEMENTS, round128


def block_size_n(head_dim: int, is_dropout: bool, is_causal: bool) -> int:
    """Keys per block of flash-attn 2.8's CUDA forward on A100/H100 (sm80/sm90), as its
    `_get_block_size_n` returns them: the blocks of S_dmask's running max."""
    if not 0 < head_dim <= 256:
        raise ValueError(f"head_dim must be in 1..256, got {head_dim}")
    if head_dim <= 32:
        return 128
    if head_dim <= 64:
        return 64 if is_dropout else 128
    if head_dim <= 96:
        return 64
    if head_dim <= 128:
        return 32 if is_dropout else 64
    return 64


def build(problem: AttentionProblem) -> Tensor:
    """S_dmask of a dropout problem (padded or varlen) whose `dropout_rng` is set."""
    p = problem
    if p.dropout_rng is None or p.dropout_p <= 0 or p.kv_cache is not None:
        raise ValueError("S_dmask needs a padded or varlen problem with dropout and its (seed, offset)")
    s_dmask = p.q.new_zeros((p.batch, p.nheads, round128(p.max_seqlen_q), round128(p.max_seqlen_k)))
    if not p.is_varlen:
        _fill(s_dmask, p, p.q, p.k, range(p.batch))
        return s_dmask
    cu_q, cu_k = p.cu_seqlens_q.tolist(), p.cu_seqlens_k.tolist()
    for b in range(p.batch):
        q, k = p.q[cu_q[b] : cu_q[b + 1]], p.k[cu_k[b] : cu_k[b + 1]]
        _fill(s_dmask, p, q.unsqueeze(0), k.unsqueeze(0), [b])
    return s_dmask


@torch.no_grad()
def _fill(s_dmask: Tensor, p: AttentionProblem, q: Tensor, k: Tensor, batches) -> None:
    """Write S_dmask[batches, :, :sq, :sk] for q (len(batches), sq, h, d) and k (len(batches), sk, hk, d), in
    chunks of query rows (one chunk holds its (rows x sk) scores)."""
    b, sq, h, _ = q.shape
    sk = k.shape[1]
    if sq == 0 or sk == 0:
        return
    seed, offset = p.dropout_rng
    n = block_size_n(p.head_dim, True, p.causal)
    blocks = -(-sk // n)
    index = torch.as_tensor(list(batches), device=q.device)
    kf = k.float().repeat_interleave(h // k.shape[2], dim=2)  # query head i reads K/V head i // group
    cols = torch.arange(sk, device=q.device)
    slopes = None
    if p.alibi_slopes is not None:
        slopes = p.alibi_slopes.float().expand(p.batch, h) if p.alibi_slopes.dim() == 1 else p.alibi_slopes.float()
        slopes = slopes[index].view(b, h, 1, 1)
    chunk = max(1, CHUNK_ELEMENTS // max(1, b * h * sk))
    for start in range(0, sq, chunk):
        rows = torch.arange(start, min(sq, start + chunk), device=q.device)
        scores = torch.einsum("bihd,bjhd->bhij", q[:, start : start + chunk].float(), kf) * p.softmax_scale
        if p.softcap > 0:
            scores = torch.tanh(scores / p.softcap) * p.softcap
        diagonal = rows[:, None] + (sk - sq)  # bottom-right aligned: the key facing each row
        if slopes is not None:
            scores = scores - slopes * (diagonal - cols).abs().float()
        visible = torch.ones(len(rows), sk, dtype=torch.bool, device=q.device)
        if p.window_left >= 0:
            visible &= cols >= diagonal - p.window_left
        if p.window_right >= 0:
            visible &= cols <= diagonal + p.window_right
        scores = scores.masked_fill(~visible, -math.inf)
        # The running max over key blocks j // n .. last: block maxima, accumulated from the right.
        padded = torch.nn.functional.pad(scores, (0, blocks * n - sk), value=-math.inf)
        block_max = padded.view(b, h, len(rows), blocks, n).amax(-1)
        running = block_max.flip(-1).cummax(-1).values.flip(-1).repeat_interleave(n, dim=-1)[..., :sk]
        probs = torch.exp(scores - running.masked_fill(torch.isneginf(running), 0.0))
        kept = dropout.keep_grid(seed, offset, p.dropout_p, h, batches, range(start, start + len(rows)), sk, q.device)
        s_dmask[index, :, start : start + len(rows), :sk] = torch.where(kept, probs, -probs).to(s_dmask.dtype)
