// Debug builds: device and constant pointers carry their buffer's bounds and check every access.
// The translation rewrites `device T*` and `constant T*` types to msl::dptr<T>.
#pragma once

namespace msl {

template <class I> struct is_index { static constexpr bool value = is_integer<I>::value || __is_enum(I); };

template <class T>
struct dptr {
  T* p;
  char* lo;  // the bound buffer's first byte
  char* hi;  // one past its last byte
  int buffer;
  const char* name;

  dptr() = default;
  MSL_FN dptr(decltype(nullptr)) : p(nullptr), lo(nullptr), hi(nullptr), buffer(-1), name("null") {}
  MSL_FN dptr(T* p_, char* lo_, char* hi_, int buffer_, const char* name_)
      : p(p_), lo(lo_), hi(hi_), buffer(buffer_), name(name_) {}
  // Adding const is implicit, as for raw pointers; any other pointer conversion must be a cast.
  template <class U, enable_if_t<is_same<const U, T>::value && !is_same<U, T>::value, int> = 0>
  MSL_FN dptr(const dptr<U>& o) : p(o.p), lo(o.lo), hi(o.hi), buffer(o.buffer), name(o.name) {}
  template <class U, enable_if_t<!is_same<const U, T>::value && !is_same<U, T>::value, int> = 0>
  MSL_FN explicit dptr(const dptr<U>& o) : p((T*)o.p), lo(o.lo), hi(o.hi), buffer(o.buffer), name(o.name) {}

  MSL_FN T* checked(long i) const {
    char* at = (char*)(p + i);
    if (at < lo || at + sizeof(T) > hi) {
      report_out_of_bounds(buffer, name, (long)((at - lo) / (long)sizeof(T)), (long)((hi - lo) / (long)sizeof(T)));
      return (T*)out_of_bounds_sink();  // CUDA goes on (the host raises after the launch); the CPU never gets here
    }
    return p + i;
  }
  template <class I, enable_if_t<is_index<I>::value, int> = 0> MSL_FN T& operator[](I i) const { return *checked((long)i); }
  MSL_FN T& operator*() const { return *checked(0); }
  MSL_FN T* operator->() const { return checked(0); }
  template <class I, enable_if_t<is_index<I>::value, int> = 0> MSL_FN dptr operator+(I i) const { dptr r = *this; r.p += (long)i; return r; }
  template <class I, enable_if_t<is_index<I>::value, int> = 0> MSL_FN dptr operator-(I i) const { dptr r = *this; r.p -= (long)i; return r; }
  template <class I, enable_if_t<is_index<I>::value, int> = 0> MSL_FN dptr& operator+=(I i) { p += (long)i; return *this; }
  template <class I, enable_if_t<is_index<I>::value, int> = 0> MSL_FN dptr& operator-=(I i) { p -= (long)i; return *this; }
  MSL_FN dptr& operator++() { ++p; return *this; }
  MSL_FN dptr& operator--() { --p; return *this; }
  MSL_FN dptr operator++(int) { dptr r = *this; ++p; return r; }
  MSL_FN dptr operator--(int) { dptr r = *this; --p; return r; }
  MSL_FN long operator-(const dptr& o) const { return p - o.p; }
  MSL_FN bool operator==(const dptr& o) const { return p == o.p; }
  MSL_FN bool operator!=(const dptr& o) const { return p != o.p; }
  MSL_FN bool operator<(const dptr& o) const { return p < o.p; }
  MSL_FN explicit operator bool() const { return p != nullptr; }
};
template <class I, class T, enable_if_t<is_integer<I>::value, int> = 0>
MSL_FN dptr<T> operator+(I i, const dptr<T>& d) { return d + i; }

template <class T> struct binder<dptr<T>> {
  MSL_FN static dptr<T> bind(const Launch* L, int i, const char* name) {
    char* base = (char*)L->buffers[i];
    return dptr<T>((T*)base, base, base + L->buffer_bytes[i], i, name);
  }
};

template <class To, class From> MSL_FN To pointer_cast(const From& from) { return To(from); }

}  // namespace msl
