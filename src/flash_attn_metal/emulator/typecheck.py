"""`typecheck(source)`: compile MSL with a real clang front end (libclang, in process) under a Metal shim.

include/metal_typecheck.h declares Metal for clang: `device`, `constant` and `threadgroup` are distinct address
spaces (`thread` is the default one), vectors are ext_vector types, and the standard library is declared with
Metal's signatures. Its library half is served from memory as `<metal_stdlib>`, from a virtual include directory.

libclang's own lexer reads the source first. A handful of spellings that C++ lacks are rewritten token by token,
on the same line, so clang's diagnostics carry MSL lines (and columns are mapped back):
- a `threadgroup` variable declared in a kernel becomes `static` (C++ has no address-space-qualified locals);
- Metal's attributes (`[[buffer(0)]]`, `[[thread_position_in_grid]]`, `[[kernel]]`, ...) become
  `[[clang::annotate("metal.<name>", args)]]`, so that kernel signatures can be checked from clang's AST;
- half literals (`1.0h`) get clang's `f16` suffix, and unsuffixed floating literals an `f` (Metal has no double);
- `vec<T, N>(...)` becomes the shim's vector constructor, as `float4(...)` does through a macro.
Then checks of our own: the non-public `__asm` and `#pragma METAL`; threadgroup variables only in kernels and
never initialized; program-scope variables only in the constant address space; every kernel parameter a device
or constant buffer or a built-in input of an allowed type.
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import threading
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from .errors import Diagnostic, MSLCompileError

SHIM_PATH = Path(__file__).parent / "include" / "metal_typecheck.h"
INCLUDE_DIR = "/metal-typecheck/include"  # never on disk: clang gets every file under it from memory
SHIM_FILE = f"{INCLUDE_DIR}/metal_typecheck.h"
# <metal_stdlib> and the sub-headers a kernel may name instead; each serves the whole library half of the shim.
STDLIB_HEADERS = ("metal_stdlib", "metal_atomic", "metal_common", "metal_compute", "metal_geometric",
                  "metal_integer", "metal_math", "metal_numeric", "metal_relational", "metal_simdgroup",
                  "metal_simdgroup_matrix", "metal_type_traits", "metal_types")
# The source goes to clang under this module's own path, its content replaced from memory: clang keeps a
# precompiled preamble only for a main file that exists on disk.
MAIN_FILE = str(Path(__file__).resolve())
LEX_FILE = "/metal-typecheck/lex.metal"
# Two lines ahead of the source: the shim (the whole of it when the source includes <metal_stdlib>), then a
# declaration that ends clang's preamble there, so that every source reuses the shim's precompiled preamble.
PREFIX = {True: b"#include <metal_stdlib>\nnamespace metal_tc {}\n",
          False: b"#include <metal_typecheck.h>\nnamespace metal_tc {}\n"}
PREFIX_LINES = 2
CLANG_ARGS = ("-x", "c++", "-std=c++17", "-ffreestanding", "-nostdinc", "-nostdinc++", "-fsyntax-only", "-w",
              "-ferror-limit=50", "-isystem", INCLUDE_DIR)

# Kernel-parameter attributes of Metal's built-in inputs, and the types each allows.
POSITION_ATTRIBUTES = frozenset({
    "thread_position_in_grid", "threadgroup_position_in_grid", "thread_position_in_threadgroup",
    "threads_per_threadgroup", "threadgroups_per_grid", "threads_per_grid", "dispatch_threads_per_threadgroup",
    "grid_origin", "grid_size",
})
INDEX_ATTRIBUTES = frozenset({
    "thread_index_in_threadgroup", "simdgroup_index_in_threadgroup", "thread_index_in_simdgroup",
    "simdgroups_per_threadgroup", "threads_per_simdgroup", "thread_execution_width",
    "dispatch_simdgroups_per_threadgroup", "quadgroup_index_in_threadgroup", "thread_index_in_quadgroup",
    "quadgroups_per_threadgroup", "dispatch_quadgroups_per_threadgroup",
})
# Attributes rewritten to clang annotations (any other attribute is left to clang, which ignores it).
METAL_ATTRIBUTES = POSITION_ATTRIBUTES | INDEX_ATTRIBUTES | {
    "kernel", "buffer", "threadgroup", "max_total_threads_per_threadgroup", "host_name"}
ADDRESS_SPACES = {1: "device", 2: "constant", 3: "threadgroup"}  # as numbered in the shim
CACHE_SIZE = 4096


def typecheck(source: str) -> None:
    """Raise MSLCompileError, with MSL line numbers, unless `source` compiles as Metal (types, address spaces,
    declarations; no code generation). Results are cached in process by the source's hash."""
    if not isinstance(source, str):
        raise TypeError(f"source must be a str of MSL, got {type(source).__name__}")
    key = hashlib.sha256(source.encode()).digest()
    with _LOCK:
        diagnostics = _CACHE.get(key)
        if diagnostics is None:
            diagnostics = _Checker.get().check(source)
            if len(_CACHE) >= CACHE_SIZE:
                del _CACHE[next(iter(_CACHE))]
            _CACHE[key] = diagnostics
    if diagnostics:
        raise MSLCompileError(list(diagnostics), f"MSL type check failed ({len(diagnostics)} error(s))")


