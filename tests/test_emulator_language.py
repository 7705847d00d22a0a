"""The MSL that MLX-style kernels are written in, run by the emulator as Apple's compiler would run it: unroll
pragmas, kernel attributes, vector loads through reinterpreted pointers, Metal's constants and functions, mixed
precision simdgroup matrices, padded threadgroup tiles, integer mixes, constant expressions, template kernels,
Metal's name lookup, headers and predefined macros, its type traits and address-space overloads.

Each construct is checked against a result computed in Python, and each must-pass case has a must-fail twin (a
source Metal rejects, or a run the debug build stops), so that an emulator that accepts everything cannot pass.
"""

from __future__ import annotations

import math

import pytest
import torch

from emulator_support import HEADER, assert_refused, build, lane_coordinates, on_devices
from flash_attn_metal.emulator import KernelExecutionError, MSLCompileError, compile_shader, typecheck


@pytest.fixture
def debug_build(monkeypatch):
    monkeypatch.setenv("FLASH_ATTN_METAL_EMULATOR_DEBUG", "1")


# ---- unroll pragmas ----

UNROLL = """
#define UNROLL _Pragma("clang loop unroll(full)")
constant constexpr int N = 4;
template <typename T> METAL_FUNC T dot_n(thread const T* a, thread const T* b) {
  T s = 0;
#pragma clang loop unroll(full)
  for (int k = 0; k < N; ++k) s += a[k] * b[k];
  return s;
}
kernel void unrolled(device const float* x [[buffer(0)]], device float* out [[buffer(1)]],
                     uint i [[thread_position_in_grid]]) {
  float a[N], b[N];
  UNROLL for (int k = 0; k < N; ++k) { a[k] = x[i * N + k]; b[k] = float(k + 1); }
  float s = 0.0f;
#pragma clang loop unroll(full)
  for (short k = 0; k < N; ++k) {
    UNROLL for (int j = 0; j < 2; ++j) s += 0.5f * a[k];
  }
  out[i] = dot_n(a, b) + s;
}
"""


@on_devices
def test_unroll_pragmas_in_kernels_helpers_and_macros(device):
    lib = build(UNROLL, device)
    x = torch.randn(8 * 4, device=device)
    out = torch.empty(8, device=device)
    lib.unrolled(x, out, threads=[8], group_size=[8])
    xs = x.view(8, 4).cpu()
    assert torch.allclose(out.cpu(), xs @ torch.arange(1.0, 5.0) + xs.sum(1), atol=1e-5)


def test_an_unroll_pragma_must_precede_a_loop():
    typecheck(HEADER + UNROLL)
    misplaced = UNROLL.replace("#pragma clang loop unroll(full)\n  for (int k",
                               "#pragma clang loop unroll(full)\n  s = 0;\n  for (int k")
    with pytest.raises(MSLCompileError, match="loop"):
        typecheck(HEADER + misplaced)


# ---- [[max_total_threads_per_threadgroup(N)]] ----

MAX_THREADS = """
constant constexpr int SIMD = 32;
[[max_total_threads_per_threadgroup(2 * SIMD)]]
kernel void capped(device float* out [[buffer(0)]], uint i [[thread_position_in_grid]]) { out[i] = float(i); }

template <typename T, int WM, int WN>
[[kernel, max_total_threads_per_threadgroup(WM * WN * 32)]] void tiled(device T* out [[buffer(0)]],
                                                                       uint i [[thread_position_in_grid]]) {
  out[i] = T(i);
}
template [[host_name("tiled_4x1")]] [[kernel]] decltype(tiled<float, 4, 1>) tiled<float, 4, 1>;
template [[host_name("tiled_2x1")]] [[kernel]] decltype(tiled<half, 2, 1>) tiled<half, 2, 1>;

kernel void uncapped(device float* out [[buffer(0)]], uint i [[thread_position_in_grid]]) { out[i] = 1.0f; }
"""


