"""Route `torch.nn.functional.scaled_dot_product_attention` to the Metal kernels (`sdpa`), for the tensors they
serve: MPS tensors, and CPU tensors under FLASH_ATTN_METAL_BACKEND=emulator. Every other call goes to torch
unchanged.

    with flash_attn_metal.patch_sdpa():     # this thread, inside the block; also under torch.compile
        model(**batch)

    flash_attn_metal.patch_sdpa_globally()  # every thread, for the rest of the process

`patch_sdpa()` is a torch function mode: it catches every spelling of the call (F.scaled_dot_product_attention,
a name imported from torch.nn.functional, transformers' and diffusers' sdpa paths) and is traced through by
torch.compile(fullgraph=True). Torch function modes are per thread. `patch_sdpa_globally()` rebinds the name
`torch.nn.functional.scaled_dot_product_attention`, which transformers, diffusers and torch.nn.MultiheadAttention
look up at call time, in every thread; code that imported the function by name before the call keeps torch's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from . import routing
from .sdpa import TORCH_SDPA, scaled_dot_product_attention


def _served(query: object) -> bool:
    """Whether a call on `query` goes to the kernels' SDPA."""
    if not isinstance(query, torch.Tensor):
        return False
    device = query.device.type
    return device == "mps" or (device == "cpu" and routing.backend_setting() == "emulator")


class SDPAPatch(TorchFunctionMode):
    """The mode `patch_sdpa()` returns; torch pops it while its handler runs, so torch's own SDPA below it is
    reached without recursion."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is TORCH_SDPA and _served(args[0] if args else kwargs.get("query")):
            return scaled_dot_product_attention(*args, **kwargs)
        return func(*args, **kwargs)


def patch_sdpa() -> SDPAPatch:
    """A context manager routing F.scaled_dot_product_attention to the kernels in this thread (module docstring)."""
    return SDPAPatch()


def _routed_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False):
    sdpa = scaled_dot_product_attention if _served(query) else TORCH_SDPA
    return sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)


_routed_sdpa.__doc__ = TORCH_SDPA.__doc__


def patch_sdpa_globally() -> None:
    """Route torch.nn.functional.scaled_dot_product_attention to the kernels in every thread, for the rest of the
    process (module docstring). Calling it again changes nothing."""
    F.scaled_dot_product_attention = _routed_sdpa
