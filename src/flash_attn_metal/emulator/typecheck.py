"""`typecheck(source)`: compile MSL with a real clang front end (libclang, in process) under a Metal shim.

include/metal_typecheck.h declares Metal for clang: `device`, `constant` and `threadgroup` are distinct address
spaces (SYCL's, under which `thread`, the default space, holds the others: see the shim), vectors are ext_vector
types, and the standard library has Metal's signatures. Its library half is served from memory as
`<metal_stdlib>`, from a virtual include directory.

libclang's own lexer reads the source first. The few spellings C++ lacks are rewritten token by token, never
across lines, and the columns they move are mapped back, so diagnostics carry MSL lines and columns:
- a `threadgroup` variable declared in a kernel becomes `static` (C++ has no address-space-qualified locals);
- Metal's attributes (`[[buffer(0)]]`, `[[thread_position_in_grid]]`, `[[kernel]]`, ...) become
  `[[clang::annotate("metal.<name>", args)]]`, so that kernel signatures can be checked on clang's AST;
- half literals (`1.0h`) get clang's `f16` suffix, and unsuffixed floating literals an `f` (Metal has no double);
- `vec<T, N>(...)`, and `T(...)` for a template parameter or alias T, become the shim's conversions, which are
  element-wise for vectors, as `float4(...)` is through a macro;
- member functions repeated for each address space of `this` become one (C++ cannot qualify `this`).
Then the rules clang cannot see: the non-public `__asm` and `#pragma METAL` are refused; threadgroup variables
are declared only in kernels and never initialized; program-scope variables are in the constant address space;
every kernel parameter is a device or constant buffer or a built-in input of an allowed type.
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import re
import threading
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import Diagnostic, MSLCompileError
from .msl import STDLIB_HEADERS, after_templates_and_attributes

SHIM_PATH = Path(__file__).parent / "include" / "metal_typecheck.h"
INCLUDE_DIR = "/metal-typecheck/include"  # never on disk: clang gets every file under it from memory
SHIM_FILE = f"{INCLUDE_DIR}/metal_typecheck.h"
# The headers the shim shares with the runtime: Metal's predefined macros and constants, and common type traits.
SHARED_HEADERS = ("msl_constants.h", "msl_type_traits.h")
# <metal_stdlib> and the sub-headers a kernel may name instead (msl.STDLIB_HEADERS) each serve the library half.
# The source reaches clang under this module's own path, its content replaced from memory: clang keeps a
# precompiled preamble only for a main file that exists on disk.
MAIN_FILE = str(Path(__file__).resolve())
LEX_FILE = "/metal-typecheck/lex.metal"
# Two lines ahead of the source: the shim (all of it when the source includes <metal_stdlib>), then a
# declaration that ends clang's preamble there, so that every source reuses the shim's precompiled preamble.
PREFIX = {True: b"#include <metal_stdlib>\nnamespace metal_tc {}\n",
          False: b"#include <metal_typecheck.h>\nnamespace metal_tc {}\n"}
PREFIX_LINES = 2
CLANG_ARGS = ("-x", "c++", "-std=c++17", "-ffreestanding", "-nostdinc", "-nostdinc++", "-fsyntax-only", "-w",
              "-flax-vector-conversions=none",  # Metal converts no vector type to another implicitly
              "-Xclang", "-fsycl-is-device",  # the shim's address spaces are SYCL's (see metal_typecheck.h)
              "-ferror-limit=50", "-isystem", INCLUDE_DIR)

# Kernel-parameter attributes of Metal's built-in inputs, by the types they allow.
POSITION_ATTRIBUTES = frozenset({  # uint, uint2, uint3, ushort, ushort2 or ushort3
    "thread_position_in_grid", "threadgroup_position_in_grid", "thread_position_in_threadgroup",
    "threads_per_threadgroup", "threadgroups_per_grid", "threads_per_grid", "dispatch_threads_per_threadgroup",
    "grid_origin", "grid_size",
})
INDEX_ATTRIBUTES = frozenset({  # uint or ushort
    "thread_index_in_threadgroup", "simdgroup_index_in_threadgroup", "thread_index_in_simdgroup",
    "simdgroups_per_threadgroup", "threads_per_simdgroup", "thread_execution_width",
    "dispatch_simdgroups_per_threadgroup", "quadgroup_index_in_threadgroup", "thread_index_in_quadgroup",
    "quadgroups_per_threadgroup", "dispatch_quadgroups_per_threadgroup",
})
# Attributes rewritten to clang annotations; clang ignores any other attribute, as Apple's compiler does.
METAL_ATTRIBUTES = POSITION_ATTRIBUTES | INDEX_ATTRIBUTES | {
    "kernel", "buffer", "threadgroup", "max_total_threads_per_threadgroup", "host_name"}
ADDRESS_SPACES = {"__global": "device", "__private": "constant", "__local": "threadgroup"}  # as the shim spells them
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
    """libclang, loaded once per process: an index that keeps precompiled preambles in memory, a translation unit
    for lexing and one per prefix for checking, each re-parsed for the next source (the shim compiles once)."""

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
        self.headers = [(SHIM_FILE, SHIM_PATH.read_text())] + [
            (f"{INCLUDE_DIR}/{h}", SHIM_PATH.with_name(h).read_text()) for h in SHARED_HEADERS] + [
            (f"{INCLUDE_DIR}/{h}", stdlib) for h in sorted(STDLIB_HEADERS)]
        self.units: dict[Any, Any] = {}  # "lex", and True/False: whether the source includes <metal_stdlib>

    def close(self) -> None:
        """Free the translation units, then the index, while libclang's bindings are still loaded."""
        self.units.clear()
        self.index = None

    def unit(self, key: Any, path: str, args: list[str], files: list[tuple[str, bytes]], options: int) -> Any:
        """The translation unit `key`, parsed from `files` (the first is `path`): created once, then re-parsed."""
        tu = self.units.get(key)
        if tu is None:
            tu = self.units[key] = self.index.parse(path, args=args, unsaved_files=files, options=options)
        else:
            tu.reparse(unsaved_files=files)
        return tu

    def check(self, source: str) -> tuple[Diagnostic, ...]:
        data = source.encode()
        tokens = self.lex(data)
        edits = _Edits()
        found = _Scanner(tokens, edits).run()
        prepared, shifts = edits.apply(data, tokens.line_starts)
        stdlib = tokens.includes_stdlib()
        files = [(MAIN_FILE, PREFIX[stdlib] + prepared)] + self.headers
        options = self.ci.TranslationUnit.PARSE_PRECOMPILED_PREAMBLE | _CREATE_PREAMBLE_ON_FIRST_PARSE
        tu = self.unit(stdlib, MAIN_FILE, list(CLANG_ARGS), files, options)
        where = None
        for d in tu.diagnostics:
            if d.severity >= self.ci.Diagnostic.Error:
                # An error with no place in the source follows from the one before (clang notes where an
                # instantiation was requested only for its first error).
                where = _source_location(d) or where
                found.append(_diagnostic(where, tokens, shifts, _clang_message(d)))
        found += _check_declarations(self.ci, tu, tokens, shifts)
        return tuple(sorted(dict.fromkeys(found), key=lambda d: (d.line, d.column)))  # clang's order within a place

    def lex(self, data: bytes) -> _Tokens:
        """The source's tokens but comments, within the source (the lexer may run on into the `#endif`)."""
        kinds, starts, ends = self.token_spans(data)
        keep = [i for i, k in enumerate(kinds) if k != _COMMENT and starts[i] < len(data)]
        if len(keep) < len(kinds) or (ends and ends[-1] > len(data)):
            kinds, starts = [kinds[i] for i in keep], [starts[i] for i in keep]
            ends = [min(ends[i], len(data)) for i in keep]
        return _Tokens(data, kinds, starts, ends)

    def token_spans(self, data: bytes, fast: bool = True) -> tuple[list[int], list[int], list[int]]:
        """The kind, start and end of each token of `data`, from libclang's lexer (`data` is wrapped in `#if 0`,
        so nothing is parsed)."""
        ci, lib = self.ci, self.lib
        prefix = b"#if 0\n"
        tu = self.unit("lex", LEX_FILE, ["-x", "c++", "-nostdinc"], [(LEX_FILE, prefix + data + b"\n#endif\n")], 0)
        file = tu.get_file(LEX_FILE)
        extent = ci.SourceRange.from_locations(ci.SourceLocation.from_offset(tu, file, len(prefix)),
                                               ci.SourceLocation.from_offset(tu, file, len(prefix) + len(data)))
        array = ctypes.POINTER(ci.Token)()
        count = ctypes.c_uint()
        lib.clang_tokenize(tu, extent, ctypes.byref(array), ctypes.byref(count))
        try:
            return self.read_tokens(tu, array, count.value, len(prefix), fast)
        finally:
            lib.clang_disposeTokens(tu, array, count)

    def read_tokens(self, tu: Any, array: Any, count: int, base: int,
                    fast: bool) -> tuple[list[int], list[int], list[int]]:
        """The kind, start and end of each token in libclang's array, offsets less `base`. The fast way reads the
        kind, raw location and length that libclang keeps in each token's first three ints, and is taken only where
        it agrees with libclang's accessors on the first and the last token."""
        if count == 0:
            return [], [], []
        if fast and ctypes.sizeof(self.ci.Token) == 6 * ctypes.sizeof(ctypes.c_uint):
            ints = (ctypes.c_uint * (6 * count)).from_address(ctypes.addressof(array.contents))[:]
            first, last = self.token_span(tu, array[0]), self.token_span(tu, array[count - 1])
            shift = ints[1] - first[1] + base
            kinds, starts = ints[0::6], [r - shift for r in ints[1::6]]
            ends = [s + n for s, n in zip(starts, ints[2::6])]
            if all((kinds[i], starts[i] + base, ends[i] + base) == span for i, span in ((0, first), (-1, last))):
                return kinds, starts, ends
        spans = [self.token_span(tu, array[i]) for i in range(count)]
        return [k for k, _, _ in spans], [a - base for _, a, _ in spans], [b - base for _, _, b in spans]

    def token_span(self, tu: Any, token: Any) -> tuple[int, int, int]:
        """(kind, start, end) of one token, from libclang's accessors."""
        lib = self.lib
        extent = lib.clang_getTokenExtent(tu, token)
        offsets = []
        for at in (lib.clang_getRangeStart(extent), lib.clang_getRangeEnd(extent)):
            offset = ctypes.c_uint()
            lib.clang_getFileLocation(at, None, None, None, ctypes.byref(offset))
            offsets.append(offset.value)
        return lib.clang_getTokenKind(token), offsets[0], offsets[1]


