"""flash-attn 2.8's `flash_attn.layers.rotary` in PyTorch: the same functions, signatures and semantics.

Rotary embedding rotates the first rotary_dim = 2 * cos.shape[1] features of each head by the angle of the
token's position: non-interleaved (GPT-NeoX) pairs feature i with i + rotary_dim / 2, interleaved (GPT-J) pairs
2i with 2i + 1. The position of token i of sequence b is i + seqlen_offsets (an int, or one per sequence); with
cu_seqlens, tokens are packed (total, nheads, headdim) and positions restart at each sequence. A position past
the cos/sin table leaves the token unrotated (as flash-attn's kernel does for per-sequence offsets). The rotation
runs in fp32 and returns x's dtype; the backward rotates the gradient back (the conjugate rotation).

The `_` functions work in place on q and k (and return their input), as flash-attn's do.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .. import reference

__all__ = [
    "RotaryEmbedding",
    "apply_rotary_emb",
    "apply_rotary_emb_func",
    "apply_rotary_emb_kv_",
    "apply_rotary_emb_qkv_",
    "apply_rotary_emb_torch",
    "rotate_half",
]

Offsets = Union[int, Tensor]


def rotate_half(x: Tensor, interleaved: bool = False) -> Tensor:
    """(x1, x2) -> (-x2, x1) over the rotation pairs."""
    if not interleaved:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rotary_emb_torch(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False) -> Tensor:
    """The plain formula, in x's dtype: x (batch, seqlen, nheads, headdim); cos, sin (seqlen, rotary_dim / 2) or
    (batch, seqlen, rotary_dim / 2)."""
    rotary_dim = cos.shape[-1] * 2
    if rotary_dim > x.shape[-1]:
        raise ValueError(f"rotary_dim (2 * cos.shape[-1] = {rotary_dim}) must be at most the head dim {x.shape[-1]}")
    widen = (lambda t: t.repeat_interleave(2, dim=-1)) if interleaved else (lambda t: torch.cat((t, t), dim=-1))
    cos, sin = widen(cos).unsqueeze(-2), widen(sin).unsqueeze(-2)
    head = x[..., :rotary_dim]
    return torch.cat((head * cos + rotate_half(head, interleaved) * sin, x[..., rotary_dim:]), dim=-1)


def _positions(x: Tensor, seqlen_ro: int, seqlen_offsets: Offsets, cu_seqlens: Optional[Tensor],
               max_seqlen: Optional[int]) -> Tensor:
    """Each token's position, shaped like x's leading dims ((batch, seqlen) or (total,)), checked as flash-attn
    checks them."""
    if cu_seqlens is None:
        if x.dim() != 4:
            raise ValueError(f"x must be (batch, seqlen, nheads, headdim), got shape {tuple(x.shape)}")
        batch, seqlen = x.shape[:2]
        within = torch.arange(seqlen, device=x.device).expand(batch, -1)
        sequence = torch.arange(batch, device=x.device)[:, None].expand(-1, seqlen)
    else:
        if x.dim() != 3:
            raise ValueError(f"x must be (total_seqlen, nheads, headdim) with cu_seqlens, got shape {tuple(x.shape)}")
        if max_seqlen is None:
            raise ValueError("max_seqlen must be given with cu_seqlens")
        if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError("cu_seqlens must be a 1-D int32 or int64 tensor of batch + 1 offsets")
        batch, seqlen = cu_seqlens.numel() - 1, int(max_seqlen)
        starts = cu_seqlens.to(x.device, torch.long)
        if starts[-1].item() > x.shape[0]:
            raise ValueError(f"cu_seqlens ends at {starts[-1].item()} but x holds only {x.shape[0]} tokens")
        tokens = torch.arange(x.shape[0], device=x.device)
        sequence = (torch.searchsorted(starts[1:], tokens, right=True)).clamp(max=max(batch - 1, 0))
        within = tokens - starts[sequence]
    if seqlen_ro < seqlen:
        raise ValueError(f"cos/sin have {seqlen_ro} positions, fewer than the sequence length {seqlen}")
    if isinstance(seqlen_offsets, Tensor):
        if tuple(seqlen_offsets.shape) != (batch,) or seqlen_offsets.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"seqlen_offsets must be an int or an int32/int64 tensor of shape ({batch},), got "
                             f"{seqlen_offsets.dtype} of shape {tuple(seqlen_offsets.shape)}")
        return within + seqlen_offsets.to(x.device, torch.long)[sequence]
    if isinstance(seqlen_offsets, bool) or not isinstance(seqlen_offsets, int):
        raise TypeError(f"seqlen_offsets must be an int or a tensor, got {seqlen_offsets!r}")
    if seqlen_offsets + seqlen > seqlen_ro:
        raise ValueError(f"seqlen_offsets + seqlen ({seqlen_offsets} + {seqlen}) exceeds the {seqlen_ro} positions "
                         "of cos/sin")
    return within + seqlen_offsets


def _rotated(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, seqlen_offsets: Offsets = 0,
             cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None,
             conjugate: bool = False) -> Tensor:
    """x rotated (a new tensor of x's dtype); `conjugate` rotates the other way (the backward)."""
    if not isinstance(cos, Tensor) or not isinstance(sin, Tensor) or cos.dim() != 2 or cos.shape != sin.shape:
        raise ValueError("cos and sin must be tensors of the same shape (seqlen_rotary, rotary_dim / 2)")
    if cos.device != x.device or sin.device != x.device:
        raise ValueError(f"cos/sin are on {cos.device}/{sin.device} but x is on {x.device}")
    if 2 * cos.shape[1] > x.shape[-1]:
        raise ValueError(f"rotary_dim (2 * cos.shape[1] = {2 * cos.shape[1]}) must be at most the head dim "
                         f"{x.shape[-1]}")
    seqlen_ro = cos.shape[0]
    positions = _positions(x, seqlen_ro, seqlen_offsets, cu_seqlens, max_seqlen)
    # Positions past the table read an appended identity row (cos 1, sin 0).
    cos = torch.cat((cos.float(), cos.new_ones((1, cos.shape[1]), dtype=torch.float32)))
    sin = torch.cat((sin.float(), sin.new_zeros((1, sin.shape[1]), dtype=torch.float32)))
    positions = torch.where(positions < seqlen_ro, positions, seqlen_ro)
    sin = -sin if conjugate else sin
    if cu_seqlens is None:
        return reference.rotary(x, cos, sin, positions, interleaved)
    return reference.rotary(x.unsqueeze(0), cos, sin, positions.unsqueeze(0), interleaved).squeeze(0)


class _ApplyRotaryEmb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, interleaved, inplace, seqlen_offsets, cu_seqlens, max_seqlen):
        out = _rotated(x, cos, sin, interleaved, seqlen_offsets, cu_seqlens, max_seqlen)
        ctx.rotation = (cos, sin, interleaved, seqlen_offsets, cu_seqlens, max_seqlen)
        if not inplace:
            return out
        ctx.mark_dirty(x)
        return x.copy_(out)

    @staticmethod
    def backward(ctx, grad):
        cos, sin, interleaved, offsets, cu_seqlens, max_seqlen = ctx.rotation
        return _rotated(grad, cos, sin, interleaved, offsets, cu_seqlens, max_seqlen, conjugate=True), *[None] * 7


