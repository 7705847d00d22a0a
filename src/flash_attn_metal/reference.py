"""Pure-PyTorch attention with flash-attn 2.x's exact semantics: the fallback path and every test's oracle.

    out, lse = attention(problem)                       # an AttentionProblem (padded or varlen)
    out, lse, probs = attention(problem, return_probs=True, generator=g)

Semantics (flash-attn 2.8):
- scores = q @ k^T * softmax_scale; with softcap > 0, scores = softcap * tanh(scores / softcap);
- ALiBi adds -slope * |i + sk - sq - j| (slopes (h,) or (b, h), fp32);
- causal and local masks are aligned bottom-right: query i keeps key j iff
  i + sk - sq - window_left <= j <= i + sk - sq + window_right (a window side of -1 is unbounded; causal
  sets window_right = 0), with sq and sk each sequence's own lengths;
- a fully masked row (or seqlen_k == 0) gives out = 0 and lse = +inf;
- dropout drops probabilities with probability p and scales the rest by 1/(1-p);
- GQA/MQA: query head h reads kv head h // (nheads / nheads_k);
- lse is the natural-log logsumexp of the (scaled, softcapped, biased) scores, fp32, (b, h, sq) padded or
  (h, total_q) varlen.

Memory stays O(chunk x sk): queries are processed in chunks, and under autograd each chunk is recomputed in
backward (activation checkpointing) instead of keeping its score matrix. `upcast=False` computes in the
inputs' dtype, which is the "plain low-precision PyTorch" baseline of the upstream tolerance rule.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from .problem import AttentionProblem

# Score elements per chunk (b * h * chunk * sk): 2^24 fp32 values, 64 MiB.
CHUNK_ELEMENTS = 1 << 24


def attention(
    problem: AttentionProblem,
    *,
    upcast: bool = True,
    return_probs: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, ...]:
    """Return (out, lse), or (out, lse, probs) with `return_probs` (probs shaped as flash-attn's S_dmask:
    (b, h, round128(sq), round128(sk)), negative where dropout dropped)."""
    p = problem
    if not p.is_varlen:
        out, lse, probs = _padded(p.q, p.k, p.v, p, None, upcast, return_probs, generator)
        return (out, lse, probs) if return_probs else (out, lse)
    cu_q, cu_k = p.cu_seqlens_q.tolist(), p.cu_seqlens_k.tolist()
    outs, lses, all_probs = [], [], []
    for b in range(p.batch):
        q = p.q[cu_q[b] : cu_q[b + 1]].unsqueeze(0)
        k = p.k[cu_k[b] : cu_k[b + 1]].unsqueeze(0)
        v = p.v[cu_k[b] : cu_k[b + 1]].unsqueeze(0)
        out, lse, probs = _padded(q, k, v, p, b, upcast, return_probs, generator)
        outs.append(out[0])
        lses.append(lse[0])
        all_probs.append(probs)
    out = torch.cat(outs) if outs else p.q.new_zeros(p.q.shape)
    lse = torch.cat(lses, dim=-1) if lses else p.q.new_zeros((p.nheads, 0), dtype=torch.float32)
    if not return_probs:
        return out, lse
    rows, cols = _round128(p.max_seqlen_q), _round128(p.max_seqlen_k)
    probs = p.q.new_zeros((p.batch, p.nheads, rows, cols))
    for b, pr in enumerate(all_probs):
        probs[b, :, : pr.shape[2], : pr.shape[3]] = pr[0, :, : pr.shape[2], : pr.shape[3]]
    return out, lse, probs


def _round128(n: int) -> int:
    return (n + 127) // 128 * 128


def _padded(q, k, v, p: AttentionProblem, batch_index: int | None, upcast: bool, return_probs: bool, generator):
    """q (b, sq, h, d), k/v (b, sk, hk, d) -> out (b, sq, h, d), lse (b, h, sq), probs or None."""
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    compute = torch.float32 if upcast else q.dtype
    slopes = _alibi_slopes(p, b, batch_index, q.device)
    if sk == 0 or sq == 0:
        out = q.new_zeros(q.shape)
        lse = torch.full((b, h, sq), math.inf, dtype=torch.float32, device=q.device)
        probs = q.new_zeros((b, h, _round128(sq), _round128(sk))) if return_probs else None
        return out, lse, probs
    chunk = max(1, min(sq, CHUNK_ELEMENTS // max(1, b * h * sk)))
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    outs, lses, all_probs = [], [], []
    for start in range(0, sq, chunk):
        rows = torch.arange(start, min(sq, start + chunk), device=q.device)
        q_chunk = q[:, start : start + chunk]
        dropout_keep = _dropout_keep(p.dropout_p, (b, h, len(rows), sk), q.device, generator)
        args = (q_chunk, k, v, rows, sq, slopes, p, compute, dropout_keep)
        if needs_grad and not return_probs:
            out, lse, _ = checkpoint(_chunk_forward, *args, use_reentrant=False)
        else:
            out, lse, probs = _chunk_forward(*args, with_probs=return_probs)
            all_probs.append(probs)
        outs.append(out)
        lses.append(lse)
    out = torch.cat(outs, dim=1).to(q.dtype)
    lse = torch.cat(lses, dim=2)
    probs = None
    if return_probs:
        probs = q.new_zeros((b, h, _round128(sq), _round128(sk)))
        probs[:, :, :sq, :sk] = torch.cat(all_probs, dim=2).to(q.dtype)
    return out, lse, probs


def _chunk_forward(q, k, v, rows, sq, slopes, p: AttentionProblem, compute, dropout_keep, with_probs=False):
    b, c, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    group = h // hk
    # (b, hk, group, c, d) x (b, hk, 1, d, sk): GQA without repeating K/V.
    qg = q.to(compute).reshape(b, c, hk, group, d).permute(0, 2, 3, 1, 4)
    kg = k.to(compute).permute(0, 2, 3, 1).unsqueeze(2)
    vg = v.to(compute).permute(0, 2, 1, 3).unsqueeze(2)
    scores = (qg @ kg) * p.softmax_scale
    if p.softcap > 0:
        scores = torch.tanh(scores / p.softcap) * p.softcap
    cols = torch.arange(sk, device=q.device)
    shifted = rows[:, None] + (sk - sq)  # bottom-right alignment
    if slopes is not None:
        distance = (shifted - cols[None, :]).abs().to(compute)
        scores = scores - slopes.to(compute).view(b, hk, group, 1, 1) * distance
    keep = torch.ones(len(rows), sk, dtype=torch.bool, device=q.device)
    if p.window_left >= 0:
        keep &= cols[None, :] >= shifted - p.window_left
    if p.window_right >= 0:
        keep &= cols[None, :] <= shifted + p.window_right
    scores = scores.masked_fill(~keep, -math.inf)
    lse = torch.logsumexp(scores.float(), dim=-1)  # -inf where fully masked
    empty = torch.isneginf(lse)
    probs = torch.exp(scores.float() - lse.masked_fill(empty, 0.0).unsqueeze(-1)).to(compute)
    if dropout_keep is not None:
        keep_mask = dropout_keep.view(b, hk, group, c, sk)
        probs_out = probs * keep_mask / (1.0 - p.dropout_p)
    else:
        probs_out = probs
    out = probs_out @ vg  # (b, hk, group, c, d)
    out = out.permute(0, 3, 1, 2, 4).reshape(b, c, h, d)
    lse = lse.masked_fill(empty, math.inf).reshape(b, h, c)
    if not with_probs:
        return out, lse, None
    signed = probs if dropout_keep is None else torch.where(dropout_keep.view_as(probs), probs, -probs)
    return out, lse, signed.reshape(b, h, c, sk)


def _dropout_keep(p_drop: float, shape, device, generator) -> torch.Tensor | None:
    if p_drop <= 0:
        return None
    return torch.rand(shape, device=device, generator=generator) >= p_drop


def _alibi_slopes(p: AttentionProblem, b: int, batch_index: int | None, device) -> torch.Tensor | None:
    """Slopes as (b, h) fp32 for this call (varlen passes one sequence at a time)."""
    if p.alibi_slopes is None:
        return None
    slopes = p.alibi_slopes.to(device=device, dtype=torch.float32)
    if slopes.dim() == 1:
        return slopes.expand(b, -1)
    return slopes[batch_index : batch_index + 1] if batch_index is not None else slopes


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the first rotary_dim = 2 * cos.shape[1] features of x (b, s, h, d) at `positions` (b, s).

    Interleaved pairs features (0, 1), (2, 3), ...; otherwise (GPT-NeoX) pairs (i, i + rotary_dim / 2).
    """
    rotary_dim = 2 * cos.shape[1]
    c = cos[positions].unsqueeze(2).to(torch.float32)  # (b, s, 1, rotary_dim / 2)
    s = sin[positions].unsqueeze(2).to(torch.float32)
    xr = x[..., :rotary_dim].to(torch.float32)
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rotated = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = xr.chunk(2, dim=-1)
        rotated = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., rotary_dim:]), dim=-1)


def plain_attention(q, k, v, **kwargs) -> torch.Tensor:
    """Padded-layout convenience for tests and tools: `attention` on a fresh AttentionProblem."""
    problem = AttentionProblem(
        q=q, k=k, v=v,
        softmax_scale=kwargs.get("softmax_scale") or q.shape[-1] ** -0.5,
        causal=kwargs.get("causal", False),
        window_left=kwargs.get("window_left", -1),
        window_right=0 if kwargs.get("causal", False) else kwargs.get("window_right", -1),
        softcap=kwargs.get("softcap", 0.0),
        alibi_slopes=kwargs.get("alibi_slopes"),
        dropout_p=0.0,
    )
    return attention(problem, upcast=kwargs.get("upcast", True))[0]
