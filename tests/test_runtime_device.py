"""GPU family, Metal language version and chip figures from real device names; detection never crashes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from flash_attn_metal.runtime import device
from flash_attn_metal.runtime.device import (CHIPS, NEWEST_FAMILY, describe, family_from_name, fp16_peak_tflops,
                                             known_chip, metal_language_version)

# name -> (chip, family): names as torch.backends.mps.get_name() reports them.
NAMES = {
    "Apple M1": ("M1", "apple7"), "Apple M1 Pro": ("M1 Pro", "apple7"), "Apple M1 Max": ("M1 Max", "apple7"),
    "Apple M1 Ultra": ("M1 Ultra", "apple7"), "Apple M2": ("M2", "apple8"), "Apple M2 Pro": ("M2 Pro", "apple8"),
    "Apple M2 Max": ("M2 Max", "apple8"), "Apple M2 Ultra": ("M2 Ultra", "apple8"), "Apple M3": ("M3", "apple9"),
    "Apple M3 Pro": ("M3 Pro", "apple9"), "Apple M3 Max": ("M3 Max", "apple9"), "Apple M4": ("M4", "apple9"),
    "Apple M4 Pro": ("M4 Pro", "apple9"), "Apple M4 Max": ("M4 Max", "apple9"), "Apple M5": ("M5", "apple10"),
    "Apple M9 Ultra": ("M9 Ultra", NEWEST_FAMILY),  # an unknown future chip gets the newest family
    "Apple Paravirtual device": (None, NEWEST_FAMILY),  # a macOS virtual machine's GPU
    "AMD Radeon Pro 5500M": (None, None),  # an Intel Mac's GPU: no simdgroup_matrix
    "Intel(R) UHD Graphics 630": (None, None),
}


@pytest.mark.parametrize("name", sorted(NAMES))
def test_family_and_chip(name):
    chip, family = NAMES[name]
    info = describe(name, None, "15.3.1")
    assert (info.chip, info.family) == (chip, family) and family_from_name(name) == family
    assert known_chip(name) == (family is not None and name not in ("Apple M9 Ultra", "Apple Paravirtual device"))


@pytest.mark.parametrize("name, note", [
    ("Apple M9 Ultra", "newer than this package's tables"),
    ("Apple Paravirtual device", "chip not recognised"),
    ("AMD Radeon Pro 5500M", "not Apple silicon"),
    ("Apple M5", "no published figures"),
])
def test_unusual_devices_carry_a_note(name, note):
    assert any(note in n for n in describe(name, 10, "15.0").notes)


def test_a_known_chip_with_its_core_count_has_no_notes():
    info = describe("Apple M2 Max", 38, "15.0")
    assert info.notes == () and info.fp16_tflops == pytest.approx(13.6, abs=0.01) and info.bandwidth_gbs == 409.6


def test_peak_figures_follow_the_core_count():
    assert fp16_peak_tflops("Apple M1 Max") == pytest.approx(10.617, abs=1e-3)  # the 32-core M1 Max
    assert fp16_peak_tflops("Apple M1") == pytest.approx(2.617, abs=1e-3)  # "M1" is not read as "M1 Max"
    assert fp16_peak_tflops("Apple M1 Pro", 14) == pytest.approx(4.645, abs=1e-3)
    assert fp16_peak_tflops("Apple M9") is None and fp16_peak_tflops("AMD Radeon Pro 5500M") is None
    assert describe("Apple M3 Max", 30, "15.0").bandwidth_gbs == 307.2  # the binned M3 Max's narrower bus
    assert describe("Apple M3 Max", 40, "15.0").bandwidth_gbs == 400.0
    assert any("core count not reported" in n for n in describe("Apple M4", None, "15.0").notes)


# Published peak TFLOPS of each chip's largest GPU (reference notes, metal-kernels-and-apple-gpus.md 3.1).
PUBLISHED_TFLOPS = {"M1": 2.617, "M1 Pro": 5.308, "M1 Max": 10.617, "M1 Ultra": 21.233, "M2": 3.579, "M2 Pro": 6.800,
                    "M2 Max": 13.600, "M3": 3.53, "M3 Pro": 6.36, "M3 Max": 14.13, "M4": 3.53, "M4 Pro": 7.07,
                    "M4 Max": 14.131}


@pytest.mark.parametrize("chip", sorted(CHIPS))
def test_every_chip_in_the_table_is_reachable_sourced_and_matches_its_published_peak(chip):
    info = describe(f"Apple {chip}", CHIPS[chip].max_gpu_cores, "15.0")
    assert info.chip == chip and CHIPS[chip].source
    assert info.fp16_tflops == pytest.approx(PUBLISHED_TFLOPS[chip], abs=0.01)


def test_metal_language_version_follows_macos():
    assert [metal_language_version(v) for v in ("14.0", "14.7.1", "15.1", "26.0", "")] == \
        ["3.1", "3.1", "3.2", "4.0", "3.1"]
    assert any("bfloat16" in n for n in describe("Apple M1", 8, "13.6").notes)
    assert not any("bfloat16" in n for n in describe("Apple M1", 8, "14.0").notes)


@pytest.fixture
def fake_mac(monkeypatch):
    """torch.backends.mps replaced by a fake Mac's; detect()'s cache cleared around the test."""
    device.detect.cache_clear()
    fake = SimpleNamespace(is_available=lambda: True, get_name=lambda: "Apple M2 Pro", get_core_count=lambda: 19)
    monkeypatch.setattr(torch.backends, "mps", fake)
    monkeypatch.setattr(device.platform, "mac_ver", lambda: ("15.3.1", ("", "", ""), "arm64"))
    yield fake
    device.detect.cache_clear()


def test_off_a_mac_there_is_no_device_and_the_emulator_gets_the_newest_family():
    device.detect.cache_clear()
    assert not torch.backends.mps.is_available()  # this test machine is not a Mac
    assert device.detect() is None and device.gpu_family() == NEWEST_FAMILY


def test_detect_on_a_mac(fake_mac):
    info = device.detect()
    assert (info.name, info.family, info.gpu_cores, info.macos, info.metal_language) == \
        ("Apple M2 Pro", "apple8", 19, "15.3.1", "3.2")
    assert device.gpu_family() == "apple8"


def test_detect_on_an_intel_mac_reports_no_family(fake_mac):
    fake_mac.get_name = lambda: "AMD Radeon Pro 5500M"
    assert device.detect().family is None and device.gpu_family() is None


def test_detect_survives_a_failing_device_query(fake_mac):
    def broken():
        raise RuntimeError("no Metal device")

    fake_mac.get_name = broken
    info = device.detect()
    assert info.family is None and any("device query failed: no Metal device" in n for n in info.notes)


def test_detect_without_core_count(fake_mac):
    del fake_mac.get_core_count  # torch builds before get_core_count existed
    info = device.detect()
    assert info.gpu_cores is None and info.fp16_tflops == pytest.approx(6.8, abs=0.01)
