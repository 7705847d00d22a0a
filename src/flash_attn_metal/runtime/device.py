"""The Apple GPU family, which picks the kernels' tiles.

Families: "apple7" (M1), "apple8" (M2), "apple9" (M3, M4), "apple10" (M5 and newer). An unknown future chip
gets the newest family; off a Mac there is no Metal device and the newest family's tiles are used (the
emulator runs whatever the generator emits).
"""

from __future__ import annotations

import functools
import re

import torch

NEWEST_FAMILY = "apple10"
_GENERATION_FAMILY = {1: "apple7", 2: "apple8", 3: "apple9", 4: "apple9"}


def family_from_name(device_name: str) -> str:
    """"Apple M2 Max" -> "apple8"; an Apple chip newer than this table -> the newest family."""
    match = re.search(r"\bM(\d+)\b", device_name)
    if match is None:
        return NEWEST_FAMILY
    return _GENERATION_FAMILY.get(int(match.group(1)), NEWEST_FAMILY)


@functools.cache
def gpu_family() -> str:
    if torch.backends.mps.is_available() and hasattr(torch.backends.mps, "get_name"):
        return family_from_name(torch.backends.mps.get_name())
    return NEWEST_FAMILY
