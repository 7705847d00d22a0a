"""MSL to C++: the user's source, preprocessed and lightly rewritten, plus one entry point per callable kernel.

The translation keeps every MSL line on the same line of the output (under `#line 1 "kernel.metal"`), so
compiler diagnostics and the emulator's barrier and collective sites name MSL lines. The source is compiled at
global scope, as Metal compiles it, so that its functions overload Metal's. Rewrites:

- `kernel` and kernel attributes are dropped; an entry point per callable kernel (a plain kernel, or a kernel
  template's `[[host_name]]` instantiation) binds the launch's buffer table and builtin attributes to its
  parameters, by the parameters' own types;
- `device T*`, `constant T*` and `threadgroup T*` become `msl::ptr<T, space>` (include/msl_memory.h), so that
  overloads on the address space stay distinct and debug builds can check every access;
  `reinterpret_cast` to such a pointer becomes `msl::pointer_cast`, and `&x[i]` becomes `msl::address_of(x, i)`;
- `threadgroup T name[N];` in a kernel becomes a reference into the threadgroup's memory, at an offset that a
  compile-time layout function beside the kernel computes (so sizes may use template parameters and the
  kernel's own constants); where such an array decays, or its elements' addresses are taken, the pointers are
  threadgroup pointers;
- member functions repeated for each address space of `this` are kept once (msl.py);
- a program-scope `constant` variable becomes `const`;
- multi-element swizzles (`v.xy`, `c.rgb`) become `v.template sw<0, 1>()`; single elements are members;
- half literals (`1.0h`) become `half(1.0f)`;
- `#pragma clang loop unroll(...)` becomes `#pragma unroll` on CUDA (and is dropped on the CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UnsupportedMSL
from .msl import (IDENT, NUMBER, PREPROC, PUNCT, Kernel, Param, Program, Token, angle_end, is_threadgroup_variable,
                  matching, parse, split_top_level)
from .preprocess import MSL_FILE, preprocess

_SWIZZLE_SETS = ("xyzw", "rgba")
_SPACES = {"device": "::msl::DEVICE", "constant": "::msl::CONSTANT", "threadgroup": "::msl::THREADGROUP"}
_CASTS = ("reinterpret_cast", "static_cast", "const_cast")
# Tokens after which `&` is the address-of operator, not `and`.
_VALUE_END = {")", "]", "}"}
_KEYWORDS_BEFORE_VALUES = {"return", "case", "co_return", "throw"}


@dataclass(frozen=True)
class KernelInfo:
    """What the host needs to launch one kernel."""

    name: str  # the host name
    line: int
    params: tuple  # msl.Param, in declaration order (template parameters replaced by their arguments)
    buffer_names: dict[int, str]


@dataclass(frozen=True)
class Translation:
    cpp: str
    kernels: dict[str, KernelInfo]
    uses_atomics: bool


@dataclass(frozen=True)
class _Entry:
    """A callable kernel: a plain kernel, or an instantiation of a kernel template."""

    host_name: str
    kernel: Kernel
    args: str | None  # the template arguments, as C++
    line: int


def _swizzle_indices(name: str) -> list[int] | None:
    if not 2 <= len(name) <= 4:
        return None
    for letters in _SWIZZLE_SETS:
        if all(ch in letters for ch in name):
            return [letters.index(ch) for ch in name]
    return None


def half_literal(text: str) -> str:
    if text[-1] in "hH" and not text.lower().startswith("0x"):
        body = text[:-1]
        return f"half({body}{'' if '.' in body or 'e' in body.lower() else '.0'}f)"
    return text


# The prelude each target compiles the translation with (include/).
_PRELUDES = {"cpu": "msl_cpu.h", "cuda": "msl_cuda.h"}


def translate(source: str, *, debug: bool = False, target: str = "cpu", fast_math: bool = False) -> Translation:
    program = parse(preprocess(source, fast_math=fast_math))
    writer = _Writer(program, target)
    entries = [_Entry(k.host_name or k.name, k, None, k.line) for k in program.kernels if k.template is None]
    entries += [_Entry(inst.host_name, inst.kernel, writer.text(*inst.args), inst.line)
                for inst in program.instantiations]
    if not entries:
        raise UnsupportedMSL("no kernel", None, "the source declares no callable kernel (a `kernel void` function, "
                                                "or a kernel template instantiated with [[host_name])")
    seen: dict[str, int] = {}
    for e in entries:
        if not e.host_name.isidentifier():
            raise UnsupportedMSL(f'host_name("{e.host_name}")', e.line, "a host name must be an identifier")
        if e.host_name in seen:
            raise UnsupportedMSL(e.host_name, e.line, f"a second kernel of this name (the first is on MSL line "
                                                      f"{seen[e.host_name]})")
        seen[e.host_name] = e.line
    out = [f'#include "{_PRELUDES[target]}"\n', f'#line 1 "{MSL_FILE}"\n', writer.write()]
    out.append('\n#line 1 "emulator-entry-points"\n')
    out.extend(_entry_point(e) for e in entries)
    kernels = {e.host_name: _kernel_info(e, program) for e in entries}
    return Translation("".join(out), kernels, program.uses_atomics)


class _Writer:
    """Rewrites token ranges of the program into C++."""

    def __init__(self, program: Program, target: str) -> None:
        self.program = program
        self.tokens = program.tokens
        self.target = target
        self.kernel_at = {k.start: k for k in program.kernels}
        self.dropped = {j for k in program.kernels for a, b in k.dropped for j in range(a, b + 1)}
        self.dropped |= {j for a, b in program.dropped for j in range(a, b + 1)}
        self.skipped = {inst.start: inst.end for inst in program.instantiations}
        self.tg_decl_at = {d.start: (k, d) for k in program.kernels for d in k.threadgroup_decls}
        # Each kernel's threadgroup variables: name -> array rank, within the kernel's body.
        self.tg_names: dict[int, tuple[int, int, dict[str, int]]] = {}
        for k in program.kernels:
            names = {}
            for d in k.threadgroup_decls:
                for name, (a, b) in d.declarators:
                    names[name] = sum(1 for t in self.tokens[a:b] if t.text == "[")
            self.tg_names[k.start] = (k.body_start, k.body_end, names)

    # ---- the whole program, line by line ----

    def write(self) -> str:
        tokens = self.tokens
        out: list[str] = []
        line = 1  # the MSL line the compiler counts the output's current line as
        scopes: list[str] = []  # the kinds of the enclosing braces
        kernel: Kernel | None = None
        i = 0
        while i < len(tokens):
            t = tokens[i]
            if t.line > line and t.line - line <= 16:
                out.append("\n" * (t.line - line))
                line = t.line
            elif t.line != line or (t.kind == PREPROC and out and not out[-1].endswith("\n")):
                out.append(f"\n#line {t.line}\n")  # text that moved (a macro's expansion, its pragmas)
                line = t.line
            if i in self.kernel_at:
                kernel = self.kernel_at[i]
                out.append(self.companions(kernel))
            if kernel is not None and i > kernel.body_end:
                kernel = None
            if i in self.skipped:  # an instantiation: its entry point calls the kernel
                i = self.skipped[i] + 1
                continue
            if i in self.dropped:
                i += 1
                continue
            if t.kind == PREPROC:
                out.append(self.directive(t.text) + "\n")
                line += t.text.count("\n") + 1
                i += 1
                continue
            if t.text == "{":
                scopes.append(self.program.scopes.get(i, "other"))
            elif t.text == "}" and scopes:
                scopes.pop()
            if i in self.tg_decl_at:
                k, decl = self.tg_decl_at[i]
                out.append(self.threadgroup_decl(k, decl))
                line = tokens[decl.end].line
                i = decl.end + 1
                continue
            if t.text == "threadgroup" and tokens[i - 1].text in ";{}" and is_threadgroup_variable(tokens, i):
                raise UnsupportedMSL("threadgroup variable outside a kernel", t.line,
                                     "threadgroup variables can only be declared in a kernel function")
            if t.text == "constant" and (not scopes or scopes[-1] in ("namespace", "class")) and \
                    self.pointer_type_end(i) is None:
                # A program-scope constant (or a static member): usable in constant expressions.
                out.append("" if self.declares_const(i) else "const ")
                i += 1
                continue
            text, i = self.rewrite(i, kernel)
            out.append(text)
        return "".join(out)

    def declares_const(self, i: int) -> bool:
        """Whether the declaration specifiers around tokens[i] already say `const`."""
        tokens = self.tokens
        j = i - 1
        while j >= 0 and tokens[j].kind == IDENT:
            if tokens[j].text == "const":
                return True
            j -= 1
        j = i + 1
        while j < len(tokens) and (tokens[j].kind == IDENT or tokens[j].text == "::"):
            if tokens[j].text == "const":
                return True
            j += 1
        return False

    def directive(self, text: str) -> str:
        words = text[1:].replace("(", " (").split()
        if words[:1] == ["pragma"] and (words[1:3] == ["clang", "loop"] or words[1:2] == ["unroll"]):
            if self.target != "cuda":
                return ""  # g++ has its own spelling; unrolling slows the build more than it speeds the run
            if words[1:3] == ["clang", "loop"]:
                return "#pragma unroll" if "unroll(full)" in "".join(words[3:]) or "unroll(enable)" in \
                    "".join(words[3:]) else ""
            return text
        return ""  # what the preprocessor left: other pragmas

    # ---- expressions and declarations ----

    def text(self, a: int, b: int, kernel: Kernel | None = None) -> str:
        """tokens[a:b], rewritten."""
        pieces = []
        i = a
        while i < b:
            piece, i = self.rewrite(i, kernel, b)
            pieces.append(piece)
        return "".join(pieces)

    def rewrite(self, i: int, kernel: Kernel | None, end: int | None = None) -> tuple[str, int]:
        """The C++ for the construct at token i, and the index after it."""
        tokens = self.tokens
        t = tokens[i]
        if t.kind == NUMBER:
            return half_literal(t.text) + " ", i + 1
        if t.text == "." and i + 1 < len(tokens) and tokens[i + 1].kind == IDENT:
            name = tokens[i + 1].text
            indices = _swizzle_indices(name)
            if indices is not None and name not in self.program.struct_fields:
                return ".template sw<" + ", ".join(map(str, indices)) + ">() ", i + 2
            return ". " + name + " ", i + 2
        if t.text in _CASTS and i + 1 < len(tokens) and tokens[i + 1].text == "<":
            close = angle_end(tokens, i + 1)
            if any(x.text in _SPACES for x in tokens[i + 2:close]) and any(x.text == "*" for x in tokens[i + 2:close]):
                return "::msl::pointer_cast<" + self.text(i + 2, close, kernel) + "> ", close + 1
        if t.text in _SPACES:
            star = self.pointer_type_end(i)
            if star is not None:
                return self.pointer_type(i, star), star + 1
        if t.text == "const" and i + 1 < len(tokens) and tokens[i + 1].text in _SPACES:
            star = self.pointer_type_end(i + 1)
            if star is not None:  # `const device T*`
                return self.pointer_type(i + 1, star, const=True), star + 1
        if t.text == "&" and self.is_unary(i):
            rewritten = self.address_of(i, kernel, end)
            if rewritten is not None:
                return rewritten
        if kernel is not None and t.kind == IDENT:
            rewritten = self.threadgroup_use(i, kernel, end)
            if rewritten is not None:
                return rewritten
        return t.text + " ", i + 1

    def pointer_type_end(self, i: int) -> int | None:
        """If tokens[i] (an address space) starts a pointer type, the index of its `*`."""
        tokens = self.tokens
        depth = 0
        for j in range(i + 1, min(len(tokens), i + 40)):
            text = tokens[j].text
            if text == "<":
                depth += 1
            elif text in (">", ">>"):
                depth -= len(text)
            elif depth == 0:
                if text == "*":
                    return j
                if not (tokens[j].kind == IDENT or text == "::"):
                    return None
                if tokens[j].kind == IDENT and j + 1 < len(tokens) and tokens[j + 1].kind == IDENT and \
                        text not in ("const", "volatile", "unsigned", "signed", "typename", "struct") and \
                        tokens[j + 1].text not in ("const", "volatile"):
                    return None  # `constant float name`: a declaration, not a pointer type
        return None

    def pointer_type(self, i: int, star: int, const: bool = False) -> str:
        """`device T*` (tokens i..star) -> `::msl::ptr<T, ::msl::DEVICE>`; a constant pointee is const."""
        space = self.tokens[i].text
        inner = [k for k in range(i + 1, star)]
        is_const = const or any(self.tokens[k].text == "const" for k in inner) or space == "constant"
        element = "".join(half_literal(self.tokens[k].text) + " " for k in inner if self.tokens[k].text != "const")
        return f"::msl::ptr<{'const ' if is_const else ''}{element.strip()}, {_SPACES[space]}> "

    def is_unary(self, i: int) -> bool:
        if i == 0:
            return True
        prev = self.tokens[i - 1]
        if prev.kind == IDENT:
            return prev.text in _KEYWORDS_BEFORE_VALUES
        if prev.kind == PUNCT:
            return prev.text not in _VALUE_END
        return False  # after a number or a string: `and`

    def postfix_end(self, i: int, end: int | None) -> tuple[int, int | None]:
        """The end of the postfix expression that starts at token i, and where its last subscript starts (None if
        it does not end in one)."""
        tokens = self.tokens
        limit = len(tokens) if end is None else end
        j = i
        if j < limit and tokens[j].text == "(":
            j = matching(tokens, j, "(", ")") + 1
        elif j < limit and tokens[j].kind == IDENT:
            j += 1
            while j + 1 < limit and tokens[j].text == "::" and tokens[j + 1].kind == IDENT:
                j += 2
        else:
            return i, None
        last_subscript = None
        while j < limit:
            text = tokens[j].text
            if text == "[":
                last_subscript = j
                j = matching(tokens, j, "[", "]") + 1
            elif text in (".", "->") and j + 1 < limit and tokens[j + 1].kind == IDENT:
                last_subscript = None
                j += 2
            elif text == "(":
                last_subscript = None
                j = matching(tokens, j, "(", ")") + 1
            else:
                break
        return j, last_subscript

    def address_of(self, i: int, kernel: Kernel | None, end: int | None) -> tuple[str, int] | None:
        """`&x[i]` -> `::msl::address_of(x, i)`; the address of a threadgroup variable's element -> a threadgroup
        pointer."""
        tokens = self.tokens
        expr_end, subscript = self.postfix_end(i + 1, end)
        if expr_end == i + 1:
            return None
        if kernel is not None and tokens[i + 1].kind == IDENT and self.is_threadgroup_name(i + 1, kernel):
            return "::msl::tg_address(&" + self.text_without_decay(i + 1, expr_end, kernel) + ") ", expr_end
        if subscript is None:
            return None
        base = self.text(i + 1, subscript, kernel)
        index = self.text(subscript + 1, matching(tokens, subscript, "[", "]"), kernel)
        return f"::msl::address_of({base}, {index}) ", expr_end

    def text_without_decay(self, a: int, b: int, kernel: Kernel) -> str:
        """tokens[a:b] rewritten, the threadgroup name at a left as it is."""
        return self.tokens[a].text + " " + self.text(a + 1, b, kernel)

    def is_threadgroup_name(self, i: int, kernel: Kernel) -> bool:
        body_start, body_end, names = self.tg_names[kernel.start]
        t = self.tokens[i]
        return body_start < i < body_end and t.text in names and self.tokens[i - 1].text not in (".", "->", "::")

    def threadgroup_use(self, i: int, kernel: Kernel, end: int | None) -> tuple[str, int] | None:
        """A threadgroup array's name where it decays to a pointer -> a threadgroup pointer."""
        if not self.is_threadgroup_name(i, kernel):
            return None
        tokens = self.tokens
        rank = self.tg_names[kernel.start][2][tokens[i].text]
        if rank == 0:
            return None
        if i >= 2 and tokens[i - 1].text == "(" and tokens[i - 2].text in ("sizeof", "alignof", "decltype"):
            return None
        j, subscripts = i + 1, 0
        limit = len(tokens) if end is None else end
        while j < limit and tokens[j].text == "[":
            j = matching(tokens, j, "[", "]") + 1
            subscripts += 1
        if subscripts >= rank or (j < limit and tokens[j].text in (".", "->", "(")):
            return None
        return "::msl::tg_decay(" + self.text_without_decay(i, j, kernel) + ") ", j

    # ---- threadgroup variables ----

    def layout_call(self, kernel: Kernel, site: int | str) -> str:
        args = ""
        if kernel.template is not None:
            args = "<" + ", ".join(p.name + ("..." if p.pack else "") for p in kernel.template_params) + ">"
        return f"msl_kernel_threadgroup_layout_{kernel.name}{args}({site})"

    def threadgroup_decl(self, kernel: Kernel, decl) -> str:
        site = sum(len(d.declarators) for d in kernel.threadgroup_decls[:kernel.threadgroup_decls.index(decl)])
        element = self.text(*decl.type_range, kernel)
        pieces = []
        for name, dims in decl.declarators:
            alias = f"msl_threadgroup_t{site}"
            offset = self.layout_call(kernel, site)
            pieces.append(f"typedef {element} {alias}{self.text(*dims, kernel)}; "
                          f"{alias}& {name} = ::msl::threadgroup_variable<{alias}, {offset}>();")
            site += 1
        return " ".join(pieces) + " "

    def companions(self, kernel: Kernel) -> str:
        """Functions beside a kernel (on its first line): the layout of its threadgroup variables, and its
        [[max_total_threads_per_threadgroup]]."""
        header = self.text(*_inclusive(kernel.template), kernel) if kernel.template else ""
        pieces = []
        if kernel.threadgroup_decls:
            sizes, typedefs, site = [], [], 0
            for decl in kernel.threadgroup_decls:
                element = self.text(*decl.type_range, kernel)
                for _, dims in decl.declarators:
                    typedefs.append(f"typedef {element} msl_threadgroup_t{site}{self.text(*dims, kernel)};")
                    sizes.append(f"sizeof(msl_threadgroup_t{site})")
                    site += 1
            constants = " ".join(self.text(a, b + 1, kernel) for a, b in _layout_constants(self.tokens, kernel))
            pieces.append(f"{header} constexpr ulong msl_kernel_threadgroup_layout_{kernel.name}(int site) {{ "
                          f"{constants} {' '.join(typedefs)} "
                          f"return ::msl::threadgroup_offset(site, 0, {', '.join(sizes)}); }}")
        if kernel.max_threads is not None:
            pieces.append(f"{header} constexpr uint msl_kernel_max_threads_{kernel.name}() {{ return "
                          f"({self.text(*kernel.max_threads, kernel)}); }}")
        return " ".join(pieces) + " "


