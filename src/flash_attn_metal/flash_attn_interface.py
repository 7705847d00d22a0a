"""flash-attn 2.8's `flash_attn.flash_attn_interface` module: the public functions, and the private names that
libraries (diffusers' `flash` and `flash_hub` backends, ring attention) and flash-attn's own tests import.

The `flash_attn` alias serves this module as `flash_attn.flash_attn_interface`; the kernels-hub build exports
it as its `flash_attn_interface`. The private functions keep flash-attn 2.8.3's signatures (with 2.8.4's trailing
`num_splits` on `_flash_attn_varlen_forward`) and contracts:

- `_flash_attn_forward(...) -> (out, softmax_lse, S_dmask, rng_state)`; S_dmask is empty unless
  `return_softmax` with dropout;
- `_flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, ...) -> softmax_d` writes the gradients
  into dq, dk, dv (when given) and returns D = rowsum(dout * out), laid out as flash-attn lays it out;
- neither records autograd history: callers wrap them in an autograd.Function of their own;
- the backward reads the given out and softmax_lse (as ring attention needs) where the kernels run a call
  without dropout; a dropout call, or an announced fallback to the PyTorch reference, recomputes the forward,
  so out and softmax_lse must then be this call's own;
- `rng_state` is the state of torch's default CPU generator (the one dropout draws from on every device)
  before the forward: the backward of a dropout call replays the same draw from it;
- `_wrapped_flash_attn_*` are the same functions (flash-attn's are its torch.library ops).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Optional

import torch
from torch import Tensor

from . import reference, routing, validation
from .interface import (
    _problem,
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)
from .problem import AttentionProblem

__all__ = [
    "USE_TRITON_ROCM",
    "_flash_attn_backward",
    "_flash_attn_forward",
    "_flash_attn_varlen_backward",
    "_flash_attn_varlen_forward",
    "_get_block_size_n",
    "_wrapped_flash_attn_backward",
    "_wrapped_flash_attn_forward",
    "_wrapped_flash_attn_varlen_backward",
    "_wrapped_flash_attn_varlen_forward",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
]

USE_TRITON_ROCM = False  # flash-attn's switch to its ROCm Triton kernels; flash-attn's tests read it

# flash-attn pads softmax_d's query rows to multiples of this (and varlen adds this many per sequence).
_SOFTMAX_D_ROUNDING = 128


def _get_block_size_n(device, head_dim: int, is_dropout: bool, is_causal: bool) -> int:
    """flash-attn's helper for decoding S_dmask: the keys per block of its running max (s_dmask.py)."""
    from . import s_dmask

    return s_dmask.block_size_n(head_dim, is_dropout, is_causal)


@contextlib.contextmanager
def _replayed(rng_state: Optional[Tensor]) -> Iterator[None]:
    """Run with the generator the dropout draws come from (torch's default CPU generator on every device:
    kernels/dropout.py) set to `rng_state`, restoring its state after."""
    if not isinstance(rng_state, torch.Tensor) or rng_state.dtype != torch.uint8:
        raise ValueError("rng_state must be the rng_state that the forward of this dropout call returned")
    previous = torch.get_rng_state()
    torch.set_rng_state(rng_state)
    try:
        yield
    finally:
        torch.set_rng_state(previous)


def _no_rng(device: torch.device) -> Tensor:
    return torch.zeros((2,), dtype=torch.int64, device=device)  # flash-attn's (seed, offset) shape


def _forward(q: Tensor, call, dropout_p: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, lse, S_dmask, rng_state) of `call(return_attn_probs=True)`, without autograd history."""
    rng_state = torch.get_rng_state() if dropout_p > 0 else _no_rng(q.device)
    with torch.no_grad():
        out, lse, s_dmask = call()
    return out, lse, s_dmask, rng_state


def _gradients(problem: AttentionProblem, out: Tensor, lse: Tensor, dout: Tensor, recompute,
               rng_state: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv: the backward kernels from out and lse where they run this call without dropout (the statistics
    they read are rebuilt from lse: P = exp(S - lse), as a globally reduced lse asks); otherwise the call's
    forward recomputed under autograd: `recompute(q, k, v)` replaying the dropout draw, or the reference."""
    if problem.dropout_p == 0:
        backend = routing.choose(problem, needs_grad=True)
        if backend is not None:
            kernels = routing.kernels()
            return kernels.backward(problem, out, kernels.stats_from_lse(lse), dout, backend)
    leaves = [t.detach().requires_grad_() for t in (problem.q, problem.k, problem.v)]
    with torch.enable_grad():
        if problem.dropout_p > 0:
            with _replayed(rng_state):
                again = recompute(*leaves)
        else:  # routing announced the fallback above: the reference recomputes it
            again = reference.attention(dataclasses.replace(problem, q=leaves[0], k=leaves[1], v=leaves[2]))[0]
        return torch.autograd.grad(again, leaves, dout.to(again.dtype))


