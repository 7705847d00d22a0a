"""Exceptions raised by the Metal emulator and the MSL type check."""

from __future__ import annotations

from dataclasses import dataclass


class MSLError(Exception):
    """Base class of every emulator error."""


class UnsupportedMSL(MSLError):
    """The source uses MSL the emulator does not implement."""

    def __init__(self, construct: str, line: int | None, detail: str = "") -> None:
        self.construct = construct
        self.line = line
        where = f" at MSL line {line}" if line is not None else ""
        super().__init__(f"unsupported MSL {construct!r}{where}" + (f": {detail}" if detail else ""))


@dataclass(frozen=True)
class Diagnostic:
    line: int  # 1-based line in the MSL source
    column: int
    severity: str  # "error" or "warning"
    message: str

    def __str__(self) -> str:
        return f"line {self.line}:{self.column}: {self.severity}: {self.message}"


class MSLCompileError(MSLError):
    """The MSL does not compile; `diagnostics` carry MSL line numbers."""

    def __init__(self, diagnostics: list[Diagnostic], summary: str = "MSL does not compile") -> None:
        self.diagnostics = diagnostics
        super().__init__(summary + "\n" + "\n".join(str(d) for d in diagnostics))


class KernelExecutionError(MSLError):
    """A kernel failed while running: a barrier or SIMD collective that cannot complete, or (in debug mode)
    an out-of-bounds or misaligned access to device, constant or threadgroup memory."""


class EmulatorUnavailable(MSLError, RuntimeError):
    """The emulator cannot run on this machine (no working C++ compiler); the message says what to set."""
