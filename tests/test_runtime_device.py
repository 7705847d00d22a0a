"""GPU family detection from real device names."""

from __future__ import annotations

import pytest

from flash_attn_metal.runtime.device import NEWEST_FAMILY, family_from_name, fp16_peak_tflops, known_chip

NAMES = {
    "Apple M1": "apple7", "Apple M1 Pro": "apple7", "Apple M1 Max": "apple7", "Apple M1 Ultra": "apple7",
    "Apple M2": "apple8", "Apple M2 Max": "apple8", "Apple M3": "apple9", "Apple M3 Max": "apple9",
    "Apple M4": "apple9", "Apple M4 Pro": "apple9", "Apple M5": NEWEST_FAMILY,
    "Apple M9 Ultra": NEWEST_FAMILY,  # an unknown future chip gets the newest family
    "AMD Radeon Pro 5500M": None,  # an Intel Mac's GPU: no simdgroup_matrix
}


@pytest.mark.parametrize("name", sorted(NAMES))
def test_family(name):
    assert family_from_name(name) == NAMES[name]


def test_peak_prefers_the_longest_matching_name():
    assert fp16_peak_tflops("Apple M1 Max") == 10.6 and fp16_peak_tflops("Apple M1") == 2.6
    assert fp16_peak_tflops("Apple M9") is None


def test_unknown_chips_are_flagged():
    assert known_chip("Apple M4 Max") and known_chip("Apple M5")
    assert not known_chip("Apple M9 Ultra") and not known_chip("AMD Radeon Pro 5500M")
