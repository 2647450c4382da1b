// XLA FFI handlers for the depthwise conv kernels (CPU), plus ISA dispatch and
// threading. Python (jaxdsc/ops/native.py) loads this library with ctypes and
// registers the four `jaxdsc_dw_*` symbols with jax.ffi.register_ffi_target.
//
// Pointwise (1x1) GEMM targets jaxdsc_pw_*: see pwconv_ffi.inc (bfloat16 products on AMX,
// jaxdsc_pwmm_*: pwconv_bf16_ffi.inc); dense conv jaxdsc_dc_*: dense_ffi.inc.
// Targets: jaxdsc_dw_forward (x, w -> y), jaxdsc_dw_grad_input (g, w -> dx),
// jaxdsc_dw_grad_kernel (x, g -> dw), jaxdsc_dw_grad_both (x, g, w -> dx, dw).
// Tensor layouts (always 5-D / 4-D; Python inserts unit dims for rank 1-2):
//   x, dx: (N, D, H, W, C)   y, g: (N, Do, Ho, Wo, C*M)   w, dw: (KD, KH, KW, C*M)
// dtypes: all float32, or all bfloat16 (accumulation is float32 either way).

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "chan_merge.h"
#include "dwconv.h"
#include "ffi_binding.h"
#include "pwbf16.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jaxdsc_dw {
namespace {

// ---------------------------------------------------------------- dispatch --

const KernelTable* BestTable() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("fma"))
    return &kAvx512Kernels;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return &kAvx2Kernels;
#endif
  return &kGenericKernels;
}

std::atomic<const KernelTable*>& Table() {
  static std::atomic<const KernelTable*> table{BestTable()};
  return table;
}

#include "parallel_for.inc"
#include "huge_pages.inc"

// ------------------------------------------------------------- validation --

ffi::Error Oom() { return ffi::Error(ffi::ErrorCode::kResourceExhausted, "out of memory"); }

ffi::Error Invalid(const std::string& msg) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "jaxdsc depthwise: " + msg);
}

// Fills g.bf16 and checks that all buffers share one supported dtype.
ffi::Error CheckTypes(Geom& g, std::initializer_list<ffi::DataType> types) {
  const ffi::DataType t0 = *types.begin();
  for (ffi::DataType t : types)
    if (t != t0) return Invalid("all operands must have the same dtype");
  if (t0 != ffi::DataType::F32 && t0 != ffi::DataType::BF16)
    return Invalid("dtype must be float32 or bfloat16");
  g.bf16 = t0 == ffi::DataType::BF16;
  return ffi::Error::Success();
}

// Fills stride/dilation/padding and checks every size relation of the call.
ffi::Error CheckGeom(Geom& g, ffi::Span<const int64_t> strides, ffi::Span<const int64_t> dilation,
                     ffi::Span<const int64_t> pad_lo) {
  if (strides.size() != 3 || dilation.size() != 3 || pad_lo.size() != 3)
    return Invalid("strides, dilation and pad_lo must have 3 entries");
  for (int i = 0; i < 3; ++i) {
    g.s[i] = strides[i], g.d[i] = dilation[i], g.p[i] = pad_lo[i];
    if (g.s[i] < 1 || g.d[i] < 1 || g.p[i] < 0 || g.k[i] < 1 || g.in[i] < 1 || g.out[i] < 1)
      return Invalid("sizes, strides and dilation must be >= 1 and padding >= 0");
    // Some high padding >= 0 must give this output size: the padded extent
    // the output reads (`need`) may fall short of pad + input by < 1 stride.
    const int64_t need = (g.out[i] - 1) * g.s[i] + g.d[i] * (g.k[i] - 1) + 1;
    if (need - g.in[i] - g.p[i] < -(g.s[i] - 1))
      return Invalid("output size does not match input size, kernel, stride and padding");
  }
  if (g.n < 0 || g.c < 1 || g.m < 1 || g.co != g.c * g.m)
    return Invalid("channel counts must satisfy out_channels = channels * multiplier");
  return ffi::Error::Success();
}

template <class B>
ffi::Error Dims(const B& b, int64_t rank, const char* name, int64_t* out) {
  auto dims = b.dimensions();
  if (static_cast<int64_t>(dims.size()) != rank)
    return Invalid(std::string(name) + " must have rank " + std::to_string(rank));
  for (int64_t i = 0; i < rank; ++i) out[i] = dims[i];
  return ffi::Error::Success();
}

