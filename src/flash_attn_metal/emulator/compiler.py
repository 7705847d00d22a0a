"""The host C++ compiler the emulator preprocesses MSL with and builds the CPU translation with."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

from .. import settings
from .errors import EmulatorUnavailable


def compiler() -> tuple[str, str]:
    """The C++ compiler (FLASH_ATTN_METAL_CXX, else the first of g++, clang++, c++ on PATH) and its version line,
    which is part of every cache key. Raises EmulatorUnavailable, in one line, when there is none that runs."""
    return _compiler(os.environ.get(settings.CXX) or None)


@functools.cache
def _compiler(setting: str | None) -> tuple[str, str]:
    if setting is None:
        cxx = shutil.which("g++") or shutil.which("clang++") or shutil.which("c++")
        if cxx is None:
            raise EmulatorUnavailable(f"the Metal emulator needs a C++17 compiler: install g++ or clang++, or set "
                                      f"{settings.CXX} to one")
        where = f"{cxx!r} (found on PATH; set {settings.CXX} to use another)"
    else:
        cxx, where = setting, f"{setting!r} (from {settings.CXX})"
    try:
        result = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise EmulatorUnavailable(f"the Metal emulator's C++ compiler {where} cannot run: {reason}") from None
    lines = result.stdout.splitlines()
    if result.returncode != 0 or not lines:
        raise EmulatorUnavailable(f"the Metal emulator's C++ compiler {where} failed on --version "
                                  f"(exit status {result.returncode})")
    return cxx, lines[0]


def broken(cxx: str, detail: str) -> EmulatorUnavailable:
    """The error for a compiler that runs but cannot do its job."""
    where = f"{cxx!r} (from {settings.CXX})" if os.environ.get(settings.CXX) else repr(cxx)
    return EmulatorUnavailable(f"the Metal emulator's C++ compiler {where} cannot build C++17 shared objects: {detail}")
