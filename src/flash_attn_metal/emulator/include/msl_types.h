// Metal Shading Language types for the emulator, in portable C++17.
//
// Compiled by g++/clang for the CPU and by NVRTC for CUDA. It needs no system header. The scheduling
// primitives (barriers, SIMD collectives, simdgroup_matrix products) come from msl_cpu.h or msl_cuda.h,
// which include this file and define MSL_FN and the msl::target hooks first.
//
// Names live where Metal puts them, as the type check's shim (metal_typecheck.h) declares them: the scalar and
// vector types at global scope, the rest of the standard library in namespace metal. Kernels are compiled at
// global scope too, so their own functions overload Metal's (after `using namespace metal;`), as under Apple's
// compiler. The emulator's own helpers live in namespace msl.
#pragma once

#ifndef MSL_FN
#error "include msl_cpu.h or msl_cuda.h, not msl_types.h"
#endif

#include "msl_constants.h"

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;
typedef decltype(sizeof(0)) size_t;
typedef long ptrdiff_t;
typedef signed char int8_t;
typedef short int16_t;
typedef int int32_t;
typedef long int64_t;
typedef uchar uint8_t;
typedef ushort uint16_t;
typedef uint uint32_t;
typedef ulong uint64_t;

// ---- <metal_type_traits> (the rest: msl_type_traits.h) ----
#include "msl_type_traits.h"
namespace metal {
template <bool B, class T = void> struct enable_if {};
template <class T> struct enable_if<true, T> { typedef T type; };
template <bool B, class T = void> using enable_if_t = typename enable_if<B, T>::type;
template <class A, class B> struct is_same : false_type {};
template <class A> struct is_same<A, A> : true_type {};
template <class A, class B> constexpr bool is_same_v = is_same<A, B>::value;
template <class T> struct is_integral : false_type {};
#define MSL_INTEGRAL(T) template <> struct is_integral<T> : true_type {};
MSL_INTEGRAL(bool) MSL_INTEGRAL(char) MSL_INTEGRAL(signed char) MSL_INTEGRAL(unsigned char) MSL_INTEGRAL(short)
MSL_INTEGRAL(unsigned short) MSL_INTEGRAL(int) MSL_INTEGRAL(unsigned int) MSL_INTEGRAL(long)
MSL_INTEGRAL(unsigned long) MSL_INTEGRAL(long long) MSL_INTEGRAL(unsigned long long)
#undef MSL_INTEGRAL
template <class T> struct is_integral<const T> : is_integral<T> {};
template <class T> constexpr bool is_integral_v = is_integral<T>::value;
template <class T> struct is_floating_point : false_type {};  // float, half and bfloat: specialized below
template <class T> struct is_floating_point<const T> : is_floating_point<T> {};
template <class T> constexpr bool is_floating_point_v = is_floating_point<T>::value;
template <class T> struct is_arithmetic : integral_constant<bool, is_integral<T>::value || is_floating_point<T>::value> {};
template <class T> constexpr bool is_arithmetic_v = is_arithmetic<T>::value;
template <class T> struct is_signed : integral_constant<bool, is_arithmetic<T>::value && T(-1) < T(0)> {};
template <class T> constexpr bool is_signed_v = is_signed<T>::value;
template <class T> struct is_unsigned : integral_constant<bool, is_integral<T>::value && !(T(-1) < T(0))> {};
template <class T> constexpr bool is_unsigned_v = is_unsigned<T>::value;
}  // namespace metal

