"""Shared pieces of the emulator tests: the devices to run on, the usual MSL header, building a source (type
check included) and checking that both the emulator and the type check refuse one, and Apple's simdgroup_matrix
lane layout computed independently of the emulator's C++ (from the formula in the reference notes; it lives with
the conformance kernels in the package)."""

from __future__ import annotations

import pytest
import torch

from flash_attn_metal.emulator import MSLCompileError, compile_shader, typecheck
from flash_attn_metal.selftest.conformance import HEADER, lane_coordinates  # noqa: F401  (re-exported for the tests)

# The conformance suite runs on the CPU everywhere, and on CUDA where a GPU is present.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
on_devices = pytest.mark.parametrize("device", DEVICES)


def build(body: str, device: str = "cpu", checked: bool = True, header: str = HEADER):
    """Compile `header + body` for the emulator; with `checked`, it must also pass the type check (clang with
    Metal's shim)."""
    source = header + body
    if checked:
        typecheck(source)
    return compile_shader(source, device)


def assert_refused(source: str, match: str | None = None) -> None:
    """Both the emulator and the type check reject `source` with an MSLCompileError (whose message matches
    `match`, when given)."""
    with pytest.raises(MSLCompileError, match=match):
        compile_shader(source)
    with pytest.raises(MSLCompileError, match=match):
        typecheck(source)
