"""Shared pieces of the emulator tests: the devices to run on, and Apple's simdgroup_matrix lane layout
computed independently of the emulator's C++ (from the formula in the reference notes)."""

from __future__ import annotations

import torch

# The conformance suite runs on the CPU everywhere, and on CUDA where a GPU is present.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def lane_coordinates(lane: int) -> tuple[int, int]:
    """(row, first column) of the two elements lane `lane` holds in an 8x8 simdgroup_matrix."""
    return 4 * (lane // 16) + (lane // 2) % 4, 4 * ((lane // 8) % 2) + 2 * (lane % 2)