namespace msl {
using metal::enable_if_t;
using metal::is_same;
template <class T> struct remove_cvref { typedef typename metal::remove_cv<typename metal::remove_reference<T>::type>::type type; };
template <class T> struct is_integer { static constexpr bool value = metal::is_integral<T>::value; };
// Another name for the same type, so that template arguments are not deduced from a parameter.
template <class T> struct identity { typedef T type; };

// Bit casts, usable in constant expressions (so that half, bfloat and numeric_limits are literal types).
MSL_FN constexpr uint f2u(float f) { return __builtin_bit_cast(uint, f); }
MSL_FN constexpr float u2f(uint u) { return __builtin_bit_cast(float, u); }

// IEEE binary16, round to nearest even.
MSL_FN constexpr ushort float_to_half_bits(float f) {
  uint x = f2u(f);
  uint sign = (x >> 16) & 0x8000u;
  uint mag = x & 0x7fffffffu;
  if (mag >= 0x7f800000u) return (ushort)(sign | 0x7c00u | (mag > 0x7f800000u ? 0x200u | ((mag >> 13) & 0x3ffu) : 0u));
  if (mag >= 0x477ff000u) return (ushort)(sign | 0x7c00u);  // rounds to >= 65520: overflow to inf
  if (mag < 0x38800000u) {                                   // subnormal or zero in half
    if (mag < 0x33000000u) return (ushort)sign;              // below half the smallest subnormal
    uint e = mag >> 23;
    uint m = (mag & 0x7fffffu) | 0x800000u;
    uint shift = 126u - e;                                   // 14 + (112 - e) + 1 - 1
    uint half_m = m >> shift;
    uint rem = m & ((1u << shift) - 1u);
    uint halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (half_m & 1u))) half_m++;
    return (ushort)(sign | half_m);
  }
  uint r = mag - 0x38000000u;  // rebias exponent 127 -> 15
  uint half_bits = r >> 13;
  uint rem = r & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (half_bits & 1u))) half_bits++;
  return (ushort)(sign | half_bits);
}

MSL_FN constexpr float half_bits_to_float(ushort h) {
  uint sign = ((uint)h & 0x8000u) << 16;
  uint e = ((uint)h >> 10) & 0x1fu;
  uint m = (uint)h & 0x3ffu;
  if (e == 0x1fu) return u2f(sign | 0x7f800000u | (m << 13));
  if (e == 0) {
    if (m == 0) return u2f(sign);
    float v = (float)m * 5.9604644775390625e-8f;  // m * 2^-24
    return sign ? -v : v;
  }
  return u2f(sign | ((e + 112u) << 23) | (m << 13));
}

MSL_FN constexpr ushort float_to_bfloat_bits(float f) {
  uint x = f2u(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (ushort)((x >> 16) | 0x40u);  // keep NaN quiet
  x += 0x7fffu + ((x >> 16) & 1u);
  return (ushort)(x >> 16);
}

MSL_FN constexpr float bfloat_bits_to_float(ushort b) { return u2f((uint)b << 16); }

// Copy the bytes of one object into another (CUDA's shuffles and atomics); NVRTC has no __builtin_memcpy.
MSL_FN void copy_bytes(void* dst, const void* src, size_t n) {
#ifdef MSL_TARGET_CUDA
  for (size_t i = 0; i < n; ++i) ((char*)dst)[i] = ((const char*)src)[i];
#else
  __builtin_memcpy(dst, src, n);
#endif
}

// What the host passes to a launch: bound buffers (with their sizes, for debug bounds checks) and the grid.
constexpr int MAX_BUFFERS = 31;
struct Launch {
  void* buffers[MAX_BUFFERS];
  ulong buffer_bytes[MAX_BUFFERS];
  uint threads[3];     // threads per grid, per dimension
  uint group_size[3];  // threads per threadgroup, per dimension
};

}  // namespace msl

// ---- half and bfloat ----
// Literal types: conversions are constant expressions. Metal converts float to half implicitly, but float to
// bfloat only explicitly. Arithmetic on two halves (or two bfloats) rounds to that type after every operation,
// as native 16-bit ALUs do.
struct half {
  ushort bits;
  half() = default;
  template <class T, msl::enable_if_t<msl::is_integer<T>::value, int> = 0>
  MSL_FN constexpr half(T v) : bits(msl::float_to_half_bits((float)v)) {}
  MSL_FN constexpr half(float v) : bits(msl::float_to_half_bits(v)) {}
  MSL_FN constexpr half(double v) : bits(msl::float_to_half_bits((float)v)) {}
  MSL_FN constexpr operator float() const { return msl::half_bits_to_float(bits); }
};

