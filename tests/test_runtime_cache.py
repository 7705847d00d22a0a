"""The disk tier under real files and real processes: corruption, an unwritable directory, concurrent
writers, eviction; and the memory tier's build-once guarantee under threads."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest

from flash_attn_metal.runtime.cache import DiskCache, MemoryCache, cache_dir, cache_key


def test_round_trip_and_corruption(tmp_path):
    cache = DiskCache("t", root=tmp_path)
    assert cache.load("k") is None
    cache.store("k", b"payload")
    assert cache.load("k") == b"payload"
    entry = tmp_path / "t" / "k"
    data = bytearray(entry.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the payload
    entry.write_bytes(bytes(data))
    assert cache.load("k") is None and not entry.exists()  # detected and discarded


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_unwritable_directory_warns_once_and_goes_on(tmp_path):
    tmp_path.chmod(0o500)
    try:
        cache = DiskCache("t", root=tmp_path)
        with pytest.warns(RuntimeWarning, match="not writable"):
            cache.store("a", b"x")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            cache.store("b", b"y")  # the second failure is silent
        assert cache.load("a") is None
    finally:
        tmp_path.chmod(0o700)


def test_a_file_where_the_directory_should_be_is_survived(tmp_path):
    (tmp_path / "t").write_text("not a directory")
    cache = DiskCache("t", root=tmp_path)
    with pytest.warns(RuntimeWarning, match="not writable"):
        cache.store("a", b"x")
    assert cache.load("a") is None


WRITER = r"""
import sys
from pathlib import Path
from flash_attn_metal.runtime.cache import DiskCache
cache = DiskCache("t", root=Path(sys.argv[1]))
for i in range(200):
    key = f"k{i % 10}"
    cache.store(key, (key * 1000).encode())
    data = cache.load(key)
    assert data is None or data == (key * 1000).encode(), "a torn entry was read"
"""


def test_concurrent_processes_never_corrupt_entries(tmp_path):
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], env=env, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    cache = DiskCache("t", root=tmp_path)
    assert all(cache.load(f"k{i}") == (f"k{i}" * 1000).encode() for i in range(10))


def test_size_bound_evicts_least_recently_used(tmp_path):
    cache = DiskCache("t", root=tmp_path, max_bytes=3 * 1100)
    for i, key in enumerate(("a", "b", "c")):
        cache.store(key, bytes(1000))
        os.utime(tmp_path / "t" / key, (1000 + i, 1000 + i))
    cache.load("a")  # used: now the newest
    cache.store("d", bytes(1000))
    assert cache.load("b") is None  # the oldest went
    assert all(cache.load(k) is not None for k in ("a", "c", "d"))


def test_memory_tier_builds_once_under_threads():
    cache = MemoryCache()
    calls = []
    barrier = threading.Barrier(8)

    def build():
        calls.append(1)
        return object()

    results = []

    def worker():
        barrier.wait()
        results.append(cache.get_or_create("k", build))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and all(r is results[0] for r in results)


def test_cache_dir_and_keys(monkeypatch, tmp_path):
    monkeypatch.setenv("FLASH_ATTN_METAL_CACHE_DIR", str(tmp_path))
    assert cache_dir() == tmp_path
    assert cache_key(a=1, b=b"x") == cache_key(b=b"x", a=1) != cache_key(a=2, b=b"x")
