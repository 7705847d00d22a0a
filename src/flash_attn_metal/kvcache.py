"""The cache side of `flash_attn_with_kvcache`, and paged K/V for `flash_attn_varlen_func`.

`prepare` validates every cache argument, then appends the new keys and values in place at `cache_seqlens`
(rotary applied to the keys), and describes each sequence's attended rows, leftpad .. cache_seqlens + seqlen_new,
as a `KVCache`: attention reads them where they are, so one call runs the whole batch and nothing is copied.
Nothing is written before every check passed.

Addressing: a dense cache (batch_cache, seqlen_cache, hk, d) holds sequence b at cache_batch_idx[b] (default b);
a paged cache (num_blocks, page_block_size, hk, d) holds logical row r of sequence b at
block_table[b, r // page_block_size], offset r % page_block_size.

Rotary positions are absolute cache rows, as in flash-attn: new key i of sequence b sits at cache_seqlens[b] + i;
queries take the same positions under causal or local attention, and all sit at cache_seqlens[b] otherwise (a
window at least as long as the cache is no window, as flash-attn normalises it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import reference, validation
from .errors import ArgumentError
from .problem import KVCache


@dataclass(frozen=True)
class CachedBatch:
    """What attention runs on after the append: the queries, and where each sequence's keys are."""

    q: Tensor  # (batch, seqlen_q, nheads, d), rotated where rotary applies
    layout: KVCache
    max_seqlen_k: int  # the most rows any sequence attends to; validation.UNREAD while tracing


def capacity(k_cache: object, block_table: object) -> int:
    """The rows one sequence can hold: a dense cache's length, or a paged one's blocks per sequence times its
    page size (flash-attn's seqlen_k of a kv-cache call, which windows are compared with)."""
    k_cache = validation.tensor("k_cache", k_cache, 4)
    if block_table is None:
        return k_cache.shape[1]
    _check_block_table_type(block_table)
    return block_table.shape[1] * k_cache.shape[1]


def prepare(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Tensor | None, v: Tensor | None,
            rotary_cos: Tensor | None, rotary_sin: Tensor | None, cache_seqlens: int | Tensor | None,
            cache_batch_idx: Tensor | None, cache_leftpad: Tensor | None, block_table: Tensor | None,
            rotary_interleaved: bool, rotate_q_per_token: bool) -> CachedBatch:
    """Validate, append k/v in place, and describe the attended rows. `rotate_q_per_token`: causal or local.

    Shapes, dtypes and devices are checked here; the per-sequence values (lengths, leftpad, cache entries, rotary
    positions) by `check_rows`, which tracing under torch.compile runs as a custom op that the writes depend on."""
    q = validation.tensor("q", q, 4)
    k_cache = validation.tensor("k_cache", k_cache, 4)
    v_cache = validation.tensor("v_cache", v_cache, 4)
    validation.same_kind({"q": q, "k_cache": k_cache, "v_cache": v_cache})
    validation.heads(q, k_cache, v_cache)
    if k_cache.shape != v_cache.shape:
        raise ArgumentError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and "
                            f"{tuple(v_cache.shape)}")
    batch, seqlen_q = q.shape[0], q.shape[1]
    device = q.device
    paged = block_table is not None
    rows = capacity(k_cache, block_table)
    if paged:
        _check_block_table(block_table, batch, device)
        if cache_batch_idx is not None or cache_leftpad is not None:
            raise ArgumentError("cache_batch_idx and cache_leftpad cannot be used with a paged kv cache (block_table)")
    elif cache_batch_idx is None and k_cache.shape[0] < batch:
        raise ArgumentError(f"k_cache holds {k_cache.shape[0]} sequences but q has {batch}; pass cache_batch_idx "
                            "to choose cache entries")

    new_len = 0
    if (k is None) != (v is None):
        raise ArgumentError("k and v must be given together")
    if k is not None:
        k = validation.tensor("k", k, 4)
        v = validation.tensor("v", v, 4)
        validation.same_kind({"q": q, "k": k, "v": v})
        expected = (batch, k.shape[1], *k_cache.shape[2:])
        if tuple(k.shape) != expected or tuple(v.shape) != expected:
            raise ArgumentError(f"k and v must have shape (batch={batch}, seqlen_new, nheads_k={k_cache.shape[2]}, "
                                f"headdim={k_cache.shape[3]}), got {tuple(k.shape)} and {tuple(v.shape)}")
        new_len = k.shape[1]
        if cache_seqlens is None:
            raise ArgumentError("cache_seqlens is required when k and v are appended to the cache")

    seqlens = _int32_vector("cache_seqlens", cache_seqlens, batch, rows, device)
    leftpad = None if paged else _int32_vector("cache_leftpad", cache_leftpad, batch, 0, device)
    chosen_slots = _int32_vector("cache_batch_idx", cache_batch_idx, batch, None, device)
    slots = None if paged else torch.arange(batch, dtype=torch.int32, device=device) if chosen_slots is None \
        else chosen_slots
    rotated = rotary_cos is not None or rotary_sin is not None
    span = max(new_len, seqlen_q if rotate_q_per_token else 1)  # positions rotated past cache_seqlens
    if rotated:
        if k is None:
            raise ArgumentError("rotary_cos/rotary_sin apply only when new k and v are appended")
        _check_rotary(rotary_cos, rotary_sin, q)

    checks = (leftpad, chosen_slots, block_table, new_len, rows, k_cache.shape[0], k_cache.shape[1],
              rotary_cos.shape[0] if rotated else -1, span)
    if torch.compiler.is_compiling():  # the values are unknown while tracing: check them when the graph runs
        from . import ops

        seqlens = ops.check_kv_cache(seqlens, *checks)  # the writes below depend on its output, so follow it
        max_seqlen_k = validation.UNREAD
    else:
        max_seqlen_k = check_rows(seqlens, *checks)

    layout = KVCache(seqlens=seqlens + new_len, leftpad=leftpad, batch_idx=slots, block_table=block_table)
    starts = seqlens.long()
    steps = torch.arange(max(new_len, seqlen_q), device=device)
    if k is not None:
        if rotated:
            k = reference.rotary(k, rotary_cos, rotary_sin, starts[:, None] + steps[None, :new_len], rotary_interleaved)
        sequence = torch.arange(batch, device=device).repeat_interleave(new_len)
        write_at = layout.locate(sequence, starts[sequence] + steps[:new_len].repeat(batch), k_cache.shape[1])
        with torch.no_grad():  # the in-place append the API promises (it has no backward)
            k_cache[write_at] = k.reshape(-1, *k.shape[2:])
            v_cache[write_at] = v.reshape(-1, *v.shape[2:])
    if rotated:
        positions = starts[:, None] + steps[None, :seqlen_q] if rotate_q_per_token else starts[:, None].expand(-1, seqlen_q)
        q = reference.rotary(q, rotary_cos, rotary_sin, positions, rotary_interleaved)

    return CachedBatch(q=q, layout=layout, max_seqlen_k=max_seqlen_k)


