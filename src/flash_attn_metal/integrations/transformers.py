"""flash-attn-metal as a transformers attention implementation.

    from flash_attn_metal.integrations.transformers import register
    model = AutoModelForCausalLM.from_pretrained(repo, attn_implementation=register())
    # or, on a model already loaded: model.set_attn_implementation(register())

`register()` adds `attention` to transformers' `AttentionInterface` and a mask function to its
`AttentionMaskInterface` under one name, and returns that name. The name avoids the substrings transformers
routes elsewhere: "flash" (its hub-kernel loader), "sdpa" and "flex_attention" (their own checks). Registering
the mask function matters: without it transformers hands the attention function no mask at all, and padding
would be silently attended to.

The mask function is transformers' flash-attention one, a (batch, seqlen_k) bool padding mask or None, cut to the
keys written so far, so that a static kv cache's unwritten slots are never read.

`attention` takes transformers' calling convention (query (B, H, Nq, D), key and value (B, Hkv, Nk, D), GQA
heads not repeated) and returns (out (B, Nq, H, D), None). It runs, in transformers' order:
- a padding mask: the real tokens, unpadded, through `flash_attn_varlen_func`; padded query rows come back 0;
- `cu_seq_lens_q/k` with `max_length_q/k` (padding-free batches): `flash_attn_varlen_func`;
- packed `position_ids` (batch 1, positions restarting at their minimum): `flash_attn_varlen_func`;
- otherwise `flash_attn_func`.
Keywords: `scaling`, `dropout`, `is_causal` (default: the module's), `sliding_window` (keys within
sliding_window - 1 before the query, as transformers counts it), `softcap`, `s_aux` (per-head attention-sink
logits, e.g. gpt-oss). transformers stays optional: it is imported by `register()` only.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from .. import flash_attn_func, flash_attn_varlen_func
from ..bert_padding import pad_input, unpad_input

DEFAULT_NAME = "metal_attention"
# Substrings of an attn_implementation that transformers routes to other code paths.
_RESERVED = ("flash", "sdpa", "flex_attention", "paged", "|", "/", ":")


def register(name: Optional[str] = None) -> str:
    """Register `attention` and its mask function under `name` (default "metal_attention"); returns the name to
    pass as `attn_implementation`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    name = DEFAULT_NAME if name is None else name
    if not isinstance(name, str) or not name or name == "eager" or any(s in name.lower() for s in _RESERVED):
        raise ValueError(f"name must be a non-empty string other than 'eager' that contains none of {_RESERVED} "
                         f"(transformers routes those elsewhere), got {name!r}")
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, padding_mask)
    return name


def padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset: Any = 0, kv_offset: int = 0,
                 attention_mask: Optional[Tensor] = None, **kwargs) -> Optional[Tensor]:
    """transformers' flash-attention mask ((batch, seqlen_k) bool, or None when nothing is padded), cut to the
    keys written so far: a static cache has more slots than that, and `attention` reads only the slots the
    mask covers (its queries are the last q_length of them)."""
    from transformers.masking_utils import flash_attention_mask

    mask = flash_attention_mask(batch_size, q_length, kv_length, q_offset, kv_offset,
                                attention_mask=attention_mask, **kwargs)
    written = int(q_offset + q_length - kv_offset)  # q_offset is a tensor for static caches
    if written >= kv_length:
        return mask
    if mask is None:
        return torch.ones(batch_size, written, dtype=torch.bool, device=kwargs.get("device"))
    return mask[:, :written]


def attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
              dropout: float = 0.0, scaling: Optional[float] = None, sliding_window: Optional[int] = None,
              softcap: Optional[float] = None, is_causal: Optional[bool] = None, s_aux: Optional[Tensor] = None,
              position_ids: Optional[Tensor] = None, cu_seq_lens_q: Optional[Tensor] = None,
              cu_seq_lens_k: Optional[Tensor] = None, max_length_q: Optional[int] = None,
              max_length_k: Optional[int] = None, **kwargs) -> tuple[Tensor, None]:
    """transformers' attention-function convention over flash-attn-metal (see the module docstring)."""
    batch, nq = query.shape[0], query.shape[2]
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # (B, N, H, D), last dim still contiguous
    head_dim, v_head_dim = q.shape[-1], v.shape[-1]
    if v_head_dim != head_dim:  # e.g. MLA: pad V to the shared head dim, crop the output
        v = torch.nn.functional.pad(v, [0, head_dim - v_head_dim])
    options = dict(
        dropout_p=dropout, softmax_scale=scaling,
        causal=getattr(module, "is_causal", True) if is_causal is None else bool(is_causal),
        window_size=(-1, -1) if sliding_window is None else (sliding_window - 1, sliding_window - 1),
        softcap=0.0 if softcap is None else softcap,
        **_sinks(s_aux),
    )

    if attention_mask is not None:
        out = _padded_batch(q, k, v, attention_mask, options)
    elif all(x is not None for x in (cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k)):
        out = flash_attn_varlen_func(*_flat(q, k, v), _int32(cu_seq_lens_q), _int32(cu_seq_lens_k), max_length_q,
                                     max_length_k, **options).view(batch, nq, *q.shape[2:])
    elif (starts := _packed_starts(position_ids, batch, nq, k.shape[1])) is not None:
        cu_seqlens = torch.cat((starts, starts.new_tensor([nq]))).to(torch.int32)
        longest = int(cu_seqlens.diff().max())
        out = flash_attn_varlen_func(*_flat(q, k, v), cu_seqlens, cu_seqlens, longest, longest,
                                     **options).view(batch, nq, *q.shape[2:])
    else:
        out = flash_attn_func(q, k, v, **options)
    return out[..., :v_head_dim], None


def _padded_batch(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, options: dict) -> Tensor:
    """Unpad by a (batch, seqlen_k) mask (True: a real token), run varlen, pad back. Queries are the last Nq
    positions of the mask (a kv cache's newest tokens); a padded query row comes back 0."""
    if mask.dim() != 2 or mask.shape[0] != q.shape[0]:
        raise ValueError(f"attention_mask must be a 2-D padding mask (batch={q.shape[0]}, seqlen_k); got shape "
                         f"{tuple(mask.shape)}: flash-attn-metal's transformers attention takes no 4-D masks "
                         "(use attn_implementation='sdpa' for custom masks)")
    mask = mask.bool()
    if mask.shape[1] < k.shape[1]:  # a static cache: the mask covers the written slots only
        k, v = k[:, : mask.shape[1]], v[:, : mask.shape[1]]
    elif mask.shape[1] > k.shape[1]:
        mask = mask[:, -k.shape[1]:]
    batch, nq = q.shape[:2]
    if mask.shape[1] < nq:
        raise ValueError(f"attention_mask covers {mask.shape[1]} tokens, fewer than the {nq} queries")
    k_unpad, _, cu_seqlens_k, max_k, _ = unpad_input(k, mask)
    v_unpad = unpad_input(v, mask)[0]
    q_unpad, indices_q, cu_seqlens_q, max_q, _ = unpad_input(q, mask[:, -nq:])
    out = flash_attn_varlen_func(q_unpad, k_unpad, v_unpad, cu_seqlens_q, cu_seqlens_k, max_q, max_k, **options)
    return pad_input(out, indices_q, batch, nq)


def _packed_starts(position_ids: Optional[Tensor], batch: int, nq: int, nk: int) -> Optional[Tensor]:
    """Where each packed sequence starts, for a batch of one whose position ids restart (at their minimum, as
    transformers' data collators write them); None when the batch is not packed."""
    if position_ids is None or batch != 1 or nq != nk or nq < 2 or position_ids.dim() != 2:
        return None
    positions = position_ids.reshape(-1)
    if positions.numel() != nq or bool((positions.diff() == 1).all()):
        return None
    starts = (positions == positions.min()).nonzero().flatten()
    return starts if int(starts[0]) == 0 else torch.cat((starts.new_zeros(1), starts))


def _flat(*tensors: Tensor) -> list[Tensor]:
    return [t.reshape(-1, *t.shape[2:]) for t in tensors]


def _int32(cu_seqlens: Tensor) -> Tensor:
    return cu_seqlens.to(torch.int32)


def _sinks(s_aux: Optional[Tensor]) -> dict:
    """The `sinks=` keyword for gpt-oss's `s_aux` (fp32 per-head sink logits)."""
    return {} if s_aux is None else {"sinks": s_aux.float()}
