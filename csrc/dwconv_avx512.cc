// AVX-512 build of the row kernels (one 16-float zmm per channel block);
// chosen at run time when the CPU has AVX-512 F/BW/DQ/VL.
#include "dwconv.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>  // before the pragma: library code stays baseline ISA
#include <cstring>

// GCC takes the ISA for the rest of the file from a pragma; clang ignores that
// pragma and takes the same target attribute on every function defined until the pop.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma"))), apply_to = function)
#else
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")
#endif
#define DWCONV_NS avx512
#define DWCONV_VL 16
#define DWCONV_STREAM(p, v) _mm512_stream_ps(p, v)
#define DWCONV_FENCE() _mm_sfence()
#include "dwconv_kernels.inc"
#include "pwconv_kernels.inc"
#include "bn_kernels.inc"

namespace jaxdsc_dw {
const KernelTable kAvx512Kernels = {"avx512", avx512::scratch_bytes, avx512::forward,
                                    avx512::grad_input, avx512::grad_kernel, avx512::grad_both,
    avx512::pw_plan, avx512::pw_scratch_bytes, avx512::pw_forward, avx512::pw_grad_kernel,
    avx512::bn::stats, avx512::bn::apply, avx512::bn::grad_sums, avx512::bn::grad_apply};
}  // namespace jaxdsc_dw
#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
