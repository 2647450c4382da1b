// Depthwise dilated convolution on channels-last tensors: shared declarations.
//
// Every tensor is viewed as 5-D (N, D, H, W, C) with rank-1/2 inputs padded by
// unit dims, and processed one "row" (fixed n, d, h: W * C contiguous floats)
// at a time. The per-ISA kernel files include dwconv_kernels.inc under a
// `#pragma GCC target`, so this header must stay plain data: no inline
// functions or templates that another ISA's translation unit could instantiate
// differently (the linker would keep one copy, maybe AVX-512 code on a CPU
// without it).
#ifndef JAXDSC_CSRC_DWCONV_H_
#define JAXDSC_CSRC_DWCONV_H_

#include <cstdint>

namespace jaxdsc_dw {

// Geometry of one call. Index 0, 1, 2 = D, H, W.
struct Geom {
  int64_t n;       // batch
  int64_t c;       // input channels
  int64_t m;       // depth multiplier
  int64_t co;      // output channels = c * m; output channel o reads input o / m
  int64_t in[3];   // input spatial size
  int64_t out[3];  // output spatial size
  int64_t k[3];    // kernel size
  int64_t s[3];    // stride
  int64_t d[3];    // dilation
  int64_t p[3];    // low-side zero padding (high side is implied by in/out)
  int bf16;        // 1: x, w, g and results are bfloat16 (float32 accumulation)
  int stream;      // 1: write float32 outputs with non-temporal stores (large outputs)
  int64_t y_row0;  // forward: index of the first output row that y holds (0: all of them)
};

// One kernel tap applied along a row: out[i] += in[i * is + off] * w (per
// channel), valid for i in [lo, hi).
struct Tap {
  const float* in;
  const float* w;
  int64_t off;
  int64_t lo;
  int64_t hi;
};

// Dense (groups=1) conv as the pointwise GEMM over an implicit im2col matrix
// (dense_ffi.inc): row r of A is output pixel r's receptive field, taps in
// (kd, kh, kw) order, C values each, zeros where a tap falls in the padding.
// Rows are gathered into the GEMM's staging buffers a chunk at a time, so the
// im2col matrix never exists in memory.
struct ConvGather {
  const void* x;   // (N, D, H, W, C), float32 or bfloat16 (PwGeom::bf16)
  int64_t c;       // input channels
  int64_t in[3], out[3], k[3], s[3], d[3];
  int64_t p[3];    // low-side padding (may be negative: cropping)
  int64_t size;    // elements of x (reads stay below)
};

// Pointwise (1x1) conv as a GEMM: y[M, N] = x[M, K] . w[K, N] (see
// pwconv_kernels.inc). pw_plan fills the tile fields for the table's ISA.
struct PwGeom {
  int64_t m, k, n;  // rows (N * spatial), reduction size, output columns
  int bf16;         // 1: operands and results are bfloat16 (float32 accumulation)
  int stream;       // 1: direct float32 outputs use non-temporal stores
  int nv, mr;       // register tile: mr rows x nv vectors
  int mrw;          // weight gradient: tile rows (along k)
  int64_t nr;       // panel width nv * VL (floats)
  int64_t npad;     // n rounded up to nr
  int64_t kpad;     // k rounded up to mr (weight gradient: k is the tile's row axis)
  int64_t mc;       // weight gradient: rows of x / gy packed per chunk
  const ConvGather* conv;  // non-null: A (x) is this conv's im2col matrix, K = taps * C
};

// Row-range kernels of one instruction set. Rows are linear indices of the
// (n, d, h) triple over the tensor named in the comment. `w32` is the kernel
// as float32 (KD, KH, KW, CO); `scratch` holds scratch_bytes(g) bytes,
// 64-byte aligned, private to the calling thread.
struct KernelTable {
  const char* name;
  int64_t (*scratch_bytes)(const Geom& g);
  // y rows [r0, r1) over (N, Do, Ho).
  void (*forward)(const Geom& g, const void* x, const float* w32, void* y, int64_t r0, int64_t r1,
                  char* scratch);
  // dx rows [r0, r1) over (N, D, H).
  void (*grad_input)(const Geom& g, const void* gy, const float* w32, void* dx, int64_t r0,
                     int64_t r1, char* scratch);
  // acc (KD, KH, KW, CO) float32 += contribution of gy rows [r0, r1) over (N, Do, Ho).
  void (*grad_kernel)(const Geom& g, const void* x, const void* gy, float* acc, int64_t r0,
                      int64_t r1, char* scratch);
  // grad_input's dx rows [r0, r1) plus the weight gradient they meet, into acc.
  void (*grad_both)(const Geom& g, const void* x, const void* gy, const float* w32, void* dx,
                    float* acc, int64_t r0, int64_t r1, char* scratch);
  // Pointwise GEMM. bp: the (K, N) operand packed in panels Bp[npad / nr][k][nr]
  // (float32, zero padded); bias: npad floats or null.
  void (*pw_plan)(PwGeom& g);
  int64_t (*pw_scratch_bytes)(const PwGeom& g);
  // y row blocks [b0, b1) (blocks of g.mr rows) = x . Bp (+ bias).
  void (*pw_forward)(const PwGeom& g, const void* x, const float* bp, const float* bias, void* y,
                     int64_t b0, int64_t b1, char* scratch);
  // acc (kpad, npad) += x[m0:m1]^T . gy[m0:m1]; bacc (npad) += column sums of gy[m0:m1].
  void (*pw_grad_kernel)(const PwGeom& g, const void* x, const void* gy, float* acc, float* bacc,
                         int64_t m0, int64_t m1, char* scratch);
  // Train-mode batch norm on x (M, C) float32, rows [r0, r1) (see bn_kernels.inc).
  // tmp: 2 * C floats of scratch. Per-channel statistics are double.
  void (*bn_stats)(const float* x, int64_t c, int64_t r0, int64_t r1, double* mean, double* m2,
                   float* tmp);
  void (*bn_apply)(const float* x, float* y, int64_t c, int64_t r0, int64_t r1, const float* a,
                   const float* b, int act, int stream);
  void (*bn_grad_sums)(const float* x, const float* dy, int64_t c, int64_t r0, int64_t r1,
                       const float* a, const float* b, const float* mean, int act, double* s1,
                       double* s2, float* tmp);
  void (*bn_grad_apply)(const float* x, const float* dy, float* dx, int64_t c, int64_t r0,
                        int64_t r1, const float* a, const float* b, const float* mean,
                        const float* kb, const float* kc, int act, int stream);
};

extern const KernelTable kGenericKernels;
#if defined(__x86_64__) && defined(__GNUC__)
extern const KernelTable kAvx2Kernels;
extern const KernelTable kAvx512Kernels;
#endif

}  // namespace jaxdsc_dw

#endif  // JAXDSC_CSRC_DWCONV_H_