_CREATE_PREAMBLE_ON_FIRST_PARSE = 0x100  # CXTranslationUnit_CreatePreambleOnFirstParse (unnamed in the bindings)


class _CXIndexOptions(ctypes.Structure):
    """libclang's CXIndexOptions (libclang >= 17). Its bit-fields follow the two chars, from bit 0 of the short at
    offset 6: ExcludeDeclarationsFromPCH, DisplayDiagnostics, StorePreamblesInMemory."""

    _fields_ = [("Size", ctypes.c_uint), ("ThreadBackgroundPriorityForIndexing", ctypes.c_ubyte),
                ("ThreadBackgroundPriorityForEditing", ctypes.c_ubyte), ("flags", ctypes.c_ushort),
                ("PreambleStoragePath", ctypes.c_char_p), ("InvocationEmissionPath", ctypes.c_char_p)]


_STORE_PREAMBLES_IN_MEMORY = 1 << 2


def _index_with_preambles_in_memory(ci: Any) -> Any:
    """A libclang index that keeps precompiled preambles in memory, not in temporary files."""
    create = ci.conf.lib.clang_createIndexWithOptions  # not wrapped by the bindings: declared here
    create.argtypes = [ctypes.POINTER(_CXIndexOptions)]
    create.restype = ci.c_object_p
    handle = create(ctypes.byref(_CXIndexOptions(Size=ctypes.sizeof(_CXIndexOptions),
                                                 flags=_STORE_PREAMBLES_IN_MEMORY)))
    if not handle:
        raise RuntimeError("libclang could not create an index (clang_createIndexWithOptions)")
    return ci.Index(handle)


