"""The frozen description of one generated kernel source: everything that changes its code.

Sequence lengths, strides, windows, scales and slopes are run-time arguments; a spec varies only in what
changes the code: the dtype, the padded head dim, the tiles, which features are compiled in, and three facts
the host checks per call: how wide the block loaders may read (alignment), whether the real head dim is padded,
and whether offsets need 64 bits.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..problem import AttentionProblem
from .tiles import Tiles, dkdv_tiles, dq_tiles, forward_tiles
from .tuning import current

MSL_TYPES = {"float16": "half", "bfloat16": "bfloat", "float32": "float"}
KV_CACHES = ("", "dense", "paged")  # K/V laid out like q; a kv cache with a slot per sequence; a paged kv cache
HEAD_DIM_ALIGN = 8  # simdgroup_matrix fragments are 8 wide
MAX_VEC = 4  # MSL vectors hold at most 4 elements: half4 (8 bytes), float4 (16 bytes)
MASK_TYPES = ("", "bool", "half", "bfloat", "float")  # an attention mask's element type (torch SDPA's: bool, q's, fp32)


def msl_type(dtype: torch.dtype) -> str:
    """The MSL scalar type of a tensor's dtype (bool: an attention mask's)."""
    return "bool" if dtype == torch.bool else MSL_TYPES[str(dtype).removeprefix("torch.")]


def cache_kind(p: AttentionProblem) -> str:
    """The call's entry of KV_CACHES."""
    return "" if p.kv_cache is None else "paged" if p.kv_cache.paged else "dense"


# Buffers that only some specs bind, after a kernel's own, in this order: sequence offsets (varlen), the kv
# cache's per-sequence rows (see problem.KVCache), ALiBi slopes, the attention mask and the sinks.
KV_CACHE_BUFFERS = {
    "": [],
    "dense": ["cache_seqlens", "cache_leftpad", "cache_batch_idx"],
    "paged": ["cache_seqlens", "block_table"],
}


def side_buffer_names(*, varlen: bool, kv_cache: str, alibi: bool, mask: bool, sinks: bool) -> list[str]:
    """The side buffers a kernel with these features binds (dispatch.side_buffers passes them)."""
    return ((["cu_seqlens_q", "cu_seqlens_k"] if varlen else []) + KV_CACHE_BUFFERS[kv_cache]
            + (["alibi_slopes"] if alibi else []) + (["attn_mask"] if mask else []) + (["sinks"] if sinks else []))


