"""`flash_attn_with_kvcache` and paged K/V: the in-place cache append (with rotary embedding), then attention
over each sequence's cached keys as one varlen call."""

from __future__ import annotations

import torch

from . import reference, validation


def _block_count(name: str, length: int, page: int, table: torch.Tensor) -> int:
    blocks = -(-length // page)
    if blocks > table.shape[1]:
        raise ValueError(f"block_table has {table.shape[1]} blocks per sequence of {page} tokens, "
                         f"too few for a sequence of {length} tokens ({name})")
    return blocks


def _check_block_table(block_table: object, batch: int, device: torch.device) -> torch.Tensor:
    if not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2:
        raise TypeError("block_table must be a 2-D int32 tensor (batch, max_num_blocks_per_seq)")
    if block_table.shape[0] != batch:
        raise ValueError(f"block_table must have {batch} rows (one per sequence), got {block_table.shape[0]}")
    if block_table.device != device:
        raise ValueError(f"block_table is on {block_table.device} but q is on {device}")
    return block_table


def gather_paged(k: torch.Tensor, v: torch.Tensor, block_table: torch.Tensor, cu_seqlens_k: torch.Tensor):
    """Paged (num_blocks, page, hk, d) K/V -> contiguous (total_k, hk, d) K/V and the matching cu_seqlens_k."""
    k = validation.tensor("k", k, 4)
    v = validation.tensor("v", v, 4)
    offsets = validation.cu_seqlens("cu_seqlens_k", cu_seqlens_k, 1 << 62, k.device)
    table = _check_block_table(block_table, len(offsets) - 1, k.device)
    page = k.shape[1]
    ks, vs = [], []
    for b, (start, end) in enumerate(zip(offsets, offsets[1:])):
        blocks = table[b, : _block_count("cu_seqlens_k", end - start, page, table)].long()
        ks.append(k[blocks].flatten(0, 1)[: end - start])
        vs.append(v[blocks].flatten(0, 1)[: end - start])
    return torch.cat(ks), torch.cat(vs), cu_seqlens_k


def with_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
                 block_table, softmax_scale, causal, window_size, softcap, rotary_interleaved, alibi_slopes,
                 return_softmax_lse, attend, build_problem):
    q = validation.tensor("q", q, 4)
    k_cache = validation.tensor("k_cache", k_cache, 4)
    v_cache = validation.tensor("v_cache", v_cache, 4)
    validation.same_kind({"q": q, "k_cache": k_cache, "v_cache": v_cache})
    validation.heads(q, k_cache, v_cache)
    batch, seqlen_q = q.shape[0], q.shape[1]
    device = q.device
    paged = block_table is not None
    if paged:
        block_table = _check_block_table(block_table, batch, device)
        if cache_batch_idx is not None or cache_leftpad is not None:
            raise ValueError("cache_batch_idx and cache_leftpad cannot be used with a paged kv cache (block_table)")
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]

    new_len = 0
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together")
    if k is not None:
        k = validation.tensor("k", k, 4)
        v = validation.tensor("v", v, 4)
        validation.same_kind({"q": q, "k": k, "v": v})
        if k.shape != v.shape or k.shape[0] != batch or k.shape[2:] != k_cache.shape[2:]:
            raise ValueError(f"k and v must have shape ({batch}, seqlen_new, {k_cache.shape[2]}, {k_cache.shape[3]}), "
                             f"got {tuple(k.shape)} and {tuple(v.shape)}")
        new_len = k.shape[1]
        if cache_seqlens is None:
            raise ValueError("cache_seqlens is required when k and v are appended to the cache")

    seqlens = _int32_vector("cache_seqlens", cache_seqlens, batch, device, default=capacity)
    leftpad = _int32_vector("cache_leftpad", cache_leftpad, batch, device, default=0)
    index = _int32_vector("cache_batch_idx", cache_batch_idx, batch, device, default=None)
    ends = [s + new_len for s in seqlens]
    for b, end in enumerate(ends):
        if paged:
            _block_count("cache_seqlens", end, k_cache.shape[1], block_table)
        elif end > capacity:
            raise ValueError(f"sequence {b} needs {end} cache rows but k_cache holds {capacity}")
        if not 0 <= leftpad[b] <= seqlens[b]:
            raise ValueError(f"cache_leftpad[{b}] = {leftpad[b]} must be between 0 and cache_seqlens[{b}] = {seqlens[b]}")

    rows_of = _cache_rows(paged, block_table, k_cache.shape[1], index)
    positions = torch.tensor([[s - lp + i for i in range(max(new_len, seqlen_q))] for s, lp in zip(seqlens, leftpad)],
                             dtype=torch.long, device=device)
    if rotary_cos is not None:
        if k is None:
            raise ValueError("rotary_cos/rotary_sin apply only when new k and v are appended")
        _check_rotary(rotary_cos, rotary_sin, q, ends)
    if k is not None:
        if rotary_cos is not None:
            k = reference.rotary(k, rotary_cos, rotary_sin, positions[:, :new_len], rotary_interleaved)
        for b in range(batch):  # the in-place append the API promises
            cache_index, rows = rows_of(b, seqlens[b], new_len)
            k_cache[cache_index, rows] = k[b]
            v_cache[cache_index, rows] = v[b]
    local = causal or tuple(int(w) for w in (window_size.tolist() if isinstance(window_size, torch.Tensor) else window_size)) != (-1, -1)
    if rotary_cos is not None:
        q_positions = positions[:, :seqlen_q] if local else positions[:, :1].expand(batch, seqlen_q)
        q = reference.rotary(q, rotary_cos, rotary_sin, q_positions, rotary_interleaved)

    keys, values = [], []
    for b in range(batch):
        cache_index, rows = rows_of(b, leftpad[b], ends[b] - leftpad[b])
        keys.append(k_cache[cache_index, rows])
        values.append(v_cache[cache_index, rows])
    lengths_k = [e - lp for e, lp in zip(ends, leftpad)]
    cu_q = torch.arange(0, (batch + 1) * seqlen_q, seqlen_q, dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + torch.tensor(lengths_k).cumsum(0).tolist(), dtype=torch.int32, device=device)
    problem = build_problem(q.reshape(batch * seqlen_q, *q.shape[2:]), torch.cat(keys), torch.cat(values), 0.0,
                            softmax_scale, causal, window_size, softcap, alibi_slopes, cu_q, cu_k, seqlen_q,
                            max(lengths_k, default=0))
    with torch.no_grad():  # flash_attn_with_kvcache has no backward
        out, lse, _ = attend(problem, return_attn_probs=True)
    out = out.view(q.shape)
    if not return_softmax_lse:
        return out
    return out, lse.view(q.shape[2], batch, seqlen_q).transpose(0, 1).contiguous()


