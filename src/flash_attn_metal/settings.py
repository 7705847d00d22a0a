"""The environment variables the package reads, each read where it takes effect (most per call).

The `flash_attn` alias's `FLASH_ATTN_METAL_SHIM` is read by `_flash_attn_metal_alias`, which runs before this
package can be imported.
"""

from __future__ import annotations

import os

BACKEND = "FLASH_ATTN_METAL_BACKEND"  # auto | mps | emulator | reference (routing)
STRICT = "FLASH_ATTN_METAL_STRICT"  # 1: a fallback to the reference raises instead of warning (routing)
CACHE_DIR = "FLASH_ATTN_METAL_CACHE_DIR"  # the disk tier's directory (runtime.cache)
EMULATOR_DEBUG = "FLASH_ATTN_METAL_EMULATOR_DEBUG"  # 1: bounds-checked emulator builds, a backend of their own
EMULATOR_FAST_MATH = "FLASH_ATTN_METAL_EMULATOR_FAST_MATH"  # 1: emulator builds with fast math, a backend of their own
EMULATOR_THREADS = "FLASH_ATTN_METAL_EMULATOR_THREADS"  # worker threads of the CPU emulator (default: all cores)
CXX = "FLASH_ATTN_METAL_CXX"  # the C++ compiler of the CPU emulator (default: g++, clang++ or c++)


def flag(name: str) -> bool:
    """An on/off variable: unset, empty, 0 and false are off; anything else is on."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false")
