"""The Mac backend: a thin shell over `torch.mps`.

A library comes, in order, from: the disk tier (a `.metallib` precompiled earlier), a fresh precompile with
Xcode's toolchain (`xcrun -sdk macosx metal` then `metallib`, stored on disk), or run-time compilation with
`torch.mps.compile_shader` when there is no toolchain or precompiling fails. Kernels encode on PyTorch's
current MPS stream (torch.mps does this); nothing here synchronises.

Everything that decides is plain Python over injectable `run` (subprocess) and `mps` (torch.mps) so
Linux tests reach it; only the calls into them are Mac-only.
"""

from __future__ import annotations

import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from .._version import __version__
from ..stats import record_compile
from .cache import DiskCache, cache_key
from .device import gpu_family

_disk = DiskCache("metallib")


def metal_language_version(macos: str) -> str:
    """The Metal language PyTorch compiles with on this macOS (bfloat needs 3.1, macOS 14)."""
    major = int(macos.split(".")[0]) if macos else 0
    return "4.0" if major >= 26 else "3.2" if major >= 15 else "3.1"


def library_key(source: str, device_name: str, macos: str) -> str:
    return cache_key(source=source, device=device_name, family=gpu_family(), macos=macos, package=__version__,
                     torch=torch.__version__, metal=metal_language_version(macos))


def precompile(source: str, macos: str, run: Callable[..., Any] = subprocess.run) -> bytes | None:
    """MSL -> .metallib bytes with Xcode's toolchain, or None (no toolchain, or it failed)."""
    with tempfile.TemporaryDirectory(prefix="flash-attn-metal-") as tmp:
        metal, air, lib = Path(tmp, "kernel.metal"), Path(tmp, "kernel.air"), Path(tmp, "kernel.metallib")
        metal.write_text(source)
        steps = (
            ["xcrun", "-sdk", "macosx", "metal", f"-std=metal{metal_language_version(macos)}", "-c", str(metal), "-o", str(air)],
            ["xcrun", "-sdk", "macosx", "metallib", str(air), "-o", str(lib)],
        )
        for step in steps:
            try:
                if run(step, capture_output=True).returncode != 0:
                    return None
            except OSError:
                return None
        return lib.read_bytes() if lib.exists() else None


def _load_metallib(mps: Any, data: bytes) -> Any:
    loader = getattr(mps, "load_metallib", None)
    if loader is not None:
        return loader(data)
    return torch._C._mps_loadMetalllib(data)  # torch 2.12: the private binding (note the triple l)


def compile_library(source: str, *, mps: Any = None, run: Callable[..., Any] = subprocess.run,
                    device_name: str | None = None, macos: str | None = None) -> Any:
    mps = mps if mps is not None else torch.mps
    macos = macos if macos is not None else platform.mac_ver()[0]
    device_name = device_name if device_name is not None else torch.backends.mps.get_name()
    key = library_key(source, device_name, macos)
    data = _disk.load(key)
    if data is None:
        data = precompile(source, macos, run)
        if data is not None:
            record_compile()
            _disk.store(key, data)
    if data is not None:
        try:
            return _load_metallib(mps, data)
        except Exception:  # a metallib this runtime refuses: compile from source instead
            pass
    record_compile()
    return mps.compile_shader(source)
