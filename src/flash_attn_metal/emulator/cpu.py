"""Run MSL on the CPU: the translation is built by a C++ compiler into a shared object whose fibers run the
Metal threads (include/msl_cpu.h). Threadgroups are spread over the cores by Python threads (ctypes
releases the GIL); a kernel that uses atomics runs on one thread, so every run is deterministic."""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import re
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .. import settings
from ..stats import record_compile
from ..runtime.cache import DiskCache, MemoryCache, cache_key
from .compiler import broken as broken_compiler, compiler
from .errors import Diagnostic, KernelExecutionError, MSLCompileError, UnsupportedMSL
from .library import Bound, KernelFunction, Library, fill_launch
from .preprocess import MSL_FILE
from .translate import Translation

INCLUDE_DIR = Path(__file__).parent / "include"
# -O1 builds a FlashAttention-sized kernel several times faster than -O2 and runs it nearly as fast. Metal's char
# is signed, as g++'s is on x86-64 but not on arm64 Linux.
CXX_FLAGS = ("-std=c++17", "-O1", "-fPIC", "-shared", "-fno-exceptions", "-fno-rtti", "-fno-strict-aliasing",
             "-fsigned-char", "-w")
# FLASH_ATTN_METAL_EMULATOR_FAST_MATH=1: what Metal's fast math allows (no NaN or infinity, reassociation).
FAST_MATH_FLAGS = ("-ffast-math",)
ERROR_BYTES = 1024


@functools.cache
def _headers_digest() -> str:
    return cache_key(**{p.name: p.read_bytes() for p in sorted(INCLUDE_DIR.glob("*.h"))})


def _workers() -> int:
    """FLASH_ATTN_METAL_EMULATOR_THREADS (a positive integer; default: every core), read at each launch."""
    value = os.environ.get(settings.EMULATOR_THREADS, "").strip()
    if not value:
        return os.cpu_count() or 1
    try:
        workers = int(value)
    except ValueError:
        workers = 0
    if workers < 1:
        raise ValueError(f"{settings.EMULATOR_THREADS} must be a positive integer (the CPU emulator's worker "
                         f"threads), got {value!r}")
    return workers


_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    """This process's pool of `workers` threads. A forked child builds its own: the parent's threads do not exist
    in it."""
    key = (os.getpid(), workers)
    pool = _pools.get(key)
    if pool is None:
        with _pools_lock:
            pool = _pools.get(key)
            if pool is None:
                pool = _pools[key] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="msl-emulator")
    return pool


def _forget_pools_after_fork() -> None:
    global _pools_lock
    _pools.clear()  # the parent's pools; their threads did not survive the fork
    _pools_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_pools_after_fork)


class _Workspace(threading.local):
    """The memory an OS thread runs threadgroups in (msl::cpu::Workspace and the fiber stacks): an anonymous
    mapping, so untouched stack pages cost nothing, unmapped when the thread ends."""

    memory: mmap.mmap | None = None
    threads: int = 0

    def address(self, so: ctypes.CDLL, threads: int) -> int:
        if threads > self.threads:
            size = so.msl_workspace_bytes(ctypes.c_uint32(threads))
            self.memory = mmap.mmap(-1, size)
            self.view = ctypes.c_char.from_buffer(self.memory)
            self.threads = threads
        return ctypes.addressof(self.view)


_workspace = _Workspace()
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


def _flags(debug: bool, fast_math: bool) -> tuple[str, ...]:
    return CXX_FLAGS + (("-DMSL_DEBUG",) if debug else ()) + (FAST_MATH_FLAGS if fast_math else ())


