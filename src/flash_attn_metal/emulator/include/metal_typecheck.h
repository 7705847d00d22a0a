// The Metal Shading Language declared for clang, for `emulator.typecheck`: types and signatures only, no code.
//
// Part 1, always included ahead of the source, is the language itself: the address spaces, the kernel marker, the
// scalar and vector types and the vector constructors. Part 2 is the Metal standard library, included only when the
// source includes <metal_stdlib> (or a sub-header), so that a source that forgets it fails as under Apple's compiler.
//
// device, constant and threadgroup are distinct clang address spaces (SYCL's global, private and local: typecheck.py
// runs clang with -fsycl-is-device), and thread is the default one (a local variable is a thread variable). So a
// pointer of one named space never converts to another, nor a thread pointer to a named one; and since the default
// space contains SYCL's, an object in any space copies, assigns and calls its methods as Metal allows. The price:
// a device pointer converts to a thread pointer here, where Metal refuses it (the emulator's pointer types refuse it
// too). Vectors are clang ext_vector types, so vectors of different element types never convert implicitly.
// typecheck.py rewrites the few spellings C++ lacks (threadgroup locals, half literals, attributes) before clang
// reads the source.

#ifndef METAL_TYPECHECK_LANGUAGE
#define METAL_TYPECHECK_LANGUAGE

#include "msl_constants.h"  // what Metal predefines: __METAL_VERSION__ and the rest, math constants

#define device __attribute__((opencl_global))
#define constant __attribute__((opencl_private)) const  // read-only, as in Metal
#define threadgroup __attribute__((opencl_local))
#define thread
#define kernel __attribute__((annotate("metal.kernel")))

typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong;  // 64-bit, as Metal's long
typedef _Float16 half;
typedef __bf16 bfloat;
typedef __SIZE_TYPE__ size_t;
typedef __PTRDIFF_TYPE__ ptrdiff_t;
typedef signed char int8_t;
typedef short int16_t;
typedef int int32_t;
typedef long int64_t;
typedef uchar uint8_t;
typedef ushort uint16_t;
typedef uint uint32_t;
typedef ulong uint64_t;

namespace metal {
template <class T, int N> using vec = T __attribute__((ext_vector_type(N)));
}
using metal::vec;

// Declared as ext_vector types themselves (the same types as vec<T, N>) so that diagnostics name them.
#define METAL_TC_VECTORS(T)                                                                                   \
  typedef T T##2 __attribute__((ext_vector_type(2)));                                                        \
  typedef T T##3 __attribute__((ext_vector_type(3)));                                                        \
  typedef T T##4 __attribute__((ext_vector_type(4)));
METAL_TC_VECTORS(bool) METAL_TC_VECTORS(char) METAL_TC_VECTORS(uchar) METAL_TC_VECTORS(short)
METAL_TC_VECTORS(ushort) METAL_TC_VECTORS(int) METAL_TC_VECTORS(uint) METAL_TC_VECTORS(long)
METAL_TC_VECTORS(ulong) METAL_TC_VECTORS(half) METAL_TC_VECTORS(bfloat) METAL_TC_VECTORS(float)
#undef METAL_TC_VECTORS