def _source_location(d: Any) -> Any:
    """Where in the source a clang diagnostic belongs: its own location, or for one inside the shim, the note
    that says where the source asked for the instantiation; None if neither is in the source."""
    return next((x.location for x in [d, *d.children] if _in_main(x.location) and x.location.line > PREFIX_LINES),
                None)


def _clang_message(d: Any) -> str:
    """The message, followed by the reasons clang gives for rejecting the first two candidates, in Metal's words."""
    reasons = [n.spelling for n in d.children if n.spelling.startswith("candidate")][:2]
    if d.spelling == "automatic variable qualified with an address space":
        reasons.append("Metal's local variables are thread variables, but for threadgroup variables written out in "
                       "a kernel's body (not made by a macro)")
    message = _metal_spelling(d.spelling + "".join(f"; {r}" for r in reasons))
    return re.sub(r"'([^']*)' \(aka '\1'\)", r"'\1'", message)  # drop an aka that now says the same


def _in_main(location: Any) -> bool:
    return location.file is not None and location.file.name == MAIN_FILE


def _diagnostic(where: Any, source: _Tokens, shifts: dict[int, list[_Shift]], message: str) -> Diagnostic:
    """An error at a clang location in the main file (None: nowhere in the source), in MSL lines and columns."""
    if where is None or where.line <= PREFIX_LINES:
        return Diagnostic(0, 0, "error", message)
    line = where.line - PREFIX_LINES
    return Diagnostic(line, source.character_column(line, _msl_column(shifts.get(line), where.column)), "error",
                      message)


