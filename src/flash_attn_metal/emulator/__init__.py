"""The Metal emulator: run and type-check MSL kernels without a Mac.

    lib = compile_shader(source)            # like torch.mps.compile_shader; CPU tensors
    lib = compile_shader(source, "cuda")    # a CUDA translation for CUDA tensors
    lib.my_kernel(out, x, 3, 2.0, threads=[n], group_size=[128])
    typecheck(source)                       # clang with Metal's address spaces; raises MSLCompileError

Set FLASH_ATTN_METAL_EMULATOR_DEBUG=1 to check every device, constant and threadgroup access (bounds and alignment),
and FLASH_ATTN_METAL_EMULATOR_FAST_MATH=1 to build with the compiler's fast math, as Metal's fast math allows.
"""

from __future__ import annotations

from .. import settings
from .errors import (Diagnostic, EmulatorUnavailable, KernelExecutionError, MSLCompileError, MSLError,
                     UnsupportedMSL)
from .library import KernelFunction, Library
from .translate import translate
from .typecheck import typecheck  # cheap: libclang loads on the first call

__all__ = [
    "compile_shader", "typecheck", "Library", "KernelFunction",
    "MSLError", "MSLCompileError", "UnsupportedMSL", "KernelExecutionError", "EmulatorUnavailable", "Diagnostic",
]


def debug_enabled() -> bool:
    return settings.flag(settings.EMULATOR_DEBUG)


def fast_math_enabled() -> bool:
    return settings.flag(settings.EMULATOR_FAST_MATH)


def compile_shader(source: str, device: str = "cpu") -> Library:
    """Compile MSL for the emulator. `device` is "cpu" (CPU tensors) or "cuda" (CUDA tensors)."""
    debug, fast_math = debug_enabled(), fast_math_enabled()
    if device == "cpu":
        from .cpu import CpuLibrary

        return CpuLibrary(translate(source, debug=debug, target="cpu", fast_math=fast_math), debug, fast_math)
    if device == "cuda":
        from .cuda import CudaLibrary

        return CudaLibrary(translate(source, debug=debug, target="cuda", fast_math=fast_math), debug, fast_math)
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
