"""Run MSL on the CPU: the translation is built by a C++ compiler into a shared object whose fibers run the
Metal threads (include/msl_cpu.h). Threadgroups are spread over the cores by Python threads (ctypes
releases the GIL); a kernel that uses atomics runs on one thread, so every run is deterministic."""

from __future__ import annotations

import ctypes
import functools
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .. import settings
from ..stats import record_compile
from ..runtime.cache import DiskCache, MemoryCache, cache_key
from .errors import Diagnostic, KernelExecutionError, MSLCompileError, UnsupportedMSL
from .library import Bound, KernelFunction, Library, fill_launch
from .translate import MSL_FILE, Translation

INCLUDE_DIR = Path(__file__).parent / "include"
# -O1 builds a FlashAttention-sized kernel several times faster than -O2 and runs it nearly as fast.
CXX_FLAGS = ("-std=c++17", "-O1", "-fPIC", "-shared", "-fno-exceptions", "-fno-rtti", "-fno-strict-aliasing", "-w")
ERROR_BYTES = 1024


@functools.cache
def _compiler() -> tuple[str, str]:
    """The C++ compiler and its version line (part of every cache key)."""
    cxx = os.environ.get(settings.CXX) or shutil.which("g++") or shutil.which("clang++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("the Metal emulator needs a C++17 compiler (g++ or clang++); set FLASH_ATTN_METAL_CXX")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    return cxx, version


@functools.cache
def _headers_digest() -> str:
    return cache_key(**{p.name: p.read_bytes() for p in sorted(INCLUDE_DIR.glob("*.h"))})


def _workers() -> int:
    return int(os.environ.get(settings.EMULATOR_THREADS, os.cpu_count() or 1))


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=_workers(), thread_name_prefix="msl-emulator")


_objects: MemoryCache = MemoryCache()
_disk = DiskCache("emulator-cpu")
_diagnostic_re = re.compile(rf"^{re.escape(MSL_FILE)}:(\d+):(\d+): (error|warning): (.*)$")
_undeclared_re = re.compile(r"'([A-Za-z_]\w*)' (?:was not declared in this scope|is not a member of)")


def _diagnostics(output: str) -> list[Diagnostic]:
    found = []
    for line in output.splitlines():
        m = _diagnostic_re.match(line)
        if m:
            found.append(Diagnostic(int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)))
    return found


def _compile(cpp: str, debug: bool) -> bytes:
    cxx, _ = _compiler()
    with tempfile.TemporaryDirectory(prefix="msl-emulator-") as tmp:
        src = Path(tmp) / "kernel.cpp"
        out = Path(tmp) / "kernel.so"
        src.write_text(cpp)
        flags = list(CXX_FLAGS) + (["-DMSL_DEBUG"] if debug else [])
        result = subprocess.run([cxx, *flags, f"-I{INCLUDE_DIR}", str(src), "-o", str(out)],
                                capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
        if result.returncode != 0:
            diagnostics = [d for d in _diagnostics(result.stderr) if d.severity == "error"]
            undeclared = _undeclared_re.search(diagnostics[0].message) if diagnostics else None
            if undeclared:  # a name neither the source nor the emulator's Metal library declares
                raise UnsupportedMSL(undeclared.group(1), diagnostics[0].line, diagnostics[0].message)
            if not diagnostics:
                diagnostics = [Diagnostic(0, 0, "error", result.stderr.strip()[-2000:])]
            raise MSLCompileError(diagnostics, "the emulator could not compile this MSL")
        record_compile()
        return out.read_bytes()


def _load(data: bytes) -> ctypes.CDLL:
    fd, path = tempfile.mkstemp(prefix="msl-emulator-", suffix=".so")
    try:
        os.write(fd, data)
        os.close(fd)
        return ctypes.CDLL(path)
    finally:
        os.unlink(path)


def _shared_object(cpp: str, debug: bool) -> ctypes.CDLL:
    key = cache_key(source=cpp, headers=_headers_digest(), compiler=_compiler()[1], flags=CXX_FLAGS, debug=debug)

    def build() -> ctypes.CDLL:
        data = _disk.load(key)
        if data is None:
            data = _compile(cpp, debug)
            _disk.store(key, data)
        return _load(data)

    return _objects.get_or_create(key, build)


def _host_values(b: Bound) -> tuple[int, int, object]:
    values = ((ctypes.c_float if b.is_float else ctypes.c_int64) * len(b.values))(*b.values)
    return ctypes.addressof(values), ctypes.sizeof(values), values


class CpuLibrary(Library):
    device_type = "cpu"

    def __init__(self, translation: Translation, debug: bool) -> None:
        super().__init__(translation.kernels)
        self._so = _shared_object(translation.cpp, debug)
        self._serial = translation.uses_atomics

    def _threadgroup_bytes(self, name: str) -> int:
        fn = getattr(self._so, f"msl_threadgroup_bytes_{name}")
        fn.restype = ctypes.c_uint64
        return int(fn())

    def _run(self, kernel: KernelFunction, bound: list[Bound], grid: tuple, group: tuple) -> None:
        launch, owners = fill_launch(bound, grid, group, _host_values)
        groups = 1
        for t, g in zip(grid, group):
            groups *= -(-t // g)
        entry = getattr(self._so, f"msl_launch_{kernel.info.name}")
        workers = 1 if self._serial else min(_workers(), groups)
        bounds = [groups * w // workers for w in range(workers + 1)]

        def run(first: int, last: int) -> str | None:
            error = ctypes.create_string_buffer(ERROR_BYTES)
            rc = entry(ctypes.byref(launch), ctypes.c_uint32(first), ctypes.c_uint32(last), error, ERROR_BYTES)
            return error.value.decode(errors="replace") if rc else None

        if workers == 1:
            errors = [run(0, groups)]
        else:
            errors = list(_pool().map(run, bounds[:-1], bounds[1:]))
        message = next((e for e in errors if e), None)
        if message:
            raise KernelExecutionError(message)
        del owners

