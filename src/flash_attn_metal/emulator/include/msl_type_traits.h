// The part of <metal_type_traits> that the emulator's runtime (msl_types.h) and the type check's shim
// (metal_typecheck.h) declare alike; each declares the rest (enable_if, is_same and the type classifications) its
// own way. Plain C++17, no functions; needs the typedefs uchar, ushort, uint and ulong.
#pragma once

namespace metal {
template <class T, T v> struct integral_constant { static constexpr T value = v; typedef T value_type; };
typedef integral_constant<bool, true> true_type;
typedef integral_constant<bool, false> false_type;
template <bool B, class T, class F> struct conditional { typedef T type; };
template <class T, class F> struct conditional<false, T, F> { typedef F type; };
template <bool B, class T, class F> using conditional_t = typename conditional<B, T, F>::type;
template <class T> struct remove_cv { typedef T type; };
template <class T> struct remove_cv<const T> { typedef T type; };
template <class T> struct remove_cv<volatile T> { typedef T type; };
template <class T> struct remove_cv<const volatile T> { typedef T type; };
template <class T> using remove_cv_t = typename remove_cv<T>::type;
template <class T> struct remove_reference { typedef T type; };
template <class T> struct remove_reference<T&> { typedef T type; };
template <class T> struct remove_reference<T&&> { typedef T type; };
template <class T> using remove_reference_t = typename remove_reference<T>::type;
template <class T> struct make_unsigned {};
template <> struct make_unsigned<char> { typedef uchar type; };
template <> struct make_unsigned<signed char> { typedef uchar type; };
template <> struct make_unsigned<uchar> { typedef uchar type; };
template <> struct make_unsigned<short> { typedef ushort type; };
template <> struct make_unsigned<ushort> { typedef ushort type; };
template <> struct make_unsigned<int> { typedef uint type; };
template <> struct make_unsigned<uint> { typedef uint type; };
template <> struct make_unsigned<long> { typedef ulong type; };
template <> struct make_unsigned<ulong> { typedef ulong type; };
template <class T> using make_unsigned_t = typename make_unsigned<T>::type;
template <class T> struct make_signed {};
template <> struct make_signed<char> { typedef signed char type; };
template <> struct make_signed<signed char> { typedef signed char type; };
template <> struct make_signed<uchar> { typedef signed char type; };
template <> struct make_signed<short> { typedef short type; };
template <> struct make_signed<ushort> { typedef short type; };
template <> struct make_signed<int> { typedef int type; };
template <> struct make_signed<uint> { typedef int type; };
template <> struct make_signed<long> { typedef long type; };
template <> struct make_signed<ulong> { typedef long type; };
template <class T> using make_signed_t = typename make_signed<T>::type;
}  // namespace metal