// Helpers of the shim itself; no MSL name lives here.
namespace metal_tc {
template <bool B, class T = void> struct enable_if {};
template <class T> struct enable_if<true, T> { typedef T type; };
template <class T> struct identity { typedef T type; };
template <class A, class B> struct is_same { static constexpr bool value = false; };
template <class A> struct is_same<A, A> { static constexpr bool value = true; };

template <class T> struct scalar_kind { static constexpr int value = 0; };  // 0: not a Metal scalar
#define METAL_TC_SCALAR(T, k) \
  template <> struct scalar_kind<T> { static constexpr int value = k; };
METAL_TC_SCALAR(bool, 1) METAL_TC_SCALAR(char, 2) METAL_TC_SCALAR(signed char, 2) METAL_TC_SCALAR(uchar, 2)
METAL_TC_SCALAR(short, 2) METAL_TC_SCALAR(ushort, 2) METAL_TC_SCALAR(int, 2) METAL_TC_SCALAR(uint, 2)
METAL_TC_SCALAR(long, 2) METAL_TC_SCALAR(ulong, 2) METAL_TC_SCALAR(half, 3) METAL_TC_SCALAR(bfloat, 3)
METAL_TC_SCALAR(float, 3)
#undef METAL_TC_SCALAR

// Element type and size of a scalar (size 1) or vector.
template <class T> struct shape {
  typedef T element;
  static constexpr int size = 1;
};
template <class T, int N> struct shape<T __attribute__((ext_vector_type(N)))> {
  typedef T element;
  static constexpr int size = N;
};
template <class T> struct shape<const T> : shape<T> {};
template <class T> constexpr bool is_float = scalar_kind<typename shape<T>::element>::value == 3;
template <class T> constexpr bool is_integer = scalar_kind<typename shape<T>::element>::value == 2;
template <class T> constexpr bool is_arithmetic = scalar_kind<typename shape<T>::element>::value >= 2;
template <class T> constexpr bool is_value = scalar_kind<typename shape<T>::element>::value >= 1 || __is_enum(T);
template <class T> constexpr bool is_vector = shape<T>::size > 1;
template <bool B, class A, class F> struct conditional_checked { static constexpr bool checked = A::checked; };
template <class A, class F> struct conditional_checked<false, A, F> { static constexpr bool checked = F::checked; };
template <bool B> using require = typename enable_if<B, int>::type;  // a default template argument: `= 0`
// The result of a relational function: bool for a scalar, a bool vector for a vector.
template <class T> struct bool_of { typedef bool type; };
template <class T, int N> struct bool_of<T __attribute__((ext_vector_type(N)))> {
  typedef bool type __attribute__((ext_vector_type(N)));
};

// A vector constructor: no argument (zero), one scalar (splat), or scalars and vectors whose element counts add
// up to the vector's; each element converts explicitly. Declared only: clang checks the call, nothing runs.
template <class V, class... A>
constexpr bool element_counts_add_up = (0 + ... + shape<A>::size) == shape<V>::size ||
                                       (sizeof...(A) == 1 && (0 + ... + shape<A>::size) == 1) || sizeof...(A) == 0;
template <class V, class... A> struct vector_constructor {
  static_assert((is_value<A> && ...), "a vector constructor takes scalars and vectors");
  static_assert(element_counts_add_up<V, A...>,
                "a vector constructor's arguments must supply exactly as many elements as the vector has");
  static constexpr bool checked = true;
};
template <class To, class From> struct bit_cast {
  static_assert(sizeof(To) == sizeof(From), "as_type<T>() needs a type of the same size");
  static constexpr bool checked = true;
};
template <class T> constexpr bool is_matrix_element = scalar_kind<T>::value == 3;
template <class T>
constexpr bool is_atomic_element = is_same<T, int>::value || is_same<T, uint>::value || is_same<T, bool>::value ||
                                   is_same<T, float>::value || is_same<T, ulong>::value;
// The checks run when a call instantiates the exception specification (no body to compile; as_type does the same).
template <class V, class... A> V make(A... a) noexcept(vector_constructor<V, A...>::checked);
// `T(x)` for a template parameter or alias T (typecheck.py rewrites it): a vector constructor for vectors, else any
// construction C++ allows.
template <class V, class... A> struct caster {
  static constexpr bool checked = vector_constructor<V, A...>::checked;
};
template <class V, class... A> struct constructs {
  static_assert(__is_constructible(V, A...), "no conversion to this type");
  static constexpr bool checked = true;
};
template <class V, class... A>
V cast(A... a) noexcept(conditional_checked<is_vector<V>, caster<V, A...>, constructs<V, A...>>::checked);
}  // namespace metal_tc