def _int32_vector(name: str, value, batch: int, device, default) -> list[int] | None:
    if value is None:
        return None if default is None else [default] * batch
    if isinstance(value, int) and not isinstance(value, bool):
        return [value] * batch
    if not isinstance(value, torch.Tensor) or value.dtype != torch.int32 or tuple(value.shape) != (batch,):
        raise TypeError(f"{name} must be an int or an int32 tensor of shape ({batch},)")
    return value.tolist()


def _cache_rows(paged: bool, block_table, page: int, index: list[int] | None):
    """A function (b, start, count) -> (cache index, row index) addressing rows start..start+count of sequence b."""
    table = block_table.long() if paged else None

    def rows(b: int, start: int, count: int):
        logical = torch.arange(start, start + count, device=table.device if paged else None)
        if paged:
            return table[b, logical // page], logical % page
        return (index[b] if index is not None else b), logical

    return rows


def _check_rotary(cos, sin, q, ends) -> None:
    if not isinstance(cos, torch.Tensor) or not isinstance(sin, torch.Tensor) or cos.shape != sin.shape or cos.dim() != 2:
        raise ValueError("rotary_cos and rotary_sin must be tensors of the same shape (seqlen_ro, rotary_dim / 2)")
    rotary_dim = 2 * cos.shape[1]
    if rotary_dim > q.shape[-1] or rotary_dim % 16 != 0:
        raise ValueError(f"rotary_dim (2 * rotary_cos.shape[1] = {rotary_dim}) must be a multiple of 16 and at most "
                         f"the head dim {q.shape[-1]}")
    if cos.shape[0] < max(ends, default=0):
        raise ValueError(f"rotary_cos has {cos.shape[0]} positions, fewer than the longest sequence ({max(ends)})")
