"""`emulator.typecheck` rejects what Apple's compiler rejects for types, address spaces and declarations, and
accepts real MSL. Every must-fail case has a must-pass twin, so a broken compiler call that rejects
everything cannot pass."""

from __future__ import annotations

import importlib
import os

import pytest

from emulator_support import HEADER
from flash_attn_metal.emulator import MSLCompileError, typecheck


def internals():
    """The module behind `typecheck`, imported when a test runs (importing it at collection would rebind the
    package's `typecheck` attribute to the module for test files collected later)."""
    return importlib.import_module("flash_attn_metal.emulator.typecheck")


HELPER_LINE, BODY_LINE = 3, 6


def kernel(body: str, helpers: str = "") -> str:
    """`helpers` on line 3, and a kernel whose body, one line, is line 6."""
    assert "\n" not in helpers + body
    return (HEADER + helpers + "\n"
            "kernel void k(device float* out [[buffer(0)]], device half* dh [[buffer(1)]],\n"
            "              constant float* c [[buffer(2)]], uint i [[thread_position_in_grid]]) {\n"
            + body + "\n}\n")


def rejects(source: str, fragment: str, line: int | None = None) -> MSLCompileError:
    with pytest.raises(MSLCompileError) as info:
        typecheck(source)
    first = info.value.diagnostics[0]
    assert fragment in first.message, str(info.value)
    if line is not None:
        assert first.line == line, str(info.value)
    return info.value


