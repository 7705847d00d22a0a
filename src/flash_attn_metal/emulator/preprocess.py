"""The C preprocessor over MSL, as Apple's compiler runs it: Metal 3.1's predefined macros (include/msl_constants.h),
no system headers, `<metal_stdlib>` and its sub-headers provided by the emulator's prelude.

The result keeps MSL's line numbers: each line of the preprocessed text is on the line it came from, and where
expansion moves text (a macro's `_Pragma` becomes a `#pragma` line of its own), a `#line` directive says so. A
source without directives (other than `#include <metal_...>` and `#pragma`) needs no preprocessor and skips it.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from pathlib import Path

from .compiler import compiler
from .errors import Diagnostic, MSLCompileError, UnsupportedMSL
from .msl import STDLIB_HEADERS

MSL_FILE = "kernel.metal"
CONSTANTS = Path(__file__).parent / "include" / "msl_constants.h"
_STDLIB_INCLUDE = re.compile(r"^\s*#\s*include\s*<(\w+)>\s*$")
_DIRECTIVE = re.compile(r"^\s*#\s*(\w*)")
_MARKER = re.compile(r'^#\s*(?:line\s+)?(\d+)(?:\s+"((?:\\.|[^"\\])*)")?')
_DIAGNOSTIC = re.compile(rf"^{re.escape(MSL_FILE)}:(\d+):(?:(\d+):)? (?:fatal )?(error|warning): (.*)$")


def preprocess(source: str, fast_math: bool = False) -> str:
    """`source` preprocessed, its lines kept (see the module's docstring)."""
    lines = source.split("\n")
    for n, line in enumerate(lines):
        m = _STDLIB_INCLUDE.match(line)
        if m and m.group(1) in STDLIB_HEADERS:
            lines[n] = ""  # the prelude declares all of <metal_stdlib>
    text = "\n".join(lines)
    if not _needs_preprocessor(lines):
        return text
    return _run(text, fast_math)


def _needs_preprocessor(lines: list[str]) -> bool:
    for line in lines:
        m = _DIRECTIVE.match(line)
        if m and m.group(1) != "pragma":
            return True
        if "_Pragma" in line or "__METAL" in line or "__HAVE_" in line:
            return True
    return False


@functools.lru_cache(maxsize=256)
def _run(text: str, fast_math: bool) -> str:
    cxx, _ = compiler()
    command = [cxx, "-E", "-x", "c++", "-std=c++17", "-undef", "-nostdinc", "-include", str(CONSTANTS)]
    if fast_math:
        command.append("-D__FAST_MATH__=1")
    result = subprocess.run(command + ["-"], input=f'#line 1 "{MSL_FILE}"\n' + text, capture_output=True, text=True,
                            env={**os.environ, "LC_ALL": "C"})
    if result.returncode != 0:
        _raise(result.stderr)
    return _keep_lines(result.stdout)


def _raise(stderr: str) -> None:
    found = []
    for line in stderr.splitlines():
        m = _DIAGNOSTIC.match(line)
        if m and m.group(3) == "error":
            message = m.group(4)
            if "No such file or directory" in message or "file not found" in message:
                raise UnsupportedMSL(f"#include {message.split(':')[0].strip()}", int(m.group(1)),
                                     "only <metal_stdlib> and its sub-headers can be included")
            found.append(Diagnostic(int(m.group(1)), int(m.group(2) or 0), "error", message))
    if not found:
        found = [Diagnostic(0, 0, "error", stderr.strip()[-2000:])]
    raise MSLCompileError(found, "the MSL does not preprocess")


def _keep_lines(output: str) -> str:
    """The preprocessor's output with each line on its MSL line; `#line` where text moved."""
    out: list[str] = []
    line = 1  # the MSL line of the next output line, as a compiler reading `out` would count
    current = 1  # the MSL line of the next line of the preprocessor's output
    in_source = True
    for raw in output.split("\n"):
        m = _MARKER.match(raw) if raw.startswith("#") else None
        if m and not raw.startswith("#pragma"):
            if m.group(2) is not None:
                in_source = m.group(2) == MSL_FILE
            current = int(m.group(1))
            continue
        if not in_source:
            continue
        if raw.strip():
            if current > line and current - line <= 8:
                out.extend([""] * (current - line))
            elif current != line:
                out.append(f"#line {current}")
            line = current
            out.append(raw)
            line += 1
        current += 1
    return "\n".join(out) + "\n"