_LOCK = threading.Lock()  # libclang's translation units and the cache serve one thread at a time
_CACHE: dict[bytes, tuple[Diagnostic, ...]] = {}


# ---------------------------------------------------------------------------------------------------------
# The clang session


class _Checker:
    """libclang, loaded once per process: an index that keeps precompiled preambles in memory, and one translation
    unit per prefix, re-parsed for each source so that the shim is compiled once."""

    _instance: _Checker | None = None

    @classmethod
    def get(cls) -> _Checker:
        if cls._instance is None:
            cls._instance = cls()
            atexit.register(cls._instance.close)
        return cls._instance

    def __init__(self) -> None:
        try:
            import clang.cindex as cindex
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ImportError("typecheck needs libclang's Python bindings: pip install 'flash-attn-metal[emulator]'"
                              ) from exc
        self.ci = cindex
        self.lib = cindex.conf.lib
        self.index = _index_with_preambles_in_memory(cindex)
        stdlib = '#define METAL_TYPECHECK_STDLIB\n#include "metal_typecheck.h"\n'
        self.headers = [(SHIM_FILE, SHIM_PATH.read_text())] + [(f"{INCLUDE_DIR}/{h}", stdlib) for h in STDLIB_HEADERS]
        self.units: dict[bool, Any] = {}

    def close(self) -> None:
        """Free the translation units before the index (and both before libclang's bindings go at exit)."""
        self.units.clear()
        self.index = None

    def check(self, source: str) -> tuple[Diagnostic, ...]:
        data = source.encode()
        line_starts = _line_starts(data)
        tokens = self.lex(data, line_starts)
        edits = _Edits()
        found = _Scanner(tokens, edits).run()
        prepared, shifts = edits.apply(data, line_starts)
        tu = self.parse(prepared, _includes_stdlib(tokens))
        found += self.clang_diagnostics(tu, shifts)
        found += _check_declarations(self.ci, tu, shifts)
        return tuple(sorted(set(found), key=lambda d: (d.line, d.column, d.message)))

    def parse(self, prepared: bytes, stdlib: bool) -> Any:
        files = [(MAIN_FILE, PREFIX[stdlib] + prepared)] + self.headers
        tu = self.units.get(stdlib)
        if tu is None:
            options = self.ci.TranslationUnit.PARSE_PRECOMPILED_PREAMBLE | _CREATE_PREAMBLE_ON_FIRST_PARSE
            tu = self.units[stdlib] = self.index.parse(MAIN_FILE, args=list(CLANG_ARGS), unsaved_files=files,
                                                       options=options)
        else:
            tu.reparse(unsaved_files=files)
        return tu

    def lex(self, data: bytes, line_starts: list[int]) -> list[Token]:
        """The source's tokens, from libclang's lexer (the source is wrapped in `#if 0` so that nothing is parsed)."""
        ci, lib = self.ci, self.lib
        prefix = b"#if 0\n"
        tu = self.index.parse(LEX_FILE, args=["-x", "c++", "-nostdinc"],
                              unsaved_files=[(LEX_FILE, prefix + data + b"\n#endif\n")])
        file = tu.get_file(LEX_FILE)
        extent = ci.SourceRange.from_locations(ci.SourceLocation.from_offset(tu, file, len(prefix)),
                                               ci.SourceLocation.from_offset(tu, file, len(prefix) + len(data)))
        array = ctypes.POINTER(ci.Token)()
        count = ctypes.c_uint()
        lib.clang_tokenize(tu, extent, ctypes.byref(array), ctypes.byref(count))
        try:
            spans = self.token_spans(tu, array, count.value, len(prefix))
        finally:
            lib.clang_disposeTokens(tu, array, count)
        tokens: list[Token] = []
        directive_end = -1
        for kind, start, end in spans:
            if kind == _COMMENT or start >= len(data):
                continue
            line = bisect_right(line_starts, start)
            text = data[start:end].decode()
            if text == "#" and start > directive_end and (not tokens or tokens[-1].line < line):
                directive_end = _logical_line_end(data, start)
            tokens.append(Token(_TOKEN_KINDS[kind], text, start, end, line, start - line_starts[line - 1] + 1,
                                start < directive_end))
        return tokens

    def token_spans(self, tu: Any, array: Any, count: int, base: int, fast: bool = True) -> list[tuple[int, int, int]]:
        """(kind, start, end) of each token, with offsets less `base`. The fast way reads the kind, raw location and
        length that libclang stores in each token's first three ints; it is used only when it agrees with
        libclang's accessors on the first and last token."""
        if count == 0:
            return []
        if fast and ctypes.sizeof(self.ci.Token) == 6 * ctypes.sizeof(ctypes.c_uint):
            ints = list((ctypes.c_uint * (6 * count)).from_address(ctypes.addressof(array.contents)))
            shift = ints[1] - (self.token_span(tu, array[0])[1] - base)
            spans = [(k, r - shift, r - shift + n) for k, r, n in zip(ints[0::6], ints[1::6], ints[2::6])]
            checks = ((0, self.token_span(tu, array[0])), (count - 1, self.token_span(tu, array[count - 1])))
            if all(spans[i] == (k, a - base, b - base) for i, (k, a, b) in checks):
                return spans
        spans = []
        for i in range(count):
            kind, start, end = self.token_span(tu, array[i])
            spans.append((kind, start - base, end - base))
        return spans

    def token_span(self, tu: Any, token: Any) -> tuple[int, int, int]:
        lib = self.lib
        extent = lib.clang_getTokenExtent(tu, token)
        offsets = []
        for at in (lib.clang_getRangeStart(extent), lib.clang_getRangeEnd(extent)):
            offset = ctypes.c_uint()
            lib.clang_getFileLocation(at, None, None, None, ctypes.byref(offset))
            offsets.append(offset.value)
        return lib.clang_getTokenKind(token), offsets[0], offsets[1]

    def clang_diagnostics(self, tu: Any, shifts: dict[int, list[_Shift]]) -> list[Diagnostic]:
        found = []
        for d in tu.diagnostics:
            if d.severity < self.ci.Diagnostic.Error:
                continue
            # An error inside the shim is placed where the source asked for it (an instantiation note).
            where = next((x.location for x in [d, *d.children] if _in_main(x.location)), None)
            found.append(_diagnostic(where, shifts, _metal_spelling(d.spelling)))
        return found