def _metal_spelling(message: str) -> str:
    """Clang's message with the shim's address spaces and scalar types spelled as Metal spells them."""
    for spelling, name in ADDRESS_SPACES.items():
        message = re.sub(rf"\b{spelling}\b", name, message)
    message = message.replace("_Float16", "half").replace("__bf16", "bfloat")
    return re.sub(r"((?:unsigned )?\w+) __attribute__\(\(ext_vector_type\((\d)\)\)\)",
                  lambda m: _SCALAR_NAMES.get(m[1], m[1]) + m[2], message)


_SCALAR_NAMES = {"unsigned char": "uchar", "unsigned short": "ushort", "unsigned int": "uint", "unsigned long": "ulong"}


# ---------------------------------------------------------------------------------------------------------
# Tokens


_IDENTIFIER, _LITERAL, _COMMENT = 2, 3, 4  # CXTokenKind
# After these, `T(` is not a functional cast; the shim's vector types construct through macros of their own.
_NOT_A_CAST_AFTER = frozenset({".", "->", "::", "operator", "typename", "class", "struct", "~", "typedef"})
_SHIM_MACRO_TYPES = frozenset(f"{t}{n}" for t in ("bool", "char", "uchar", "short", "ushort", "int", "uint", "long",
                                                  "ulong", "half", "bfloat", "float") for n in (2, 3, 4))


class _Tokens:
    """The source's bytes, its line starts, and its tokens as parallel lists (comments dropped)."""

    def __init__(self, data: bytes, kinds: list[int], starts: list[int], ends: list[int]) -> None:
        self.data = data
        self.line_starts = [0]
        newline = data.find(b"\n")
        while newline != -1:
            self.line_starts.append(newline + 1)
            newline = data.find(b"\n", newline + 1)
        self.kind, self.start, self.end = kinds, starts, ends
        if data.isascii():  # byte offsets are character offsets: slice the string
            text = data.decode()
            self.text = [text[a:b] for a, b in zip(starts, ends)]
        else:
            self.text = [data[a:b].decode() for a, b in zip(starts, ends)]
        # Whether each token is on a preprocessor directive's (backslash-continued) line.
        self.directive = [False] * len(starts)
        directive_end = -1
        for i, text in enumerate(self.text):
            if text == "#" and starts[i] > directive_end and (i == 0 or self.line(i - 1) < self.line(i)):
                directive_end = _logical_line_end(data, starts[i])
            if starts[i] < directive_end:
                self.directive[i] = True

    def __len__(self) -> int:
        return len(self.text)

    def get(self, i: int) -> str:
        """The text of token i, or "" past either end."""
        return self.text[i] if 0 <= i < len(self.text) else ""

    def line(self, i: int) -> int:
        return bisect_right(self.line_starts, self.start[i])

    def column(self, i: int) -> int:
        """Token i's column, in characters."""
        line = self.line(i)
        return self.character_column(line, self.start[i] - self.line_starts[line - 1] + 1)

    def character_column(self, line: int, column: int) -> int:
        """The column, in characters, of byte column `column` (1-based, as clang counts) of a line."""
        start = self.line_starts[line - 1] if line <= len(self.line_starts) else len(self.data)
        return len(self.data[start:start + column - 1].decode(errors="replace")) + 1

    def includes_stdlib(self) -> bool:
        """Whether a directive `#include <metal_stdlib>` (or a sub-header) is in the source."""
        return any(self.directive[i] and self.text[i] in STDLIB_HEADERS and self.get(i - 1) == "<"
                   and self.get(i - 2) == "include" for i in range(len(self)))


def _logical_line_end(data: bytes, start: int) -> int:
    """The offset of the newline that ends the (backslash-continued) line of `start`."""
    while True:
        newline = data.find(b"\n", start)
        if newline == -1:
            return len(data)
        if not data[start:newline].rstrip(b"\r").endswith(b"\\"):
            return newline
        start = newline + 1