# name: (must pass, must fail, a fragment of the first error, its MSL line)
PAIRS = {
    "threadgroup pointer where a device pointer is expected": (
        kernel("out[i] = first(dh);", "inline half first(device half* p) { return p[0]; }"),
        kernel("threadgroup half t[4]; out[i] = first(t);", "inline half first(device half* p) { return p[0]; }"),
        "no matching function for call to 'first'; candidate function not viable: no known conversion from "
        "'threadgroup half[4]' to 'device half *'", BODY_LINE),
    "thread pointer where a device pointer is expected": (
        kernel("out[i] = get(out);", "inline float get(device float* p) { return *p; }"),
        kernel("float x = 1.0f; out[i] = get(&x);", "inline float get(device float* p) { return *p; }"),
        "no matching function for call to 'get'", BODY_LINE),
    "element-wise conversion to a template parameter's or an alias's vector type": (
        kernel("out[i] = conv<half4>(float4(1.0f)).x + H2(float2(1.0f)).y;",
               "template <typename V> V conv(float4 x) { return V(x); } typedef vec<half, 2> H2;"),
        kernel("out[i] = conv<half4>(float4(1.0f)).x + H2(float4(1.0f)).y;",
               "template <typename V> V conv(float4 x) { return V(x); } typedef vec<half, 2> H2;"),
        "a vector constructor's arguments must supply exactly as many elements as the vector has", BODY_LINE),
    "device buffer copied into threadgroup memory, struct by struct": (
        kernel("threadgroup Pair t[2]; t[0] = pairs(out)[0]; out[i] = t[0].a + t[0].sum();",
               "struct Pair { float a, b; float sum() const { return a + b; } }; "
               "inline device Pair* pairs(device float* p) { return (device Pair*)p; }"),
        kernel("threadgroup Pair t[2]; t[0] = pairs(out)[0]; out[i] = t[0].a + t[0].sum();",
               "struct Pair { float a, b; float sum() const { return a + b; } }; "
               "inline device Pair* pairs(device float* p) { return p; }"),
        "cannot initialize return object of type 'device Pair *' with an lvalue of type 'device float *'",
        HELPER_LINE),
    "constant pointer where a device pointer is expected": (
        kernel("out[i] = get(out);", "inline float get(device float* p) { return *p; }"),
        kernel("out[i] = get(c);", "inline float get(device float* p) { return *p; }"),
        "no matching function for call to 'get'", BODY_LINE),
    "constant memory is read-only": (
        kernel("out[i] = c[0];"), kernel("c[0] = out[i];"), "read-only variable is not assignable", BODY_LINE),
    "implicit conversion between vector element types": (
        kernel("half4 h = half4(1.0h); float4 f = float4(h); out[i] = f.x;"),
        kernel("half4 h = half4(1.0h); float4 f = h; out[i] = f.x;"),
        "cannot initialize a variable of type 'float4'", BODY_LINE),
    "implicit float to bfloat vector": (
        kernel("bfloat2 b = bfloat2(float2(out[i], 1.0f)); out[i] = float(b.x);"),
        kernel("bfloat2 b = float2(out[i], 1.0f); out[i] = float(b.x);"),
        "cannot initialize a variable of type 'bfloat2'", BODY_LINE),
    "arithmetic between vectors of different element types": (
        kernel("half2 h = half2(1.0h); float2 f = float2(h) + float2(2.0f); out[i] = f.x;"),
        kernel("half2 h = half2(1.0h); float2 f = h + float2(2.0f); out[i] = f.x;"),
        "cannot convert between vector values", BODY_LINE),
    "unknown function": (
        kernel("out[i] = exp2(out[i]);"), kernel("out[i] = exp3(out[i]);"), "undeclared identifier 'exp3'", BODY_LINE),
    "unknown identifier": (
        kernel("out[i] = c[0];"), kernel("out[i] = scale;"), "undeclared identifier 'scale'", BODY_LINE),
    "swizzle past the vector's end": (
        kernel("float2 v = float2(1.0f); out[i] = v.y;"), kernel("float2 v = float2(1.0f); out[i] = v.z;"),
        "vector component access exceeds type 'float2'", BODY_LINE),
    "vector constructor with the wrong element count": (
        kernel("float4 f = float4(float3(1.0f), 2.0f); out[i] = f.w;"),
        kernel("float4 f = float4(float3(1.0f)); out[i] = f.w;"),
        "must supply exactly as many elements as the vector has", BODY_LINE),
    "vector constructor that drops elements": (
        kernel("float4 f = float4(1.0f); float2 g = f.xy; out[i] = g.x;"),
        kernel("float4 f = float4(1.0f); float2 g = float2(f); out[i] = g.x;"),
        "must supply exactly as many elements as the vector has", BODY_LINE),
    "as_type to a type of another size": (
        kernel("ushort u = as_type<ushort>(half(out[i])); out[i] = u;"),
        kernel("uint u = as_type<uint>(half(out[i])); out[i] = u;"),
        "as_type<T>() needs a type of the same size", BODY_LINE),
    "max of mixed scalar types": (
        kernel("out[i] = max(out[i], 2.0f);"), kernel("out[i] = max(out[i], 2);"),
        "no matching function for call to 'max'", BODY_LINE),
    "math on an integer": (
        kernel("out[i] = exp(1.0);"), kernel("out[i] = exp(1);"), "no matching function for call to 'exp'", BODY_LINE),
    "double": (
        kernel("float d = 0.5; out[i] = d;"), kernel("double d = 0.5; out[i] = d;"), "metal_has_no_double", BODY_LINE),
    "simdgroup_load from thread memory": (
        kernel("threadgroup float t[64]; simdgroup_float8x8 m; simdgroup_load(m, t, 8);"),
        kernel("float t[64]; simdgroup_float8x8 m; simdgroup_load(m, t, 8);"),
        "no matching function for call to 'simdgroup_load'", BODY_LINE),
    "simdgroup_load from constant memory": (
        kernel("simdgroup_float8x8 m; simdgroup_load(m, out, 8, ulong2(0, 8), true);"),
        kernel("simdgroup_float8x8 m; simdgroup_load(m, c, 8, ulong2(0, 8), true);"),
        "no matching function for call to 'simdgroup_load'", BODY_LINE),
    "simdgroup_load of another element type": (
        kernel("simdgroup_half8x8 m; simdgroup_load(m, dh, 8);"),
        kernel("simdgroup_float8x8 m; simdgroup_load(m, dh, 8);"),
        "deduced conflicting types for parameter 'T' ('float' vs. 'half')", BODY_LINE),
    "simdgroup_store to read-only memory": (
        kernel("simdgroup_half8x8 m; simdgroup_store(m, dh, 8);"),
        kernel("simdgroup_half8x8 m; simdgroup_store(m, (const device half*)dh, 8);"),
        "no matching function for call to 'simdgroup_store'", BODY_LINE),
    "simdgroup_matrix of int": (
        kernel("simdgroup_matrix<float, 8, 8> m;"), kernel("simdgroup_matrix<int, 8, 8> m;"),
        "simdgroup_matrix holds float, half or bfloat", BODY_LINE),
    "atomic in thread memory": (
        kernel("threadgroup atomic_int n; atomic_fetch_add_explicit(&n, 1, memory_order_relaxed);"),
        kernel("atomic_int n; atomic_fetch_add_explicit(&n, 1, memory_order_relaxed);"),
        "no matching constructor for initialization of 'atomic_int'", BODY_LINE),
    "atomic operation on a plain int": (
        kernel("atomic_fetch_add_explicit((device atomic_int*)out, 1, memory_order_relaxed);"),
        kernel("atomic_fetch_add_explicit((device int*)out, 1, memory_order_relaxed);"),
        "no matching function for call to 'atomic_fetch_add_explicit'", BODY_LINE),
    "bitwise atomic on atomic_float": (
        kernel("atomic_fetch_add_explicit((device atomic_float*)out, 1.0f, memory_order_relaxed);"),
        kernel("atomic_fetch_or_explicit((device atomic_float*)out, 1.0f, memory_order_relaxed);"),
        "no matching function for call to 'atomic_fetch_or_explicit'", BODY_LINE),
    "threadgroup variable with an initializer": (
        kernel("threadgroup float t[4]; t[i % 4] = 0.0f;"), kernel("threadgroup float t[4] = {0.0f};"),
        "a threadgroup variable cannot have an initializer", BODY_LINE),
    "threadgroup variable outside a kernel": (
        kernel("threadgroup float t[4]; out[i] = g(t);", "inline float g(threadgroup float* t) { return t[0]; }"),
        kernel("out[i] = g();", "inline float g() { threadgroup float t[4]; return t[0]; }"),
        "threadgroup variables can be declared only in a kernel function", HELPER_LINE),
    "inline assembly": (
        kernel("out[i] = 0.0f;"), kernel('out[i] = 0.0f; __asm("nop");'), "inline assembly (`__asm`)", BODY_LINE),
    "#pragma METAL": (
        kernel("out[i] = 0.0f;"), "#pragma METAL internals : enable\n" + kernel("out[i] = 0.0f;"),
        "`#pragma METAL`", 1),
    "_Pragma METAL": (
        kernel("out[i] = 0.0f;"), kernel('_Pragma("METAL internals : enable") out[i] = 0.0f;'), "_Pragma", BODY_LINE),
    "program-scope variable outside the constant address space": (
        kernel("out[i] = scale;", "constant float scale = 2.0f;"), kernel("out[i] = scale;", "float scale = 2.0f;"),
        "program-scope variable 'scale' must be declared in the constant address space", HELPER_LINE),
    "constexpr program-scope variable outside the constant address space": (
        kernel("out[i] = N;", "constexpr constant int N = 4;"), kernel("out[i] = N;", "constexpr int N = 4;"),
        "program-scope variable 'N' must be declared in the constant address space", HELPER_LINE),
    "kernel position of type int": (
        HEADER + "kernel void k(device float* o [[buffer(0)]], uint2 p [[thread_position_in_grid]]) { o[p.x] = 0; }",
        HEADER + "kernel void k(device float* o [[buffer(0)]], int2 p [[thread_position_in_grid]]) { o[p.x] = 0; }",
        "kernel parameter 'p' with [[thread_position_in_grid]] must be uint, uint2, uint3, ushort, ushort2 or "
        "ushort3, not 'int2'", 3),
    "kernel index of a vector type": (
        HEADER + "kernel void k(device float* o [[buffer(0)]], ushort s [[simdgroup_index_in_threadgroup]]) {}",
        HEADER + "kernel void k(device float* o [[buffer(0)]], uint2 s [[simdgroup_index_in_threadgroup]]) {}",
        "must be uint or ushort, not 'uint2'", 3),
    "kernel value parameter without an attribute": (
        HEADER + "kernel void k(device float* o [[buffer(0)]], constant uint& n [[buffer(1)]]) { o[n] = 0; }",
        HEADER + "kernel void k(device float* o [[buffer(0)]], uint n) { o[n] = 0; }",
        "kernel parameter 'n' of type 'uint' must be a device or constant pointer or reference", 3),
    "kernel buffer passed by value": (
        HEADER + "kernel void k(device float* o, constant uint& n) { o[n] = 0; }",
        HEADER + "kernel void k(device float* o [[buffer(0)]], uint n [[buffer(1)]]) { o[n] = 0; }",
        "kernel parameter 'n' with [[buffer(n)]] must be a device or constant pointer or reference", 3),
    "kernel threadgroup buffer in device memory": (
        HEADER + "kernel void k(device float* o [[buffer(0)]], threadgroup float* t [[threadgroup(0)]]) { o[0] = t[0]; }",
        HEADER + "kernel void k(device float* o [[buffer(0)]], device float* t [[threadgroup(0)]]) { o[0] = t[0]; }",
        "with [[threadgroup(n)]] must be a threadgroup pointer", 3),
    "kernel returning a value": (
        HEADER + "kernel void k(device float* o [[buffer(0)]]) { return; }",
        HEADER + "kernel int k(device float* o [[buffer(0)]]) { return 0; }",
        "kernel function 'k' must return void", 3),
    "no #include <metal_stdlib>": (
        "#include <metal_math>\nkernel void k(device float* o [[buffer(0)]]) { o[0] = metal::exp(1.0f); }",
        "kernel void k(device float* o [[buffer(0)]]) { o[0] = metal::exp(1.0f); }",
        "no member named 'exp' in namespace 'metal'", 1),
    "no using namespace metal": (
        HEADER + "kernel void k(device float* o [[buffer(0)]]) { o[0] = exp(1.0f); }",
        "#include <metal_stdlib>\nkernel void k(device float* o [[buffer(0)]]) { o[0] = exp(1.0f); }",
        "undeclared identifier 'exp'", 2),
}


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_must_pass_and_must_fail(name):
    good, bad, fragment, line = PAIRS[name]
    typecheck(good)
    rejects(bad, fragment, line)