struct bfloat {
  ushort bits;
  bfloat() = default;
  template <class T, msl::enable_if_t<msl::is_integer<T>::value, int> = 0>
  MSL_FN constexpr explicit bfloat(T v) : bits(msl::float_to_bfloat_bits((float)v)) {}
  MSL_FN constexpr explicit bfloat(float v) : bits(msl::float_to_bfloat_bits(v)) {}
  MSL_FN constexpr explicit bfloat(double v) : bits(msl::float_to_bfloat_bits((float)v)) {}
  MSL_FN constexpr explicit bfloat(half v) : bits(msl::float_to_bfloat_bits((float)v)) {}
  MSL_FN constexpr operator float() const { return msl::bfloat_bits_to_float(bits); }
};
typedef bfloat bfloat16_t;
typedef half float16_t;
typedef float float32_t;

namespace metal {
template <> struct is_floating_point<float> : true_type {};
template <> struct is_floating_point<half> : true_type {};
template <> struct is_floating_point<bfloat> : true_type {};
}  // namespace metal

namespace msl {
template <class T> struct is_low_float { static constexpr bool value = false; };
template <> struct is_low_float<half> { static constexpr bool value = true; };
template <> struct is_low_float<bfloat> { static constexpr bool value = true; };
template <class T> struct is_float { static constexpr bool value = is_low_float<T>::value; };
template <> struct is_float<float> { static constexpr bool value = true; };
template <> struct is_float<double> { static constexpr bool value = true; };
template <class T> struct is_scalar { static constexpr bool value = is_integer<T>::value || is_float<T>::value; };

// The usual arithmetic conversions with at least one 16-bit float operand.
template <class A, class B, class = void> struct low_arith {};
template <class T> struct low_arith<T, T, enable_if_t<is_low_float<T>::value>> { typedef T type; };
template <class L, class I> struct low_arith<L, I, enable_if_t<is_low_float<L>::value && is_integer<I>::value>> { typedef L type; };
template <class I, class L> struct low_arith<I, L, enable_if_t<is_integer<I>::value && is_low_float<L>::value>> { typedef L type; };
template <class L> struct low_arith<L, float, enable_if_t<is_low_float<L>::value>> { typedef float type; };
template <class L> struct low_arith<float, L, enable_if_t<is_low_float<L>::value>> { typedef float type; };
template <class L> struct low_arith<L, double, enable_if_t<is_low_float<L>::value>> { typedef float type; };
template <class L> struct low_arith<double, L, enable_if_t<is_low_float<L>::value>> { typedef float type; };
template <class A, class B> using low_arith_t = typename low_arith<A, B>::type;
}  // namespace msl

#define MSL_LOW_BINARY(op)                                                                            \
  template <class A, class B, class R = msl::low_arith_t<A, B>>                                       \
  MSL_FN constexpr R operator op(A a, B b) { return R((float)a op (float)b); }
MSL_LOW_BINARY(+) MSL_LOW_BINARY(-) MSL_LOW_BINARY(*) MSL_LOW_BINARY(/)
#undef MSL_LOW_BINARY
#define MSL_LOW_COMPARE(op)                                                                           \
  template <class A, class B, class R = msl::low_arith_t<A, B>>                                       \
  MSL_FN constexpr bool operator op(A a, B b) { return (float)a op (float)b; }
MSL_LOW_COMPARE(==) MSL_LOW_COMPARE(!=) MSL_LOW_COMPARE(<) MSL_LOW_COMPARE(>) MSL_LOW_COMPARE(<=) MSL_LOW_COMPARE(>=)
#undef MSL_LOW_COMPARE
#define MSL_LOW_COMPOUND(op)                                                                          \
  template <class L, class B, class = msl::enable_if_t<msl::is_low_float<L>::value && msl::is_scalar<B>::value>> \
  MSL_FN L& operator op##=(L& a, B b) { a = L((float)a op (float)b); return a; }