@on_devices
def test_max_total_threads_is_honoured_in_each_spelling(device):
    lib = build(MAX_THREADS, device)
    assert lib.capped.max_threads_per_threadgroup == 64
    assert lib.tiled_4x1.max_threads_per_threadgroup == 128
    assert lib.tiled_2x1.max_threads_per_threadgroup == 64
    assert lib.uncapped.max_threads_per_threadgroup == 1024
    out = torch.zeros(256, device=device)
    lib.capped(out, threads=[256], group_size=[64])
    assert torch.equal(out.cpu(), torch.arange(256.0))
    lib.tiled_4x1(out, threads=[256], group_size=[128])
    half_out = torch.zeros(128, dtype=torch.float16, device=device)
    lib.tiled_2x1(half_out, threads=[128], group_size=[64])
    assert torch.equal(half_out.cpu(), torch.arange(128.0).half())
    lib.uncapped(out, threads=[256], group_size=[256])
    for kernel, buffer, group in ((lib.capped, out, 128), (lib.tiled_4x1, out, 256), (lib.tiled_2x1, half_out, 128)):
        with pytest.raises(ValueError, match=r"exceeds \d+ limit \(its \[\[max_total_threads_per_threadgroup\]\]\)"):
            kernel(buffer, threads=[128], group_size=[group])


# ---- vector loads and stores through reinterpreted pointers ----

VECTORS = """
kernel void vector_io(device const half* src [[buffer(0)]], device float* dst [[buffer(1)]],
                      device half* packed_out [[buffer(2)]], constant long& shift [[buffer(3)]],
                      uint i [[thread_position_in_grid]]) {
  threadgroup float tile[64];
  half4 h = *reinterpret_cast<device const half4*>(src + 4 * i + shift);
  reinterpret_cast<threadgroup float4*>(tile)[i] = float4(h);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float4 f = reinterpret_cast<threadgroup const float4*>(tile)[15 - i];
  *reinterpret_cast<device float4*>(dst + 4 * i) = f * 2.0f;
  // Packed vectors need only their element's alignment.
  packed_half4 p = *reinterpret_cast<device const packed_half4*>(src + 4 * i + 1);
  *reinterpret_cast<device packed_half4*>(packed_out + 4 * i + 1) = packed_half4(half4(p) + half4(1.0h));
}
kernel void misaligned_threadgroup(device float* dst [[buffer(0)]], constant long& shift [[buffer(1)]],
                                   uint i [[thread_position_in_grid]]) {
  threadgroup float tile[68];
  tile[i] = float(i);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float4 f = *reinterpret_cast<threadgroup const float4*>(&tile[4 * (i % 16) + shift]);
  dst[i] = f.x + f.y + f.z + f.w;
}
"""


def _vector_io(device, shift=0):
    lib = build(VECTORS, device)
    src = torch.randn(70, device=device).half()
    dst = torch.zeros(64, device=device)
    packed = torch.zeros(70, dtype=torch.float16, device=device)
    lib.vector_io(src, dst, packed, shift, threads=[16], group_size=[16])
    return src.cpu(), dst.cpu(), packed.cpu()


@on_devices
def test_vector_loads_and_stores_through_reinterpreted_pointers(device):
    src, dst, packed = _vector_io(device)
    expected = src[:64].float().view(16, 4).flip(0).reshape(64) * 2
    assert torch.equal(dst, expected)
    assert torch.equal(packed[1:65], (src[1:65] + 1).half()) and packed[0] == 0


@on_devices
def test_debug_builds_check_vector_accesses_per_element_and_alignment(device, debug_build):
    _vector_io(device)  # aligned, and inside the buffers
    with pytest.raises(KernelExecutionError, match=r"buffer 0 \(src\): a misaligned 8-byte access at byte \d*[26] "
                                                   r"\(Metal needs 8-byte alignment\)"):
        _vector_io(device, shift=1)
    with pytest.raises(KernelExecutionError, match=r"buffer 0 \(src\): element 17 is out of bounds \(a 8-byte access "
                                                   r"at byte 136; the bound tensor holds 140 bytes\)"):
        _vector_io(device, shift=8)  # the last half4 reaches 4 bytes past the end
    lib = build(VECTORS, device)
    dst = torch.zeros(64, device=device)
    lib.misaligned_threadgroup(dst, 0, threads=[64], group_size=[64])
    assert dst[5].item() == 4 * 4 * 5 + 6
    with pytest.raises(KernelExecutionError, match=r"threadgroup memory: a misaligned 16-byte access at byte \d+ "
                                                   r"\(Metal needs 16-byte alignment\)"):
        lib.misaligned_threadgroup(dst, 1, threads=[64], group_size=[64])


