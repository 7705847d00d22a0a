"""Tile choices measured on this machine: the winners `python -m flash_attn_metal tune` stored, and the override
the tuner times its candidates under.

    current(kind, family, dtype, head_dim, causal) -> tiles | None
        inside `trying(...)` the trial's tiles; else this machine's stored winner; else None (the built-in table)
    describe() -> str                   which table is in force (for `info`)
    store(winners, ...) / table_path()  what the tuner writes, and where
    register(kind, tiles_type, candidates)   a kernel family's tile type and candidates (forward, dq, dkdv and
                                             decode are registered here; `tune.py` registers how to check and
                                             time one)

One JSON file per machine under `cache_dir()/tuning/`, named after the chip (or "emulator" off a Mac), the OS
version and the package version: a new macOS (a new Metal compiler) or a new package (new kernels) starts from
the built-in table again. Entries are keyed by kernel kind, GPU family, MSL dtype, head-dim bucket and causal; a
head dim uses its bucket's winner (the smallest bucket at least as large: a tile that fits a larger head dim
fits a smaller one). A stored entry is used only while it is still one of `tiles.candidates(...)` for its key,
so an edited or stale file never yields tiles past Apple's limits.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import json
import os
import platform
import re
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from .._version import __version__
from ..runtime.cache import cache_dir
from .tiles import KERNEL_KINDS, DecodeTiles, Tiles, candidates


@dataclass(frozen=True)
class TunedKind:
    tiles_type: type  # a frozen dataclass: stored as dataclasses.asdict, read back as tiles_type(**fields)
    candidates: Callable[[str, str, int], list[Any]]  # (family, MSL dtype, head dim) -> tiles, the built-in first


def _decode_candidates(family: str, dtype: str, head_dim: int) -> list[DecodeTiles]:
    from .decode_kernel import tile_candidates  # decode_kernel imports spec, which imports this module

    return tile_candidates(family, dtype, head_dim)


KINDS: dict[str, TunedKind] = {kind: TunedKind(Tiles, functools.partial(candidates, kind)) for kind in KERNEL_KINDS}
KINDS["decode"] = TunedKind(DecodeTiles, _decode_candidates)


def register(kind: str, tiles_type: type, candidates: Callable[[str, str, int], list[Any]]) -> None:
    """Make a kernel family's tiles tunable: `tune` times its candidates, `current` serves its winners."""
    KINDS[kind] = TunedKind(tiles_type, candidates)


HEAD_DIM_BUCKETS = (32, 64, 96, 128, 160, 192, 256)  # the head dims `tune` measures; common models' d is one
FORMAT = 1  # the file layout below; a file of another format is ignored

_trial: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar("flash_attn_metal_trial",
                                                                                     default=None)
_loaded: dict[Path, tuple[float, dict[str, Any]]] = {}  # path -> (mtime, winners)
_lock = threading.Lock()
_warned: set[str] = set()


def bucket(head_dim: int) -> int:
    """The tuned head dim whose winner a (padded) head dim uses."""
    for b in HEAD_DIM_BUCKETS:
        if head_dim <= b:
            return b
    raise ValueError(f"head_dim must be at most {HEAD_DIM_BUCKETS[-1]}, got {head_dim}")


def entry_key(kind: str, family: str, dtype: str, head_dim: int, causal: bool) -> str:
    """"forward/apple9/half/d128/causal": the key of one winner (head_dim is a bucket)."""
    return f"{kind}/{family}/{dtype}/d{head_dim}/{'causal' if causal else 'full'}"


def machine() -> tuple[str, str]:
    """(chip, OS) that a table belongs to: ("Apple M3 Max", "macOS 15.3.1") on a Mac with a Metal GPU, else
    ("emulator", "Linux") for the CPU emulator."""
    from ..runtime.device import detect

    info = detect()
    if info is not None:
        return info.name, f"macOS {info.macos}"
    return "emulator", platform.system()


def table_path() -> Path:
    """This machine's table: cache_dir()/tuning/<chip>_<os>_v<version>.json."""
    chip, system = machine()
    slug = "_".join(re.sub(r"[^a-z0-9.]+", "-", part.lower()).strip("-") for part in (chip, system))
    return cache_dir() / "tuning" / f"{slug}_v{__version__}.json"