def check_rows(seqlens: Tensor, leftpad: Tensor | None, batch_idx: Tensor | None, block_table: Tensor | None,
               new_len: int, rows: int, entries: int, page_size: int, rotary_positions: int, span: int) -> int:
    """Check the per-sequence values of a kv-cache call (one host read of each tensor) and return the most rows
    a sequence attends to. `rows`: what a sequence can hold; `entries`: the cache's slots or blocks of
    `page_size` rows; `rotary_positions`: rotary_cos's rows (-1: no rotary), of which a sequence uses `span`
    past its cache_seqlens."""
    lengths = seqlens.tolist()
    starts = leftpad.tolist() if leftpad is not None else [0] * len(lengths)
    for b, (length, start) in enumerate(zip(lengths, starts)):
        if length < 0:
            raise ArgumentError(f"cache_seqlens must be >= 0, got {length} for sequence {b}")
        if length + new_len > rows:
            where = (f"block_table has {block_table.shape[1]} blocks of {page_size} rows" if block_table is not None
                     else f"k_cache has {rows} rows")
            raise ArgumentError(f"sequence {b} needs {length + new_len} cache rows (cache_seqlens + seqlen_new) but "
                                f"{where}")
        if not 0 <= start <= length:
            raise ArgumentError(f"cache_leftpad[{b}] = {start} must be between 0 and cache_seqlens[{b}] = {length}")
    if block_table is not None:
        _check_entries("block_table", _used_blocks(block_table, [n + new_len for n in lengths], page_size), entries)
    elif batch_idx is not None:
        _check_entries("cache_batch_idx", batch_idx, entries)
    needed = max(lengths, default=0) + span
    if 0 <= rotary_positions < needed:
        raise ArgumentError(f"rotary_cos/rotary_sin have {rotary_positions} positions; this call rotates up to "
                            f"position {needed - 1}")
    return max((length + new_len - start for length, start in zip(lengths, starts)), default=0)