# ---- Metal's constants and functions ----

SCALARS = """
constant constexpr float INF = as_type<float>(0x7f800000u);
static_assert(numeric_limits<float>::max() == FLT_MAX, "numeric_limits is constexpr");
kernel void scalars(device const float* x [[buffer(0)]], device float* out [[buffer(1)]],
                    device uint* bits [[buffer(2)]], uint i [[thread_position_in_grid]],
                    ushort lane [[thread_index_in_simdgroup]]) {
  float v = x[i];
  device float* o = out + i * 16;
  o[0] = INF;
  o[1] = -FLT_MAX;
  o[2] = numeric_limits<float>::max();
  o[3] = float(HALF_MAX);
  o[4] = fast::exp2(v);
  o[5] = precise::exp2(v);
  o[6] = fma(v, 3.0f, -1.0f);
  o[7] = select(-1.0f, 1.0f, v > 0.0f);
  float4 s = select(float4(v), float4(-v), float4(v, -v, 0.0f, 1.0f) > 0.0f);
  o[8] = s.x + 10.0f * s.y + 100.0f * s.w;
  o[9] = float(select(int2(1, 2), int2(3, 4), bool2(true, false)).x * 10 + select(int2(1, 2), int2(3, 4), bool2(false)).y);
  o[10] = simd_shuffle_xor(v, ushort(3));
  o[11] = simd_sum(v);
  o[12] = simd_max(v);
  o[13] = simd_broadcast(v, ushort(7));
  o[14] = simd_prefix_exclusive_sum(v);
  o[15] = float(simd_prefix_exclusive_sum(uint(lane)));
  bits[i] = as_type<uint>(v);
}
"""


@on_devices
def test_metal_constants_bit_casts_and_simd_functions(device):
    lib = build(SCALARS, device)
    x = torch.randn(64, device=device)
    out = torch.empty(64 * 16, device=device)
    bits = torch.empty(64, dtype=torch.int32, device=device)
    lib.scalars(x, out, bits, threads=[64], group_size=[64])
    o, v = out.view(64, 16).cpu(), x.cpu()
    fmax = torch.finfo(torch.float32).max
    assert o[:, 0].eq(math.inf).all() and o[:, 1].eq(-fmax).all() and o[:, 2].eq(fmax).all()
    assert o[:, 3].eq(65504).all()
    assert torch.allclose(o[:, 4], v.exp2(), rtol=1e-5) and torch.allclose(o[:, 5], v.exp2(), rtol=1e-6)
    assert torch.allclose(o[:, 6], v * 3 - 1, atol=1e-6)
    assert torch.equal(o[:, 7], torch.where(v > 0, 1.0, -1.0))
    s = torch.where(torch.stack([v, -v, torch.zeros_like(v), torch.ones_like(v)], 1) > 0, -v[:, None], v[:, None])
    assert torch.allclose(o[:, 8], s[:, 0] + 10 * s[:, 1] + 100 * s[:, 3])
    assert o[:, 9].eq(32).all()
    for g in range(2):
        w = v[32 * g:32 * g + 32]
        lanes = torch.arange(32)
        rows = o[32 * g:32 * g + 32]
        assert torch.equal(rows[:, 10], w[lanes ^ 3])
        assert torch.allclose(rows[:, 11], w.sum().expand(32), atol=1e-5)
        assert rows[:, 12].eq(w.max()).all() and rows[:, 13].eq(w[7]).all()
        assert torch.allclose(rows[:, 14], torch.cumsum(w, 0) - w, atol=1e-5)
        assert torch.equal(rows[:, 15], torch.cumsum(lanes, 0).float() - lanes)
    assert torch.equal(bits.cpu(), v.view(torch.int32))