def test_columns_are_the_msls_after_rewrites():
    """Threadgroup declarations, half literals and attributes are rewritten; errors still point into the MSL."""
    body = "threadgroup float t[4]; half h = 1.0h; out[i] = h + t[0] + oops;"
    error = rejects(kernel(body), "undeclared identifier 'oops'", BODY_LINE)
    assert error.diagnostics[0].column == body.index("oops") + 1
    typecheck(kernel(body.replace(" + oops", "")))

    line = "kernel void k(device float* o /* é */ [[buffer(0)]], uint p [[thread_position_in_grid]]) { o[p] = oops; }"
    error = rejects(HEADER + line, "undeclared identifier 'oops'", 3)
    assert error.diagnostics[0].column == line.index("oops") + 1  # in characters, not UTF-8 bytes
    typecheck(HEADER + line.replace("oops", "1"))


# A FlashAttention-like kernel: threadgroup tiles, simdgroup matrices (half inputs into a float accumulator),
# row reductions with simd_shuffle_xor, barriers, bfloat conversions and a templated helper.
ATTENTION_LIKE = HEADER + """
constant int D = 64;
constant float LOG2E = 1.44269504088896341f;
#define BLOCK 32

template <typename T>
inline float load_scaled(const device T* p, long i, float scale) { return float(p[i]) * scale; }

inline void fill_tile(threadgroup half* tile, const device bfloat* src, ushort tid) {
  for (int k = tid; k < BLOCK * D; k += 128) tile[k] = half(float(src[k]));
}

kernel void attention(device const bfloat* q [[buffer(0)]], device const bfloat* k [[buffer(1)]],
                      device half* o [[buffer(2)]], constant long* ints [[buffer(3)]],
                      constant float& scale [[buffer(4)]],
                      uint3 group [[threadgroup_position_in_grid]], ushort tid [[thread_index_in_threadgroup]],
                      ushort sg [[simdgroup_index_in_threadgroup]], ushort lane [[thread_index_in_simdgroup]]) {
  threadgroup half k_tile[BLOCK * D];
  threadgroup float scores[BLOCK * 8];
  const long row = long(group.x) * BLOCK + sg * 8 + (lane / 2) % 4;
  simdgroup_float8x8 acc = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  simdgroup_half8x8 q_frag;
  q_frag.thread_elements() = half2(load_scaled(q, row * D + lane, scale * LOG2E), half(0.0h));
  for (long k0 = 0; k0 < ints[0]; k0 += BLOCK) {
    fill_tile(k_tile, k + k0 * D, tid);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int d = 0; d < D; d += 8) {
      simdgroup_half8x8 k_frag;
      simdgroup_load(k_frag, k_tile + d, D, ulong2(0, 0), true);
      simdgroup_multiply_accumulate(acc, q_frag, k_frag, acc);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  simdgroup_store(acc, scores + sg * 64, 8);
  float2 s = acc.thread_elements();
  float m = max(s.x, s.y);
  m = max(m, simd_shuffle_xor(m, 1));
  m = max(m, simd_shuffle_xor(m, 8));
  const float p = fast::exp2(s.x - m) + fast::exp2(s.y - m);
  const bfloat b = static_cast<bfloat>(p);
  o[row * D + lane] = half(float(b) / simd_sum(p));
}
"""


