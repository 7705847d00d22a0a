"""The cache side of `flash_attn_with_kvcache`, and paged K/V for `flash_attn_varlen_func`.

`prepare` validates every cache argument, then appends the new keys and values in place at `cache_seqlens`
(rotary applied to the keys), and describes each sequence's attended rows, leftpad .. cache_seqlens + seqlen_new,
as a `KVCache`: attention reads them where they are, so one call runs the whole batch and nothing is copied.
Nothing is written before every check passed.

Addressing: a dense cache (batch_cache, seqlen_cache, hk, d) holds sequence b at cache_batch_idx[b] (default b);
a paged cache (num_blocks, page_block_size, hk, d) holds logical row r of sequence b at
block_table[b, r // page_block_size], offset r % page_block_size.

Rotary positions are absolute cache rows, as in flash-attn: new key i of sequence b sits at cache_seqlens[b] + i;
queries take the same positions under causal or local attention, and all sit at cache_seqlens[b] otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import reference, validation
from .problem import KVCache


@dataclass(frozen=True)
class CachedBatch:
    """What attention runs on after the append: the queries, and where each sequence's keys are."""

    q: Tensor  # (batch, seqlen_q, nheads, d), rotated where rotary applies
    layout: KVCache
    max_seqlen_k: int  # the most rows any sequence attends to


def _address(layout: KVCache, seq: Tensor, row: Tensor, cache: Tensor, chosen: bool) -> tuple[Tensor, Tensor]:
    """`layout.locate` for a cache, checked to stay inside its slots or blocks when the caller `chosen` them
    (a block table or cache_batch_idx)."""
    first, second = layout.locate(seq, row, cache.shape[1])
    if chosen and first.numel() and not 0 <= int(first.min()) <= int(first.max()) < cache.shape[0]:
        name = "block_table" if layout.paged else "cache_batch_idx"
        raise ValueError(f"{name} addresses cache entries outside 0..{cache.shape[0] - 1}")
    return first, second