def test_bit_casts_need_types_of_one_size():
    build(SCALARS, checked=False)
    with pytest.raises(MSLCompileError, match="same size"):
        compile_shader(HEADER + SCALARS.replace("as_type<uint>(v)", "as_type<uint>(half(v))"))


# ---- mixed precision simdgroup matrices ----

MATRICES = """
template <typename T>
kernel void mixed(device const T* a [[buffer(0)]], device const T* b [[buffer(1)]], device float* d [[buffer(2)]],
                  device float* loaded [[buffer(3)]], ushort lane [[thread_index_in_simdgroup]]) {
  threadgroup T tile[8][16 + 8];  // a padded 8x16 tile
  for (ushort k = lane; k < 128; k += 32) tile[k / 16][k % 16] = a[k];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  simdgroup_matrix<T, 8, 8> A, B, Bt, A2;
  simdgroup_float8x8 C = make_filled_simdgroup_matrix<float, 8>(1.0f), D, E;
  simdgroup_load(A, &tile[0][0], 16 + 8);                      // threadgroup, padded rows
  simdgroup_load(A2, &tile[0][0], 16 + 8, ulong2(8, 0));       // columns 8..15
  simdgroup_load(B, b, 8);                                     // device
  simdgroup_load(Bt, b, 8, ulong2(0, 0), true);                // device, transposed
  simdgroup_multiply_accumulate(D, A, B, C);                   // T x T + float -> float
  simdgroup_multiply_accumulate(E, A2, Bt, D);
  simdgroup_store(E, d, 8);
  simdgroup_store(E, &loaded[64 + 8], 16, ulong2(0, 0), true); // device, transposed, an offset pointer
  vec<T, 2> ab = A.thread_elements();
  float2 ef = E.thread_elements();
  loaded[lane * 2] = float(ab.x) + ef.x * 0.0f;
  loaded[lane * 2 + 1] = float(ab.y);
}
template [[host_name("mixed_half")]] [[kernel]] decltype(mixed<half>) mixed<half>;
template [[host_name("mixed_bfloat")]] [[kernel]] decltype(mixed<bfloat>) mixed<bfloat>;
template [[host_name("mixed_float")]] [[kernel]] decltype(mixed<float>) mixed<float>;
"""


@on_devices
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_mixed_precision_multiply_accumulate_and_loads(device, dtype):
    lib = build(MATRICES, device)
    a = torch.randn(8, 16, device=device).to(dtype)
    b = torch.randn(8, 8, device=device).to(dtype)
    d = torch.empty(8, 8, device=device)
    loaded = torch.zeros(64 + 8 + 8 * 16, device=device)
    name = {torch.float16: "half", torch.bfloat16: "bfloat", torch.float32: "float"}[dtype]
    getattr(lib, f"mixed_{name}")(a, b, d, loaded, threads=[32], group_size=[32])
    a64, b64 = a.double().cpu(), b.double().cpu()
    expected = a64[:, :8] @ b64 + 1 + a64[:, 8:] @ b64.T
    assert torch.allclose(d.double().cpu(), expected, atol=1e-4)
    transposed = loaded[64 + 8:].view(8, 16)[:, :8].cpu()
    assert torch.equal(transposed, d.cpu().T)
    lanes = torch.empty(8, 8)
    for lane in range(32):
        r, c = lane_coordinates(lane)
        lanes[r, c], lanes[r, c + 1] = loaded[2 * lane].item(), loaded[2 * lane + 1].item()
    assert torch.equal(lanes, a[:, :8].float().cpu())


def test_a_matrix_loads_from_its_own_element_type_only():
    typecheck(HEADER + MATRICES)
    wrong = MATRICES.replace("simdgroup_load(B, b, 8);", "simdgroup_load(B, d, 8);")
    assert_refused(HEADER + wrong)