# ---------------------------------------------------------------------------------------------------------
# Edits that keep every line in place, and the column map back to the MSL


@dataclass(frozen=True)
class _Shift:
    """One edit on a line: its replacement spans [new_start, new_end) of the rewritten line and stands for MSL
    column msl_start; every later column of the line is delta_after to the right of its MSL column."""

    new_start: int
    new_end: int
    msl_start: int
    delta_after: int


@dataclass
class _Edits:
    changes: list[tuple[int, int, str]] = field(default_factory=list)  # (start, end, replacement) in bytes

    def replace(self, start: int, end: int, text: str) -> None:
        self.changes.append((start, end, text))

    def insert(self, at: int, text: str) -> None:
        self.replace(at, at, text)

    def apply(self, source: bytes, line_starts: list[int]) -> tuple[bytes, dict[int, list[_Shift]]]:
        """The rewritten source, and per line where its edits moved the columns."""
        out, pos = [], 0
        shifts: dict[int, list[_Shift]] = {}
        for start, end, text in sorted(self.changes, key=lambda c: (c[0], c[1])):
            if start < pos:
                continue  # inside a span already replaced (a literal in a dropped attribute list)
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
# The token pass: rewrites, and the rules clang cannot see


@dataclass
class _Scope:
    kind: str  # "namespace", "record", "function" (a body, or any block inside one) or "other" (an initializer)
    kernel: bool = False  # a kernel's body, or a block inside one
    depth: int = 0  # open parentheses and brackets
    by_space: dict[str, str] = field(default_factory=dict)  # a record's member functions qualified by `this`'s space


_ASM = frozenset({"asm", "__asm", "__asm__"})
_ACCESS = frozenset({"public", "private", "protected"})
# What ends a function's declaration before its body (`}`: a constructor's member initializer in braces).
_FUNCTION_BODY_AFTER = frozenset({")", "const", "noexcept", "override", "final", "mutable", "volatile", "]", "&",
                                  "&&", "}", "device", "constant", "threadgroup", "thread"})
_OPEN, _CLOSE = frozenset({"(", "["}), frozenset({")", "]"})
_SPACE_WORDS = frozenset({"device", "constant", "threadgroup", "thread"})
_THIS_QUALIFIERS = _SPACE_WORDS | {"const", "volatile"}