MSL_LOW_COMPOUND(+) MSL_LOW_COMPOUND(-) MSL_LOW_COMPOUND(*) MSL_LOW_COMPOUND(/)
#undef MSL_LOW_COMPOUND
MSL_FN constexpr half operator-(half a) { half r{}; r.bits = (ushort)(a.bits ^ 0x8000u); return r; }
MSL_FN constexpr bfloat operator-(bfloat a) { bfloat r{}; r.bits = (ushort)(a.bits ^ 0x8000u); return r; }
MSL_FN constexpr half operator+(half a) { return a; }
MSL_FN constexpr bfloat operator+(bfloat a) { return a; }

// ---- vectors ----
// vec<T, 3> is padded to four elements, as Metal lays out float3 (16 bytes) and half3 (8 bytes).
namespace msl {
template <class T, int N> struct vec_storage;
template <class T> struct vec_storage<T, 2> { union { T v[2]; struct { T x, y; }; struct { T r, g; }; }; };
template <class T> struct vec_storage<T, 3> { union { T v[4]; struct { T x, y, z; }; struct { T r, g, b; }; }; };
template <class T> struct vec_storage<T, 4> { union { T v[4]; struct { T x, y, z, w; }; struct { T r, g, b, a; }; }; };
// Packed vectors (packed_float3: 12 bytes) are aligned as their element is.
template <class T, int N> struct packed_storage;
template <class T> struct packed_storage<T, 2> { union { T v[2]; struct { T x, y; }; struct { T r, g; }; }; };
template <class T> struct packed_storage<T, 3> { union { T v[3]; struct { T x, y, z; }; struct { T r, g, b; }; }; };
template <class T> struct packed_storage<T, 4> { union { T v[4]; struct { T x, y, z, w; }; struct { T r, g, b, a; }; }; };
constexpr int vec_align(int size, int n) { return size * (n == 3 ? 4 : n); }
template <class T, int M, int... I> struct swizzle;
template <class T> struct components { static constexpr int value = 1; };
}  // namespace msl

namespace metal {
template <class T, int N> struct packed_vec;

template <class T, int N>
struct alignas(msl::vec_align(sizeof(T), N)) vec : msl::vec_storage<T, N> {
  static_assert(N >= 2 && N <= 4, "vectors have 2 to 4 elements");
  typedef T value_type;
  vec() = default;
  // A scalar widens to every element (implicitly, as in Metal).
  template <class S, msl::enable_if_t<msl::is_scalar<S>::value, int> = 0>
  MSL_FN vec(S s) { for (int i = 0; i < N; ++i) this->v[i] = T(s); }
  // Element-wise conversion from another element type must be spelled out: float4(h).
  template <class U, msl::enable_if_t<!msl::is_same<U, T>::value, int> = 0>
  MSL_FN explicit vec(const vec<U, N>& o) { for (int i = 0; i < N; ++i) this->v[i] = T(o.v[i]); }
  // A packed vector of the same element type converts implicitly, of another one explicitly.
  MSL_FN vec(const packed_vec<T, N>& o) { for (int i = 0; i < N; ++i) this->v[i] = o.v[i]; }
  template <class U, msl::enable_if_t<!msl::is_same<U, T>::value, int> = 0>
  MSL_FN explicit vec(const packed_vec<U, N>& o) { for (int i = 0; i < N; ++i) this->v[i] = T(o.v[i]); }
  // Concatenation of scalars and vectors whose sizes add up to N: float4(f2, 0.0f, 1.0f).
  template <class A, class B, class... R>
  MSL_FN vec(const A& a, const B& b, const R&... r) {
    static_assert(msl::components<A>::value + msl::components<B>::value + (0 + ... + msl::components<R>::value) == N,
                  "vector constructor arguments must supply exactly N elements");
    int k = 0;
    put(k, a); put(k, b); (put(k, r), ...);
  }
  template <class I> MSL_FN T& operator[](I i) { return this->v[i]; }
  template <class I> MSL_FN const T& operator[](I i) const { return this->v[i]; }
  template <int... I> MSL_FN msl::swizzle<T, N, I...> sw() { return msl::swizzle<T, N, I...>(*this); }
  template <int... I> MSL_FN vec<T, sizeof...(I)> sw() const { return vec<T, sizeof...(I)>(this->v[I]...); }

