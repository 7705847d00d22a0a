"""The two-tier kernel cache.

Tier 1 (`MemoryCache`) holds compiled libraries in-process; many threads asking for one key build it once.
Tier 2 (`DiskCache`) holds compiled artifacts (metallibs on a Mac, the emulator's shared objects elsewhere)
in files under `cache_dir()/<namespace>/<key>` that outlive the process:

- an entry is written to a temporary file and renamed into place, so no reader, in any process, sees half of it;
- every entry starts with a header carrying its key and the payload's length and SHA-256, so a truncated or
  corrupt entry is detected, deleted, and reported as a miss: the caller rebuilds it; an intact entry filed
  under another key (entries swapped or copied by hand) is rebuilt the same way, with a warning naming it;
- only regular files are read: anything else in the directory (a FIFO, a socket, a folder) is skipped, never
  opened for a blocking read;
- an unwritable or full cache directory costs one warning per process, and the run goes on without storing;
- each namespace is bounded: after a store, the least recently used entries (oldest mtime; a load touches
  its entry) are evicted until the namespace fits in `max_bytes`.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import stat
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, TypeVar

from .. import settings
from ..stats import record_cache_hit

T = TypeVar("T")

DEFAULT_MAX_BYTES = 512 * 1024 * 1024
_MAGIC = b"FAMC2\n"  # flash-attn-metal cache, entry format 2: format 1 plus the entry's key
_SUFFIX = ".v2"  # format 2 entries are files `<key>.v2`, so a process of an older version, sharing the directory,
# never takes them for damaged entries of its own (and deletes them), nor we its
_OLD_MAGICS = (b"FAMC1\n",)  # earlier formats: still entries (listed, evicted, cleared), never loaded
_HEADER = len(_MAGIC) + 8 + 32  # magic, payload length (8 bytes, little-endian), SHA-256 of the key and payload
_KEY_BYTES = 2  # then the key's length (2 bytes, little-endian), the key, and the payload
_TMP_PREFIX = ".tmp-"
_STALE_TMP_SECONDS = 3600  # a temporary file this old was left by a process that died mid-write
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

_warned_unwritable = False  # one warning per process, whichever cache hit the problem first
_warn_lock = threading.Lock()
_MISSING = object()


def cache_dir() -> Path:
    """`FLASH_ATTN_METAL_CACHE_DIR`, else ~/Library/Caches/flash-attn-metal on macOS, else
    $XDG_CACHE_HOME/flash-attn-metal or ~/.cache/flash-attn-metal."""
    explicit = os.environ.get(settings.CACHE_DIR)
    if explicit:
        return Path(explicit)
    if platform.system() == "Darwin":
        return Path.home() / "Library" / "Caches" / "flash-attn-metal"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flash-attn-metal"


def cache_key(**parts: object) -> str:
    """A stable hex digest of named parts, in name order (bytes are hashed as they are, anything else by its
    repr, so use values whose repr is stable across processes: str, int, float, bytes, tuples of these)."""
    h = hashlib.sha256()
    for name in sorted(parts):
        value = parts[name]
        data = value if isinstance(value, bytes) else repr(value).encode()
        h.update(name.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


class MemoryCache:
    """Tier 1: one object per key, built once even when many threads ask at the same time. A factory that
    raises stores nothing; the next caller builds again. A factory must not ask this cache for its own key."""

    def __init__(self) -> None:
        self._items: dict[str, object] = {}
        self._building: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def get_or_create(self, key: str, factory: Callable[[], T]) -> T:
        item = self._items.get(key, _MISSING)  # the hit path takes no lock: a dict read is atomic
        if item is _MISSING:
            with self._lock:
                building = self._building.setdefault(key, threading.Lock())
            with building:  # one builder per key; the others wait here, then find the item
                item = self._items.get(key, _MISSING)
                if item is _MISSING:
                    item = self._items[key] = factory()
                    with self._lock:
                        del self._building[key]
                    return item  # type: ignore[return-value]
        record_cache_hit("memory")
        return item  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self._items)


class DiskCache:
    """Tier 2: checksummed entries under `(root or cache_dir())/namespace`, written atomically, bounded in size.

    `load(key)` is the payload or None (missing, unreadable, corrupt); `store(key, payload)` never raises for
    file-system trouble. Safe to share between threads and processes."""

    def __init__(self, namespace: str, root: Path | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        _check_name("namespace", namespace)
        if not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ValueError(f"max_bytes must be a positive int, got {max_bytes!r}")
        self.namespace = namespace
        self.max_bytes = max_bytes
        self._root = root

    @property
    def directory(self) -> Path:
        """Resolved at each use, so FLASH_ATTN_METAL_CACHE_DIR set after import still applies."""
        return (self._root or cache_dir()) / self.namespace

    def load(self, key: str) -> bytes | None:
        _check_name("key", key)
        path = self.directory / (key + _SUFFIX)
        data = _read_regular(path)
        if data is None:
            return None
        payload, stored_key = _unwrap(data)
        if payload is not None and stored_key != key:
            warnings.warn(f"flash-attn-metal: the kernel cache entry {path} was stored under another key "
                          f"({stored_key}; swapped or copied by hand?); rebuilding it", RuntimeWarning, stacklevel=2)
            payload = None
        if payload is None:
            # Truncated or corrupt (a crash mid-write by a tool that skipped the rename, a bad disk): drop it so
            # the caller's rebuild replaces it. A rename by another process in between only costs that entry.
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass  # a read-only cache: the caller rebuilds in memory each time
            return None
        try:
            os.utime(path)  # recently used: evicted last
        except OSError:
            pass  # read-only cache or evicted meanwhile: the payload is still good
        record_cache_hit("disk")
        return payload

    def store(self, key: str, payload: bytes) -> None:
        _check_name("key", key)
        directory = self.directory
        tmp: str | None = None
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=_TMP_PREFIX)
            with os.fdopen(fd, "wb") as f:
                f.write(_wrap(key, payload))
            os.replace(tmp, directory / (key + _SUFFIX))
            tmp = None
        except OSError as exc:  # each later store tries again: it costs little next to the compile before it
            _warn_once(f"flash-attn-metal: cannot write the kernel cache {directory} ({exc}); continuing "
                       "without storing compiled kernels (set FLASH_ATTN_METAL_CACHE_DIR to a writable directory)")
            return
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
        self._evict()

    def entries(self) -> list[Path]:
        """This namespace's entry files: a key's name (with this format's suffix, or none for format 1) and our
        header (never a temporary file, never a file someone else put there)."""
        try:
            listing = list(self.directory.iterdir())
        except OSError:
            return []
        return [p for p in listing if _NAME_RE.fullmatch(p.name) and _has_magic(p)]

    def _evict(self) -> None:
        files = []
        for p in self.entries():
            try:
                st = p.stat()
            except OSError:
                continue  # another process evicted it
            files.append((st.st_mtime_ns, st.st_size, p))
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files):
            if total <= self.max_bytes:
                break
            try:
                p.unlink(missing_ok=True)
            except OSError:
                continue
            total -= size
        self._remove_stale_temporaries()

    def _remove_stale_temporaries(self) -> None:
        now = time.time()
        for p in self.directory.glob(_TMP_PREFIX + "*"):
            try:
                if now - p.stat().st_mtime > _STALE_TMP_SECONDS:
                    p.unlink()
            except OSError:
                continue


def cache_info(root: Path | None = None) -> dict:
    """{"dir": str, "entries": n, "bytes": n, "namespaces": {name: {"entries": n, "bytes": n}}} of the disk tier."""
    root = root or cache_dir()
    namespaces = {}
    for directory in _namespace_dirs(root):
        sizes = []
        for p in DiskCache(directory.name, root=root).entries():
            try:
                sizes.append(p.stat().st_size)
            except OSError:
                continue
        namespaces[directory.name] = {"entries": len(sizes), "bytes": sum(sizes)}
    return {"dir": str(root), "entries": sum(n["entries"] for n in namespaces.values()),
            "bytes": sum(n["bytes"] for n in namespaces.values()), "namespaces": namespaces}


def clear_cache(root: Path | None = None) -> int:
    """Delete every entry of the disk tier (files with our header, directly inside namespace directories); the
    number deleted. Safe while other processes use the cache: they see misses and rebuild."""
    removed = 0
    for directory in _namespace_dirs(root or cache_dir()):
        for p in DiskCache(directory.name, root=directory.parent).entries():
            try:
                p.unlink()
                removed += 1
            except OSError:
                continue
    return removed


def _namespace_dirs(root: Path) -> list[Path]:
    try:
        return sorted(p for p in root.iterdir() if p.is_dir() and _NAME_RE.fullmatch(p.name))
    except OSError:
        return []


def _read_regular(path: Path, size: int = -1) -> bytes | None:
    """The first `size` bytes (-1: all) of a regular file, or None for anything else or an unreadable path. The
    open never blocks (O_NONBLOCK: a FIFO would wait for a writer) and the type is checked on the open file."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(size)
    except OSError:
        return None
    finally:
        os.close(fd)


def _has_magic(path: Path) -> bool:
    return _read_regular(path, len(_MAGIC)) in (_MAGIC, *_OLD_MAGICS)


def _check_name(what: str, name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(f"{what} must be a file name of letters, digits, '_', '.' and '-' "
                         f"(not starting with '.', '_' or '-'), got {name!r}")


def _warn_once(message: str) -> None:
    global _warned_unwritable
    with _warn_lock:
        if _warned_unwritable:
            return
        _warned_unwritable = True
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _digest(name: bytes, payload: bytes) -> bytes:
    return hashlib.sha256(len(name).to_bytes(_KEY_BYTES, "little") + name + payload).digest()


def _wrap(key: str, payload: bytes) -> bytes:
    name = key.encode()
    return (_MAGIC + len(payload).to_bytes(8, "little") + _digest(name, payload)
            + len(name).to_bytes(_KEY_BYTES, "little") + name + payload)


def _unwrap(data: bytes) -> tuple[bytes | None, str | None]:
    """(payload, key) of an intact entry of this format, else (None, None)."""
    if len(data) < _HEADER + _KEY_BYTES or not data.startswith(_MAGIC):
        return None, None
    length = int.from_bytes(data[len(_MAGIC) : len(_MAGIC) + 8], "little")
    key_end = _HEADER + _KEY_BYTES + int.from_bytes(data[_HEADER : _HEADER + _KEY_BYTES], "little")
    name, payload = data[_HEADER + _KEY_BYTES : key_end], data[key_end:]
    if len(payload) != length or _digest(name, payload) != data[len(_MAGIC) + 8 : _HEADER]:
        return None, None
    return payload, name.decode(errors="replace")