def test_a_realistic_attention_kernel_passes():
    typecheck(ATTENTION_LIKE)
    rejects(ATTENTION_LIKE.replace("fill_tile(k_tile, k + k0 * D", "fill_tile(k_tile, q + k0 * D").replace(
        "const device bfloat* src", "const device half* src"), "no matching function for call to 'fill_tile'")
    rejects(ATTENTION_LIKE.replace("simdgroup_load(k_frag, k_tile + d", "simdgroup_load(k_frag, k + d"),
            "no matching function for call to 'simdgroup_load'")


# Much of the MSL the project and its kernels rely on, in one source.
FEATURE_TOUR = HEADER + """
#define SCALE 0.5
constant int N = 64;
constexpr constant uint TABLE[] = {1, 2, 3};
constant half H_ONE = 1.0h;
struct Params { int n; float scale; };
template <typename T, int M> struct Tile {
  T data[M];
  METAL_FUNC T sum() const { T s = T(0); for (int j = 0; j < M; ++j) s += data[j]; return s; }
};
static inline void store2(device float* out, thread const float2& v, uint j) { out[j] = v.x; out[j + 1] = v.y; }
METAL_FUNC float tg_read(threadgroup const float* p, int j) { return p[j]; }
inline void tg_write(threadgroup float& slot, float v) { slot = v; }
inline float dev_ref(const device float& x) { return x; }

[[kernel]] [[max_total_threads_per_threadgroup(1024)]] void tour(
    device float* out [[buffer(0)]], const device half* q [[buffer(1)]], device const bfloat* kb [[buffer(2)]],
    constant long& n [[buffer(3)]], constant float* arr [[buffer(4)]], constant Params& params [[buffer(5)]],
    device atomic_int* counter [[buffer(6)]], device atomic_float* facc [[buffer(7)]],
    uint gid [[thread_position_in_grid]], uint2 tg2 [[threadgroup_position_in_grid]],
    ushort3 tpt [[thread_position_in_threadgroup]], ushort tid [[thread_index_in_threadgroup]],
    uint3 tptg [[threads_per_threadgroup]], uint3 tgpg [[threadgroups_per_grid]], uint tpg [[threads_per_grid]],
    ushort sg [[simdgroup_index_in_threadgroup]], ushort lane [[thread_index_in_simdgroup]],
    uint nsg [[simdgroups_per_threadgroup]]) {
  threadgroup float buf[N], other[4];
  threadgroup half hbuf[N];
  threadgroup atomic_int tg_count;
  threadgroup Params tg_params[2];
  threadgroup const float* cbp = buf + 1;
  float x = float(q[gid]) * SCALE;
  half hx = half(x);
  bfloat bx = static_cast<bfloat>(x);
  float4 v4 = float4(x, x, x, 1.0f), f4 = float4(half4(hx)), f4c = float4(float2(x), float2(1.0f)), f4d = 1.0f;
  half2 h2 = half2(hx, 1.0h);
  bfloat4 b4 = bfloat4(bx);
  uint3 u3 = uint3(1, 2, 3);
  ushort2 us2 = ushort2(lane, sg);
  long2 l2 = long2(n + long(gid), 0);
  vec<float, 4> vv = vec<float, 4>(1.0f, 2.0f, 3.0f, 4.0f);
  metal::vec<half, 2> vh = metal::vec<half, 2>(hx);
  float2 sw = v4.xy + v4.zw + f4c.rg + f4d.ba;
  v4.xy = float2(0.0f);
  float y = exp(x) + exp2(x) + log(x) + log2(x) + sqrt(x) + rsqrt(x) + tanh(x) + abs(x) + fabs(x) + pow(x, 2.0f);
  y += min(x, y) + max(x, y) + fma(x, y, x) + clamp(x, 0.0f, 1.0f) + select(x, y, x > y) + floor(x) + ceil(x);
  y += sin(x) + cos(x) + round(x) + trunc(x) + sign(x) + mix(x, y, 0.5f) + dot(sw, sw) + length(sw);
  y += metal::exp(x) + fast::exp(x) + precise::exp(x) + metal::fast::log2(x) + metal::precise::sqrt(x);
  y += as_type<float>(as_type<uint>(x)) + float(as_type<half2>(x).x);
  bool special = isnan(x) || isinf(y) || any(v4 > f4) || all(v4 >= 0.0f);
  float4 vs = max(v4, f4) + clamp(v4, 0.0f, 1.0f) + select(v4, f4, v4 > f4);
  float lim = numeric_limits<float>::infinity() + numeric_limits<float>::max() + numeric_limits<float>::lowest()
              + numeric_limits<float>::min() + numeric_limits<float>::denorm_min() + numeric_limits<float>::quiet_NaN();
  half hlim = numeric_limits<half>::max();
  threadgroup_barrier(mem_flags::mem_threadgroup);
  threadgroup_barrier(mem_flags::mem_device | mem_flags::mem_threadgroup);
  simdgroup_barrier(mem_flags::mem_none);
  float s = simd_sum(x) + simd_max(x) + simd_min(x) + simd_prefix_inclusive_sum(x) + simd_prefix_exclusive_sum(x);
  s += simd_shuffle(x, lane) + simd_shuffle_xor(x, 1) + simd_shuffle_up(x, ushort(1)) + simd_shuffle_down(x, 1);
  s += simd_broadcast(x, 0) + float(simd_sum(hx)) + simd_shuffle_xor(sw, ushort(8)).x;
  ulong bits = ulong(simd_ballot(x > 0.0f));
  bool votes = simd_all(x > 0.0f) || simd_any(x > 0.0f);
  simdgroup_float8x8 acc = make_filled_simdgroup_matrix<float, 8, 8>(0.0f), fa;
  simdgroup_half8x8 ha;
  simdgroup_bfloat8x8 ba;
  simdgroup_load(ha, q, 8);
  simdgroup_load(ha, hbuf, N, ulong2(0, 8), true);
  simdgroup_load(ba, kb, 16, ulong2(8, 0));
  simdgroup_load(fa, buf, 8);
  simdgroup_multiply_accumulate(acc, ha, ha, acc);
  simdgroup_multiply_accumulate(acc, fa, fa, acc);
  simdgroup_multiply(acc, fa, fa);
  acc = fa * fa;
  simdgroup_store(acc, out, 8);
  simdgroup_store(acc, buf, 8, ulong2(0, 0), false);
  thread float2& te = acc.thread_elements();
  te *= 2.0f;
  acc.thread_elements()[0] = 1.0f;
  atomic_fetch_add_explicit(counter, 1, memory_order_relaxed);
  atomic_fetch_add_explicit(&tg_count, 1, memory_order_relaxed);
  atomic_store_explicit(&tg_count, 0, memory_order_relaxed);
  int count = atomic_load_explicit(counter + 1, memory_order_relaxed);
  atomic_fetch_add_explicit(facc, 1.5f, memory_order_relaxed);
  buf[tid] = tg_read(cbp, 0) + arr[0] + dev_ref(out[0]) + other[0] + float(tg_params[0].n);
  tg_write(buf[0], 1.0f);
  Tile<float, 4> tile;
  tile.data[0] = 1.0f;
  store2(out, float2(tile.sum(), params.scale), gid);
  out[gid] = y + s + float(bits) + float(count) + lim + float(hlim) + vs.x + float(special) + float(votes)
             + float(u3.x) + float(us2.x) + float(l2.x) + vv.x + float(vh.y) + float(h2.x) + float(b4.x) + f4c.x
             + float(TABLE[1]) + float(H_ONE) + float(tpt.x) + float(tptg.y) + float(tgpg.z) + float(tpg)
             + float(nsg) + float(tg2.x) + 1e-3 + .5;
}

template <typename T>
[[kernel]] void add_one(device T* out [[buffer(0)]], uint j [[thread_position_in_grid]]) { out[j] += T(1); }
template [[host_name("add_one_float")]] [[kernel]] void add_one<float>(device float*, uint);
"""


