// What this library was built against, for the loader's compatibility check
// (jaxdsc/ops/_build.py): the XLA FFI C API version of the jaxlib headers it
// was compiled with (a jaxlib whose FFI API differs is refused at load), the
// jaxlib version and the compiler (for the messages).
#include "xla/ffi/api/c_api.h"

#ifndef JAXDSC_JAXLIB_VERSION  // setup.py passes the jaxlib version it built against
#define JAXDSC_JAXLIB_VERSION "unknown"
#endif

#define JAXDSC_EXPORT extern "C" __attribute__((visibility("default")))

JAXDSC_EXPORT int jaxdsc_ffi_api_major() { return XLA_FFI_API_MAJOR; }
JAXDSC_EXPORT int jaxdsc_ffi_api_minor() { return XLA_FFI_API_MINOR; }
JAXDSC_EXPORT const char* jaxdsc_built_jaxlib() { return JAXDSC_JAXLIB_VERSION; }
JAXDSC_EXPORT const char* jaxdsc_built_compiler() {
#if defined(__clang__)
  return "clang " __clang_version__;
#elif defined(__GNUC__)
  return "g++ " __VERSION__;
#else
  return "unknown";
#endif
}