def prepare(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Tensor | None, v: Tensor | None,
            rotary_cos: Tensor | None, rotary_sin: Tensor | None, cache_seqlens: int | Tensor | None,
            cache_batch_idx: Tensor | None, cache_leftpad: Tensor | None, block_table: Tensor | None,
            rotary_interleaved: bool, rotate_q_per_token: bool) -> CachedBatch:
    """Validate, append k/v in place, and gather the attended rows. `rotate_q_per_token`: causal or local."""
    q = validation.tensor("q", q, 4)
    k_cache = validation.tensor("k_cache", k_cache, 4)
    v_cache = validation.tensor("v_cache", v_cache, 4)
    validation.same_kind({"q": q, "k_cache": k_cache, "v_cache": v_cache})
    validation.heads(q, k_cache, v_cache)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    batch, seqlen_q = q.shape[0], q.shape[1]
    device = q.device
    paged = block_table is not None
    if paged:
        _check_block_table(block_table, batch, device)
        if cache_batch_idx is not None or cache_leftpad is not None:
            raise ValueError("cache_batch_idx and cache_leftpad cannot be used with a paged kv cache (block_table)")
        capacity = block_table.shape[1] * k_cache.shape[1]
    else:
        capacity = k_cache.shape[1]
        if cache_batch_idx is None and k_cache.shape[0] < batch:
            raise ValueError(f"k_cache holds {k_cache.shape[0]} sequences but q has {batch}; pass cache_batch_idx "
                             "to choose cache entries")

    new_len = 0
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together")
    if k is not None:
        k = validation.tensor("k", k, 4)
        v = validation.tensor("v", v, 4)
        validation.same_kind({"q": q, "k": k, "v": v})
        expected = (batch, k.shape[1], *k_cache.shape[2:])
        if tuple(k.shape) != expected or tuple(v.shape) != expected:
            raise ValueError(f"k and v must have shape (batch={batch}, seqlen_new, nheads_k={k_cache.shape[2]}, "
                             f"headdim={k_cache.shape[3]}), got {tuple(k.shape)} and {tuple(v.shape)}")
        new_len = k.shape[1]
        if cache_seqlens is None:
            raise ValueError("cache_seqlens is required when k and v are appended to the cache")

    seqlens = _int32_vector("cache_seqlens", cache_seqlens, batch, default=capacity)
    leftpad = _int32_vector("cache_leftpad", cache_leftpad, batch, default=0)
    if cache_batch_idx is not None:
        _int32_vector("cache_batch_idx", cache_batch_idx, batch, default=0)  # its type and shape; values below
    ends = [s + new_len for s in seqlens]
    for b in range(batch):
        if seqlens[b] < 0:
            raise ValueError(f"cache_seqlens must be >= 0, got {seqlens[b]} for sequence {b}")
        if ends[b] > capacity:
            where = (f"block_table has {block_table.shape[1]} blocks of {k_cache.shape[1]} rows" if paged
                     else f"k_cache has {capacity} rows")
            raise ValueError(f"sequence {b} needs {ends[b]} cache rows (cache_seqlens + seqlen_new) but {where}")
        if not 0 <= leftpad[b] <= seqlens[b]:
            raise ValueError(f"cache_leftpad[{b}] = {leftpad[b]} must be between 0 and cache_seqlens[{b}] = {seqlens[b]}")
    q_positions = seqlen_q if rotate_q_per_token else 1
    if rotary_cos is not None or rotary_sin is not None:
        if k is None:
            raise ValueError("rotary_cos/rotary_sin apply only when new k and v are appended")
        _check_rotary(rotary_cos, rotary_sin, q, max((s + max(new_len, q_positions) for s in seqlens), default=0))

    def int32(values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.int32, device=device)

    if paged:
        layout = KVCache(seqlens=int32(ends), leftpad=None, batch_idx=None, block_table=block_table)
    else:
        slots = (cache_batch_idx.to(device) if cache_batch_idx is not None
                 else torch.arange(batch, dtype=torch.int32, device=device))
        layout = KVCache(seqlens=int32(ends), leftpad=int32(leftpad), batch_idx=slots, block_table=None)
    chosen = paged or cache_batch_idx is not None
    starts = torch.tensor(seqlens, dtype=torch.long, device=device)
    # Address (and so check) every row written and read before anything is written.
    new_seq, new_row = _rows(starts, torch.full((batch,), new_len, dtype=torch.long, device=device))
    write_at = _address(layout, new_seq, new_row, k_cache, chosen)
    lengths_k = [e - lp for e, lp in zip(ends, leftpad)]
    _address(layout, *_rows(torch.tensor(leftpad, dtype=torch.long, device=device),
                            torch.tensor(lengths_k, dtype=torch.long, device=device)), k_cache, chosen)

    steps = torch.arange(max(new_len, seqlen_q), device=device)
    if k is not None:
        if rotary_cos is not None:
            k = reference.rotary(k, rotary_cos, rotary_sin, starts[:, None] + steps[None, :new_len], rotary_interleaved)
        with torch.no_grad():  # the in-place append the API promises (it has no backward)
            k_cache[write_at] = k.reshape(-1, *k.shape[2:])
            v_cache[write_at] = v.reshape(-1, *v.shape[2:])
    if rotary_cos is not None:
        positions = starts[:, None] + steps[None, :seqlen_q] if rotate_q_per_token else starts[:, None].expand(-1, seqlen_q)
        q = reference.rotary(q, rotary_cos, rotary_sin, positions, rotary_interleaved)

    return CachedBatch(q=q, layout=layout, max_seqlen_k=max(lengths_k, default=0))


