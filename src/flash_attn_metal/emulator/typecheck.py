"""`typecheck(source)`: compile MSL with a real clang front end (libclang) under include/metal_typecheck.h, a
freestanding shim in which Metal's address spaces are distinct and vectors are ext_vector types.

The source is read with the emulator's tokenizer and changed only where C++ and MSL spell things
differently, keeping every line where it was so diagnostics carry MSL line numbers: threadgroup variables
in kernels become `static` (C++ has no address-space-qualified locals), program-scope `constant` values
become `static const`, half literals (`1.0h`) become casts, and `#include <metal_stdlib>` is served by the shim.
"""

from __future__ import annotations

import functools
from pathlib import Path

from .errors import Diagnostic, MSLCompileError, UnsupportedMSL
from .msl import NUMBER, PREPROC, parse
from .translate import half_literal, pointer_type_end

SHIM = Path(__file__).parent / "include" / "metal_typecheck.h"
FILE_NAME = "kernel.metal.cpp"
CLANG_ARGS = ("-x", "c++", "-std=c++17", "-ffreestanding", "-nostdinc", "-nostdinc++", "-fsyntax-only",
              "-Wno-unknown-attributes", "-Wno-ignored-attributes", "-include", str(SHIM))


def typecheck(source: str) -> None:
    """Raise MSLCompileError (diagnostics with MSL line numbers) unless `source` type-checks as Metal."""
    diagnostics = _check(source)
    if diagnostics:
        raise MSLCompileError(list(diagnostics), "MSL type check failed")


@functools.lru_cache(maxsize=512)
def _check(source: str) -> tuple[Diagnostic, ...]:
    try:
        prepared = _prepare(source)
    except UnsupportedMSL as exc:
        return (Diagnostic(exc.line or 0, 1, "error", str(exc)),)
    import clang.cindex as ci

    tu = ci.Index.create().parse(FILE_NAME, args=list(CLANG_ARGS), unsaved_files=[(FILE_NAME, prepared)])
    found = []
    for d in tu.diagnostics:
        if d.severity < ci.Diagnostic.Error:
            continue
        in_source = d.location.file is not None and d.location.file.name == FILE_NAME
        found.append(Diagnostic(d.location.line if in_source else 0, d.location.column if in_source else 0,
                                "error", d.spelling))
    del tu  # freed now, not at interpreter exit when libclang's bindings are gone
    return tuple(found)


def _prepare(source: str) -> str:
    program = parse(source)
    tokens = program.tokens
    static_at = {d.start for k in program.kernels for d in k.threadgroup_decls}
    out: list[str] = []
    line, depth = 1, 0
    for i, t in enumerate(tokens):
        if t.line > line:
            out.append("\n" * (t.line - line))
            line = t.line
        text = t.text
        if text in ("{", "("):
            depth += 1
        elif text in ("}", ")"):
            depth -= 1
        if t.kind == PREPROC:
            text = "" if "metal_stdlib" in text else text
            line += t.text.count("\n")
        elif t.kind == NUMBER:
            text = half_literal(text)
        elif i in static_at:
            text = "static threadgroup"
        elif text == "constant" and depth == 0 and pointer_type_end(tokens, i) is None:
            text = "static const"
        out.append(text + " ")
    return "".join(out)
