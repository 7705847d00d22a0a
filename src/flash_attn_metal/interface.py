"""flash-attn 2.8's public functions: the same names, parameters, defaults and return values.

Each function validates its input, builds one `AttentionProblem` and hands it to `_attend`, which routes it
to the Metal kernels (on MPS tensors, or through the emulator) or to the pure-PyTorch reference. Packed
variants pass strided views of the packed tensor, so gradients reach the packed tensor itself. A repeated
eager inference call of the padded layout replays its remembered launch instead (`fastpath`).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from . import fastpath, kvcache, reference, routing, validation
from .errors import ArgumentError
from .problem import AttentionProblem

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
]


def _options(q: torch.Tensor, batch: int, seqlen_k: int, dropout_p, softmax_scale, causal, window_size, softcap,
             alibi_slopes, sinks) -> dict:
    """A call's validated options, as AttentionProblem fields. `seqlen_k`: what flash-attn compares the window
    with (see `validation.local_window`)."""
    left, right = validation.local_window(*validation.window(window_size), bool(causal), seqlen_k)
    softcap = validation.number("softcap", softcap)
    return dict(
        softmax_scale=validation.softmax_scale(softmax_scale, q.shape[-1]),
        causal=bool(causal), window_left=left, window_right=right, softcap=softcap,
        alibi_slopes=validation.alibi(alibi_slopes, batch, q.shape[-2], q.device),
        dropout_p=validation.dropout(dropout_p, softcap), sinks=validation.sinks(sinks, q.shape[-2], q.device),
    )


def _problem(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, sinks, *,
             varlen: bool = False, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
             max_seqlen_k=None) -> AttentionProblem:
    rank = 3 if varlen else 4
    q = validation.tensor("q", q, rank)
    k = validation.tensor("k", k, rank)
    v = validation.tensor("v", v, rank)
    validation.same_kind({"q": q, "k": k, "v": v})
    validation.heads(q, k, v)
    if k.shape[:-2] != v.shape[:-2]:
        raise ArgumentError(f"k and v must have the same batch and sequence sizes, got {tuple(k.shape)} and {tuple(v.shape)}")
    if varlen:
        validation.cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device)
        validation.cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device)
        if cu_seqlens_q.numel() != cu_seqlens_k.numel():
            raise ArgumentError(f"cu_seqlens_q and cu_seqlens_k must have the same length, got {cu_seqlens_q.numel()} "
                                f"and {cu_seqlens_k.numel()}")
        batch = cu_seqlens_q.numel() - 1
        bound_q = validation.max_seqlen("max_seqlen_q", max_seqlen_q)
        seqlen_k = bound_k = validation.max_seqlen("max_seqlen_k", max_seqlen_k)
        if torch.compiler.is_compiling():  # tracing cannot read cu_seqlens: the custom op does (ops)
            max_q = max_k = validation.UNREAD
        else:
            max_q = validation.longest("max_seqlen_q", bound_q,
                                       validation.offsets("cu_seqlens_q", cu_seqlens_q, q.shape[0]))
            max_k = validation.longest("max_seqlen_k", bound_k,
                                       validation.offsets("cu_seqlens_k", cu_seqlens_k, k.shape[0]))
    else:
        if k.shape[0] != q.shape[0]:
            raise ArgumentError(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
        batch, max_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
        max_k = seqlen_k
    return AttentionProblem(
        q=q, k=k, v=v,
        **_options(q, batch, seqlen_k, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, sinks),
        cu_seqlens_q=cu_seqlens_q if varlen else None, cu_seqlens_k=cu_seqlens_k if varlen else None,
        max_seqlen_q=max_q, max_seqlen_k=max_k,
    )


def _attend(problem: AttentionProblem, return_attn_probs: bool, call_key: tuple | None = None):
    """Run the problem on the backend routing chooses; flash-attn's return value (out, or out, lse, S_dmask).
    When the kernels run an eager call that has a `fastpath` key, its launch is remembered under that key.
    A dropout call draws its mask's (seed, offset) here, once; its backward reuses them."""
    problem = problem.with_dropout_rng()
    needs_grad = problem_needs_grad(problem)
    needs_probs = return_attn_probs and problem.dropout_p > 0  # flash-attn's S_dmask is empty without dropout
    backend = routing.choose(problem, needs_grad)
    if backend is None:
        out, lse = reference.attention(problem)
        lse = lse.detach()  # as in flash-attn, only out carries a gradient
    else:
        out, lse = run_kernels(problem, backend, needs_grad, call_key)
    if not needs_probs:
        return _result(out, lse, None, return_attn_probs)
    from . import s_dmask

    return _result(out, lse, s_dmask.build(problem), return_attn_probs)


