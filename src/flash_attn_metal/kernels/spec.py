"""The frozen description of one generated kernel: everything that changes its source.

Sequence lengths, strides, windows, scales and slopes are run-time arguments; a spec varies only in what
changes the code: the dtype, the padded head dim, the tiles, and which features are compiled in.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .tiles import Tiles, forward_tiles
from .tuning import current

MSL_TYPES = {"float16": "half", "bfloat16": "bfloat", "float32": "float"}
KV_CACHES = ("", "dense", "paged")  # K/V laid out like q; a kv cache with a slot per sequence; a paged kv cache
HEAD_DIM_ALIGN = 8  # simdgroup_matrix fragments are 8 wide


def padded_head_dim(head_dim: int) -> int:
    return -(-head_dim // HEAD_DIM_ALIGN) * HEAD_DIM_ALIGN


@dataclass(frozen=True)
class ForwardSpec:
    dtype: str  # MSL scalar type: "half", "bfloat" or "float"
    head_dim: int  # padded to a multiple of 8; the real head dim is a run-time argument
    block_q: int
    block_k: int
    varlen: bool  # sequences located by cu_seqlens instead of a batch stride
    masked: bool  # causal or local window
    softcap: bool
    alibi: bool
    kv_cache: str = ""  # one of KV_CACHES; forward only (flash_attn_with_kvcache has no backward)
    split_kv: bool = False  # keys split across threadgroups, merged by a combine kernel (forward only)

    def __post_init__(self) -> None:
        if self.kv_cache not in KV_CACHES or (self.kv_cache and self.varlen):
            raise ValueError(f"kv_cache must be one of {KV_CACHES} and comes without varlen, got {self.kv_cache!r}")

    @classmethod
    def for_call(cls, dtype: str, head_dim: int, family: str, *, varlen: bool, masked: bool, softcap: bool,
                 alibi: bool, kv_cache: str = "", split_kv: bool = False) -> "ForwardSpec":
        d = padded_head_dim(head_dim)
        tiles = current("forward", family, dtype, d, masked) or forward_tiles(family, d)
        return cls(dtype, d, tiles.block_q, tiles.block_k, varlen, masked, softcap, alibi, kv_cache, split_kv)

    @property
    def tiles(self) -> Tiles:
        return Tiles(self.block_q, self.block_k, "")

    @functools.cached_property
    def name(self) -> str:
        features = "".join(f"_{f}" for f, on in (("varlen", self.varlen), ("masked", self.masked),
                                                   ("softcap", self.softcap), ("alibi", self.alibi),
                                                   (f"{self.kv_cache}_cache", self.kv_cache),
                                                   ("split", self.split_kv)) if on)
        return f"attention_forward_{self.dtype}_d{self.head_dim}_q{self.block_q}_k{self.block_k}{features}"
