"""The runtime layer: how kernels are compiled, cached and launched.

- `backend`: the protocol every launch goes through, `get_backend(name).compile(source).kernel(*args, ...)`
- `mps`: the Mac implementation, a thin shell over torch.mps with precompiled metallibs
- `emulator_backend`: the Metal emulator as an implementation (CPU or CUDA tensors)
- `cache`: the two-tier kernel cache (in-process and on disk)
- `device`: the Metal device, its GPU family and figures
"""

from .backend import BACKEND_NAMES, Backend, Library, get_backend
from .cache import cache_dir, cache_info, clear_cache
from .device import DeviceInfo, detect

__all__ = ["BACKEND_NAMES", "Backend", "Library", "get_backend", "cache_dir", "cache_info", "clear_cache",
           "DeviceInfo", "detect"]
