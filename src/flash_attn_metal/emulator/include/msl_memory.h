// Pointers into Metal's address spaces, threadgroup variables, and the binding of kernel parameters.
//
// The translation spells `device T*`, `constant T*` and `threadgroup T*` as msl::ptr<T, space> (a `constant`
// pointee is const), so that functions overloaded on the address space stay distinct, and a `thread T*` as a
// plain pointer. In debug builds (MSL_DEBUG) every access through a msl::ptr is checked: it must lie inside its
// buffer (device and constant memory) or inside the threadgroup's memory, and be aligned as Metal requires
// (natural alignment: 8 bytes for a half4, 16 for a float4), which Apple GPUs do not check.
#pragma once

namespace msl {

enum Space { DEVICE = 1, CONSTANT = 2, THREADGROUP = 3 };

template <class I> struct is_index { static constexpr bool value = is_integer<I>::value || __is_enum(I); };
template <class From, class To> struct adds_const_only {  // From* converts to To* implicitly
  static constexpr bool value = is_same<From, To>::value || is_same<const From, To>::value;
};

// ptr<T, S> derives from ptr<const T, S>, so that a template parameter `const device T*` is deduced from a
// `device T*` argument, as for plain pointers. The const pointer holds the address and, in debug builds, the
// memory it may reach; the other adds mutable access.
template <class T, int S> struct ptr;

template <class T, int S>
struct ptr<const T, S> {
  typedef const T element_type;
  const T* p;
#ifdef MSL_DEBUG
  const char* lo;    // the memory's first byte; null when unknown (a cast from an address): alignment only
  const char* hi;    // one past its last byte
  int buffer;        // the [[buffer(i)]] index; -1 for threadgroup memory, -2 when unknown
  const char* name;  // the kernel parameter, or "threadgroup memory"
#endif

  ptr() = default;
  MSL_FN ptr(decltype(nullptr)) : p(nullptr) { unknown_extent(); }
  // An address: implicitly a threadgroup pointer (threadgroup arrays decay to addresses), explicitly (by a cast)
  // a device or constant one.
  template <class U, enable_if_t<S == THREADGROUP && adds_const_only<U, const T>::value, int> = 0>
  MSL_FN ptr(U* q) : p(q) { threadgroup_extent(); }
  template <class U, enable_if_t<!(S == THREADGROUP && adds_const_only<U, const T>::value), int> = 0>
  MSL_FN explicit ptr(U* q) : p((const T*)q) { if (S == THREADGROUP) threadgroup_extent(); else unknown_extent(); }
  // Another type's pointer into the same address space, by a cast.
  template <class U, enable_if_t<!adds_const_only<U, const T>::value, int> = 0>
  MSL_FN explicit ptr(const ptr<U, S>& o) : p((const T*)o.p) { extent_of(o); }
#ifdef MSL_DEBUG
  MSL_FN ptr(const T* p_, const char* lo_, const char* hi_, int buffer_, const char* name_)
      : p(p_), lo(lo_), hi(hi_), buffer(buffer_), name(name_) {}
#endif

  template <class U = const T> MSL_FN U* at(long i) const {
#ifdef MSL_DEBUG
    const char* a = (const char*)(p + i);
    if (lo && (a < lo || a + sizeof(U) > hi)) {
      report_out_of_bounds(buffer, name, (long)(a - lo), (long)sizeof(U), (long)(hi - lo));
      return (U*)out_of_bounds_sink();  // CUDA goes on (the host raises after the launch); the CPU never gets here
    }
    if ((ulong)a % alignof(U)) {
      report_misaligned(buffer, name, lo ? (long)(a - lo) : (long)(ulong)a, (long)sizeof(U), (long)alignof(U));
      return (U*)out_of_bounds_sink();
    }
#endif
    return (U*)(p + i);
  }
  template <class I, class U = const T, enable_if_t<is_index<I>::value, int> = 0>
  MSL_FN U& operator[](I i) const { return *at<U>((long)i); }
  template <class U = const T> MSL_FN U& operator*() const { return *at<U>(0); }
  MSL_FN const T* operator->() const { return at(0); }
  template <class I, enable_if_t<is_index<I>::value, int> = 0> MSL_FN ptr operator+(I i) const { ptr r = *this; r.p += (long)i; return r; }
  template <class I, enable_if_t<is_index<I>::value, int> = 0> MSL_FN ptr operator-(I i) const { ptr r = *this; r.p -= (long)i; return r; }
  template <class I, enable_if_t<is_index<I>::value, int> = 0> MSL_FN ptr& operator+=(I i) { p += (long)i; return *this; }
  template <class I, enable_if_t<is_index<I>::value, int> = 0> MSL_FN ptr& operator-=(I i) { p -= (long)i; return *this; }
  MSL_FN ptr& operator++() { ++p; return *this; }
  MSL_FN ptr& operator--() { --p; return *this; }
  MSL_FN ptr operator++(int) { ptr r = *this; ++p; return r; }
  MSL_FN ptr operator--(int) { ptr r = *this; --p; return r; }
  MSL_FN long operator-(const ptr& o) const { return p - o.p; }
  MSL_FN bool operator==(const ptr& o) const { return p == o.p; }
  MSL_FN bool operator!=(const ptr& o) const { return p != o.p; }
  MSL_FN bool operator<(const ptr& o) const { return p < o.p; }
  MSL_FN bool operator>(const ptr& o) const { return p > o.p; }
  MSL_FN bool operator<=(const ptr& o) const { return p <= o.p; }
  MSL_FN bool operator>=(const ptr& o) const { return p >= o.p; }
  MSL_FN bool operator==(decltype(nullptr)) const { return p == nullptr; }
  MSL_FN bool operator!=(decltype(nullptr)) const { return p != nullptr; }
  MSL_FN explicit operator bool() const { return p != nullptr; }

