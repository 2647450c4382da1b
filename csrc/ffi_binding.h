// One pattern for every XLA FFI target of the library: the binding is read off
// the handler's own signature, so a target is declared in one line,
//
//   JAXDSC_FFI_TARGET(jaxdsc_dw_forward, Forward, kGeomAttrs);
//
// Parameter types map to binding entries in order: ffi::ThreadPool -> the
// intra-op thread pool (context), ffi::AnyBuffer -> an operand,
// ffi::Result<ffi::AnyBuffer> -> a result, anything else -> the next
// attribute named in the names array (its count is checked at compile time).
#ifndef JAXDSC_FFI_BINDING_H_
#define JAXDSC_FFI_BINDING_H_

#include <array>
#include <cstddef>
#include <type_traits>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace jaxdsc_ffi {

namespace ffi = xla::ffi;

template <class P>
constexpr bool kIsAttr = !std::is_same_v<P, ffi::ThreadPool> && !std::is_same_v<P, ffi::AnyBuffer> &&
                         !std::is_same_v<P, ffi::Result<ffi::AnyBuffer>>;

// One binding entry for a handler parameter of type P (`name`: attributes only).
template <class P>
struct Entry {
  const char* name;
};

// Bindings are move-only with private constructors: they can only grow
// inside one expression, so the entries are folded with this operator.
template <class B, class P>
auto operator|(B&& binding, Entry<P> entry) {
  if constexpr (std::is_same_v<P, ffi::ThreadPool>) {
    return std::move(binding).template Ctx<ffi::ThreadPool>();
  } else if constexpr (std::is_same_v<P, ffi::AnyBuffer>) {
    return std::move(binding).template Arg<ffi::AnyBuffer>();
  } else if constexpr (std::is_same_v<P, ffi::Result<ffi::AnyBuffer>>) {
    return std::move(binding).template Ret<ffi::AnyBuffer>();
  } else {
    return std::move(binding).template Attr<P>(entry.name);
  }
}

// How many of the first `i` parameters are attributes.
template <class... P>
constexpr size_t AttrsBefore(size_t i) {
  constexpr bool is_attr[] = {kIsAttr<P>..., false};
  size_t n = 0;
  for (size_t j = 0; j < i; ++j) n += is_attr[j] ? 1 : 0;
  return n;
}

template <class... P, size_t... I, size_t N>
auto Bind(std::index_sequence<I...>, const std::array<const char*, N>& names) {
  return (ffi::Ffi::Bind() | ... | Entry<P>{kIsAttr<P> ? names[AttrsBefore<P...>(I)] : nullptr});
}

// The binding of handler `fn`, its attributes named by `names` in order.
template <class... P, size_t N>
auto BindingOf(ffi::Error (*)(P...), const std::array<const char*, N>& names) {
  static_assert((0 + ... + (kIsAttr<P> ? 1 : 0)) == N,
                "one attribute name per attribute parameter of the handler");
  return Bind<P...>(std::index_sequence_for<P...>{}, names);
}

inline constexpr std::array<const char*, 0> kNoAttrs{};

}  // namespace jaxdsc_ffi

// Exports the C symbol `name` (what Python registers) for handler `fn`.
#define JAXDSC_FFI_TARGET(name, fn, attr_names) \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, fn, ::jaxdsc_ffi::BindingOf(fn, attr_names))

#endif  // JAXDSC_FFI_BINDING_H_
