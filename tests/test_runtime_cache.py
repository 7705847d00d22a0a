"""The kernel cache's two tiers with real files and real processes: checksums, atomic writes, an unwritable or
full directory, concurrent processes, eviction, the build-once memory tier, and the `cache` CLI's helpers."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

import flash_attn_metal
from flash_attn_metal.runtime import cache as cache_module
from flash_attn_metal.runtime.cache import DiskCache, MemoryCache, cache_dir, cache_info, cache_key, clear_cache

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    monkeypatch.setattr(cache_module, "_warned_unwritable", False)
    flash_attn_metal.reset_stats()


def python(script: str, *args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-c", script, *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def test_round_trip_counts_a_disk_hit(tmp_path):
    cache = DiskCache("t", root=tmp_path)
    assert cache.load("k") is None
    cache.store("k", b"payload")
    assert cache.load("k") == b"payload"
    assert flash_attn_metal.stats()["cache_hits"]["disk"] == 1  # the miss counted nothing
    assert [p.name for p in (tmp_path / "t").iterdir()] == ["k.v2"]  # no temporary file left behind


@pytest.mark.parametrize("damage", ["flipped bit", "truncated payload", "truncated header", "empty", "not ours"])
def test_damaged_entries_are_detected_discarded_and_rebuilt(tmp_path, damage):
    cache = DiskCache("t", root=tmp_path)
    cache.store("k", b"payload" * 100)
    entry = tmp_path / "t" / "k.v2"
    data = entry.read_bytes()
    damaged = {
        "flipped bit": data[:-1] + bytes([data[-1] ^ 1]),
        "truncated payload": data[:-7],
        "truncated header": data[:20],
        "empty": b"",
        "not ours": b"x" * len(data),
    }[damage]
    entry.write_bytes(damaged)
    assert cache.load("k") is None and not entry.exists()
    cache.store("k", b"rebuilt")
    assert cache.load("k") == b"rebuilt"


def test_stale_temporary_files_are_removed_and_fresh_ones_kept(tmp_path):
    cache = DiskCache("t", root=tmp_path)
    directory = tmp_path / "t"
    directory.mkdir()
    stale, fresh = directory / ".tmp-stale", directory / ".tmp-fresh"
    stale.write_bytes(b"left by a crash")
    fresh.write_bytes(b"another process is writing this")
    os.utime(stale, (time.time() - 2 * 3600,) * 2)
    cache.store("k", b"x")
    assert not stale.exists() and fresh.exists()
    assert cache.entries() == [directory / "k.v2"]  # temporary files are never entries


@pytest.mark.parametrize("name", ["../escape", "a/b", "", ".hidden", "-x", None])
def test_keys_and_namespaces_must_be_plain_file_names(tmp_path, name):
    cache = DiskCache("t", root=tmp_path)
    with pytest.raises(ValueError, match="key must be a file name"):
        cache.load(name)
    with pytest.raises(ValueError, match="key must be a file name"):
        cache.store(name, b"x")
    with pytest.raises(ValueError, match="namespace must be a file name"):
        DiskCache(name, root=tmp_path)
    cache.store(cache_key(a=1), b"x")  # a digest is a valid key
    assert cache.load(cache_key(a=1)) == b"x"


def test_max_bytes_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="max_bytes must be a positive int"):
        DiskCache("t", root=tmp_path, max_bytes=0)
    assert DiskCache("t", root=tmp_path, max_bytes=1).max_bytes == 1


def test_an_unusable_directory_costs_one_warning_per_process(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    first, second = DiskCache("a", root=blocker), DiskCache("b", root=blocker)
    with pytest.warns(RuntimeWarning, match="cannot write the kernel cache"):
        first.store("k", b"x")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first.store("k2", b"y")
        second.store("k", b"x")  # another cache fails silently too: one warning per process
    assert first.load("k") is None and second.load("k") is None
    working = DiskCache("a", root=tmp_path)  # the run goes on; a usable directory still works
    working.store("k", b"x")
    assert working.load("k") == b"x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_directory_is_survived(tmp_path):
    tmp_path.chmod(0o500)
    try:
        cache = DiskCache("t", root=tmp_path)
        with pytest.warns(RuntimeWarning, match="cannot write the kernel cache"):
            cache.store("a", b"x")
        assert cache.load("a") is None
    finally:
        tmp_path.chmod(0o700)


FULL_DISK = r"""
import resource, signal, sys, warnings
from pathlib import Path
from flash_attn_metal.runtime.cache import DiskCache
root = Path(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    a, b = DiskCache("a", root=root), DiskCache("b", root=root)
    a.store("small", b"s" * 100)
    a.store("big", b"b" * 100_000)
    b.store("big", b"b" * 100_000)
    assert a.load("small") == b"s" * 100 and a.load("big") is None and b.load("big") is None
print(sum("cannot write the kernel cache" in str(w.message) for w in caught))
"""


def test_a_full_disk_costs_one_warning_and_leaves_no_partial_files(tmp_path):
    out, err = python(FULL_DISK, str(tmp_path)).communicate(timeout=60)
    assert out.strip() == "1", err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b", "small.v2"]


EVICTING_BYTES = 6 * 200_100  # six of the ten entries fit
WRITER = r"""
import sys, time
from pathlib import Path
from flash_attn_metal.runtime.cache import DiskCache
root = Path(sys.argv[1])
payload = {f"k{j}": (f"k{j}" * 100_000).encode() for j in range(10)}
print("ready", flush=True)
while not (root / "go").exists():
    time.sleep(0.001)
# "replace": no eviction, so once this process has stored a key, a load must find it whole (a miss would mean
# a half-written file was seen). "evict": stores evict while other processes load.
for namespace, max_bytes in (("replace", 2**30), ("evict", EVICTING_BYTES)):
    cache = DiskCache(namespace, root=root, max_bytes=max_bytes)
    evicting = namespace == "evict"
    for i in range(60):
        key = f"k{i % 10}"
        cache.store(key, payload[key])
        for j in range(10 if evicting else min(i, 9) + 1):
            data = cache.load(f"k{j}")
            if evicting:
                assert data is None or data == payload[f"k{j}"], "a torn or mixed-up entry was read"
            else:
                assert data == payload[f"k{j}"], "an entry was missing or torn while being replaced"
""".replace("EVICTING_BYTES", str(EVICTING_BYTES))


def test_concurrent_processes_never_see_or_leave_a_torn_entry(tmp_path):
    procs = [python(WRITER, str(tmp_path)) for _ in range(3)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    (tmp_path / "go").touch()  # all start at once
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    for namespace, max_bytes in (("replace", 2**30), ("evict", EVICTING_BYTES)):
        cache = DiskCache(namespace, root=tmp_path, max_bytes=max_bytes)
        entries = cache.entries()
        assert len(entries) == 10 if namespace == "replace" else 0 < len(entries) <= 6
        keys = [p.name.removesuffix(".v2") for p in entries]
        assert all(cache.load(key) == (key * 100_000).encode() for key in keys)
        assert not list((tmp_path / namespace).glob(".tmp-*"))


def test_size_bound_evicts_least_recently_used(tmp_path):
    cache = DiskCache("t", root=tmp_path, max_bytes=3 * 1100)
    for i, key in enumerate(("a", "b", "c")):
        cache.store(key, bytes(1000))
        os.utime(tmp_path / "t" / f"{key}.v2", (1000 + i, 1000 + i))
    cache.load("a")  # used: now the newest
    cache.store("d", bytes(1000))
    assert cache.load("b") is None  # the least recently used went
    assert all(cache.load(k) is not None for k in ("a", "c", "d"))
    assert sum(p.stat().st_size for p in cache.entries()) <= cache.max_bytes


def test_memory_tier_builds_once_under_threads():
    cache = MemoryCache()
    calls = []
    barrier = threading.Barrier(8)

    def build():
        calls.append(1)
        time.sleep(0.05)  # the others arrive while this builds
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
    assert len(calls) == 1 and len(results) == 8 and all(r is results[0] for r in results)
    assert flash_attn_metal.stats()["cache_hits"]["memory"] == 7
    assert cache.get_or_create("other", object) is not results[0]  # another key builds its own


def test_memory_tier_stores_nothing_when_the_factory_fails():
    cache = MemoryCache()

    def fail():
        raise RuntimeError("compile error")

    with pytest.raises(RuntimeError, match="compile error"):
        cache.get_or_create("k", fail)
    assert len(cache) == 0
    assert cache.get_or_create("k", lambda: "built") == "built"
    assert cache.get_or_create("k", fail) == "built"


def test_cache_dir_follows_the_variable_then_the_platform(monkeypatch, tmp_path):
    monkeypatch.setenv("FLASH_ATTN_METAL_CACHE_DIR", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("FLASH_ATTN_METAL_CACHE_DIR")
    monkeypatch.setenv("HOME", "/home/u")
    monkeypatch.setattr(cache_module.platform, "system", lambda: "Darwin")
    assert cache_dir() == Path("/home/u/Library/Caches/flash-attn-metal")
    monkeypatch.setattr(cache_module.platform, "system", lambda: "Linux")
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert cache_dir() == Path("/xdg/flash-attn-metal")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path("/home/u/.cache/flash-attn-metal")


def test_disk_cache_follows_the_variable_set_after_creation(monkeypatch, tmp_path):
    cache = DiskCache("t")
    monkeypatch.setenv("FLASH_ATTN_METAL_CACHE_DIR", str(tmp_path))
    cache.store("k", b"x")
    assert (tmp_path / "t" / "k.v2").exists()


def test_cache_key_is_stable_and_separates_parts():
    assert cache_key(a=1, b=b"x") == cache_key(b=b"x", a=1)
    assert len({cache_key(a=1, b=b"x"), cache_key(a=2, b=b"x"), cache_key(a=1, b="x"), cache_key(ab=1)}) == 4
    # The same in every process and run (no hash randomisation), so entries outlive the process that wrote them.
    assert cache_key(source=b"kernel", version="1.0", flags=("-O1",)) == \
        "2259e2a9d42129a6cf02e9a04c0523d6cac6bb14e2cd1537d94ab418628da222"


def test_cache_info_and_clear_touch_only_entries(tmp_path):
    DiskCache("emulator-cpu", root=tmp_path).store("k1", b"x" * 10)
    DiskCache("emulator-cpu", root=tmp_path).store("k2", b"y" * 20)
    DiskCache("metallib", root=tmp_path).store("k1", b"z")
    foreign = tmp_path / "metallib" / "notes"
    foreign.write_text("someone else's file")
    (tmp_path / "top-level").write_text("also not an entry")
    info = cache_info(tmp_path)
    assert info["dir"] == str(tmp_path) and info["entries"] == 3
    assert info["namespaces"]["emulator-cpu"]["entries"] == 2 and info["namespaces"]["metallib"]["entries"] == 1
    assert info["bytes"] == sum(p.stat().st_size for p in tmp_path.glob("*/k*"))
    assert clear_cache(tmp_path) == 3
    assert cache_info(tmp_path)["entries"] == 0 and foreign.exists() and (tmp_path / "top-level").exists()
    assert clear_cache(tmp_path / "missing") == 0 and cache_info(tmp_path / "missing")["entries"] == 0


def test_entries_filed_under_another_key_are_rebuilt_with_a_warning(tmp_path):
    """Two intact entries swapped on disk: each would load the other's kernel (for the emulator, a shared object
    without the kernel's symbols). Each is detected by the key in its header, reported and rebuilt."""
    cache = DiskCache("t", root=tmp_path)
    cache.store("a", b"kernel a")
    cache.store("b", b"kernel b")
    assert cache.load("a") == b"kernel a"  # must-pass twin: intact entries in place load
    a, b = tmp_path / "t" / "a.v2", tmp_path / "t" / "b.v2"
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    with pytest.warns(RuntimeWarning, match=r"kernel cache entry .*a\.v2 was stored under another key \(b"):
        assert cache.load("a") is None
    assert not a.exists()
    cache.store("a", b"kernel a")
    assert cache.load("a") == b"kernel a"


def test_format_1_entries_are_neither_loaded_nor_overwritten_but_still_cleared(tmp_path):
    """An older version sharing the directory keeps its entries under the bare key: this version never reads or
    replaces them (so neither version deletes the other's entries as damaged), yet evicts and clears them."""
    old = tmp_path / "t" / "k"
    old.parent.mkdir()
    old.write_bytes(b"FAMC1\n" + bytes(40) + b"payload")
    cache = DiskCache("t", root=tmp_path)
    assert cache.load("k") is None
    cache.store("k", b"new")
    assert cache.load("k") == b"new" and old.exists()
    assert sorted(p.name for p in cache.entries()) == ["k", "k.v2"]
    assert clear_cache(tmp_path) == 2


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_files_that_are_not_regular_are_skipped_without_blocking(tmp_path, kind):
    """A FIFO in the cache folder would block every read of it forever; it is never opened for reading."""
    directory = tmp_path / "t"
    directory.mkdir()
    make = {"fifo": os.mkfifo, "directory": os.mkdir}[kind]
    make(directory / "k.v2")  # where key "k" lives
    make(directory / "stray")
    code = f"""
import sys
from pathlib import Path
from flash_attn_metal.runtime.cache import DiskCache, cache_info
cache = DiskCache("t", root=Path({str(tmp_path)!r}))
assert cache.load("k") is None
cache.store("other", b"x")
assert cache.load("other") == b"x"
info = cache_info(Path({str(tmp_path)!r}))
assert info["entries"] == 1, info
print("done")
"""
    proc = python(code)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0 and out.strip() == "done", err
