// The metal:: functions built on a target's primitives (msl_cpu.h or msl_cuda.h): barriers, SIMD
// collectives, simdgroup_matrix load/store/multiply, atomics, and the builtin kernel attributes.
#pragma once

// Each barrier and collective knows its MSL line, so a divergence can be reported where it happens.
#ifndef MSL_SITE
#define MSL_SITE __builtin_LINE()
#endif

#include "msl_memory.h"

namespace msl {
struct SumOp { template <class T> MSL_FN T operator()(T a, T b) const { return a + b; } };
struct ProductOp { template <class T> MSL_FN T operator()(T a, T b) const { return a * b; } };
struct MaxOp { template <class T> MSL_FN T operator()(T a, T b) const { return metal::max(a, b); } };
struct MinOp { template <class T> MSL_FN T operator()(T a, T b) const { return metal::min(a, b); } };
struct AndOp { template <class T> MSL_FN T operator()(T a, T b) const { return a & b; } };
struct OrOp { template <class T> MSL_FN T operator()(T a, T b) const { return a | b; } };
struct XorOp { template <class T> MSL_FN T operator()(T a, T b) const { return a ^ b; } };

MSL_FN long matrix_offset(int r, int c, ulong elements_per_row, ulong2 origin, bool transpose) {
  if (transpose && (origin.x != 0 || origin.y != 0)) {
    report_transposed_origin();
    return 0;
  }
  return transpose ? (long)(c * elements_per_row + r) : (long)((origin.y + r) * elements_per_row + origin.x + c);
}

// Element access through a pointer (raw, or bounds-checked in debug builds) whose element type is T.
template <class T, class P> MSL_FN T load_element(P p, ulong i) {
  static_assert(is_same<typename remove_cvref<decltype(p[0])>::type, T>::value,
                "simdgroup_load: the pointer's element type must be the matrix's");
  return p[i];
}
template <class T, class P> MSL_FN void store_element(P p, ulong i, T v) {
  static_assert(is_same<typename remove_cvref<decltype(p[0])>::type, T>::value,
                "simdgroup_store: the pointer's element type must be the matrix's");
  p[i] = v;
}

#ifdef MSL_TARGET_CUDA
template <class T> MSL_FN uint as_bits(T v) { uint u; copy_bytes(&u, &v, 4); return u; }
template <class T> MSL_FN T from_bits32(uint u) { T v; copy_bytes(&v, &u, 4); return v; }
template <class T> MSL_FN T atomic_load(T* p) { return *(volatile T*)p; }
template <class T> MSL_FN bool atomic_cas(T* p, T* expected, T desired) {
  static_assert(sizeof(T) == 4, "Metal atomics are 32-bit");
  uint want = as_bits(*expected);
  uint seen = atomicCAS((uint*)p, want, as_bits(desired));
  if (seen == want) return true;
  *expected = from_bits32<T>(seen);
  return false;
}
template <class T> MSL_FN void atomic_store(T* p, T v) { atomicExch((uint*)p, as_bits(v)); }
template <class T> MSL_FN T atomic_exchange(T* p, T v) { return from_bits32<T>(atomicExch((uint*)p, as_bits(v))); }
#else
template <class T> inline T atomic_load(T* p) { T r; __atomic_load(p, &r, __ATOMIC_RELAXED); return r; }
template <class T> inline bool atomic_cas(T* p, T* expected, T desired) {
  return __atomic_compare_exchange(p, expected, &desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
}
template <class T> inline void atomic_store(T* p, T v) { __atomic_store(p, &v, __ATOMIC_RELAXED); }
template <class T> inline T atomic_exchange(T* p, T v) { T r; __atomic_exchange(p, &v, &r, __ATOMIC_RELAXED); return r; }
#endif
}  // namespace msl

namespace metal {

MSL_FN void threadgroup_barrier(mem_flags, int site = MSL_SITE) { ::msl::threadgroup_barrier_at(site); }
MSL_FN void simdgroup_barrier(mem_flags, int site = MSL_SITE) { ::msl::simdgroup_barrier_at(site); }

template <class T> MSL_FN T simd_sum(T x, int site = MSL_SITE) { return ::msl::reduce_at(x, ::msl::SumOp(), site); }
template <class T> MSL_FN T simd_product(T x, int site = MSL_SITE) { return ::msl::reduce_at(x, ::msl::ProductOp(), site); }
template <class T> MSL_FN T simd_max(T x, int site = MSL_SITE) { return ::msl::reduce_at(x, ::msl::MaxOp(), site); }
template <class T> MSL_FN T simd_min(T x, int site = MSL_SITE) { return ::msl::reduce_at(x, ::msl::MinOp(), site); }
template <class T> MSL_FN T simd_and(T x, int site = MSL_SITE) { return ::msl::reduce_at(x, ::msl::AndOp(), site); }
template <class T> MSL_FN T simd_or(T x, int site = MSL_SITE) { return ::msl::reduce_at(x, ::msl::OrOp(), site); }
template <class T> MSL_FN T simd_xor(T x, int site = MSL_SITE) { return ::msl::reduce_at(x, ::msl::XorOp(), site); }
MSL_FN bool simd_all(bool x, int site = MSL_SITE) { return ::msl::reduce_at<int>(x ? 1 : 0, ::msl::AndOp(), site) != 0; }
MSL_FN bool simd_any(bool x, int site = MSL_SITE) { return ::msl::reduce_at<int>(x ? 1 : 0, ::msl::OrOp(), site) != 0; }
template <class T> MSL_FN T simd_prefix_inclusive_sum(T x, int site = MSL_SITE) { return ::msl::prefix_sum_at(x, true, site); }
template <class T> MSL_FN T simd_prefix_exclusive_sum(T x, int site = MSL_SITE) { return ::msl::prefix_sum_at(x, false, site); }

template <class T> MSL_FN T simd_shuffle(T x, ushort lane, int site = MSL_SITE) { return ::msl::shuffle_at(x, lane, site); }
template <class T> MSL_FN T simd_broadcast(T x, ushort lane, int site = MSL_SITE) { return ::msl::shuffle_at(x, lane, site); }
template <class T> MSL_FN T simd_shuffle_xor(T x, ushort mask, int site = MSL_SITE) {
  return ::msl::shuffle_at(x, (int)(::msl::lane_id() ^ mask), site); }
// The lanes whose source falls off the SIMD group keep their own value.
template <class T> MSL_FN T simd_shuffle_up(T x, ushort delta, int site = MSL_SITE) {
  int from = (int)::msl::lane_id() - (int)delta;
  return ::msl::shuffle_at(x, from < 0 ? (int)::msl::lane_id() : from, site); }
template <class T> MSL_FN T simd_shuffle_down(T x, ushort delta, int site = MSL_SITE) {
  int from = (int)::msl::lane_id() + (int)delta;
  return ::msl::shuffle_at(x, from >= ::msl::SIMD_WIDTH ? (int)::msl::lane_id() : from, site); }

// The low 32 bits hold the votes; the high 32 bits the lanes that voted (for all()).
struct simd_vote {
  typedef ulong vote_t;
  ulong bits;
  MSL_FN explicit operator vote_t() const { return bits & 0xffffffffu; }
  MSL_FN bool all() const { return (bits & 0xffffffffu) == (bits >> 32); }
  MSL_FN bool any() const { return (bits & 0xffffffffu) != 0; }
};
MSL_FN simd_vote simd_ballot(bool x, int site = MSL_SITE) { return simd_vote{::msl::ballot_at(x, site)}; }
MSL_FN bool simd_is_first(int site = MSL_SITE) {
  ulong active = ::msl::ballot_at(true, site) >> 32;
  return (active & ((1ul << ::msl::lane_id()) - 1ul)) == 0;
}

// ---- simdgroup_matrix ----
// matrix_origin is (column, row) in the source. With transpose_matrix, element (r, c) of the matrix is
// source element (c, r). Apple does not document how matrix_origin combines with transpose_matrix, so
// the emulator refuses that combination: offset the pointer instead.
template <class T, class P>
MSL_FN void simdgroup_load(simdgroup_matrix<T, 8, 8>& d, P src, ulong elements_per_row = 8,
                           ulong2 matrix_origin = ulong2(0), bool transpose_matrix = false) {
  int lane = (int)::msl::lane_id(), r = ::msl::lane_row(lane), c = ::msl::lane_col(lane);
  for (int j = 0; j < 2; ++j)
    d.elements.v[j] = ::msl::load_element<T>(src, ::msl::matrix_offset(r, c + j, elements_per_row, matrix_origin, transpose_matrix));
}
template <class T, class P>
MSL_FN void simdgroup_store(const simdgroup_matrix<T, 8, 8>& a, P dst, ulong elements_per_row = 8,
                            ulong2 matrix_origin = ulong2(0), bool transpose_matrix = false) {
  int lane = (int)::msl::lane_id(), r = ::msl::lane_row(lane), c = ::msl::lane_col(lane);
  for (int j = 0; j < 2; ++j)
    ::msl::store_element<T>(dst, ::msl::matrix_offset(r, c + j, elements_per_row, matrix_origin, transpose_matrix), a.elements.v[j]);
}
template <class TD, class TA, class TB, class TC>
MSL_FN void simdgroup_multiply_accumulate(simdgroup_matrix<TD, 8, 8>& d, const simdgroup_matrix<TA, 8, 8>& a,
                                          const simdgroup_matrix<TB, 8, 8>& b, const simdgroup_matrix<TC, 8, 8>& c,
                                          int site = MSL_SITE) {
  ::msl::MatArg<TD, TA, TB, TC> arg{&d, &a, &b, &c};
  ::msl::matmul_at(arg, site);
}
template <class TD, class TA, class TB>
MSL_FN void simdgroup_multiply(simdgroup_matrix<TD, 8, 8>& d, const simdgroup_matrix<TA, 8, 8>& a,
                               const simdgroup_matrix<TB, 8, 8>& b, int site = MSL_SITE) {
  ::msl::MatArg<TD, TA, TB, TD> arg{&d, &a, &b, nullptr};
  ::msl::matmul_at(arg, site);
}
template <class T>
MSL_FN simdgroup_matrix<T, 8, 8> operator*(const simdgroup_matrix<T, 8, 8>& a, const simdgroup_matrix<T, 8, 8>& b) {
  simdgroup_matrix<T, 8, 8> d;
  simdgroup_multiply(d, a, b);
  return d;
}
template <class T, int C, int R = C>
MSL_FN simdgroup_matrix<T, C, R> make_filled_simdgroup_matrix(T value) {
  simdgroup_matrix<T, C, R> m;
  m.elements = vec<T, 2>(value);
  return m;
}

// ---- atomics on device and threadgroup memory (relaxed ordering is all Metal offers) ----
// `object` is a device or threadgroup pointer to an atomic<T> (a msl::ptr, or an address).
#define MSL_ATOMIC_T typename ::msl::pointee<P>::type::value_type
template <class P> MSL_FN void atomic_store_explicit(P object, typename ::msl::identity<MSL_ATOMIC_T>::type v, memory_order) {
  ::msl::atomic_store(&::msl::address(object)->value, v); }
template <class P> MSL_FN MSL_ATOMIC_T atomic_load_explicit(P object, memory_order) {
  return ::msl::atomic_load(&::msl::address(object)->value); }
template <class P> MSL_FN MSL_ATOMIC_T atomic_exchange_explicit(P object, typename ::msl::identity<MSL_ATOMIC_T>::type v, memory_order) {
  return ::msl::atomic_exchange(&::msl::address(object)->value, v); }
template <class P> MSL_FN bool atomic_compare_exchange_weak_explicit(P object, MSL_ATOMIC_T* expected,
    typename ::msl::identity<MSL_ATOMIC_T>::type desired, memory_order, memory_order) {
  return ::msl::atomic_cas(&::msl::address(object)->value, expected, desired); }
#define MSL_ATOMIC_RMW(name, op)                                                                        \
  template <class P> MSL_FN MSL_ATOMIC_T atomic_fetch_##name##_explicit(P object,                       \
      typename ::msl::identity<MSL_ATOMIC_T>::type v, memory_order) {                                  \
    typedef MSL_ATOMIC_T T;                                                                            \
    T* value = &::msl::address(object)->value;                                                         \
    T old = ::msl::atomic_load(value);                                                                 \
    while (!::msl::atomic_cas(value, &old, T(op))) {}                                                  \
    return old; }
MSL_ATOMIC_RMW(add, old + v) MSL_ATOMIC_RMW(sub, old - v) MSL_ATOMIC_RMW(max, metal::max(old, v))
MSL_ATOMIC_RMW(min, metal::min(old, v)) MSL_ATOMIC_RMW(and, old & v) MSL_ATOMIC_RMW(or, old | v)
MSL_ATOMIC_RMW(xor, old ^ v)
#undef MSL_ATOMIC_RMW
#undef MSL_ATOMIC_T

}  // namespace metal

template <class T, int C, int R>
MSL_FN metal::simdgroup_matrix<T, C, R>::simdgroup_matrix(T diagonal) {
  int lane = (int)::msl::lane_id(), r = ::msl::lane_row(lane), c = ::msl::lane_col(lane);
  for (int j = 0; j < 2; ++j) elements.v[j] = r == c + j ? diagonal : T(0);
}