# CXTranslationUnit_CreatePreambleOnFirstParse, which the Python bindings do not name.
_CREATE_PREAMBLE_ON_FIRST_PARSE = 0x100


class _CXIndexOptions(ctypes.Structure):
    """CXIndexOptions of libclang >= 17. Its bit-fields follow the two chars, from bit 0 of the short at offset 6:
    ExcludeDeclarationsFromPCH, DisplayDiagnostics, StorePreamblesInMemory."""

    _fields_ = [("Size", ctypes.c_uint), ("ThreadBackgroundPriorityForIndexing", ctypes.c_ubyte),
                ("ThreadBackgroundPriorityForEditing", ctypes.c_ubyte), ("flags", ctypes.c_ushort),
                ("PreambleStoragePath", ctypes.c_char_p), ("InvocationEmissionPath", ctypes.c_char_p)]


_STORE_PREAMBLES_IN_MEMORY = 1 << 2


def _index_with_preambles_in_memory(ci: Any) -> Any:
    """A libclang index that keeps precompiled preambles in memory (no temporary files)."""
    create = ci.conf.lib.clang_createIndexWithOptions
    create.argtypes = [ctypes.POINTER(_CXIndexOptions)]
    create.restype = ci.c_object_p
    options = _CXIndexOptions(Size=ctypes.sizeof(_CXIndexOptions), flags=_STORE_PREAMBLES_IN_MEMORY)
    handle = create(ctypes.byref(options))
    if not handle:
        raise RuntimeError("libclang could not create an index (clang_createIndexWithOptions)")
    return ci.Index(handle)