// Outputs of at least 8 MiB are written with non-temporal stores: skipping
// the read-for-ownership cuts DRAM traffic by a third (forward, single
// thread: N=128 32x32x64 2.1 vs 3.6 ms; N=64 16x16x256, a 16 MiB output,
// 1.15 vs 1.87 ms). Smaller outputs stay cached for the op that reads them.
constexpr int64_t kStreamBytes = int64_t{8} << 20;

// Fixed task count for the weight gradient: the float32 partial sums of each
// task are added in task order, so the result does not depend on threads.
constexpr int64_t kKernelTasks = 32;
// Row tasks for forward / input gradient (dynamic load balance on noisy VMs).
constexpr int64_t kRowTasks = 64;

int64_t Rows(const Geom& g, bool output_rows) {
  return g.n * (output_rows ? g.out[0] * g.out[1] : g.in[0] * g.in[1]);
}

std::vector<float> KernelAsF32(const ffi::AnyBuffer& w, const Geom& g) {
  const int64_t n = g.k[0] * g.k[1] * g.k[2] * g.co;
  std::vector<float> w32(n);
  if (!g.bf16) {
    std::memcpy(w32.data(), w.untyped_data(), n * 4);
  } else {
    const uint16_t* src = static_cast<const uint16_t*>(w.untyped_data());
    for (int64_t i = 0; i < n; ++i) {
      uint32_t u = static_cast<uint32_t>(src[i]) << 16;
      std::memcpy(&w32[i], &u, 4);
    }
  }
  return w32;
}

ffi::Error RunRows(ffi::ThreadPool& pool, const Geom& g, int64_t rows,
                   const std::function<void(int64_t, int64_t, char*)>& rows_fn) {
  if (rows == 0) return ffi::Error::Success();
  const KernelTable* k = Table().load();
  const int64_t tasks = std::min(rows, kRowTasks);
  const bool ok = ParallelFor(pool, tasks, k->scratch_bytes(g), [&](int64_t t, char* scratch) {
    rows_fn(rows * t / tasks, rows * (t + 1) / tasks, scratch);
  });
  return ok ? ffi::Error::Success() : Oom();
}

// Sums the per-task float32 partial weight gradients in task order (so the
// result does not depend on which thread ran what) and stores them.
void StorePartials(std::vector<float>& partial, int64_t tasks, int64_t kn, int bf16, void* out) {
  for (int64_t t = 1; t < tasks; ++t)
    for (int64_t i = 0; i < kn; ++i) partial[i] += partial[t * kn + i];
  if (!bf16) {
    std::memcpy(out, partial.data(), kn * 4);
    return;
  }
  uint16_t* o = static_cast<uint16_t*>(out);
  for (int64_t i = 0; i < kn; ++i) {
    uint32_t u;
    std::memcpy(&u, &partial[i], 4);
    const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
    o[i] = static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? ((u >> 16) | 0x40u) : r);
  }
}

// ---------------------------------------------------------------- handlers --

ffi::Error Forward(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                   ffi::Result<ffi::AnyBuffer> y, ffi::Span<const int64_t> strides,
                   ffi::Span<const int64_t> dilation, ffi::Span<const int64_t> pad_lo) {
  Geom g{};
  int64_t xd[5], wd[4], yd[5];
  if (auto e = Dims(x, 5, "x", xd); e.failure()) return e;
  if (auto e = Dims(w, 4, "w", wd); e.failure()) return e;
  if (auto e = Dims(*y, 5, "y", yd); e.failure()) return e;
  g.n = xd[0], g.c = xd[4], g.co = wd[3], g.m = g.c > 0 ? g.co / g.c : 0;
  for (int i = 0; i < 3; ++i) g.in[i] = xd[i + 1], g.out[i] = yd[i + 1], g.k[i] = wd[i];
  if (yd[0] != g.n || yd[4] != g.co) return Invalid("y must be (N, Do, Ho, Wo, C*M)");
  if (auto e = CheckTypes(g, {x.element_type(), w.element_type(), y->element_type()}); e.failure())
    return e;
  if (auto e = CheckGeom(g, strides, dilation, pad_lo); e.failure()) return e;
  g.stream = static_cast<int64_t>(y->size_bytes()) >= kStreamBytes;
  const std::vector<float> w32 = KernelAsF32(w, g);
  const KernelTable* k = Table().load();
  const void* xp = x.untyped_data();
  void* yp = y->untyped_data();
  AdviseHugePages(*y);
  return RunRows(pool, g, Rows(g, true), [&](int64_t r0, int64_t r1, char* s) {
    k->forward(g, xp, w32.data(), yp, r0, r1, s);
  });
}

