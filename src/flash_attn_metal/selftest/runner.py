"""`python -m flash_attn_metal selftest [--quick] [--report FILE]`: three sections, one report.

1. Conformance: each of the emulator's conformance kernels (conformance.py) runs on the GPU through
   `torch.mps.compile_shader` and in the CPU emulator; the GPU must give what Metal specifies and agree with
   the emulator, which checks the emulator's fidelity on real hardware. Without a Mac only the emulator runs.
2. Attention: the grid of attention.py (every public function, the dtypes, representative head dims, masks,
   kv caches, backward) on this machine's kernels against the CPU reference.
3. Timing: a few shapes against torch's SDPA, through `bench` (emulator timings off a Mac, labelled so).

The CLI runs it with FLASH_ATTN_METAL_STRICT=1 (and FLASH_ATTN_METAL_BACKEND=emulator off a Mac), so a
fallback to the reference fails a check instead of passing it.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from . import attention, conformance
from ..verify import failures
from .report import Check, Report, describe_error, environment, headline, write

EMULATOR_TIMINGS = "emulator timings: they exercise the harness and say nothing about Apple GPU speed"


def main(quick: bool, report_path: Path, say: Callable[[str], None] = print) -> int:
    """Run every section, print one line per check, write the report; 0 when nothing failed."""
    mps = torch.backends.mps.is_available()
    report = Report(backend="mps" if mps else "emulator", quick=quick, environment=environment())
    start = time.perf_counter()
    say(f"flash-attn-metal selftest on {'the GPU (MPS)' if mps else 'the CPU emulator (no Metal GPU here)'}"
        f"{', quick' if quick else ''}")

    def record(check: Check) -> None:
        report.checks.append(check)
        say(f"  {check.status:<4}  {check.section:<11}  {check.name}" + (f": {check.detail}" if check.status != "pass"
                                                                         else "") + f"  ({check.seconds:.1f} s)")

    for check in conformance_checks(mps, report.notes):
        record(check)
    for case in attention.grid(quick):
        record(_timed("attention", case.name, lambda: _attention(case, "mps" if mps else "cpu")))
    record(_timed("timing", "a few shapes against SDPA", lambda: _timing(report, mps, quick, say)))
    report.seconds = time.perf_counter() - start
    json_path, markdown_path = write(report, report_path)
    say(headline(report))
    say(f"wrote {json_path} and {markdown_path} (paste the .md into an issue)")
    return 1 if report.failed else 0


def conformance_checks(mps: bool, notes: list[str]) -> Iterator[Check]:
    """One check per conformance case: on a Mac the GPU against Metal's semantics and against the emulator (and
    the emulator against Metal's semantics, on this CPU); elsewhere the emulator alone."""
    for case in conformance.CASES:
        start = time.perf_counter()
        problems: list[str] = []
        emulated = None
        try:
            emulated, expected = conformance.run(case, "cpu")
            problems += [f"emulator: {p}" for p in conformance.failures(emulated, expected, "cpu")]
        except Exception as exc:  # on a Mac without a C++ compiler the GPU is still checked against Metal's semantics
            message = f"the CPU emulator could not run: {describe_error(exc)}"
            if not mps:
                problems.append(message)
            elif message not in notes:
                notes.append(message)
        detail = ""
        if mps:
            try:
                gpu, expected = conformance.run(case, "mps")
            except Exception as exc:  # a compile or launch error on the GPU fails this case only
                problems.append(f"GPU: {describe_error(exc)}")
            else:
                problems += [f"GPU: {p}" for p in conformance.failures(gpu, expected, "mps")]
                if emulated is not None:
                    problems += [f"GPU vs emulator: {p}" for p in conformance.differences(gpu, emulated, expected)]
                if not any("mps" in e.devices for e in expected.values()):
                    detail = "Metal leaves these results undefined on a GPU: only the emulator's were checked"
        yield Check("conformance", case.name, "fail" if problems else "pass", "; ".join(problems) or detail,
                    time.perf_counter() - start)


def _attention(case: attention.AttentionCase, device: str) -> str | None:
    return failures(attention.check(case, device))


def _timing(report: Report, mps: bool, quick: bool, say: Callable[[str], None]) -> str | None:
    from .. import bench

    if mps:
        sizes = bench.Sizes((1024,), (128,), ("fp16",), causal=(True,)) if quick else \
            bench.Sizes((1024, 4096), (64, 128), ("fp16", "bf16"))
    else:
        sizes = bench.Sizes((64,), (32,), ("fp16",), heads=2, causal=(True,))
        report.notes.append(f"Timings are {EMULATOR_TIMINGS}.")
    rows = bench.run("mps" if mps else "cpu", sizes, repeats=3 if quick else 10,
                     progress=lambda done, total, rows: say(f"        timing       {bench.summary(rows)}"))
    report.timings = [dataclasses.asdict(r) for r in rows]
    return None


def _timed(section: str, name: str, run: Callable[[], str | None]) -> Check:
    """A check from `run()`: None passes, a string fails with that detail, an exception fails with its message."""
    start = time.perf_counter()
    try:
        problem = run()
    except Exception as exc:
        problem = describe_error(exc)
    return Check(section, name, "fail" if problem else "pass", problem or "", time.perf_counter() - start)

