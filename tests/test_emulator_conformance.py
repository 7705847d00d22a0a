"""Conformance of the Metal emulator: small MSL kernels checked against results computed in Python.

Each kernel exercises one construct of the issue's list; the negative controls show that a broken
emulator (a missing barrier, a wrong lane layout) would be caught.
"""

from __future__ import annotations

import math

import pytest
import torch

from emulator_support import DEVICES, lane_coordinates
from flash_attn_metal.emulator import compile_shader

pytestmark = pytest.mark.parametrize("device", DEVICES)

HEADER = "#include <metal_stdlib>\nusing namespace metal;\n"


def build(device: str, body: str):
    return compile_shader(HEADER + body, device)


# ---- binding, grid, attributes ----

BINDING = """
kernel void fill(device float* out, constant float& value, uint i [[thread_position_in_grid]]) { out[i] = value; }
kernel void affine(device const float* x [[buffer(0)]], device float* y [[buffer(1)]],
                   constant long& n [[buffer(2)]], constant float* coef [[buffer(3)]],
                   constant long* offsets [[buffer(4)]], uint i [[thread_position_in_grid]]) {
  if (i < uint(n)) y[i] = coef[0] * x[i] + coef[1] + float(offsets[i % 2]);
}
kernel void where_am_i(device uint* out [[buffer(0)]],
                       uint3 tpig [[thread_position_in_grid]], uint2 tgpig [[threadgroup_position_in_grid]],
                       ushort3 tptg [[thread_position_in_threadgroup]], uint tiitg [[thread_index_in_threadgroup]],
                       uint3 tptg_size [[threads_per_threadgroup]], uint3 groups [[threadgroups_per_grid]],
                       uint2 grid [[threads_per_grid]], ushort sg [[simdgroup_index_in_threadgroup]],
                       ushort lane [[thread_index_in_simdgroup]], uint sgs [[simdgroups_per_threadgroup]]) {
  uint idx = tpig.y * grid.x + tpig.x;
  device uint* o = out + idx * 12;
  o[0] = tpig.x; o[1] = tpig.y; o[2] = tgpig.x; o[3] = tgpig.y; o[4] = tptg.x; o[5] = tptg.y;
  o[6] = tiitg; o[7] = tptg_size.x * tptg_size.y; o[8] = groups.x * 100 + groups.y; o[9] = sg; o[10] = lane; o[11] = sgs;
}
"""


def test_scalar_and_list_arguments_bind_in_order(device):
    lib = build(device, BINDING)
    out = torch.zeros(5, device=device)
    lib.fill(out, 2.5)  # threads default to the first tensor's numel
    assert out.tolist() == [2.5] * 5
    x = torch.arange(10, dtype=torch.float32, device=device)
    y = torch.full((12,), -1.0, device=device)
    lib.affine(x, y, 10, [2.0, 1.0], [0, 100], threads=[12], group_size=[4])
    expected = [2.0 * i + 1.0 + (0 if i % 2 == 0 else 100) for i in range(10)] + [-1.0, -1.0]
    assert y.tolist() == expected


def test_tensor_binds_at_its_storage_offset(device):
    lib = build(device, BINDING)
    base = torch.zeros(8, device=device)
    lib.fill(base[3:6], 7.0)
    assert base.tolist() == [0, 0, 0, 7, 7, 7, 0, 0]


