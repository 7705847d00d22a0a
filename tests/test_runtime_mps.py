"""The Mac backend's logic on Linux, with fakes for torch.mps and Xcode's toolchain: the metallib disk tier and its
fallbacks, the cache key, and the call path from `get_backend("mps")` down to torch.mps's argument binding."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import flash_attn_metal
from flash_attn_metal.runtime import mps as mps_backend
from flash_attn_metal.runtime.backend import get_backend
from flash_attn_metal.runtime.cache import DiskCache
from flash_attn_metal.runtime.device import describe

SOURCE = "kernel void k(device float* o) { o[0] = 1.0f; }"
M3_MAX = describe("Apple M3 Max", 40, "15.3")


class FakeKernel:
    """Binds arguments as torch.mps's MetalKernelFunction does (OptionalArgCaster): a tensor its storage at its
    storage offset in bytes, an int 8 bytes, a float 4 bytes, a list the packed values of its first element's type."""

    def __init__(self, launches: list) -> None:
        self.launches = launches

    def __call__(self, *args, threads=None, group_size=None):
        bound = []
        for a in args:
            if isinstance(a, torch.Tensor):
                bound.append(("buffer", a.untyped_storage().data_ptr(), a.storage_offset() * a.element_size()))
            elif isinstance(a, (list, tuple)):
                fmt = "f" if isinstance(a[0], float) else "q"
                bound.append(("bytes", struct.pack(f"<{len(a)}{fmt}", *a)))
            else:
                bound.append(("bytes", struct.pack("<f" if isinstance(a, float) else "<q", a)))
        self.launches.append((bound, threads, group_size))


class FakeLibrary:
    def __init__(self, mps: "FakeMps") -> None:
        self.mps = mps

    def __getattr__(self, name: str) -> FakeKernel:
        self.mps.lookups += 1  # like torch.mps, each lookup makes a new kernel object
        return FakeKernel(self.mps.launches)


class FakeMps:
    def __init__(self, refuse_metallib: bool = False) -> None:
        self.loaded: list[bytes] = []
        self.compiled: list[str] = []
        self.launches: list = []
        self.lookups = 0
        self.refuse = refuse_metallib

    def load_metallib(self, data: bytes) -> FakeLibrary:
        if self.refuse:
            raise RuntimeError("incompatible metallib")
        self.loaded.append(data)
        return FakeLibrary(self)

    def compile_shader(self, source: str) -> FakeLibrary:
        self.compiled.append(source)
        return FakeLibrary(self)

    def synchronize(self) -> None:
        raise AssertionError("the call path must not synchronise")


class NoLoaderMps(FakeMps):
    load_metallib = None  # torch without torch.mps.load_metallib


def fake_xcrun(found: bool = True, compiles: bool = True, error: Exception | None = None, error_at: str = "--find"):
    """subprocess.run for `xcrun`: `--find` succeeds when `found`; `metal` and `metallib` write their outputs
    when `compiles`; `error` is raised by the step whose fourth word is `error_at`."""
    steps: list[list[str]] = []

    def run(cmd, capture_output=True, timeout=None):
        steps.append(cmd)
        if error is not None and cmd[3] == error_at:
            raise error
        if cmd[3] == "--find":
            return SimpleNamespace(returncode=0 if found else 1)
        if not compiles:
            return SimpleNamespace(returncode=1)
        if cmd[3] == "metal":
            Path(cmd[-1]).write_bytes(b"AIR:" + Path(cmd[-3]).read_bytes())
        else:
            Path(cmd[-1]).write_bytes(b"METALLIB:" + Path(cmd[4]).read_bytes())
        return SimpleNamespace(returncode=0)

    return run, steps


@pytest.fixture(autouse=True)
def fresh_disk(monkeypatch, tmp_path):
    monkeypatch.setattr(mps_backend, "_disk", DiskCache("metallib", root=tmp_path))
    monkeypatch.delenv("PYTORCH_MPS_FAST_MATH", raising=False)
    flash_attn_metal.reset_stats()


def test_precompiles_once_then_loads_from_disk():
    run, steps = fake_xcrun()
    fake = FakeMps()
    mps_backend.compile_library(SOURCE, mps=fake, run=run, device=M3_MAX)
    metal = next(s for s in steps if s[3] == "metal")
    assert metal[:6] == ["xcrun", "-sdk", "macosx", "metal", "-std=metal3.2", "-fno-fast-math"]
    assert metal[6] == f"-I{Path(torch.__file__).parent / 'include'}"  # includes resolve as in compile_shader
    assert fake.loaded == [b"METALLIB:AIR:" + SOURCE.encode()] and not fake.compiled
    run2, steps2 = fake_xcrun()
    mps_backend.compile_library(SOURCE, mps=fake, run=run2, device=M3_MAX)  # as a later process would
    assert steps2 == [] and len(fake.loaded) == 2
    assert flash_attn_metal.stats()["compiles"] == 1 and flash_attn_metal.stats()["cache_hits"]["disk"] == 1


