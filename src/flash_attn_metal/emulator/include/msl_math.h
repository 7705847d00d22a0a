// metal:: functions (with fast:: and precise:: spellings), numeric_limits and as_type.
// 16-bit floats are computed in float and rounded back, elementwise over vectors.
#pragma once
#include "msl_types.h"

#ifdef MSL_TARGET_CUDA
#define MSL_LIBM(name) name##f
#define MSL_ISNAN(x) __isnanf(x)
#define MSL_ISINF(x) __isinff(x)
#else
#define MSL_LIBM(name) __builtin_##name##f
#define MSL_ISNAN(x) __builtin_isnan(x)
#define MSL_ISINF(x) __builtin_isinf(x)
#endif

// MSL's float constants and limits (the spec's math constants section and <metal_numeric_limits>'s macros).
#define INFINITY (::msl::u2f(0x7f800000u))
#define NAN (::msl::u2f(0x7fc00000u))
#define MAXFLOAT 0x1.fffffep+127f
#define HUGE_VALF INFINITY
#define FLT_MAX 0x1.fffffep+127f
#define FLT_MIN 0x1p-126f
#define FLT_EPSILON 0x1p-23f
#define HALF_MAX (::msl::from_bits<half>(0x7bff))
#define MAXHALF HALF_MAX
#define HALF_MIN (::msl::from_bits<half>(0x0400))
#define HALF_EPSILON (::msl::from_bits<half>(0x1400))

namespace msl {
template <class T> MSL_FN constexpr T from_bits(ushort b) { T t{}; t.bits = b; return t; }
}  // namespace msl

namespace metal {

// numeric_limits, usable in constant expressions, for Metal's scalar types.
template <class T> struct numeric_limits { static constexpr bool is_specialized = false; };
#define MSL_LIMITS(T, is_float_, lo, hi, lowest_, eps, inf, nan, denorm)                                \
  template <> struct numeric_limits<T> {                                                              \
    static constexpr bool is_specialized = true;                                                      \
    static constexpr bool is_integer = !is_float_;                                                    \
    static constexpr bool is_signed = is_float_ || (T)(-1) < (T)0;                                     \
    static constexpr bool has_infinity = is_float_;                                                   \
    static constexpr bool has_quiet_NaN = is_float_;                                                  \
    MSL_FN static constexpr T min() { return lo; } MSL_FN static constexpr T max() { return hi; }     \
    MSL_FN static constexpr T lowest() { return lowest_; } MSL_FN static constexpr T epsilon() { return eps; } \
    MSL_FN static constexpr T infinity() { return inf; } MSL_FN static constexpr T quiet_NaN() { return nan; } \
    MSL_FN static constexpr T signaling_NaN() { return nan; }                                         \
    MSL_FN static constexpr T denorm_min() { return denorm; }                                         \
  };
MSL_LIMITS(float, true, msl::u2f(0x00800000u), msl::u2f(0x7f7fffffu), msl::u2f(0xff7fffffu), msl::u2f(0x34000000u),
           msl::u2f(0x7f800000u), msl::u2f(0x7fc00000u), msl::u2f(0x00000001u))
#define MSL_H(bits) msl::from_bits<half>(bits)
#define MSL_B(bits) msl::from_bits<bfloat>(bits)
MSL_LIMITS(half, true, MSL_H(0x0400), MSL_H(0x7bff), MSL_H(0xfbff), MSL_H(0x1400), MSL_H(0x7c00), MSL_H(0x7e00), MSL_H(0x0001))
MSL_LIMITS(bfloat, true, MSL_B(0x0080), MSL_B(0x7f7f), MSL_B(0xff7f), MSL_B(0x3c00), MSL_B(0x7f80), MSL_B(0x7fc0), MSL_B(0x0001))
#undef MSL_H
#undef MSL_B
MSL_LIMITS(bool, false, false, true, false, false, false, false, false)
MSL_LIMITS(char, false, (char)-128, (char)127, (char)-128, 0, 0, 0, 0)
MSL_LIMITS(signed char, false, (signed char)-128, (signed char)127, (signed char)-128, 0, 0, 0, 0)
MSL_LIMITS(uchar, false, (uchar)0, (uchar)255, (uchar)0, 0, 0, 0, 0)
MSL_LIMITS(short, false, (short)-32768, (short)32767, (short)-32768, 0, 0, 0, 0)
MSL_LIMITS(ushort, false, (ushort)0, (ushort)65535, (ushort)0, 0, 0, 0, 0)
MSL_LIMITS(int, false, (int)0x80000000u, 0x7fffffff, (int)0x80000000u, 0, 0, 0, 0)
MSL_LIMITS(uint, false, 0u, 0xffffffffu, 0u, 0u, 0u, 0u, 0u)
MSL_LIMITS(long, false, (long)(1ul << 63), (long)~(1ul << 63), (long)(1ul << 63), 0, 0, 0, 0)
MSL_LIMITS(ulong, false, 0ul, ~0ul, 0ul, 0ul, 0ul, 0ul, 0ul)
#undef MSL_LIMITS

// Reinterpret the bits of a scalar or vector as another type of the same size (a constant expression).
template <class To, class From> MSL_FN constexpr To as_type(const From& x) {
  static_assert(sizeof(To) == sizeof(From), "as_type needs types of the same size");
  return __builtin_bit_cast(To, x);
}

// Unary float functions over float, half, bfloat and their vectors.
#define MSL_UNARY(name, expr)                                                                          \
  MSL_FN float name(float x) { return expr; }                                                         \
  MSL_FN half name(half h) { float x = h; return half(expr); }                                        \
  MSL_FN bfloat name(bfloat h) { float x = h; return bfloat(expr); }                                  \
  template <class T, int N> MSL_FN vec<T, N> name(const vec<T, N>& a) {                               \
    vec<T, N> o; for (int i = 0; i < N; ++i) o.v[i] = name(a.v[i]); return o; }
MSL_UNARY(exp, MSL_LIBM(exp)(x)) MSL_UNARY(exp2, MSL_LIBM(exp2)(x)) MSL_UNARY(exp10, MSL_LIBM(pow)(10.0f, x))
MSL_UNARY(log, MSL_LIBM(log)(x)) MSL_UNARY(log2, MSL_LIBM(log2)(x)) MSL_UNARY(log10, MSL_LIBM(log10)(x))
MSL_UNARY(sqrt, MSL_LIBM(sqrt)(x)) MSL_UNARY(rsqrt, 1.0f / MSL_LIBM(sqrt)(x)) MSL_UNARY(tanh, MSL_LIBM(tanh)(x))
MSL_UNARY(sin, MSL_LIBM(sin)(x)) MSL_UNARY(cos, MSL_LIBM(cos)(x)) MSL_UNARY(tan, MSL_LIBM(tan)(x))
MSL_UNARY(fabs, MSL_LIBM(fabs)(x)) MSL_UNARY(floor, MSL_LIBM(floor)(x)) MSL_UNARY(ceil, MSL_LIBM(ceil)(x))
MSL_UNARY(round, MSL_LIBM(round)(x)) MSL_UNARY(trunc, MSL_LIBM(trunc)(x)) MSL_UNARY(rint, MSL_LIBM(rint)(x))
MSL_UNARY(fract, x - MSL_LIBM(floor)(x))
MSL_UNARY(sign, (x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : (MSL_ISNAN(x) ? 0.0f : x))))
#undef MSL_UNARY