  template <class U> MSL_FN void extent_of(const ptr<U, S>& o) {
#ifdef MSL_DEBUG
    lo = o.lo; hi = o.hi; buffer = o.buffer; name = o.name;
#endif
  }
  MSL_FN void unknown_extent() {
#ifdef MSL_DEBUG
    lo = hi = nullptr; buffer = -2; name = "a pointer made from an address";
#endif
  }
  MSL_FN void threadgroup_extent() {
#ifdef MSL_DEBUG
    lo = threadgroup_arena(); hi = lo + threadgroup_arena_bytes(); buffer = -1; name = "threadgroup memory";
#endif
  }
};

template <class T, int S>
struct ptr : ptr<const T, S> {
  typedef ptr<const T, S> base;
  typedef T element_type;
  ptr() = default;
  MSL_FN ptr(decltype(nullptr)) : base(nullptr) {}
  template <class U, enable_if_t<S == THREADGROUP && adds_const_only<U, T>::value, int> = 0>
  MSL_FN ptr(U* q) : base(q) {}
  template <class U, enable_if_t<!(S == THREADGROUP && adds_const_only<U, T>::value), int> = 0>
  MSL_FN explicit ptr(U* q) : base((const T*)q) {}
  template <class U, enable_if_t<!is_same<U, T>::value, int> = 0>
  MSL_FN explicit ptr(const ptr<U, S>& o) : base(o) {}
  MSL_FN explicit ptr(const base& o) : base(o) {}  // const_cast
#ifdef MSL_DEBUG
  MSL_FN ptr(T* p_, const char* lo_, const char* hi_, int buffer_, const char* name_) : base(p_, lo_, hi_, buffer_, name_) {}
#endif

