"""The Mac backend's logic, on Linux, with fakes for torch.mps and Xcode's toolchain."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

import flash_attn_metal
from flash_attn_metal.runtime import mps as mps_backend
from flash_attn_metal.runtime.backend import Library
from flash_attn_metal.runtime.cache import DiskCache

SOURCE = "kernel void k(device float* o) { o[0] = 1.0f; }"


class FakeMps:
    def __init__(self, refuse_metallib=False):
        self.loaded, self.compiled = [], []
        self.refuse = refuse_metallib

    def load_metallib(self, data):
        if self.refuse:
            raise RuntimeError("incompatible metallib")
        self.loaded.append(data)
        return SimpleNamespace(k=lambda *a, **kw: self.calls.append((a, kw)))

    def compile_shader(self, source):
        self.compiled.append(source)
        return SimpleNamespace(k=lambda *a, **kw: self.calls.append((a, kw)))

    calls: list = []


def fake_xcrun(works=True):
    steps = []

    def run(cmd, capture_output=True):
        steps.append(cmd)
        if works and cmd[3] == "metallib":
            Path(cmd[-1]).write_bytes(b"METALLIB:" + Path(cmd[4]).read_bytes())
        elif works:
            Path(cmd[-1]).write_bytes(Path(cmd[-3]).read_bytes())
        return SimpleNamespace(returncode=0 if works else 1)

    return run, steps


@pytest.fixture(autouse=True)
def fresh_disk(monkeypatch, tmp_path):
    monkeypatch.setattr(mps_backend, "_disk", DiskCache("metallib", root=tmp_path))
    flash_attn_metal.reset_stats()


def test_precompiles_once_then_loads_from_disk():
    run, steps = fake_xcrun()
    fake = FakeMps()
    mps_backend.compile_library(SOURCE, mps=fake, run=run, device_name="Apple M3 Max", macos="15.3")
    assert steps[0][:5] == ["xcrun", "-sdk", "macosx", "metal", "-std=metal3.2"] and fake.loaded and not fake.compiled
    run2, steps2 = fake_xcrun()
    mps_backend.compile_library(SOURCE, mps=fake, run=run2, device_name="Apple M3 Max", macos="15.3")
    assert steps2 == [] and len(fake.loaded) == 2  # the second process-level call hit the disk tier
    assert flash_attn_metal.stats()["compiles"] == 1 and flash_attn_metal.stats()["cache_hits"]["disk"] == 1


def test_no_toolchain_or_a_refused_metallib_falls_back_to_run_time_compilation():
    run, _ = fake_xcrun(works=False)
    fake = FakeMps()
    mps_backend.compile_library(SOURCE, mps=fake, run=run, device_name="Apple M1", macos="14.5")
    assert fake.compiled == [SOURCE] and not fake.loaded
    refusing = FakeMps(refuse_metallib=True)
    run, _ = fake_xcrun()
    mps_backend.compile_library(SOURCE, mps=refusing, run=run, device_name="Apple M1", macos="14.5")
    assert refusing.compiled == [SOURCE]


def test_cache_key_separates_devices_and_os_versions():
    a = mps_backend.library_key(SOURCE, "Apple M1", "14.5")
    assert a == mps_backend.library_key(SOURCE, "Apple M1", "14.5")
    assert a != mps_backend.library_key(SOURCE, "Apple M2", "14.5") != mps_backend.library_key(SOURCE, "Apple M1", "15.0")
    assert [mps_backend.metal_language_version(v) for v in ("14.0", "15.1", "26.0")] == ["3.1", "3.2", "4.0"]


def test_library_caches_kernel_objects_and_counts_launches():
    fake = FakeMps()
    lib = Library(fake.compile_shader(SOURCE))
    assert lib.k is lib.k  # one wrapper per kernel, not one per attribute lookup
    lib.k(1, [2, 3], 4.0, threads=[32], group_size=[32])
    assert FakeMps.calls[-1] == ((1, [2, 3], 4.0), {"threads": [32], "group_size": [32]})
    assert flash_attn_metal.stats()["launches"] == {"k": 1}
