"""The Mac backend: a thin shell over `torch.mps`.

A library comes, in order, from: the disk tier (a `.metallib` precompiled earlier, loaded with
`torch.mps.load_metallib`), a fresh precompile with Xcode's toolchain (`xcrun -sdk macosx metal`, then
`metallib`; stored on disk), or run-time compilation with `torch.mps.compile_shader` when torch cannot load
metallibs, the toolchain is missing, or precompiling or loading fails. Kernels encode on PyTorch's current MPS
stream into its shared command buffer (torch.mps does this); nothing here creates command buffers or
synchronises.

Every decision is plain Python over injectable `mps` (torch.mps), `run` (subprocess.run) and `device`, so Linux
tests reach it; only the calls into them are Mac-only.
"""

from __future__ import annotations

import functools
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from .._version import __version__
from ..stats import record_compile
from .cache import DiskCache, cache_key
from .device import DeviceInfo, detect

TOOL_TIMEOUT_S = 300  # one xcrun step; a hung toolchain falls back to run-time compilation
_disk = DiskCache("metallib")


def fast_math() -> bool:
    """PyTorch compiles with fast math only under PYTORCH_MPS_FAST_MATH=1; precompiled kernels match it."""
    return os.environ.get("PYTORCH_MPS_FAST_MATH", "0") == "1"


def library_key(source: str, device: DeviceInfo) -> str:
    """What a precompiled metallib depends on; any change makes a new entry."""
    return cache_key(source=source.encode(), device=device.name, family=device.family, macos=device.macos,
                     package=__version__, torch=torch.__version__, metal=device.metal_language,
                     fast_math=fast_math())


@functools.cache
def has_toolchain(run: Callable[..., Any] = subprocess.run) -> bool:
    """Whether Xcode's `metal` and `metallib` exist (the Command Line Tools alone lack them). Asked once."""
    for tool in ("metal", "metallib"):
        try:
            if run(["xcrun", "-sdk", "macosx", "--find", tool], capture_output=True, timeout=TOOL_TIMEOUT_S).returncode:
                return False
        except (OSError, subprocess.SubprocessError):
            return False
    return True


def precompile(source: str, metal_language: str, run: Callable[..., Any] = subprocess.run) -> bytes | None:
    """MSL -> .metallib bytes with Xcode's toolchain, or None when a step fails. Headers resolve as in
    `torch.mps.compile_shader` (torch's include directory), and fast math follows PyTorch's setting."""
    include = Path(torch.__file__).parent / "include"
    math = [] if fast_math() else ["-fno-fast-math"]
    with tempfile.TemporaryDirectory(prefix="flash-attn-metal-") as tmp:
        metal, air, lib = Path(tmp, "kernel.metal"), Path(tmp, "kernel.air"), Path(tmp, "kernel.metallib")
        metal.write_text(source)
        steps = (
            ["xcrun", "-sdk", "macosx", "metal", f"-std=metal{metal_language}", *math, f"-I{include}",
             "-c", str(metal), "-o", str(air)],
            ["xcrun", "-sdk", "macosx", "metallib", str(air), "-o", str(lib)],
        )
        for step in steps:
            try:
                if run(step, capture_output=True, timeout=TOOL_TIMEOUT_S).returncode != 0:
                    return None
            except (OSError, subprocess.SubprocessError):
                return None
        try:
            return lib.read_bytes()
        except OSError:
            return None


def _metallib_loader(mps: Any) -> Callable[[bytes], Any] | None:
    """`torch.mps.load_metallib` (torch >= 2.13), else torch 2.12's private binding (note the triple l)."""
    return getattr(mps, "load_metallib", None) or getattr(torch._C, "_mps_loadMetalllib", None)


def compile_library(source: str, *, mps: Any = None, run: Callable[..., Any] = subprocess.run,
                    device: DeviceInfo | None = None) -> Any:
    """`Backend`'s `compile_source` on a Mac: the torch.mps library of `source`, through the disk tier."""
    mps = mps if mps is not None else torch.mps
    device = device if device is not None else detect()
    if device is None:
        raise RuntimeError("the mps backend needs a Mac where torch.backends.mps.is_available()")
    load = _metallib_loader(mps)
    if load is not None:
        key = library_key(source, device)
        data = _disk.load(key)
        if data is None and has_toolchain(run):
            data = precompile(source, device.metal_language, run)
            if data is not None:
                record_compile()
                _disk.store(key, data)
        if data is not None:
            try:
                return load(data)
            except Exception:  # a metallib this runtime refuses: compile from source instead
                pass
    record_compile()
    return mps.compile_shader(source)