class _Scanner:
    """One pass over the tokens: records the rewrites in `edits` and returns the errors only tokens show."""

    def __init__(self, tokens: _Tokens, edits: _Edits) -> None:
        self.tokens = tokens
        self.edits = edits
        self.found: list[Diagnostic] = []
        self.instantiation_attributes_end = -1  # where the last dropped attribute list ends (token index)

    def error(self, i: int, message: str) -> None:
        self.found.append(Diagnostic(self.tokens.line(i), self.tokens.column(i), "error", message))

    def run(self) -> list[Diagnostic]:
        tokens = self.tokens
        get, texts, kinds = tokens.get, tokens.text, tokens.kind
        in_attribute_until = 0
        type_names = self.type_names()
        for i, text in enumerate(texts):
            if text in _ASM:
                self.error(i, f"inline assembly (`{text}`) is not public MSL")
            elif text == "pragma" and get(i - 1) == "#" and get(i + 1) == "METAL" and tokens.directive[i]:
                self.error(i - 1, "`#pragma METAL` switches on Metal's private internals, which are not public MSL")
            elif text == "_Pragma" and get(i + 2).strip('"').startswith("METAL"):
                self.error(i, "`_Pragma(\"METAL ...\")` switches on Metal's private internals, which are not "
                              "public MSL")
            elif kinds[i] == _LITERAL:
                self.literal(i)
            elif text == "[" and get(i + 1) == "[" and i >= in_attribute_until:
                in_attribute_until = self.attributes(i)
            elif text == "vec" and get(i + 1) == "<":
                self.vector_constructor(i)
            elif text in type_names and get(i + 1) == "(" and get(i - 1) not in _NOT_A_CAST_AFTER and not (
                    get(i + 2) in ("*", "&") and kinds[i + 3] == _IDENTIFIER and get(i + 4) == ")"):  # `T (&a)[4]`
                # `T4(x)` with T4 a template parameter or an alias: Metal converts element-wise, clang's
                # functional cast of a vector would reinterpret its bits.
                self.edits.insert(tokens.start[i], "::metal_tc::cast<")
                self.edits.insert(tokens.end[i], ">")
        self.structure([i for i in range(len(tokens)) if not tokens.directive[i]])
        return self.found

    def type_names(self) -> set[str]:
        """The names of template type parameters, typedefs and aliases (a name's scope is not followed)."""
        tokens = self.tokens
        get, texts = tokens.get, tokens.text
        names = set()
        for i, text in enumerate(texts):
            if text in ("typename", "class") and get(i - 1) in ("<", ",") and tokens.kind[i + 1] == _IDENTIFIER:
                names.add(texts[i + 1])
            elif text == "using" and tokens.kind[i + 1] == _IDENTIFIER and get(i + 2) == "=":
                names.add(texts[i + 1])
            elif text == "typedef":
                j, depth = i + 1, 0
                while j < len(texts) and not (texts[j] == ";" and depth == 0):
                    depth += (texts[j] in ("(", "[", "<")) - (texts[j] in (")", "]", ">"))
                    j += 1
                if tokens.kind[j - 1] == _IDENTIFIER:
                    names.add(texts[j - 1])
        return names - _SHIM_MACRO_TYPES

    def literal(self, i: int) -> None:
        """Half literals get clang's f16 suffix; unsuffixed floating literals are float, as in Metal."""
        text = self.tokens.text[i]
        if not (text[0].isdigit() or (text[0] == "." and text[1:2].isdigit())):
            return  # a string or character literal
        hexadecimal = text[:2].lower() == "0x"
        if not ("p" in text.lower() if hexadecimal else ("." in text or "e" in text.lower())):
            return  # an integer
        suffix_at = len(text)
        while text[suffix_at - 1].isalpha():
            suffix_at -= 1
        end = self.tokens.end[i]
        if suffix_at == len(text):
            self.edits.insert(end, "f")
        elif text[suffix_at:] in ("h", "H"):
            self.edits.replace(end - 1, end, "f16")

    def attributes(self, i: int) -> int:
        """Rewrite Metal's attributes in the `[[...]]` at token i; return the index past its `]]`. The attributes
        of an explicit instantiation (`template [[host_name("f")]] [[kernel]] void f<float>(...);`), which C++
        does not allow there, are dropped."""
        tokens = self.tokens
        drop = tokens.get(i - 1) == "template" or i == self.instantiation_attributes_end
        j, depth, item_start = i + 2, 0, True
        while j < len(tokens):
            text = tokens.text[j]
            if depth == 0 and text == "]" and tokens.get(j + 1) == "]":
                if drop:
                    self.edits.replace(tokens.start[i], tokens.end[j + 1], "")
                    self.instantiation_attributes_end = j + 2
                return j + 2
            if depth == 0 and text == ",":
                item_start = True
                j += 1
                continue
            if text in _OPEN:
                depth += 1
            elif text in _CLOSE:
                depth -= 1
            elif item_start and not drop and text in METAL_ATTRIBUTES and tokens.get(j + 1) != "::":
                annotation = f'clang::annotate("metal.{text}"'
                if tokens.get(j + 1) == "(":
                    self.edits.replace(tokens.start[j], tokens.end[j + 1], annotation + ", ")
                    depth += 1
                    j += 1
                else:
                    self.edits.replace(tokens.start[j], tokens.end[j], annotation + ")")
            item_start = False
            j += 1
        return j

    def vector_constructor(self, i: int) -> None:
        """`vec<T, N>(...)` -> `::metal_tc::make<vec<T, N>>(...)`, as the shim's `float4(...)` macros do."""
        tokens = self.tokens
        j, angle, depth = i + 1, 0, 0
        while j < len(tokens):
            text = tokens.text[j]
            if text in _OPEN:
                depth += 1
            elif text in _CLOSE:
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
        if angle != 0 or tokens.get(j + 1) != "(":
            return  # a type, not a constructor call (or a `>>` that closes an enclosing template too)
        start = i
        if tokens.get(i - 1) == "::" and tokens.get(i - 2) == "metal":
            start = i - 3 if tokens.get(i - 3) == "::" else i - 2
        self.edits.insert(tokens.start[start], "::metal_tc::make<")
        self.edits.insert(tokens.end[j], ">")

    def structure(self, code: list[int]) -> None:
        """Follow the scopes through the code (token indexes, directives left out) to the statements that start
        with `threadgroup`."""
        texts = self.tokens.text
        stack = [_Scope("namespace")]
        declaration = 0  # at namespace or record scope: where in `code` the current declaration starts
        statement_start = False  # in a function: the token starts a statement
        for position, i in enumerate(code):
            text = texts[i]
            scope = stack[-1]
            in_function = scope.kind == "function"
            if in_function and statement_start and text == "threadgroup":
                self.threadgroup_variable(code[position:], scope)
            statement_start = False
            if text in _OPEN:
                scope.depth += 1
            elif text in _CLOSE:
                scope.depth -= 1
            elif text == "{":
                if in_function:
                    stack.append(_Scope("function", scope.kernel))
                elif scope.kind == "other":
                    stack.append(_Scope("other"))
                else:
                    stack.append(_classify([texts[k] for k in code[declaration:position]]))
                    if scope.kind == "record" and stack[-1].kind == "function":
                        self.this_space_qualified(code, declaration, position, scope)
                statement_start = True
            elif text == "}":
                closed = stack.pop() if len(stack) > 1 else scope
                if stack[-1].kind == "function":
                    statement_start = True
                elif closed.kind in ("function", "namespace"):
                    declaration = position + 1
            elif text == ";" and scope.depth == 0:
                statement_start = in_function
                declaration = position + 1
            elif text == ":" and in_function:
                statement_start = True  # after a label
            elif text == ":" and scope.kind == "record" and position and texts[code[position - 1]] in _ACCESS:
                declaration = position + 1

    def this_space_qualified(self, code: list[int], declaration: int, brace: int, record: _Scope) -> None:
        """`T& operator[](int i) device { ... }`: C++ has no address space for `this`. Such versions that differ only
        in it (as generated code spells one per space) are one function to clang, whose default space holds every
        other: the first version is kept without its address spaces, and the others, which must say the same, go."""
        tokens, texts = self.tokens, self.tokens.text
        k = brace - 1
        spaces = []
        while k > declaration and texts[code[k]] in _THIS_QUALIFIERS:
            if texts[code[k]] in _SPACE_WORDS:
                spaces.append(code[k])
            k -= 1
        if texts[code[k]] != ")" or not spaces:
            return
        depth, end = 0, brace
        for end in range(brace, len(code)):
            depth += {"{": 1, "}": -1}.get(texts[code[end]], 0)
            if depth == 0:
                break
        key = " ".join(texts[code[j]] for j in range(declaration, brace) if texts[code[j]] not in _SPACE_WORDS)
        body = " ".join(texts[code[j]] for j in range(brace, end + 1))
        if key not in record.by_space:  # kept, in the default space (its return type's too)
            record.by_space[key] = body
            for j in range(declaration, brace):
                if texts[code[j]] in _SPACE_WORDS:
                    self.edits.replace(tokens.start[code[j]], tokens.end[code[j]], "")
        elif record.by_space[key] == body:
            first, last = tokens.start[code[declaration]], tokens.end[code[end]]
            self.edits.replace(first, last, "\n" * tokens.data[first:last].count(b"\n"))
        else:
            self.error(code[declaration], "member functions that differ in more than the address space of `this` "
                                          "are not modelled (by the type check nor the emulator)")

    def threadgroup_variable(self, statement: list[int], scope: _Scope) -> None:
        """A statement that starts with `threadgroup`: variables (made static), or a pointer or reference."""
        texts = self.tokens.text
        depth = angle = 0
        pointer = initialized = False
        declarator_ends = []  # the `,` and `;` that end each declarator
        for i in statement[1:]:
            text = texts[i]
            if depth == 0 and angle <= 0 and text in (",", ";"):
                declarator_ends.append(i)
                if text == ";":
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
        first = statement[0]
        if pointer:
            return
        if not scope.kernel:
            self.error(first, "threadgroup variables can be declared only in a kernel function")
        elif initialized:
            self.error(first, "a threadgroup variable cannot have an initializer")
        else:
            # `= {}` initializes without a constructor call, which clang cannot make on an object in an address
            # space; Metal leaves threadgroup memory uninitialized.
            self.edits.insert(self.tokens.start[first], "static ")
            for end in declarator_ends:
                self.edits.insert(self.tokens.start[end], " = {}")