 private:
  template <class S> MSL_FN void put(int& k, const S& s) { this->v[k++] = T(s); }
  template <class U, int M> MSL_FN void put(int& k, const vec<U, M>& s) { for (int i = 0; i < M; ++i) this->v[k++] = T(s.v[i]); }
  template <class U, int M> MSL_FN void put(int& k, const packed_vec<U, M>& s) { for (int i = 0; i < M; ++i) this->v[k++] = T(s.v[i]); }
};

template <class T, int N>
struct packed_vec : msl::packed_storage<T, N> {
  typedef T value_type;
  packed_vec() = default;
  template <class S, msl::enable_if_t<msl::is_scalar<S>::value, int> = 0>
  MSL_FN packed_vec(S s) { for (int i = 0; i < N; ++i) this->v[i] = T(s); }
  MSL_FN packed_vec(const vec<T, N>& o) { for (int i = 0; i < N; ++i) this->v[i] = o.v[i]; }
  template <class U, msl::enable_if_t<!msl::is_same<U, T>::value, int> = 0>
  MSL_FN explicit packed_vec(const vec<U, N>& o) { for (int i = 0; i < N; ++i) this->v[i] = T(o.v[i]); }
  template <class A, class B, class... R>
  MSL_FN packed_vec(const A& a, const B& b, const R&... r) : packed_vec(vec<T, N>(a, b, r...)) {}
  template <class I> MSL_FN T& operator[](I i) { return this->v[i]; }
  template <class I> MSL_FN const T& operator[](I i) const { return this->v[i]; }
  template <int... I> MSL_FN vec<T, sizeof...(I)> sw() const { return vec<T, sizeof...(I)>(this->v[I]...); }
};
}  // namespace metal
using metal::vec;
using metal::packed_vec;

namespace msl {
template <class T, int N> struct components<vec<T, N>> { static constexpr int value = N; };
template <class T, int N> struct components<packed_vec<T, N>> { static constexpr int value = N; };

// A multi-element swizzle: a copy of the selected elements that writes back on assignment.
template <class T, int M, int... I>
struct swizzle : vec<T, sizeof...(I)> {
  typedef vec<T, sizeof...(I)> base;
  vec<T, M>* src;
  MSL_FN explicit swizzle(vec<T, M>& s) : base(s.v[I]...), src(&s) {}
  MSL_FN swizzle& operator=(const base& o) {
    int k = 0;
    ((src->v[I] = o.v[k++]), ...);
    static_cast<base&>(*this) = o;
    return *this;
  }
  MSL_FN swizzle& operator=(const swizzle& o) { return *this = static_cast<const base&>(o); }
#define MSL_SWIZZLE_COMPOUND(op) \
  template <class S> MSL_FN swizzle& operator op##=(const S& o) { return *this = base(static_cast<const base&>(*this) op o); }
  MSL_SWIZZLE_COMPOUND(+) MSL_SWIZZLE_COMPOUND(-) MSL_SWIZZLE_COMPOUND(*) MSL_SWIZZLE_COMPOUND(/)
#undef MSL_SWIZZLE_COMPOUND
};
}  // namespace msl