def problem_needs_grad(problem: AttentionProblem) -> bool:
    tensors = (problem.q, problem.k, problem.v, problem.sinks)
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def run_kernels(problem: AttentionProblem, backend: str, needs_grad: bool,
                call_key: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) from the kernels on `backend`. An eager inference call with a `fastpath` key has its launch
    remembered under that key. A dropout call without its (seed, offset) yet draws them here."""
    problem = problem.with_dropout_rng()
    if needs_grad or torch.compiler.is_compiling():
        from . import ops  # custom ops: autograd and torch.compile see the kernels as single ops

        return ops.run(problem, backend)
    kernels = routing.kernels()  # eager inference: no custom-op dispatch
    launch = kernels.forward_launch(problem, backend)
    out, lse, _ = launch(problem.q, problem.k, problem.v, kernels.side_buffers(problem))
    if call_key is not None:
        fastpath.remember(call_key, launch)
    return out, lse


def _result(out: torch.Tensor, lse: torch.Tensor, probs: torch.Tensor | None, return_attn_probs: bool):
    if not return_attn_probs:
        return out
    return out, lse, probs if probs is not None else out.new_empty((0,))


def _padded(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs, sinks):
    """The padded-layout functions' common path: replay a remembered launch, else validate, route and run."""
    # A dropout call draws a new seed every time: it never replays a launch (whose arguments hold the last seed).
    dropping = not isinstance(dropout_p, (int, float)) or dropout_p > 0
    call_key = None if dropping else fastpath.key(q, k, v, window_size, dropout_p, softmax_scale, causal, softcap,
                                                  alibi_slopes, sinks)
    launch = fastpath.get(call_key)
    if launch is not None:
        out, lse, _ = launch(q, k, v)
        return _result(out, lse, None, return_attn_probs)
    problem = _problem(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, sinks)
    return _attend(problem, return_attn_probs, call_key)


def _unpack(packed: object, name: str, layout: str, axis: int) -> list[torch.Tensor]:
    """Views of a packed qkv/kv tensor laid out as `layout` (e.g. "(batch, seqlen, 3, nheads, headdim)", packed
    along `axis`), so gradients reach the packed tensor itself."""
    dims = layout.strip("()").split(", ")
    packed = validation.tensor(name, packed, len(dims))
    if packed.shape[axis] != int(dims[axis]):
        raise ArgumentError(f"{name} must be laid out as {layout}, got shape {tuple(packed.shape)}")
    return list(packed.unbind(axis))


def _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
            window_size, softcap, alibi_slopes, return_attn_probs, sinks):
    """The varlen functions' common path: validate, route and run."""
    problem = _problem(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, sinks,
                       varlen=True, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                       max_seqlen_k=max_seqlen_k)
    return _attend(problem, return_attn_probs)


