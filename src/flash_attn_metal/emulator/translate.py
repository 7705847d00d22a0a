"""MSL to C++: the user's source, lightly rewritten, plus one entry point per kernel.

The translation keeps every MSL line on the same line of the output (under `#line 1 "kernel.metal"`), so
compiler diagnostics and the emulator's barrier and collective sites name MSL lines. Rewrites:

- `kernel` functions become plain functions; their attributes are dropped, and an entry point binds the
  launch's buffer table and builtin attributes to their parameters;
- `threadgroup T name[N];` inside a kernel becomes a reference into the threadgroup's arena (one layout
  struct per kernel, so every thread of a threadgroup sees the same memory);
- multi-element swizzles (`v.xy`, `c.rgb`) become `v.template sw<0, 1>()`; single elements are members;
- half literals (`1.0h`) become `half(1.0f)`;
- in debug builds, `device`/`constant` pointer types become bounds-checked `msl::dptr<T>`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UnsupportedMSL
from .msl import IDENT, NUMBER, PREPROC, Kernel, Token, is_threadgroup_variable, parse, tokenize

_SWIZZLE_SETS = ("xyzw", "rgba")
MSL_FILE = "kernel.metal"
USER_NAMESPACE = "msl_user"


@dataclass(frozen=True)
class KernelInfo:
    """What the host needs to launch one kernel."""

    name: str
    line: int
    params: tuple  # msl.Param, in declaration order
    max_threads: int | None
    buffer_names: dict[int, str]


@dataclass(frozen=True)
class Translation:
    cpp: str
    kernels: dict[str, KernelInfo]
    uses_atomics: bool


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


def _rewrite_expression_tokens(tokens: list[Token], i: int, struct_fields: set[str]) -> tuple[str, int]:
    """Rewrite token i if it is a half literal or the start of a swizzle; return (text, tokens consumed)."""
    t = tokens[i]
    if t.kind == NUMBER:
        return half_literal(t.text), 1
    if t.text == "." and i + 1 < len(tokens) and tokens[i + 1].kind == IDENT:
        name = tokens[i + 1].text
        indices = _swizzle_indices(name)
        if indices is not None and name not in struct_fields:
            return ".template sw<" + ", ".join(map(str, indices)) + ">()", 2
    return t.text, 1


def _rewrite_define(text: str, struct_fields: set[str]) -> str:
    """Apply the expression rewrites to a #define's replacement list (joined onto one line, line count kept)."""
    words = text[1:].split(None, 2)
    if len(words) < 2 or words[0] != "define":
        return text
    joined = text.replace("\\\n", " ")
    name = words[1].split("(")[0]
    name_end = joined.index(name, joined.index("define") + len("define")) + len(name)
    head_end = joined.index(")", name_end) + 1 if joined.startswith("(", name_end) else name_end
    body = tokenize(joined[head_end:])
    pieces, i = [], 0
    while i < len(body):
        piece, used = _rewrite_expression_tokens(body, i, struct_fields)
        pieces.append(piece)
        i += used
    return joined[:head_end] + " " + " ".join(pieces) + "\n" * text.count("\n")


def pointer_type_end(tokens: list[Token], i: int) -> int | None:
    """If tokens[i] (`device`/`constant`) starts a pointer type, return the index of its `*`."""
    depth = 0
    for j in range(i + 1, min(len(tokens), i + 24)):
        text = tokens[j].text
        if text == "<":
            depth += 1
        elif text == ">":
            depth -= 1
        elif depth == 0:
            if text == "*":
                return j
            if not (tokens[j].kind == IDENT or text == "::"):
                return None
            if tokens[j].kind == IDENT and j + 1 < len(tokens) and tokens[j + 1].kind == IDENT and text not in ("const", "volatile"):
                return None  # `constant float name` : a declaration, not a pointer type
    return None


# The prelude each target compiles the translation with (include/).
_PRELUDES = {"cpu": "msl_cpu.h", "cuda": "msl_cuda.h"}


