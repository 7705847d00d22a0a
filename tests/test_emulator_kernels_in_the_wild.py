"""Kernels written here in the style of the Metal code the emulator must run: an attention forward in the manner
of MLX's steel attention (template kernel with host names, a cooperative loader with vector loads, padded
threadgroup tiles, mixed-precision simdgroup fragments, online softmax over SIMD shuffles, unroll pragmas) and a
matrix product in the manner of llama.cpp's Metal kernels (byte-strided arguments, a threadgroup byte buffer cast
to element types, bfloat or half fragments into float accumulators). Both are checked against float64 PyTorch,
in the debug build too (every access bounds- and alignment-checked); breaking the kernels' masking shows the
comparison can fail.
"""

from __future__ import annotations

import math
import struct

import pytest
import torch

from emulator_support import DEVICES
from flash_attn_metal.emulator import compile_shader, typecheck

DTYPES = {"float": torch.float32, "half": torch.float16, "bfloat": torch.bfloat16}

STEEL_ATTENTION = """
#include <metal_stdlib>
using namespace metal;

#define STEEL_CONST static constant constexpr const
#define STEEL_PRAGMA_UNROLL _Pragma("clang loop unroll(full)")

struct AttnParams {
  int qL, kL;              // sequence lengths
  int q_row, k_row, o_row; // row strides (elements)
  int q_head, k_head, o_head;
  float scale_log2;        // softmax scale, in log2 units
};

// Copies a BROWS x BCOLS block from device memory into a threadgroup tile, n_reads contiguous elements per
// thread in one vector access (the unchecked path), or element by element with zero fill (the checked path).
template <typename T, short BROWS, short BCOLS, short dst_ld, short tgp_size>
struct BlockLoader {
  STEEL_CONST short n_reads = (BCOLS * BROWS) / tgp_size;
  STEEL_CONST short TCOLS = BCOLS / n_reads;
  STEEL_CONST short TROWS = tgp_size / TCOLS;
  static_assert(n_reads * TCOLS == BCOLS && TROWS <= BROWS, "the block divides among the threads");
  struct alignas(n_reads * sizeof(T) < 16 ? n_reads * sizeof(T) : 16) ReadVector { T v[n_reads]; };

  const int src_ld;
  const short bi, bj;
  threadgroup T* dst;
  const device T* src;

  METAL_FUNC BlockLoader(const device T* src_, int src_ld_, threadgroup T* dst_, ushort sg, ushort lane)
      : src_ld(src_ld_), bi(short((sg * 32 + lane) / TCOLS)), bj(short(n_reads * ((sg * 32 + lane) % TCOLS))),
        dst(dst_ + bi * dst_ld + bj), src(src_ + bi * src_ld_ + bj) {}

  METAL_FUNC void load_unsafe() const {
    STEEL_PRAGMA_UNROLL
    for (short i = 0; i < BROWS; i += TROWS) {
      *reinterpret_cast<threadgroup ReadVector*>(&dst[i * dst_ld]) =
          *reinterpret_cast<const device ReadVector*>(&src[i * src_ld]);
    }
  }

  METAL_FUNC void load_safe(short2 valid) const {  // (columns, rows) inside the matrix
    STEEL_PRAGMA_UNROLL
    for (short i = 0; i < BROWS; i += TROWS) {
      STEEL_PRAGMA_UNROLL
      for (short j = 0; j < n_reads; ++j) {
        dst[i * dst_ld + j] = (bi + i < valid.y && bj + j < valid.x) ? src[i * src_ld + j] : T(0);
      }
    }
  }

  METAL_FUNC void next() { src += BROWS * src_ld; }
};

template <typename T> struct AccumHelper { typedef float type; };

template <typename T, short BQ, short BK, short BD, short WM, short WN>
[[kernel, max_total_threads_per_threadgroup(WM * WN * 32)]] void attention(
    const device T* Q [[buffer(0)]], const device T* K [[buffer(1)]], const device T* V [[buffer(2)]],
    device T* O [[buffer(3)]], const constant AttnParams* params [[buffer(4)]],
    uint3 tid [[threadgroup_position_in_grid]], ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]]) {
  typedef typename AccumHelper<T>::type AccT;
  constexpr short TGP_SIZE = WM * WN * 32;
  constexpr short PAD = 16 / sizeof(T);  // 16 bytes per row against bank conflicts
  constexpr short LDQ = BD + PAD;
  constexpr short LDK = BD + PAD;
  constexpr short TD = BD / 8;
  constexpr short TK = BK / 8;
  static_assert(BQ == WM * 8 && WN == 1, "one 8-row fragment of queries per SIMD group");

  threadgroup T Qs[BQ * LDQ];
  threadgroup T Ks[BK * LDK];
  threadgroup T Vs[BK * LDK];

  const int q_first = int(tid.x) * BQ;
  Q += tid.y * params->q_head + q_first * params->q_row;
  K += tid.y * params->k_head;
  V += tid.y * params->k_head;
  O += tid.y * params->o_head + q_first * params->o_row;

  BlockLoader<T, BQ, BD, LDQ, TGP_SIZE> loader_q(Q, params->q_row, Qs, sg, lane);
  BlockLoader<T, BK, BD, LDK, TGP_SIZE> loader_k(K, params->k_row, Ks, sg, lane);
  BlockLoader<T, BK, BD, LDK, TGP_SIZE> loader_v(V, params->k_row, Vs, sg, lane);

  const int q_rows = min(int(BQ), params->qL - q_first);
  if (q_rows == BQ) loader_q.load_unsafe(); else loader_q.load_safe(short2(BD, q_rows));
  threadgroup_barrier(mem_flags::mem_threadgroup);

  const short row = 4 * (lane / 16) + (lane / 2) % 4;  // Apple's fragment layout
  const short col = 4 * ((lane / 8) % 2) + 2 * (lane % 2);
  simdgroup_matrix<T, 8, 8> q_frag[TD];
  STEEL_PRAGMA_UNROLL
  for (short d = 0; d < TD; ++d) simdgroup_load(q_frag[d], &Qs[(sg * 8) * LDQ + d * 8], LDQ);

  simdgroup_matrix<AccT, 8, 8> o_frag[TD];
  STEEL_PRAGMA_UNROLL
  for (short d = 0; d < TD; ++d) o_frag[d] = make_filled_simdgroup_matrix<AccT, 8>(0.0f);
  AccT row_max = -numeric_limits<AccT>::infinity();
  AccT row_sum = 0.0f;

  for (int k_first = 0; k_first < params->kL; k_first += BK) {
    const int k_rows = min(int(BK), params->kL - k_first);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (k_rows == BK) { loader_k.load_unsafe(); loader_v.load_unsafe(); }
    else { loader_k.load_safe(short2(BD, k_rows)); loader_v.load_safe(short2(BD, k_rows)); }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    simdgroup_matrix<AccT, 8, 8> s_frag[TK];
    STEEL_PRAGMA_UNROLL
    for (short k = 0; k < TK; ++k) {
      s_frag[k] = make_filled_simdgroup_matrix<AccT, 8>(0.0f);
      STEEL_PRAGMA_UNROLL
      for (short d = 0; d < TD; ++d) {
        simdgroup_matrix<T, 8, 8> kt;
        simdgroup_load(kt, &Ks[(k * 8) * LDK + d * 8], LDK, ulong2(0, 0), true);
        simdgroup_multiply_accumulate(s_frag[k], q_frag[d], kt, s_frag[k]);
      }
    }

    // Online softmax over the row this lane holds (its 8 elements sit in 4 lanes: lane bits 0 and 3).
    AccT block_max = -numeric_limits<AccT>::infinity();
    STEEL_PRAGMA_UNROLL
    for (short k = 0; k < TK; ++k) {
      thread auto& s = s_frag[k].thread_elements();
      STEEL_PRAGMA_UNROLL
      for (short j = 0; j < 2; ++j) {
        const bool valid = k * 8 + col + j < k_rows;
        s[j] = valid ? s[j] * params->scale_log2 : -numeric_limits<AccT>::infinity();
        block_max = max(block_max, s[j]);
      }
    }
    block_max = max(block_max, simd_shuffle_xor(block_max, ushort(1)));
    block_max = max(block_max, simd_shuffle_xor(block_max, ushort(8)));
    const AccT new_max = max(row_max, block_max);
    const AccT factor = fast::exp2(row_max - new_max);
    row_max = new_max;
    AccT block_sum = 0.0f;
    simdgroup_matrix<T, 8, 8> p_frag[TK];
    STEEL_PRAGMA_UNROLL
    for (short k = 0; k < TK; ++k) {
      thread auto& s = s_frag[k].thread_elements();
      const vec<AccT, 2> p = vec<AccT, 2>(fast::exp2(s[0] - new_max), fast::exp2(s[1] - new_max));
      block_sum += p.x + p.y;
      p_frag[k].thread_elements() = vec<T, 2>(p);
    }
    block_sum += simd_shuffle_xor(block_sum, ushort(1));
    block_sum += simd_shuffle_xor(block_sum, ushort(8));
    row_sum = row_sum * factor + block_sum;
    STEEL_PRAGMA_UNROLL
    for (short d = 0; d < TD; ++d) {
      o_frag[d].thread_elements() *= factor;
      STEEL_PRAGMA_UNROLL
      for (short k = 0; k < TK; ++k) {
        simdgroup_matrix<T, 8, 8> v;
        simdgroup_load(v, &Vs[(k * 8) * LDK + d * 8], LDK);
        simdgroup_multiply_accumulate(o_frag[d], p_frag[k], v, o_frag[d]);
      }
    }
    loader_k.next();
    loader_v.next();
  }

  const int r = sg * 8 + row;
  if (r < q_rows) {
    STEEL_PRAGMA_UNROLL
    for (short d = 0; d < TD; ++d) {
      const vec<AccT, 2> o = o_frag[d].thread_elements() / row_sum;
      *reinterpret_cast<device vec<T, 2>*>(&O[r * params->o_row + d * 8 + col]) = vec<T, 2>(o);
    }
  }
}

#define instantiate_attention(tname, dtype, bq, bk, bd, wm, wn)                                             \\
  template [[host_name("steel_attention_" #tname "_bq" #bq "_bk" #bk "_bd" #bd)]] [[kernel]]              \\
  decltype(attention<dtype, bq, bk, bd, wm, wn>) attention<dtype, bq, bk, bd, wm, wn>;
instantiate_attention(float32, float, 32, 16, 64, 4, 1)
instantiate_attention(float16, half, 32, 16, 64, 4, 1)
instantiate_attention(bfloat16, bfloat, 32, 16, 64, 4, 1)
"""