def test_a_tour_of_msl_passes():
    typecheck(FEATURE_TOUR)
    rejects(FEATURE_TOUR.replace("simdgroup_load(fa, buf, 8);", "simdgroup_load(fa, hbuf, 8);"),
            "no matching function for call to 'simdgroup_load'")


def test_errors_inside_the_shim_point_at_the_call():
    source = kernel("float4 f = float4(1.0f, 2.0f);")
    error = rejects(source, "a vector constructor's arguments must supply exactly as many elements", BODY_LINE)
    assert error.diagnostics[0].column == source.splitlines()[BODY_LINE - 1].index("float4(") + 1
    typecheck(kernel("float4 f = float4(1.0f, 2.0f, 3.0f, 4.0f);"))


def test_source_must_be_a_string():
    typecheck(kernel("out[i] = 0.0f;"))
    with pytest.raises(TypeError, match="source must be a str"):
        typecheck(kernel("out[i] = 0.0f;").encode())


def test_results_are_cached_by_source(monkeypatch):
    good, bad = kernel("out[i] = 1.0f;"), kernel("out[i] = nope;")
    typecheck(good)
    rejects(bad, "nope")

    def no_clang(self, source):
        raise AssertionError("not cached")

    monkeypatch.setattr(internals()._Checker, "check", no_clang)
    typecheck(good)
    rejects(bad, "nope")  # a cached failure still fails
    with pytest.raises(AssertionError, match="not cached"):
        typecheck(kernel("out[i] = 2.0f;"))