// float4(...) and friends construct vectors (a function-like macro expands only before a parenthesis;
// typecheck.py rewrites vec<T, N>(...) to the same call).
#define bool2(...) ::metal_tc::make<bool2>(__VA_ARGS__)
#define bool3(...) ::metal_tc::make<bool3>(__VA_ARGS__)
#define bool4(...) ::metal_tc::make<bool4>(__VA_ARGS__)
#define char2(...) ::metal_tc::make<char2>(__VA_ARGS__)
#define char3(...) ::metal_tc::make<char3>(__VA_ARGS__)
#define char4(...) ::metal_tc::make<char4>(__VA_ARGS__)
#define uchar2(...) ::metal_tc::make<uchar2>(__VA_ARGS__)
#define uchar3(...) ::metal_tc::make<uchar3>(__VA_ARGS__)
#define uchar4(...) ::metal_tc::make<uchar4>(__VA_ARGS__)
#define short2(...) ::metal_tc::make<short2>(__VA_ARGS__)
#define short3(...) ::metal_tc::make<short3>(__VA_ARGS__)
#define short4(...) ::metal_tc::make<short4>(__VA_ARGS__)
#define ushort2(...) ::metal_tc::make<ushort2>(__VA_ARGS__)
#define ushort3(...) ::metal_tc::make<ushort3>(__VA_ARGS__)
#define ushort4(...) ::metal_tc::make<ushort4>(__VA_ARGS__)
#define int2(...) ::metal_tc::make<int2>(__VA_ARGS__)
#define int3(...) ::metal_tc::make<int3>(__VA_ARGS__)
#define int4(...) ::metal_tc::make<int4>(__VA_ARGS__)
#define uint2(...) ::metal_tc::make<uint2>(__VA_ARGS__)
#define uint3(...) ::metal_tc::make<uint3>(__VA_ARGS__)
#define uint4(...) ::metal_tc::make<uint4>(__VA_ARGS__)
#define long2(...) ::metal_tc::make<long2>(__VA_ARGS__)
#define long3(...) ::metal_tc::make<long3>(__VA_ARGS__)
#define long4(...) ::metal_tc::make<long4>(__VA_ARGS__)
#define ulong2(...) ::metal_tc::make<ulong2>(__VA_ARGS__)
#define ulong3(...) ::metal_tc::make<ulong3>(__VA_ARGS__)
#define ulong4(...) ::metal_tc::make<ulong4>(__VA_ARGS__)
#define half2(...) ::metal_tc::make<half2>(__VA_ARGS__)
#define half3(...) ::metal_tc::make<half3>(__VA_ARGS__)
#define half4(...) ::metal_tc::make<half4>(__VA_ARGS__)
#define bfloat2(...) ::metal_tc::make<bfloat2>(__VA_ARGS__)
#define bfloat3(...) ::metal_tc::make<bfloat3>(__VA_ARGS__)
#define bfloat4(...) ::metal_tc::make<bfloat4>(__VA_ARGS__)
#define float2(...) ::metal_tc::make<float2>(__VA_ARGS__)
#define float3(...) ::metal_tc::make<float3>(__VA_ARGS__)
#define float4(...) ::metal_tc::make<float4>(__VA_ARGS__)

// Metal has no double (typecheck.py makes unsuffixed floating literals float, as Metal does).
#define double metal_has_no_double

#endif  // METAL_TYPECHECK_LANGUAGE

#if defined(METAL_TYPECHECK_STDLIB) && !defined(METAL_TYPECHECK_STDLIB_DONE)
#define METAL_TYPECHECK_STDLIB_DONE

#define METAL_FUNC inline __attribute__((always_inline))
#define INFINITY __builtin_inff()
#define NAN __builtin_nanf("")
#define MAXFLOAT 0x1.fffffep+127f
#define HUGE_VALF __builtin_inff()
#define MAXHALF __FLT16_MAX__

#include "msl_type_traits.h"
namespace metal {
// ---- <metal_type_traits> (the rest: msl_type_traits.h) ----
template <bool B, class T = void> using enable_if = metal_tc::enable_if<B, T>;
template <bool B, class T = void> using enable_if_t = typename metal_tc::enable_if<B, T>::type;
template <class A, class B> using is_same = metal_tc::is_same<A, B>;
template <class A, class B> constexpr bool is_same_v = metal_tc::is_same<A, B>::value;
template <class T> struct is_floating_point {
  static constexpr bool value = metal_tc::scalar_kind<remove_cv_t<T>>::value == 3;
};
template <class T> constexpr bool is_floating_point_v = is_floating_point<T>::value;
template <class T> struct is_integral { static constexpr bool value = metal_tc::scalar_kind<remove_cv_t<T>>::value == 2 ||
                                                                      metal_tc::scalar_kind<remove_cv_t<T>>::value == 1; };
template <class T> constexpr bool is_integral_v = is_integral<T>::value;
template <class T> struct is_arithmetic { static constexpr bool value = is_integral<T>::value || is_floating_point<T>::value; };
template <class T> constexpr bool is_arithmetic_v = is_arithmetic<T>::value;
template <class T> struct is_signed { static constexpr bool value = is_arithmetic<T>::value && T(-1) < T(0); };
template <class T> constexpr bool is_signed_v = is_signed<T>::value;
template <class T> struct is_unsigned { static constexpr bool value = is_integral<T>::value && !(T(-1) < T(0)); };
template <class T> constexpr bool is_unsigned_v = is_unsigned<T>::value;

// ---- packed vectors: a vector's elements with its element's alignment ----
// Declared as the vector types themselves, under-aligned, so that they convert, compute and copy from any address
// space as vectors do (the type check does not model packed_float3's 12-byte size).
template <class T, int N> using packed_vec = T __attribute__((ext_vector_type(N), aligned(sizeof(T))));
}  // namespace metal
#define METAL_TC_PACKED(T)                                                                                   \
  typedef T packed_##T##2 __attribute__((ext_vector_type(2), aligned(sizeof(T))));                          \
  typedef T packed_##T##3 __attribute__((ext_vector_type(3), aligned(sizeof(T))));                          \
  typedef T packed_##T##4 __attribute__((ext_vector_type(4), aligned(sizeof(T))));