def translate(source: str, *, debug: bool = False, target: str = "cpu") -> Translation:
    program = parse(source)
    if not program.kernels:
        raise UnsupportedMSL("no kernel", None, "the source declares no `kernel void` function")
    tokens = program.tokens
    kernel_at = {k.kernel_token: k for k in program.kernels}
    dropped = {j for k in program.kernels for a, b in k.attribute_ranges for j in range(a, b + 1)}
    tg_decl_at = {d.start: (k, d) for k in program.kernels for d in k.threadgroup_decls}

    out: list[str] = [f'#include "{_PRELUDES[target]}"\n']
    if debug:
        out.append('#include "msl_debug.h"\n')
    # The kernels' own names live apart from the emulator's (and, on CUDA, from CUDA's global math).
    out.append(f'namespace {USER_NAMESPACE} {{ using namespace metal; MSL_USER_NAMESPACE_USING\n')
    out.append(f'#line 1 "{MSL_FILE}"\n')
    line = 1
    i = 0
    nesting = 0  # braces and parentheses: 0 at program scope
    while i < len(tokens):
        t = tokens[i]
        if t.text in ("{", "("):
            nesting += 1
        elif t.text in ("}", ")"):
            nesting -= 1
        if t.line > line:
            out.append("\n" * (t.line - line))
            line = t.line
        if i in kernel_at:
            out.append(_layout_struct(kernel_at[i]))
        if t.kind == PREPROC:
            if "metal_stdlib" not in t.text:
                out.append(_rewrite_define(t.text, program.struct_fields))
            line += t.text.count("\n")
            i += 1
            continue
        if i in tg_decl_at:
            kernel, decl = tg_decl_at[i]
            out.append(_threadgroup_refs(kernel, decl))
            line = tokens[decl.end].line
            i = decl.end + 1
            continue
        if i in dropped:
            if t.text == "kernel":
                out.append("static ")
            i += 1
            continue
        if (t.text == "threadgroup" and tokens[i - 1].text in ";{}" and is_threadgroup_variable(tokens, i)
                and _inside_function(tokens, i)):
            raise UnsupportedMSL("threadgroup variable outside a kernel", t.line,
                                 "threadgroup variables can only be declared in a kernel function")
        if debug and t.text == "reinterpret_cast" and tokens[i + 2].text in ("device", "constant", "const"):
            out.append("::msl::pointer_cast ")
            i += 1
            continue
        if debug and t.text in ("device", "constant"):
            star = pointer_type_end(tokens, i)
            if star is not None:
                prefix = "const " if tokens[i - 1].text == "const" and out and out[-1] == "const " else ""
                if prefix:
                    out.pop()
                inner = " ".join(x.text for x in tokens[i + 1 : star])
                out.append(f"::msl::dptr<{prefix}{inner}> ")
                i = star + 1
                continue
        if t.text == "constant" and nesting == 0 and pointer_type_end(tokens, i) is None:
            out.append("static const ")  # a program-scope constant: usable in constant expressions
            i += 1
            continue
        piece, used = _rewrite_expression_tokens(tokens, i, program.struct_fields)
        out.append(piece + " ")
        i += used

    kernels = {k.name: _kernel_info(k) for k in program.kernels}
    out.append('\n#line 1 "emulator-entry-points"\n')
    out.extend(_entry_point(k, debug) for k in program.kernels)
    out.append(f"}}  // namespace {USER_NAMESPACE}\n")
    out.extend(f"MSL_KERNEL_ENTRY({k.name}, {_threadgroup_bytes(k)})\n" for k in program.kernels)
    return Translation("".join(out), kernels, program.uses_atomics)


def _inside_function(tokens: list[Token], i: int) -> bool:
    depth = 0
    for t in tokens[:i]:
        if t.text == "{":
            depth += 1
        elif t.text == "}":
            depth -= 1
    return depth > 0


def _layout_struct(kernel: Kernel) -> str:
    if not kernel.threadgroup_decls:
        return ""
    fields = []
    n = 0
    for decl in kernel.threadgroup_decls:
        for _, dims in decl.declarators:
            fields.append(f"alignas(16) {decl.type_text} v{n}{dims};")
            n += 1
    return f"struct msl_threadgroup_{kernel.name} {{ {' '.join(fields)} }}; "


def _threadgroup_refs(kernel: Kernel, decl) -> str:
    index = 0
    for d in kernel.threadgroup_decls:
        if d is decl:
            break
        index += len(d.declarators)
    refs = []
    for name, _ in decl.declarators:
        refs.append(
            f"auto& {name} = reinterpret_cast<msl_threadgroup_{kernel.name}*>(::msl::threadgroup_arena())->v{index};"
        )
        index += 1
    return " ".join(refs) + " "


def _kernel_info(kernel: Kernel) -> KernelInfo:
    names = {p.buffer_index: p.name for p in kernel.params if p.buffer_index is not None}
    return KernelInfo(kernel.name, kernel.line, tuple(kernel.params), kernel.max_threads, names)


def _param_type(p, debug: bool) -> str:
    tokens = [t for t in p.type_tokens if t not in ("device", "constant", "thread", "threadgroup")]
    if debug and p.is_pointer:
        inner = " ".join(t for t in tokens if t != "*")
        return f"::msl::dptr<{inner}>"
    return " ".join(tokens)


def _entry_point(kernel: Kernel, debug: bool) -> str:
    args = []
    for p in kernel.params:
        if p.builtin is not None:
            args.append(f"::msl::attr<{' '.join(p.type_tokens)}>(::msl::{p.builtin}(L))")
        elif p.is_pointer:
            args.append(f'::msl::binder<{_param_type(p, debug)}>::bind(L, {p.buffer_index}, "{p.name}")')
        else:
            element = " ".join(t for t in p.type_tokens if t not in ("device", "constant", "&"))
            args.append(f"::msl::bind_reference<{element}>(L, {p.buffer_index})")
    return f"void msl_entry_{kernel.name}(const ::msl::Launch* L) {{ {kernel.name}({', '.join(args)}); }}\n"


def _threadgroup_bytes(kernel: Kernel) -> str:
    return f"sizeof({USER_NAMESPACE}::msl_threadgroup_{kernel.name})" if kernel.threadgroup_decls else "0"
