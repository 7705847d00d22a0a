"""`torch.nn.functional.scaled_dot_product_attention` on the Metal kernels, with torch's semantics.

    out = scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *,
                                       scale=None, enable_gqa=False, sinks=None)

torch's calling convention and semantics (2.13):
- query (..., Hq, L, E), key (..., Hk, S, E), value (..., Hv, S, Ev) -> out (..., Hq, L, Ev); the leading
  dimensions (heads included) broadcast against each other, as torch's matmuls broadcast them;
- `scale` defaults to 1 / sqrt(E); `is_causal` keeps key j for query i iff j <= i (top-left aligned, unlike
  flash-attn's bottom-right) and excludes `attn_mask`;
- `attn_mask`: bool (True takes part) or float (float32 or query's dtype, added to the scores), broadcastable
  to (..., Hq, L, S); a row whose scores are all -inf gives out = 0 and zero gradients (torch 2.13's math path,
  `_safe_softmax`);
- `enable_gqa`: query head h reads key/value head h // (Hq / Hk);
- `dropout_p` > 0 drops attention probabilities, with the kernels' own mask (kernels/dropout.py, drawn from
  torch's default CPU generator), not the one torch's SDPA would draw;
- `sinks` (this package's extension): fp32 (Hq,) logits that join each row's softmax denominator and carry no
  value (gpt-oss).

The kernels serve plain strided float16/bfloat16/float32 tensors with E, Ev <= 256, read in place through their
strides: the usual (B, H, L, E) views of (B, L, H, E) projections cost no copy, nor do broadcast batch or head
dimensions (stride 0), nor does a broadcast mask. Ev != E costs a zero-padded copy of the narrower side. Every
other call runs on torch's own SDPA: invalid input raises torch's own error there, and a valid call is announced
as a fallback (one warning per reason, NotImplementedError under FLASH_ATTN_METAL_STRICT=1).
FLASH_ATTN_METAL_BACKEND=reference runs the calls the kernels would serve on the pure-PyTorch reference instead.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import interface, reference, routing, validation
from .problem import AttentionProblem

# torch's own function, kept before anything can rebind F.scaled_dot_product_attention (see patch.py).
TORCH_SDPA = F.scaled_dot_product_attention
TORCH = "torch's scaled_dot_product_attention"
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None,
                                 enable_gqa=False, sinks=None):
    """torch.nn.functional.scaled_dot_product_attention on the Metal kernels (see the module docstring)."""
    served = plan(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, sinks)
    if isinstance(served, str):
        return _on_torch(served, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, sinks)
    problem = served.problem
    needs_grad = interface.problem_needs_grad(problem)
    backend, reason = routing.decide(problem, needs_grad)
    if reason is not None:
        return _on_torch(reason, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, sinks)
    if backend is None:  # FLASH_ATTN_METAL_BACKEND=reference
        out = reference.attention(problem)[0]
    else:
        out = interface.run_kernels(problem, backend, needs_grad)[0]
    return served.output(out)


@dataclass(frozen=True)
class Plan:
    """A call the kernels can take: its problem and how their (B, L, H, D) output becomes torch's."""

    problem: AttentionProblem
    out_shape: tuple[int, ...]  # torch's: (..., Hq, L, Ev), or (L, Ev) for 2-D inputs
    value_dim: int  # Ev; the problem's head dim may be wider (zero padded)

    def output(self, out: Tensor) -> Tensor:
        return out[..., : self.value_dim].transpose(1, 2).reshape(self.out_shape)


def plan(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, sinks) -> Plan | str:
    """The kernels' problem for this call, or the reason why torch's SDPA runs it instead. Whatever torch would
    reject is sent there too, so that it raises torch's own error."""
    tensors = (query, key, value)
    if not all(type(t) in _PLAIN_TENSORS for t in tensors):
        return "query, key and value are not all plain torch.Tensors"
    if any(t.is_nested or t.layout != torch.strided for t in tensors):
        return "nested or non-strided tensors"
    if type(is_causal) is not bool or type(enable_gqa) is not bool:
        return "is_causal and enable_gqa must be bools"
    if not _number(dropout_p) or not (scale is None or _number(scale)):
        return "dropout_p and scale must be Python numbers"
    dtype, device = query.dtype, query.device
    if any(t.dtype != dtype or t.device != device for t in tensors):
        return "query, key and value differ in dtype or device"
    if dtype not in validation.FLOAT_DTYPES:
        return f"the kernels run float16, bfloat16 and float32, not {dtype}"
    if min(t.dim() for t in tensors) < (3 if enable_gqa else 2):
        return "enable_gqa needs a heads dimension" if enable_gqa else "tensors of fewer than 2 dimensions"
    squeeze_heads = query.dim() == key.dim() == value.dim() == 2  # (L, E): torch's output is (L, Ev)
    q, k, v = (t.unsqueeze(0) if t.dim() == 2 else t for t in tensors)
    (hq, L, E), (hk, S, ek), (hv, sv, ev) = q.shape[-3:], k.shape[-3:], v.shape[-3:]
    if 0 in (hq, hk, hv):
        return "zero heads"
    if ek != E or sv != S:
        return "query, key and value have mismatched sizes"
    if not (1 <= E <= validation.MAX_HEAD_DIM and 1 <= ev <= validation.MAX_HEAD_DIM):
        return f"the kernels take head dims 1 to {validation.MAX_HEAD_DIM}"
    batch = _broadcast(q.shape[:-3], k.shape[:-3], v.shape[:-3])
    if batch is None:
        return "query, key and value have batch dimensions that do not broadcast"
    if enable_gqa and not hq == hk == hv:
        if hq % hk or hq % hv:
            return "enable_gqa with head counts that do not divide"
        if hk != hv:
            return "enable_gqa with key and value head counts that differ"
        heads, heads_k = hq, hk
    else:
        broadcast_heads = _broadcast((hq,), (hk,), (hv,))
        if broadcast_heads is None:
            return "query, key and value have head counts that do not broadcast"
        heads = broadcast_heads[0]
        heads_k = hk if hk == hv else heads
    mask = _mask_view(attn_mask, is_causal, batch + (heads, L, S), query)
    if isinstance(mask, str):
        return mask
    dropout = float(dropout_p) if dropout_p > 0 else 0.0  # torch's math path skips dropout_p <= 0
    if dropout >= 1:
        return "dropout_p >= 1"
    sinks = validation.sinks(sinks, heads, device)
    softmax_scale = E**-0.5 if scale is None else float(scale)
    width = max(E, ev)  # the kernels take one head dim: pad the narrower side with zeros
    q = _bshd(_widen(q, width), batch, heads)
    k = _bshd(_widen(k, width), batch, heads_k)
    v = _bshd(_widen(v, width), batch, heads_k)
    problem = AttentionProblem(q=q, k=k, v=v, softmax_scale=softmax_scale, causal=is_causal, window_left=-1,
                               window_right=0 if is_causal else -1, softcap=0.0, alibi_slopes=None,
                               dropout_p=dropout, max_seqlen_q=L, max_seqlen_k=S, attn_mask=mask, sinks=sinks,
                               top_left=True)
    out_shape = (L, ev) if squeeze_heads else (*batch, heads, L, ev)
    return Plan(problem, out_shape, ev)