METAL_TC_PACKED(char) METAL_TC_PACKED(uchar) METAL_TC_PACKED(short) METAL_TC_PACKED(ushort) METAL_TC_PACKED(int)
METAL_TC_PACKED(uint) METAL_TC_PACKED(long) METAL_TC_PACKED(ulong) METAL_TC_PACKED(half) METAL_TC_PACKED(bfloat)
METAL_TC_PACKED(float) METAL_TC_PACKED(bool)
#undef METAL_TC_PACKED
namespace metal {

// ---- numeric_limits: defined for Metal's scalar types only ----
template <class T> struct numeric_limits;
#define METAL_TC_LIMITS(T, is_float_, lo, hi, lowest_, eps, inf, nan, denorm)                               \
  template <> struct numeric_limits<T> {                                                                   \
    static constexpr bool is_specialized = true;                                                           \
    static constexpr bool is_integer = !is_float_;                                                         \
    static constexpr bool has_infinity = is_float_;                                                        \
    static constexpr bool has_quiet_NaN = is_float_;                                                       \
    static constexpr T min() { return lo; }                                                                \
    static constexpr T max() { return hi; }                                                                \
    static constexpr T lowest() { return lowest_; }                                                        \
    static constexpr T epsilon() { return eps; }                                                           \
    static constexpr T infinity() { return inf; }                                                          \
    static constexpr T quiet_NaN() { return nan; }                                                         \
    static constexpr T signaling_NaN() { return nan; }                                                     \
    static constexpr T denorm_min() { return denorm; }                                                     \
  };
METAL_TC_LIMITS(float, true, __FLT_MIN__, __FLT_MAX__, -__FLT_MAX__, __FLT_EPSILON__, __builtin_inff(),
                __builtin_nanf(""), __FLT_DENORM_MIN__)
METAL_TC_LIMITS(half, true, __FLT16_MIN__, __FLT16_MAX__, -__FLT16_MAX__, __FLT16_EPSILON__,
                (half)__builtin_inff(), (half)__builtin_nanf(""), __FLT16_DENORM_MIN__)
METAL_TC_LIMITS(bfloat, true, (bfloat)0x1p-126f, (bfloat)0x1.fep127f, (bfloat)-0x1.fep127f, (bfloat)0x1p-7f,
                (bfloat)__builtin_inff(), (bfloat)__builtin_nanf(""), (bfloat)0x1p-133f)
METAL_TC_LIMITS(bool, false, false, true, false, false, false, false, false)
METAL_TC_LIMITS(char, false, (char)-128, (char)127, (char)-128, 0, 0, 0, 0)
METAL_TC_LIMITS(uchar, false, 0, 255, 0, 0, 0, 0, 0)
METAL_TC_LIMITS(short, false, -32768, 32767, -32768, 0, 0, 0, 0)
METAL_TC_LIMITS(ushort, false, 0, 65535, 0, 0, 0, 0, 0)
METAL_TC_LIMITS(int, false, -__INT_MAX__ - 1, __INT_MAX__, -__INT_MAX__ - 1, 0, 0, 0, 0)
METAL_TC_LIMITS(uint, false, 0u, 2u * __INT_MAX__ + 1u, 0u, 0u, 0u, 0u, 0u)
METAL_TC_LIMITS(long, false, -__LONG_MAX__ - 1, __LONG_MAX__, -__LONG_MAX__ - 1, 0, 0, 0, 0)
METAL_TC_LIMITS(ulong, false, 0ul, 2ul * __LONG_MAX__ + 1ul, 0ul, 0ul, 0ul, 0ul, 0ul)
#undef METAL_TC_LIMITS

// Reinterpret the bits of a scalar or vector as another type of the same size.
template <class To, class From>
constexpr To as_type(From x) noexcept(metal_tc::bit_cast<To, From>::checked) { return __builtin_bit_cast(To, x); }

// ---- math on float, half and bfloat scalars and vectors ----
#define METAL_TC_FLOAT template <class T, metal_tc::require<metal_tc::is_float<T>> = 0>
#define METAL_TC_ARITH template <class T, metal_tc::require<metal_tc::is_arithmetic<T>> = 0>
#define METAL_TC_INT template <class T, metal_tc::require<metal_tc::is_integer<T>> = 0>
#define METAL_TC_VEC_SCALAR template <class T, int N, metal_tc::require<metal_tc::is_arithmetic<T>> = 0>
#define METAL_TC_UNARY(name) METAL_TC_FLOAT T name(T x);
METAL_TC_UNARY(exp) METAL_TC_UNARY(exp2) METAL_TC_UNARY(exp10) METAL_TC_UNARY(log) METAL_TC_UNARY(log2)
METAL_TC_UNARY(log10) METAL_TC_UNARY(sqrt) METAL_TC_UNARY(rsqrt) METAL_TC_UNARY(cbrt) METAL_TC_UNARY(sin)
METAL_TC_UNARY(cos) METAL_TC_UNARY(tan) METAL_TC_UNARY(asin) METAL_TC_UNARY(acos) METAL_TC_UNARY(atan)
METAL_TC_UNARY(sinh) METAL_TC_UNARY(cosh) METAL_TC_UNARY(tanh) METAL_TC_UNARY(asinh) METAL_TC_UNARY(acosh)
METAL_TC_UNARY(atanh) METAL_TC_UNARY(sinpi) METAL_TC_UNARY(cospi) METAL_TC_UNARY(tanpi) METAL_TC_UNARY(fabs)
METAL_TC_UNARY(floor) METAL_TC_UNARY(ceil) METAL_TC_UNARY(round) METAL_TC_UNARY(trunc) METAL_TC_UNARY(rint)
METAL_TC_UNARY(fract) METAL_TC_UNARY(sign) METAL_TC_UNARY(saturate) METAL_TC_UNARY(normalize)
#undef METAL_TC_UNARY
#define METAL_TC_BINARY(name) METAL_TC_FLOAT T name(T x, T y);
METAL_TC_BINARY(pow) METAL_TC_BINARY(powr) METAL_TC_BINARY(fmod) METAL_TC_BINARY(fmax) METAL_TC_BINARY(fmin)
METAL_TC_BINARY(fdim) METAL_TC_BINARY(copysign) METAL_TC_BINARY(atan2) METAL_TC_BINARY(step)
METAL_TC_BINARY(divide)
#undef METAL_TC_BINARY
METAL_TC_FLOAT T fma(T a, T b, T c);
METAL_TC_FLOAT T smoothstep(T edge0, T edge1, T x);
METAL_TC_FLOAT T mix(T x, T y, T a);
METAL_TC_VEC_SCALAR vec<T, N> mix(vec<T, N> x, vec<T, N> y, T a);
METAL_TC_FLOAT typename metal_tc::bool_of<T>::type isnan(T x);
METAL_TC_FLOAT typename metal_tc::bool_of<T>::type isinf(T x);
METAL_TC_FLOAT typename metal_tc::bool_of<T>::type isfinite(T x);
METAL_TC_FLOAT typename metal_tc::bool_of<T>::type isnormal(T x);
METAL_TC_FLOAT typename metal_tc::bool_of<T>::type signbit(T x);
template <class T, metal_tc::require<metal_tc::is_float<T> && metal_tc::is_vector<T>> = 0>
typename metal_tc::shape<T>::element dot(T x, T y);
template <class T, metal_tc::require<metal_tc::is_float<T> && metal_tc::is_vector<T>> = 0>
typename metal_tc::shape<T>::element length(T x);
template <class T, metal_tc::require<metal_tc::is_float<T> && metal_tc::is_vector<T>> = 0>
typename metal_tc::shape<T>::element length_squared(T x);
template <class T, metal_tc::require<metal_tc::is_float<T> && metal_tc::is_vector<T>> = 0>
typename metal_tc::shape<T>::element distance(T x, T y);
template <class T, metal_tc::require<metal_tc::is_float<T> && metal_tc::shape<T>::size == 3> = 0> T cross(T x, T y);

// ---- integer and float (common) functions ----
METAL_TC_ARITH T abs(T x);
METAL_TC_ARITH T min(T x, T y);
METAL_TC_ARITH T max(T x, T y);
METAL_TC_ARITH T min3(T x, T y, T z);
METAL_TC_ARITH T max3(T x, T y, T z);
METAL_TC_ARITH T median3(T x, T y, T z);
METAL_TC_ARITH T clamp(T x, T lo, T hi);
METAL_TC_VEC_SCALAR vec<T, N> min(vec<T, N> x, T y);
METAL_TC_VEC_SCALAR vec<T, N> max(vec<T, N> x, T y);
METAL_TC_VEC_SCALAR vec<T, N> clamp(vec<T, N> x, T lo, T hi);
METAL_TC_INT T absdiff(T x, T y);
METAL_TC_INT T mulhi(T x, T y);
METAL_TC_INT T rotate(T v, T i);
METAL_TC_INT T popcount(T x);
METAL_TC_INT T clz(T x);
METAL_TC_INT T ctz(T x);
METAL_TC_INT T reverse_bits(T x);
#undef METAL_TC_FLOAT
#undef METAL_TC_ARITH
#undef METAL_TC_INT
#undef METAL_TC_VEC_SCALAR

// ---- relational ----
template <class T, metal_tc::require<metal_tc::is_value<T> && !metal_tc::is_vector<T>> = 0> T select(T a, T b, bool c);
// c: a bool vector, or a vector comparison (clang types those as integer vectors, Metal as bool vectors).
template <class T, class C,
          metal_tc::require<metal_tc::is_vector<T> && metal_tc::shape<C>::size == metal_tc::shape<T>::size> = 0>
T select(T a, T b, C c);
template <class T, metal_tc::require<metal_tc::is_vector<T> || metal_tc::is_same<T, bool>::value> = 0> bool all(T x);
template <class T, metal_tc::require<metal_tc::is_vector<T> || metal_tc::is_same<T, bool>::value> = 0> bool any(T x);

// fast:: and precise:: spell the same functions with different accuracy.
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
namespace precise {
using namespace fast;
}  // namespace precise

// ---- barriers ----
enum class mem_flags : uint {
  mem_none = 0,
  mem_device = 1,
  mem_threadgroup = 2,
  mem_texture = 4,
  mem_threadgroup_imageblock = 16,
  mem_object_data = 32
};
constexpr mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(uint(a) | uint(b)); }
void threadgroup_barrier(mem_flags flags);
void simdgroup_barrier(mem_flags flags);