// Binary float functions.
#define MSL_BINARY(name, expr)                                                                         \
  MSL_FN float name(float x, float y) { return expr; }                                                \
  MSL_FN half name(half a, half b) { float x = a, y = b; return half(expr); }                         \
  MSL_FN bfloat name(bfloat a, bfloat b) { float x = a, y = b; return bfloat(expr); }                 \
  template <class T, int N> MSL_FN vec<T, N> name(const vec<T, N>& a, const vec<T, N>& b) {           \
    vec<T, N> o; for (int i = 0; i < N; ++i) o.v[i] = name(a.v[i], b.v[i]); return o; }               \
  template <class T, int N> MSL_FN vec<T, N> name(const vec<T, N>& a, T b) { return name(a, vec<T, N>(b)); }
MSL_BINARY(pow, MSL_LIBM(pow)(x, y)) MSL_BINARY(powr, MSL_LIBM(pow)(x, y)) MSL_BINARY(fmod, MSL_LIBM(fmod)(x, y))
MSL_BINARY(fmax, MSL_LIBM(fmax)(x, y)) MSL_BINARY(fmin, MSL_LIBM(fmin)(x, y)) MSL_BINARY(copysign, MSL_LIBM(copysign)(x, y))
MSL_BINARY(atan2, MSL_LIBM(atan2)(x, y)) MSL_BINARY(step, (y < x ? 0.0f : 1.0f))
#undef MSL_BINARY

MSL_FN float fma(float a, float b, float c) { return MSL_LIBM(fma)(a, b, c); }
MSL_FN half fma(half a, half b, half c) { return half(MSL_LIBM(fma)((float)a, (float)b, (float)c)); }
MSL_FN bfloat fma(bfloat a, bfloat b, bfloat c) { return bfloat(MSL_LIBM(fma)((float)a, (float)b, (float)c)); }
template <class T, int N> MSL_FN vec<T, N> fma(const vec<T, N>& a, const vec<T, N>& b, const vec<T, N>& c) {
  vec<T, N> o; for (int i = 0; i < N; ++i) o.v[i] = fma(a.v[i], b.v[i], c.v[i]); return o; }

// min, max and clamp work on every scalar type; for floats they return the other operand of a NaN, like fmin.
template <class T, msl::enable_if_t<msl::is_scalar<T>::value, int> = 0> MSL_FN T max(T a, T b) {
  if (msl::is_float<T>::value && a != a) return b;
  return a < b ? b : a; }
template <class T, msl::enable_if_t<msl::is_scalar<T>::value, int> = 0> MSL_FN T min(T a, T b) {
  if (msl::is_float<T>::value && a != a) return b;
  return b < a ? b : a; }
