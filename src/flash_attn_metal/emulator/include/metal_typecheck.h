// A freestanding declaration of the Metal standard library for clang: only types and signatures, no code.
// device, constant and threadgroup are distinct address spaces, and vectors are ext_vector types, so clang
// rejects what Apple's compiler rejects for types and address spaces (a threadgroup pointer passed where a
// device pointer is expected, an implicit conversion between vectors of different element types, an
// undeclared function).
#pragma once

#define device __attribute__((address_space(1)))
#define constant __attribute__((address_space(2)))
#define threadgroup __attribute__((address_space(3)))
#define thread
#define kernel
#define METAL_FUNC inline

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;
typedef __SIZE_TYPE__ size_t;
typedef __PTRDIFF_TYPE__ ptrdiff_t;
typedef _Float16 half;
typedef __bf16 bfloat;

#define INFINITY (__builtin_inff())
#define NAN (__builtin_nanf(""))
#define MAXFLOAT 3.402823466e+38f
#define HUGE_VALF (__builtin_inff())
#define M_E_F 2.71828182845904523536f
#define M_LOG2E_F 1.44269504088896340736f
#define M_LOG10E_F 0.434294481903251827651f
#define M_LN2_F 0.693147180559945309417f
#define M_LN10_F 2.30258509299404568402f
#define M_PI_F 3.14159265358979323846f
#define M_SQRT2_F 1.41421356237309504880f

template <class T, int N> using vec = T __attribute__((ext_vector_type(N)));

#define MSL_TC_VECTORS(T, name)                                                                       \
  typedef T name##2 __attribute__((ext_vector_type(2)));                                              \
  typedef T name##3 __attribute__((ext_vector_type(3)));                                              \
  typedef T name##4 __attribute__((ext_vector_type(4)));
MSL_TC_VECTORS(float, float) MSL_TC_VECTORS(half, half) MSL_TC_VECTORS(bfloat, bfloat)
MSL_TC_VECTORS(int, int) MSL_TC_VECTORS(uint, uint) MSL_TC_VECTORS(short, short)
MSL_TC_VECTORS(ushort, ushort) MSL_TC_VECTORS(char, char) MSL_TC_VECTORS(uchar, uchar)
MSL_TC_VECTORS(long, long) MSL_TC_VECTORS(ulong, ulong) MSL_TC_VECTORS(bool, bool)
#undef MSL_TC_VECTORS

namespace metal_tc {
template <bool B, class T = void> struct enable_if {};
template <class T> struct enable_if<true, T> { typedef T type; };
template <class T> struct vector_info { static constexpr int size = 1; typedef T element; };
template <class T, int N> struct vector_info<T __attribute__((ext_vector_type(N)))> {
  static constexpr int size = N;
  typedef T element;
};
template <class V, class A> inline void put(V& v, int& k, A a) {
  if constexpr (vector_info<A>::size == 1) {
    v[k++] = (typename vector_info<V>::element)a;
  } else {
    for (int i = 0; i < vector_info<A>::size; ++i) v[k++] = (typename vector_info<V>::element)a[i];
  }
}
// A vector constructor: one scalar (broadcast), one vector of as many elements (converted), or scalars and
// vectors whose sizes add up to the vector's.
template <class V, class... A> inline V make(A... a) {
  constexpr int given = (0 + ... + vector_info<A>::size);
  static_assert(given == vector_info<V>::size || (sizeof...(A) == 1 && given == 1),
                "vector constructor arguments must supply exactly as many elements as the vector has");
  V v;
  int k = 0;
  if constexpr (sizeof...(A) == 1 && given == 1) {
    ((v = (typename vector_info<V>::element)a), ...);
  } else {
    (put(v, k, a), ...);
  }
  return v;
}
}  // namespace metal_tc