// Operators on vectors live in namespace metal, where argument-dependent lookup finds them. A packed vector
// operand counts as its vector.
namespace metal {
#define MSL_VEC_BINARY(op, R)                                                                          \
  template <class T, int N> MSL_FN vec<R, N> operator op(const vec<T, N>& a, const vec<T, N>& b) {     \
    vec<R, N> o; for (int i = 0; i < N; ++i) o.v[i] = a.v[i] op b.v[i]; return o; }                    \
  template <class T, int N, class S, msl::enable_if_t<msl::is_scalar<S>::value, int> = 0>              \
  MSL_FN vec<R, N> operator op(const vec<T, N>& a, S s) {                                              \
    vec<R, N> o; T b = T(s); for (int i = 0; i < N; ++i) o.v[i] = a.v[i] op b; return o; }             \
  template <class T, int N, class S, msl::enable_if_t<msl::is_scalar<S>::value, int> = 0>              \
  MSL_FN vec<R, N> operator op(S s, const vec<T, N>& b) {                                              \
    vec<R, N> o; T a = T(s); for (int i = 0; i < N; ++i) o.v[i] = a op b.v[i]; return o; }             \
  template <class T, int N> MSL_FN vec<R, N> operator op(const packed_vec<T, N>& a, const packed_vec<T, N>& b) { \
    return vec<T, N>(a) op vec<T, N>(b); }                                                             \
  template <class T, int N> MSL_FN vec<R, N> operator op(const packed_vec<T, N>& a, const vec<T, N>& b) { \
    return vec<T, N>(a) op b; }                                                                        \
  template <class T, int N> MSL_FN vec<R, N> operator op(const vec<T, N>& a, const packed_vec<T, N>& b) { \
    return a op vec<T, N>(b); }                                                                        \
  template <class T, int N, class S, msl::enable_if_t<msl::is_scalar<S>::value, int> = 0>              \
  MSL_FN vec<R, N> operator op(const packed_vec<T, N>& a, S s) { return vec<T, N>(a) op s; }          \
  template <class T, int N, class S, msl::enable_if_t<msl::is_scalar<S>::value, int> = 0>              \
  MSL_FN vec<R, N> operator op(S s, const packed_vec<T, N>& b) { return s op vec<T, N>(b); }
MSL_VEC_BINARY(+, T) MSL_VEC_BINARY(-, T) MSL_VEC_BINARY(*, T) MSL_VEC_BINARY(/, T) MSL_VEC_BINARY(%, T)
MSL_VEC_BINARY(&, T) MSL_VEC_BINARY(|, T) MSL_VEC_BINARY(^, T) MSL_VEC_BINARY(<<, T) MSL_VEC_BINARY(>>, T)
MSL_VEC_BINARY(==, bool) MSL_VEC_BINARY(!=, bool) MSL_VEC_BINARY(<, bool) MSL_VEC_BINARY(>, bool)
MSL_VEC_BINARY(<=, bool) MSL_VEC_BINARY(>=, bool) MSL_VEC_BINARY(&&, bool) MSL_VEC_BINARY(||, bool)
#undef MSL_VEC_BINARY

#define MSL_VEC_COMPOUND(op)                                                                           \
  template <class T, int N> MSL_FN vec<T, N>& operator op##=(vec<T, N>& a, const vec<T, N>& b) {       \
    for (int i = 0; i < N; ++i) a.v[i] = a.v[i] op b.v[i]; return a; }                                 \
  template <class T, int N, class S, msl::enable_if_t<msl::is_scalar<S>::value, int> = 0>              \
  MSL_FN vec<T, N>& operator op##=(vec<T, N>& a, S s) {                                                \
    T b = T(s); for (int i = 0; i < N; ++i) a.v[i] = a.v[i] op b; return a; }                          \
  template <class T, int N, class V>                                                                   \
  MSL_FN packed_vec<T, N>& operator op##=(packed_vec<T, N>& a, const V& b) {                           \
    vec<T, N> t = a; t op##= b; return a = t; }
MSL_VEC_COMPOUND(+) MSL_VEC_COMPOUND(-) MSL_VEC_COMPOUND(*) MSL_VEC_COMPOUND(/) MSL_VEC_COMPOUND(%)
MSL_VEC_COMPOUND(&) MSL_VEC_COMPOUND(|) MSL_VEC_COMPOUND(^) MSL_VEC_COMPOUND(<<) MSL_VEC_COMPOUND(>>)
#undef MSL_VEC_COMPOUND