template <class T, int N> MSL_FN vec<T, N> max(const vec<T, N>& a, const vec<T, N>& b) {
  vec<T, N> o; for (int i = 0; i < N; ++i) o.v[i] = max(a.v[i], b.v[i]); return o; }
template <class T, int N> MSL_FN vec<T, N> min(const vec<T, N>& a, const vec<T, N>& b) {
  vec<T, N> o; for (int i = 0; i < N; ++i) o.v[i] = min(a.v[i], b.v[i]); return o; }
template <class T, int N> MSL_FN vec<T, N> max(const vec<T, N>& a, T b) { return max(a, vec<T, N>(b)); }
template <class T, int N> MSL_FN vec<T, N> min(const vec<T, N>& a, T b) { return min(a, vec<T, N>(b)); }
template <class T> MSL_FN T clamp(const T& x, const T& lo, const T& hi) { return min(max(x, lo), hi); }
template <class T, int N> MSL_FN vec<T, N> clamp(const vec<T, N>& x, T lo, T hi) { return min(max(x, lo), hi); }

MSL_FN int abs(int x) { return x < 0 ? -x : x; }
MSL_FN long abs(long x) { return x < 0 ? -x : x; }
MSL_FN short abs(short x) { return x < 0 ? (short)-x : x; }
MSL_FN float abs(float x) { return fabs(x); }
MSL_FN half abs(half x) { return fabs(x); }
MSL_FN bfloat abs(bfloat x) { return fabs(x); }
template <class T, int N> MSL_FN vec<T, N> abs(const vec<T, N>& a) {
  vec<T, N> o; for (int i = 0; i < N; ++i) o.v[i] = abs(a.v[i]); return o; }

MSL_FN bool isnan(float x) { return MSL_ISNAN(x); }
MSL_FN bool isnan(half x) { return (x.bits & 0x7fffu) > 0x7c00u; }
MSL_FN bool isnan(bfloat x) { return (x.bits & 0x7fffu) > 0x7f80u; }
MSL_FN bool isinf(float x) { return MSL_ISINF(x); }
MSL_FN bool isinf(half x) { return (x.bits & 0x7fffu) == 0x7c00u; }
MSL_FN bool isinf(bfloat x) { return (x.bits & 0x7fffu) == 0x7f80u; }
template <class T> MSL_FN bool isfinite(T x) { return !isnan(x) && !isinf(x); }
template <class T> MSL_FN bool signbit(T x) { return (msl::f2u((float)x) >> 31) != 0; }
template <class T, int N> MSL_FN vec<bool, N> isnan(const vec<T, N>& a) {
  vec<bool, N> o; for (int i = 0; i < N; ++i) o.v[i] = isnan(a.v[i]); return o; }
template <class T, int N> MSL_FN vec<bool, N> isinf(const vec<T, N>& a) {
  vec<bool, N> o; for (int i = 0; i < N; ++i) o.v[i] = isinf(a.v[i]); return o; }

// select(a, b, c) is c ? b : a.
template <class T, msl::enable_if_t<msl::is_scalar<T>::value, int> = 0> MSL_FN T select(T a, T b, bool c) { return c ? b : a; }
template <class T, int N> MSL_FN vec<T, N> select(const vec<T, N>& a, const vec<T, N>& b, const vec<bool, N>& c) {
  vec<T, N> o; for (int i = 0; i < N; ++i) o.v[i] = c.v[i] ? b.v[i] : a.v[i]; return o; }
template <class T, int N> MSL_FN vec<T, N> select(const vec<T, N>& a, const vec<T, N>& b, bool c) { return c ? b : a; }
template <class T> MSL_FN T mix(const T& x, const T& y, const T& a) { return x + (y - x) * a; }
template <class T, int N> MSL_FN vec<T, N> mix(const vec<T, N>& x, const vec<T, N>& y, T a) { return x + (y - x) * a; }

template <int N> MSL_FN bool all(const vec<bool, N>& a) { for (int i = 0; i < N; ++i) if (!a.v[i]) return false; return true; }
template <int N> MSL_FN bool any(const vec<bool, N>& a) { for (int i = 0; i < N; ++i) if (a.v[i]) return true; return false; }
MSL_FN bool all(bool a) { return a; }
MSL_FN bool any(bool a) { return a; }

template <class T, int N> MSL_FN T dot(const vec<T, N>& a, const vec<T, N>& b) {
  float s = 0.0f; for (int i = 0; i < N; ++i) s += (float)a.v[i] * (float)b.v[i]; return T(s); }
template <class T, int N> MSL_FN T length(const vec<T, N>& a) { return sqrt(dot(a, a)); }

namespace fast { using metal::exp; using metal::exp2; using metal::log; using metal::log2; using metal::sqrt;
  using metal::rsqrt; using metal::tanh; using metal::sin; using metal::cos; using metal::pow; using metal::powr;
  using metal::fabs; using metal::abs; using metal::max; using metal::min; using metal::fmax; using metal::fmin;
  using metal::clamp; using metal::floor; using metal::ceil; using metal::round; using metal::trunc;
  using metal::exp10; using metal::log10; }
namespace precise = fast;

}  // namespace metal
