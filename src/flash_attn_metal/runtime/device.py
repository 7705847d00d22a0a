"""The Metal device: Apple GPU family (which picks the kernels' tiles), Metal language version, and the chip's
published figures (for "% of peak").

Families: "apple7" (M1), "apple8" (M2), "apple9" (M3, M4), "apple10" (M5). A newer Apple chip gets the newest
family with a note; a GPU that is not Apple silicon (an Intel Mac's AMD GPU) has no family: it lacks
simdgroup_matrix, so the kernels do not run there. Off a Mac `detect()` is None and the kernels (run by the
emulator) use the newest family's tiles.
"""

from __future__ import annotations

import functools
import platform
import re
from dataclasses import dataclass, replace

import torch

NEWEST_FAMILY = "apple10"
_GENERATION_FAMILY = {1: "apple7", 2: "apple8", 3: "apple9", 4: "apple9", 5: "apple10"}
_CHIP_RE = re.compile(r"\bM(\d+)(?: (Pro|Max|Ultra))?\b")


@dataclass(frozen=True)
class ChipFigures:
    """Published figures of a chip's largest GPU. Peak fp16 = fp32 FLOPS = cores x 128 ALUs x 2 (FMA) x clock
    (applegpuinfo's formula; metal-benchmarks measures equal fp16 and fp32 rates)."""

    max_gpu_cores: int
    clock_ghz: float
    bandwidth_gbs: float
    source: str
    lower_bin_bandwidth_gbs: float | None = None  # variants with fewer cores and a narrower memory bus

    def fp16_tflops(self, gpu_cores: int) -> float:
        return gpu_cores * 128 * 2 * self.clock_ghz / 1000


# Gathered in /work/shared/reference/metal-kernels-and-apple-gpus.md section 3.1 ("press" = Apple's announcements).
# Clocks are applegpuinfo's: M1 1.278 GHz, M1 Pro/Max/Ultra 1.296, M2 family 1.398, M3/M4 families 1.380.
CHIPS: dict[str, ChipFigures] = {
    "M1": ChipFigures(8, 1.278, 68.3, "metal-benchmarks, applegpuinfo"),
    "M1 Pro": ChipFigures(16, 1.296, 204.8, "applegpuinfo"),
    "M1 Max": ChipFigures(32, 1.296, 409.6, "metal-benchmarks, applegpuinfo"),
    "M1 Ultra": ChipFigures(64, 1.296, 819.2, "metal-benchmarks, applegpuinfo"),
    "M2": ChipFigures(10, 1.398, 102.4, "metal-benchmarks, applegpuinfo"),
    "M2 Pro": ChipFigures(19, 1.398, 204.8, "metal-benchmarks"),
    "M2 Max": ChipFigures(38, 1.398, 409.6, "metal-benchmarks (bandwidth approximate)"),
    "M3": ChipFigures(10, 1.380, 102.4, "press (cores), applegpuinfo (clock, bandwidth)"),
    "M3 Pro": ChipFigures(18, 1.380, 153.6, "press (cores, bandwidth), applegpuinfo (clock)"),
    "M3 Max": ChipFigures(40, 1.380, 400.0, "press (40 cores), applegpuinfo (clock; 307.2 GB/s below 40 cores)",
                          lower_bin_bandwidth_gbs=307.2),
    "M4": ChipFigures(10, 1.380, 120.0, "press (bandwidth), applegpuinfo (clock; MFA's README says 3.58 TFLOPS)"),
    "M4 Pro": ChipFigures(20, 1.380, 273.0, "press (cores, bandwidth), applegpuinfo (clock)"),
    "M4 Max": ChipFigures(40, 1.380, 546.0, "applegpuinfo (cores, clock), press (546 GB/s; 410 GB/s lower bin)",
                          lower_bin_bandwidth_gbs=410.0),
}


@dataclass(frozen=True)
class DeviceInfo:
    name: str  # as Metal reports it: "Apple M3 Max"
    chip: str | None  # "M3 Max"; None when the name is not an Apple M-series chip
    family: str | None  # "apple9"; None: not Apple silicon, the kernels cannot run
    gpu_cores: int | None
    macos: str  # "15.3.1"
    metal_language: str  # what PyTorch compiles with on this macOS: "3.1", "3.2" or "4.0"
    fp16_tflops: float | None  # peak of this GPU; None when the chip has no published figures here
    bandwidth_gbs: float | None
    notes: tuple[str, ...] = ()


