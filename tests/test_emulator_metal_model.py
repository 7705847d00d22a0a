"""The emulator's model of Metal (issue 16): name lookup, template kernels, headers and predefined macros,
<metal_stdlib>'s vocabulary (one vocabulary with the type check's shim), address-space overloads, and what stays
refused by policy. Each must-pass case has a must-fail twin."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest
import torch

from emulator_support import HEADER, assert_refused, build, on_devices
from flash_attn_metal.emulator import MSLCompileError, UnsupportedMSL, compile_shader, typecheck

INCLUDE = Path(importlib.import_module("flash_attn_metal.emulator").__file__).parent / "include"


# ---- 1. name lookup: user functions overload Metal's ----

SHUFFLE_OVERLOADS = """
// A user overload for 64-bit values must not capture calls on floats (it would return 2.0 for 2.5f).
inline ulong simd_shuffle(ulong data, ushort lane) {
  return as_type<ulong>(simd_shuffle(as_type<uint2>(data), lane));
}
// MLX's bool overload calls Metal's uint one; hiding Metal's would recurse forever.
inline bool simd_shuffle(bool data, ushort lane) { return simd_shuffle(uint(data), lane); }
kernel void shuffles(device float* out [[buffer(0)]], device ulong* wide [[buffer(1)]],
                     ushort lane [[thread_index_in_simdgroup]]) {
  out[lane] = simd_shuffle(2.5f + float(lane), ushort(0));
  wide[lane] = simd_shuffle(ulong(lane) << 40, ushort(31 - lane));
  out[32 + lane] = float(simd_shuffle(lane % 3 == 0, ushort(lane + 1)));
}
"""


@on_devices
def test_user_overloads_compete_with_metals(device):
    lib = build(SHUFFLE_OVERLOADS, device)
    out = torch.zeros(64, device=device)
    wide = torch.zeros(32, dtype=torch.int64, device=device)
    lib.shuffles(out, wide, threads=[32], group_size=[32])
    assert out[:32].eq(2.5).all()
    assert wide.cpu().tolist() == [(31 - lane) << 40 for lane in range(32)]
    assert out[32:63].cpu().tolist() == [float((lane + 1) % 3 == 0) for lane in range(31)]


def test_an_overload_that_matches_no_call_is_an_error():
    build(SHUFFLE_OVERLOADS, checked=False)
    wrong = SHUFFLE_OVERLOADS.replace("simd_shuffle(2.5f + float(lane), ushort(0))", "simd_shuffle(lane, 1, 2)")
    with pytest.raises(MSLCompileError):
        compile_shader(HEADER + wrong)


EXTENDED_NAMESPACE = """
namespace metal {
// Extends Metal's namespace: an overload of a builtin, and a function of its own.
inline float exp2(int x) { return float(1 << x); }
inline float twice(float x) { return 2.0f * x; }
}  // namespace metal
kernel void extended(device float* out [[buffer(0)]], uint i [[thread_position_in_grid]]) {
  out[i] = metal::twice(metal::exp2(float(i))) + exp2(int(i)) + metal::sqrt(4.0f);
}
"""


@on_devices
def test_a_user_namespace_metal_extends_metals(device):
    lib = build(EXTENDED_NAMESPACE, device)
    out = torch.zeros(5, device=device)
    lib.extended(out, threads=[5], group_size=[5])
    assert out.cpu().tolist() == [2 * 2.0**i + 2**i + 2 for i in range(5)]


def test_names_metal_lacks_are_not_found_in_an_extended_namespace():
    build(EXTENDED_NAMESPACE, checked=False)
    with pytest.raises((UnsupportedMSL, MSLCompileError), match="thrice"):
        compile_shader(HEADER + EXTENDED_NAMESPACE.replace("metal::twice(", "metal::thrice("))


# ---- 2. template kernels ----

TEMPLATES = """
template <typename T> struct Accum { typedef float type; };
template <typename T>
METAL_FUNC void stage(threadgroup T* tile, device const T* src, ushort tid, int n) {
  for (int k = tid; k < n; k += 32) tile[k] = src[k];
}
template <typename T, int ROWS, int COLS>
[[kernel]] void row_sums(device const T* x [[buffer(0)]], device float* out [[buffer(1)]],
                         ushort tid [[thread_index_in_threadgroup]]) {
  constexpr int PAD = 16 / sizeof(T);
  constexpr int LD = COLS + PAD;
  threadgroup T tile[ROWS * LD];
  threadgroup typename Accum<T>::type sums[ROWS];
  for (int r = 0; r < ROWS; ++r) stage(tile + r * LD, x + r * COLS, tid, COLS);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (tid < ROWS) {
    float s = 0.0f;
    for (int c = 0; c < COLS; ++c) s += float(tile[tid * LD + c]);
    sums[tid] = s;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (tid < ROWS) out[tid] = sums[tid];
}
template [[host_name("row_sums_half_4x40")]] [[kernel]] decltype(row_sums<half, 4, 40>) row_sums<half, 4, 40>;
template [[host_name("row_sums_float_8x8")]] [[kernel]] void row_sums<float, 8, 8>(
    device const float*, device float*, ushort);
"""


@on_devices
def test_template_kernels_by_host_name_with_sized_threadgroup_arrays(device):
    lib = build(TEMPLATES, device)
    assert sorted(dir(lib)) == ["row_sums_float_8x8", "row_sums_half_4x40"]
    x = torch.randn(4, 40, device=device).half()
    out = torch.zeros(8, device=device)
    lib.row_sums_half_4x40(x, out, threads=[32], group_size=[32])
    assert torch.allclose(out[:4].cpu(), x.float().sum(1).cpu(), atol=1e-3)
    assert lib.row_sums_half_4x40.static_thread_group_memory_length == 4 * 48 * 2 + 16
    y = torch.randn(8, 8, device=device)
    lib.row_sums_float_8x8(y, out, threads=[32], group_size=[32])
    assert torch.allclose(out.cpu(), y.sum(1).cpu(), atol=1e-5)
    assert lib.row_sums_float_8x8.static_thread_group_memory_length == 8 * 12 * 4 + 32


def test_a_kernel_template_is_callable_only_through_a_host_name():
    lib = build(TEMPLATES, checked=False)
    with pytest.raises(AttributeError, match="no kernel named 'row_sums'"):
        lib.row_sums
    unnamed = TEMPLATES.replace('template [[host_name("row_sums_half_4x40")]] [[kernel]]', "template [[kernel]]")
    with pytest.raises(UnsupportedMSL, match="host_name"):
        compile_shader(HEADER + unnamed)


# ---- 3. headers and predefined macros ----

HEADERS = """#include <metal_stdlib>
#include <metal_math>
#include <metal_simdgroup>
#include <metal_simdgroup_matrix>
#include <metal_atomic>
#include <metal_compute>
#include <metal_integer>
#include <metal_type_traits>
#if 0
#include "not_there.h"
#endif
using namespace metal;
#if defined(__METAL__) && defined(__HAVE_BFLOAT__) && __METAL_VERSION__ >= 310
#define VERSION __METAL_VERSION__
#else
#define VERSION 0
#endif
kernel void version(device int* out [[buffer(0)]]) { out[0] = VERSION; }
"""


@on_devices
def test_sub_headers_and_metal_31s_predefined_macros(device):
    lib = build(HEADERS, device, header="")
    out = torch.zeros(1, dtype=torch.int32, device=device)
    lib.version(out, threads=[1], group_size=[1])
    assert out.item() == 310


def test_an_include_that_runs_is_refused():
    live = HEADERS.replace("#if 0\n", "#if 1\n")
    with pytest.raises(UnsupportedMSL, match="not_there.h") as info:
        compile_shader(live)
    assert info.value.line == 10
    with pytest.raises(MSLCompileError, match="not_there.h"):
        typecheck(live)


# ---- 4. <metal_stdlib>'s vocabulary ----

VOCABULARY = """
static_assert(sizeof(int8_t) == 1 && sizeof(uint16_t) == 2 && sizeof(int32_t) == 4 && sizeof(uint64_t) == 8, "");
static_assert(sizeof(size_t) == 8, "");
static_assert(is_same_v<metal::vec<float, 4>, float4> && is_same<metal::simdgroup_matrix<half, 8, 8>, simdgroup_half8x8>::value, "");
static_assert(is_integral_v<ushort> && !is_integral<float>::value && is_floating_point_v<half> && is_floating_point<bfloat>::value, "");
static_assert(is_same_v<make_unsigned_t<int>, uint> && is_same_v<typename make_unsigned<short>::type, ushort>, "");
static_assert(is_same_v<remove_cv_t<const volatile int>, int> && is_same_v<conditional_t<true, half, float>, half>, "");
template <typename T, typename = enable_if_t<is_floating_point_v<T>>> constexpr T largest() { return numeric_limits<T>::max(); }
constant constexpr float BIG = largest<float>();
static constexpr constant half SMALL = numeric_limits<half>::epsilon();
static_assert(float(numeric_limits<half>::max()) == 65504.0f && numeric_limits<int>::max() == 2147483647, "");
constant constexpr half H = half(0.25f) + half(0.5f);
constant constexpr bfloat B = bfloat(3.0f);
static_assert(float(H) == 0.75f && float(B) == 3.0f, "half and bfloat are literal types");
kernel void vocabulary(device float* out [[buffer(0)]]) {
  out[0] = BIG;
  out[1] = float(SMALL);
  out[2] = float(H) + float(B);
  out[3] = float(numeric_limits<bfloat>::lowest());
}
"""


@on_devices
def test_stdlib_vocabulary_in_constant_expressions(device):
    lib = build(VOCABULARY, device)
    out = torch.zeros(4, device=device)
    lib.vocabulary(out, threads=[1], group_size=[1])
    assert out.cpu().tolist() == [torch.finfo(torch.float32).max, 2.0**-10, 3.75, -torch.finfo(torch.bfloat16).max]


def test_a_false_trait_fails_a_static_assert():
    bad = VOCABULARY.replace("is_integral_v<ushort> &&", "is_integral_v<half> &&")
    assert_refused(HEADER + bad)


# ---- 5. address-space overloads ----

ADDRESS_SPACES = """
METAL_FUNC int space(device float* p) { return 1; }
METAL_FUNC int space(constant float* p) { return 2; }
METAL_FUNC int space(threadgroup float* p) { return 3; }
METAL_FUNC int space(thread float* p) { return 4; }
METAL_FUNC int space(const device float* p) { return 5; }
template <typename T> METAL_FUNC int deduced(const device T* p) { return 1; }
template <typename T> METAL_FUNC int deduced(const threadgroup T* p) { return 3; }
struct Probe {
  int kind;
  Probe(device float* p) : kind(1) {}
  Probe(threadgroup float* p) : kind(3) {}
  Probe(thread float* p) : kind(4) {}
  int which(const device half* p) const { return 10 * kind; }
  int which(const threadgroup half* p) const { return 30 * kind; }
};
template <typename T, int N> struct Array {
  T elements[N];
  // Generated code (Tint's, for one) spells an accessor for every address space of `this`, alike.
  const constant T& operator[](int i) const constant { return elements[i]; }
  device T& operator[](int i) device { return elements[i]; }
  const device T& operator[](int i) const device { return elements[i]; }
  thread T& operator[](int i) thread { return elements[i]; }
  const thread T& operator[](int i) const thread { return elements[i]; }
};
kernel void spaces(device float* out [[buffer(0)]], constant float* c [[buffer(1)]],
                   device const float* dc [[buffer(2)]], device half* h [[buffer(3)]],
                   device Array<float, 4>* arrays [[buffer(4)]]) {
  threadgroup float tile[4];
  threadgroup half htile[4];
  float local[4] = {0.0f, 1.0f, 2.0f, 3.0f};
  threadgroup float* tp = tile + 1;
  Array<int, 2> here;
  here[0] = 7;
  out[0] = space(out); out[1] = space(c); out[2] = space(tile); out[3] = space(local);
  out[4] = space(&tile[1]); out[5] = space(dc); out[6] = space(tp);
  out[7] = Probe(out).kind * 100 + Probe(tile).kind * 10 + Probe(local).kind;
  out[8] = Probe(out).which(h) + Probe(tile).which(htile);
  out[9] = deduced(h) + deduced(htile) * 10 + deduced(dc) * 100;
  out[10] = arrays[0][2] + float(here[0]);
}
"""


@on_devices
def test_overloads_on_address_spaces_stay_distinct(device):
    lib = build(ADDRESS_SPACES, device)
    out = torch.zeros(11, device=device)
    c = torch.zeros(1, device=device)
    h = torch.zeros(1, dtype=torch.float16, device=device)
    arrays = torch.tensor([0.0, 0.0, 5.0, 0.0], device=device)
    lib.spaces(out, c, c, h, arrays, threads=[1], group_size=[1])
    assert out.cpu().tolist() == [1, 2, 3, 4, 3, 5, 3, 134, 10 + 90, 131, 12]


def test_a_device_pointer_where_a_thread_pointer_is_expected_is_refused():
    """The emulator's pointer types keep this rule of Metal's (the type check's clang lets it pass)."""
    good = HEADER + ("inline float get(thread float* p) { return *p; }\n"
                     "kernel void k(device float* out [[buffer(0)]]) {\n  float x = 1.0f;\n  out[0] = get(&x);\n}\n")
    compile_shader(good)
    with pytest.raises(MSLCompileError) as info:
        compile_shader(good.replace("get(&x)", "get(out)"))
    assert info.value.diagnostics[0].line == 6


def test_accessors_for_this_address_space_with_different_bodies_are_refused():
    different = ADDRESS_SPACES.replace("thread T& operator[](int i) thread { return elements[i]; }",
                                       "thread T& operator[](int i) thread { return elements[0]; }")
    compile_shader(HEADER + ADDRESS_SPACES)
    with pytest.raises(UnsupportedMSL, match="address space of `this`"):
        compile_shader(HEADER + different)
    with pytest.raises(MSLCompileError, match="address space of `this`"):
        typecheck(HEADER + different)


# ---- 7. one vocabulary: the type check's shim and the runtime declare the same names in namespace metal ----

def _metal_names(source: str) -> set[str]:
    """The names the emulator's headers (those `source` includes) declare in namespace metal."""
    cindex = pytest.importorskip("clang.cindex")
    unit = cindex.Index.create().parse(
        "probe.cpp", args=["-x", "c++", "-std=c++17", "-ffreestanding", "-nostdinc", "-nostdinc++", f"-I{INCLUDE}"],
        unsaved_files=[("probe.cpp", source)])
    names: set[str] = set()

    def visit(cursor, namespace):
        for child in cursor.get_children():
            try:
                kind = child.kind
            except ValueError:  # a kind the bindings do not name
                continue
            if kind == cindex.CursorKind.NAMESPACE:
                visit(child, namespace + (child.spelling,))
            elif (namespace[:1] == ("metal",) and child.spelling and not child.spelling.startswith("operator")
                  and child.location.file and child.location.file.name.startswith(f"{INCLUDE}/")):
                names.add("::".join(namespace[1:] + (child.spelling,)))

    visit(unit.cursor, ())
    return names


def test_the_shim_and_the_runtime_declare_one_vocabulary():
    shim = _metal_names('#define METAL_TYPECHECK_STDLIB\n#include "metal_typecheck.h"\n')
    runtime = _metal_names('#include "msl_cpu.h"\n') - {"precise"}  # a namespace alias, as the shim's
    assert len(shim) > 200 and "simd_shuffle_xor" in shim and "make_unsigned_t" in shim
    assert sorted(shim - runtime) == [] and sorted(runtime - shim) == []


# ---- 8. refused by policy ----

@pytest.mark.parametrize("snippet, construct", [
    ('__asm("nop");', "__asm"),
    ("float y = __metal_private_thing(1.0f);", "__metal_private_thing"),
    ("float y = FC;", "function_constant"),
])
def test_private_metal_and_function_constants_are_refused(snippet, construct):
    good = HEADER + "constant float FC = 1.0f;\nkernel void k(device float* out [[buffer(0)]]) {\n  out[0] = FC;\n}\n"
    compile_shader(good)
    bad = good.replace("out[0] = FC;", snippet + " out[0] = 1.0f;")
    if construct == "function_constant":
        bad = good.replace("constant float FC = 1.0f;", "constant float FC [[function_constant(0)]];")
    with pytest.raises(UnsupportedMSL) as info:
        compile_shader(bad)
    assert info.value.construct == construct


def test_private_pragmas_are_refused_even_from_a_macro():
    good = HEADER + "kernel void k(device float* out [[buffer(0)]]) { out[0] = 1.0f; }\n"
    compile_shader(good)
    for bad in ("#pragma METAL internals : enable\n" + good,
                '#define PRIVATE _Pragma("METAL internals : enable")\nPRIVATE\n' + good):
        with pytest.raises(UnsupportedMSL, match="METAL"):
            compile_shader(bad)


# ---- the rest of the vocabulary computes what Metal's does ----

GROUP_FUNCTIONS = """
kernel void groups(device const float* x [[buffer(0)]], device float* out [[buffer(1)]],
                   ushort lane [[thread_index_in_simdgroup]]) {
  float v = x[lane];
  device float* o = out + lane * 10;
  o[0] = quad_sum(v);
  o[1] = quad_max(v);
  o[2] = quad_prefix_exclusive_sum(v);
  o[3] = quad_shuffle_xor(v, ushort(1));
  o[4] = quad_broadcast(v, ushort(2));
  o[5] = simd_shuffle_rotate_down(v, ushort(3));
  o[6] = simd_shuffle_and_fill_down(v, -v, ushort(2));
  o[7] = simd_shuffle_and_fill_up(v, -v, ushort(1), ushort(8));
  o[8] = simd_prefix_inclusive_product(lane < 4 ? v : 1.0f);
  o[9] = lane >= 5 ? simd_broadcast_first(v) : 0.0f;
}
kernel void integers(device const int* x [[buffer(0)]], device int* out [[buffer(1)]], uint i [[thread_position_in_grid]]) {
  int v = x[i];
  uint u = uint(v);
  device int* o = out + i * 8;
  o[0] = int(popcount(u)); o[1] = int(clz(u)); o[2] = int(ctz(u)); o[3] = int(reverse_bits(u));
  o[4] = int(rotate(u, 5u)); o[5] = mulhi(v, 123456789); o[6] = int(absdiff(v, -7)); o[7] = median3(v, 3, -3);
}
kernel void floats(device const float* x [[buffer(0)]], device float* out [[buffer(1)]], uint i [[thread_position_in_grid]]) {
  float v = x[i];
  device float* o = out + i * 6;
  o[0] = saturate(v); o[1] = fdim(v, 0.5f); o[2] = smoothstep(-1.0f, 1.0f, v); o[3] = sinh(v) + atan(v);
  o[4] = sinpi(v); o[5] = length_squared(float3(v, 1.0f, 2.0f)) + distance(float2(v, 0.0f), float2(0.0f));
}
"""


@on_devices
def test_group_integer_and_float_functions(device):
    lib = build(GROUP_FUNCTIONS, device)
    x = torch.randn(32)
    out = torch.zeros(320, device=device)
    lib.groups(x.to(device), out, threads=[32], group_size=[32])
    o = out.view(32, 10).cpu()
    for lane in range(32):
        q = x[lane - lane % 4: lane - lane % 4 + 4]
        eight = lane - lane % 8
        expected = [q.sum(), q.max(), q[:lane % 4].sum(), x[lane ^ 1], q[2], x[(lane + 3) % 32],
                    x[lane + 2] if lane + 2 < 32 else -x[lane + 2 - 32],
                    x[lane - 1] if lane % 8 >= 1 else -x[eight + 7],
                    torch.prod(x[:min(lane, 3) + 1]), x[5] if lane >= 5 else 0.0]  # the first active lane
        assert torch.allclose(o[lane], torch.tensor([float(e) for e in expected]), atol=1e-5), lane
    values = [0, 1, -1, 12345678, -7, 2**31 - 1, 16]
    ints = torch.tensor(values, dtype=torch.int32, device=device)
    got = torch.zeros(len(values) * 8, dtype=torch.int32, device=device)
    lib.integers(ints, got, threads=[len(values)], group_size=[len(values)])

    def i32(a):
        return (a + 2**31) % 2**32 - 2**31

    for v, row in zip(values, got.view(-1, 8).cpu().tolist()):
        u = v % 2**32
        bits = f"{u:032b}"
        leading, trailing = len(bits) - len(bits.lstrip("0")), len(bits) - len(bits.rstrip("0"))
        rotated = ((u << 5) | (u >> 27)) % 2**32
        assert row == [bits.count("1"), leading, trailing, i32(int(bits[::-1], 2)), i32(rotated),
                       (v * 123456789) >> 32, i32(abs(v + 7)), sorted([v, 3, -3])[1]], v
    f = torch.linspace(-2, 2, 9)
    fo = torch.zeros(9 * 6, device=device)
    lib.floats(f.to(device), fo, threads=[9], group_size=[9])
    t = ((f + 1) / 2).clamp(0, 1)
    expected = torch.stack([f.clamp(0, 1), (f - 0.5).clamp(min=0), t * t * (3 - 2 * t), f.sinh() + f.atan(),
                            torch.sin(math.pi * f), f * f + 5 + f.abs()], 1)
    assert torch.allclose(fo.view(9, 6).cpu(), expected, atol=1e-5)