def _write(targets: tuple[Optional[Tensor], ...], grads: tuple[Tensor, ...]) -> None:
    for target, grad in zip(targets, grads):
        if target is not None:
            target.copy_(grad)


def _row_sums(dout: Tensor, out: Tensor) -> Tensor:
    """D = rowsum(dout * out) in fp32, heads before rows: (..., h, rows)."""
    return (dout.float() * out.float()).sum(-1).transpose(-1, -2)


def _flash_attn_forward(q: Tensor, k: Tensor, v: Tensor, dropout_p: float, softmax_scale: float, causal: bool,
                        window_size_left: int, window_size_right: int, softcap: float,
                        alibi_slopes: Optional[Tensor], return_softmax: bool):
    """q (b, sq, h, d), k/v (b, sk, hk, d) -> (out, softmax_lse (b, h, sq), S_dmask, rng_state)."""
    out, lse, s_dmask, rng_state = _forward(q, lambda: flash_attn_func(
        q, k, v, dropout_p, softmax_scale, causal, (window_size_left, window_size_right), softcap, alibi_slopes,
        return_attn_probs=True), dropout_p)
    return out, lse, s_dmask if return_softmax else q.new_empty((0,)), rng_state


def _flash_attn_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, softmax_lse: Tensor,
                         dq: Optional[Tensor], dk: Optional[Tensor], dv: Optional[Tensor], dropout_p: float,
                         softmax_scale: float, causal: bool, window_size_left: int, window_size_right: int,
                         softcap: float, alibi_slopes: Optional[Tensor], deterministic: bool,
                         rng_state: Optional[Tensor] = None) -> Tensor:
    """Writes dq, dk, dv; returns softmax_d (b, h, round128(sq)) fp32. The backward is always deterministic."""
    window = (window_size_left, window_size_right)
    problem = _problem(q, k, v, dropout_p, softmax_scale, causal, window, softcap, alibi_slopes, None)
    grads = _gradients(problem, out, softmax_lse, dout, lambda q_, k_, v_: flash_attn_func(
        q_, k_, v_, dropout_p, softmax_scale, causal, window, softcap, alibi_slopes), rng_state)
    _write((dq, dk, dv), grads)
    b, sq, h, _ = q.shape
    softmax_d = torch.zeros((b, h, -(-sq // _SOFTMAX_D_ROUNDING) * _SOFTMAX_D_ROUNDING), dtype=torch.float32,
                            device=q.device)
    softmax_d[:, :, :sq] = _row_sums(dout, out)
    return softmax_d


def _used_keys(k: Tensor, v: Tensor, cu_seqlens_k: Tensor, leftpad_k: Optional[Tensor],
               seqused_k: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, int]:
    """K/V rows leftpad_k[b] .. seqused_k[b] of each sequence (flash-attn's key window of a varlen call),
    gathered: (k, v, cu_seqlens_k, max_seqlen_k)."""
    offsets = validation.offsets("cu_seqlens_k", validation.cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.device),
                                 k.shape[0])
    lengths = [end - start for start, end in zip(offsets, offsets[1:])]
    batch = len(lengths)
    starts = _per_sequence("leftpad_k", leftpad_k, batch, [0] * batch)
    ends = _per_sequence("seqused_k", seqused_k, batch, lengths)
    for b in range(batch):
        if not 0 <= starts[b] <= ends[b] <= lengths[b]:
            raise ValueError(f"sequence {b} has {lengths[b]} keys in cu_seqlens_k; leftpad_k[{b}] = {starts[b]} and "
                             f"seqused_k[{b}] = {ends[b]} must satisfy 0 <= leftpad_k <= seqused_k <= {lengths[b]}")
    rows = torch.cat([torch.arange(offsets[b] + starts[b], offsets[b] + ends[b]) for b in range(batch)]
                     or [torch.zeros(0, dtype=torch.long)]).to(k.device)
    used = [e - s for s, e in zip(starts, ends)]
    return k[rows], v[rows], _cu_seqlens(used, k.device), max(used, default=0)


def _cu_seqlens(lengths: list[int], device: torch.device) -> Tensor:
    """int32 (batch + 1,) offsets of sequences of `lengths`."""
    return torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)


