"""The backend protocol with a fake implementation: tier 1 compiles once per source, kernel objects are looked up
once, launches pass their arguments through unchanged and are counted; `get_backend` and the emulator adapter."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import flash_attn_metal
import flash_attn_metal.emulator
from flash_attn_metal.runtime import backend as backend_module
from flash_attn_metal.runtime.backend import BACKEND_NAMES, Backend, get_backend
from flash_attn_metal.runtime.emulator_backend import emulator_compiler


class FakeKernel:
    max_threads_per_threadgroup = 1024

    def __init__(self, calls: list) -> None:
        self.calls = calls

    def __call__(self, *args, threads=None, group_size=None):
        self.calls.append((args, threads, group_size))


class BrokenKernel:
    def __call__(self, *args, threads=None, group_size=None):
        raise TypeError("unsupported argument")


class FakeCompiled:
    """Like torch.mps's library: every attribute lookup makes a new kernel object."""

    def __init__(self) -> None:
        self.lookups: list[str] = []
        self.calls: list = []

    def __getattr__(self, name: str) -> FakeKernel:
        if name.startswith("_") or name == "missing":
            raise AttributeError(name)
        self.lookups.append(name)
        return BrokenKernel() if name == "broken" else FakeKernel(self.calls)

    def __dir__(self) -> list[str]:
        return ["add", "scale"]


class FakeCompiler:
    def __init__(self) -> None:
        self.sources: list[str] = []

    def __call__(self, source: str) -> FakeCompiled:
        self.sources.append(source)
        time.sleep(0.02)  # threads asking meanwhile must wait, not compile again
        return FakeCompiled()


@pytest.fixture(autouse=True)
def fresh_stats():
    flash_attn_metal.reset_stats()


def test_compile_once_per_source_under_threads():
    compiler = FakeCompiler()
    backend = Backend("fake", compiler)
    libraries = []
    barrier = threading.Barrier(6)

    def worker():
        barrier.wait()
        libraries.append(backend.compile("kernel void add() {}"))

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert compiler.sources == ["kernel void add() {}"] and all(lib is libraries[0] for lib in libraries)
    assert flash_attn_metal.stats()["cache_hits"]["memory"] == 5
    assert backend.compile("kernel void scale() {}") is not libraries[0] and len(compiler.sources) == 2
    other = Backend("other", compiler)  # another backend has its own tier 1
    other.compile("kernel void add() {}")
    assert len(compiler.sources) == 3


def test_compile_needs_source_text():
    with pytest.raises(TypeError, match="source must be MSL text"):
        Backend("fake", FakeCompiler()).compile(b"kernel void add() {}")


def test_launches_pass_arguments_through_and_are_counted():
    library = Backend("fake", FakeCompiler()).compile("src")
    compiled = library._compiled
    buffer, ints, floats = object(), [1, 2, 3], [0.5]
    for _ in range(3):
        library.add(buffer, 7, 2.5, ints, floats, threads=[64, 2, 1], group_size=[32, 1, 1])
    library.scale(buffer)
    (args, threads, group), *_ = compiled.calls
    assert args[0] is buffer and args[1:3] == (7, 2.5) and args[3] is ints and args[4] is floats
    assert (threads, group) == ([64, 2, 1], [32, 1, 1])
    assert compiled.calls[-1] == ((buffer,), None, None)  # torch.mps's defaults stay the kernel's to apply
    assert compiled.lookups == ["add", "scale"]  # one kernel object per name, not one per launch
    assert library.add is library.add
    assert flash_attn_metal.stats()["launches"] == {"add": 3, "scale": 1}


def test_kernel_properties_and_missing_kernels():
    library = Backend("fake", FakeCompiler()).compile("src")
    assert library.add.max_threads_per_threadgroup == 1024 and library.add.name == "add"
    assert dir(library) == ["add", "scale"]
    with pytest.raises(AttributeError):
        library.missing
    with pytest.raises(AttributeError):
        library._private
    with pytest.raises(AttributeError):
        library.add._hidden
    assert flash_attn_metal.stats()["launches"] == {}


def test_a_failed_launch_is_not_counted():
    library = Backend("fake", FakeCompiler()).compile("src")
    with pytest.raises(TypeError, match="unsupported argument"):
        library.broken(1)
    assert flash_attn_metal.stats()["launches"] == {}


def test_get_backend_names(monkeypatch):
    monkeypatch.delenv("FLASH_ATTN_METAL_EMULATOR_DEBUG", raising=False)
    assert all(get_backend(n) is get_backend(n) and get_backend(n).name == n for n in BACKEND_NAMES)
    assert len({id(get_backend(n)) for n in BACKEND_NAMES}) == 3
    with pytest.raises(ValueError, match="backend must be one of 'mps', 'emulator', 'cuda-emulator', got 'metal'"):
        get_backend("metal")


def test_emulator_debug_builds_are_a_backend_of_their_own(monkeypatch):
    monkeypatch.setenv("FLASH_ATTN_METAL_EMULATOR_DEBUG", "0")
    normal, mps = get_backend("emulator"), get_backend("mps")
    monkeypatch.setenv("FLASH_ATTN_METAL_EMULATOR_DEBUG", "1")
    assert get_backend("emulator") is not normal and get_backend("mps") is mps


def test_the_emulator_adapter_maps_backends_to_emulator_devices(monkeypatch):
    seen = []
    monkeypatch.setattr(flash_attn_metal.emulator, "compile_shader", lambda source, device="cpu": seen.append(
        (source, device)) or FakeCompiled())
    emulator_compiler("cpu")("a")
    backend_module._backend("cuda-emulator", False)._compile_source("b")
    assert seen == [("a", "cpu"), ("b", "cuda")]
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        emulator_compiler("metal")


LAZY = r"""
import sys
from flash_attn_metal.runtime import get_backend
for name in ("mps", "emulator", "cuda-emulator"):
    get_backend(name)
print("emulator imported" if "flash_attn_metal.emulator" in sys.modules else "emulator not imported")
"""


def test_backends_import_the_emulator_only_to_compile():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    out = subprocess.run([sys.executable, "-c", LAZY], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "emulator not imported"