def gather_paged(k: Tensor, v: Tensor, block_table: Tensor, cu_seqlens_k: Tensor) -> tuple[Tensor, Tensor]:
    """Paged (num_blocks, page_block_size, hk, d) K/V of a varlen call -> contiguous (total_k, hk, d) K/V laid
    out as cu_seqlens_k says. (Its size depends on cu_seqlens_k's values, so torch.compile cannot trace it
    without a graph break.)"""
    k = validation.tensor("k", k, 4)
    v = validation.tensor("v", v, 4)
    validation.same_kind({"k": k, "v": v})
    if k.shape != v.shape:
        raise ArgumentError(f"paged k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    validation.cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.device)
    offsets = validation.offsets("cu_seqlens_k", cu_seqlens_k, validation.INT64_MAX)  # paged k has no token axis
    _check_block_table(block_table, len(offsets) - 1, k.device)
    lengths = [end - start for start, end in zip(offsets, offsets[1:])]
    if max(lengths, default=0) > block_table.shape[1] * k.shape[1]:
        raise ArgumentError(f"block_table has {block_table.shape[1]} blocks of {k.shape[1]} rows per sequence, too "
                            f"few for the longest sequence of cu_seqlens_k ({max(lengths)} tokens)")
    _check_entries("block_table", _used_blocks(block_table, lengths, k.shape[1]), k.shape[0])
    counts = torch.tensor(lengths, dtype=torch.long, device=k.device)
    sequence = torch.repeat_interleave(torch.arange(len(lengths), device=k.device), counts)
    row = torch.arange(len(sequence), device=k.device) - (torch.cumsum(counts, 0) - counts)[sequence]
    layout = KVCache(seqlens=counts.int(), leftpad=None, batch_idx=None, block_table=block_table)
    at = layout.locate(sequence, row, k.shape[1])
    return k[at], v[at]


def _used_blocks(block_table: Tensor, lengths: list[int], page_size: int) -> Tensor:
    """The block table entries that hold rows 0 .. lengths[b] - 1 of each sequence b."""
    used = [block_table[b, : -(-length // page_size)] for b, length in enumerate(lengths)]
    return torch.cat(used) if used else block_table.new_empty(0)


def _check_entries(name: str, indices: Tensor, entries: int) -> None:
    if indices.numel() and not 0 <= int(indices.min()) <= int(indices.max()) < entries:
        raise ArgumentError(f"{name} addresses cache entries outside 0..{entries - 1}")


def _check_block_table_type(block_table: object) -> None:
    if not isinstance(block_table, torch.Tensor):
        raise TypeError(f"block_table must be a torch.Tensor, got {type(block_table).__name__}")
    if block_table.dtype != torch.int32 or block_table.dim() != 2:
        raise ArgumentError(f"block_table must be a 2-D int32 tensor (batch, max_num_blocks_per_seq), got "
                            f"{block_table.dtype} of shape {tuple(block_table.shape)}")


def _check_block_table(block_table: object, batch: int, device: torch.device) -> None:
    _check_block_table_type(block_table)
    if block_table.shape[0] != batch:
        raise ArgumentError(f"block_table must have {batch} rows (one per sequence), got {block_table.shape[0]}")
    if block_table.device != device:
        raise ArgumentError(f"block_table is on {block_table.device} but q is on {device}")


def _int32_vector(name: str, value: object, batch: int, default: int | None, device: torch.device) -> Tensor | None:
    """An int or an int32 (batch,) tensor, as an int32 (batch,) tensor on `device`; `default` for each sequence
    when None (None: no tensor)."""
    if value is None:
        return None if default is None else torch.full((batch,), default, dtype=torch.int32, device=device)
    if isinstance(value, int) and not isinstance(value, bool):
        if not -(2**31) <= value < 2**31:
            raise ArgumentError(f"{name} must fit in int32, got {value}")
        return torch.full((batch,), value, dtype=torch.int32, device=device)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be an int or an int32 tensor of shape ({batch},), got {value!r}")
    if value.dtype != torch.int32 or tuple(value.shape) != (batch,):
        raise ArgumentError(f"{name} must be an int or an int32 tensor of shape ({batch},), got {value.dtype} of "
                            f"shape {tuple(value.shape)}")
    return value.to(device)


def _check_rotary(cos: object, sin: object, q: Tensor) -> None:
    """cos/sin (seqlen_ro, rotary_dim / 2) with rotary_dim % 16 == 0 and <= d (`check_rows` checks seqlen_ro)."""
    if cos is None or sin is None:
        raise ArgumentError("rotary_cos and rotary_sin must be given together")
    if not isinstance(cos, torch.Tensor) or not isinstance(sin, torch.Tensor):
        raise TypeError(f"rotary_cos and rotary_sin must be tensors, got {type(cos).__name__} and {type(sin).__name__}")
    if cos.shape != sin.shape or cos.dim() != 2:
        raise ArgumentError(f"rotary_cos and rotary_sin must have the same shape (seqlen_ro, rotary_dim / 2), got "
                            f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    if cos.device != q.device or sin.device != q.device:
        raise ArgumentError(f"rotary_cos/rotary_sin are on {cos.device}/{sin.device} but q is on {q.device}")
    if not cos.dtype.is_floating_point or not sin.dtype.is_floating_point:
        raise ArgumentError(f"rotary_cos/rotary_sin must be floating point, got {cos.dtype}/{sin.dtype}")
    rotary_dim = 2 * cos.shape[1]
    if rotary_dim > q.shape[-1] or rotary_dim % 16 != 0:
        raise ArgumentError(f"rotary_dim (2 * rotary_cos.shape[1] = {rotary_dim}) must be a multiple of 16 and at "
                            f"most the head dim {q.shape[-1]}")
