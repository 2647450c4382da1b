// AVX2 + FMA build of the row kernels; chosen at run time when the CPU has them.
#include "dwconv.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>  // before the pragma: library code stays baseline ISA
#include <cstring>

// GCC takes the ISA for the rest of the file from a pragma; clang ignores that
// pragma and takes the same target attribute on every function defined until the pop.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC target("avx2,fma")
#endif
#define DWCONV_NS avx2
#define DWCONV_VL 8
#define DWCONV_STREAM(p, v) _mm256_stream_ps(p, v)
#define DWCONV_FENCE() _mm_sfence()
#include "dwconv_kernels.inc"
#include "pwconv_kernels.inc"
#include "bn_kernels.inc"

namespace jaxdsc_dw {
const KernelTable kAvx2Kernels = {"avx2", avx2::scratch_bytes, avx2::forward, avx2::grad_input,
                                  avx2::grad_kernel, avx2::grad_both,
    avx2::pw_plan, avx2::pw_scratch_bytes, avx2::pw_forward, avx2::pw_grad_kernel,
    avx2::bn::stats, avx2::bn::apply, avx2::bn::grad_sums, avx2::bn::grad_apply};
}  // namespace jaxdsc_dw
#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