def test_the_fast_token_reading_agrees_with_libclangs_accessors(monkeypatch):
    tc = internals()
    checker = tc._Checker.get()
    data = ATTENTION_LIKE.encode()
    fast, slow = checker.token_spans(data, fast=True), checker.token_spans(data, fast=False)
    kinds, starts, ends = fast
    assert len(kinds) > 500 and fast == slow
    assert [data[a:b].decode() for a, b in zip(starts[:4], ends)] == ["#", "include", "<", "metal_stdlib"]

    # Where libclang's accessors disagree with the fast reading, the accessors' answer is taken.
    accessor = tc._Checker.token_span
    monkeypatch.setattr(tc._Checker, "token_span", lambda self, tu, token: (lambda k, a, b: (k, a + 1, b + 1))(
        *accessor(self, tu, token)))
    assert checker.token_spans(data, fast=True) == (kinds, [a + 1 for a in starts], [b + 1 for b in ends])


def test_no_temporary_files(tmp_path, monkeypatch):
    """Precompiled preambles stay in memory; a plain libclang index would write one to TMPDIR."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    tc = internals()
    checker = tc._Checker()
    try:
        for value in ("1.0f", "2.0f"):
            assert checker.check(kernel(f"out[i] = {value};")) == ()
        assert os.listdir(tmp_path) == []
        files = [(tc.MAIN_FILE, tc.PREFIX[True] + b"int x;")] + checker.headers
        plain = checker.ci.Index.create()
        tu = plain.parse(tc.MAIN_FILE, args=list(tc.CLANG_ARGS), unsaved_files=files,
                         options=checker.ci.TranslationUnit.PARSE_PRECOMPILED_PREAMBLE | 0x100)
        tu.reparse(unsaved_files=files)
        assert os.listdir(tmp_path) != []
        del tu
    finally:
        checker.close()
