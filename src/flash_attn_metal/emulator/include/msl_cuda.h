// Metal threads on an NVIDIA GPU: a threadgroup is a one-dimensional CUDA block and a SIMD group a warp.
//
// The block holds the threadgroup's full size; threads past a partial (edge) threadgroup leave at once,
// so the remaining ones keep Metal's linear thread index and therefore its SIMD groups. Collectives run
// over the warp's active lanes. Errors (bounds in debug builds, misuse of simdgroup_matrix) are recorded in
// `msl_error` and raised by the host after the launch. Divergence is detected by the CPU emulator only.
#pragma once
#define MSL_FN __device__ inline
#define MSL_TARGET_CUDA 1
#define MSL_SITE 0

// NVRTC predefines CUDA's own vector structs under Metal's names; give Metal's vectors other names.
#define char2 msl_char2
#define char3 msl_char3
#define char4 msl_char4
#define uchar2 msl_uchar2
#define uchar3 msl_uchar3
#define uchar4 msl_uchar4
#define short2 msl_short2
#define short3 msl_short3
#define short4 msl_short4
#define ushort2 msl_ushort2
#define ushort3 msl_ushort3
#define ushort4 msl_ushort4
#define int2 msl_int2
#define int3 msl_int3
#define int4 msl_int4
#define uint2 msl_uint2
#define uint3 msl_uint3
#define uint4 msl_uint4
#define long2 msl_long2
#define long3 msl_long3
#define long4 msl_long4
#define ulong2 msl_ulong2
#define ulong3 msl_ulong3
#define ulong4 msl_ulong4
#define float2 msl_float2
#define float3 msl_float3
#define float4 msl_float4

// NVRTC declares CUDA's math in the global namespace, where MSL's `using namespace metal;` would make every call
// ambiguous: Metal's functions of those names are renamed, in the prelude and the kernels alike.
#define abs msl_abs
#define acos msl_acos
#define cospi msl_cospi
#define sinpi msl_sinpi
#define atanh msl_atanh
#define acosh msl_acosh
#define asinh msl_asinh
#define all msl_all
#define any msl_any
#define asin msl_asin
#define atan msl_atan
#define atan2 msl_atan2
#define cbrt msl_cbrt
#define ceil msl_ceil
#define copysign msl_copysign
#define cos msl_cos
#define cosh msl_cosh
#define exp msl_exp
#define exp10 msl_exp10
#define exp2 msl_exp2
#define fabs msl_fabs
#define fdim msl_fdim
#define floor msl_floor
#define fma msl_fma
#define fmax msl_fmax
#define fmin msl_fmin
#define fmod msl_fmod
#define isfinite msl_isfinite
#define isinf msl_isinf
#define isnan msl_isnan
#define ldexp msl_ldexp
#define log msl_log
#define log10 msl_log10
#define log2 msl_log2
#define max msl_max
#define min msl_min
#define nearbyint msl_nearbyint
#define pow msl_pow
#define rint msl_rint
#define round msl_round
#define rsqrt msl_rsqrt
#define signbit msl_signbit
#define sin msl_sin
#define sinh msl_sinh
#define sqrt msl_sqrt
#define tan msl_tan
#define tanh msl_tanh
#define trunc msl_trunc

#include "msl_math.h"

// Error codes in msl_error.code.
#define MSL_ERROR_OUT_OF_BOUNDS 1
#define MSL_ERROR_PARTIAL_SIMD_MATRIX 2
#define MSL_ERROR_TRANSPOSED_ORIGIN 3
#define MSL_ERROR_MISALIGNED 4

// The first error of a launch; for an access: its buffer (-1: threadgroup memory), byte offset and size, and the
// memory's bytes (out of bounds) or the alignment it needed (misaligned).
struct MslError {
  int code;
  int buffer;
  long offset;
  long size;
  long extent;
};
extern "C" __device__ MslError msl_error;
__device__ MslError msl_error;
__device__ char msl_sink[64];
extern __shared__ __align__(16) char msl_arena[];
__shared__ ulong msl_arena_bytes;