def apply_rotary_emb(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets: Union[int, Tensor] = 0,
                     cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None):
    """x: (batch, seqlen, nheads, headdim), or (total_seqlen, nheads, headdim) with cu_seqlens (batch + 1,) and
    max_seqlen; cos, sin: (seqlen_rotary, rotary_dim / 2) with rotary_dim <= headdim. Rotates the first
    rotary_dim features of x (in place with `inplace`); seqlen_offsets (int or (batch,)) shifts each sequence's
    positions, as a kv cache needs. Returns the rotated x."""
    return _ApplyRotaryEmb.apply(x, cos, sin, interleaved, inplace, seqlen_offsets, cu_seqlens, max_seqlen)


apply_rotary_emb_func = apply_rotary_emb  # flash-attn's older name


def _qk_views(qkv: Tensor, num_heads_q: Optional[int]) -> tuple[Tensor, Tensor]:
    """The q and k parts of a packed qkv, as views."""
    if qkv.dim() == 5:
        if qkv.shape[2] != 3:
            raise ValueError(f"qkv must be (batch, seqlen, 3, nheads, headdim), got shape {tuple(qkv.shape)}")
        return qkv[:, :, 0], qkv[:, :, 1]
    if qkv.dim() != 4 or num_heads_q is None:
        raise ValueError("qkv must be (batch, seqlen, 3, nheads, headdim), or (batch, seqlen, num_heads_q + "
                         f"2 * num_heads_k, headdim) with num_heads_q; got shape {tuple(qkv.shape)} and "
                         f"num_heads_q={num_heads_q}")
    num_heads_k = (qkv.shape[2] - num_heads_q) // 2
    if num_heads_q <= 0 or num_heads_k <= 0 or qkv.shape[2] != num_heads_q + 2 * num_heads_k:
        raise ValueError(f"qkv's {qkv.shape[2]} heads are not num_heads_q={num_heads_q} plus twice a number of "
                         "kv heads")
    return qkv[:, :, :num_heads_q], qkv[:, :, num_heads_q : num_heads_q + num_heads_k]