def _inclusive(r: tuple[int, int]) -> tuple[int, int]:
    return r[0], r[1] + 1


_DECLARATION_STARTS = {"constexpr", "const", "static", "constant", "typedef", "using"}


def _layout_constants(tokens: list[Token], kernel: Kernel) -> list[tuple[int, int]]:
    """The kernel body's declarations (token ranges, `;` included) that its threadgroup variables' types and sizes
    need: constants, typedefs and aliases, found by name, in source order."""
    statements: list[tuple[int, int, set[str]]] = []  # (start, the `;`, declared names)
    start = kernel.body_start + 1
    last = kernel.threadgroup_decls[-1].start
    i = start
    while i < last:
        text = tokens[i].text
        if text in ("{", "}"):
            start = i + 1
        elif text == "(":
            i = matching(tokens, i, "(", ")")
        elif text == ";":
            if tokens[start].text in _DECLARATION_STARTS and tokens[start + 1].text != "namespace":
                statements.append((start, i, _declared_names(tokens, start, i)))
            start = i + 1
        i += 1
    needed = set()
    for decl in kernel.threadgroup_decls:
        needed |= {t.text for t in tokens[decl.type_range[0]:decl.end] if t.kind == IDENT}
    chosen = []
    for start, semi, names in reversed(statements):
        if names & needed:
            chosen.append((start, semi))
            needed |= {t.text for t in tokens[start:semi] if t.kind == IDENT}
    return sorted(chosen)