def _in_main(location: Any) -> bool:
    return location.file is not None and location.file.name == MAIN_FILE


def _diagnostic(where: Any, shifts: dict[int, list[_Shift]], message: str) -> Diagnostic:
    """A diagnostic at a clang location in the main file (None: no place in the source), in MSL lines and columns."""
    if where is None or where.line <= PREFIX_LINES:
        return Diagnostic(0, 0, "error", message)
    line = where.line - PREFIX_LINES
    return Diagnostic(line, _msl_column(shifts.get(line), where.column), "error", message)


def _metal_spelling(message: str) -> str:
    """Clang's message with the shim's address spaces spelled as Metal spells them."""
    for number, name in ADDRESS_SPACES.items():
        message = message.replace(f"__attribute__((address_space({number})))", name)
    return message


# ---------------------------------------------------------------------------------------------------------
# Tokens


class Token(NamedTuple):
    kind: str  # "punctuation", "keyword", "identifier" or "literal" (libclang's kinds; comments are dropped)
    text: str
    start: int  # byte offsets into the UTF-8 source
    end: int
    line: int  # 1-based
    column: int  # 1-based, in bytes (as clang counts)
    directive: bool  # on a preprocessor directive's line


_TOKEN_KINDS = {0: "punctuation", 1: "keyword", 2: "identifier", 3: "literal"}  # CXTokenKind
_COMMENT = 4


def _line_starts(data: bytes) -> list[int]:
    starts = [0]
    newline = data.find(b"\n")
    while newline != -1:
        starts.append(newline + 1)
        newline = data.find(b"\n", newline + 1)
    return starts


def _logical_line_end(data: bytes, start: int) -> int:
    """The offset of the newline that ends the (backslash-continued) line starting at `start`."""
    while True:
        newline = data.find(b"\n", start)
        if newline == -1:
            return len(data)
        if data[start:newline].rstrip(b"\r").endswith(b"\\"):
            start = newline + 1
            continue
        return newline


def _includes_stdlib(tokens: list[Token]) -> bool:
    """Whether a directive `#include <metal_stdlib>` (or a sub-header) is in the source."""
    return any(t.directive and t.text in STDLIB_HEADERS and tokens[i - 1].text == "<" and tokens[i - 2].text == "include"
               for i, t in enumerate(tokens) if i >= 2)


# ---------------------------------------------------------------------------------------------------------
# Edits that keep every line in place, and the column map back to the MSL


@dataclass
class _Edits:
    changes: list[tuple[int, int, str]] = field(default_factory=list)  # (start, end, replacement), bytes

    def replace(self, start: int, end: int, text: str) -> None:
        self.changes.append((start, end, text))

    def insert(self, at: int, text: str) -> None:
        self.replace(at, at, text)

    def apply(self, source: bytes, line_starts: list[int]) -> tuple[bytes, dict[int, list[_Shift]]]:
        """The rewritten source, and per line where its edits moved the columns."""
        out, pos = [], 0
        shifts: dict[int, list[_Shift]] = {}
        for start, end, text in sorted(self.changes, key=lambda c: (c[0], c[1])):
            width = len(text.encode())
            out += [source[pos:start], text.encode()]
            pos = end
            line = bisect_right(line_starts, start)
            column = start - line_starts[line - 1] + 1
            on_line = shifts.setdefault(line, [])
            before = on_line[-1].delta_after if on_line else 0
            on_line.append(_Shift(column + before, column + before + width, column, before + width - (end - start)))
        out.append(source[pos:])
        return b"".join(out), shifts


@dataclass(frozen=True)
class _Shift:
    """One edit on a line: its replacement spans [new_start, new_end) of the rewritten line and stands for MSL
    column msl_start; every column after it is delta_after further right than in the MSL."""

    new_start: int
    new_end: int
    msl_start: int
    delta_after: int


def _msl_column(shifts: list[_Shift] | None, column: int) -> int:
    """The MSL column of a column of the rewritten line."""
    msl = column
    for shift in shifts or ():
        if column < shift.new_start:
            break
        if column < shift.new_end:
            return shift.msl_start
        msl = column - shift.delta_after
    return msl