class _ApplyRotaryEmbQKV_(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cos, sin, cos_k, sin_k, interleaved, seqlen_offsets, num_heads_q):
        cos_k = cos if cos_k is None else cos_k
        sin_k = sin if sin_k is None else sin_k
        q, k = _qk_views(qkv, num_heads_q)
        q_rotated = _rotated(q, cos, sin, interleaved, seqlen_offsets)
        k_rotated = _rotated(k, cos_k, sin_k, interleaved, seqlen_offsets)
        q.copy_(q_rotated)
        k.copy_(k_rotated)
        ctx.rotation = (cos, sin, cos_k, sin_k, interleaved, seqlen_offsets, num_heads_q)
        ctx.mark_dirty(qkv)
        return qkv

    @staticmethod
    def backward(ctx, grad):
        cos, sin, cos_k, sin_k, interleaved, offsets, num_heads_q = ctx.rotation
        grad = grad.clone()
        dq, dk = _qk_views(grad, num_heads_q)
        dq.copy_(_rotated(dq, cos, sin, interleaved, offsets, conjugate=True))
        dk.copy_(_rotated(dk, cos_k, sin_k, interleaved, offsets, conjugate=True))
        return grad, *[None] * 7


def apply_rotary_emb_qkv_(qkv, cos, sin, cos_k=None, sin_k=None, interleaved=False,
                          seqlen_offsets: Union[int, Tensor] = 0, num_heads_q: Optional[int] = None):
    """qkv: (batch, seqlen, 3, nheads, headdim), or (batch, seqlen, num_heads_q + 2 * num_heads_k, headdim) with
    num_heads_q (GQA/MQA). Rotates q (cos, sin) and k (cos_k, sin_k, default cos, sin) in place; returns qkv."""
    return _ApplyRotaryEmbQKV_.apply(qkv, cos, sin, cos_k, sin_k, interleaved, seqlen_offsets, num_heads_q)


class _ApplyRotaryEmbKV_(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kv, cos, sin, interleaved, seqlen_offsets):
        if kv.dim() != 5 or kv.shape[2] != 2:
            raise ValueError(f"kv must be (batch, seqlen, 2, nheads, headdim), got shape {tuple(kv.shape)}")
        k = kv[:, :, 0]
        k.copy_(_rotated(k, cos, sin, interleaved, seqlen_offsets))
        ctx.rotation = (cos, sin, interleaved, seqlen_offsets)
        ctx.mark_dirty(kv)
        return kv

    @staticmethod
    def backward(ctx, grad):
        cos, sin, interleaved, offsets = ctx.rotation
        grad = grad.clone()
        dk = grad[:, :, 0]
        dk.copy_(_rotated(dk, cos, sin, interleaved, offsets, conjugate=True))
        return grad, None, None, None, None


def apply_rotary_emb_kv_(kv, cos, sin, interleaved=False, seqlen_offsets: Union[int, Tensor] = 0):
    """kv: (batch, seqlen, 2, nheads, headdim). Rotates k in place; returns kv."""
    return _ApplyRotaryEmbKV_.apply(kv, cos, sin, interleaved, seqlen_offsets)


