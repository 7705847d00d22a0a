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
MSL_UNARY(asin, MSL_LIBM(asin)(x)) MSL_UNARY(acos, MSL_LIBM(acos)(x)) MSL_UNARY(atan, MSL_LIBM(atan)(x))
MSL_UNARY(sinh, MSL_LIBM(sinh)(x)) MSL_UNARY(cosh, MSL_LIBM(cosh)(x)) MSL_UNARY(asinh, MSL_LIBM(asinh)(x))
MSL_UNARY(acosh, MSL_LIBM(acosh)(x)) MSL_UNARY(atanh, MSL_LIBM(atanh)(x)) MSL_UNARY(cbrt, MSL_LIBM(cbrt)(x))
MSL_UNARY(sinpi, MSL_LIBM(sin)(M_PI_F * x)) MSL_UNARY(cospi, MSL_LIBM(cos)(M_PI_F * x))
MSL_UNARY(tanpi, MSL_LIBM(tan)(M_PI_F * x))
MSL_UNARY(saturate, (x > 0.0f ? (x < 1.0f ? x : 1.0f) : 0.0f))
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
MSL_BINARY(fdim, (x > y ? x - y : (MSL_ISNAN(x) || MSL_ISNAN(y) ? x + y : 0.0f))) MSL_BINARY(divide, x / y)
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

template <class T> MSL_FN T smoothstep(T edge0, T edge1, T x) {
  T t = clamp(T((x - edge0) / (edge1 - edge0)), T(0), T(1));
  return t * t * (T(3) - T(2) * t);
}
MSL_FN bool isnormal(float x) { uint e = (msl::f2u(x) >> 23) & 0xffu; return e != 0 && e != 0xffu; }
MSL_FN bool isnormal(half x) { uint e = (x.bits >> 10) & 0x1fu; return e != 0 && e != 0x1fu; }
MSL_FN bool isnormal(bfloat x) { uint e = (x.bits >> 7) & 0xffu; return e != 0 && e != 0xffu; }
template <class T, int N> MSL_FN vec<bool, N> isnormal(const vec<T, N>& a) {
  vec<bool, N> o; for (int i = 0; i < N; ++i) o.v[i] = isnormal(a.v[i]); return o; }
template <class T, int N> MSL_FN T length_squared(const vec<T, N>& a) { return dot(a, a); }
template <class T, int N> MSL_FN T distance(const vec<T, N>& a, const vec<T, N>& b) { return length(a - b); }
template <class T, int N> MSL_FN vec<T, N> normalize(const vec<T, N>& a) { return a * rsqrt(dot(a, a)); }
template <class T> MSL_FN vec<T, 3> cross(const vec<T, 3>& a, const vec<T, 3>& b) {
  return vec<T, 3>(a.y * b.z - a.z * b.y, a.z * b.x - a.x * b.z, a.x * b.y - a.y * b.x); }

// ---- integer functions, on every integer type and its vectors ----
#define MSL_INT_TEMPLATE template <class T, msl::enable_if_t<msl::is_integer<T>::value, int> = 0>
MSL_INT_TEMPLATE MSL_FN T absdiff(T x, T y) { return x > y ? T(x - y) : T(y - x); }
MSL_INT_TEMPLATE MSL_FN T popcount(T x) {
  typename make_unsigned<T>::type u = x; T n = 0;
  for (; u; u &= u - 1) ++n;
  return n; }
MSL_INT_TEMPLATE MSL_FN T clz(T x) {
  typename make_unsigned<T>::type u = x; T n = 0;
  for (int b = (int)sizeof(T) * 8 - 1; b >= 0 && !((u >> b) & 1u); --b) ++n;
  return n; }
MSL_INT_TEMPLATE MSL_FN T ctz(T x) {
  typename make_unsigned<T>::type u = x; T n = 0;
  for (int b = 0; b < (int)sizeof(T) * 8 && !((u >> b) & 1u); ++b) ++n;
  return n; }