# Every function takes flash-attn 2.8's parameters, then keyword-only `sinks`: fp32 (nheads,) per-head logits
# that join each row's softmax denominator and carry no value (gpt-oss); softmax_lse includes them.


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                              sinks=None):
    """qkv: (batch, seqlen, 3, nheads, headdim). Returns out (batch, seqlen, nheads, headdim)."""
    q, k, v = _unpack(qkv, "qkv", "(batch, seqlen, 3, nheads, headdim)", axis=2)
    return _padded(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs,
                   sinks)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                             sinks=None):
    """q: (batch, seqlen_q, nheads, headdim); kv: (batch, seqlen_k, 2, nheads_k, headdim)."""
    k, v = _unpack(kv, "kv", "(batch, seqlen_k, 2, nheads_k, headdim)", axis=2)
    return _padded(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs,
                   sinks)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, sinks=None):
    """q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim); sinks: (nheads,) fp32.

    Returns out (batch, seqlen_q, nheads, headdim), or (out, softmax_lse, S_dmask) with return_attn_probs.
    The causal mask is aligned to the bottom right of the attention matrix."""
    return _padded(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs,
                   sinks)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False, *, sinks=None):
    """qkv: (total, 3, nheads, headdim); cu_seqlens: (batch + 1,) int32. Rows past cu_seqlens[-1]: as in
    flash_attn_varlen_func."""
    q, k, v = _unpack(qkv, "qkv", "(total, 3, nheads, headdim)", axis=1)
    return _varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale, causal,
                   window_size, softcap, alibi_slopes, return_attn_probs, sinks)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, sinks=None):
    """q: (total_q, nheads, headdim); kv: (total_k, 2, nheads_k, headdim). Rows past cu_seqlens_q/k[-1]: as in
    flash_attn_varlen_func."""
    k, v = _unpack(kv, "kv", "(total_k, 2, nheads_k, headdim)", axis=1)
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                   window_size, softcap, alibi_slopes, return_attn_probs, sinks)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, *, sinks=None):
    """q: (total_q, nheads, headdim); k, v: (total_k, nheads_k, headdim), or paged
    (num_blocks, page_block_size, nheads_k, headdim) with block_table (batch, max_blocks) int32.

    Rows past cu_seqlens_q[-1] (or cu_seqlens_k[-1]) belong to no sequence: their out is 0, their lse +inf and
    their gradients 0. max_seqlen_q/k only bound the lengths; the kernels size their work by the real ones."""
    if block_table is not None:
        k, v = kvcache.gather_paged(k, v, block_table, cu_seqlens_k)
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                   window_size, softcap, alibi_slopes, return_attn_probs, sinks)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens: Optional[Union[int, torch.Tensor]] = None,
                            cache_batch_idx: Optional[torch.Tensor] = None,
                            cache_leftpad: Optional[torch.Tensor] = None,
                            block_table: Optional[torch.Tensor] = None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False, *,
                            sinks=None):
    """Attention over a kv cache, appending k/v in place at cache_seqlens first (no backward).

    q: (batch, seqlen_q, nheads, headdim); k_cache/v_cache: (batch_cache, seqlen_cache, nheads_k, headdim) or
    paged (num_blocks, page_block_size, nheads_k, headdim) with block_table. Returns out, or (out, lse) with
    lse (batch, nheads, seqlen_q) fp32. num_splits splits each query block's keys over that many threadgroups
    (0: the kernels choose, 1: no split)."""
    # Every argument is checked before the cache is written.
    q = validation.tensor("q", q, 4)
    options = _options(q, q.shape[0], kvcache.capacity(k_cache, block_table), 0.0, softmax_scale, causal,
                       window_size, softcap, alibi_slopes, sinks)
    splits = validation.num_splits(num_splits)
    local = options["window_left"] >= 0 or options["window_right"] >= 0  # causal or a window shorter than the cache
    cached = kvcache.prepare(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                             cache_leftpad, block_table, bool(rotary_interleaved), rotate_q_per_token=local)
    problem = AttentionProblem(q=cached.q, k=k_cache, v=v_cache, **options, max_seqlen_q=q.shape[1],
                               max_seqlen_k=cached.max_seqlen_k, kv_cache=cached.layout,
                               num_splits=splits)
    with torch.no_grad():  # flash_attn_with_kvcache has no backward
        out, lse, _ = _attend(problem, return_attn_probs=True)
    return (out, lse) if return_softmax_lse else out
