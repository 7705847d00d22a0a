"""Shared pieces of the emulator tests: the devices to run on, and Apple's simdgroup_matrix lane layout
computed independently of the emulator's C++ (from the formula in the reference notes; it lives with the
conformance kernels in the package)."""

from __future__ import annotations

import torch

from flash_attn_metal.selftest.conformance import lane_coordinates  # noqa: F401  (re-exported for the tests)

# The conformance suite runs on the CPU everywhere, and on CUDA where a GPU is present.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
