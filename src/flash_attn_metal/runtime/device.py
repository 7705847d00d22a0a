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
# fp16 TFLOPS of the largest GPU of each chip: cores x 128 ALUs x 2 x clock (philipturner/applegpuinfo clocks;
# reference notes, metal-kernels-and-apple-gpus.md section 3.1). Longer names first: "M1 Max" before "M1".
FP16_TFLOPS = {"M1 Ultra": 21.2, "M1 Max": 10.6, "M1 Pro": 5.3, "M1": 2.6, "M2 Max": 13.6, "M2 Pro": 6.8,
               "M2": 3.6, "M3 Max": 14.1, "M3 Pro": 6.4, "M3": 3.5, "M4 Max": 14.1, "M4 Pro": 7.1, "M4": 3.5}
_GENERATION_FAMILY = {1: "apple7", 2: "apple8", 3: "apple9", 4: "apple9", 5: "apple10"}
_CHIP = re.compile(r"\bM(\d+)\b")


def family_from_name(device_name: str) -> str | None:
    """"Apple M2 Max" -> "apple8"; an Apple chip newer than this table -> the newest family; a GPU that is not
    Apple silicon (an Intel Mac's AMD GPU) -> None: it has no simdgroup_matrix."""
    if "Apple" not in device_name:
        return None
    match = _CHIP.search(device_name)
    if match is None:
        return NEWEST_FAMILY
    return _GENERATION_FAMILY.get(int(match.group(1)), NEWEST_FAMILY)


def known_chip(device_name: str) -> bool:
    """Whether the family table lists this chip (an unknown one still runs, with the newest tiles)."""
    match = _CHIP.search(device_name)
    return match is not None and int(match.group(1)) in _GENERATION_FAMILY


@functools.cache
def gpu_family() -> str | None:
    """The Metal device's family on a Mac; off a Mac (the emulator) the newest family."""
    if torch.backends.mps.is_available():
        name = torch.backends.mps.get_name() if hasattr(torch.backends.mps, "get_name") else "Apple"
        return family_from_name(name)
    return NEWEST_FAMILY


def fp16_peak_tflops(device_name: str) -> float | None:
    return next((v for k, v in FP16_TFLOPS.items() if k in device_name), None)
