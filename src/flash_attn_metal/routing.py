"""Which backend runs an attention call, and the announced fallback to the reference.

`FLASH_ATTN_METAL_BACKEND` (read per call):
- `auto` (default): the Metal kernels for MPS tensors, the reference for tensors elsewhere;
- `mps`: the Metal kernels on MPS tensors;
- `emulator`: the Metal kernels through the emulator (CPU tensors on the CPU, CUDA tensors on CUDA);
- `reference`: always the pure-PyTorch reference (asked for, so no warning).
Every other fallback warns once per reason per process and is counted in `stats()`; with
`FLASH_ATTN_METAL_STRICT=1` it raises `NotImplementedError` naming the reason instead.
"""

from __future__ import annotations

import os
import sys
import types
import warnings

import torch

from . import settings
from .stats import record_fallback
from .problem import AttentionProblem

BACKENDS = ("auto", "mps", "emulator", "reference")
_warned: set[str] = set()


def backend_setting() -> str:
    value = os.environ.get(settings.BACKEND, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"FLASH_ATTN_METAL_BACKEND must be one of {', '.join(BACKENDS)}, got {value!r}")
    return value


def strict() -> bool:
    return settings.flag(settings.STRICT)


def fallback(reason: str, runner: str = "the PyTorch reference") -> None:
    """Announce that `runner` runs this call instead of the kernels (or raise, in strict mode). While
    torch.compile traces the call, the fallback joins the graph unannounced: dynamo can neither warn nor count."""
    compiling = torch.compiler.is_compiling()
    if not compiling:
        record_fallback(reason)
    if strict():
        raise NotImplementedError(f"flash-attn-metal: {reason} (FLASH_ATTN_METAL_STRICT=1 forbids the PyTorch fallback)")
    if not compiling and reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"flash-attn-metal: running {runner} because {reason}", RuntimeWarning,
                      stacklevel=_caller_stacklevel())


def _caller_stacklevel() -> int:
    """The stacklevel, as seen from `fallback`, of the first frame outside this package: the user's call."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(2), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def choose(problem: AttentionProblem, needs_grad: bool) -> str | None:
    """"mps" or "emulator" when the kernels run this call, None (after announcing why) for the reference."""
    backend, reason = decide(problem, needs_grad)
    if reason is not None:
        fallback(reason)
    return backend


def decide(problem: AttentionProblem, needs_grad: bool) -> tuple[str | None, str | None]:
    """(backend, None) when the kernels run this call; (None, reason) when they cannot; (None, None) when the
    reference was asked for. Announces nothing."""
    setting = backend_setting()
    if setting == "reference":
        return None, None
    device = problem.q.device.type
    if setting == "emulator":
        if device not in ("cpu", "cuda"):
            return None, f"the emulator runs CPU or CUDA tensors, not {device} tensors"
        backend = "emulator"
    elif device == "mps":
        backend = "mps"
    else:
        return None, (f"the tensors are on {device}; the Metal kernels run on MPS tensors "
                      "(FLASH_ATTN_METAL_BACKEND=emulator runs them in the emulator)")
    reason = kernel_unsupported_reason(problem, needs_grad)
    return (None, reason) if reason is not None else (backend, None)


_dispatch: types.ModuleType | None = None


def kernels() -> types.ModuleType:
    """The kernels' dispatch module, imported on first use so that `import flash_attn_metal` stays light.
    (A module global rather than functools.cache: torch.compile traces this call.)"""
    global _dispatch
    if _dispatch is None:
        from .kernels import dispatch

        _dispatch = dispatch
    return _dispatch


def kernel_unsupported_reason(problem: AttentionProblem, needs_grad: bool) -> str | None:
    return kernels().unsupported_reason(problem, needs_grad)