def padded_head_dim(head_dim: int) -> int:
    return -(-head_dim // HEAD_DIM_ALIGN) * HEAD_DIM_ALIGN


def load_width(head_dim: int, limit: int = MAX_VEC) -> int:
    """The widest power-of-two vector (<= limit elements) that divides the real head dim: a vector read then never
    straddles the end of a row."""
    vec = 1
    while vec * 2 <= limit and head_dim % (vec * 2) == 0:
        vec *= 2
    return vec


@dataclass(frozen=True)
class ForwardSpec:
    dtype: str  # MSL scalar type: "half", "bfloat" or "float"
    head_dim: int  # padded to a multiple of 8; the real head dim is a run-time argument
    tiles: Tiles
    varlen: bool  # sequences located by cu_seqlens instead of a batch stride
    masked: bool  # causal or local window
    softcap: bool
    alibi: bool
    kv_cache: str = ""  # one of KV_CACHES; forward only (flash_attn_with_kvcache has no backward)
    split_kv: bool = False  # keys split across threadgroups, merged by a combine kernel (forward only)
    vec: int = MAX_VEC  # elements per device read of the block loaders; the host checked their alignment
    ragged: bool = False  # the real head dim is below `head_dim`: columns past it are checked and zero-filled
    wide: bool = False  # some tensor spans 2^32 elements or more: offsets are 64-bit
    mask: str = ""  # an attention mask's MSL element type ("bool": True takes part; a float type: added), or ""
    sinks: bool = False  # per-head sink logits join each row's softmax denominator
    dropout: bool = False  # P is dropped (kernels/dropout.py) before P V; the backward regenerates the same bits

    def __post_init__(self) -> None:
        if self.kv_cache not in KV_CACHES or (self.kv_cache and self.varlen):
            raise ValueError(f"kv_cache must be one of {KV_CACHES} and comes without varlen, got {self.kv_cache!r}")
        if self.vec not in (1, 2, 4):
            raise ValueError(f"vec must be 1, 2 or 4, got {self.vec}")
        if self.mask not in MASK_TYPES:
            raise ValueError(f"mask must be one of {MASK_TYPES}, got {self.mask!r}")

    @classmethod
    def for_call(cls, dtype: str, head_dim: int, family: str, *, varlen: bool, masked: bool, softcap: bool,
                 alibi: bool, kv_cache: str = "", split_kv: bool = False, vec: int = MAX_VEC,
                 wide: bool = False, mask: str = "", sinks: bool = False, dropout: bool = False) -> "ForwardSpec":
        """The spec for a real head dim: padded, with the widest load that divides it (at most `vec`)."""
        d = padded_head_dim(head_dim)
        tiles = current("forward", family, dtype, d, masked) or forward_tiles(family, dtype, d)  # a tuned winner first
        return cls(dtype, d, tiles, varlen, masked, softcap, alibi, kv_cache, split_kv, load_width(head_dim, vec),
                   d != head_dim, wide, mask, sinks, dropout)

    @property
    def side_buffers(self) -> list[str]:
        return side_buffer_names(varlen=self.varlen, kv_cache=self.kv_cache, alibi=self.alibi, mask=bool(self.mask),
                                 sinks=self.sinks)

    @property
    def block_q(self) -> int:
        return self.tiles.block_q

    @property
    def block_k(self) -> int:
        return self.tiles.block_k

    @functools.cached_property
    def features(self) -> str:
        """The host's loader facts and the compiled-in features, as a kernel-name suffix."""
        return "".join(f"_{f}" for f, on in (
            (f"v{self.vec}", self.vec != MAX_VEC), ("ragged", self.ragged), ("wide", self.wide),
            ("varlen", self.varlen), ("masked", self.masked), ("softcap", self.softcap), ("alibi", self.alibi),
            (f"{self.mask}_mask", self.mask), ("sinks", self.sinks), ("dropout", self.dropout),
            (f"{self.kv_cache}_cache", self.kv_cache), ("split", self.split_kv)) if on)

    @functools.cached_property
    def name(self) -> str:
        t = self.tiles
        return (f"attention_forward_{self.dtype}_d{self.head_dim}_q{t.block_q}_k{t.block_k}"
                f"{'' if t.stationary == 'registers' else '_' + t.stationary[:2]}{self.features}")


@dataclass(frozen=True)
class BackwardSpec:
    """The backward kernels of a forward spec's features: preprocess, dq, and dkdv (or dk and dv)."""

    forward: ForwardSpec
    dq: Tiles
    dkdv: Tiles

    @classmethod
    def of(cls, forward: ForwardSpec, family: str) -> "BackwardSpec":
        if forward.kv_cache or forward.split_kv:
            raise ValueError("kv-cache and split-KV specs are forward only")
        d, t, masked = forward.head_dim, forward.dtype, forward.masked
        return cls(forward, current("dq", family, t, d, masked) or dq_tiles(family, t, d),
                   current("dkdv", family, t, d, masked) or dkdv_tiles(family, t, d))

    @functools.cached_property
    def name(self) -> str:
        def tiles(t: Tiles) -> str:
            return f"{t.block_q}x{t.block_k}{'' if t.stationary == 'registers' else t.stationary[:2]}"

        f = self.forward
        return (f"attention_backward_{f.dtype}_d{f.head_dim}_dq{tiles(self.dq)}_dkdv{tiles(self.dkdv)}"
                f"{'s' if self.dkdv.split else ''}{f.features}")