def metal_language_version(macos: str) -> str:
    """PyTorch compiles with Metal 4.0 on macOS 26+, 3.2 on macOS 15+, else 3.1 (bfloat needs 3.1 = macOS 14)."""
    major = _major(macos)
    return "4.0" if major >= 26 else "3.2" if major >= 15 else "3.1"


def family_from_name(device_name: str) -> str | None:
    """"Apple M2 Max" -> "apple8"; an Apple chip newer than this table -> the newest family; a GPU that is not
    Apple silicon -> None."""
    if "Apple" not in device_name:
        return None
    match = _CHIP_RE.search(device_name)
    if match is None:
        return NEWEST_FAMILY
    return _GENERATION_FAMILY.get(int(match.group(1)), NEWEST_FAMILY)


def known_chip(device_name: str) -> bool:
    """Whether the name is an Apple M-series chip of a generation this package has a family for."""
    match = _CHIP_RE.search(device_name) if "Apple" in device_name else None
    return match is not None and int(match.group(1)) in _GENERATION_FAMILY


def describe(device_name: str, gpu_cores: int | None, macos: str) -> DeviceInfo:
    """Everything this package derives from the device name, its GPU core count and the macOS version."""
    family = family_from_name(device_name)
    match = _CHIP_RE.search(device_name) if family else None
    chip = match.group(0) if match else None
    notes: list[str] = []
    if family is None:
        notes.append("not Apple silicon: the kernels need simdgroup_matrix (Apple7/M1 or newer); "
                     "attention runs on the PyTorch reference")
    elif match is None:
        notes.append(f"{device_name}: chip not recognised, using {NEWEST_FAMILY}'s tiles")
    elif not known_chip(device_name):
        notes.append(f"{device_name} is newer than this package's tables: using {NEWEST_FAMILY}'s tiles")
    figures = CHIPS.get(chip) if chip else None
    tflops = bandwidth = None
    if figures is not None:
        cores = gpu_cores or figures.max_gpu_cores
        if gpu_cores is None:
            notes.append(f"GPU core count not reported: peak figures assume the {figures.max_gpu_cores}-core {chip}")
        tflops = round(figures.fp16_tflops(cores), 3)
        lower_bin = cores < figures.max_gpu_cores and figures.lower_bin_bandwidth_gbs is not None
        bandwidth = figures.lower_bin_bandwidth_gbs if lower_bin else figures.bandwidth_gbs
    elif family is not None:
        notes.append(f"no published figures for {chip or device_name} here: % of peak is not reported")
    if family is not None and macos and _major(macos) < 14:
        notes.append(f"macOS {macos}: bfloat16 kernels need Metal 3.1 (macOS 14 or newer)")
    return DeviceInfo(device_name, chip, family, gpu_cores, macos, metal_language_version(macos), tflops, bandwidth,
                      tuple(notes))


@functools.cache
def detect() -> DeviceInfo | None:
    """This machine's Metal device, or None where PyTorch has no MPS device (not a Mac). Never raises."""
    macos = platform.mac_ver()[0]
    try:
        if not torch.backends.mps.is_available():
            return None
        mps = torch.backends.mps
        name = mps.get_name() if hasattr(mps, "get_name") else "Apple (unknown chip)"
        cores = mps.get_core_count() if hasattr(mps, "get_core_count") else None
    except Exception as exc:  # an odd driver or torch build: treat the GPU as unknown, never crash
        info = describe("unknown Metal device", None, macos)
        return replace(info, notes=info.notes + (f"device query failed: {exc}",))
    return describe(name, cores, macos)


def gpu_family() -> str | None:
    """The Metal device's family on a Mac (None: not Apple silicon); off a Mac, for the emulator, the newest."""
    info = detect()
    return info.family if info is not None else NEWEST_FAMILY


DEFAULT_GPU_CORES = 10  # the base M-series chips' count: assumed where the device does not say, and off a Mac


def gpu_cores() -> int:
    """The Metal device's GPU core count: as reported, else its chip's largest variant, else DEFAULT_GPU_CORES."""
    info = detect()
    if info is not None and info.gpu_cores:
        return info.gpu_cores
    figures = CHIPS.get(info.chip) if info is not None and info.chip else None
    return figures.max_gpu_cores if figures is not None else DEFAULT_GPU_CORES


def fp16_peak_tflops(device_name: str, gpu_cores: int | None = None) -> float | None:
    """Peak fp16 TFLOPS of that GPU (of the chip's largest variant when `gpu_cores` is None)."""
    return describe(device_name, gpu_cores, "").fp16_tflops


def _major(macos: str) -> int:
    head = macos.split(".")[0]
    return int(head) if head.isdigit() else 0
