"""The emulator's conformance kernels: small MSL kernels, each exercising one construct, with the results Metal's
semantics give computed in Python.

    outputs, expected = run(case, device)    # device: "cpu" or "cuda" (the emulator), or "mps" (a real GPU)
    failures(outputs, expected, device)      # [] when every output matches what Metal specifies
    differences(gpu, emulated, expected)     # [] when the GPU and the emulator agree

tests/test_emulator_conformance.py runs every case in the emulator; `selftest` on a Mac runs them through
`torch.mps.compile_shader` as well and compares the GPU with the emulator. Inputs come from seeded CPU
generators, so every device sees the same values. Negative controls (a removed barrier, a wrong lane layout)
expect an output to differ from the correct one; checks of what Metal leaves undefined (the emulator's
NaN-filled threadgroup memory, a race's outcome) apply to the emulator only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

HEADER = "#include <metal_stdlib>\nusing namespace metal;\n"
EMULATOR = ("cpu", "cuda")
EVERYWHERE = ("cpu", "cuda", "mps")


def lane_coordinates(lane: int) -> tuple[int, int]:
    """(row, first column) of the two elements lane `lane` holds in an 8x8 simdgroup_matrix (Apple's layout)."""
    return 4 * (lane // 16) + (lane // 2) % 4, 4 * ((lane // 8) % 2) + 2 * (lane % 2)


@dataclass(frozen=True)
class Expect:
    """What one output must be: `value` within atol + rtol * |value| (exactly, with both 0); with `differs`, a
    negative control: anything but `value`. Checked on `devices` only."""

    value: torch.Tensor
    atol: float = 0.0
    rtol: float = 0.0
    equal_nan: bool = False
    differs: bool = False
    devices: tuple[str, ...] = EVERYWHERE

    def matches(self, output: torch.Tensor) -> bool:
        same = output.shape == self.value.shape and torch.allclose(
            output.double(), self.value.double(), rtol=self.rtol, atol=self.atol, equal_nan=self.equal_nan)
        return same != self.differs


Outputs = dict[str, torch.Tensor]
Expected = dict[str, Expect]


@dataclass(frozen=True)
class Case:
    name: str
    source: str  # the MSL, header included
    launch: Callable[[Any, str], tuple[Outputs, Expected]]  # (library, device) -> (outputs on the CPU, expected)


def run(case: Case, device: str, library: Any = None) -> tuple[Outputs, Expected]:
    """Compile the case for `device` (unless `library` is given) and launch it."""
    if library is None:
        if device == "mps":
            library = torch.mps.compile_shader(case.source)
        else:
            from ..emulator import compile_shader

            library = compile_shader(case.source, device)
    outputs, expected = case.launch(library, device)
    return {name: t.cpu() for name, t in outputs.items()}, expected


def failures(outputs: Outputs, expected: Expected, device: str) -> list[str]:
    """The outputs that do not match what Metal specifies on `device`, described."""
    return [_describe(name, outputs[name], e) for name, e in expected.items()
            if device in e.devices and not e.matches(outputs[name])]


def differences(gpu: Outputs, emulated: Outputs, expected: Expected) -> list[str]:
    """The outputs (those Metal defines on a GPU) where the GPU and the emulator disagree beyond twice the
    expectation's tolerance."""
    found = []
    for name, e in expected.items():
        if "mps" not in e.devices or e.differs:
            continue
        agree = Expect(emulated[name], 2 * e.atol, 2 * e.rtol, e.equal_nan)
        if not agree.matches(gpu[name]):
            found.append(_describe(name, gpu[name], agree).replace("expected", "the emulator gave"))
    return found


def _describe(name: str, output: torch.Tensor, e: Expect) -> str:
    if e.differs:
        return f"{name}: matches the value a broken emulator would give"
    if output.shape != e.value.shape:
        return f"{name}: shape {tuple(output.shape)}, expected {tuple(e.value.shape)}"
    gap = (output.double() - e.value.double()).abs()
    index = int(torch.nan_to_num(gap, nan=math.inf).flatten().argmax())
    return (f"{name}: element {index} is {output.flatten()[index].item()!r}, expected "
            f"{e.value.flatten()[index].item()!r} (atol {e.atol}, rtol {e.rtol})")


def _randn(*shape: int, seed: int, device: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


CASES: list[Case] = []


def case(source: str) -> Callable[[Callable], Callable]:
    """Register the decorated launch function as a case of that MSL, named after the function."""
    def register(launch: Callable) -> Callable:
        CASES.append(Case(launch.__name__, HEADER + source, launch))
        return launch

    return register


def named(name: str) -> Case:
    return next(c for c in CASES if c.name == name)


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


@case(BINDING)
def scalar_and_list_arguments(lib: Any, device: str) -> tuple[Outputs, Expected]:
    filled = torch.zeros(5, device=device)
    lib.fill(filled, 2.5)  # threads default to the first tensor's numel
    x = torch.arange(10, dtype=torch.float32, device=device)
    y = torch.full((12,), -1.0, device=device)
    lib.affine(x, y, 10, [2.0, 1.0], [0, 100], threads=[12], group_size=[4])
    affine = [2.0 * i + 1.0 + (0 if i % 2 == 0 else 100) for i in range(10)] + [-1.0, -1.0]
    return {"fill": filled, "affine": y}, {"fill": Expect(torch.full((5,), 2.5)), "affine": Expect(torch.tensor(affine))}


@case(BINDING)
def storage_offset(lib: Any, device: str) -> tuple[Outputs, Expected]:
    base = torch.zeros(8, device=device)
    lib.fill(base[3:6], 7.0)
    return {"base": base}, {"base": Expect(torch.tensor([0, 0, 0, 7, 7, 7, 0, 0], dtype=torch.float32))}


@case(BINDING)
def non_uniform_threadgroups(lib: Any, device: str) -> tuple[Outputs, Expected]:
    grid_x, grid_y, gx, gy = 37, 3, 16, 2
    out = torch.zeros(grid_x * grid_y * 12, dtype=torch.int32, device=device)
    lib.where_am_i(out, threads=[grid_x, grid_y], group_size=[gx, gy])
    groups = (math.ceil(grid_x / gx), math.ceil(grid_y / gy))
    expected = torch.empty(grid_y, grid_x, 12, dtype=torch.int32)
    for y in range(grid_y):
        for x in range(grid_x):
            tgx, tgy = x // gx, y // gy
            # Edge threadgroups are partial: threads past the grid do not exist.
            size_x, size_y = min(gx, grid_x - tgx * gx), min(gy, grid_y - tgy * gy)
            lx, ly = x - tgx * gx, y - tgy * gy
            index = ly * size_x + lx
            simdgroups = math.ceil(size_x * size_y / 32)
            expected[y, x] = torch.tensor([x, y, tgx, tgy, lx, ly, index, size_x * size_y, groups[0] * 100 + groups[1],
                                           index // 32, index % 32, simdgroups])
    return {"attributes": out.view(grid_y, grid_x, 12)}, {"attributes": Expect(expected)}


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


@case(BARRIERS)
def barrier(lib: Any, device: str) -> tuple[Outputs, Expected]:
    x = _randn(128, seed=0, device=device)
    y = torch.empty_like(x)
    lib.reverse(x, y, threads=[128], group_size=[64])
    return {"reversed": y}, {"reversed": Expect(x.cpu().view(2, 64).flip(1).reshape(128))}


@case(BARRIERS)
def removed_barrier(lib: Any, device: str) -> tuple[Outputs, Expected]:
    """Negative control: without the barrier, later threads' slots are still garbage when read. On the CPU this
    holds in every threadgroup; on a GPU the race is real, so many threadgroups make losing it certain enough."""
    groups = 512
    x = _randn(groups * 64, seed=0, device=device)
    y = torch.empty_like(x)
    lib.reverse_without_barrier(x, y, threads=[groups * 64], group_size=[64])
    y = y.view(groups, 64)
    # The CPU emulator's fibers run in order: every read of a slot not yet written sees the NaN fill.
    return {"reversed": y, "first half": y[:, :32]}, {
        "reversed": Expect(x.cpu().view(groups, 64).flip(1), differs=True, devices=EMULATOR),
        "first half": Expect(torch.full((groups, 32), math.nan), equal_nan=True, devices=("cpu",))}


@case(BARRIERS)
def threadgroup_memory_starts_as_garbage(lib: Any, device: str) -> tuple[Outputs, Expected]:
    y = torch.zeros(36, device=device)
    lib.uninitialized(y, threads=[32], group_size=[32])
    # Never zero: all-ones bytes, NaN as a float and -1 as an int. A GPU leaves the contents undefined.
    return {"float": y[:32], "int": y[32:]}, {
        "float": Expect(torch.full((32,), math.nan), equal_nan=True, devices=EMULATOR),
        "int": Expect(torch.full((4,), -1.0), devices=EMULATOR)}


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


@case(SIMD)
def simd_collectives(lib: Any, device: str) -> tuple[Outputs, Expected]:
    x = _randn(64, seed=0, device=device)
    out = torch.empty(64 * 12, device=device)
    lib.collectives(x, out, threads=[64], group_size=[64])
    xs = x.cpu().view(2, 32)
    expected = torch.empty(2, 32, 12)
    for g in range(2):
        v = xs[g]
        ballot = sum(1 << j for j in range(32) if v[j] > 0)
        for lane in range(32):
            expected[g, lane] = torch.tensor([
                v.sum(), v.max(), v.min(), v[: lane + 1].sum(), v[:lane].sum(),
                v[(lane * 7) % 32], v[lane ^ 5], v[lane - 3] if lane >= 3 else v[lane],
                v[lane + 2] if lane + 2 < 32 else v[lane], v[9], float(ballot), 1.0,
            ])
    return {"collectives": out.view(2, 32, 12)}, {"collectives": Expect(expected, atol=1e-5, rtol=1e-5)}


@case(SIMD)
def simd_width_is_32_in_half(lib: Any, device: str) -> tuple[Outputs, Expected]:
    x = torch.ones(64, dtype=torch.float16, device=device)
    out = torch.empty_like(x)
    lib.half_sum(x, out, threads=[64], group_size=[64])
    return {"sums": out}, {"sums": Expect(torch.full((64,), 32.0, dtype=torch.float16))}


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


def _lane_layout() -> torch.Tensor:
    expected = torch.empty(8, 8)
    for lane in range(32):
        r, c = lane_coordinates(lane)
        expected[r, c], expected[r, c + 1] = 2 * lane, 2 * lane + 1
    return expected


@case(MATRIX)
def lane_layout(lib: Any, device: str) -> tuple[Outputs, Expected]:
    out = torch.empty(64, device=device)
    lib.layout(out, threads=[32], group_size=[32])
    # The negative control: the row-major layout a naive emulator might use does not match.
    return {"layout": out.view(8, 8), "flat": out}, {
        "layout": Expect(_lane_layout()), "flat": Expect(torch.arange(64, dtype=torch.float32), differs=True)}


@case(MATRIX)
def multiply_accumulate(lib: Any, device: str) -> tuple[Outputs, Expected]:
    a = _randn(8, 16, seed=0, device=device, dtype=torch.float16)
    b = _randn(8, 8, seed=1, device=device, dtype=torch.float16)
    c = _randn(8, 8, seed=2, device=device)
    d, dt = torch.empty(8, 8, device=device), torch.empty(8, 8, device=device)
    dh = torch.empty(8, 8, dtype=torch.float16, device=device)
    lib.mma(a, b, c, d, dt, dh, threads=[32], group_size=[32])
    a8, b8 = a[:, 8:].float().cpu(), b.float().cpu()
    return {"a b + c": d, "a b^T": dt, "a b (half)": dh}, {
        "a b + c": Expect(a8 @ b8 + c.cpu(), atol=1e-5, rtol=1e-5),
        "a b^T": Expect(a8 @ b8.T, atol=1e-5, rtol=1e-5),
        "a b (half)": Expect((a8 @ b8).half(), atol=1e-2, rtol=1e-5)}


@case(MATRIX)
def threadgroup_matrices(lib: Any, device: str) -> tuple[Outputs, Expected]:
    a = _randn(128, seed=0, device=device)
    out = torch.empty_like(a)
    lib.staged(a, out, threads=[64], group_size=[64])
    return {"2a": out}, {"2a": Expect(2 * a.cpu(), atol=1e-6, rtol=1e-5)}


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

CLOSE = dict(rtol=1e-5, atol=1e-8)  # torch.allclose's defaults


@case(TYPES)
def scalar_vector_conversions(lib: Any, device: str) -> tuple[Outputs, Expected]:
    x = torch.tensor([0.1, -1.7, 2.3333, 1000.5, -0.0, 3.0, 65504.0, 1e-6], device=device)
    n = x.numel()
    out = torch.empty(n * 8, device=device)
    h_out = torch.empty(n, dtype=torch.float16, device=device)
    b_out = torch.empty(n, dtype=torch.bfloat16, device=device)
    lib.types(x, out, h_out, b_out, threads=[n], group_size=[n])
    o, xc = out.view(n, 8), x.cpu()
    h, b = xc.half(), xc.bfloat16()
    columns = {
        "half + bfloat conversions": Expect(h.float() + b.float()),
        "dot of half4": Expect(h.float() + 6.0, **CLOSE),
        "swizzles": Expect(3.0 + (xc + 3.0) * 10.0),  # f4.xy = f4.yx + f4.zw
        "struct and constant": Expect(xc * 3 + 0.25),
        "threadgroup pointer argument": Expect(xc + 1.0),
        "template and macro": Expect(xc * xc + 2.0, **CLOSE),
        "clamp and select": Expect(xc.clamp(-0.5, 0.5) + (xc > 0).float()),
        "fma abs floor ceil": Expect(xc * 2 + 1 + xc.abs() + xc.floor() + xc.ceil(), **CLOSE),
    }
    outputs = {name: o[:, i] for i, name in enumerate(columns)}
    outputs.update({"half arithmetic": h_out, "bfloat arithmetic": b_out})
    columns["half arithmetic"] = Expect(((h * h).half() + h).half())  # torch rounds fp16 ops the same way
    columns["bfloat arithmetic"] = Expect((b * b) + b)
    return outputs, columns


@case(TYPES)
def struct_buffer_binds_by_reference(lib: Any, device: str) -> tuple[Outputs, Expected]:
    y = torch.ones(4, device=device)
    lib.apply(y, torch.tensor([3.0, 0.5], device=device))
    return {"y": y}, {"y": Expect(torch.full((4,), 3.5))}


@case(TYPES)
def math_functions(lib: Any, device: str) -> tuple[Outputs, Expected]:
    x = torch.linspace(-3, 3, 13, device=device)
    out = torch.empty(13 * 10, device=device)
    lib.math(x, out, threads=[13], group_size=[13])
    v = x.cpu()
    expected = torch.stack([
        v.exp(), v.exp2(), (v.abs() + 1).log(), (v.abs() + 1).log2(), v.abs().sqrt(), (v.abs() + 1).rsqrt(),
        v.tanh(), v.exp2(), v.clamp(min=0) + v.clamp(max=0) + 1.0 + (v != 0).float(), v.exp() + 1.0,
    ], dim=1)
    return {"math": out.view(13, 10)}, {"math": Expect(expected, atol=1e-6, rtol=1e-5)}


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


@case(ATOMICS)
def atomics(lib: Any, device: str) -> tuple[Outputs, Expected]:
    total = torch.zeros(1, dtype=torch.int32, device=device)
    fsum = torch.zeros(1, device=device)
    per_group = torch.zeros(5, dtype=torch.int32, device=device)
    lib.count(total, fsum, per_group, threads=[5 * 64 - 10], group_size=[64])
    return {"total": total, "float sum": fsum, "per group": per_group}, {
        "total": Expect(torch.tensor([310], dtype=torch.int32)), "float sum": Expect(torch.tensor([155.0])),
        "per group": Expect(torch.tensor([128, 128, 128, 128, 108], dtype=torch.int32))}