def _number(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _broadcast(*shapes) -> tuple[int, ...] | None:
    """torch's broadcast of `shapes`, or None where they do not broadcast."""
    rank = max(len(s) for s in shapes)
    out = []
    for i in range(rank):
        sizes = {s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0} - {1}
        if len(sizes) > 1:
            return None
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)


def _mask_view(attn_mask, is_causal: bool, scores_shape: tuple[int, ...], query: Tensor) -> Tensor | str | None:
    """attn_mask as the problem's (B, H, L, S) strided view of it, or the reason torch runs the call."""
    if attn_mask is None:
        return None
    if type(attn_mask) not in _PLAIN_TENSORS or attn_mask.layout != torch.strided:
        return "attn_mask is not a plain torch.Tensor"
    if is_causal:
        return "attn_mask with is_causal"  # torch's math path rejects it
    if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
        return "attn_mask's dtype is neither bool, float32 nor query's"
    if attn_mask.device != query.device:
        return "attn_mask is on another device"
    if attn_mask.requires_grad and torch.is_grad_enabled():
        return "attn_mask requires grad (the kernels give masks no gradient)"
    if attn_mask.dim() > len(scores_shape) or _broadcast(attn_mask.shape, scores_shape) != scores_shape:
        return "attn_mask does not broadcast to the attention scores"
    return attn_mask.expand(scores_shape).reshape(math.prod(scores_shape[:-3]), *scores_shape[-3:])


def _widen(x: Tensor, width: int) -> Tensor:
    return x if x.shape[-1] == width else F.pad(x, (0, width - x.shape[-1]))


def _bshd(x: Tensor, batch: tuple[int, ...], heads: int) -> Tensor:
    """x (..., h, n, d), broadcast to batch + (heads, n, d), as the kernels' (B, n, heads, d) view: no copy unless
    broadcast batch dims cannot merge into one or the last dim is strided."""
    n, d = x.shape[-2:]
    x = x.expand(*batch, heads, n, d).reshape(math.prod(batch), heads, n, d).transpose(1, 2)
    return x if x.stride(-1) == 1 else x.contiguous()


def _on_torch(reason: str, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, sinks):
    """torch's SDPA, announced as a fallback for `reason` once torch has accepted the input (so bad input raises
    torch's own error, unannounced). The options go by keyword, as most callers pass them (torch's type errors
    name a positional argument's position)."""
    if sinks is None:
        out = TORCH_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                         enable_gqa=enable_gqa)
    else:
        out = _torch_with_sinks(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, sinks)
    routing.fallback(reason, TORCH)
    return out


def _torch_with_sinks(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, sinks) -> Tensor:
    """torch's SDPA with sinks: one more key whose score is each head's sink (a float mask column) and whose value
    is zero. The causal mask becomes an explicit one."""
    L, S = query.shape[-2], key.shape[-2]
    heads = validation.sinks(sinks, query.shape[-3] if query.dim() > 2 else 1, query.device).shape[0]
    if is_causal:
        keep = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
        bias = torch.zeros(L, S, device=query.device).masked_fill(~keep, -math.inf)
    elif attn_mask is None:
        bias = torch.zeros(L, S, device=query.device)
    elif attn_mask.dtype == torch.bool:
        bias = torch.zeros(attn_mask.shape, device=query.device).masked_fill(~attn_mask, -math.inf)
    else:
        bias = attn_mask.float()
    lead = _broadcast(bias.shape[:-2], (heads,))
    bias = bias.expand(*lead, L, S)
    column = sinks.view(heads, 1, 1).expand(*lead, L, 1)
    bias = torch.cat([bias, column], dim=-1)
    zero_key = key.new_zeros((*key.shape[:-2], 1, key.shape[-1]))
    zero_value = value.new_zeros((*value.shape[:-2], 1, value.shape[-1]))
    key, value = torch.cat([key, zero_key], dim=-2), torch.cat([value, zero_value], dim=-2)
    return TORCH_SDPA(query, key, value, attn_mask=bias, dropout_p=dropout_p, scale=scale, enable_gqa=enable_gqa)