// ---- SIMD-group and quad-group functions (lane arguments are ushort) ----
#define METAL_TC_ARITH template <class T, metal_tc::require<metal_tc::is_arithmetic<T>> = 0>
#define METAL_TC_ANY template <class T, metal_tc::require<metal_tc::is_value<T>> = 0>
#define METAL_TC_INT template <class T, metal_tc::require<metal_tc::is_integer<T>> = 0>
#define METAL_TC_GROUP(g)                                                                                    \
  METAL_TC_ARITH T g##_sum(T x);                                                                            \
  METAL_TC_ARITH T g##_product(T x);                                                                        \
  METAL_TC_ARITH T g##_max(T x);                                                                            \
  METAL_TC_ARITH T g##_min(T x);                                                                            \
  METAL_TC_INT T g##_and(T x);                                                                              \
  METAL_TC_INT T g##_or(T x);                                                                               \
  METAL_TC_INT T g##_xor(T x);                                                                              \
  METAL_TC_ARITH T g##_prefix_inclusive_sum(T x);                                                           \
  METAL_TC_ARITH T g##_prefix_exclusive_sum(T x);                                                           \
  METAL_TC_ARITH T g##_prefix_inclusive_product(T x);                                                       \
  METAL_TC_ARITH T g##_prefix_exclusive_product(T x);                                                       \
  METAL_TC_ANY T g##_broadcast(T x, ushort lane);                                                           \
  METAL_TC_ANY T g##_broadcast_first(T x);                                                                  \
  METAL_TC_ANY T g##_shuffle(T x, ushort lane);                                                             \
  METAL_TC_ANY T g##_shuffle_xor(T x, ushort mask);                                                         \
  METAL_TC_ANY T g##_shuffle_up(T x, ushort delta);                                                         \
  METAL_TC_ANY T g##_shuffle_down(T x, ushort delta);                                                       \
  METAL_TC_ANY T g##_shuffle_rotate_up(T x, ushort delta);                                                  \
  METAL_TC_ANY T g##_shuffle_rotate_down(T x, ushort delta);                                                \
  METAL_TC_ANY T g##_shuffle_and_fill_up(T x, T filling, ushort delta);                                     \
  METAL_TC_ANY T g##_shuffle_and_fill_down(T x, T filling, ushort delta);                                   \
  METAL_TC_ANY T g##_shuffle_and_fill_up(T x, T filling, ushort delta, ushort modulo);                      \
  METAL_TC_ANY T g##_shuffle_and_fill_down(T x, T filling, ushort delta, ushort modulo);                    \
  bool g##_all(bool x);                                                                                     \
  bool g##_any(bool x);                                                                                     \
  bool g##_is_first();