// float4(...) and friends construct vectors (a function-like macro only expands before a parenthesis).
#define float2(...) ::metal_tc::make<float2>(__VA_ARGS__)
#define float3(...) ::metal_tc::make<float3>(__VA_ARGS__)
#define float4(...) ::metal_tc::make<float4>(__VA_ARGS__)
#define half2(...) ::metal_tc::make<half2>(__VA_ARGS__)
#define half3(...) ::metal_tc::make<half3>(__VA_ARGS__)
#define half4(...) ::metal_tc::make<half4>(__VA_ARGS__)
#define bfloat2(...) ::metal_tc::make<bfloat2>(__VA_ARGS__)
#define bfloat3(...) ::metal_tc::make<bfloat3>(__VA_ARGS__)
#define bfloat4(...) ::metal_tc::make<bfloat4>(__VA_ARGS__)
#define int2(...) ::metal_tc::make<int2>(__VA_ARGS__)
#define int3(...) ::metal_tc::make<int3>(__VA_ARGS__)
#define int4(...) ::metal_tc::make<int4>(__VA_ARGS__)
#define uint2(...) ::metal_tc::make<uint2>(__VA_ARGS__)
#define uint3(...) ::metal_tc::make<uint3>(__VA_ARGS__)
#define uint4(...) ::metal_tc::make<uint4>(__VA_ARGS__)
#define short2(...) ::metal_tc::make<short2>(__VA_ARGS__)
#define short3(...) ::metal_tc::make<short3>(__VA_ARGS__)
#define short4(...) ::metal_tc::make<short4>(__VA_ARGS__)
#define ushort2(...) ::metal_tc::make<ushort2>(__VA_ARGS__)
#define ushort3(...) ::metal_tc::make<ushort3>(__VA_ARGS__)
#define ushort4(...) ::metal_tc::make<ushort4>(__VA_ARGS__)
#define char2(...) ::metal_tc::make<char2>(__VA_ARGS__)
#define char3(...) ::metal_tc::make<char3>(__VA_ARGS__)
#define char4(...) ::metal_tc::make<char4>(__VA_ARGS__)
#define uchar2(...) ::metal_tc::make<uchar2>(__VA_ARGS__)
#define uchar3(...) ::metal_tc::make<uchar3>(__VA_ARGS__)
#define uchar4(...) ::metal_tc::make<uchar4>(__VA_ARGS__)
#define long2(...) ::metal_tc::make<long2>(__VA_ARGS__)
#define long3(...) ::metal_tc::make<long3>(__VA_ARGS__)
#define long4(...) ::metal_tc::make<long4>(__VA_ARGS__)
#define ulong2(...) ::metal_tc::make<ulong2>(__VA_ARGS__)
#define ulong3(...) ::metal_tc::make<ulong3>(__VA_ARGS__)
#define ulong4(...) ::metal_tc::make<ulong4>(__VA_ARGS__)
#define bool2(...) ::metal_tc::make<bool2>(__VA_ARGS__)
#define bool3(...) ::metal_tc::make<bool3>(__VA_ARGS__)
#define bool4(...) ::metal_tc::make<bool4>(__VA_ARGS__)

struct atomic_int { int value; };
struct atomic_uint { uint value; };
struct atomic_float { float value; };
struct atomic_bool { bool value; };
enum memory_order { memory_order_relaxed, memory_order_seq_cst };
enum class mem_flags : uint { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4,
                             mem_threadgroup_imageblock = 16, mem_object_data = 32 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags((uint)a | (uint)b); }

template <class T, int Cols, int Rows> struct simdgroup_matrix {
  static_assert(Cols == 8 && Rows == 8, "only 8x8 simdgroup matrices exist");
  simdgroup_matrix();
  explicit simdgroup_matrix(T diagonal);
  thread vec<T, 2>& thread_elements();
};
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;