def gather_paged(k: Tensor, v: Tensor, block_table: Tensor, cu_seqlens_k: Tensor) -> tuple[Tensor, Tensor]:
    """Paged (num_blocks, page_block_size, hk, d) K/V of a varlen call -> contiguous (total_k, hk, d) K/V laid
    out as cu_seqlens_k says."""
    k = validation.tensor("k", k, 4)
    v = validation.tensor("v", v, 4)
    validation.same_kind({"k": k, "v": v})
    if k.shape != v.shape:
        raise ValueError(f"paged k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    offsets = validation.cu_seqlens("cu_seqlens_k", cu_seqlens_k, 1 << 62, k.device)
    _check_block_table(block_table, len(offsets) - 1, k.device)
    lengths = [end - start for start, end in zip(offsets, offsets[1:])]
    if max(lengths, default=0) > block_table.shape[1] * k.shape[1]:
        raise ValueError(f"block_table has {block_table.shape[1]} blocks of {k.shape[1]} rows per sequence, too few "
                         f"for the longest sequence of cu_seqlens_k ({max(lengths)} tokens)")
    counts = torch.tensor(lengths, dtype=torch.long, device=k.device)
    layout = KVCache(seqlens=counts.int(), leftpad=None, batch_idx=None, block_table=block_table)
    at = _address(layout, *_rows(torch.zeros_like(counts), counts), k, chosen=True)
    return k[at], v[at]


def _rows(starts: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """(sequence, row) of rows starts[b] .. starts[b] + counts[b] - 1 of every sequence b, in order."""
    seq = torch.repeat_interleave(torch.arange(len(starts), device=starts.device), counts)
    first = torch.cumsum(counts, 0) - counts  # each sequence's first position in the flat list
    row = torch.arange(len(seq), device=starts.device) - first[seq] + starts[seq]
    return seq, row


def _check_block_table(block_table: object, batch: int, device: torch.device) -> None:
    if not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2:
        raise TypeError("block_table must be a 2-D int32 tensor (batch, max_num_blocks_per_seq)")
    if block_table.shape[0] != batch:
        raise ValueError(f"block_table must have {batch} rows (one per sequence), got {block_table.shape[0]}")
    if block_table.device != device:
        raise ValueError(f"block_table is on {block_table.device} but q is on {device}")


def _int32_vector(name: str, value: object, batch: int, default: int) -> list[int]:
    """An int or an int32 (batch,) tensor, as a list; `default` for each sequence when None."""
    if value is None:
        return [default] * batch
    if isinstance(value, int) and not isinstance(value, bool):
        return [value] * batch
    if not isinstance(value, torch.Tensor) or value.dtype != torch.int32 or tuple(value.shape) != (batch,):
        got = f"{value.dtype} of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)
        raise TypeError(f"{name} must be an int or an int32 tensor of shape ({batch},), got {got}")
    return value.tolist()


def _check_rotary(cos: object, sin: object, q: Tensor, positions: int) -> None:
    """cos/sin (seqlen_ro, rotary_dim / 2) covering `positions` rows, with rotary_dim % 16 == 0 and <= d."""
    if not isinstance(cos, torch.Tensor) or not isinstance(sin, torch.Tensor) or cos.shape != sin.shape or cos.dim() != 2:
        raise ValueError("rotary_cos and rotary_sin must be given together, as tensors of the same shape "
                         "(seqlen_ro, rotary_dim / 2)")
    if cos.device != q.device or sin.device != q.device:
        raise ValueError(f"rotary_cos/rotary_sin are on {cos.device}/{sin.device} but q is on {q.device}")
    if not cos.dtype.is_floating_point or not sin.dtype.is_floating_point:
        raise TypeError(f"rotary_cos/rotary_sin must be floating point, got {cos.dtype}/{sin.dtype}")
    rotary_dim = 2 * cos.shape[1]
    if rotary_dim > q.shape[-1] or rotary_dim % 16 != 0:
        raise ValueError(f"rotary_dim (2 * rotary_cos.shape[1] = {rotary_dim}) must be a multiple of 16 and at most "
                         f"the head dim {q.shape[-1]}")
    if cos.shape[0] < positions:
        raise ValueError(f"rotary_cos/rotary_sin have {cos.shape[0]} positions; this call rotates up to position "
                         f"{positions - 1}")
