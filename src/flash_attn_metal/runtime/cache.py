"""The two-tier kernel cache.

Tier 1 (`MemoryCache`) holds compiled libraries in-process; many threads asking for one key build it once.
Tier 2 (`DiskCache`) holds compiled artifacts (metallibs on a Mac, the emulator's shared objects elsewhere)
in files that survive the process:

- entries are written to a temporary file and renamed into place, so readers never see half an entry;
- every entry starts with a header carrying the payload's length and SHA-256, so a truncated or corrupt
  entry is detected, deleted and rebuilt by the caller;
- an unwritable or full cache directory costs one warning per process, and the run goes on without tier 2;
- the directory is bounded: after a store, the least recently used entries are evicted past `max_bytes`.
"""

from __future__ import annotations

import hashlib
import os
import platform
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable, TypeVar

from ..stats import record_cache_hit

T = TypeVar("T")

_MAGIC = b"FAMC1\n"  # flash-attn-metal cache, format 1
_HEADER = len(_MAGIC) + 8 + 32  # magic, payload length (8 bytes), SHA-256 of the payload
DEFAULT_MAX_BYTES = 512 * 1024 * 1024


def cache_dir() -> Path:
    """`FLASH_ATTN_METAL_CACHE_DIR`, else the platform's user cache directory."""
    explicit = os.environ.get("FLASH_ATTN_METAL_CACHE_DIR")
    if explicit:
        return Path(explicit)
    if platform.system() == "Darwin":
        return Path.home() / "Library" / "Caches" / "flash-attn-metal"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flash-attn-metal"


def cache_key(**parts: object) -> str:
    """A stable hex digest of named parts (bytes are hashed as they are, anything else by its repr)."""
    h = hashlib.sha256()
    for name in sorted(parts):
        value = parts[name]
        data = value if isinstance(value, bytes) else repr(value).encode()
        h.update(name.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


class MemoryCache:
    """Tier 1: one object per key, built once even when many threads ask at the same time."""

    def __init__(self) -> None:
        self._items: dict[str, object] = {}
        self._building: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def get_or_create(self, key: str, factory: Callable[[], T]) -> T:
        with self._lock:
            if key in self._items:
                record_cache_hit("memory")
                return self._items[key]  # type: ignore[return-value]
            building = self._building.setdefault(key, threading.Lock())
        with building:
            with self._lock:
                if key in self._items:
                    record_cache_hit("memory")
                    return self._items[key]  # type: ignore[return-value]
            item = factory()
            with self._lock:
                self._items[key] = item
                self._building.pop(key, None)
            return item


class DiskCache:
    """Tier 2: checksummed files under `cache_dir()/namespace`, written atomically, bounded in size."""

    _warned: set[str] = set()

    def __init__(self, namespace: str, root: Path | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self._root = root
        self.namespace = namespace
        self.max_bytes = max_bytes

    @property
    def directory(self) -> Path:
        return (self._root or cache_dir()) / self.namespace

    def load(self, key: str) -> bytes | None:
        path = self.directory / key
        try:
            data = path.read_bytes()
        except OSError:
            return None
        payload = _unwrap(data)
        if payload is None:  # truncated or corrupt: drop it so the caller rebuilds
            path.unlink(missing_ok=True)
            return None
        try:
            os.utime(path)  # recently used: evicted last
        except OSError:
            pass
        record_cache_hit("disk")
        return payload

    def store(self, key: str, payload: bytes) -> None:
        directory = self.directory
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(_wrap(payload))
                os.replace(tmp, directory / key)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            if str(directory) not in self._warned:  # one warning per directory and process
                self._warned.add(str(directory))
                warnings.warn(f"flash-attn-metal: kernel cache {directory} is not writable ({exc}); "
                              "continuing without the disk cache", RuntimeWarning, stacklevel=2)
            return
        self._evict()

    def entries(self) -> list[Path]:
        try:
            return [p for p in self.directory.iterdir() if p.is_file() and not p.name.startswith(".tmp-")]
        except OSError:
            return []

    def _evict(self) -> None:
        files = []
        for p in self.entries():
            try:
                st = p.stat()
            except OSError:
                continue  # another process evicted it
            files.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files):
            if total <= self.max_bytes:
                break
            p.unlink(missing_ok=True)
            total -= size


def _wrap(payload: bytes) -> bytes:
    return _MAGIC + len(payload).to_bytes(8, "little") + hashlib.sha256(payload).digest() + payload


def _unwrap(data: bytes) -> bytes | None:
    if len(data) < _HEADER or not data.startswith(_MAGIC):
        return None
    length = int.from_bytes(data[len(_MAGIC) : len(_MAGIC) + 8], "little")
    payload = data[_HEADER:]
    if len(payload) != length or hashlib.sha256(payload).digest() != data[len(_MAGIC) + 8 : _HEADER]:
        return None
    return payload