METAL_TC_GROUP(simd)
METAL_TC_GROUP(quad)
#undef METAL_TC_GROUP
#undef METAL_TC_ARITH
#undef METAL_TC_ANY
#undef METAL_TC_INT

struct simd_vote {
  typedef ulong vote_t;
  explicit constexpr simd_vote(vote_t v = 0) : v_(v) {}
  explicit constexpr operator vote_t() const { return v_; }
  bool all() const;
  bool any() const;

 private:
  vote_t v_;
};
simd_vote simd_ballot(bool x);
simd_vote simd_active_threads_mask();

// ---- SIMD-group matrices ----
template <class T, int Cols, int Rows = Cols> struct simdgroup_matrix {
  static_assert(metal_tc::is_matrix_element<T>, "simdgroup_matrix holds float, half or bfloat");
  static_assert(Cols == 8 && Rows == 8, "simdgroup_matrix is 8x8");
  simdgroup_matrix() = default;
  explicit simdgroup_matrix(T diagonal);
  thread vec<T, 2>& thread_elements();
  const thread vec<T, 2>& thread_elements() const;

 private:
  vec<T, 2> elements_;
};
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;

template <class T, int Cols, int Rows = Cols> simdgroup_matrix<T, Cols, Rows> make_filled_simdgroup_matrix(T value);
template <class T, int Cols, int Rows>
void simdgroup_load(thread simdgroup_matrix<T, Cols, Rows>& d, const device T* src, ulong elements_per_row = Cols,
                    ulong2 matrix_origin = 0, bool transpose_matrix = false);
