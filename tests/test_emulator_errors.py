"""The emulator fails loudly: divergence, unsupported MSL, bad arguments and (in debug mode) out-of-bounds
accesses raise errors that name the kernel, never hang or pass silently. Each failing case is paired
with a passing one."""

from __future__ import annotations

import pytest
import torch

from emulator_support import HEADER
from flash_attn_metal.emulator import KernelExecutionError, MSLCompileError, UnsupportedMSL, compile_shader

DIVERGENCE = HEADER + """
kernel void split_barrier(device float* out [[buffer(0)]], constant long& diverge [[buffer(1)]],
                          uint tid [[thread_index_in_threadgroup]]) {
  if (diverge != 0 && tid < 16) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
  } else {
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  out[tid] = 1.0f;
}
kernel void split_simd(device float* out [[buffer(0)]], constant long& diverge [[buffer(1)]],
                       uint tid [[thread_index_in_threadgroup]]) {
  float v = float(tid);
  if (diverge != 0 && tid % 2 == 0) {
    out[tid] = simd_sum(v);
  } else {
    out[tid] = simd_sum(v);
  }
}
kernel void barrier_vs_simd(device float* out [[buffer(0)]], constant long& diverge [[buffer(1)]],
                            uint tid [[thread_index_in_threadgroup]]) {
  if (diverge != 0 && tid == 0) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  out[tid] = simd_max(float(tid));
}
kernel void early_exit(device float* out [[buffer(0)]], uint tid [[thread_index_in_threadgroup]]) {
  if (tid >= 40) return;  // ended threads drop out of barriers on Apple GPUs
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[tid] = 2.0f;
}
kernel void partial_matrix(device float* out [[buffer(0)]]) {
  simdgroup_float8x8 m = make_filled_simdgroup_matrix<float, 8, 8>(1.0f);
  simdgroup_multiply(m, m, m);
  simdgroup_store(m, out, 8);
}
kernel void transposed_origin(device const float* x [[buffer(0)]], device float* out [[buffer(1)]],
                              constant long& origin [[buffer(2)]]) {
  simdgroup_float8x8 m;
  simdgroup_load(m, x, 16, ulong2(origin, 0), true);
  simdgroup_store(m, out, 8);
}
"""


@pytest.fixture(scope="module")
def lib():
    return compile_shader(DIVERGENCE)


@pytest.mark.parametrize(
    "kernel, lines",
    [("split_barrier", "line 7 and line 9"), ("split_simd", "line 17 and line 19"), ("barrier_vs_simd", "line 25")],
)
def test_divergent_synchronisation_raises_naming_the_kernel(lib, kernel, lines):
    out = torch.zeros(64)
    getattr(lib, kernel)(out, 0, threads=[64], group_size=[64])  # uniform control flow: fine
    assert (out != 0).any()
    with pytest.raises(KernelExecutionError, match=f"kernel {kernel}: .*{lines}"):
        getattr(lib, kernel)(out, 1, threads=[64], group_size=[64])


def test_ended_threads_leave_barriers(lib):
    out = torch.zeros(64)
    lib.early_exit(out, threads=[64], group_size=[64])
    assert out[:40].eq(2).all() and out[40:].eq(0).all()


def test_simdgroup_matrix_needs_a_full_simd_group(lib):
    out = torch.zeros(64)
    lib.partial_matrix(out, threads=[32], group_size=[32])
    assert out.eq(8).all()
    with pytest.raises(KernelExecutionError, match="all 32 lanes"):
        lib.partial_matrix(out, threads=[16], group_size=[16])


def test_transposed_load_with_an_origin_is_refused(lib):
    x = torch.arange(128, dtype=torch.float32)
    out = torch.zeros(64)
    lib.transposed_origin(x, out, 0, threads=[32], group_size=[32])
    assert torch.equal(out.view(8, 8), x.view(8, 16)[:, :8].T)
    with pytest.raises(KernelExecutionError, match="matrix_origin"):
        lib.transposed_origin(x, out, 8, threads=[32], group_size=[32])


