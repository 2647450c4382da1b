// Pointwise (1x1) conv GEMMs on Intel AMX: bfloat16 products, float32 sums
// (lax.DotAlgorithmPreset.BF16_BF16_F32). Built in pwconv_amx.cc with the AMX
// target; the FFI handlers (pwconv_amx_ffi.inc) call these only after
// available() said yes.
//
// Operands are float32 or bfloat16 (`bf16`); float32 inputs are rounded to
// bfloat16 (nearest even) as they are packed, outputs are float32 sums
// (stored in the operand dtype). B operands are packed once per call into
// VNNI panels Bp[KP / 2][NP][2] of bfloat16, K and N zero padded to
// multiples of 32 (the tile's reduction depth and two 16-column tiles).
#pragma once

#include <cstdint>

namespace jaxdsc_amx {

constexpr int64_t kAlign = 32;
inline int64_t Pad32(int64_t v) { return (v + kAlign - 1) / kAlign * kAlign; }

// The CPU has AMX-BF16 and AVX512-BF16, and the kernel granted this process the tile state.
bool Available();

// Bp from w: element (k, n) is w[k * ld + n], or w[n * ld + k] when transposed.
void PackB(const void* w, bool bf16, int64_t k, int64_t n, int64_t ld, bool transposed, uint16_t* bp);

// Scratch bytes of one Gemm task.
int64_t GemmScratchBytes(int64_t k, int64_t n);

// Rows [m0, m1) of y[M, N] = a[M, K] . B (+ bias[N], float32), m0 a multiple of 32.
void Gemm(const void* a, bool bf16, int64_t m, int64_t k, int64_t n, const uint16_t* bp,
          const float* bias, void* y, int64_t m0, int64_t m1, char* scratch);

// Scratch bytes of one WeightGrad task.
int64_t WeightGradScratchBytes(int64_t k, int64_t n);

// acc[Pad32(K)][Pad32(N)] += x[m0:m1]^T . g[m0:m1]; bacc[Pad32(N)] += column sums of g[m0:m1].
void WeightGrad(const void* x, const void* g, bool bf16, int64_t k, int64_t n, float* acc,
                float* bacc, int64_t m0, int64_t m1, char* scratch);

}  // namespace jaxdsc_amx