def _declared_names(tokens: list[Token], start: int, semi: int) -> set[str]:
    if tokens[start].text == "using":
        return {tokens[start + 1].text}
    names = set()
    for a, b in split_top_level(tokens, start, semi):
        stop = next((k for k in range(a, b) if tokens[k].text in ("=", "{", "(", "[")), b)
        idents = [tokens[k].text for k in range(a, stop) if tokens[k].kind == IDENT]
        if idents:
            names.add(idents[-1])
    return names


def _kernel_info(entry: _Entry, program: Program) -> KernelInfo:
    kernel = entry.kernel
    params = kernel.params
    if entry.args is not None:
        values = _template_arguments(entry, program)
        params = [_substitute(p, values) for p in params]
    names = {p.buffer_index: p.name for p in params if p.buffer_index is not None}
    return KernelInfo(entry.host_name, entry.line, tuple(params), names)


def _template_arguments(entry: _Entry, program: Program) -> dict[str, str]:
    """Template parameter names -> the arguments' text (a pack takes the rest)."""
    inst = next(x for x in program.instantiations if x.host_name == entry.host_name)
    tokens = program.tokens
    parts = [" ".join(t.text for t in tokens[a:b]) for a, b in split_top_level(tokens, *inst.args)]
    values = {}
    for k, p in enumerate(entry.kernel.template_params):
        if k < len(parts):
            values[p.name] = ", ".join(parts[k:]) if p.pack else parts[k]
    return values


