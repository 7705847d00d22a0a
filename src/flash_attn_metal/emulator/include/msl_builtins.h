// The metal:: functions built on a target's primitives (msl_cpu.h or msl_cuda.h): barriers, SIMD
// collectives, simdgroup_matrix load/store/multiply, atomics, and the builtin kernel attributes.
#pragma once

// Each barrier and collective knows its MSL line, so a divergence can be reported where it happens: a last
// parameter, `MSL_AT`, that a call cannot pass (its type converts from no argument a kernel could give).
#ifndef MSL_SITE
#define MSL_SITE __builtin_LINE()
#endif
namespace msl {
struct SiteTag {};
struct Site {
  int line;
  MSL_FN Site(SiteTag, int line_ = MSL_SITE) : line(line_) {}
  MSL_FN operator int() const { return line; }
};
}  // namespace msl
#define MSL_AT ::msl::Site site = ::msl::SiteTag()

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

MSL_FN void threadgroup_barrier(mem_flags, MSL_AT) { ::msl::threadgroup_barrier_at(site); }
MSL_FN void simdgroup_barrier(mem_flags, MSL_AT) { ::msl::simdgroup_barrier_at(site); }

// ---- SIMD-group functions (and quad-group ones, over groups of four lanes) ----
#define MSL_GROUP_REDUCTIONS(g, width)                                                                  \
  template <class T> MSL_FN T g##_sum(T x, MSL_AT) { return ::msl::reduce_at(x, ::msl::SumOp(), site, width); } \
  template <class T> MSL_FN T g##_product(T x, MSL_AT) { return ::msl::reduce_at(x, ::msl::ProductOp(), site, width); } \
  template <class T> MSL_FN T g##_max(T x, MSL_AT) { return ::msl::reduce_at(x, ::msl::MaxOp(), site, width); } \
  template <class T> MSL_FN T g##_min(T x, MSL_AT) { return ::msl::reduce_at(x, ::msl::MinOp(), site, width); } \
  template <class T> MSL_FN T g##_and(T x, MSL_AT) { return ::msl::reduce_at(x, ::msl::AndOp(), site, width); } \
  template <class T> MSL_FN T g##_or(T x, MSL_AT) { return ::msl::reduce_at(x, ::msl::OrOp(), site, width); } \
  template <class T> MSL_FN T g##_xor(T x, MSL_AT) { return ::msl::reduce_at(x, ::msl::XorOp(), site, width); } \
  MSL_FN bool g##_all(bool x, MSL_AT) { return ::msl::reduce_at<int>(x ? 1 : 0, ::msl::AndOp(), site, width) != 0; } \
  MSL_FN bool g##_any(bool x, MSL_AT) { return ::msl::reduce_at<int>(x ? 1 : 0, ::msl::OrOp(), site, width) != 0; } \
  template <class T> MSL_FN T g##_prefix_inclusive_sum(T x, MSL_AT) {                       \
    return ::msl::prefix_at(x, T(0), true, ::msl::SumOp(), site, width); }                               \
  template <class T> MSL_FN T g##_prefix_exclusive_sum(T x, MSL_AT) {                       \
    return ::msl::prefix_at(x, T(0), false, ::msl::SumOp(), site, width); }                              \
  template <class T> MSL_FN T g##_prefix_inclusive_product(T x, MSL_AT) {                   \
    return ::msl::prefix_at(x, T(1), true, ::msl::ProductOp(), site, width); }                           \
  template <class T> MSL_FN T g##_prefix_exclusive_product(T x, MSL_AT) {                   \
    return ::msl::prefix_at(x, T(1), false, ::msl::ProductOp(), site, width); }
MSL_GROUP_REDUCTIONS(simd, ::msl::SIMD_WIDTH)
MSL_GROUP_REDUCTIONS(quad, 4)
#undef MSL_GROUP_REDUCTIONS

