"""flash-attn 2.8's public functions: the same names, parameters, defaults and return values.

Each function validates its input, builds one `AttentionProblem` and hands it to `_attend`, which routes it
to the Metal kernels (on MPS tensors, or through the emulator) or to the pure-PyTorch reference. Packed
variants pass strided views of the packed tensor, so gradients reach the packed tensor itself.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from . import reference, routing, validation
from .problem import AttentionProblem


def _problem(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
             cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None) -> AttentionProblem:
    varlen = cu_seqlens_q is not None
    rank = 3 if varlen else 4
    q = validation.tensor("q", q, rank)
    k = validation.tensor("k", k, rank)
    v = validation.tensor("v", v, rank)
    validation.same_kind({"q": q, "k": k, "v": v})
    validation.heads(q, k, v)
    if k.shape[:-2] != v.shape[:-2]:
        raise ValueError(f"k and v must have the same batch and sequence sizes, got {tuple(k.shape)} and {tuple(v.shape)}")
    left, right = validation.window(window_size)
    softcap = float(softcap)
    dropout_p = validation.dropout(dropout_p, softcap)
    if causal:
        right = 0
    if varlen:
        offsets_q = validation.cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
        offsets_k = validation.cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
        if len(offsets_q) != len(offsets_k):
            raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length, got {len(offsets_q)} and {len(offsets_k)}")
        batch = len(offsets_q) - 1
        max_q = validation.max_seqlen("max_seqlen_q", max_seqlen_q, offsets_q)
        max_k = validation.max_seqlen("max_seqlen_k", max_seqlen_k, offsets_k)
    else:
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
        batch, max_q, max_k = q.shape[0], q.shape[1], k.shape[1]
    return AttentionProblem(
        q=q, k=k, v=v,
        softmax_scale=validation.softmax_scale(softmax_scale, q.shape[-1]),
        causal=bool(causal), window_left=left, window_right=right, softcap=softcap,
        alibi_slopes=validation.alibi(alibi_slopes, batch, q.shape[-2], q.device),
        dropout_p=dropout_p,
        cu_seqlens_q=cu_seqlens_q if varlen else None, cu_seqlens_k=cu_seqlens_k if varlen else None,
        max_seqlen_q=max_q, max_seqlen_k=max_k,
    )


def _attend(problem: AttentionProblem, return_attn_probs: bool):
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (problem.q, problem.k, problem.v))
    backend = routing.choose(problem, needs_grad)
    probs = None
    if backend is None:
        with_probs = return_attn_probs and problem.dropout_p > 0
        out, lse, *rest = reference.attention(problem, return_probs=with_probs)
        probs = rest[0] if rest else None
    elif needs_grad or torch.compiler.is_compiling():
        from . import ops  # custom ops: autograd and torch.compile see the kernels as single ops

        out, lse = ops.run(problem, backend)
    else:
        out, lse = routing.kernels().forward(problem, backend)  # eager inference: no custom-op dispatch
    if not return_attn_probs:
        return out
    # flash-attn returns an empty S_dmask unless dropout is on.
    return out, lse, probs if probs is not None else problem.q.new_empty((0,))


def _unpack(packed: torch.Tensor, name: str, axis: int, count: int) -> list[torch.Tensor]:
    packed = validation.tensor(name, packed, packed.dim())
    if packed.dim() <= axis or packed.shape[axis] != count:
        raise ValueError(f"{name} must have {count} at dimension {axis}, got shape {tuple(packed.shape)}")
    return list(packed.unbind(axis))


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """qkv: (batch, seqlen, 3, nheads, headdim). Returns out (batch, seqlen, nheads, headdim)."""
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 5:
        raise ValueError("qkv must be a 5-D tensor (batch, seqlen, 3, nheads, headdim)")
    q, k, v = _unpack(qkv, "qkv", 2, 3)
    return _attend(_problem(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes),
                   return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q: (batch, seqlen_q, nheads, headdim); kv: (batch, seqlen_k, 2, nheads_k, headdim)."""
    if not isinstance(kv, torch.Tensor) or kv.dim() != 5:
        raise ValueError("kv must be a 5-D tensor (batch, seqlen_k, 2, nheads_k, headdim)")
    k, v = _unpack(kv, "kv", 2, 2)
    return _attend(_problem(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes),
                   return_attn_probs)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim).

    Returns out (batch, seqlen_q, nheads, headdim), or (out, softmax_lse, S_dmask) with return_attn_probs.
    The causal mask is aligned to the bottom right of the attention matrix."""
    return _attend(_problem(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes),
                   return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """qkv: (total, 3, nheads, headdim); cu_seqlens: (batch + 1,) int32."""
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 4:
        raise ValueError("qkv must be a 4-D tensor (total, 3, nheads, headdim)")
    q, k, v = _unpack(qkv, "qkv", 1, 3)
    return _attend(_problem(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                            cu_seqlens, cu_seqlens, max_seqlen, max_seqlen), return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q: (total_q, nheads, headdim); kv: (total_k, 2, nheads_k, headdim)."""
    if not isinstance(kv, torch.Tensor) or kv.dim() != 4:
        raise ValueError("kv must be a 4-D tensor (total_k, 2, nheads_k, headdim)")
    k, v = _unpack(kv, "kv", 1, 2)
    return _attend(_problem(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                            cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k), return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """q: (total_q, nheads, headdim); k, v: (total_k, nheads_k, headdim), or paged
    (num_blocks, page_block_size, nheads_k, headdim) with block_table (batch, max_blocks) int32."""
    if block_table is not None:
        from .kvcache import gather_paged

        k, v, cu_seqlens_k = gather_paged(k, v, block_table, cu_seqlens_k)
    return _attend(_problem(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                            cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k), return_attn_probs)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens: Optional[Union[int, torch.Tensor]] = None,
                            cache_batch_idx: Optional[torch.Tensor] = None,
                            cache_leftpad: Optional[torch.Tensor] = None,
                            block_table: Optional[torch.Tensor] = None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """Attention over a kv cache, appending k/v in place at cache_seqlens first (no backward).

    q: (batch, seqlen_q, nheads, headdim); k_cache/v_cache: (batch_cache, seqlen_cache, nheads_k, headdim) or
    paged (num_blocks, page_block_size, nheads_k, headdim) with block_table. Returns out, or (out, lse)."""
    from .kvcache import with_kvcache

    return with_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                        cache_leftpad, block_table, softmax_scale, causal, window_size, softcap,
                        rotary_interleaved, alibi_slopes, return_softmax_lse, _attend, _problem)
