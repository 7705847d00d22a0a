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