# ---- threadgroup tiles with padded rows, and helpers taking threadgroup and device pointers ----

TILES = """
constant constexpr int ROWS = 8;
constant constexpr int COLS = 16;
constant constexpr int PAD = 16 / 2;  // 16 bytes of half

template <typename T>
METAL_FUNC void load_rows(threadgroup T* dst, device const T* src, int ld, ushort tid) {
  for (int k = tid; k < ROWS * COLS; k += 32) dst[(k / COLS) * (COLS + PAD) + k % COLS] = src[(k / COLS) * ld + k % COLS];
}
template <typename T>
METAL_FUNC float row_sum(const threadgroup T* tile, int row) {
  float s = 0.0f;
  for (int c = 0; c < COLS; ++c) s += float(tile[row * (COLS + PAD) + c]);
  return s;
}
kernel void padded(device const half* h [[buffer(0)]], device const bfloat* b [[buffer(1)]],
                   device const float* f [[buffer(2)]], device float* out [[buffer(3)]],
                   ushort tid [[thread_index_in_threadgroup]]) {
  threadgroup half th[ROWS * (COLS + PAD)];
  threadgroup bfloat tb[ROWS][COLS + PAD];
  threadgroup float tf[ROWS * (COLS + PAD)];
  load_rows(th, h, COLS, tid);
  load_rows(&tb[0][0], b, COLS, tid);
  load_rows(tf, f, COLS, tid);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (tid < ROWS) {
    out[tid] = row_sum(th, tid);
    out[ROWS + tid] = row_sum(tb[0], tid);
    out[2 * ROWS + tid] = row_sum(&tf[0], tid);
  }
}
kernel void overrun(device float* out [[buffer(0)]], constant long& extra [[buffer(1)]],
                    ushort tid [[thread_index_in_threadgroup]]) {
  threadgroup float tile[32];
  threadgroup float* p = tile;
  p[tid + extra] = 1.0f;
  out[tid] = 2.0f;
}
"""


@on_devices
def test_padded_threadgroup_tiles_and_pointer_helpers(device):
    lib = build(TILES, device)
    h = torch.randn(8, 16, device=device).half()
    b = torch.randn(8, 16, device=device).bfloat16()
    f = torch.randn(8, 16, device=device)
    out = torch.empty(24, device=device)
    lib.padded(h, b, f, out, threads=[32], group_size=[32])
    expected = torch.cat([h.float().sum(1), b.float().sum(1), f.sum(1)]).cpu()
    assert torch.allclose(out.cpu(), expected, atol=1e-4)
    assert lib.padded.static_thread_group_memory_length == 8 * 24 * 2 + 8 * 24 * 2 + 8 * 24 * 4


@on_devices
def test_debug_builds_bound_threadgroup_accesses(device, debug_build):
    lib = build(TILES, device)
    out = torch.zeros(32, device=device)
    lib.overrun(out, 0, threads=[32], group_size=[32])
    assert out.eq(2).all()
    with pytest.raises(KernelExecutionError, match=r"threadgroup memory: element 32 is out of bounds \(a 4-byte "
                                                   r"access at byte 128; the kernel has 128 bytes\)"):
        lib.overrun(out, 1, threads=[32], group_size=[32])


# ---- integer mixes ----

INTEGERS = """
kernel void integers(device const int* x [[buffer(0)]], device int* out [[buffer(1)]],
                     uint i [[thread_position_in_grid]]) {
  int v = x[i];
  ushort us = ushort(v);
  short s = short(v);
  uint u = uint(v);
  device int* o = out + i * 12;
  o[0] = int(ushort(us + ushort(1)));       // wraps at 65536
  o[1] = us * s;                            // both promote to int
  o[2] = int(u * 3u + uint(s));             // uint arithmetic, wrapping
  o[3] = int(short(s * 2));
  o[4] = int((u >> 3) ^ uint(us));
  uint2 a = uint2(u, u + 5u);
  int2 b = int2(v, -v) / int2(3);
  ushort2 c = ushort2(us, ushort(7)) >> ushort2(1, 2);
  o[5] = int((a % uint2(7u, 11u)).y);
  o[6] = b.x * 100 + b.y;
  o[7] = int(c.x) + int(c.y) * 100000;
  o[8] = int(all(a < uint2(0xffffffffu)) ) + 2 * int(any(b == int2(0)));
  o[9] = select(b, int2(9), bool2(v < 0, v >= 0)).x;
  o[10] = int(ushort2(3, 4).x * uint(v));
  o[11] = int(uint(v) < 5u) + 2 * int(v < 5);
}
"""


