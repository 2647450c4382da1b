// Portable build of the row kernels (baseline ISA: SSE2 on x86-64, NEON on arm64).
#include "dwconv.h"

#define DWCONV_NS generic
#define DWCONV_VL 4
#include "dwconv_kernels.inc"
#include "pwconv_kernels.inc"
#include "bn_kernels.inc"

namespace jaxdsc_dw {
const KernelTable kGenericKernels = {"generic", generic::scratch_bytes, generic::forward,
                                     generic::grad_input, generic::grad_kernel, generic::grad_both,
    generic::pw_plan, generic::pw_scratch_bytes, generic::pw_forward, generic::pw_grad_kernel,
    generic::bn::stats, generic::bn::apply, generic::bn::grad_sums, generic::bn::grad_apply};
}  // namespace jaxdsc_dw