def _compile(cpp: str, cxx: str, flags: tuple[str, ...]) -> bytes:
    with tempfile.TemporaryDirectory(prefix="msl-emulator-") as tmp:
        src = Path(tmp) / "kernel.cpp"
        out = Path(tmp) / "kernel.so"
        src.write_text(cpp)
        try:
            result = subprocess.run([cxx, *flags, f"-I{INCLUDE_DIR}", str(src), "-o", str(out)],
                                    capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
        except OSError as exc:  # removed or made unrunnable since its --version ran
            raise broken_compiler(cxx, exc.strerror or str(exc)) from None
        if result.returncode != 0:
            diagnostics = [d for d in _diagnostics(result.stderr) if d.severity == "error"]
            undeclared = _undeclared_re.search(diagnostics[0].message) if diagnostics else None
            if undeclared:  # a name neither the source nor the emulator's Metal library declares
                raise UnsupportedMSL(undeclared.group(1), diagnostics[0].line, diagnostics[0].message)
            if not diagnostics:
                if not _builds_shared_objects(cxx, flags):
                    raise broken_compiler(cxx, _last_line(result.stderr))
                diagnostics = [Diagnostic(0, 0, "error", result.stderr.strip()[-2000:])]
            raise MSLCompileError(diagnostics, "the emulator could not compile this MSL")
        if not out.is_file():
            raise broken_compiler(cxx, "it exited with status 0 but wrote no shared object")
        record_compile()
        return out.read_bytes()


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"


@functools.cache
def _builds_shared_objects(cxx: str, flags: tuple[str, ...]) -> bool:
    """Whether the compiler builds a trivial C++17 shared object with the emulator's flags."""
    with tempfile.TemporaryDirectory(prefix="msl-emulator-") as tmp:
        src, out = Path(tmp) / "probe.cpp", Path(tmp) / "probe.so"
        src.write_text('constexpr int f() { return 1; }\nextern "C" int probe() { return f(); }\n')
        try:
            result = subprocess.run([cxx, *flags, str(src), "-o", str(out)], capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError):
            return False
        return result.returncode == 0 and out.is_file()


def _load(data: bytes) -> ctypes.CDLL:
    fd, path = tempfile.mkstemp(prefix="msl-emulator-", suffix=".so")
    try:
        os.write(fd, data)
        os.close(fd)
        so = ctypes.CDLL(path)
    finally:
        os.unlink(path)
    so.msl_workspace_bytes.restype = ctypes.c_uint64
    return so


def _shared_object(cpp: str, debug: bool, fast_math: bool) -> ctypes.CDLL:
    cxx, version = compiler()
    flags = _flags(debug, fast_math)
    key = cache_key(source=cpp, headers=_headers_digest(), compiler=version, flags=flags)

    def build() -> ctypes.CDLL:
        data = _disk.load(key)
        if data is None:
            data = _compile(cpp, cxx, flags)
            _disk.store(key, data)
        return _load(data)

    return _objects.get_or_create(key, build)


def _host_values(b: Bound) -> tuple[int, int, object]:
    values = ((ctypes.c_float if b.is_float else ctypes.c_int64) * len(b.values))(*b.values)
    return ctypes.addressof(values), ctypes.sizeof(values), values


class CpuLibrary(Library):
    device_type = "cpu"

    def __init__(self, translation: Translation, debug: bool, fast_math: bool = False) -> None:
        super().__init__(translation.kernels)
        self._so = _shared_object(translation.cpp, debug, fast_math)
        self._serial = translation.uses_atomics

    def _limits(self, name: str) -> tuple[int, int]:
        threadgroup_bytes = getattr(self._so, f"msl_threadgroup_bytes_{name}")
        threadgroup_bytes.restype = ctypes.c_uint64
        max_threads = getattr(self._so, f"msl_max_threads_{name}")
        max_threads.restype = ctypes.c_uint32
        return int(threadgroup_bytes()), int(max_threads())

    def _run(self, kernel: KernelFunction, bound: list[Bound], grid: tuple, group: tuple) -> None:
        workers = 1 if self._serial else _workers()  # validated before anything runs
        launch, owners = fill_launch(bound, grid, group, _host_values)
        groups = 1
        for t, g in zip(grid, group):
            groups *= -(-t // g)
        threads = group[0] * group[1] * group[2]
        entry = getattr(self._so, f"msl_launch_{kernel.info.name}")
        workers = min(workers, groups)
        bounds = [groups * w // workers for w in range(workers + 1)]

        def run(first: int, last: int) -> str | None:
            error = ctypes.create_string_buffer(ERROR_BYTES)
            rc = entry(ctypes.byref(launch), ctypes.c_uint32(first), ctypes.c_uint32(last), error, ERROR_BYTES,
                       ctypes.c_void_p(_workspace.address(self._so, threads)))
            return error.value.decode(errors="replace") if rc else None

        if workers == 1:
            errors = [run(0, groups)]
        else:
            errors = list(_pool(workers).map(run, bounds[:-1], bounds[1:]))
        message = next((e for e in errors if e), None)
        if message:
            raise KernelExecutionError(message)
        del owners