# ---------------------------------------------------------------------------------------------------------
# The token pass: rewrites and the rules clang cannot see


@dataclass
class _Scope:
    kind: str  # "namespace", "record", "function" (a body, or any block inside one) or "other" (an initializer)
    kernel: bool = False  # a kernel's body, or a block inside one
    depth: int = 0  # open parentheses and brackets


class _Scanner:
    def __init__(self, tokens: list[Token], edits: _Edits) -> None:
        self.tokens = tokens
        self.edits = edits
        self.found: list[Diagnostic] = []

    def error(self, token: Token, message: str) -> None:
        self.found.append(Diagnostic(token.line, token.column, "error", message))

    def text(self, i: int) -> str:
        return self.tokens[i].text if 0 <= i < len(self.tokens) else ""

    def run(self) -> list[Diagnostic]:
        skip_to = 0
        for i, t in enumerate(self.tokens):
            self.forbidden(i, t)
            if i < skip_to:
                continue
            if t.kind == "literal":
                self.literal(t)
            elif t.text == "[" and self.text(i + 1) == "[":
                skip_to = self.attributes(i)
            elif t.text == "vec" and self.text(i + 1) == "<":
                self.vector_constructor(i)
        self.structure([t for t in self.tokens if not t.directive])
        return self.found

    def forbidden(self, i: int, t: Token) -> None:
        if t.text in ("asm", "__asm", "__asm__"):
            self.error(t, f"inline assembly (`{t.text}`) is not public MSL")
        elif t.directive and t.text == "#" and self.text(i + 1) == "pragma" and self.text(i + 2) == "METAL":
            self.error(t, "`#pragma METAL` switches on Metal's private internals, which are not public MSL")
        elif t.text == "_Pragma" and self.text(i + 2).strip('"').startswith("METAL"):
            self.error(t, "`_Pragma(\"METAL ...\")` switches on Metal's private internals, which are not public MSL")

    def literal(self, t: Token) -> None:
        """Half literals get clang's f16 suffix; unsuffixed floating literals are float in Metal."""
        text = t.text
        if not (text[0].isdigit() or (text[0] == "." and text[1:2].isdigit())):
            return  # a string or character literal
        hexadecimal = text[:2].lower() == "0x"
        if not ("p" in text.lower() if hexadecimal else ("." in text or "e" in text.lower())):
            return  # an integer
        suffix_at = len(text)
        while text[suffix_at - 1].isalpha():
            suffix_at -= 1
        suffix = text[suffix_at:]
        if not suffix:
            self.edits.insert(t.end, "f")
        elif suffix in ("h", "H"):
            self.edits.replace(t.end - 1, t.end, "f16")

    def attributes(self, i: int) -> int:
        """Rewrite Metal's attributes in the `[[...]]` at token i; return the index after its `]]`."""
        j, depth = i + 2, 0
        item_start = True
        while j < len(self.tokens):
            t = self.tokens[j]
            if depth == 0 and t.text == "]" and self.text(j + 1) == "]":
                return j + 2
            if t.text in ("(", "["):
                depth += 1
            elif t.text in (")", "]"):
                depth -= 1
            elif depth == 0 and t.text == ",":
                item_start = True
                j += 1
                continue
            if item_start and t.text in METAL_ATTRIBUTES and self.text(j + 1) != "::":
                annotation = f'clang::annotate("metal.{t.text}"'
                if self.text(j + 1) == "(":
                    self.edits.replace(t.start, self.tokens[j + 1].end, annotation + ", ")
                    depth += 1
                    j += 1
                else:
                    self.edits.replace(t.start, t.end, annotation + ")")
            item_start = False
            j += 1
        return j

    def vector_constructor(self, i: int) -> None:
        """`vec<T, N>(...)` -> `::metal_tc::make<vec<T, N>>(...)`, as the shim's `float4(...)` macros do."""
        j, angle, depth = i + 1, 0, 0
        while j < len(self.tokens):
            text = self.tokens[j].text
            if text in ("(", "["):
                depth += 1
            elif text in (")", "]"):
                depth -= 1
            elif depth == 0 and text == "<":
                angle += 1
            elif depth == 0 and text in (">", ">>"):
                angle -= len(text)
                if angle <= 0:
                    break
            elif depth == 0 and text in (";", "{", "}"):
                return
            j += 1
        if angle != 0 or self.text(j + 1) != "(":
            return  # a type, not a constructor call (or `>>` closing an enclosing template too)
        start = i
        if self.text(i - 1) == "::" and self.text(i - 2) == "metal":
            start = i - 3 if self.text(i - 3) == "::" else i - 2
        self.edits.insert(self.tokens[start].start, "::metal_tc::make<")
        self.edits.insert(self.tokens[j].end, ">")

    def structure(self, code: list[Token]) -> None:
        """Follow scopes through the code (directives left out) to find threadgroup variable declarations."""
        stack = [_Scope("namespace")]
        declaration = 0  # at namespace or record scope: where the current declaration starts in `code`
        statement_start = False  # in a function: the token starts a statement
        for i, t in enumerate(code):
            scope = stack[-1]
            in_function = scope.kind == "function"
            if in_function and statement_start and t.text == "threadgroup":
                self.threadgroup_variable(code, i, scope)
            statement_start = False
            if t.text in ("(", "["):
                scope.depth += 1
            elif t.text in (")", "]"):
                scope.depth -= 1
            elif t.text == "{":
                if in_function:
                    stack.append(_Scope("function", scope.kernel))
                elif scope.kind == "other":
                    stack.append(_Scope("other"))
                else:
                    kind, kernel = _classify(code[declaration:i])
                    stack.append(_Scope(kind, kernel))
                statement_start = True
            elif t.text == "}":
                closed = stack.pop() if len(stack) > 1 else scope
                if stack[-1].kind == "function":
                    statement_start = True
                elif closed.kind in ("function", "namespace"):
                    declaration = i + 1
            elif t.text == ";" and scope.depth == 0:
                statement_start = in_function
                declaration = i + 1
            elif t.text == ":" and scope.kind == "record" and i and code[i - 1].text in _ACCESS:
                declaration = i + 1

    def threadgroup_variable(self, code: list[Token], i: int, scope: _Scope) -> None:
        """A statement that starts with `threadgroup`: a variable (made static), or a pointer or reference."""
        depth = angle = 0
        pointer = initialized = False
        for t in code[i + 1:]:
            text = t.text
            if depth == 0 and text == ";":
                break
            if text in ("(", "[", "{"):
                initialized |= text == "{" and depth == 0 and angle <= 0
                depth += 1
            elif text in (")", "]", "}"):
                depth -= 1
            elif depth == 0 and text == "<":
                angle += 1
            elif depth == 0 and text in (">", ">>"):
                angle -= len(text)
            elif depth == 0 and angle <= 0 and text == "=":
                initialized = True
            elif depth == 0 and angle <= 0 and text in ("*", "&", "&&") and not initialized:
                pointer = True
        if pointer:
            return
        t = code[i]
        if not scope.kernel:
            self.error(t, "threadgroup variables can be declared only in a kernel function")
        elif initialized:
            self.error(t, "a threadgroup variable cannot have an initializer")
        else:
            self.edits.insert(t.start, "static ")