MSL_INT_TEMPLATE MSL_FN T reverse_bits(T x) {
  typedef typename make_unsigned<T>::type U; U u = x, r = 0;
  for (int b = 0; b < (int)sizeof(T) * 8; ++b) r = (U)((r << 1) | ((u >> b) & 1u));
  return (T)r; }
MSL_INT_TEMPLATE MSL_FN T rotate(T v, T i) {
  typedef typename make_unsigned<T>::type U; const int w = (int)sizeof(T) * 8; int k = (int)((U)i % (U)w);
  return k == 0 ? v : (T)(((U)v << k) | ((U)v >> (w - k))); }
MSL_INT_TEMPLATE MSL_FN T mulhi(T x, T y) {  // the high half of the full product
  constexpr bool is_signed = (T)(-1) < (T)0;
  if constexpr (sizeof(T) == 8) {
#ifdef MSL_TARGET_CUDA
    return is_signed ? (T)__mul64hi((long long)x, (long long)y) : (T)__umul64hi((unsigned long long)x, (unsigned long long)y);
#else
    return is_signed ? (T)(((__int128)x * (__int128)y) >> 64) : (T)(((unsigned __int128)x * (unsigned __int128)y) >> 64);
#endif
  } else {
    return is_signed ? (T)(((long)x * (long)y) >> (sizeof(T) * 8)) : (T)(((ulong)x * (ulong)y) >> (sizeof(T) * 8));
  }
}
#undef MSL_INT_TEMPLATE
template <class T> MSL_FN T max3(T x, T y, T z) { return max(max(x, y), z); }
template <class T> MSL_FN T min3(T x, T y, T z) { return min(min(x, y), z); }
template <class T> MSL_FN T median3(T x, T y, T z) { return max(min(x, y), min(max(x, y), z)); }
#define MSL_VEC_INT(name)                                                                              \
  template <class T, int N> MSL_FN vec<T, N> name(const vec<T, N>& a) {                               \
    vec<T, N> o; for (int i = 0; i < N; ++i) o.v[i] = name(a.v[i]); return o; }
MSL_VEC_INT(popcount) MSL_VEC_INT(clz) MSL_VEC_INT(ctz) MSL_VEC_INT(reverse_bits)
#undef MSL_VEC_INT
#define MSL_VEC_INT2(name)                                                                             \
  template <class T, int N> MSL_FN vec<T, N> name(const vec<T, N>& a, const vec<T, N>& b) {           \
    vec<T, N> o; for (int i = 0; i < N; ++i) o.v[i] = name(a.v[i], b.v[i]); return o; }
MSL_VEC_INT2(absdiff) MSL_VEC_INT2(rotate) MSL_VEC_INT2(mulhi)
#undef MSL_VEC_INT2

// fast:: and precise:: spell the same functions (the emulator computes both precisely).
namespace fast {
using metal::acos; using metal::acosh; using metal::asin; using metal::asinh; using metal::atan; using metal::atan2;
using metal::atanh; using metal::ceil; using metal::clamp; using metal::copysign; using metal::cos; using metal::cosh;
using metal::cospi; using metal::divide; using metal::exp; using metal::exp10; using metal::exp2; using metal::fabs;
using metal::fdim; using metal::floor; using metal::fma; using metal::fmax; using metal::fmin; using metal::fmod;
using metal::fract; using metal::log; using metal::log10; using metal::log2; using metal::max; using metal::min;
using metal::pow; using metal::powr; using metal::rint; using metal::round; using metal::rsqrt; using metal::saturate;
using metal::sign; using metal::sin; using metal::sinh; using metal::sinpi; using metal::sqrt; using metal::tan;
using metal::tanh; using metal::tanpi; using metal::trunc; using metal::normalize; using metal::length;
using metal::distance;
}  // namespace fast
namespace precise = fast;

}  // namespace metal