def test_attributes_and_non_uniform_threadgroups(device):
    lib = build(device, BINDING)
    grid_x, grid_y, gx, gy = 37, 3, 16, 2
    out = torch.zeros(grid_x * grid_y * 12, dtype=torch.int32, device=device)
    lib.where_am_i(out, threads=[grid_x, grid_y], group_size=[gx, gy])
    rows = out.view(grid_y, grid_x, 12).cpu()
    groups = (math.ceil(grid_x / gx), math.ceil(grid_y / gy))
    for y in range(grid_y):
        for x in range(grid_x):
            tgx, tgy = x // gx, y // gy
            # Edge threadgroups are partial: threads past the grid do not exist.
            size_x, size_y = min(gx, grid_x - tgx * gx), min(gy, grid_y - tgy * gy)
            lx, ly = x - tgx * gx, y - tgy * gy
            index = ly * size_x + lx
            simdgroups = math.ceil(size_x * size_y / 32)
            assert rows[y, x].tolist() == [x, y, tgx, tgy, lx, ly, index, size_x * size_y,
                                           groups[0] * 100 + groups[1], index // 32, index % 32, simdgroups]


# ---- threadgroup memory and barriers ----

BARRIERS = """
kernel void reverse(device const float* x [[buffer(0)]], device float* y [[buffer(1)]],
                    uint tid [[thread_index_in_threadgroup]], uint gid [[threadgroup_position_in_grid]]) {
  threadgroup float tile[64];
  tile[tid] = x[gid * 64 + tid];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  y[gid * 64 + tid] = tile[63 - tid];
}
kernel void reverse_without_barrier(device const float* x [[buffer(0)]], device float* y [[buffer(1)]],
                                    uint tid [[thread_index_in_threadgroup]], uint gid [[threadgroup_position_in_grid]]) {
  threadgroup float tile[64];
  tile[tid] = x[gid * 64 + tid];
  y[gid * 64 + tid] = tile[63 - tid];
}
kernel void uninitialized(device float* y [[buffer(0)]], uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float scratch[32];
  threadgroup int counts[4];
  y[tid] = scratch[tid];
  if (tid < 4) y[32 + tid] = float(counts[tid]);
}
"""


def test_barrier_orders_threadgroup_memory(device):
    lib = build(device, BARRIERS)
    x = torch.randn(128, device=device)
    y = torch.empty_like(x)
    lib.reverse(x, y, threads=[128], group_size=[64])
    assert torch.equal(y.view(2, 64), x.view(2, 64).flip(1))


def test_removed_barrier_is_caught(device):
    """Negative control: without the barrier, later threads' slots are still garbage when read. On the CPU this
    holds in every threadgroup; on a GPU the race is real, so many threadgroups make losing it certain enough."""
    groups = 512
    lib = build(device, BARRIERS)
    x = torch.randn(groups * 64, device=device)
    y = torch.empty_like(x)
    lib.reverse_without_barrier(x, y, threads=[groups * 64], group_size=[64])
    assert not torch.equal(y.view(groups, 64), x.view(groups, 64).flip(1))
    if device == "cpu":  # fibers run in order: every read of a slot not yet written sees the NaN fill
        assert torch.isnan(y.view(groups, 64)[:, :32]).all()


def test_threadgroup_memory_starts_as_garbage(device):
    lib = build(device, BARRIERS)
    y = torch.zeros(36, device=device)
    lib.uninitialized(y, threads=[32], group_size=[32])
    assert torch.isnan(y[:32]).all()  # never zero: all-ones bytes are NaN
    assert (y[32:] == -1).all()


# ---- SIMD-group functions ----

SIMD = """
kernel void collectives(device const float* x [[buffer(0)]], device float* out [[buffer(1)]],
                        ushort lane [[thread_index_in_simdgroup]], uint i [[thread_position_in_grid]]) {
  float v = x[i];
  device float* o = out + i * 12;
  o[0] = simd_sum(v);
  o[1] = simd_max(v);
  o[2] = simd_min(v);
  o[3] = simd_prefix_inclusive_sum(v);
  o[4] = simd_prefix_exclusive_sum(v);
  o[5] = simd_shuffle(v, ushort((lane * 7) % 32));
  o[6] = simd_shuffle_xor(v, ushort(5));
  o[7] = simd_shuffle_up(v, ushort(3));
  o[8] = simd_shuffle_down(v, ushort(2));
  o[9] = simd_broadcast(v, ushort(9));
  o[10] = float(simd_ballot(v > 0.0f).operator ulong());
  o[11] = float(simd_all(v > -100.0f)) + 2.0f * float(simd_any(v > 100.0f));
}
kernel void half_sum(device const half* x [[buffer(0)]], device half* out [[buffer(1)]],
                     uint i [[thread_position_in_grid]]) {
  out[i] = simd_sum(x[i]);
}
"""


def test_simd_collectives(device):
    lib = build(device, SIMD)
    x = torch.randn(64, device=device)
    out = torch.empty(64 * 12, device=device)
    lib.collectives(x, out, threads=[64], group_size=[64])
    out, xs = out.view(2, 32, 12).cpu(), x.view(2, 32).cpu()
    for g in range(2):
        v = xs[g]
        for lane in range(32):
            row = out[g, lane]
            ballot = sum(1 << j for j in range(32) if v[j] > 0)
            expected = [
                v.sum(), v.max(), v.min(), v[: lane + 1].sum(), v[:lane].sum(),
                v[(lane * 7) % 32], v[lane ^ 5], v[lane - 3] if lane >= 3 else v[lane],
                v[lane + 2] if lane + 2 < 32 else v[lane], v[9], float(ballot), 1.0,
            ]
            assert torch.allclose(row, torch.tensor(expected, dtype=torch.float32), atol=1e-5), (g, lane)


def test_simd_width_is_32_in_half(device):
    lib = build(device, SIMD)
    x = torch.ones(64, dtype=torch.float16, device=device)
    out = torch.empty_like(x)
    lib.half_sum(x, out, threads=[64], group_size=[64])
    assert (out == 32).all()


# ---- simdgroup_matrix ----

MATRIX = """
kernel void layout(device float* out [[buffer(0)]], ushort lane [[thread_index_in_simdgroup]]) {
  simdgroup_float8x8 m;
  m.thread_elements() = float2(float(lane * 2), float(lane * 2 + 1));
  simdgroup_store(m, out, 8);
}
kernel void mma(device const half* a [[buffer(0)]], device const half* b [[buffer(1)]],
                device const float* c [[buffer(2)]], device float* d [[buffer(3)]],
                device float* d_transposed_b [[buffer(4)]], device half* d_half [[buffer(5)]]) {
  simdgroup_half8x8 A, B, Bt;
  simdgroup_float8x8 C, D;
  simdgroup_load(A, a, 16, ulong2(8, 0));          // columns 8..15 of a 8x16 matrix
  simdgroup_load(B, b, 8);
  simdgroup_load(Bt, b, 8, ulong2(0, 0), true);
  simdgroup_load(C, c, 8);
  simdgroup_multiply_accumulate(D, A, B, C);        // half inputs, float accumulator
  simdgroup_store(D, d, 8);
  simdgroup_multiply(D, A, Bt);
  simdgroup_store(D, d_transposed_b, 8);
  simdgroup_half8x8 H = A * B;
  simdgroup_store(H, d_half, 8);
}
kernel void staged(device const float* a [[buffer(0)]], device float* out [[buffer(1)]],
                   ushort tid [[thread_index_in_threadgroup]], ushort sg [[simdgroup_index_in_threadgroup]]) {
  threadgroup float tile[2][64];
  tile[0][tid] = a[tid];
  tile[1][tid] = a[64 + tid];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  simdgroup_float8x8 M = simdgroup_float8x8(2.0f);  // diagonal
  simdgroup_float8x8 X, Y;
  simdgroup_load(X, &tile[1 - sg][0], 8);
  simdgroup_multiply(Y, X, M);
  Y = Y * simdgroup_float8x8(1.0f);
  simdgroup_store(Y, &tile[1 - sg][0], 8);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[tid] = tile[0][tid];
  out[64 + tid] = tile[1][tid];
}
"""


def test_thread_elements_follow_apples_lane_layout(device):
    lib = build(device, MATRIX)
    out = torch.empty(64, device=device)
    lib.layout(out, threads=[32], group_size=[32])
    expected = torch.empty(8, 8)
    for lane in range(32):
        r, c = lane_coordinates(lane)
        expected[r, c], expected[r, c + 1] = 2 * lane, 2 * lane + 1
    assert torch.equal(out.view(8, 8).cpu(), expected)


def test_wrong_lane_layout_is_detected(device):
    """Negative control: the row-major layout a naive emulator might use does not match."""
    lib = build(device, MATRIX)
    out = torch.empty(64, device=device)
    lib.layout(out, threads=[32], group_size=[32])
    assert not torch.equal(out.cpu(), torch.arange(64, dtype=torch.float32))


def test_multiply_accumulate_mixed_types_and_transpose(device):
    lib = build(device, MATRIX)
    a = torch.randn(8, 16, device=device).half()
    b = torch.randn(8, 8, device=device).half()
    c = torch.randn(8, 8, device=device)
    d, dt = torch.empty(8, 8, device=device), torch.empty(8, 8, device=device)
    dh = torch.empty(8, 8, dtype=torch.float16, device=device)
    lib.mma(a, b, c, d, dt, dh, threads=[32], group_size=[32])
    a8, b8 = a[:, 8:].float().cpu(), b.float().cpu()
    assert torch.allclose(d.cpu(), a8 @ b8 + c.cpu(), atol=1e-5)
    assert torch.allclose(dt.cpu(), a8 @ b8.T, atol=1e-5)
    assert torch.allclose(dh.float().cpu(), (a8 @ b8).half().float(), atol=1e-2)


def test_threadgroup_matrices_and_diagonal_constructor(device):
    lib = build(device, MATRIX)
    a = torch.randn(128, device=device)
    out = torch.empty_like(a)
    lib.staged(a, out, threads=[64], group_size=[64])
    assert torch.allclose(out.cpu(), 2 * a.cpu(), atol=1e-6)


# ---- scalars, vectors and math ----

TYPES = """
struct Pair { float x; float scale; };
struct Affine { float a; float b; };
kernel void apply(device float* y [[buffer(0)]], constant Affine& f [[buffer(1)]], uint i [[thread_position_in_grid]]) {
  y[i] = f.a * y[i] + f.b;
}
constant float OFFSET = 0.25f;
#define TWICE(v) ((v) * 2.0h)
template <typename T> inline T square(T v) { return v * v; }
inline void bump(thread float& acc, const device float* src, threadgroup float* shared, uint i) {
  acc += src[i] + shared[0];
}
kernel void types(device const float* x [[buffer(0)]], device float* out [[buffer(1)]],
                  device half* h_out [[buffer(2)]], device bfloat* b_out [[buffer(3)]],
                  uint i [[thread_position_in_grid]]) {
  threadgroup float shared[1];
  if (i == 0) shared[0] = 1.0f;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float v = x[i];
  half h = half(v);
  bfloat b = bfloat(v);
  float4 f4 = float4(v, 1.0f, 2.0f, 3.0f);
  half4 h4 = half4(f4);
  float2 sw = f4.yx + float2(f4.zw);
  f4.xy = sw;
  Pair p = {v, 3.0f};
  float acc = 0.0f;
  bump(acc, x, shared, i);
  device float* o = out + i * 8;
  o[0] = float(h) + float(b);
  o[1] = dot(float4(h4), float4(1.0f));
  o[2] = f4.x + f4.y * 10.0f;
  o[3] = p.x * p.scale + OFFSET;
  o[4] = acc;
  o[5] = square(v) + float(TWICE(half(1.0f)));
  o[6] = clamp(v, -0.5f, 0.5f) + select(0.0f, 1.0f, v > 0.0f);
  o[7] = fma(v, 2.0f, 1.0f) + abs(-v) + floor(v) + ceil(v);
  h_out[i] = h * h + h;       // 16-bit arithmetic rounds after every operation
  b_out[i] = b * b + b;
}
kernel void math(device const float* x [[buffer(0)]], device float* out [[buffer(1)]], uint i [[thread_position_in_grid]]) {
  float v = x[i];
  device float* o = out + i * 10;
  o[0] = exp(v); o[1] = exp2(v); o[2] = log(fabs(v) + 1.0f); o[3] = log2(fabs(v) + 1.0f);
  o[4] = sqrt(fabs(v)); o[5] = rsqrt(fabs(v) + 1.0f); o[6] = tanh(v); o[7] = fast::exp2(v);
  o[8] = max(v, 0.0f) + min(v, 0.0f) + float(isnan(v / 0.0f * 0.0f)) + float(isinf(v / 0.0f));
  o[9] = precise::exp(v) + metal::numeric_limits<float>::max() * 0.0f + float(as_type<uint>(1.0f) == 0x3f800000u);
}
"""


def test_scalar_vector_conversions_and_helpers(device):
    lib = build(device, TYPES)
    x = torch.tensor([0.1, -1.7, 2.3333, 1000.5, -0.0, 3.0, 65504.0, 1e-6], device=device)
    n = x.numel()
    out = torch.empty(n * 8, device=device)
    h_out = torch.empty(n, dtype=torch.float16, device=device)
    b_out = torch.empty(n, dtype=torch.bfloat16, device=device)
    lib.types(x, out, h_out, b_out, threads=[n], group_size=[n])
    o, xc = out.view(n, 8).cpu(), x.cpu()
    h, b = xc.half(), xc.bfloat16()
    assert torch.equal(o[:, 0], h.float() + b.float())
    assert torch.allclose(o[:, 1], h.float() + 6.0)
    assert torch.equal(o[:, 2], 3.0 + (xc + 3.0) * 10.0)  # f4.xy = f4.yx + f4.zw
    assert torch.equal(o[:, 3], xc * 3 + 0.25)
    assert torch.equal(o[:, 4], xc + 1.0)
    assert torch.allclose(o[:, 5], xc * xc + 2.0)
    assert torch.equal(o[:, 6], xc.clamp(-0.5, 0.5) + (xc > 0).float())
    assert torch.allclose(o[:, 7], xc * 2 + 1 + xc.abs() + xc.floor() + xc.ceil())
    assert torch.equal(h_out.cpu(), ((h * h).half() + h).half())  # torch rounds fp16 ops the same way
    assert torch.equal(b_out.cpu(), (b * b) + b)


def test_struct_buffer_binds_by_reference(device):
    lib = build(device, TYPES)
    y = torch.ones(4, device=device)
    lib.apply(y, torch.tensor([3.0, 0.5], device=device))
    assert y.tolist() == [3.5] * 4


def test_math_functions(device):
    lib = build(device, TYPES)
    x = torch.linspace(-3, 3, 13, device=device)
    out = torch.empty(13 * 10, device=device)
    lib.math(x, out, threads=[13], group_size=[13])
    o, v = out.view(13, 10).cpu(), x.cpu()
    expected = torch.stack([
        v.exp(), v.exp2(), (v.abs() + 1).log(), (v.abs() + 1).log2(), v.abs().sqrt(), (v.abs() + 1).rsqrt(),
        v.tanh(), v.exp2(), v.clamp(min=0) + v.clamp(max=0) + 1.0 + (v != 0).float(), v.exp() + 1.0,
    ], dim=1)
    assert torch.allclose(o, expected, rtol=1e-5, atol=1e-6)


# ---- atomics ----

ATOMICS = """
kernel void count(device atomic_int* total [[buffer(0)]], device atomic_float* fsum [[buffer(1)]],
                  device int* per_group [[buffer(2)]], uint tid [[thread_index_in_threadgroup]],
                  uint gid [[threadgroup_position_in_grid]]) {
  threadgroup atomic_uint local;
  if (tid == 0) atomic_store_explicit(&local, 0u, memory_order_relaxed);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  atomic_fetch_add_explicit(&local, 2u, memory_order_relaxed);
  atomic_fetch_add_explicit(total, 1, memory_order_relaxed);
  atomic_fetch_add_explicit(fsum, 0.5f, memory_order_relaxed);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (tid == 0) per_group[gid] = int(atomic_load_explicit(&local, memory_order_relaxed));
}
"""


def test_atomics_on_device_and_threadgroup_memory(device):
    lib = build(device, ATOMICS)
    total = torch.zeros(1, dtype=torch.int32, device=device)
    fsum = torch.zeros(1, device=device)
    per_group = torch.zeros(5, dtype=torch.int32, device=device)
    lib.count(total, fsum, per_group, threads=[5 * 64 - 10], group_size=[64])
    assert total.item() == 310 and fsum.item() == 155.0
    assert per_group.tolist() == [128, 128, 128, 128, 108]
