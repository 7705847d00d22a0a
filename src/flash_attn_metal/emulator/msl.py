"""A structured reading of preprocessed MSL: tokens, scopes, kernels (plain and templates), their host-name
instantiations, and threadgroup declarations.

This is not a full C++ parser. It reads exactly the structure the emulator needs and refuses, with
`UnsupportedMSL`, the constructs it does not implement:

- tokens, with comments dropped and directives (after preprocessing: `#pragma` lines) kept whole;
- the kind of every brace: a namespace, a class, a function body (or a block inside one), or an initializer;
- kernels at namespace scope: their template header, attributes (`[[kernel]]`,
  `[[max_total_threads_per_threadgroup(N)]]`, `[[host_name("name")]]`), parameters (address space, element type,
  pointer or reference, `[[buffer(i)]]` or a builtin attribute) and body;
- explicit instantiations of kernel templates, `template [[host_name("name")]] [[kernel]] ... f<args>...;`,
  which make them callable under their host name;
- `threadgroup` variable declarations inside kernel bodies;
- the field names of structs (so that vector swizzles are not confused with struct members);
- member functions that repeat another for an address space of `this` (dropped: objects have no address space
  in the emulator).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import UnsupportedMSL

# Token kinds.
IDENT, NUMBER, STRING, PUNCT, PREPROC = "ident", "number", "string", "punct", "preproc"

# <metal_stdlib> and the sub-headers a kernel may include instead (the type check serves the same set).
STDLIB_HEADERS = frozenset({
    "metal_stdlib", "metal_atomic", "metal_common", "metal_compute", "metal_geometric", "metal_integer",
    "metal_math", "metal_numeric", "metal_relational", "metal_simdgroup", "metal_simdgroup_matrix",
    "metal_type_traits", "metal_types", "metal_logging", "metal_graphics", "metal_pack", "metal_texture",
    "metal_matrix", "metal_extended_vector", "metal_uniform", "metal_array", "metal_limits", "metal_quadgroup",
    "metal_numeric_limits", "metal_stdlib_ext", "metal_raytracing", "metal_imageblocks", "metal_tensor",
})

_TOKEN_RE = re.compile(
    r"""
    (?P<ws>[ \t\r\f\v]+|\n)
  | (?P<line_comment>//[^\n]*)
  | (?P<block_comment>/\*.*?\*/)
  | (?P<number>(?:0[xX][0-9a-fA-F]*(?:\.[0-9a-fA-F]*)?(?:[pP][+-]?\d+)?
                 |(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?)[a-zA-Z0-9]*)
  | (?P<ident>[A-Za-z_]\w*)
  | (?P<string>"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*')
  | (?P<punct>::|->|\+\+|--|<<=|>>=|<<|>>|<=|>=|==|!=|&&|\|\||[-+*/%&|^!=<>]=|\.\.\.|[{}()\[\];,.?:~!%^&*+\-/<>=|\#])
    """,
    re.VERBOSE | re.DOTALL,
)


_LINE_MARKER = re.compile(r"#\s*line\s+(\d+)\s*$")


@dataclass(frozen=True)
class Token:
    kind: str
    text: str
    line: int  # 1-based MSL line


def tokenize(source: str) -> list[Token]:
    """Split MSL into tokens. Directives become one PREPROC token each (continuations joined)."""
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
                marker = _LINE_MARKER.match(text)
                if marker:  # `#line N`: the next line is MSL line N
                    line = int(marker.group(1)) - 1
                else:
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
    element_type: str = ""  # e.g. "half", "float4", "atomic_int", or a template parameter's name


@dataclass
class ThreadgroupDecl:
    """`threadgroup T name[dims];` inside a kernel body, as token index ranges."""

    start: int  # index of the `threadgroup` token
    end: int  # index of the terminating `;`
    type_range: tuple[int, int]  # the element type's tokens
    declarators: list[tuple[str, tuple[int, int]]]  # (name, the token range of its array dims such as [64][8])
    line: int


@dataclass(frozen=True)
class TemplateParam:
    name: str
    pack: bool  # a parameter pack: forwarded as `name...`


@dataclass
class Kernel:
    name: str
    namespace: tuple[str, ...]  # enclosing namespaces
    params: list[Param]
    line: int
    start: int  # the first token of the declaration (its template header, if any)
    template: tuple[int, int] | None  # the `template <...>` header's token range, for kernel templates
    template_params: list[TemplateParam]
    body_start: int  # index of `{`
    body_end: int  # index of the matching `}`
    max_threads: tuple[int, int] | None  # [[max_total_threads_per_threadgroup(N)]]: N's token range
    host_name: str | None  # [[host_name("...")]] on a plain kernel
    dropped: list[tuple[int, int]] = field(default_factory=list)  # token ranges to drop (attributes, `kernel`)
    threadgroup_decls: list[ThreadgroupDecl] = field(default_factory=list)

    @property
    def qualified_name(self) -> str:
        return "::".join(self.namespace + (self.name,))


@dataclass
class Instantiation:
    """`template [[host_name("name")]] [[kernel]] ...;` of a kernel template."""

    host_name: str
    kernel: Kernel
    args: tuple[int, int]  # the template arguments' token range
    start: int
    end: int  # the `;`
    line: int


@dataclass
class Program:
    tokens: list[Token]
    kernels: list[Kernel]
    instantiations: list[Instantiation]
    struct_fields: set[str]
    uses_atomics: bool
    scopes: dict[int, str]  # the kind of each `{` (by token index): namespace, class, function or other
    dropped: list[tuple[int, int]]  # member functions that only repeat another for an address space of `this`


_FORBIDDEN = {
    "__asm": "inline assembly is private Metal; recent macOS rejects it at run time",
    "__asm__": "inline assembly is private Metal; recent macOS rejects it at run time",
    "asm": "inline assembly is private Metal; recent macOS rejects it at run time",
    "texture1d": "textures", "texture2d": "textures", "texture3d": "textures", "sampler": "samplers",
    "function_constant": "function constants (torch.mps.compile_shader cannot set them; use constant constexpr "
                         "values)",
    "imageblock": "imageblocks", "vertex": "vertex functions", "fragment": "fragment functions", "stage_in": "stage_in",
}


def matching(tokens: list[Token], i: int, open_: str, close: str) -> int:
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


def group_end(tokens: list[Token], i: int) -> int:
    """`i` points at a `(` or `[`: the index of the `)` or `]` that closes it."""
    open_ = tokens[i].text
    return matching(tokens, i, open_, ")" if open_ == "(" else "]")


def angle_end(tokens: list[Token], i: int) -> int:
    """`i` points at a `<` that opens template arguments or parameters: the index of its closing `>` (a `>>` that
    closes two levels counts as closing this one)."""
    depth = 0
    j = i
    while j < len(tokens):
        t = tokens[j].text
        if t in ("(", "["):
            j = group_end(tokens, j)
        elif t == "<":
            depth += 1
        elif t in (">", ">>"):
            depth -= len(t)
            if depth <= 0:
                return j
        elif t in (";", "{", "}"):
            break
        j += 1
    raise UnsupportedMSL("<", tokens[i].line, "unbalanced template angle brackets")


def is_attribute(tokens: list[Token], i: int) -> bool:
    return tokens[i].text == "[" and i + 1 < len(tokens) and tokens[i + 1].text == "["


def attribute_end(tokens: list[Token], i: int) -> int:
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


def attribute_items(tokens: list[Token], i: int, end: int) -> list[tuple[str, tuple[int, int] | None]]:
    """The items of the attribute list tokens[i..end] (`[[a, b(x)]]`): (name, the argument's token range)."""
    items = []
    for a, b in split_top_level(tokens, i + 2, end - 1):
        if a >= b:
            continue
        name = tokens[a].text
        if a + 1 < b and tokens[a + 1].text == "::":  # a vendor namespace: clang::, metal::
            name = "".join(t.text for t in tokens[a:a + 3])
            a += 2
        if a + 1 < b and tokens[a + 1].text == "(":
            items.append((name, (a + 2, matching(tokens, a + 1, "(", ")"))))
        else:
            items.append((name, None))
    return items


def split_top_level(tokens: list[Token], begin: int, end: int) -> list[tuple[int, int]]:
    """Comma-separated parts of tokens[begin:end], nested brackets (and template angles) kept whole."""
    parts, depth, part_start = [], 0, begin
    for j in range(begin, end):
        text = tokens[j].text
        if text in "([{<":
            depth += 1
        elif text in ")]}>":
            depth -= 1
        elif text == ">>":
            depth -= 2
        elif text == "," and depth == 0:
            parts.append((part_start, j))
            part_start = j + 1
    if part_start < end:
        parts.append((part_start, end))
    return parts


def template_header_end(tokens: list[Token], i: int) -> int:
    """`tokens[i]` is `template` followed by `<`: the index of the header's closing `>`."""
    return angle_end(tokens, i + 1)


def parse(source: str) -> Program:
    """Read preprocessed MSL (lines as in the user's source)."""
    tokens = tokenize(source)
    for i, t in enumerate(tokens):
        if t.kind == PREPROC:
            words = t.text[1:].split()
            if words[:2] == ["pragma", "METAL"]:
                raise UnsupportedMSL("#pragma METAL", t.line, "private Metal internals are not public MSL")
        elif t.kind == IDENT and t.text in _FORBIDDEN:
            raise UnsupportedMSL(t.text, t.line, _FORBIDDEN[t.text])
        elif t.kind == IDENT and t.text.startswith("__metal_"):
            raise UnsupportedMSL(t.text, t.line, "Metal's private intrinsics are not public MSL")
        elif t.kind == IDENT and t.text == "_Pragma" and i + 2 < len(tokens) and \
                tokens[i + 2].text.strip('"').startswith("METAL"):
            raise UnsupportedMSL("_Pragma(\"METAL ...\")", t.line, "private Metal internals are not public MSL")
    reader = _Reader(tokens)
    reader.run()
    uses_atomics = any(t.kind == IDENT and t.text.startswith("atomic") for t in tokens)
    return Program(tokens, reader.kernels, reader.instantiations, reader.struct_fields, uses_atomics, reader.scopes,
                   reader.dropped)


_RECORD_KEYS = ("struct", "class", "union", "enum")


class _Reader:
    """One pass over the tokens at namespace scope: declarations, the kinds of braces, kernels."""

    def __init__(self, tokens: list[Token]) -> None:
        self.tokens = tokens
        self.kernels: list[Kernel] = []
        self.instantiations: list[Instantiation] = []
        self.struct_fields: set[str] = set()
        self.scopes: dict[int, str] = {}
        self.dropped: list[tuple[int, int]] = []
        self.pending: list[tuple[int, int]] = []  # instantiations, read once every kernel is known

    def run(self) -> None:
        self.namespace_scope(0, len(self.tokens), ())
        templates = {k.name: k for k in self.kernels if k.template is not None}
        for start, end in self.pending:
            instantiation = self.instantiation(start, end, templates)
            if instantiation is not None:
                self.instantiations.append(instantiation)

    def namespace_scope(self, i: int, end: int, namespace: tuple[str, ...]) -> None:
        tokens = self.tokens
        start = i
        while i < end:
            t = tokens[i]
            text = t.text
            if t.kind == PREPROC:
                if start == i:
                    start = i + 1
                i += 1
            elif text == "(" or text == "[":
                i = group_end(tokens, i) + 1
            elif text == ";":
                if tokens[start].text == "template" and start + 1 < i and tokens[start + 1].text != "<":
                    self.pending.append((start, i))
                i += 1
                start = i
            elif text == "{":
                close = matching(tokens, i, "{", "}")
                kind, name = self.classify(start, i)
                self.scopes[i] = kind
                if kind == "namespace":
                    self.namespace_scope(i + 1, close, namespace + ((name,) if name else ()))
                    i = close + 1
                    start = i
                elif kind == "function":
                    self.scopes.update(self.body_scopes(i, close))
                    if self.is_kernel(start, i):
                        self.kernels.append(self.kernel(start, i, close, namespace))
                    i = close + 1
                    start = i
                else:  # a class definition or an initializer: the declaration goes on to its `;`
                    if kind == "class":
                        self.class_scope(i, close)
                    else:
                        self.scopes.update(self.body_scopes(i, close, "other"))
                    i = close + 1
            else:
                i += 1

    def classify(self, start: int, brace: int) -> tuple[str, str | None]:
        """The kind of the `{` at `brace` that ends the head tokens[start:brace] at namespace or class scope."""
        texts = [t.text for t in self.tokens[start:brace] if t.kind != PREPROC]
        if texts[:1] == ["namespace"] or texts[:2] == ["inline", "namespace"]:
            names = [x for x in texts if x not in ("inline", "namespace", "::")]
            return "namespace", "::".join(names) or None
        if texts[:1] == ["extern"] and len(texts) == 2:
            return "namespace", None
        rest = after_templates_and_attributes(texts)
        if rest[:1] == ["typedef"]:
            rest = rest[1:]
        if rest[:1] and rest[0] in _RECORD_KEYS:
            return "class", None
        top, depth = [], 0
        for k, text in enumerate(rest):
            if text in ("(", "["):
                depth += 1
            elif text in (")", "]"):
                depth -= 1
            elif depth == 0 and not (text == "=" and k and rest[k - 1] == "operator"):
                top.append(text)
        if "=" in top or ")" not in rest:
            return "other", None
        return "function", None

    def class_scope(self, brace: int, close: int) -> None:
        """A class body: member functions' bodies, nested classes, and the field names."""
        tokens = self.tokens
        i, start = brace + 1, brace + 1
        by_space: dict[str, str] = {}  # member functions qualified by an address space of `this`: head -> body
        while i < close:
            text = tokens[i].text
            if tokens[i].kind == PREPROC:
                i += 1
                continue
            if text in ("(", "["):
                i = group_end(tokens, i) + 1
                continue
            if text == "{":
                end = matching(tokens, i, "{", "}")
                kind, _ = self.classify(start, i)
                if kind == "namespace":
                    kind = "other"
                self.scopes[i] = kind
                if kind == "class":
                    self.class_scope(i, end)
                else:
                    self.scopes.update(self.body_scopes(i, end, "function" if kind == "function" else "other"))
                if kind == "function":
                    self.this_space_overload(start, i, end, by_space)
                i = end + 1
                if kind == "function":
                    start = i
                continue
            if text == ";" or (text == ":" and i > start and tokens[i - 1].text in ("public", "private",
                                                                                      "protected")):
                self.fields(start, i)
                start = i + 1
            i += 1

    def this_space_overload(self, start: int, brace: int, end: int, by_space: dict[str, str]) -> None:
        """A member function qualified by the address space of `this` (`T& operator[](int i) device {...}`): the
        emulator does not know objects' address spaces, so of the versions that differ only in it, the first is
        kept and the others, which must say the same, are dropped."""
        tokens = self.tokens
        k = brace - 1
        qualifiers = []
        while k > start and tokens[k].text in ("const", "volatile") + ADDRESS_SPACES:
            qualifiers.append(tokens[k].text)
            k -= 1
        if tokens[k].text != ")" or not any(q in ADDRESS_SPACES for q in qualifiers):
            return
        key = " ".join(t.text for t in tokens[start:brace] if t.text not in ADDRESS_SPACES)
        body = " ".join(t.text for t in tokens[brace:end + 1])
        if key not in by_space:
            by_space[key] = body
        elif by_space[key] == body:
            self.dropped.append((start, end))
        else:
            raise UnsupportedMSL("member functions overloaded on the address space of `this`", tokens[start].line,
                                 "versions that differ in more than the address space are not emulated (the emulator "
                                 "does not know the address space of an object)")

    def fields(self, start: int, end: int) -> None:
        """Member names declared by tokens[start:end] (a member declaration without its `;`)."""
        tokens = self.tokens
        depth = 0
        for k in range(start, end):
            text = tokens[k].text
            if text in "([{":
                depth += 1
            elif text in ")]}":
                depth -= 1
            elif depth == 0 and tokens[k].kind == IDENT and k + 1 <= end and (
                    k + 1 == end or tokens[k + 1].text in (";", ",", "[", "=", ":")):
                self.struct_fields.add(text)

    def body_scopes(self, brace: int, close: int, kind: str = "function") -> dict[int, str]:
        """Every brace inside a function body (or an initializer) is of that kind."""
        return {j: kind for j in range(brace + 1, close) if self.tokens[j].text == "{"}

    def is_kernel(self, start: int, brace: int) -> bool:
        tokens = self.tokens
        i = start
        while i < brace:
            if is_attribute(tokens, i):
                end = attribute_end(tokens, i)
                if any(name == "kernel" for name, _ in attribute_items(tokens, i, end)):
                    return True
                i = end + 1
            elif tokens[i].text == "template" and i + 1 < brace and tokens[i + 1].text == "<":
                i = template_header_end(tokens, i) + 1
            elif tokens[i].text in ("(", "["):
                i = group_end(tokens, i) + 1
            else:
                if tokens[i].text == "kernel":
                    return True
                i += 1
        return False

    def kernel(self, start: int, brace: int, close: int, namespace: tuple[str, ...]) -> Kernel:
        tokens = self.tokens
        line = tokens[start].line
        template = None
        template_params: list[TemplateParam] = []
        i = start
        if tokens[i].text == "template":
            header_end = template_header_end(tokens, i)
            template = (i, header_end)
            template_params = _template_params(tokens, i + 2, header_end)
            i = header_end + 1
        dropped: list[tuple[int, int]] = []
        max_threads = None
        host_name = None
        head: list[int] = []  # the declaration without its attributes and `kernel`
        j = i
        while j < brace:
            if is_attribute(tokens, j):
                end = attribute_end(tokens, j)
                for name, args in attribute_items(tokens, j, end):
                    if name == "max_total_threads_per_threadgroup" and args is not None:
                        max_threads = args
                    elif name == "host_name" and args is not None:
                        host_name = _string_value(tokens, args)
                    elif name != "kernel":
                        raise UnsupportedMSL(f"[[{name}]]", tokens[j].line, "an attribute of kernels the emulator "
                                                                           "does not implement")
                dropped.append((j, end))
                j = end + 1
            elif tokens[j].text == "kernel":
                dropped.append((j, j))
                j += 1
            elif tokens[j].text in ("(", "["):
                end = group_end(tokens, j)
                head.extend(range(j, end + 1))
                j = end + 1
            else:
                head.append(j)
                j += 1
        # The parameter list is the last parenthesized group of the head; the name is the identifier before it.
        close_paren = next((k for k in reversed(head) if tokens[k].text == ")"), None)
        if close_paren is None:
            raise UnsupportedMSL("kernel", line, "expected a parameter list")
        open_paren = _matching_backwards(tokens, close_paren)
        name_at = open_paren - 1
        if tokens[name_at].kind != IDENT:
            raise UnsupportedMSL(tokens[name_at].text, tokens[name_at].line, "expected the kernel's name")
        params = _read_params(tokens, open_paren + 1, close_paren, dropped)
        kernel = Kernel(tokens[name_at].text, namespace, params, line, start, template, template_params, brace,
                        close, max_threads, host_name, dropped)
        kernel.threadgroup_decls = _read_threadgroup_decls(tokens, brace, close)
        return kernel

    def instantiation(self, start: int, end: int, templates: dict[str, Kernel]) -> Instantiation | None:
        """`template [[host_name("x")]] [[kernel]] ... f<args> ...;`: None when it instantiates no kernel."""
        tokens = self.tokens
        host_name = None
        found = None
        depth = 0
        j = start + 1
        while j < end:
            text = tokens[j].text
            if is_attribute(tokens, j):
                attr_end = attribute_end(tokens, j)
                for name, args in attribute_items(tokens, j, attr_end):
                    if name == "host_name" and args is not None:
                        host_name = _string_value(tokens, args)
                j = attr_end + 1
                continue
            if text == "(":
                depth += 1
            elif text == ")":
                depth -= 1
            elif tokens[j].kind == IDENT and text in templates and j + 1 < end and tokens[j + 1].text == "<":
                close = angle_end(tokens, j + 1)
                if depth == 0 or found is None:
                    found = (templates[text], (j + 2, close))
                j = close + 1
                continue
            j += 1
        if found is None:
            return None
        kernel, args = found
        if host_name is None:
            raise UnsupportedMSL(f"template instantiation of {kernel.name}", tokens[start].line,
                                 "a kernel template is callable only through [[host_name(\"...\")]]")
        return Instantiation(host_name, kernel, args, start, end, tokens[start].line)


def after_templates_and_attributes(texts: list[str]) -> list[str]:
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


def _matching_backwards(tokens: list[Token], close: int) -> int:
    depth = 0
    for j in range(close, -1, -1):
        if tokens[j].text == ")":
            depth += 1
        elif tokens[j].text == "(":
            depth -= 1
            if depth == 0:
                return j
    raise UnsupportedMSL(")", tokens[close].line, "unbalanced ')'")


def _string_value(tokens: list[Token], args: tuple[int, int]) -> str:
    """The value of a string literal argument (adjacent literals concatenated)."""
    parts = [t.text for t in tokens[args[0]:args[1]]]
    if not parts or not all(p.startswith('"') for p in parts):
        raise UnsupportedMSL(" ".join(parts), tokens[args[0]].line if args[0] < len(tokens) else None,
                             "expected a string literal")
    return "".join(p[1:-1] for p in parts)


def _template_params(tokens: list[Token], begin: int, end: int) -> list[TemplateParam]:
    params = []
    for a, b in split_top_level(tokens, begin, end):
        stop = next((k for k in range(a, b) if tokens[k].text == "="), b)
        idents = [k for k in range(a, stop) if tokens[k].kind == IDENT]
        if not idents:
            raise UnsupportedMSL(" ".join(t.text for t in tokens[a:b]), tokens[a].line, "an unnamed template parameter")
        params.append(TemplateParam(tokens[idents[-1]].text, any(tokens[k].text == "..." for k in range(a, stop))))
    return params


_QUALIFIERS = {"const", "volatile", "restrict", "device", "constant", "thread", "threadgroup", "metal", "::"}


def _read_params(tokens: list[Token], begin: int, end: int, dropped: list) -> list[Param]:
    params: list[Param] = []
    next_buffer = 0
    for a, b in split_top_level(tokens, begin, end):
        attribute: list[tuple[str, tuple[int, int] | None]] = []
        type_end = b
        for j in range(a, b):
            if is_attribute(tokens, j):
                attr_end = attribute_end(tokens, j)
                attribute = attribute_items(tokens, j, attr_end)
                dropped.append((j, attr_end))
                type_end = j
                break
        decl = tokens[a:type_end]
        if not decl or decl[-1].kind != IDENT:
            raise UnsupportedMSL(" ".join(t.text for t in tokens[a:b]), tokens[a].line, "unnamed kernel parameter")
        name = decl[-1].text
        type_tokens = tuple(t.text for t in decl[:-1])
        line = decl[-1].line
        attr_name = attribute[0][0] if attribute else None
        if attr_name in BUILTIN_ATTRIBUTES:
            params.append(Param(name, type_tokens, line, builtin=attr_name))
            continue
        space = next((s for s in ADDRESS_SPACES if s in type_tokens), None)
        if attribute and attr_name != "buffer":
            raise UnsupportedMSL(f"[[{attr_name}]]", line, "only [[buffer(i)]] and thread-position attributes")
        if space not in ("device", "constant"):
            raise UnsupportedMSL(
                " ".join(type_tokens) + " " + name, line, "kernel parameters must be device or constant buffers"
            )
        if attribute:
            index_range = attribute[0][1]
            index_text = "".join(t.text for t in tokens[index_range[0]:index_range[1]]) if index_range else ""
            if not index_text.isdigit():
                raise UnsupportedMSL(f"[[buffer({index_text})]]", line, "a buffer index must be an integer literal")
            index = int(index_text)
        else:
            index = next_buffer
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
    depth = 0
    for t in tokens[j + 1:]:
        if t.text == "<":
            depth += 1
        elif t.text in (">", ">>"):
            depth -= len(t.text)
        elif depth <= 0 and t.text in ("*", "&"):
            return False
        elif t.text in ("=", ";", "["):
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
        parts = split_top_level(tokens, j + 1, semi)
        first_a, first_b = parts[0]
        # The type is everything before the first declarator's name (the identifier before '[' or the end).
        name_at = next((k for k in range(first_a, first_b) if tokens[k].text == "["), first_b) - 1
        declarators = []
        for a, b in parts:
            if a == first_a:
                a = name_at
            if any(t.text == "=" for t in tokens[a:b]):
                raise UnsupportedMSL("threadgroup initializer", tokens[a].line,
                                     "threadgroup variables cannot be initialized")
            declarators.append((tokens[a].text, (a + 1, b)))
        decls.append(ThreadgroupDecl(j, semi, (first_a, name_at), declarators, tokens[j].line))
    return decls