@pytest.mark.parametrize(
    "snippet, construct",
    [
        ("texture2d<float> t [[texture(0)]]", "texture2d"),
        ('float y = 0.0f; __asm("nop");', "__asm"),
        ("float y = undefined_function(1.0f);", "undefined_function"),
    ],
)
def test_unsupported_msl_names_construct_and_line(snippet, construct):
    good = HEADER + "kernel void k(device float* out [[buffer(0)]]) {\n  out[0] = 1.0f;\n}\n"
    compile_shader(good)
    if "texture" in snippet:
        bad = HEADER + f"kernel void k(device float* out [[buffer(0)]], {snippet}) {{\n  out[0] = 1.0f;\n}}\n"
    else:
        bad = HEADER + f"kernel void k(device float* out [[buffer(0)]]) {{\n  {snippet}\n  out[0] = 1.0f;\n}}\n"
    with pytest.raises(UnsupportedMSL) as info:
        compile_shader(bad)
    assert info.value.construct == construct
    assert info.value.line in (3, 4)


def test_private_metal_pragma_is_refused():
    compile_shader(HEADER + "kernel void k(device float* out) { out[0] = 1.0f; }\n")
    with pytest.raises(UnsupportedMSL, match="#pragma METAL"):
        compile_shader("#pragma METAL internals : enable\n" + HEADER + "kernel void k(device float* out) { out[0] = 1.0f; }\n")


def test_type_errors_surface_with_msl_lines():
    with pytest.raises(MSLCompileError) as info:
        compile_shader(HEADER + "kernel void k(device float* out) {\n  float4 v = half4(1.0h);\n  out[0] = v.x;\n}\n")
    assert info.value.diagnostics[0].line == 4


THREADGROUP_LIMIT = HEADER + """
kernel void fits(device float* out [[buffer(0)]], uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float tile[8192];   // exactly 32 KiB
  tile[tid] = 1.0f;
  out[tid] = tile[tid];
}
kernel void too_big(device float* out [[buffer(0)]], uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float tile[8193];
  tile[tid] = 1.0f;
  out[tid] = tile[tid];
}
"""


def test_threadgroup_memory_limit():
    lib = compile_shader(THREADGROUP_LIMIT)
    out = torch.zeros(32)
    lib.fits(out, threads=[32], group_size=[32])
    assert lib.fits.static_thread_group_memory_length == 32768
    with pytest.raises(MSLCompileError, match="threadgroup memory"):
        lib.too_big(out, threads=[32], group_size=[32])


ARGS = HEADER + """
kernel void scale(device const half* x [[buffer(0)]], device half* y [[buffer(1)]], constant float& s [[buffer(2)]],
                  uint i [[thread_position_in_grid]]) {
  y[i] = x[i] * half(s);
}
"""


def test_argument_errors_are_clear():
    lib = compile_shader(ARGS)
    x = torch.ones(4, dtype=torch.float16)
    y = torch.empty_like(x)
    lib.scale(x, y, 2.0)
    assert y.eq(2).all()
    with pytest.raises(TypeError, match="takes 3 buffer arguments"):
        lib.scale(x, y)
    with pytest.raises(TypeError, match="dtype torch.float32 does not match element type half"):
        lib.scale(x.float(), y, 2.0)
    with pytest.raises(TypeError, match="a Python int binds as long, but the parameter's type is float"):
        lib.scale(x, y, 2)
    with pytest.raises(ValueError, match="exceeds 1024"):
        lib.scale(x, y, 2.0, threads=[2048], group_size=[2048])
    with pytest.raises(ValueError, match="this library runs on cpu"):
        lib.scale(x.to("meta"), y, 2.0)


BOUNDS = HEADER + """
kernel void gather(device const float* x [[buffer(0)]], device float* y [[buffer(1)]],
                   constant long& shift [[buffer(2)]], uint i [[thread_position_in_grid]]) {
  y[i] = x[i + shift];
}
"""


def test_debug_mode_reports_out_of_bounds_access(monkeypatch):
    monkeypatch.setenv("FLASH_ATTN_METAL_EMULATOR_DEBUG", "1")
    lib = compile_shader(BOUNDS)
    x = torch.arange(8, dtype=torch.float32)
    y = torch.zeros(8)
    lib.gather(x, y, 0)
    assert torch.equal(x, y)
    with pytest.raises(KernelExecutionError, match=r"kernel gather: buffer 0 \(x\): element 8 is out of bounds"):
        lib.gather(x, y, 1)
