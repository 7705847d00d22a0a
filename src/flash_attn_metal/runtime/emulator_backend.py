"""The Metal emulator as a backend: "emulator" runs MSL on CPU tensors, "cuda-emulator" on CUDA tensors.

The emulator is imported on the first compile, so a Mac never loads it. It keeps its compiled shared objects
in the two-tier cache itself (`DiskCache("emulator-cpu")`) and counts its compiles, as `Backend` requires.
"""

from __future__ import annotations

from typing import Any, Callable


def emulator_compiler(device: str) -> Callable[[str], Any]:
    """`compile_source` for `Backend`: MSL -> the emulator's library for `device` ("cpu" or "cuda")."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")

    def compile_source(source: str) -> Any:
        from ..emulator import compile_shader

        return compile_shader(source, device)

    return compile_source