ffi::Error GradInput(ffi::ThreadPool pool, ffi::AnyBuffer gy, ffi::AnyBuffer w,
                     ffi::Result<ffi::AnyBuffer> dx, ffi::Span<const int64_t> strides,
                     ffi::Span<const int64_t> dilation, ffi::Span<const int64_t> pad_lo) {
  Geom g{};
  int64_t gd[5], wd[4], xd[5];
  if (auto e = Dims(gy, 5, "g", gd); e.failure()) return e;
  if (auto e = Dims(w, 4, "w", wd); e.failure()) return e;
  if (auto e = Dims(*dx, 5, "dx", xd); e.failure()) return e;
  g.n = xd[0], g.c = xd[4], g.co = wd[3], g.m = g.c > 0 ? g.co / g.c : 0;
  for (int i = 0; i < 3; ++i) g.in[i] = xd[i + 1], g.out[i] = gd[i + 1], g.k[i] = wd[i];
  if (gd[0] != g.n || gd[4] != g.co) return Invalid("g must be (N, Do, Ho, Wo, C*M)");
  if (auto e = CheckTypes(g, {gy.element_type(), w.element_type(), dx->element_type()});
      e.failure())
    return e;
  if (auto e = CheckGeom(g, strides, dilation, pad_lo); e.failure()) return e;
  g.stream = static_cast<int64_t>(dx->size_bytes()) >= kStreamBytes;
  const std::vector<float> w32 = KernelAsF32(w, g);
  const KernelTable* k = Table().load();
  const void* gp = gy.untyped_data();
  void* xp = dx->untyped_data();
  AdviseHugePages(*dx);
  return RunRows(pool, g, Rows(g, false), [&](int64_t r0, int64_t r1, char* s) {
    k->grad_input(g, gp, w32.data(), xp, r0, r1, s);
  });
}

ffi::Error GradKernel(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer gy,
                      ffi::Result<ffi::AnyBuffer> dw, ffi::Span<const int64_t> strides,
                      ffi::Span<const int64_t> dilation, ffi::Span<const int64_t> pad_lo) {
  Geom g{};
  int64_t xd[5], gd[5], wd[4];
  if (auto e = Dims(x, 5, "x", xd); e.failure()) return e;
  if (auto e = Dims(gy, 5, "g", gd); e.failure()) return e;
  if (auto e = Dims(*dw, 4, "dw", wd); e.failure()) return e;
  g.n = xd[0], g.c = xd[4], g.co = wd[3], g.m = g.c > 0 ? g.co / g.c : 0;
  for (int i = 0; i < 3; ++i) g.in[i] = xd[i + 1], g.out[i] = gd[i + 1], g.k[i] = wd[i];
  if (gd[0] != g.n || gd[4] != g.co) return Invalid("g must be (N, Do, Ho, Wo, C*M)");
  if (auto e = CheckTypes(g, {x.element_type(), gy.element_type(), dw->element_type()});
      e.failure())
    return e;
  if (auto e = CheckGeom(g, strides, dilation, pad_lo); e.failure()) return e;
  const int64_t kn = g.k[0] * g.k[1] * g.k[2] * g.co;
  const int64_t rows = Rows(g, true);
  const int64_t tasks = std::max<int64_t>(1, std::min(rows, kKernelTasks));
  std::vector<float> partial(tasks * kn, 0.f);
  const KernelTable* k = Table().load();
  const void* xp = x.untyped_data();
  const void* gp = gy.untyped_data();
  if (rows > 0) {
    const bool ok = ParallelFor(pool, tasks, k->scratch_bytes(g), [&](int64_t t, char* s) {
      k->grad_kernel(g, xp, gp, partial.data() + t * kn, rows * t / tasks, rows * (t + 1) / tasks,
                     s);
    });
    if (!ok) return Oom();
  }
  StorePartials(partial, tasks, kn, g.bf16, dw->untyped_data());
  return ffi::Error::Success();
}

