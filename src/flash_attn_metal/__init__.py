"""FlashAttention for Apple Silicon: flash-attn 2.x's API over Metal kernels generated at run time.

    from flash_attn_metal import flash_attn_func    # or, on a Mac, `from flash_attn import flash_attn_func`
    with flash_attn_metal.patch_sdpa(): ...         # F.scaled_dot_product_attention on the kernels
"""

from . import bert_padding
from ._version import __version__
from .errors import ArgumentError
from .interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)
from .patch import patch_sdpa, patch_sdpa_globally
from .sdpa import scaled_dot_product_attention
from .stats import reset_stats, stats

__all__ = [
    "__version__",
    "ArgumentError",
    "bert_padding",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "patch_sdpa",
    "patch_sdpa_globally",
    "reset_stats",
    "scaled_dot_product_attention",
    "stats",
]