def _classify(prefix: list[str]) -> _Scope:
    """The scope a `{` at namespace or record scope opens, from the declaration before it."""
    if "namespace" in prefix[:2] or (prefix[:1] == ["extern"] and len(prefix) == 2):
        return _Scope("namespace")
    rest = after_templates_and_attributes(prefix)
    if rest[:1] == ["typedef"]:
        rest = rest[1:]
    if rest[:1] and rest[0] in ("struct", "class", "union", "enum"):
        return _Scope("record")
    top, depth = [], 0
    for k, text in enumerate(rest):
        if text in _OPEN:
            depth += 1
        elif text in _CLOSE:
            depth -= 1
        elif depth == 0 and not (text == "=" and k and rest[k - 1] == "operator"):
            top.append(text)
    if "=" in top or ")" not in rest:
        return _Scope("other")
    if rest[-1] in _FUNCTION_BODY_AFTER or "->" in top:
        return _Scope("function", kernel="kernel" in prefix)
    return _Scope("other")  # a member initializer's braces


# ---------------------------------------------------------------------------------------------------------
# Declarations, on clang's AST


def _check_declarations(ci: Any, tu: Any, source: _Tokens, shifts: dict[int, list[_Shift]]) -> list[Diagnostic]:
    """Program-scope variables live in the constant address space; kernel signatures are Metal's."""
    found: list[Diagnostic] = []
    K = ci.CursorKind

    def error(cursor: Any, message: str) -> None:
        found.append(_diagnostic(cursor.location, source, shifts, message))

    def visit(parent: Any) -> None:
        for c in parent.get_children():
            kind = _kind(c)
            if kind not in (K.NAMESPACE, K.LINKAGE_SPEC, K.VAR_DECL, K.FUNCTION_DECL) or not _in_main(c.location):
                continue
            if kind in (K.NAMESPACE, K.LINKAGE_SPEC):
                visit(c)
            elif kind == K.VAR_DECL and _space(c.type) != "constant":
                error(c, f"program-scope variable '{c.spelling}' must be declared in the constant address space")
            elif kind == K.FUNCTION_DECL and "metal.kernel" in _annotations(ci, c):
                _check_kernel(ci, c, error)

    visit(tu.cursor)
    return found