@contextlib.contextmanager
def trying(tiles: Mapping[str, Any]) -> Iterator[None]:
    """Inside, `current(kind, ...)` is `tiles[kind]` for each kind given, whatever the other arguments: the tuner
    runs one workload at a time under the candidate it is measuring."""
    token = _trial.set(dict(tiles))
    _forget_chosen_tiles()
    try:
        yield
    finally:
        _trial.reset(token)
        _forget_chosen_tiles()


def current(kind: str, family: str, dtype: str, head_dim: int, causal: bool) -> Any | None:
    """The tiles to use instead of the built-in table's, or None to use the table."""
    trial = _trial.get()
    if trial is not None and kind in trial:
        return trial[kind]
    if head_dim > HEAD_DIM_BUCKETS[-1] or kind not in KINDS:
        return None
    b = bucket(head_dim)
    tiles = _winners().get(entry_key(kind, family, dtype, b, causal))
    if tiles is None or tiles not in KINDS[kind].candidates(family, dtype, b):
        return None
    return tiles


def stored() -> dict[str, Any]:
    """This machine's stored winners by entry key (empty when there is no table)."""
    return dict(_winners())


def store(winners: Mapping[str, Any], measurements: Mapping[str, dict] | None = None) -> Path:
    """Merge `winners` (entry key -> tiles) into this machine's table, with optional per-entry measurements
    (JSON-able: times, candidates tried); written atomically. Returns the table's path."""
    path = table_path()
    chip, system = machine()
    document = _read(path) or {"format": FORMAT, "chip": chip, "os": system, "version": __version__, "winners": {}}
    for key, tiles in winners.items():
        document["winners"][key] = {"tiles": dataclasses.asdict(tiles), **(measurements or {}).get(key, {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(document, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    _changed(path)
    return path


def clear() -> bool:
    """Delete this machine's table (back to the built-in one); whether there was one."""
    path = table_path()
    existed = path.exists()
    path.unlink(missing_ok=True)
    _changed(path)
    return existed


def describe() -> str:
    """One line: which tile table is in force here."""
    chip, system = machine()
    winners = _winners()
    if not winners:
        return (f"built-in (no tuned table for {chip}, {system}, flash-attn-metal {__version__}; "
                "`python -m flash_attn_metal tune` makes one)")
    return f"tuned on this machine: {len(winners)} winners in {table_path()}, the built-in table elsewhere"


def _winners() -> dict[str, Any]:
    """The table's winners of the registered kinds, read once per change of the file."""
    path = table_path()
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return {}
    with _lock:
        hit = _loaded.get(path)
        if hit is not None and hit[0] == mtime:
            return hit[1]
    document = _read(path)
    winners: dict[str, Any] = {}
    for key, entry in (document or {}).get("winners", {}).items():
        kind = KINDS.get(key.split("/")[0])
        if kind is None:
            continue  # a kernel family this process has not registered (yet)
        try:
            winners[key] = kind.tiles_type(**entry["tiles"])
        except (TypeError, KeyError, ValueError):  # fields this version does not have, or values it refuses
            _warn_once(f"flash-attn-metal: ignoring the tuned entry {key} in {path} (written for other kernels); "
                       "run `python -m flash_attn_metal tune` again")
    with _lock:
        _loaded[path] = (mtime, winners)
    return winners


def _read(path: Path) -> dict | None:
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        _warn_once(f"flash-attn-metal: ignoring the unreadable tuned table {path} ({exc}); using the built-in tiles")
        return None
    if not isinstance(document, dict) or document.get("format") != FORMAT or \
            not isinstance(document.get("winners"), dict):
        _warn_once(f"flash-attn-metal: ignoring {path}: not a tuned table of format {FORMAT}")
        return None
    return document


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _changed(path: Path) -> None:
    with _lock:
        _loaded.pop(path, None)
    _forget_chosen_tiles()


def _forget_chosen_tiles() -> None:
    """Drop what was derived from earlier tile choices, so a new table or trial takes effect at the next call."""
    from . import dispatch

    dispatch.forget_tiles()