  template <class U = T> MSL_FN U* at(long i) const { return (U*)base::template at<U>(i); }
  template <class I, class U = T, enable_if_t<is_index<I>::value, int> = 0>
  MSL_FN U& operator[](I i) const { return *at<U>((long)i); }
  template <class U = T> MSL_FN U& operator*() const { return *at<U>(0); }
  MSL_FN T* operator->() const { return at(0); }
  template <class I, enable_if_t<is_index<I>::value, int> = 0> MSL_FN ptr operator+(I i) const { ptr r = *this; r.p += (long)i; return r; }
  template <class I, enable_if_t<is_index<I>::value, int> = 0> MSL_FN ptr operator-(I i) const { ptr r = *this; r.p -= (long)i; return r; }
  template <class I, enable_if_t<is_index<I>::value, int> = 0> MSL_FN ptr& operator+=(I i) { this->p += (long)i; return *this; }
  template <class I, enable_if_t<is_index<I>::value, int> = 0> MSL_FN ptr& operator-=(I i) { this->p -= (long)i; return *this; }
  MSL_FN ptr& operator++() { ++this->p; return *this; }
  MSL_FN ptr& operator--() { --this->p; return *this; }
  MSL_FN ptr operator++(int) { ptr r = *this; ++this->p; return r; }
  MSL_FN ptr operator--(int) { ptr r = *this; --this->p; return r; }
  using base::operator-;
};
template <class I, class T, int S, enable_if_t<is_index<I>::value, int> = 0>
MSL_FN ptr<T, S> operator+(I i, const ptr<T, S>& q) { return q + i; }

template <class P> struct is_ptr { static constexpr bool value = false; };
template <class T, int S> struct is_ptr<ptr<T, S>> { static constexpr bool value = true; };
template <class T, int S> struct is_ptr<const ptr<T, S>> { static constexpr bool value = true; };

// `reinterpret_cast<device half4*>(p)`: the same memory (and, in debug builds, the same bounds) as another type.
template <class To, class From> MSL_FN To pointer_cast(const From& from) { return To(from); }

// `&x[i]`: for a msl::ptr, a msl::ptr (its address space and bounds kept); for anything else, the address.
template <class X, class I, enable_if_t<is_ptr<typename remove_cvref<X>::type>::value, int> = 0>
MSL_FN typename remove_cvref<X>::type address_of(X&& x, I i) { return x + i; }
template <class X, class I, enable_if_t<!is_ptr<typename remove_cvref<X>::type>::value, int> = 0>
MSL_FN auto address_of(X&& x, I i) -> decltype(&x[i]) { return &x[i]; }

// A threadgroup array's name where it decays, and the address of one of its elements (or of a threadgroup
// scalar): threadgroup pointers.
template <class E, size_t N> MSL_FN ptr<E, THREADGROUP> tg_decay(E (&a)[N]) { return ptr<E, THREADGROUP>(&a[0]); }
template <class T> MSL_FN ptr<T, THREADGROUP> tg_address(T* a) { return ptr<T, THREADGROUP>(a); }

// The raw address behind a pointer of any kind (checked in debug builds), for the builtins that need one.
template <class T> MSL_FN T* address(T* p) { return p; }
template <class T, int S> MSL_FN T* address(const ptr<T, S>& p) { return p.at(0); }
template <class P> struct pointee;
template <class T> struct pointee<T*> { typedef T type; };
template <class T, int S> struct pointee<ptr<T, S>> { typedef T type; };

// ---- threadgroup variables ----
// Each threadgroup variable of a kernel is laid out at a compile-time offset of the threadgroup's memory, each
// 16-byte aligned as Metal aligns threadgroup allocations: site i's offset, or the total bytes for i = count.
constexpr ulong THREADGROUP_ALIGNMENT = 16;
MSL_FN constexpr ulong threadgroup_offset(int, ulong offset) { return offset; }
template <class... Sizes>
MSL_FN constexpr ulong threadgroup_offset(int site, ulong offset, ulong size, Sizes... rest) {
  return site == 0 ? offset : threadgroup_offset(site - 1, (offset + size + THREADGROUP_ALIGNMENT - 1) &
                                                               ~(THREADGROUP_ALIGNMENT - 1), rest...);
}
template <class T, ulong Offset> MSL_FN T& threadgroup_variable() {
  return *reinterpret_cast<T*>(threadgroup_arena() + Offset);
}

// ---- kernel parameters ----
// The type of parameter I of a function type.
template <int I, class... A> struct nth;
template <class A0, class... A> struct nth<0, A0, A...> { typedef A0 type; };
template <int I, class A0, class... A> struct nth<I, A0, A...> { typedef typename nth<I - 1, A...>::type type; };
template <class F> struct signature;
template <class... A> struct signature<void(A...)> { template <int I> using arg = typename nth<I, A...>::type; };

// A kernel parameter from a launch's buffer table: a pointer into a buffer, or a reference to a bound value.
template <class T> struct binder;
template <class T, int S> struct binder<ptr<T, S>> {
  MSL_FN static ptr<T, S> bind(const Launch* L, int i, const char* name) {
#ifdef MSL_DEBUG
    const char* base = (const char*)L->buffers[i];
    return ptr<T, S>((T*)base, base, base + L->buffer_bytes[i], i, name);
#else
    return ptr<T, S>((T*)L->buffers[i]);
#endif
  }
};
template <class T> struct binder<T*> {
  MSL_FN static T* bind(const Launch* L, int i, const char*) { return (T*)L->buffers[i]; }
};
template <class T> struct binder<T&> {
  MSL_FN static T& bind(const Launch* L, int i, const char*) { return *(T*)L->buffers[i]; }
};
template <class T> struct binder<const T> : binder<T> {};

// A builtin attribute value in the parameter's declared type (uint, ushort, uint2, uint3, ...).
template <class T> struct attr_cast {
  MSL_FN static T from(uint3 v) { return T(v.x); }
  MSL_FN static T from(uint v) { return T(v); }
};
template <class U> struct attr_cast<vec<U, 2>> {
  MSL_FN static vec<U, 2> from(uint3 v) { return vec<U, 2>(U(v.x), U(v.y)); }
};
template <class U> struct attr_cast<vec<U, 3>> {
  MSL_FN static vec<U, 3> from(uint3 v) { return vec<U, 3>(U(v.x), U(v.y), U(v.z)); }
};
template <class T> struct attr_cast<const T> : attr_cast<T> {};
template <class T, class V> MSL_FN T attr(V v) { return attr_cast<T>::from(v); }

}  // namespace msl