template <class T, int N> MSL_FN vec<T, N> operator-(const vec<T, N>& a) { vec<T, N> o; for (int i = 0; i < N; ++i) o.v[i] = -a.v[i]; return o; }
template <class T, int N> MSL_FN vec<T, N> operator+(const vec<T, N>& a) { return a; }
template <class T, int N> MSL_FN vec<T, N> operator~(const vec<T, N>& a) { vec<T, N> o; for (int i = 0; i < N; ++i) o.v[i] = ~a.v[i]; return o; }
template <class T, int N> MSL_FN vec<bool, N> operator!(const vec<T, N>& a) { vec<bool, N> o; for (int i = 0; i < N; ++i) o.v[i] = !a.v[i]; return o; }
template <class T, int N> MSL_FN vec<T, N> operator-(const packed_vec<T, N>& a) { return -vec<T, N>(a); }
}  // namespace metal

#define MSL_VEC_TYPEDEFS(T, name)                                                                      \
  typedef vec<T, 2> name##2; typedef vec<T, 3> name##3; typedef vec<T, 4> name##4;                    \
  typedef packed_vec<T, 2> packed_##name##2; typedef packed_vec<T, 3> packed_##name##3;                \
  typedef packed_vec<T, 4> packed_##name##4;
MSL_VEC_TYPEDEFS(float, float) MSL_VEC_TYPEDEFS(half, half) MSL_VEC_TYPEDEFS(bfloat, bfloat)
MSL_VEC_TYPEDEFS(int, int) MSL_VEC_TYPEDEFS(uint, uint) MSL_VEC_TYPEDEFS(short, short)
MSL_VEC_TYPEDEFS(ushort, ushort) MSL_VEC_TYPEDEFS(char, char) MSL_VEC_TYPEDEFS(uchar, uchar)
MSL_VEC_TYPEDEFS(long, long) MSL_VEC_TYPEDEFS(ulong, ulong) MSL_VEC_TYPEDEFS(bool, bool)
#undef MSL_VEC_TYPEDEFS

// ---- address spaces and attributes ----
// The translation turns `device T*`, `constant T*` and `threadgroup T*` into msl::ptr (msl_memory.h), so that
// functions overloaded on them stay distinct; what remains of the keywords (references, `thread`) is erased.
#define device
#define constant
#define threadgroup
#define thread
#define METAL_FUNC inline

namespace metal {
// ---- atomics ----
template <class T> struct atomic { typedef T value_type; T value; };
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
typedef atomic<float> atomic_float;
typedef atomic<bool> atomic_bool;
typedef atomic<ulong> atomic_ulong;
enum memory_order { memory_order_relaxed, memory_order_acquire, memory_order_release, memory_order_acq_rel,
                    memory_order_seq_cst };

// ---- barriers' memory flags ----
enum class mem_flags : uint { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4,
                             mem_threadgroup_imageblock = 16, mem_object_data = 32 };
MSL_FN constexpr mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags((uint)a | (uint)b); }

// ---- simdgroup_matrix: each of the 32 lanes holds two elements (see lane_coordinates) ----
template <class T, int Cols, int Rows = Cols>
struct simdgroup_matrix {
  static_assert(Cols == 8 && Rows == 8, "only 8x8 simdgroup matrices exist");
  vec<T, 2> elements;
  simdgroup_matrix() = default;
  MSL_FN explicit simdgroup_matrix(T diagonal);  // defined by the target: needs the lane index
  MSL_FN vec<T, 2>& thread_elements() { return elements; }
  MSL_FN const vec<T, 2>& thread_elements() const { return elements; }
};
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;
}  // namespace metal

namespace msl {
using metal::simdgroup_matrix;
// Apple's lane layout of an 8x8 simdgroup_matrix: lane l holds row 4*(l/16) + (l/2)%4,
// columns c and c+1 with c = 4*((l/8)%2) + 2*(l%2).
MSL_FN int lane_row(int lane) { return 4 * (lane / 16) + (lane / 2) % 4; }
MSL_FN int lane_col(int lane) { return 4 * ((lane / 8) % 2) + 2 * (lane % 2); }
}  // namespace msl
