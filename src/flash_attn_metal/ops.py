"""The kernels as PyTorch custom ops, so autograd and torch.compile see one opaque op each way:

    torch.ops.flash_attn_metal.forward(q, k, v, ...) -> (out, lse, stats)
    torch.ops.flash_attn_metal.backward(dout, q, k, v, out, stats, ...) -> (dq, dk, dv)

`stats` are the forward's per-row statistics the backward recomputes P from (kernels/launch.py).

`register_fake` gives shapes (outputs are allocated contiguous, as the kernels allocate them) and
`register_autograd` connects the two. The backward is deterministic by construction (no atomics).

Sinks need nothing of the backward kernels: the forward's lse includes them, so P = exp(S - lse) and
dS = P * (dP - D) with D = rowsum(dO * O) hold unchanged, and their own gradient is an O(N) sum here
(`sink_gradient`). Masks take no gradient.

Under torch.compile the public functions cannot read tensor values while tracing, so what they read on the
host in eager mode happens here, when the graph runs:
- a varlen call passes max_seqlen_q/k = `validation.UNREAD`: the ops check cu_seqlens and size the grids by
  the longest sequences (the caller's max_seqlen is then checked for its type and range only);
- a kv-cache call's per-sequence values are checked by `check_kv_cache`, whose output the in-place append
  depends on, so the checks still run before the cache is written.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import validation
from .kernels import dropout
from .problem import AttentionProblem, KVCache

# The ops' namespace is the package's import name: a second copy of the package (the kernels-hub build, imported
# under a name of its own) registers ops of its own instead of clashing with these.
NAMESPACE = __name__.rpartition(".")[0].replace(".", "_")


def _problem(q, k, v, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes,
             cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, attn_mask=None, sinks=None, top_left=False,
             dropout_p=0.0, dropout_seed=0, dropout_offset=0, cache_seqlens=None, cache_leftpad=None,
             cache_batch_idx=None, block_table=None, num_splits=0) -> AttentionProblem:
    kv_cache = None if cache_seqlens is None else KVCache(cache_seqlens, cache_leftpad, cache_batch_idx, block_table)
    if cu_seqlens_q is not None and max_seqlen_q == validation.UNREAD:  # traced: see the module docstring
        max_seqlen_q = validation.longest("max_seqlen_q", validation.INT32_MAX,
                                          validation.offsets("cu_seqlens_q", cu_seqlens_q, q.shape[0]))
        max_seqlen_k = validation.longest("max_seqlen_k", validation.INT32_MAX,
                                          validation.offsets("cu_seqlens_k", cu_seqlens_k, k.shape[0]))
    if kv_cache is not None and max_seqlen_k == validation.UNREAD:
        attended = cache_seqlens if cache_leftpad is None else cache_seqlens - cache_leftpad
        max_seqlen_k = int(attended.max()) if attended.numel() else 0
    rng = (dropout_seed % (1 << 64), dropout_offset % (1 << 64)) if dropout_p > 0 else None  # int64 bits -> uint64
    return AttentionProblem(q=q, k=k, v=v, softmax_scale=softmax_scale, causal=causal, window_left=window_left,
                            window_right=window_right, softcap=softcap, alibi_slopes=alibi_slopes,
                            dropout_p=dropout_p, dropout_rng=rng,
                            cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                            max_seqlen_k=max_seqlen_k, kv_cache=kv_cache, num_splits=num_splits,
                            attn_mask=attn_mask, sinks=sinks, top_left=top_left)


def _lse_shape(q: Tensor, cu_seqlens_q: Optional[Tensor]) -> tuple[int, ...]:
    return (q.shape[1], q.shape[0]) if cu_seqlens_q is not None else (q.shape[0], q.shape[2], q.shape[1])


@torch.library.custom_op(f"{NAMESPACE}::forward", mutates_args=())
def forward(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, causal: bool, window_left: int,
            window_right: int, softcap: float, alibi_slopes: Optional[Tensor], cu_seqlens_q: Optional[Tensor],
            cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int, backend: str,
            attn_mask: Optional[Tensor] = None, sinks: Optional[Tensor] = None, top_left: bool = False,
            dropout_p: float = 0.0, dropout_seed: int = 0, dropout_offset: int = 0,
            cache_seqlens: Optional[Tensor] = None, cache_leftpad: Optional[Tensor] = None,
            cache_batch_idx: Optional[Tensor] = None, block_table: Optional[Tensor] = None,
            num_splits: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    from .kernels import dispatch

    problem = _problem(q, k, v, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes,
                       cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, attn_mask, sinks, top_left, dropout_p,
                       dropout_seed, dropout_offset, cache_seqlens, cache_leftpad, cache_batch_idx, block_table,
                       num_splits)
    return dispatch.forward(problem, backend)


@forward.register_fake
def _(q, k, v, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, cu_seqlens_q, cu_seqlens_k,
      max_seqlen_q, max_seqlen_k, backend, attn_mask=None, sinks=None, top_left=False, dropout_p=0.0,
      dropout_seed=0, dropout_offset=0, cache_seqlens=None, cache_leftpad=None, cache_batch_idx=None,
      block_table=None, num_splits=0):
    lse_shape = _lse_shape(q, cu_seqlens_q)
    return (q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32),
            q.new_empty((*lse_shape, 2), dtype=torch.float32))


@torch.library.custom_op(f"{NAMESPACE}::backward", mutates_args=())
def backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, stats: Tensor, softmax_scale: float,
             causal: bool, window_left: int, window_right: int, softcap: float, alibi_slopes: Optional[Tensor],
             cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int,
             backend: str, attn_mask: Optional[Tensor] = None, sinks: Optional[Tensor] = None,
             top_left: bool = False, dropout_p: float = 0.0, dropout_seed: int = 0,
             dropout_offset: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    from .kernels import dispatch

    problem = _problem(q, k, v, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes,
                       cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, attn_mask, sinks, top_left,
                       dropout_p, dropout_seed, dropout_offset)
    return dispatch.backward(problem, out, stats, dout, backend)


@backward.register_fake
def _(dout, q, k, v, out, stats, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes,
      cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, backend, attn_mask=None, sinks=None, top_left=False,
      dropout_p=0.0, dropout_seed=0, dropout_offset=0):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


FORWARD_ONLY_PARAMS = 5  # forward's last: the kv cache (whose calls never need autograd) and num_splits
# The parameters after q, k, v that forward and backward share, in their order.
SHARED_PARAMS = ("softmax_scale", "causal", "window_left", "window_right", "softcap", "alibi_slopes", "cu_seqlens_q",
                 "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "backend", "attn_mask", "sinks", "top_left",
                 "dropout_p", "dropout_seed", "dropout_offset")


def sink_gradient(sinks: Tensor, out: Tensor, dout: Tensor, lse: Tensor, varlen: bool) -> Tensor:
    """d loss / d sinks = -sum over rows of p_sink * D, with p_sink = exp(sink - lse) each row's sink
    probability and D = rowsum(dO * O); lse is (b, h, sq), or (h, total_q) for varlen."""
    row_sums = (dout.float() * out.float()).sum(-1)  # (b, sq, h) or (total_q, h)
    row_sums = row_sums.t() if varlen else row_sums.transpose(1, 2)
    logits = sinks.view(-1, 1) if varlen else sinks.view(1, -1, 1)
    p_sink = torch.exp(logits - lse)  # 0 where lse = +inf
    return -(p_sink * row_sums).sum(dim=1 if varlen else (0, 2))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, *params = inputs
    params = params[:-FORWARD_ONLY_PARAMS]
    assert len(params) == len(SHARED_PARAMS)
    out, lse, stats = output
    ctx.save_for_backward(q, k, v, out, lse, stats)
    ctx.params = params
    ctx.mark_non_differentiable(lse, stats)


def _backward(ctx, dout, _dlse, _dstats):
    q, k, v, out, lse, stats = ctx.saved_tensors
    dq, dk, dv = backward(dout, q, k, v, out, stats, *ctx.params)
    grads = [None] * (len(ctx.params) + FORWARD_ONLY_PARAMS)
    named = dict(zip(SHARED_PARAMS, ctx.params))
    if named["sinks"] is not None:
        varlen = named["cu_seqlens_q"] is not None
        grads[SHARED_PARAMS.index("sinks")] = sink_gradient(named["sinks"], out, dout, lse, varlen)
    return (dq, dk, dv, *grads)


forward.register_autograd(_backward, setup_context=_setup_context)


def run(problem: AttentionProblem, backend: str) -> tuple[Tensor, Tensor]:
    """(out, lse) through the custom op."""
    p = problem
    c = p.kv_cache
    cache = (None,) * 4 if c is None else (c.seqlens, c.leftpad, c.batch_idx, c.block_table)
    out, lse, _ = forward(p.q, p.k, p.v, p.softmax_scale, p.causal, p.window_left, p.window_right, p.softcap,
                          p.alibi_slopes, p.cu_seqlens_q, p.cu_seqlens_k, p.max_seqlen_q, p.max_seqlen_k, backend,
                          p.attn_mask, p.sinks, p.top_left, p.dropout_p, *_dropout_rng(p), *cache, p.num_splits)
    return out, lse


def _dropout_rng(p: AttentionProblem) -> tuple[int, int]:
    """The call's dropout (seed, offset) as int64 bits, the ops' int arguments (0, 0 without dropout)."""
    if p.dropout_rng is None:
        return 0, 0
    return tuple(map(dropout.as_int64, p.dropout_rng))


@torch.library.custom_op(f"{NAMESPACE}::check_kv_cache", mutates_args=())
def check_kv_cache(seqlens: Tensor, leftpad: Optional[Tensor], batch_idx: Optional[Tensor],
                   block_table: Optional[Tensor], new_len: int, rows: int, entries: int, page_size: int,
                   rotary_positions: int, span: int) -> Tensor:
    """`kvcache.check_rows` as an op; returns a copy of `seqlens` for the append to depend on."""
    from . import kvcache

    kvcache.check_rows(seqlens, leftpad, batch_idx, block_table, new_len, rows, entries, page_size,
                       rotary_positions, span)
    return seqlens.clone()


@check_kv_cache.register_fake
def _(seqlens, leftpad, batch_idx, block_table, new_len, rows, entries, page_size, rotary_positions, span):
    return torch.empty_like(seqlens)