def _params(q, k, o, scale) -> torch.Tensor:
    b, h, n, d = q.shape
    assert b == 1
    ints = [q.shape[2], k.shape[2], q.stride(2), k.stride(2), o.stride(2), q.stride(1), k.stride(1), o.stride(1)]
    return torch.frombuffer(bytearray(struct.pack("8if", *ints, scale * math.log2(math.e))), dtype=torch.int32)


def _steel(device, dtype_name, q_len=37, k_len=45, heads=2, source=STEEL_ATTENTION):
    torch.manual_seed(3)
    dtype = DTYPES[dtype_name]
    q, k, v = (torch.randn(1, heads, n, 64, device=device).to(dtype) for n in (q_len, k_len, k_len))
    o = torch.full_like(q, float("nan"))
    lib = compile_shader(source, device)
    kernel = getattr(lib, f"steel_attention_{str(dtype).split('.')[1]}_bq32_bk16_bd64")
    assert kernel.max_threads_per_threadgroup == 128
    scale = 64**-0.5
    kernel(q, k, v, o, _params(q, k, o, scale).to(device), threads=[math.ceil(q_len / 32) * 128, heads, 1],
           group_size=[128, 1, 1])
    reference = torch.softmax(q.double() @ k.double().transpose(-1, -2) * scale, -1) @ v.double()
    low = torch.softmax(q.float() @ k.float().transpose(-1, -2) * scale, -1) @ v.float()
    return o.double().cpu(), reference.cpu(), low.to(dtype).double().cpu()