def _kind(x: Any) -> Any:
    """A cursor's or type's kind, or None for one that libclang's Python bindings do not name (in 18.1, the
    _Float16 and __bf16 types)."""
    try:
        return x.kind
    except ValueError:
        return None


def _space(t: Any) -> str | None:
    """The Metal address space of a type (device, constant or threadgroup), or None for thread memory."""
    words = t.get_canonical().spelling.replace("*", " ").replace("&", " ").split()
    return next((ADDRESS_SPACES[w] for w in words if w in ADDRESS_SPACES), None)


def _annotations(ci: Any, cursor: Any) -> list[str]:
    return [c.spelling for c in cursor.get_children() if _kind(c) == ci.CursorKind.ANNOTATE_ATTR]


def _check_kernel(ci: Any, kernel: Any, error: Callable[[Any, str], None]) -> None:
    T = ci.TypeKind
    if _kind(kernel.result_type.get_canonical()) != T.VOID:
        error(kernel, f"kernel function '{kernel.spelling}' must return void")
    for p in kernel.get_arguments():
        attributes = [a.removeprefix("metal.") for a in _annotations(ci, p) if a.startswith("metal.")]
        t = p.type.get_canonical()
        space = _space(t.get_pointee()) if _kind(t) in (T.POINTER, T.LVALUEREFERENCE) else None
        name, spelled = p.spelling, _metal_spelling(p.type.spelling)
        inputs = [a for a in attributes if a in POSITION_ATTRIBUTES or a in INDEX_ATTRIBUTES]
        if "buffer" in attributes:
            if space not in ("device", "constant"):
                error(p, f"kernel parameter '{name}' with [[buffer(n)]] must be a device or constant pointer or "
                         f"reference, not '{spelled}'")
        elif "threadgroup" in attributes:
            if space != "threadgroup":
                error(p, f"kernel parameter '{name}' with [[threadgroup(n)]] must be a threadgroup pointer or "
                         f"reference, not '{spelled}'")
        elif inputs:
            element, count = (_kind(t.element_type), t.element_count) if _kind(t) == T.EXTVECTOR else (_kind(t), 1)
            index = inputs[0] in INDEX_ATTRIBUTES
            if element not in (T.UINT, T.USHORT) or count > (1 if index else 3):
                allowed = "uint or ushort" if index else "uint, uint2, uint3, ushort, ushort2 or ushort3"
                error(p, f"kernel parameter '{name}' with [[{inputs[0]}]] must be {allowed}, not '{spelled}'")
        elif space is None:
            error(p, f"kernel parameter '{name}' of type '{spelled}' must be a device or constant pointer or "
                     "reference ([[buffer(n)]]) or carry a built-in input attribute such as "
                     "[[thread_position_in_grid]]")
