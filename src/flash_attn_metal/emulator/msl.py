"""A structured reading of MSL source: tokens, kernel signatures, threadgroup declarations.

This is not a full C++ parser. It reads exactly the structure the emulator needs and refuses, with
`UnsupportedMSL`, the constructs it does not implement:

- tokens, with comments dropped and preprocessor lines kept whole;
- top-level `kernel` functions: their parameters (address space, element type, pointer or reference,
  `[[buffer(i)]]` or a builtin attribute) and the brace range of their body;
- `threadgroup` variable declarations inside kernel bodies;
- the field names of structs (so that vector swizzles are not confused with struct members).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import UnsupportedMSL

# Token kinds.
IDENT, NUMBER, STRING, PUNCT, PREPROC = "ident", "number", "string", "punct", "preproc"

_TOKEN_RE = re.compile(
    r"""
    (?P<ws>[ \t\r\f\v]+|\n)
  | (?P<line_comment>//[^\n]*)
  | (?P<block_comment>/\*.*?\*/)
  | (?P<number>(?:0[xX][0-9a-fA-F]+|(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?)[a-zA-Z]*)
  | (?P<ident>[A-Za-z_]\w*)
  | (?P<string>"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*')
  | (?P<punct>::|->|\+\+|--|<<=|>>=|<<|>>|<=|>=|==|!=|&&|\|\||[-+*/%&|^!=<>]=|\.\.\.|[{}()\[\];,.?:~!%^&*+\-/<>=|\#])
    """,
    re.VERBOSE | re.DOTALL,
)


@dataclass(frozen=True)
class Token:
    kind: str
    text: str
    line: int  # 1-based MSL line


def tokenize(source: str) -> list[Token]:
    """Split MSL into tokens. Preprocessor directives become one PREPROC token each (continuations joined)."""
    tokens: list[Token] = []
    pos, line, at_line_start = 0, 1, True
    n = len(source)
    while pos < n:
        if at_line_start:
            stripped = len(source) - len(source[pos:].lstrip(" \t"))
            if stripped < n and source[stripped] == "#":
                end = stripped
                while True:
                    nl = source.find("\n", end)
                    if nl == -1:
                        end = n
                        break
                    if source[nl - 1] == "\\":
                        end = nl + 1
                        continue
                    end = nl
                    break
                text = source[stripped:end]
                tokens.append(Token(PREPROC, text, line))
                line += text.count("\n")
                pos = end
                continue
        m = _TOKEN_RE.match(source, pos)
        if m is None:
            raise UnsupportedMSL(source[pos], line, "unexpected character")
        kind = m.lastgroup
        text = m.group()
        if kind == "ws":
            if text == "\n":
                line += 1
                at_line_start = True
            pos = m.end()
            continue
        at_line_start = False
        if kind in ("line_comment", "block_comment"):
            line += text.count("\n")
        else:
            tokens.append(Token(kind, text, line))
        pos = m.end()
    return tokens


# Builtin kernel-parameter attributes and the launch quantity each one reads.
BUILTIN_ATTRIBUTES = {
    "thread_position_in_grid",
    "threadgroup_position_in_grid",
    "thread_position_in_threadgroup",
    "thread_index_in_threadgroup",
    "threads_per_threadgroup",
    "threadgroups_per_grid",
    "threads_per_grid",
    "simdgroup_index_in_threadgroup",
    "thread_index_in_simdgroup",
    "simdgroups_per_threadgroup",
    "threads_per_simdgroup",
    "thread_execution_width",
}

ADDRESS_SPACES = ("device", "constant", "threadgroup", "thread")


@dataclass(frozen=True)
class Param:
    """One kernel parameter."""

    name: str
    type_tokens: tuple[str, ...]  # the declared type, attributes removed
    line: int
    builtin: str | None = None  # the builtin attribute, for position/index parameters
    buffer_index: int | None = None  # [[buffer(i)]], explicit or implied by order
    address_space: str | None = None  # "device" or "constant" for buffers
    is_pointer: bool = False
    is_reference: bool = False
    element_type: str = ""  # e.g. "half", "float4", "atomic_int"


@dataclass
class ThreadgroupDecl:
    """`threadgroup T name[dims];` inside a kernel body, as token index ranges."""

    start: int  # index of the `threadgroup` token
    end: int  # index of the terminating `;`
    type_text: str
    declarators: list[tuple[str, str]]  # (name, array dims text such as "[64][8]")
    line: int


@dataclass
class Kernel:
    name: str
    params: list[Param]
    line: int
    kernel_token: int  # index of the `kernel` keyword (or of the `[[kernel]]` opening bracket)
    signature_end: int  # index of the `)` closing the parameter list
    body_start: int  # index of `{`
    body_end: int  # index of the matching `}`
    max_threads: int | None  # [[max_total_threads_per_threadgroup(N)]]
    attribute_ranges: list[tuple[int, int]] = field(default_factory=list)  # token ranges to drop
    threadgroup_decls: list[ThreadgroupDecl] = field(default_factory=list)


@dataclass
class Program:
    tokens: list[Token]
    kernels: list[Kernel]
    struct_fields: set[str]
    uses_atomics: bool


_FORBIDDEN = {
    "__asm": "inline assembly is private Metal; recent macOS rejects it at run time",
    "asm": "inline assembly is private Metal; recent macOS rejects it at run time",
    "texture1d": "textures", "texture2d": "textures", "texture3d": "textures", "sampler": "samplers",
    "function_constant": "function constants", "imageblock": "imageblocks", "vertex": "vertex functions",
    "fragment": "fragment functions", "stage_in": "stage_in",
}


def _matching(tokens: list[Token], i: int, open_: str, close: str) -> int:
    depth = 0
    for j in range(i, len(tokens)):
        t = tokens[j].text
        if tokens[j].kind != PUNCT:
            continue
        if t == open_:
            depth += 1
        elif t == close:
            depth -= 1
            if depth == 0:
                return j
    raise UnsupportedMSL(open_, tokens[i].line, f"unbalanced {open_!r}")


def _attribute_end(tokens: list[Token], i: int) -> int:
    """`i` points at the first `[` of `[[`; return the index of the second `]` of `]]`."""
    depth = 0
    for j in range(i, len(tokens)):
        t = tokens[j].text
        if t == "[":
            depth += 1
        elif t == "]":
            depth -= 1
            if depth == 0:
                return j
    raise UnsupportedMSL("[[", tokens[i].line, "unterminated attribute")


def _is_attribute(tokens: list[Token], i: int) -> bool:
    return tokens[i].text == "[" and i + 1 < len(tokens) and tokens[i + 1].text == "["


def parse(source: str) -> Program:
    tokens = tokenize(source)
    for t in tokens:
        if t.kind == PREPROC:
            words = t.text[1:].split()
            if words[:2] == ["pragma", "METAL"]:
                raise UnsupportedMSL("#pragma METAL", t.line, "private Metal internals are not public MSL")
            if words and words[0] == "include" and "metal_stdlib" not in t.text:
                raise UnsupportedMSL(t.text, t.line, "only <metal_stdlib> can be included")
        elif t.kind == IDENT and t.text in _FORBIDDEN:
            raise UnsupportedMSL(t.text, t.line, _FORBIDDEN[t.text])
    kernels: list[Kernel] = []
    struct_fields: set[str] = set()
    depth = 0
    i = 0
    while i < len(tokens):
        t = tokens[i]
        if t.kind == PUNCT and t.text == "{":
            depth += 1
        elif t.kind == PUNCT and t.text == "}":
            depth -= 1
        elif depth == 0 and t.kind == IDENT and t.text in ("struct", "class"):
            i = _read_struct(tokens, i, struct_fields)
            continue
        elif depth == 0 and (t.text == "kernel" or (_is_attribute(tokens, i) and tokens[i + 2].text == "kernel")):
            kernel = _read_kernel(tokens, i)
            kernels.append(kernel)
            i = kernel.body_end + 1
            continue
        i += 1
    uses_atomics = any(t.kind == IDENT and t.text.startswith("atomic") for t in tokens)
    return Program(tokens, kernels, struct_fields, uses_atomics)


def _read_struct(tokens: list[Token], i: int, fields: set[str]) -> int:
    """Collect member names of a struct definition; return the index after it."""
    j = i
    while j < len(tokens) and tokens[j].text not in ("{", ";"):
        j += 1
    if j >= len(tokens) or tokens[j].text == ";":
        return j + 1
    end = _matching(tokens, j, "{", "}")
    depth = 0
    for k in range(j + 1, end):
        text = tokens[k].text
        if text in "{(":
            depth += 1
        elif text in "})":
            depth -= 1
        elif depth == 0 and tokens[k].kind == IDENT and tokens[k + 1].text in (";", ",", "[", "=", ":"):
            fields.add(text)
    return end + 1


def _read_kernel(tokens: list[Token], i: int) -> Kernel:
    line = tokens[i].line
    attribute_ranges: list[tuple[int, int]] = []
    max_threads: int | None = None
    j = i
    while True:
        if _is_attribute(tokens, j):
            end = _attribute_end(tokens, j)
            words = [t.text for t in tokens[j + 2 : end - 1]]
            if words and words[0] == "max_total_threads_per_threadgroup":
                max_threads = int(words[2])
            elif words and words[0] != "kernel":
                raise UnsupportedMSL(f"[[{' '.join(words)}]]", tokens[j].line)
            attribute_ranges.append((j, end))
            j = end + 1
        elif tokens[j].text == "kernel":
            attribute_ranges.append((j, j))
            j += 1
        else:
            break
    # Return type then name then '('.
    start = j
    while tokens[j].text != "(":
        j += 1
    if tokens[start].text == "template" or any(t.text == "<" for t in tokens[start:j]):
        raise UnsupportedMSL("template kernel", line, "declare kernels as plain functions")
    name = tokens[j - 1].text
    close = _matching(tokens, j, "(", ")")
    params = _read_params(tokens, j + 1, close, attribute_ranges)
    k = close + 1
    while _is_attribute(tokens, k):
        end = _attribute_end(tokens, k)
        attribute_ranges.append((k, end))
        k = end + 1
    if tokens[k].text != "{":
        raise UnsupportedMSL(tokens[k].text, tokens[k].line, "expected a kernel body")
    body_end = _matching(tokens, k, "{", "}")
    kernel = Kernel(name, params, line, i, close, k, body_end, max_threads, attribute_ranges)
    kernel.threadgroup_decls = _read_threadgroup_decls(tokens, k, body_end)
    return kernel


def _split_top_level(tokens: list[Token], begin: int, end: int) -> list[tuple[int, int]]:
    parts, depth, part_start = [], 0, begin
    for j in range(begin, end):
        text = tokens[j].text
        if text in "([{<":
            depth += 1
        elif text in ")]}>":
            depth -= 1
        elif text == "," and depth == 0:
            parts.append((part_start, j))
            part_start = j + 1
    if part_start < end:
        parts.append((part_start, end))
    return parts


_QUALIFIERS = {"const", "volatile", "restrict", "device", "constant", "thread", "threadgroup", "metal", "::"}


def _read_params(tokens: list[Token], begin: int, end: int, attribute_ranges: list) -> list[Param]:
    params: list[Param] = []
    next_buffer = 0
    for a, b in _split_top_level(tokens, begin, end):
        attribute: list[str] = []
        type_end = b
        for j in range(a, b):
            if _is_attribute(tokens, j):
                attr_end = _attribute_end(tokens, j)
                attribute = [t.text for t in tokens[j + 2 : attr_end - 1]]
                attribute_ranges.append((j, attr_end))
                type_end = j
                break
        decl = tokens[a:type_end]
        if not decl or decl[-1].kind != IDENT:
            raise UnsupportedMSL(" ".join(t.text for t in tokens[a:b]), tokens[a].line, "unnamed kernel parameter")
        name = decl[-1].text
        type_tokens = tuple(t.text for t in decl[:-1])
        line = decl[-1].line
        if attribute and attribute[0] in BUILTIN_ATTRIBUTES:
            params.append(Param(name, type_tokens, line, builtin=attribute[0]))
            continue
        space = next((s for s in ADDRESS_SPACES if s in type_tokens), None)
        if attribute and attribute[0] != "buffer":
            raise UnsupportedMSL(f"[[{''.join(attribute)}]]", line, "only [[buffer(i)]] and thread-position attributes")
        if space not in ("device", "constant"):
            raise UnsupportedMSL(
                " ".join(type_tokens) + " " + name, line, "kernel parameters must be device or constant buffers"
            )
        index = int(attribute[2]) if attribute else next_buffer
        next_buffer = index + 1
        element = " ".join(t for t in type_tokens if t not in _QUALIFIERS and t not in ("*", "&"))
        params.append(
            Param(
                name,
                type_tokens,
                line,
                buffer_index=index,
                address_space=space,
                is_pointer="*" in type_tokens,
                is_reference="&" in type_tokens,
                element_type=element,
            )
        )
    return params


_STATEMENT_START = {";", "{", "}"}


def is_threadgroup_variable(tokens: list[Token], j: int) -> bool:
    """Whether the statement starting at the `threadgroup` token tokens[j] declares a threadgroup variable,
    rather than a pointer or reference into threadgroup memory."""
    for t in tokens[j + 1 :]:
        if t.text in ("*", "&"):
            return False
        if t.text in ("=", ";", "["):
            return True
    return True


def _read_threadgroup_decls(tokens: list[Token], body_start: int, body_end: int) -> list[ThreadgroupDecl]:
    decls = []
    for j in range(body_start + 1, body_end):
        if tokens[j].text != "threadgroup" or tokens[j - 1].text not in _STATEMENT_START:
            continue
        if not is_threadgroup_variable(tokens, j):
            continue
        semi = j
        while tokens[semi].text != ";":
            semi += 1
        parts = _split_top_level(tokens, j + 1, semi)
        first_a, first_b = parts[0]
        # The type is everything before the first declarator's name (the identifier before '[' or the end).
        name_at = next((k for k in range(first_a, first_b) if tokens[k].text == "["), first_b) - 1
        type_text = " ".join(t.text for t in tokens[first_a:name_at])
        declarators = []
        for a, b in parts:
            if a == first_a:
                a = name_at
            if any(t.text == "=" for t in tokens[a:b]):
                raise UnsupportedMSL("threadgroup initializer", tokens[a].line, "threadgroup variables cannot be initialized")
            declarators.append((tokens[a].text, "".join(t.text for t in tokens[a + 1 : b])))
        decls.append(ThreadgroupDecl(j, semi, type_text, declarators, tokens[j].line))
    return decls