def test_the_steel_style_source_type_checks():
    typecheck(STEEL_ATTENTION)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype_name", ["float", "half", "bfloat"])
def test_steel_style_attention_matches_float64(device, dtype_name):
    out, reference, low = _steel(device, dtype_name)
    error, baseline = (out - reference).abs().max().item(), (low - reference).abs().max().item()
    assert error <= 2 * baseline + 1e-6, (error, baseline)


def test_steel_style_attention_in_the_debug_build(monkeypatch):
    monkeypatch.setenv("FLASH_ATTN_METAL_EMULATOR_DEBUG", "1")
    out, reference, low = _steel("cpu", "half")
    assert (out - reference).abs().max() <= 2 * (low - reference).abs().max() + 1e-6


def test_broken_key_masking_is_caught():
    """Negative control: without the mask on the last key block, padding keys (zeros) join the softmax."""
    broken = STEEL_ATTENTION.replace("const bool valid = k * 8 + col + j < k_rows;", "const bool valid = true;")
    out, reference, _ = _steel("cpu", "float", source=broken)
    assert (out - reference).abs().max() > 1e-3


LLAMA_MUL_MM = """
#include <metal_stdlib>
using namespace metal;

#define FOR_UNROLL(x) _Pragma("clang loop unroll(full)") for (x)

typedef struct {
  int32_t ne00;  // K
  int32_t ne0;   // M
  int32_t ne1;   // N
  uint64_t nb01; // bytes between rows of src0
  uint64_t nb11; // bytes between rows of src1
} kargs_mul_mm;

// dst[n][m] = sum_k src0[m][k] * src1[n][k]: src0 in S0 (half or bfloat), src1 in float staged as S0; float sums.
template <typename S0, typename S0_4, typename S0_8x8>
kernel void kernel_mul_mm(constant kargs_mul_mm& args [[buffer(0)]], device const char* src0 [[buffer(1)]],
                          device const char* src1 [[buffer(2)]], device char* dst [[buffer(3)]],
                          uint3 tgpig [[threadgroup_position_in_grid]], ushort tiitg [[thread_index_in_threadgroup]],
                          ushort sgitg [[simdgroup_index_in_threadgroup]]) {
  constexpr int NR0 = 16;  // rows of src0 per threadgroup
  constexpr int NR1 = 16;  // rows of src1
  constexpr int NK = 8;
  threadgroup char shmem[(NR0 + NR1) * NK * sizeof(S0)];
  threadgroup S0* sa = (threadgroup S0*)(shmem);
  threadgroup S0* sb = (threadgroup S0*)(shmem + NR0 * NK * sizeof(S0));

  const int r0 = tgpig.y * NR0;
  const int r1 = tgpig.x * NR1;
  S0_8x8 ma;
  S0_8x8 mb;
  simdgroup_float8x8 mc = make_filled_simdgroup_matrix<float, 8>(0.f);

  for (int loop_k = 0; loop_k < args.ne00; loop_k += NK) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
    // 128 threads: each stages 4 consecutive elements of one row (rows 0..15 of src0, then of src1).
    const int row = tiitg / 2 % 16, k4 = 4 * (tiitg % 2);
    if (tiitg < 32) {
      device const S0* x = (device const S0*)(src0 + args.nb01 * (r0 + row)) + loop_k + k4;
      *(threadgroup S0_4*)(sa + NK * row + k4) = *((device const S0_4*)x);
    } else if (tiitg < 64) {
      device const float* y = (device const float*)(src1 + args.nb11 * (r1 + row)) + loop_k + k4;
      *(threadgroup S0_4*)(sb + NK * row + k4) = S0_4(*((device const float4*)y));
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    simdgroup_barrier(mem_flags::mem_none);
    simdgroup_load(ma, sa + NK * 8 * (sgitg % 2), NK, 0, true);  // src0 rows as columns
    simdgroup_load(mb, sb + NK * 8 * (sgitg / 2), NK, 0, false);
    simdgroup_multiply_accumulate(mc, mb, ma, mc);
  }
  device float* C = (device float*)dst + (r0 + 8 * (sgitg % 2)) + (r1 + 8 * (sgitg / 2)) * args.ne0;
  simdgroup_store(mc, C, args.ne0, 0, false);
}

typedef decltype(kernel_mul_mm<half, half4, simdgroup_half8x8>) mul_mm_t;
template [[host_name("kernel_mul_mm_f16_f32")]] kernel mul_mm_t kernel_mul_mm<half, half4, simdgroup_half8x8>;
#if defined(__HAVE_BFLOAT__)
template [[host_name("kernel_mul_mm_bf16_f32")]] kernel mul_mm_t kernel_mul_mm<bfloat, bfloat4, simdgroup_bfloat8x8>;
#endif
"""