_ACCESS = ("public", "private", "protected")
_FUNCTION_BODY_AFTER = (")", "const", "noexcept", "override", "final", "mutable", "volatile", "]", "&", "&&")


def _classify(prefix: list[Token]) -> tuple[str, bool]:
    """What a `{` at namespace or record scope opens, from the declaration before it: (kind, is a kernel)."""
    texts = [t.text for t in prefix]
    if "namespace" in texts[:2] or (texts[:1] == ["extern"] and len(texts) == 2):
        return "namespace", False
    rest = _after_templates_and_attributes(texts)
    if rest[:1] == ["typedef"]:
        rest = rest[1:]
    if rest[:1] and rest[0] in ("struct", "class", "union", "enum"):
        return "record", False
    top, depth = [], 0
    for k, text in enumerate(rest):
        if text in ("(", "["):
            depth += 1
        elif text in (")", "]"):
            depth -= 1
        elif depth == 0 and not (text == "=" and k and rest[k - 1] == "operator"):
            top.append(text)
    if "=" in top or ")" not in rest:
        return "other", False
    if rest[-1] in _FUNCTION_BODY_AFTER or "->" in top:
        return "function", "kernel" in texts
    return "other", False  # a member initializer's braces


def _after_templates_and_attributes(texts: list[str]) -> list[str]:
    """`texts` without its leading `template <...>` headers and `[[...]]` attributes."""
    k = 0
    while k < len(texts):
        if texts[k] == "template" and texts[k + 1:k + 2] == ["<"]:
            angle, k = 0, k + 1
            while k < len(texts):
                angle += {"<": 1, ">": -1, ">>": -2}.get(texts[k], 0)
                k += 1
                if angle <= 0:
                    break
        elif texts[k] == "[" and texts[k + 1:k + 2] == ["["]:
            depth = 0
            while k < len(texts):
                depth += {"[": 1, "]": -1}.get(texts[k], 0)
                k += 1
                if depth == 0:
                    break
        else:
            break
    return texts[k:]


