"""Pure-PyTorch attention with flash-attn 2.x's exact semantics: the fallback path and every test's oracle.

Two entries, both autograd-capable and on any device (cpu, mps, cuda):

    out, lse = attention(problem)                       # an AttentionProblem (padded, varlen or kv cache)
    out, lse, probs = attention(problem, return_probs=True, generator=g)
    out, lse = attention_ref(q, k, v, causal=True, upcast=False, reorder_ops=True)   # plain tensors

Options (keyword-only, on both):
- `upcast=True` computes in fp32 (the "truth"); `upcast=False` computes in the inputs' dtype, which with
  `reorder_ops=True` (scale K instead of the scores) is the "plain low-precision PyTorch" baseline of the
  upstream tolerance rule: |ours - fp32| <= 2 x |baseline - fp32| (+ a small slack), 3 x for gradients;
- `return_probs=True` also returns the attention probabilities (softmax before dropout), shaped like S_dmask
  (b, h, round128(max_seqlen_q), round128(max_seqlen_k)), negative where dropout dropped them (flash-attn's
  S_dmask itself is s_dmask.py's);
- `dropout_mask` (bool, True = kept, laid out like S_dmask: (b, h, >= seqlen_q, >= seqlen_k)) replaces the
  random dropout draw, so a kernel's dropout pattern can be checked; otherwise the pattern is the kernels' own
  (kernels/dropout.py) for the problem's `dropout_rng` (seed, offset), drawn from `generator` when unset.

Semantics (flash-attn 2.8):
- scores = q @ k^T * softmax_scale; with softcap > 0, scores = softcap * tanh(scores / softcap);
- ALiBi adds -slope * |i + sk - sq - j| (slopes (h,) or (b, h), fp32);
- causal and local masks are aligned bottom-right: query i keeps key j iff
  i + sk - sq - window_left <= j <= i + sk - sq + window_right (a window side of -1 is unbounded; causal
  sets window_right = 0), with sq and sk each sequence's own lengths; `top_left` drops the sk - sq offset
  from both the windows and ALiBi (torch SDPA's is_causal);
- `attn_mask` (padded layout, torch SDPA's): a bool mask removes the keys where it is False, a float mask is
  added to the scores;
- `sinks` (h,) join each row's softmax denominator: p_ij = exp(s_ij - lse_i) with
  lse_i = log(exp(sink_h) + sum_j exp(s_ij)); they carry no value and get a gradient;
- a fully masked row (or seqlen_k == 0) gives out = 0 and lse = +inf (lse = sink_h with sinks, +inf where that
  is -inf); a row whose scores are finite, however negative, is not masked: it gets its softmax and a finite lse;
- in varlen, query rows past cu_seqlens_q[-1] belong to no sequence: out = 0, lse = +inf, and zero gradients
  for them (and for key/value rows past cu_seqlens_k[-1]);
- dropout drops probabilities with probability p and scales the rest by 1/(1-p); lse is taken before it;
- GQA/MQA: query head h reads kv head h // (nheads / nheads_k);
- lse is the natural-log logsumexp of the (scaled, softcapped, biased, masked) scores and the sink, fp32,
  (b, h, sq) padded or (h, total_q) varlen; out has q's dtype and shape;
- NaN or inf in the inputs propagates as the arithmetic above makes it.

Memory stays O(chunk x sk): queries are processed in chunks, and under autograd each chunk is recomputed in
backward (activation checkpointing) instead of keeping its score matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .problem import AttentionProblem

# Score elements per chunk (b * h * chunk * sk): 2^24 fp32 values, 64 MiB.
CHUNK_ELEMENTS = 1 << 24


def attention(
    problem: AttentionProblem,
    *,
    upcast: bool = True,
    reorder_ops: bool = False,
    return_probs: bool = False,
    dropout_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, ...]:
    """(out, lse), or (out, lse, probs) with `return_probs`. See the module docstring."""
    p = problem
    if p.attn_mask is not None and (p.is_varlen or p.kv_cache is not None):
        raise ValueError("attn_mask applies to the padded layout only")
    if dropout_mask is None:
        p = p.with_dropout_rng(generator)
    options = _Options(p, upcast, reorder_ops, return_probs, dropout_mask)
    if p.kv_cache is not None:
        outs, lses, all_probs = [], [], []
        for b in range(p.batch):
            k, v = _cache_rows(p, b)
            out, lse, probs = _padded(p.q[b : b + 1], k.unsqueeze(0), v.unsqueeze(0), b, options)
            outs.append(out)
            lses.append(lse)
            all_probs.append(probs)
        out, lse = torch.cat(outs), torch.cat(lses)
        return (out, lse, _stacked_probs(p, all_probs)) if return_probs else (out, lse)
    if not p.is_varlen:
        out, lse, probs = _padded(p.q, p.k, p.v, None, options)
        return (out, lse, probs) if return_probs else (out, lse)
    cu_q, cu_k = p.cu_seqlens_q.tolist(), p.cu_seqlens_k.tolist()
    outs, lses, all_probs = [], [], []
    for b in range(p.batch):
        q = p.q[cu_q[b] : cu_q[b + 1]].unsqueeze(0)
        k = p.k[cu_k[b] : cu_k[b + 1]].unsqueeze(0)
        v = p.v[cu_k[b] : cu_k[b + 1]].unsqueeze(0)
        out, lse, probs = _padded(q, k, v, b, options)
        outs.append(out[0])
        lses.append(lse[0])
        all_probs.append(probs)
    unused = p.q.shape[0] - cu_q[-1]  # query rows after the last sequence
    if unused:
        outs.append(p.q.new_zeros((unused, *p.q.shape[1:])))
        lses.append(torch.full((p.nheads, unused), math.inf, dtype=torch.float32, device=p.q.device))
    out = torch.cat(outs) if outs else p.q.new_zeros(p.q.shape)
    lse = torch.cat(lses, dim=-1) if lses else p.q.new_zeros((p.nheads, 0), dtype=torch.float32)
    return (out, lse, _stacked_probs(p, all_probs)) if return_probs else (out, lse)


def _cache_rows(p: AttentionProblem, b: int) -> tuple[Tensor, Tensor]:
    """The keys and values sequence b of a kv-cache problem attends to, (rows, hk, d) each (see KVCache)."""
    c = p.kv_cache
    rows = torch.arange(0 if c.paged else int(c.leftpad[b]), int(c.seqlens[b]), device=p.k.device)
    at = c.locate(torch.full_like(rows, b), rows, p.k.shape[1])
    return p.k[at], p.v[at]


def _stacked_probs(p: AttentionProblem, per_sequence: list[Tensor]) -> Tensor:
    """Each sequence's S_dmask (1, h, >= sq_b, >= sk_b) in one (b, h, round128(max_sq), round128(max_sk))."""
    probs = p.q.new_zeros((p.batch, p.nheads, round128(p.max_seqlen_q), round128(p.max_seqlen_k)))
    for b, pr in enumerate(per_sequence):
        probs[b, :, : pr.shape[2], : pr.shape[3]] = pr[0]
    return probs


def attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_mask: Tensor | None = None,
    upcast: bool = True,
    reorder_ops: bool = False,
    return_probs: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, ...]:
    """`attention` on plain tensors, unvalidated: q (b, sq, h, d) and k/v (b, sk, hk, d), or with int32
    cu_seqlens_q/cu_seqlens_k (b + 1,), q (total_q, h, d) and k/v (total_k, hk, d). Returns (out, lse) or
    (out, lse, probs), as `attention`."""
    varlen = cu_seqlens_q is not None
    problem = AttentionProblem(
        q=q, k=k, v=v,
        softmax_scale=q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale),
        causal=causal, window_left=int(window_size[0]), window_right=0 if causal else int(window_size[1]),
        softcap=float(softcap), alibi_slopes=alibi_slopes, dropout_p=float(dropout_p),
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=_longest(cu_seqlens_q) if varlen else q.shape[1],
        max_seqlen_k=_longest(cu_seqlens_k) if varlen else k.shape[1],
    )
    return attention(problem, upcast=upcast, reorder_ops=reorder_ops, return_probs=return_probs,
                     dropout_mask=dropout_mask, generator=generator)


def _longest(cu_seqlens: Tensor) -> int:
    return int(cu_seqlens.diff().max()) if cu_seqlens.numel() > 1 else 0


def round128(n: int) -> int:
    """n rounded up to a multiple of 128: S_dmask's padded sequence lengths."""
    return (n + 127) // 128 * 128