// Shuffles within groups of `w` lanes: the source lane of lane l is base + index, base = l - l % w.
// A lane whose source falls outside its group keeps its own value (up/down) or wraps (rotate).
#define MSL_GROUP_SHUFFLES(g, w)                                                                        \
  template <class T> MSL_FN T g##_shuffle(T x, ushort lane, MSL_AT) {                      \
    int l = (int)::msl::lane_id(); return ::msl::shuffle_at(x, l - l % (w) + (int)lane % (w), site); }  \
  template <class T> MSL_FN T g##_broadcast(T x, ushort lane, MSL_AT) { return g##_shuffle(x, lane, site); } \
  template <class T> MSL_FN T g##_shuffle_xor(T x, ushort mask, MSL_AT) {                  \
    return ::msl::shuffle_at(x, (int)(::msl::lane_id() ^ (mask % (w))), site); }                        \
  template <class T> MSL_FN T g##_shuffle_up(T x, ushort delta, MSL_AT) {                  \
    int l = (int)::msl::lane_id(), i = l % (w) - (int)delta;                                            \
    return ::msl::shuffle_at(x, i < 0 ? l : l - l % (w) + i, site); }                                   \
  template <class T> MSL_FN T g##_shuffle_down(T x, ushort delta, MSL_AT) {                \
    int l = (int)::msl::lane_id(), i = l % (w) + (int)delta;                                            \
    return ::msl::shuffle_at(x, i >= (w) ? l : l - l % (w) + i, site); }                                \
  template <class T> MSL_FN T g##_shuffle_rotate_up(T x, ushort delta, MSL_AT) {           \
    int l = (int)::msl::lane_id(); int i = ((l % (w) - (int)delta) % (w) + (w)) % (w);                  \
    return ::msl::shuffle_at(x, l - l % (w) + i, site); }                                               \
  template <class T> MSL_FN T g##_shuffle_rotate_down(T x, ushort delta, MSL_AT) {         \
    int l = (int)::msl::lane_id(); int i = (l % (w) + (int)delta) % (w);                                \
    return ::msl::shuffle_at(x, l - l % (w) + i, site); }                                               \
  template <class T> MSL_FN T g##_shuffle_and_fill_up(T x, T filling, ushort delta, ushort modulo,      \
                                                     MSL_AT) {                             \
    int l = (int)::msl::lane_id(), m = modulo, base = l - l % m, i = l % m - (int)delta;                \
    T a = ::msl::shuffle_at(x, base + (i < 0 ? 0 : i), site);                                           \
    T b = ::msl::shuffle_at(filling, base + (i < 0 ? i + m : 0), site);                                 \
    return i < 0 ? b : a; }                                                                             \
  template <class T> MSL_FN T g##_shuffle_and_fill_down(T x, T filling, ushort delta, ushort modulo,    \
                                                       MSL_AT) {                           \
    int l = (int)::msl::lane_id(), m = modulo, base = l - l % m, i = l % m + (int)delta;                \
    T a = ::msl::shuffle_at(x, base + (i >= m ? m - 1 : i), site);                                      \
    T b = ::msl::shuffle_at(filling, base + (i >= m ? i - m : 0), site);                                \
    return i >= m ? b : a; }                                                                            \
  template <class T> MSL_FN T g##_shuffle_and_fill_up(T x, T filling, ushort delta, MSL_AT) { \
    return g##_shuffle_and_fill_up(x, filling, delta, ushort(w), site); }                               \
  template <class T> MSL_FN T g##_shuffle_and_fill_down(T x, T filling, ushort delta, MSL_AT) { \
    return g##_shuffle_and_fill_down(x, filling, delta, ushort(w), site); }                             \
  template <class T> MSL_FN T g##_broadcast_first(T x, MSL_AT) {                           \
    int l = (int)::msl::lane_id(), base = l - l % (w);                                                   \
    uint active = (uint)(::msl::ballot_at(true, site) >> 32) >> base;                                   \
    int first = 0;                                                                                      \
    while (first < (w) && !((active >> first) & 1u)) ++first;                                           \
    return ::msl::shuffle_at(x, base + first, site); }                                                  \
  MSL_FN bool g##_is_first(MSL_AT) {                                                       \
    int l = (int)::msl::lane_id(), base = l - l % (w);                                                   \
    uint active = (uint)(::msl::ballot_at(true, site) >> 32) >> base;                                   \
    return (active & ((1u << (l - base)) - 1u)) == 0; }
MSL_GROUP_SHUFFLES(simd, 32)
MSL_GROUP_SHUFFLES(quad, 4)
#undef MSL_GROUP_SHUFFLES

// The low 32 bits hold the votes; the high 32 bits the lanes that voted (for all()).
struct simd_vote {
  typedef ulong vote_t;
  ulong bits;
  MSL_FN explicit operator vote_t() const { return bits & 0xffffffffu; }
  MSL_FN bool all() const { return (bits & 0xffffffffu) == (bits >> 32); }
  MSL_FN bool any() const { return (bits & 0xffffffffu) != 0; }
};
MSL_FN simd_vote simd_ballot(bool x, MSL_AT) { return simd_vote{::msl::ballot_at(x, site)}; }
MSL_FN simd_vote simd_active_threads_mask(MSL_AT) { return simd_vote{::msl::ballot_at(true, site)}; }

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
                                          MSL_AT) {
  ::msl::MatArg<TD, TA, TB, TC> arg{&d, &a, &b, &c};
  ::msl::matmul_at(arg, site);
}
template <class TD, class TA, class TB>
MSL_FN void simdgroup_multiply(simdgroup_matrix<TD, 8, 8>& d, const simdgroup_matrix<TA, 8, 8>& a,
                               const simdgroup_matrix<TB, 8, 8>& b, MSL_AT) {
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
