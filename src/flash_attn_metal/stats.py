"""Process-wide counters behind `flash_attn_metal.stats()`.

Every layer records into one `Counters` object: the runtime counts launches, the kernel cache counts
compiles and hits, and routing counts fallbacks by reason.
"""

from __future__ import annotations

import threading
from collections import Counter

_lock = threading.Lock()
_launches: Counter[str] = Counter()
_fallbacks: Counter[str] = Counter()
_cache_hits: Counter[str] = Counter()
_compiles = 0


def record_launch(kernel_name: str) -> None:
    with _lock:
        _launches[kernel_name] += 1


def record_fallback(reason: str) -> None:
    with _lock:
        _fallbacks[reason] += 1


def record_compile() -> None:
    global _compiles
    with _lock:
        _compiles += 1


def record_cache_hit(tier: str) -> None:
    """`tier` is "memory" or "disk"."""
    with _lock:
        _cache_hits[tier] += 1


def stats() -> dict:
    """A snapshot: {"launches": {kernel: n}, "compiles": n, "cache_hits": {"memory": n, "disk": n},
    "fallbacks": {reason: n}}."""
    with _lock:
        return {
            "launches": dict(_launches),
            "compiles": _compiles,
            "cache_hits": {"memory": _cache_hits["memory"], "disk": _cache_hits["disk"]},
            "fallbacks": dict(_fallbacks),
        }


def reset_stats() -> None:
    global _compiles
    with _lock:
        _launches.clear()
        _fallbacks.clear()
        _cache_hits.clear()
        _compiles = 0
