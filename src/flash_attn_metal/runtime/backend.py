"""The backend protocol: every kernel launch in the package goes through it.

    library = get_backend("mps").compile(source)    # or "emulator" (CPU tensors), "cuda-emulator" (CUDA tensors)
    library.kernel_name(*args, threads=[...], group_size=[...])

Calling conventions are torch.mps's: positional argument i binds [[buffer(i)]]; a tensor binds its storage
at its storage offset (no strides: pass them as ints); a Python int binds a `constant long&`, a float a
`constant float&`, a list of ints or of floats a `constant long*` / `constant float*` (pack many scalars into
one list). `threads` is the grid in threads, `group_size` the threadgroup shape (1 to 3 dimensions each).
Arguments pass through unchanged: the emulator checks every launch against the kernel's parameter types, and
torch.mps raises on types it cannot bind. This layer checks one thing for every backend: each dimension of
the grid and threadgroup fits a uint32, as Metal's thread positions do (a larger one would wrap silently).

`compile` keeps one library per source and backend in-process (tier 1 of the kernel cache); each
implementation keeps its compiled artifacts on disk (tier 2) and calls `stats.record_compile()` for every
real compilation. Kernel objects are looked up once per library (each torch.mps attribute lookup allocates
a new wrapper) and every launch is counted in `stats()["launches"]`.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any, Callable

from .. import settings
from ..stats import record_launch
from .cache import MemoryCache

BACKEND_NAMES = ("mps", "emulator", "cuda-emulator")


class Kernel:
    """A compiled kernel that counts its launches. Other attributes (`max_threads_per_threadgroup`,
    `thread_execution_width`, `static_thread_group_memory_length`) are the compiled kernel's."""

    __slots__ = ("_fn", "name")

    def __init__(self, fn: Callable[..., Any], name: str) -> None:
        self._fn = fn
        self.name = name

    def __call__(self, *args: Any, threads: Any = None, group_size: Any = None) -> None:
        _check_dimensions(self.name, "threads", threads)
        _check_dimensions(self.name, "group_size", group_size)
        self._fn(*args, threads=threads, group_size=group_size)
        record_launch(self.name)

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_"):
            raise AttributeError(attr)
        return getattr(self._fn, attr)


UINT32_MAX = 2**32 - 1  # Metal's thread_position_in_grid and threads_per_threadgroup are uint per dimension


def _check_dimensions(kernel: str, what: str, dims: Any) -> None:
    """Refuse a grid or threadgroup dimension that does not fit a uint32 (an int or a list of ints; None passes)."""
    for size in (dims,) if isinstance(dims, int) else (dims or ()):
        if isinstance(size, int) and not 0 <= size <= UINT32_MAX:
            raise ValueError(f"kernel {kernel}: {what} {dims} has a dimension outside 0..{UINT32_MAX} (Metal's "
                             "uint32 thread positions); the launch is too large for one dispatch")


class Library:
    """The kernels of one compiled source, one attribute per `kernel` function."""

    def __init__(self, compiled: Any) -> None:
        self._compiled = compiled
        self._kernels: dict[str, Kernel] = {}

    def __getattr__(self, name: str) -> Kernel:
        if name.startswith("_"):
            raise AttributeError(name)
        kernel = self._kernels.get(name)
        if kernel is None:
            kernel = self._kernels[name] = Kernel(getattr(self._compiled, name), name)
        return kernel

    def __dir__(self) -> list[str]:
        return list(dir(self._compiled))


class Backend:
    """`compile_source(source)` compiles MSL into an object with one torch.mps-style kernel per attribute and
    calls `stats.record_compile()` for each real compilation (a disk-tier hit is not one)."""

    def __init__(self, name: str, compile_source: Callable[[str], Any]) -> None:
        self.name = name
        self._compile_source = compile_source
        self._libraries = MemoryCache()  # this backend's tier 1, keyed by the source's SHA-256

    def compile(self, source: str) -> Library:
        if not isinstance(source, str):
            raise TypeError(f"source must be MSL text (str), got {type(source).__name__}")
        key = hashlib.sha256(source.encode()).hexdigest()
        return self._libraries.get_or_create(key, lambda: Library(self._compile_source(source)))

    def __repr__(self) -> str:
        return f"Backend({self.name!r})"


def get_backend(name: str) -> Backend:
    """The process's backend of that name. The emulator's debug builds (FLASH_ATTN_METAL_EMULATOR_DEBUG=1) and
    fast-math builds (FLASH_ATTN_METAL_EMULATOR_FAST_MATH=1) are backends of their own, so switching a variable
    never reuses another build's kernels."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKEND_NAMES))}, got {name!r}")
    emulated = name != "mps"
    return _backend(name, emulated and settings.flag(settings.EMULATOR_DEBUG),
                    emulated and settings.flag(settings.EMULATOR_FAST_MATH))


@functools.cache
def _backend(name: str, debug: bool, fast_math: bool = False) -> Backend:
    """One backend per (name, debug, fast_math); the emulator reads the two flags itself when it compiles."""
    if name == "mps":
        from .mps import compile_library

        return Backend(name, compile_library)
    from .emulator_backend import emulator_compiler

    return Backend(name, emulator_compiler("cpu" if name == "emulator" else "cuda"))