class RotaryEmbedding(torch.nn.Module):
    """Rotary position embedding (RoFormer), applied in place to qkv or to q and kv, with flash-attn's
    constructor and forward. With `scale_base`, XPos: queries scaled up and keys down by a per-feature decay.

    The cos/sin tables are cached in fp32-computed form, in the input's dtype, and rebuilt when a longer
    sequence, another device or dtype, or training after inference-mode tables comes along."""

    def __init__(self, dim: int, base=10000.0, interleaved=False, scale_base=None, device=None):
        super().__init__()
        self.dim = dim
        self.base = float(base)
        self.register_buffer("inv_freq", self._compute_inv_freq(device), persistent=False)
        self.interleaved = interleaved
        self.scale_base = scale_base
        scale = None
        if scale_base is not None:
            scale = (torch.arange(0, dim, 2, device=device, dtype=torch.float32) + 0.4 * dim) / (1.4 * dim)
        self.register_buffer("scale", scale, persistent=False)
        self._seq_len_cached = 0
        self._cos_cached = self._sin_cached = self._cos_k_cached = self._sin_k_cached = None

    def _compute_inv_freq(self, device=None) -> Tensor:
        return 1.0 / (self.base ** (torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) / self.dim))

    def _update_cos_sin_cache(self, seqlen: int, device=None, dtype=None) -> None:
        if (seqlen > self._seq_len_cached or self._cos_cached is None or self._cos_cached.device != device
                or self._cos_cached.dtype != dtype or (self.training and self._cos_cached.is_inference())):
            self._seq_len_cached = seqlen
            # fp32 throughout: positions times frequencies lose too much in bf16.
            inv_freq = self.inv_freq if self.inv_freq.dtype == torch.float32 else self._compute_inv_freq(device)
            freqs = torch.outer(torch.arange(seqlen, device=device, dtype=torch.float32), inv_freq)
            if self.scale is None:
                self._cos_cached = torch.cos(freqs).to(dtype)
                self._sin_cached = torch.sin(freqs).to(dtype)
            else:
                power = (torch.arange(seqlen, dtype=self.scale.dtype, device=self.scale.device) - seqlen // 2)
                scale = self.scale.to(device=power.device) ** (power / self.scale_base)[:, None]
                self._cos_cached = (torch.cos(freqs) * scale).to(dtype)
                self._sin_cached = (torch.sin(freqs) * scale).to(dtype)
                self._cos_k_cached = (torch.cos(freqs) / scale).to(dtype)
                self._sin_k_cached = (torch.sin(freqs) / scale).to(dtype)

    def forward(self, qkv: Tensor, kv: Optional[Tensor] = None, seqlen_offset: Union[int, Tensor] = 0,
                max_seqlen: Optional[int] = None, num_heads_q: Optional[int] = None):
        """qkv: (batch, seqlen, 3, nheads, headdim) or (batch, seqlen, num_heads_q + 2 * num_heads_k, headdim),
        or q (batch, seqlen, nheads, headdim) when kv (batch, seqlen, 2, nheads, headdim) is given. A tensor
        seqlen_offset needs max_seqlen to size the tables. Rotates in place; returns qkv, or (q, kv)."""
        seqlen = qkv.shape[1]
        if max_seqlen is not None:
            self._update_cos_sin_cache(max_seqlen, device=qkv.device, dtype=qkv.dtype)
        elif isinstance(seqlen_offset, int):
            self._update_cos_sin_cache(seqlen + seqlen_offset, device=qkv.device, dtype=qkv.dtype)
        xpos = self.scale is not None
        if kv is None:
            return apply_rotary_emb_qkv_(qkv, self._cos_cached, self._sin_cached,
                                         self._cos_k_cached if xpos else None, self._sin_k_cached if xpos else None,
                                         interleaved=self.interleaved, seqlen_offsets=seqlen_offset,
                                         num_heads_q=num_heads_q)
        q = apply_rotary_emb_func(qkv, self._cos_cached, self._sin_cached, interleaved=self.interleaved,
                                  inplace=True, seqlen_offsets=seqlen_offset)
        kv = apply_rotary_emb_kv_(kv, self._cos_k_cached if xpos else self._cos_cached,
                                  self._sin_k_cached if xpos else self._sin_cached, interleaved=self.interleaved,
                                  seqlen_offsets=seqlen_offset)
        return q, kv