def _c_semantics(v: int) -> list[int]:
    def i32(x):
        return (x + 2**31) % 2**32 - 2**31

    def u32(x):
        return x % 2**32

    def trunc_div(a, b):
        return int(a / b)

    us, s, u = v % 65536, (v + 2**15) % 2**16 - 2**15, u32(v)
    a = (u, u32(u + 5))
    b = (trunc_div(v, 3), trunc_div(-v, 3))
    c = (us >> 1, 7 >> 2)
    return [(us + 1) % 65536, i32(us * s), i32(u32(u * 3 + u32(s))), (s * 2 + 2**15) % 2**16 - 2**15,
            i32((u >> 3) ^ us), a[1] % 11, i32(b[0] * 100 + b[1]), c[0] + c[1] * 100000,
            int(a[0] < 2**32 - 1 and a[1] < 2**32 - 1) + 2 * int(0 in b), 9 if v < 0 else b[0],
            i32(u32(3 * u)), int(u < 5) + 2 * int(v < 5)]


@on_devices
def test_integer_mixes_follow_cs_conversions(device):
    lib = build(INTEGERS, device)
    values = [0, 1, -1, 7, -7, 65535, 65536, -65537, 2**31 - 1, -(2**31) + 1, 123456789, -40000]
    x = torch.tensor(values, dtype=torch.int32, device=device)
    out = torch.empty(len(values) * 12, dtype=torch.int32, device=device)
    lib.integers(x, out, threads=[len(values)], group_size=[len(values)])
    got = out.view(-1, 12).cpu().tolist()
    for v, row in zip(values, got):
        assert row == _c_semantics(v), v


def test_vectors_of_different_element_types_do_not_mix():
    build(INTEGERS, checked=True)
    mixed = INTEGERS.replace("o[5] = int((a % uint2(7u, 11u)).y);", "o[5] = int((a + b).y);")
    assert_refused(HEADER + mixed)


# ---- constant expressions ----

CONSTANTS = """
constant constexpr int BLOCK = 16;
static constexpr constant int HALF_BLOCK = BLOCK / 2;
constant constexpr half H = 1.5h;
constant constexpr bfloat B = bfloat(2.5f);
constexpr int twice(int x) { return 2 * x; }
static_assert(twice(HALF_BLOCK) == BLOCK, "constexpr functions at program scope");
static_assert(float(H) * 2.0f == 3.0f && float(B) == 2.5f, "half and bfloat are literal types");
kernel void constants(device float* out [[buffer(0)]], uint i [[thread_position_in_grid]]) {
  constexpr int local = twice(BLOCK) + HALF_BLOCK;
  constexpr half h = H * H;
  static_assert(local == 40, "constexpr locals");
  threadgroup float scratch[local];
  scratch[i] = float(local);
  out[i] = scratch[i] + float(h) + float(B);
}
"""


@on_devices
def test_constexpr_program_constants_locals_and_static_asserts(device):
    lib = build(CONSTANTS, device)
    out = torch.empty(8, device=device)
    lib.constants(out, threads=[8], group_size=[8])
    assert out.eq(40 + 2.25 + 2.5).all()
    assert lib.constants.static_thread_group_memory_length == 40 * 4


def test_a_failing_static_assert_does_not_compile():
    bad = CONSTANTS.replace('static_assert(local == 40', 'static_assert(local == 41')
    assert_refused(HEADER + bad, match="constexpr locals")
