"""An independent, deliberately simple attention in float64 with flash-attn's semantics, element by element
from the documented rules: the oracle the reference and the kernels are checked against."""

from __future__ import annotations

import math

import torch


def naive_attention(q, k, v, *, scale=None, causal=False, window=(-1, -1), softcap=0.0, alibi=None, dropout_p=0.0,
                    keep=None, mask=None, sinks=None, top_left=False):
    """One sequence: q (sq, h, d), k/v (sk, hk, d); alibi (h,) slopes; keep (h, >= sq, >= sk) bool, True where
    dropout kept a probability; mask (h, sq, sk) bool (True: the key takes part) or float (added to the scores);
    sinks (h,) logits that join the softmax denominator without a value; top_left measures the windows and ALiBi
    from query i = key i. Returns out (sq, h, d) float64 and lse (h, sq) float64 (+inf: no key and no sink)."""
    sq, h, d = q.shape
    sk, hk = k.shape[0], k.shape[1]
    scale = d**-0.5 if scale is None else scale
    left, right = window
    if causal:
        right = 0
    out = torch.zeros(sq, h, d, dtype=torch.float64)
    lse = torch.full((h, sq), math.inf, dtype=torch.float64)
    q, k, v = q.double(), k.double(), v.double()
    for head in range(h):
        kv = head // (h // hk)
        scores = q[:, head] @ k[:, kv].T * scale  # (sq, sk)
        if softcap > 0:
            scores = softcap * torch.tanh(scores / softcap)
        sink = torch.zeros(0, dtype=torch.float64) if sinks is None else sinks[head : head + 1].double()
        for i in range(sq):
            shifted = i if top_left else i + sk - sq
            allowed = []
            for j in range(sk):
                if left >= 0 and j < shifted - left:
                    continue
                if right >= 0 and j > shifted + right:
                    continue
                if mask is not None and (not mask[head, i, j] if mask.dtype == torch.bool else mask[head, i, j] == -math.inf):
                    continue
                allowed.append(j)
            if not allowed:  # a fully masked row: out 0, lse +inf (or the sink)
                if len(sink) and sink[0] > -math.inf:
                    lse[head, i] = sink[0]
                continue
            row = scores[i, allowed]
            if alibi is not None:
                row = row - float(alibi[head]) * torch.tensor([abs(shifted - j) for j in allowed], dtype=torch.float64)
            if mask is not None and mask.dtype != torch.bool:
                row = row + mask[head, i, allowed].double()
            lse[head, i] = torch.logsumexp(torch.cat([row, sink]), 0)
            probs = torch.exp(row - lse[head, i])
            if keep is not None:
                probs = probs * keep[head, i, allowed].double() / (1 - dropout_p)
            out[i, head] = probs @ v[allowed, kv]
    return out, lse


def dense_attention(q, k, v, *, scale=None, causal=False, window=(-1, -1), softcap=0.0, alibi=None,
                    dtype=torch.float64):
    """naive_attention's rules on whole matrices, differentiable. One sequence: q (sq, h, d), k/v (sk, hk, d);
    alibi (h,) slopes. Computed in `dtype`: float64 is the oracle; a low precision is the "plain PyTorch"
    baseline of the tolerance rule, computed as upstream's reference computes it (keys pre-scaled, softmax in
    the scores' dtype, probabilities rounded to v's dtype). A row is fully masked when the mask leaves it no key,
    whatever its scores. Returns out (sq, h, d) in `dtype` and lse (h, sq) float64 (+inf: fully masked)."""
    sq, h, d = q.shape
    sk, hk = k.shape[0], k.shape[1]
    scale = d**-0.5 if scale is None else scale
    left, right = window
    if causal:
        right = 0
    group = h // hk
    q, k, v = q.to(dtype), k.to(dtype).repeat_interleave(group, dim=1), v.to(dtype).repeat_interleave(group, dim=1)
    scores = torch.einsum("ihd,jhd->hij", q, k * scale)
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    i = torch.arange(sq)[:, None]
    j = torch.arange(sk)[None, :]
    shifted = i + sk - sq  # bottom-right alignment
    allowed = torch.ones(sq, sk, dtype=torch.bool)
    if left >= 0:
        allowed &= j >= shifted - left
    if right >= 0:
        allowed &= j <= shifted + right
    if alibi is not None:  # an fp32 (or fp64) bias, as upstream adds it
        bias = alibi.to(torch.promote_types(dtype, torch.float32))[:, None, None] * (shifted - j).abs()
        scores = scores - bias
    scores = scores.masked_fill(~allowed, -math.inf)
    keyless = ~allowed.any(dim=1)  # (sq,)
    probs = torch.softmax(scores, dim=-1).masked_fill(keyless[None, :, None], 0.0)
    out = torch.einsum("hij,jhd->ihd", probs.to(v.dtype), v)
    lse = torch.logsumexp(scores.double(), dim=-1).masked_fill(keyless[None, :], math.inf)
    return out, lse


def call_window(window, seqlen_k):
    """The window flash-attn runs a call with: a side at least the call's seqlen_k long (k.shape[1], varlen's
    max_seqlen_k, a kv cache's capacity) is unbounded (-1)."""
    return tuple(-1 if side >= seqlen_k else side for side in window)