template <class T, int Cols, int Rows>
void simdgroup_load(thread simdgroup_matrix<T, Cols, Rows>& d, const threadgroup T* src,
                    ulong elements_per_row = Cols, ulong2 matrix_origin = 0, bool transpose_matrix = false);
template <class T, int Cols, int Rows>
void simdgroup_store(simdgroup_matrix<T, Cols, Rows> a, device T* dst, ulong elements_per_row = Cols,
                     ulong2 matrix_origin = 0, bool transpose_matrix = false);
template <class T, int Cols, int Rows>
void simdgroup_store(simdgroup_matrix<T, Cols, Rows> a, threadgroup T* dst, ulong elements_per_row = Cols,
                     ulong2 matrix_origin = 0, bool transpose_matrix = false);
// d = a * b + c. The inputs and the accumulator may differ in type (half inputs, float accumulator).
template <class TD, class TA, class TB, class TC, int Cols, int Rows, int K>
void simdgroup_multiply_accumulate(thread simdgroup_matrix<TD, Cols, Rows>& d,
                                   const thread simdgroup_matrix<TA, K, Rows>& a,
                                   const thread simdgroup_matrix<TB, Cols, K>& b,
                                   const thread simdgroup_matrix<TC, Cols, Rows>& c);
template <class TD, class TA, class TB, int Cols, int Rows, int K>
void simdgroup_multiply(thread simdgroup_matrix<TD, Cols, Rows>& d, const thread simdgroup_matrix<TA, K, Rows>& a,
                        const thread simdgroup_matrix<TB, Cols, K>& b);