@dataclass(frozen=True)
class _Options:
    """What every chunk of one call shares."""

    p: AttentionProblem
    upcast: bool
    reorder_ops: bool
    return_probs: bool
    dropout_mask: Tensor | None


def _padded(q: Tensor, k: Tensor, v: Tensor, batch_index: int | None, o: _Options):
    """q (b, sq, h, d), k/v (b, sk, hk, d) -> out (b, sq, h, d), lse (b, h, sq), probs or None.
    `batch_index` is the sequence's index in a varlen call (ALiBi slopes and the dropout mask are per batch)."""
    b, sq, h, d = q.shape
    sk = k.shape[1]
    sinks = o.p.sinks
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, sinks) if t is not None)
    if sk == 0 or sq == 0:
        return _no_keys(q, k, v, sinks, needs_grad, o.return_probs)
    compute = torch.float32 if o.upcast else q.dtype
    slopes = _alibi_slopes(o.p, b, batch_index, q.device)
    # (b, hk, 1, d, sk) and (b, hk, 1, sk, d): broadcast over each kv head's group of query heads.
    kg = k.to(compute).permute(0, 2, 3, 1).unsqueeze(2)
    vg = v.to(compute).permute(0, 2, 1, 3).unsqueeze(2)
    chunk = max(1, min(sq, CHUNK_ELEMENTS // max(1, b * h * sk)))
    outs, lses, all_probs = [], [], []
    for start in range(0, sq, chunk):
        rows = torch.arange(start, min(sq, start + chunk), device=q.device)
        mask = None if o.p.attn_mask is None else o.p.attn_mask[:, :, start : start + chunk]
        args = (q[:, start : start + chunk], kg, vg, rows, sq, slopes, batch_index, start, mask, sinks, o)
        if needs_grad and not o.return_probs:
            out, lse, _ = checkpoint(_chunk_forward, *args, use_reentrant=False)
        else:
            out, lse, probs = _chunk_forward(*args)
            all_probs.append(probs)
        outs.append(out)
        lses.append(lse)
    out = torch.cat(outs, dim=1).to(q.dtype)
    lse = torch.cat(lses, dim=2)
    probs = None
    if o.return_probs:
        probs = q.new_zeros((b, h, round128(sq), round128(sk)))
        probs[:, :, :sq, :sk] = torch.cat(all_probs, dim=2).to(q.dtype)
    return out, lse, probs


def _no_keys(q: Tensor, k: Tensor, v: Tensor, sinks: Tensor | None, needs_grad: bool, return_probs: bool):
    """seqlen_k == 0 or seqlen_q == 0: out = 0 and lse = +inf, or each head's sink (flash-attn's `out.zero_()`)."""
    b, sq, h, _ = q.shape
    out = q.new_zeros(q.shape)
    if needs_grad:  # stay in the graph with zero gradients (where() passes none to the unselected side)
        never = torch.zeros((), dtype=torch.bool, device=q.device)
        others = k.sum() + v.sum() + (0.0 if sinks is None else sinks.sum())
        out = torch.where(never, q, out) + torch.where(never, others, 0.0).to(q.dtype)
    lse = torch.full((b, h, sq), math.inf, dtype=torch.float32, device=q.device)
    if sinks is not None:
        lse = sinks.detach().float().masked_fill(sinks.isneginf(), math.inf).view(1, h, 1).expand(b, h, sq)
    probs = q.new_zeros((b, h, round128(sq), round128(k.shape[1]))) if return_probs else None
    return out, lse, probs


def _chunk_forward(q: Tensor, kg: Tensor, vg: Tensor, rows: Tensor, sq: int, slopes: Tensor | None,
                   batch_index: int | None, first_row: int, mask: Tensor | None, sinks: Tensor | None,
                   o: _Options):
    """One chunk of query rows `rows` = first_row, first_row + 1, ... (of sq): out (b, c, h, d) in the compute
    dtype, lse (b, h, c) fp32, and the signed probabilities (b, h, c, sk) with `o.return_probs`. `mask` is
    attn_mask's (b, h, c, sk). The dropout mask is generated here, so a checkpointed chunk regenerates it instead
    of keeping it."""
    p = o.p
    b, c, h, d = q.shape
    hk, sk = kg.shape[1], kg.shape[-1]
    keep = _dropout_keep(o, batch_index, b, range(first_row, first_row + c), sk, q.device)
    group = h // hk
    qg = q.to(kg.dtype).reshape(b, c, hk, group, d).permute(0, 2, 3, 1, 4)  # (b, hk, group, c, d)
    if o.reorder_ops:
        scores = qg @ (kg * p.softmax_scale)
    else:
        scores = (qg @ kg) * p.softmax_scale
    if p.softcap > 0:
        scores = torch.tanh(scores / p.softcap) * p.softcap
    cols = torch.arange(sk, device=q.device)
    shifted = rows[:, None] + (0 if p.top_left else sk - sq)  # each query's key on the diagonal
    if slopes is not None:  # an fp32 bias (distances overflow fp16), as upstream's reference adds it
        distance = (shifted - cols[None, :]).abs().to(torch.float32)
        scores = scores - slopes.view(b, hk, group, 1, 1) * distance
    if p.window_left >= 0 or p.window_right >= 0:
        allowed = torch.ones(len(rows), sk, dtype=torch.bool, device=q.device)
        if p.window_left >= 0:
            allowed &= cols[None, :] >= shifted - p.window_left
        if p.window_right >= 0:
            allowed &= cols[None, :] <= shifted + p.window_right
        scores = scores.masked_fill(~allowed, -math.inf)
    if mask is not None:
        mask = mask.reshape(b, hk, group, c, sk)
        scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask
    # Softmax relative to the row's max (over its scores and sink), so rows of hugely negative but finite scores
    # keep their weights; the max is a constant shift of the row (detached: it changes neither the probabilities
    # nor their gradients).
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # fp32, or fp64 for fp64 inputs
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    sink = None if sinks is None else sinks.to(scores.dtype).view(1, hk, group, 1, 1)
    if sink is not None:
        row_max = torch.maximum(row_max, sink.detach())
    empty = torch.isneginf(row_max)  # no key and no sink: out = 0
    shift = row_max.masked_fill(empty, 0.0)
    weights = torch.exp(scores - shift)
    total = weights.sum(dim=-1, keepdim=True) + (0.0 if sink is None else torch.exp(sink - shift))  # >= 1 if any
    probs = (weights / total.masked_fill(empty, 1.0)).to(vg.dtype)
    kept = probs if keep is None else probs * keep.view(b, hk, group, c, sk) / (1.0 - p.dropout_p)
    out = (kept @ vg).permute(0, 3, 1, 2, 4).reshape(b, c, h, d)
    lse = (row_max + torch.log(total)).squeeze(-1).masked_fill(empty.squeeze(-1), math.inf).reshape(b, h, c)
    if not o.return_probs:
        return out, lse, None
    signed = probs if keep is None else torch.where(keep.view_as(probs), probs, -probs)
    return out, lse, signed.reshape(b, h, c, sk)


def _dropout_keep(o: _Options, batch_index: int | None, b: int, rows: range, sk: int,
                  device: torch.device) -> Tensor | None:
    """The kept-probability mask (b, h, len(rows), sk) of the query rows `rows`, or None."""
    p = o.p
    if p.dropout_p <= 0:
        return None
    if o.dropout_mask is None:
        from .kernels import dropout

        batches = range(b) if batch_index is None else [batch_index]
        return dropout.keep_grid(*p.dropout_rng, p.dropout_p, p.nheads, batches, rows, sk, device)
    mask = o.dropout_mask if batch_index is None else o.dropout_mask[batch_index : batch_index + 1]
    return mask[:b, :, rows.start : rows.stop, :sk].to(device=device, dtype=torch.bool)


def _alibi_slopes(p: AttentionProblem, b: int, batch_index: int | None, device: torch.device) -> Tensor | None:
    """Slopes as (b, h) fp32 for this call (varlen passes one sequence at a time)."""
    if p.alibi_slopes is None:
        return None
    slopes = p.alibi_slopes.to(device=device, dtype=torch.float32)
    if slopes.dim() == 1:
        return slopes.expand(b, -1)
    return slopes[batch_index : batch_index + 1] if batch_index is not None else slopes


def rotary(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, interleaved: bool) -> Tensor:
    """Rotate the first rotary_dim = 2 * cos.shape[1] features of x (b, s, h, d) at `positions` (b, s), in
    fp32, returning x's dtype. Interleaved pairs features (0, 1), (2, 3), ...; otherwise (GPT-NeoX) pairs
    (i, i + rotary_dim / 2)."""
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