ffi::Error GradBoth(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer gy, ffi::AnyBuffer w,
                    ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dw,
                    ffi::Span<const int64_t> strides, ffi::Span<const int64_t> dilation,
                    ffi::Span<const int64_t> pad_lo) {
  Geom g{};
  int64_t xd[5], gd[5], wd[4], dxd[5], dwd[4];
  if (auto e = Dims(x, 5, "x", xd); e.failure()) return e;
  if (auto e = Dims(gy, 5, "g", gd); e.failure()) return e;
  if (auto e = Dims(w, 4, "w", wd); e.failure()) return e;
  if (auto e = Dims(*dx, 5, "dx", dxd); e.failure()) return e;
  if (auto e = Dims(*dw, 4, "dw", dwd); e.failure()) return e;
  g.n = xd[0], g.c = xd[4], g.co = wd[3], g.m = g.c > 0 ? g.co / g.c : 0;
  for (int i = 0; i < 3; ++i) g.in[i] = xd[i + 1], g.out[i] = gd[i + 1], g.k[i] = wd[i];
  if (gd[0] != g.n || gd[4] != g.co) return Invalid("g must be (N, Do, Ho, Wo, C*M)");
  if (!std::equal(xd, xd + 5, dxd) || !std::equal(wd, wd + 4, dwd))
    return Invalid("dx and dw must have the shapes of x and w");
  if (auto e = CheckTypes(g, {x.element_type(), gy.element_type(), w.element_type(),
                              dx->element_type(), dw->element_type()});
      e.failure())
    return e;
  if (auto e = CheckGeom(g, strides, dilation, pad_lo); e.failure()) return e;
  g.stream = static_cast<int64_t>(dx->size_bytes()) >= kStreamBytes;
  const std::vector<float> w32 = KernelAsF32(w, g);
  const int64_t kn = g.k[0] * g.k[1] * g.k[2] * g.co;
  const int64_t rows = Rows(g, false);
  const int64_t tasks = std::max<int64_t>(1, std::min(rows, kKernelTasks));
  std::vector<float> partial(tasks * kn, 0.f);
  const KernelTable* k = Table().load();
  const void* xp = x.untyped_data();
  const void* gp = gy.untyped_data();
  void* dxp = dx->untyped_data();
  AdviseHugePages(*dx);
  if (rows > 0) {
    const bool ok = ParallelFor(pool, tasks, k->scratch_bytes(g), [&](int64_t t, char* s) {
      k->grad_both(g, xp, gp, w32.data(), dxp, partial.data() + t * kn, rows * t / tasks,
                   rows * (t + 1) / tasks, s);
    });
    if (!ok) return Oom();
  }
  StorePartials(partial, tasks, kn, g.bf16, dw->untyped_data());
  return ffi::Error::Success();
}

#include "pwconv_ffi.inc"
#include "pwconv_bf16_ffi.inc"
#include "dense_ffi.inc"
#include "sepconv_ffi.inc"
#include "bn_ffi.inc"

}  // namespace
}  // namespace jaxdsc_dw

// The FFI targets, one line each (binding from the handler's signature: ffi_binding.h).
namespace jaxdsc_dw {
// The depthwise geometry attributes, last in every depthwise handler.
inline constexpr std::array<const char*, 3> kGeomAttrs{"strides", "dilation", "pad_lo"};
inline constexpr std::array<const char*, 2> kBnAttrs{"epsilon", "relu"};
using jaxdsc_ffi::kNoAttrs;
}  // namespace jaxdsc_dw