template <class T, int Cols, int Rows, int K>
simdgroup_matrix<T, Cols, Rows> operator*(const thread simdgroup_matrix<T, K, Rows>& a,
                                          const thread simdgroup_matrix<T, Cols, K>& b);

// ---- atomics: in device or threadgroup memory only ----
enum memory_order { memory_order_relaxed, memory_order_acquire, memory_order_release, memory_order_acq_rel,
                    memory_order_seq_cst };
template <class T> struct atomic {
  static_assert(metal_tc::is_atomic_element<T>, "atomic<T> holds int, uint, bool, float or ulong");
  atomic(const atomic&) = delete;
  atomic& operator=(const atomic&) = delete;
  T metal_tc_value;  // public, so that an atomic stays an aggregate (typecheck.py initializes threadgroup ones)
};
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
typedef atomic<bool> atomic_bool;
typedef atomic<float> atomic_float;
typedef atomic<ulong> atomic_ulong;

#define METAL_TC_ADDABLE metal_tc::require<metal_tc::is_integer<T> || metal_tc::is_same<T, float>::value> = 0
#define METAL_TC_BITWISE metal_tc::require<metal_tc::is_integer<T>> = 0
#define METAL_TC_ATOMICS(space)                                                                              \
  template <class T>                                                                                        \
  void atomic_store_explicit(volatile space atomic<T>* object, typename metal_tc::identity<T>::type desired, \
                             memory_order order);                                                           \
  template <class T> T atomic_load_explicit(volatile space atomic<T>* object, memory_order order);          \
  template <class T>                                                                                        \
  T atomic_exchange_explicit(volatile space atomic<T>* object, typename metal_tc::identity<T>::type desired, \
                             memory_order order);                                                           \
  template <class T>                                                                                        \
  bool atomic_compare_exchange_weak_explicit(volatile space atomic<T>* object, thread T* expected,          \
                                             typename metal_tc::identity<T>::type desired,                  \
                                             memory_order success, memory_order failure);                   \
  template <class T, METAL_TC_ADDABLE>                                                                      \
  T atomic_fetch_add_explicit(volatile space atomic<T>* object, typename metal_tc::identity<T>::type operand, \
                              memory_order order);                                                          \
  template <class T, METAL_TC_ADDABLE>                                                                      \
  T atomic_fetch_sub_explicit(volatile space atomic<T>* object, typename metal_tc::identity<T>::type operand, \
                              memory_order order);                                                          \
  template <class T, METAL_TC_BITWISE>                                                                      \
  T atomic_fetch_and_explicit(volatile space atomic<T>* object, typename metal_tc::identity<T>::type operand, \
                              memory_order order);                                                          \
  template <class T, METAL_TC_BITWISE>                                                                      \
  T atomic_fetch_or_explicit(volatile space atomic<T>* object, typename metal_tc::identity<T>::type operand, \
                             memory_order order);                                                           \
  template <class T, METAL_TC_BITWISE>                                                                      \
  T atomic_fetch_xor_explicit(volatile space atomic<T>* object, typename metal_tc::identity<T>::type operand, \
                              memory_order order);                                                          \
  template <class T, METAL_TC_BITWISE>                                                                      \
  T atomic_fetch_min_explicit(volatile space atomic<T>* object, typename metal_tc::identity<T>::type operand, \
                              memory_order order);                                                          \
  template <class T, METAL_TC_BITWISE>                                                                      \
  T atomic_fetch_max_explicit(volatile space atomic<T>* object, typename metal_tc::identity<T>::type operand, \
                              memory_order order);
METAL_TC_ATOMICS(device)
METAL_TC_ATOMICS(threadgroup)
#undef METAL_TC_ATOMICS
#undef METAL_TC_ADDABLE
#undef METAL_TC_BITWISE
}  // namespace metal

#define FLT_MAX __FLT_MAX__
#define FLT_MIN __FLT_MIN__
#define FLT_EPSILON __FLT_EPSILON__
#define HALF_MAX __FLT16_MAX__
#define HALF_MIN __FLT16_MIN__
#define HALF_EPSILON __FLT16_EPSILON__

#endif  // METAL_TYPECHECK_STDLIB