namespace metal {
template <class T> struct is_float_like { static constexpr bool value = false; };
template <> struct is_float_like<float> { static constexpr bool value = true; };
template <> struct is_float_like<half> { static constexpr bool value = true; };
template <> struct is_float_like<bfloat> { static constexpr bool value = true; };
template <class T, int N> struct is_float_like<T __attribute__((ext_vector_type(N)))> {
  static constexpr bool value = is_float_like<T>::value;
};
#define MSL_TC_FLOAT_FN(name) \
  template <class T, class = typename metal_tc::enable_if<is_float_like<T>::value>::type> T name(T x);
MSL_TC_FLOAT_FN(exp) MSL_TC_FLOAT_FN(exp2) MSL_TC_FLOAT_FN(exp10) MSL_TC_FLOAT_FN(log) MSL_TC_FLOAT_FN(log2)
MSL_TC_FLOAT_FN(log10) MSL_TC_FLOAT_FN(sqrt) MSL_TC_FLOAT_FN(rsqrt) MSL_TC_FLOAT_FN(tanh) MSL_TC_FLOAT_FN(sin)
MSL_TC_FLOAT_FN(cos) MSL_TC_FLOAT_FN(tan) MSL_TC_FLOAT_FN(fabs) MSL_TC_FLOAT_FN(floor) MSL_TC_FLOAT_FN(ceil)
MSL_TC_FLOAT_FN(round) MSL_TC_FLOAT_FN(trunc) MSL_TC_FLOAT_FN(rint) MSL_TC_FLOAT_FN(fract) MSL_TC_FLOAT_FN(sign)
#undef MSL_TC_FLOAT_FN
#define MSL_TC_FLOAT_FN2(name) \
  template <class T, class = typename metal_tc::enable_if<is_float_like<T>::value>::type> T name(T x, T y);
MSL_TC_FLOAT_FN2(pow) MSL_TC_FLOAT_FN2(powr) MSL_TC_FLOAT_FN2(fmod) MSL_TC_FLOAT_FN2(fmax) MSL_TC_FLOAT_FN2(fmin)
MSL_TC_FLOAT_FN2(copysign) MSL_TC_FLOAT_FN2(atan2) MSL_TC_FLOAT_FN2(step)
#undef MSL_TC_FLOAT_FN2
template <class T> T fma(T a, T b, T c);
template <class T> T abs(T x);
template <class T> T min(T a, T b);
template <class T> T max(T a, T b);
template <class T> T clamp(T x, T lo, T hi);
template <class T, class C> T select(T a, T b, C c);
template <class T> T mix(T x, T y, T a);
template <class T> bool isnan(T x);
template <class T> bool isinf(T x);
template <class T> bool isfinite(T x);
template <class T> bool signbit(T x);
template <class V> bool all(V v);
template <class V> bool any(V v);
template <class V> typename metal_tc::vector_info<V>::element dot(V a, V b);
template <class V> typename metal_tc::vector_info<V>::element length(V a);
template <class To, class From> To as_type(From x);
template <class T> struct numeric_limits {
  static T min(); static T max(); static T lowest(); static T epsilon(); static T infinity();
  static T quiet_NaN(); static T denorm_min();
};
namespace fast { using metal::exp; using metal::exp2; using metal::log; using metal::log2; using metal::sqrt;
  using metal::rsqrt; using metal::tanh; using metal::sin; using metal::cos; using metal::pow; using metal::powr;
  using metal::fabs; using metal::abs; using metal::max; using metal::min; using metal::fmax; using metal::fmin;
  using metal::clamp; using metal::floor; using metal::ceil; using metal::round; using metal::trunc;
  using metal::exp10; using metal::log10; }
namespace precise = fast;

void threadgroup_barrier(mem_flags flags);
void simdgroup_barrier(mem_flags flags);
template <class T> T simd_sum(T x);
template <class T> T simd_product(T x);
template <class T> T simd_max(T x);
template <class T> T simd_min(T x);
template <class T> T simd_and(T x);
template <class T> T simd_or(T x);
template <class T> T simd_xor(T x);
template <class T> T simd_prefix_inclusive_sum(T x);
template <class T> T simd_prefix_exclusive_sum(T x);
template <class T> T simd_shuffle(T x, ushort lane);
template <class T> T simd_shuffle_xor(T x, ushort mask);
template <class T> T simd_shuffle_up(T x, ushort delta);
template <class T> T simd_shuffle_down(T x, ushort delta);
template <class T> T simd_broadcast(T x, ushort lane);
struct simd_vote {
  typedef ulong vote_t;
  explicit operator vote_t() const;
  bool all() const;
  bool any() const;
};
simd_vote simd_ballot(bool x);
bool simd_all(bool x);
bool simd_any(bool x);
bool simd_is_first();

template <class T> void simdgroup_load(thread simdgroup_matrix<T, 8, 8>& d, const device T* src,
                                       ulong elements_per_row = 8, ulong2 matrix_origin = 0, bool transpose = false);
template <class T> void simdgroup_load(thread simdgroup_matrix<T, 8, 8>& d, const threadgroup T* src,
                                       ulong elements_per_row = 8, ulong2 matrix_origin = 0, bool transpose = false);
template <class T> void simdgroup_store(simdgroup_matrix<T, 8, 8> a, device T* dst,
                                        ulong elements_per_row = 8, ulong2 matrix_origin = 0, bool transpose = false);
template <class T> void simdgroup_store(simdgroup_matrix<T, 8, 8> a, threadgroup T* dst,
                                        ulong elements_per_row = 8, ulong2 matrix_origin = 0, bool transpose = false);
template <class TD, class TA, class TB, class TC>
void simdgroup_multiply_accumulate(thread simdgroup_matrix<TD, 8, 8>& d, thread const simdgroup_matrix<TA, 8, 8>& a,
                                   thread const simdgroup_matrix<TB, 8, 8>& b, thread const simdgroup_matrix<TC, 8, 8>& c);
template <class TD, class TA, class TB>
void simdgroup_multiply(thread simdgroup_matrix<TD, 8, 8>& d, thread const simdgroup_matrix<TA, 8, 8>& a,
                        thread const simdgroup_matrix<TB, 8, 8>& b);
template <class T> simdgroup_matrix<T, 8, 8> operator*(simdgroup_matrix<T, 8, 8> a, simdgroup_matrix<T, 8, 8> b);
template <class T, int C, int R> simdgroup_matrix<T, C, R> make_filled_simdgroup_matrix(T value);

template <class A, class T> void atomic_store_explicit(A* obj, T v, memory_order order);
template <class A> auto atomic_load_explicit(A* obj, memory_order order) -> decltype(obj->value);
template <class A, class T> auto atomic_exchange_explicit(A* obj, T v, memory_order order) -> decltype(obj->value);
template <class A, class T> bool atomic_compare_exchange_weak_explicit(A* obj, thread T* expected, T desired,
                                                                       memory_order success, memory_order failure);
#define MSL_TC_ATOMIC(name) \
  template <class A, class T> auto atomic_fetch_##name##_explicit(A* obj, T v, memory_order order) -> decltype(obj->value);
MSL_TC_ATOMIC(add) MSL_TC_ATOMIC(sub) MSL_TC_ATOMIC(max) MSL_TC_ATOMIC(min) MSL_TC_ATOMIC(and) MSL_TC_ATOMIC(or)
MSL_TC_ATOMIC(xor)
#undef MSL_TC_ATOMIC
}  // namespace metal