def test_the_llama_style_source_type_checks():
    typecheck(LLAMA_MUL_MM)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype_name", ["half", "bfloat"])
def test_llama_style_mixed_precision_matrix_product(device, dtype_name):
    torch.manual_seed(4)
    m, n, k = 32, 16, 24
    a = torch.randn(m, k, device=device).to(DTYPES[dtype_name])
    b = torch.randn(n, k, device=device)
    out = torch.full((n, m), float("nan"), device=device)
    args = torch.frombuffer(bytearray(struct.pack("3i4xQQ", k, m, n, a.stride(0) * a.element_size(),
                                                  b.stride(0) * 4)), dtype=torch.uint8).to(device)
    lib = compile_shader(LLAMA_MUL_MM, device)
    kernel = getattr(lib, "kernel_mul_mm_f16_f32" if dtype_name == "half" else "kernel_mul_mm_bf16_f32")
    kernel(args, a.view(torch.int8).view(-1), b.view(torch.int8).view(-1), out.view(torch.int8).view(-1),
           threads=[(n // 16) * 128, (m // 16), 1], group_size=[128, 1, 1])
    b_low = b.to(DTYPES[dtype_name]).double()
    expected = (b_low @ a.double().T).cpu()
    assert torch.allclose(out.double().cpu(), expected, atol=1e-3, rtol=1e-3)