# ---------------------------------------------------------------------------------------------------------
# Declarations, from clang's AST


def _check_declarations(ci: Any, tu: Any, shifts: dict[int, list[_Shift]]) -> list[Diagnostic]:
    """Program-scope variables live in the constant address space; kernel signatures are Metal's."""
    found: list[Diagnostic] = []
    K = ci.CursorKind

    def error(cursor: Any, message: str) -> None:
        found.append(_diagnostic(cursor.location, shifts, message))

    def visit(parent: Any) -> None:
        for c in parent.get_children():
            if not _in_main(c.location):
                continue
            if c.kind in (K.NAMESPACE, K.LINKAGE_SPEC):
                visit(c)
            elif c.kind == K.VAR_DECL and _address_space(ci, c.type) != 2:
                error(c, f"program-scope variable '{c.spelling}' must be declared in the constant address space")
            elif c.kind == K.FUNCTION_DECL and "metal.kernel" in _annotations(ci, c):
                _check_kernel(ci, c, error)

    visit(tu.cursor)
    return found


def _annotations(ci: Any, cursor: Any) -> list[str]:
    return [c.spelling for c in cursor.get_children() if c.kind == ci.CursorKind.ANNOTATE_ATTR]


def _address_space(ci: Any, t: Any) -> int:
    t = t.get_canonical()
    while _kind(t) in (ci.TypeKind.CONSTANTARRAY, ci.TypeKind.INCOMPLETEARRAY):
        t = t.element_type
    return t.get_address_space()


def _kind(t: Any) -> Any:
    """The type's kind, or None for a kind libclang's Python bindings do not name (_Float16 and __bf16 in 18.1)."""
    try:
        return t.kind
    except ValueError:
        return None


def _check_kernel(ci: Any, kernel: Any, error: Any) -> None:
    T = ci.TypeKind
    if _kind(kernel.result_type.get_canonical()) != T.VOID:
        error(kernel, f"kernel function '{kernel.spelling}' must return void")
    for p in kernel.get_arguments():
        attributes = [a.removeprefix("metal.") for a in _annotations(ci, p) if a.startswith("metal.")]
        t = p.type.get_canonical()
        space = _address_space(ci, t.get_pointee()) if _kind(t) in (T.POINTER, T.LVALUEREFERENCE) else 0
        spelled = _metal_spelling(p.type.spelling)
        inputs = [a for a in attributes if a in POSITION_ATTRIBUTES or a in INDEX_ATTRIBUTES]
        if "buffer" in attributes:
            if space not in (1, 2):
                error(p, f"kernel parameter '{p.spelling}' with [[buffer(n)]] must be a device or constant pointer "
                         f"or reference, not '{spelled}'")
        elif "threadgroup" in attributes:
            if space != 3:
                error(p, f"kernel parameter '{p.spelling}' with [[threadgroup(n)]] must be a threadgroup pointer or "
                         f"reference, not '{spelled}'")
        elif inputs:
            element, count = (_kind(t.element_type), t.element_count) if _kind(t) == T.EXTVECTOR else (_kind(t), 1)
            index = inputs[0] in INDEX_ATTRIBUTES
            if element not in (T.UINT, T.USHORT) or count > (1 if index else 3):
                allowed = "uint or ushort" if index else "uint, uint2, uint3, ushort, ushort2 or ushort3"
                error(p, f"kernel parameter '{p.spelling}' with [[{inputs[0]}]] must be {allowed}, not '{spelled}'")
        elif space not in (1, 2, 3):
            error(p, f"kernel parameter '{p.spelling}' of type '{spelled}' must be a device or constant pointer or "
                     "reference ([[buffer(n)]]) or carry a built-in input attribute such as "
                     "[[thread_position_in_grid]]")
