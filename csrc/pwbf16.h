// Pointwise (1x1) conv GEMMs with bfloat16 products and float32 sums
// (lax.DotAlgorithmPreset.BF16_BF16_F32), on Intel AMX tiles or on AVX512-BF16
// dot products (VDPBF16PS: AMD Zen 4 and later, Intel Cooper Lake and later).
// Built in pwconv_bf16.cc with those targets; the FFI handlers
// (pwconv_bf16_ffi.inc) call these only after Current() named an ISA.
//
// Operands are float32 or bfloat16 (`bf16`); float32 inputs are rounded to
// bfloat16 (nearest even) as they are packed, outputs are float32 sums
// (stored in the operand dtype). B operands are packed once per call into
// VNNI panels Bp[KP / 2][NP][2] of bfloat16, K and N zero padded to
// multiples of 32: the layout both ISAs multiply (AMX's B tile, and the
// 32-bit pairs VDPBF16PS takes), so only the inner block differs.
#pragma once

#include <cstdint>

namespace jaxdsc_bf16 {

constexpr int64_t kAlign = 32;
inline int64_t Pad32(int64_t v) { return (v + kAlign - 1) / kAlign * kAlign; }

enum class Isa : int { kNone = 0, kAvx512Bf16 = 1, kAmx = 2 };

// The best ISA this CPU (and, for AMX, the kernel's grant of the tile state) allows.
Isa Best();
// The ISA the GEMMs use now: Best() unless SetIsa chose a lower one.
Isa Current();
// Selects "avx512_bf16", "amx", "none" or "best"; false when this CPU cannot run it (unchanged then).
bool SetIsa(const char* name);
const char* IsaName(Isa isa);

// Bp from w: element (k, n) is w[k * ld + n], or w[n * ld + k] when transposed. Needs AVX512-BF16.
void PackB(const void* w, bool bf16, int64_t k, int64_t n, int64_t ld, bool transposed, uint16_t* bp);

// Scratch bytes of one Gemm task.
int64_t GemmScratchBytes(int64_t k, int64_t n);

// Rows [m0, m1) of y[M, N] = a[M, K] . B (+ bias[N], float32), m0 a multiple of 32, on `isa`.
void Gemm(Isa isa, const void* a, bool bf16, int64_t m, int64_t k, int64_t n, const uint16_t* bp,
          const float* bias, void* y, int64_t m0, int64_t m1, char* scratch);

// Scratch bytes of one WeightGrad task.
int64_t WeightGradScratchBytes(int64_t k, int64_t n);

// acc[Pad32(K)][Pad32(N)] += x[m0:m1]^T . g[m0:m1]; bacc[Pad32(N)] += column sums of g[m0:m1].
void WeightGrad(Isa isa, const void* x, const void* g, bool bf16, int64_t k, int64_t n, float* acc,
                float* bacc, int64_t m0, int64_t m1, char* scratch);

}  // namespace jaxdsc_bf16