namespace msl {

constexpr int SIMD_WIDTH = 32;

MSL_FN void record_error(int code, int buffer, long offset, long size, long extent) {
  if (atomicCAS(&msl_error.code, 0, code) == 0) {
    msl_error.buffer = buffer;
    msl_error.offset = offset;
    msl_error.size = size;
    msl_error.extent = extent;
  }
}
MSL_FN void report_out_of_bounds(int buffer, const char*, long offset, long size, long bytes) {
  record_error(MSL_ERROR_OUT_OF_BOUNDS, buffer, offset, size, bytes);
}
MSL_FN void report_misaligned(int buffer, const char*, long offset, long size, long alignment) {
  record_error(MSL_ERROR_MISALIGNED, buffer, offset, size, alignment);
}
MSL_FN void report_transposed_origin() { record_error(MSL_ERROR_TRANSPOSED_ORIGIN, -1, 0, 0, 0); }
MSL_FN void* out_of_bounds_sink() { return msl_sink; }

MSL_FN uint3 launch_group_size(const Launch* L) { return uint3(L->group_size[0], L->group_size[1], L->group_size[2]); }
MSL_FN uint3 launch_threads(const Launch* L) { return uint3(L->threads[0], L->threads[1], L->threads[2]); }

// ---- what kernels see ----
MSL_FN char* threadgroup_arena() { return msl_arena; }
MSL_FN ulong threadgroup_arena_bytes() { return msl_arena_bytes; }
MSL_FN uint lane_id() { return threadIdx.x % SIMD_WIDTH; }
MSL_FN uint3 threadgroup_position_in_grid(const Launch*) { return uint3(blockIdx.x, blockIdx.y, blockIdx.z); }
MSL_FN uint3 threads_per_threadgroup(const Launch* L) {
  return metal::min(launch_group_size(L), launch_threads(L) - threadgroup_position_in_grid(L) * launch_group_size(L));
}
MSL_FN uint thread_index_in_threadgroup(const Launch*) { return threadIdx.x; }
MSL_FN uint3 thread_position_in_threadgroup(const Launch* L) {
  uint3 size = threads_per_threadgroup(L);
  uint i = threadIdx.x;
  return uint3(i % size.x, (i / size.x) % size.y, i / (size.x * size.y));
}
MSL_FN uint3 thread_position_in_grid(const Launch* L) {
  return threadgroup_position_in_grid(L) * launch_group_size(L) + thread_position_in_threadgroup(L);
}
MSL_FN uint3 threadgroups_per_grid(const Launch*) { return uint3(gridDim.x, gridDim.y, gridDim.z); }
MSL_FN uint3 threads_per_grid(const Launch* L) { return launch_threads(L); }
MSL_FN uint simdgroup_index_in_threadgroup(const Launch*) { return threadIdx.x / SIMD_WIDTH; }
MSL_FN uint thread_index_in_simdgroup(const Launch*) { return threadIdx.x % SIMD_WIDTH; }
MSL_FN uint simdgroups_per_threadgroup(const Launch* L) {
  uint3 s = threads_per_threadgroup(L);
  return (s.x * s.y * s.z + SIMD_WIDTH - 1) / SIMD_WIDTH;
}
MSL_FN uint threads_per_simdgroup(const Launch*) { return SIMD_WIDTH; }
MSL_FN uint thread_execution_width(const Launch*) { return SIMD_WIDTH; }

// Fill threadgroup memory with garbage (all-ones bytes: NaN in every float type); false for threads past
// the edge of a partial threadgroup, which then leave.
MSL_FN bool enter(const Launch* L, ulong threadgroup_bytes) {
  for (ulong b = threadIdx.x; b < threadgroup_bytes; b += blockDim.x) msl_arena[b] = (char)0xff;
  if (threadIdx.x == 0) msl_arena_bytes = threadgroup_bytes;
  __syncthreads();
  uint3 s = threads_per_threadgroup(L);
  return threadIdx.x < s.x * s.y * s.z;
}

MSL_FN void threadgroup_barrier_at(int) { __syncthreads(); }
MSL_FN void simdgroup_barrier_at(int) { __syncwarp(__activemask()); }

template <class T> MSL_FN T shuffle_bits(unsigned mask, const T& v, int from) {
  constexpr int WORDS = (sizeof(T) + 3) / 4;
  uint w[WORDS] = {};
  copy_bytes(w, &v, sizeof(T));
  for (int i = 0; i < WORDS; ++i) w[i] = __shfl_sync(mask, w[i], from);
  T r;
  copy_bytes(&r, w, sizeof(T));
  return r;
}

// Reductions and scans run over the active lanes of each group of `width` lanes (32: the warp; 4: a quad).
template <class T, class F> MSL_FN T reduce_at(T x, F combine, int, int width = SIMD_WIDTH) {
  unsigned mask = __activemask();
  int group = (int)lane_id() / width * width;
  T acc = x;
  bool first = true;
  for (int from = 0; from < SIMD_WIDTH; ++from)
    if (mask >> from & 1u) {
      T v = shuffle_bits(mask, x, from);
      if (from < group || from >= group + width) continue;
      acc = first ? v : combine(acc, v);
      first = false;
    }
  return acc;
}

template <class T, class F> MSL_FN T prefix_at(T x, T identity, bool inclusive, F combine, int, int width = SIMD_WIDTH) {
  unsigned mask = __activemask();
  int lane = (int)lane_id(), group = lane / width * width;
  T acc = identity;
  bool first = true;
  for (int from = 0; from < SIMD_WIDTH; ++from)
    if (mask >> from & 1u) {
      T v = shuffle_bits(mask, x, from);
      if (from < group || from > lane || (!inclusive && from == lane)) continue;
      acc = first ? v : combine(acc, v);
      first = false;
    }
  return acc;
}

template <class T> MSL_FN T shuffle_at(T x, int from, int) { return shuffle_bits(__activemask(), x, from & 31); }

MSL_FN ulong ballot_at(bool x, int) {
  unsigned mask = __activemask();
  return (ulong)__ballot_sync(mask, x) | ((ulong)mask << 32);
}

template <class TD, class TA, class TB, class TC> struct MatArg {
  simdgroup_matrix<TD, 8, 8>* d; const simdgroup_matrix<TA, 8, 8>* a; const simdgroup_matrix<TB, 8, 8>* b;
  const simdgroup_matrix<TC, 8, 8>* c;
};

// The lane that holds element (r, c) of an 8x8 simdgroup_matrix (inverse of lane_row/lane_col).
MSL_FN int lane_of(int r, int c) { return 16 * (r / 4) + 8 * (c / 4) + 2 * (r % 4) + (c % 4) / 2; }

// D = A * B + C over the warp; products accumulate in float and round once to D's type.
template <class TD, class TA, class TB, class TC>
MSL_FN void matmul_at(MatArg<TD, TA, TB, TC>& arg, int) {
  unsigned mask = __activemask();
  if (mask != 0xffffffffu) {
    record_error(MSL_ERROR_PARTIAL_SIMD_MATRIX, -1, 0, 0, 0);
    return;
  }
  int lane = (int)lane_id(), r = lane_row(lane), c = lane_col(lane);
  float acc0 = arg.c ? (float)arg.c->elements.v[0] : 0.0f;
  float acc1 = arg.c ? (float)arg.c->elements.v[1] : 0.0f;
  float a0 = (float)arg.a->elements.v[0], a1 = (float)arg.a->elements.v[1];
  float b0 = (float)arg.b->elements.v[0], b1 = (float)arg.b->elements.v[1];
  for (int k = 0; k < 8; ++k) {
    int a_from = lane_of(r, k), b_from = lane_of(k, c);
    float a_lo = __shfl_sync(mask, a0, a_from), a_hi = __shfl_sync(mask, a1, a_from);
    float a_rk = (k & 1) ? a_hi : a_lo;
    acc0 += a_rk * __shfl_sync(mask, b0, b_from);
    acc1 += a_rk * __shfl_sync(mask, b1, b_from);
  }
  __syncwarp(mask);  // every lane has read A, B and C before any lane writes D (which may alias them)
  arg.d->elements.v[0] = TD(acc0);
  arg.d->elements.v[1] = TD(acc1);
}

}  // namespace msl

#include "msl_builtins.h"

// The entry point of kernel `name` (its host name), and a kernel that reports its threadgroup memory and its
// [[max_total_threads_per_threadgroup]] (0: none).
#define MSL_KERNEL_ENTRY(name, threadgroup_bytes, max_threads)                                        \
  extern "C" __global__ void msl_kernel_##name(const ::msl::Launch* L) {                              \
    if (::msl::enter(L, threadgroup_bytes)) msl_entry_##name(L);                                      \
  }                                                                                                   \
  extern "C" __global__ void msl_limits_##name(ulong* out) {                                          \
    out[0] = threadgroup_bytes;                                                                       \
    out[1] = max_threads;                                                                             \
  }