@pytest.mark.parametrize("case", ["no toolchain", "xcrun missing", "compile fails", "compile times out"])
def test_precompile_trouble_falls_back_silently_to_run_time_compilation(case, recwarn):
    run, steps = {
        "no toolchain": fake_xcrun(found=False),
        "xcrun missing": fake_xcrun(error=FileNotFoundError("xcrun")),
        "compile fails": fake_xcrun(compiles=False),
        "compile times out": fake_xcrun(error=subprocess.TimeoutExpired("xcrun", 300), error_at="metal"),
    }[case]
    fake = FakeMps()
    mps_backend.compile_library(SOURCE, mps=fake, run=run, device=M3_MAX)
    assert fake.compiled == [SOURCE] and not fake.loaded
    tried_to_compile = any(s[3] == "metal" for s in steps)
    assert tried_to_compile == case.startswith("compile")
    assert mps_backend._disk.entries() == [] and len(recwarn) == 0
    assert flash_attn_metal.stats()["compiles"] == 1


def test_a_refused_metallib_falls_back_to_run_time_compilation():
    run, _ = fake_xcrun()
    refusing = FakeMps(refuse_metallib=True)
    mps_backend.compile_library(SOURCE, mps=refusing, run=run, device=M3_MAX)
    assert refusing.compiled == [SOURCE]


def test_without_load_metallib_nothing_is_precompiled(monkeypatch):
    monkeypatch.delattr(torch._C, "_mps_loadMetalllib", raising=False)
    run, steps = fake_xcrun()
    fake = NoLoaderMps()
    mps_backend.compile_library(SOURCE, mps=fake, run=run, device=M3_MAX)
    assert steps == [] and fake.compiled == [SOURCE]


def test_torch_2_12s_private_loader_is_used(monkeypatch):
    loaded = []
    monkeypatch.setattr(torch._C, "_mps_loadMetalllib", lambda data: loaded.append(data) or "library", raising=False)
    run, _ = fake_xcrun()
    fake = NoLoaderMps()
    assert mps_backend.compile_library(SOURCE, mps=fake, run=run, device=M3_MAX) == "library"
    assert loaded and not fake.compiled


def test_cache_key_separates_everything_a_metallib_depends_on(monkeypatch):
    key = mps_backend.library_key(SOURCE, M3_MAX)
    assert key == mps_backend.library_key(SOURCE, describe("Apple M3 Max", 40, "15.3"))
    others = {
        mps_backend.library_key(SOURCE + " ", M3_MAX),
        mps_backend.library_key(SOURCE, describe("Apple M3 Pro", 18, "15.3")),
        mps_backend.library_key(SOURCE, describe("Apple M3 Max", 40, "15.4")),
        mps_backend.library_key(SOURCE, describe("Apple M3 Max", 40, "26.0")),
    }
    monkeypatch.setattr(mps_backend, "__version__", "99.0")
    others.add(mps_backend.library_key(SOURCE, M3_MAX))
    monkeypatch.setattr(mps_backend, "__version__", flash_attn_metal.__version__)
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    others.add(mps_backend.library_key(SOURCE, M3_MAX))
    monkeypatch.setattr(torch, "__version__", torch.__version__)
    monkeypatch.setenv("PYTORCH_MPS_FAST_MATH", "1")
    others.add(mps_backend.library_key(SOURCE, M3_MAX))
    assert len(others) == 7 and key not in others


def test_off_a_mac_the_mps_backend_says_so():
    with pytest.raises(RuntimeError, match="needs a Mac"):
        mps_backend.compile_library(SOURCE, mps=FakeMps())


def test_the_call_path_from_get_backend_to_torch_mps(monkeypatch):
    """Positional argument i binds buffer i; a view binds its storage at its offset; ints bind 8 bytes, floats 4,
    lists pack many scalars; the kernel object is looked up once; nothing synchronises; one compile per source."""
    fake = FakeMps()
    for name in ("compile_shader", "load_metallib", "synchronize"):
        monkeypatch.setattr(torch.mps, name, getattr(fake, name))
    monkeypatch.setattr(mps_backend, "detect", lambda: M3_MAX)
    monkeypatch.setattr(mps_backend, "has_toolchain", lambda run=None: False)
    source = SOURCE + " // call path"
    x = torch.arange(12.0)
    view = x[4:]
    for _ in range(2):
        library = get_backend("mps").compile(source)
        library.k(view, x, 3, 0.5, [1, 2, 3], [0.25, 2.0], threads=[64, 4, 2], group_size=[32, 1, 1])
    assert fake.compiled == [source] and fake.lookups == 1
    bound, threads, group = fake.launches[0]
    storage = x.untyped_storage().data_ptr()
    assert bound == [
        ("buffer", storage, 16), ("buffer", storage, 0),
        ("bytes", struct.pack("<q", 3)), ("bytes", struct.pack("<f", 0.5)),
        ("bytes", struct.pack("<3q", 1, 2, 3)), ("bytes", struct.pack("<2f", 0.25, 2.0)),
    ]
    assert (threads, group) == ([64, 4, 2], [32, 1, 1]) and fake.launches[1] == fake.launches[0]
    assert flash_attn_metal.stats()["launches"] == {"k": 2} and flash_attn_metal.stats()["compiles"] == 1
