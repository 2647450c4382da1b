// Pointwise GEMM kernel alone against the FMA peak, without XLA (issue 5).
//
// Runs the AVX-512 pointwise forward (csrc/pwconv_kernels.inc) on T threads
// that spin between calls, so neither thread wake-ups nor JAX dispatch are in
// the time, and in the same run a register-only FMA loop on the same threads
// (24 independent zmm accumulators: the core's peak). The ratio of the two
// says how far the kernel itself is from the hardware; the gap between this
// time and the in-JAX time (benchmarks/layers.py, pw fwd) is call overhead.
//
//   g++ -O3 -std=c++17 -ffp-contract=fast -fno-math-errno -Icsrc benchmarks/pw_kernel.cc -o /tmp/pw_kernel -pthread
//   /tmp/pw_kernel [M=32768] [K=N=64] [threads=2] [calls=1500]
//
// Inputs: x (M, K) and the packed weights as in a real call, output (M, N)
// streamed when >= 8 MiB (as the FFI handler decides). Tasks are claimed from
// an atomic counter in the handler's task count (64 for this size).
#include "../csrc/dwconv_avx512.cc"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

namespace {

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// A register-only FMA loop: 24 chains of `iters` FMAs on 16 lanes.
constexpr double kFmaLoopFlops = 24.0 * 16 * 2;  // per iteration
__attribute__((target("avx512f"))) void FmaLoop(int64_t iters) {
  __m512 acc[24];
  for (int i = 0; i < 24; ++i) acc[i] = _mm512_set1_ps(1.0f + i * 1e-3f);
  const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 24
    for (int i = 0; i < 24; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
  }
  float sink = 0;
  for (int i = 0; i < 24; ++i) sink += _mm512_reduce_add_ps(acc[i]);
  asm volatile("" : : "r"(sink));
}

// Runs job(thread) on `threads` threads at once, `calls` times, after
// reset() each time; returns the median wall time of one call. Helpers spin
// between calls.
template <class Reset, class Job>
double TimeCalls(int threads, int calls, Reset reset, Job job) {
  std::atomic<int> gen{0}, finished{0};
  std::atomic<bool> stop{false};
  std::vector<std::thread> helpers;
  for (int t = 1; t < threads; ++t)
    helpers.emplace_back([&, t] {
      for (int seen = 0; !stop.load();) {
        if (gen.load() == seen) {
          __builtin_ia32_pause();
          continue;
        }
        seen = gen.load();
        job(t);
        finished.fetch_add(1);
      }
    });
  std::vector<double> times;
  for (int c = 0; c < calls; ++c) {
    const double t0 = Now();
    finished = 0;
    reset();
    gen.fetch_add(1);
    job(0);
    while (finished.load() != threads - 1) __builtin_ia32_pause();
    times.push_back(Now() - t0);
  }
  stop = true;
  for (auto& h : helpers) h.join();
  std::nth_element(times.begin(), times.begin() + times.size() / 2, times.end());
  return times[times.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") ||
      !__builtin_cpu_supports("avx512dq") || !__builtin_cpu_supports("avx512vl")) {
    std::fprintf(stderr, "this CPU has no AVX-512: nothing to measure\n");
    return 1;
  }
  const int64_t m = argc > 1 ? std::atoll(argv[1]) : 32768, k = argc > 2 ? std::atoll(argv[2]) : 64;
  const int threads = argc > 3 ? std::atoi(argv[3]) : 2, calls = argc > 4 ? std::atoi(argv[4]) : 1500;
  if (m < 1 || k < 1 || threads < 1 || calls < 1) {
    std::fprintf(stderr, "usage: %s [M>=1] [K>=1] [threads>=1] [calls>=1]\n", argv[0]);
    return 2;
  }
  using namespace jaxdsc_dw;
  PwGeom g{};
  g.m = m, g.k = k, g.n = k;
  avx512::pw_plan(g);
  g.stream = g.m * g.n * 4 >= (int64_t{8} << 20) && g.n % 16 == 0;
  auto buf = [](int64_t floats) {
    return static_cast<float*>(std::aligned_alloc(64, (floats * 4 + 63) / 64 * 64));
  };
  float *x = buf(m * k), *y = buf(m * g.n), *bp = buf(k * g.npad), *bias = buf(g.npad);
  for (int64_t i = 0; i < m * k; ++i) x[i] = static_cast<float>(i % 7) * 0.1f;
  for (int64_t i = 0; i < m * g.n; ++i) y[i] = 0.f;
  for (int64_t i = 0; i < k * g.npad; ++i) bp[i] = static_cast<float>(i % 5) * 0.01f;
  for (int64_t i = 0; i < g.npad; ++i) bias[i] = 0.5f;

  const int64_t blocks = (m + g.mr - 1) / g.mr;
  const int64_t tasks = std::min<int64_t>(64, std::max<int64_t>(1, blocks / 8));
  std::vector<char*> scratch(threads);
  for (auto& s : scratch) s = reinterpret_cast<char*>(buf(avx512::pw_scratch_bytes(g) / 4 + 16));
  std::atomic<int64_t> next{0};
  const double gemm = TimeCalls(threads, calls, [&] { next = 0; }, [&](int t) {
    for (int64_t i = next.fetch_add(1); i < tasks; i = next.fetch_add(1))
      avx512::pw_forward(g, x, bp, bias, y, blocks * i / tasks, blocks * (i + 1) / tasks, scratch[t]);
  });
  // The timed kernel must compute y = x . w + bias (w packed in panels Bp[n / nr][k][nr]):
  // check every 97th row.
  double err = 0;
  for (int64_t i = 0; i < m; i += 97)
    for (int64_t j = 0; j < g.n; ++j) {
      double ref = bias[j];
      for (int64_t kk = 0; kk < k; ++kk) ref += static_cast<double>(x[i * k + kk]) * bp[((j / g.nr) * k + kk) * g.nr + j % g.nr];
      err = std::max(err, std::abs(ref - y[i * g.n + j]) / (1.0 + std::abs(ref)));
    }
  if (err > 1e-5) {
    std::fprintf(stderr, "wrong GEMM result: relative error %.3g\n", err);
    return 3;
  }
  const int64_t fma_iters = 200000;
  const double fma = TimeCalls(threads, 50, [] {}, [&](int) { FmaLoop(fma_iters); });
  const double gemm_flops = 2.0 * m * k * g.n, peak = kFmaLoopFlops * fma_iters * threads / fma;
  std::printf("M=%lld K=N=%lld threads=%d: GEMM %.1f us (%.0f GFLOP/s), FMA peak %.0f GFLOP/s "
              "(%.0f per thread), GEMM at %.1f%% of peak\n",
              static_cast<long long>(m), static_cast<long long>(k), threads, gemm * 1e6,
              gemm_flops / gemm / 1e9, peak / 1e9, peak / 1e9 / threads,
              100.0 * gemm_flops / gemm / peak);
  return 0;
}