def _substitute(p: Param, values: dict[str, str]) -> Param:
    if not p.element_type:
        return p
    element = " ".join(values.get(w, w) for w in p.element_type.split())
    return Param(p.name, p.type_tokens, p.line, p.builtin, p.buffer_index, p.address_space, p.is_pointer,
                 p.is_reference, element)


def _entry_point(entry: _Entry) -> str:
    kernel = entry.kernel
    callee = "::" + kernel.qualified_name + (f"<{entry.args}>" if entry.args is not None else "")
    args = []
    for index, p in enumerate(kernel.params):
        arg_type = f"S::arg<{index}>"
        if p.builtin is not None:
            args.append(f"::msl::attr<{arg_type}>(::msl::{p.builtin}(L))")
        else:
            args.append(f'::msl::binder<{arg_type}>::bind(L, {p.buffer_index}, "{p.name}")')
    scope = "::".join(kernel.namespace)
    scope = f"::{scope}::" if scope else "::"
    template_args = f"<{entry.args}>" if entry.args is not None else ""
    variables = sum(len(d.declarators) for d in kernel.threadgroup_decls)
    layout = f"{scope}msl_kernel_threadgroup_layout_{kernel.name}{template_args}({variables})" if variables else "0"
    max_threads = f"{scope}msl_kernel_max_threads_{kernel.name}{template_args}()" if kernel.max_threads else "0"
    return (f"static void msl_entry_{entry.host_name}(const ::msl::Launch* L) {{ "
            f"typedef ::msl::signature<decltype({callee})> S; {callee}({', '.join(args)}); }}\n"
            f"MSL_KERNEL_ENTRY({entry.host_name}, ({layout}), ({max_threads}))\n")