def _per_sequence(name: str, value: Optional[Tensor], batch: int, default: list[int]) -> list[int]:
    if value is None:
        return default
    if not isinstance(value, torch.Tensor) or value.dtype != torch.int32 or tuple(value.shape) != (batch,):
        got = f"{value.dtype} of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)
        raise TypeError(f"{name} must be an int32 tensor of shape ({batch},), got {got}")
    return value.tolist()


def _flash_attn_varlen_forward(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                               max_seqlen_q: int, max_seqlen_k: int, dropout_p: float, softmax_scale: float,
                               causal: bool, window_size_left: int = -1, window_size_right: int = -1,
                               softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None,
                               return_softmax: bool = False, block_table: Optional[Tensor] = None,
                               leftpad_k: Optional[Tensor] = None, seqused_k: Optional[Tensor] = None,
                               zero_tensors: bool = False, num_splits: int = 0):
    """q (total_q, h, d), k/v (total_k, hk, d) or paged with block_table -> (out, softmax_lse (h, total_q),
    S_dmask, rng_state). Sequence b attends to its keys leftpad_k[b] .. seqused_k[b] (default: all of them).
    `num_splits` is accepted (>= 0) and left to the kernels; `zero_tensors` changes nothing here."""
    validation.num_splits(num_splits)
    if block_table is not None:
        if leftpad_k is not None:
            raise ValueError("leftpad_k cannot be used with a paged kv cache (block_table), as in flash-attn")
        if seqused_k is not None:  # the paged gather reads each sequence's first seqused_k[b] rows
            used = _per_sequence("seqused_k", seqused_k, cu_seqlens_k.numel() - 1, [])
            cu_seqlens_k = _cu_seqlens(used, q.device)
            max_seqlen_k = max(used, default=0)
    elif leftpad_k is not None or seqused_k is not None:
        k, v, cu_seqlens_k, max_seqlen_k = _used_keys(k, v, cu_seqlens_k, leftpad_k, seqused_k)
    out, lse, s_dmask, rng_state = _forward(q, lambda: flash_attn_varlen_func(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
        (window_size_left, window_size_right), softcap, alibi_slopes, return_attn_probs=True,
        block_table=block_table), dropout_p)
    return out, lse, s_dmask if return_softmax else q.new_empty((0,)), rng_state


def _flash_attn_varlen_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, softmax_lse: Tensor,
                                dq: Optional[Tensor], dk: Optional[Tensor], dv: Optional[Tensor],
                                cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                                dropout_p: float, softmax_scale: float, causal: bool, window_size_left: int,
                                window_size_right: int, softcap: float, alibi_slopes: Optional[Tensor],
                                deterministic: bool, rng_state: Optional[Tensor] = None,
                                zero_tensors: bool = False) -> Tensor:
    """Writes dq, dk, dv; returns softmax_d (h, total_q + 128 * batch) fp32, sequence b's rows starting at
    cu_seqlens_q[b] + 128 * b (flash-attn's layout)."""
    window = (window_size_left, window_size_right)
    problem = _problem(q, k, v, dropout_p, softmax_scale, causal, window, softcap, alibi_slopes, None,
                       varlen=True, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                       max_seqlen_k=max_seqlen_k)
    grads = _gradients(problem, out, softmax_lse, dout, lambda q_, k_, v_: flash_attn_varlen_func(
        q_, k_, v_, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
        window, softcap, alibi_slopes), rng_state)
    _write((dq, dk, dv), grads)
    total_q, h = q.shape[0], q.shape[1]
    batch = problem.batch
    softmax_d = torch.zeros((h, total_q + _SOFTMAX_D_ROUNDING * batch), dtype=torch.float32, device=q.device)
    used = cu_seqlens_q[-1].item()
    sequence = torch.searchsorted(cu_seqlens_q[1:].long(), torch.arange(used, device=q.device), right=True)
    softmax_d[:, torch.arange(used, device=q.device) + _SOFTMAX_D_ROUNDING * sequence] = \
        _row_sums(dout[:used], out[:used])
    return softmax_d


_wrapped_flash_attn_forward = _flash_attn_forward
_wrapped_flash_attn_backward = _flash_attn_backward
_wrapped_flash_attn_varlen_forward = _flash_attn_varlen_forward
_wrapped_flash_attn_varlen_backward = _flash_attn_varlen_backward
