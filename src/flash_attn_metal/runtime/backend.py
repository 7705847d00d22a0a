"""The backend protocol: every kernel launch in the package goes through it.

    library = get_backend("emulator").compile(source)   # "mps", "emulator" (CPU tensors), "cuda-emulator"
    library.kernel_name(*args, threads=[...], group_size=[...])

Calling conventions are torch.mps's (positional argument i binds [[buffer(i)]]; a Python int is a `long`,
a float a `float`, a list of either a `constant long*` / `constant float*`). `compile` keeps one library per
source in-process (tier 1), so each kernel is compiled once per process; kernel objects are cached (each
torch.mps attribute lookup allocates a new wrapper) and every launch is counted in `stats()`.
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Any, Callable

from ..stats import record_launch
from .cache import MemoryCache

BACKEND_NAMES = ("mps", "emulator", "cuda-emulator")


class Kernel:
    """A compiled kernel that counts its launches."""

    __slots__ = ("_fn", "_name")

    def __init__(self, fn: Callable[..., Any], name: str) -> None:
        self._fn = fn
        self._name = name

    def __call__(self, *args: Any, threads: Any = None, group_size: Any = None) -> None:
        self._fn(*args, threads=threads, group_size=group_size)
        record_launch(self._name)


class Library:
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


class Backend:
    def __init__(self, name: str, compile_source: Callable[[str], Any]) -> None:
        self.name = name
        self._compile_source = compile_source
        self._libraries = MemoryCache()

    def compile(self, source: str) -> Library:
        key = self.name + ":" + hashlib.sha256(source.encode()).hexdigest()
        return self._libraries.get_or_create(key, lambda: Library(self._compile_source(source)))


def _compile_mps(source: str) -> Any:
    from .mps import compile_library

    return compile_library(source)


def _compile_emulated(device: str) -> Callable[[str], Any]:
    def compile_source(source: str) -> Any:
        from ..emulator import compile_shader

        return compile_shader(source, device)

    return compile_source


def get_backend(name: str) -> Backend:
    """The backend of that name; the emulator's debug builds (FLASH_ATTN_METAL_EMULATOR_DEBUG=1) are a
    backend of their own, so switching the variable never reuses the other build's kernels."""
    debug = name != "mps" and os.environ.get("FLASH_ATTN_METAL_EMULATOR_DEBUG", "0") not in ("", "0")
    return _backend(name, debug)


@functools.cache
def _backend(name: str, debug: bool) -> Backend:
    if name == "mps":
        return Backend(name, _compile_mps)
    if name == "emulator":
        return Backend(name, _compile_emulated("cpu"))
    if name == "cuda-emulator":
        return Backend(name, _compile_emulated("cuda"))
    raise ValueError(f"backend must be one of {', '.join(BACKEND_NAMES)}, got {name!r}")