// The library is built with -fvisibility=hidden; only these symbols are exported.
#pragma GCC visibility push(default)
JAXDSC_FFI_TARGET(jaxdsc_dw_forward, jaxdsc_dw::Forward, jaxdsc_dw::kGeomAttrs);
JAXDSC_FFI_TARGET(jaxdsc_dw_grad_input, jaxdsc_dw::GradInput, jaxdsc_dw::kGeomAttrs);
JAXDSC_FFI_TARGET(jaxdsc_dw_grad_kernel, jaxdsc_dw::GradKernel, jaxdsc_dw::kGeomAttrs);
JAXDSC_FFI_TARGET(jaxdsc_dw_grad_both, jaxdsc_dw::GradBoth, jaxdsc_dw::kGeomAttrs);
JAXDSC_FFI_TARGET(jaxdsc_pw_forward, jaxdsc_dw::PwForward, jaxdsc_dw::kNoAttrs);
JAXDSC_FFI_TARGET(jaxdsc_pw_grad_input, jaxdsc_dw::PwGradInput, jaxdsc_dw::kNoAttrs);
JAXDSC_FFI_TARGET(jaxdsc_pw_grad_kernel, jaxdsc_dw::PwGradKernel, jaxdsc_dw::kNoAttrs);
JAXDSC_FFI_TARGET(jaxdsc_pw_grad_all, jaxdsc_dw::PwGradAll, jaxdsc_dw::kNoAttrs);
JAXDSC_FFI_TARGET(jaxdsc_pwmm_forward, jaxdsc_dw::PwmmForward, jaxdsc_dw::kNoAttrs);
JAXDSC_FFI_TARGET(jaxdsc_pwmm_grad_input, jaxdsc_dw::PwmmGradInput, jaxdsc_dw::kNoAttrs);
JAXDSC_FFI_TARGET(jaxdsc_pwmm_grad_kernel, jaxdsc_dw::PwmmGradKernel, jaxdsc_dw::kNoAttrs);
JAXDSC_FFI_TARGET(jaxdsc_dc_forward, jaxdsc_dw::DcForward, jaxdsc_dw::kGeomAttrs);
JAXDSC_FFI_TARGET(jaxdsc_dc_grad_kernel, jaxdsc_dw::DcGradKernel, jaxdsc_dw::kGeomAttrs);
JAXDSC_FFI_TARGET(jaxdsc_sep_forward, jaxdsc_dw::SepForward, jaxdsc_dw::kGeomAttrs);
JAXDSC_FFI_TARGET(jaxdsc_bn_forward, jaxdsc_dw::BnForward, jaxdsc_dw::kBnAttrs);
JAXDSC_FFI_TARGET(jaxdsc_bn_backward, jaxdsc_dw::BnBackward, jaxdsc_dw::kBnAttrs);
#pragma GCC visibility pop

// Introspection and override for tests and benchmarks (called through ctypes).
extern "C" __attribute__((visibility("default"))) const char* jaxdsc_dw_isa() {
  return jaxdsc_dw::Table().load()->name;
}

// Selects "generic", "avx2", "avx512" or "best"; returns 0 when that ISA is
// unavailable on this CPU or unknown (the selection is then unchanged).
extern "C" __attribute__((visibility("default"))) int jaxdsc_dw_set_isa(const char* name) {
  using namespace jaxdsc_dw;
  const std::string_view want(name);
  const KernelTable* best = BestTable();
  const KernelTable* pick = nullptr;
  if (want == "best") pick = best;
  if (want == "generic") pick = &kGenericKernels;
#if defined(__x86_64__) && defined(__GNUC__)
  if (want == "avx2" && best != &kGenericKernels) pick = &kAvx2Kernels;
  if (want == "avx512" && best == &kAvx512Kernels) pick = &kAvx512Kernels;
#endif
  if (pick == nullptr) return 0;
  Table().store(pick);
  return 1;
}

// The ISA the bfloat16-product pointwise targets (jaxdsc_pwmm_*) run on now: "amx" (present and
// granted by the OS), "avx512_bf16" or "none" (they then fail with kUnimplemented).
extern "C" __attribute__((visibility("default"))) const char* jaxdsc_bf16mm_isa() {
  return jaxdsc_bf16::IsaName(jaxdsc_bf16::Current());
}

// The best of those this CPU allows.
extern "C" __attribute__((visibility("default"))) const char* jaxdsc_bf16mm_best_isa() {
  return jaxdsc_bf16::IsaName(jaxdsc_bf16::Best());
}

// Selects "amx", "avx512_bf16", "none" or "best" for the jaxdsc_pwmm_* targets; returns 0 when this
// CPU cannot run it or the name is unknown (the selection is then unchanged).
extern "C" __attribute__((visibility("default"))) int jaxdsc_bf16mm_set_isa(const char* name) {
  return jaxdsc_bf16::SetIsa(name) ? 1 : 0;
}

// Turns huge-page advice for large outputs on (1) or off (0); returns the old setting.
extern "C" __attribute__((visibility("default"))) int jaxdsc_dw_set_huge_pages(int on) {
  return jaxdsc_dw::HugePagesOn().exchange(on != 0) ? 1 : 0;
}
