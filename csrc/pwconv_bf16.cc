// The bfloat16-product pointwise GEMMs (pwbf16.h), on two ISAs that share the
// packing. AMX: one 32 x 32 float32 output block is four 16 x 16 accumulator
// tiles (tmm0-3) fed by two A tiles (tmm4-5: 16 rows x 32 bfloat16 of the
// reduction) and two B tiles (tmm6-7: 16 reduction pairs x 16 columns, VNNI).
// AVX512-BF16: the same block as four 8 x 32 register tiles, each row a
// broadcast bfloat16 pair of A times two zmm of B pairs (VDPBF16PS). Selected
// at run time by Current(); without the toolchain the stubs at the bottom say no.
#include "pwbf16.h"

#include <atomic>
#include <cstring>
#include <string_view>

#if defined(__x86_64__) && defined(__GNUC__) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11))
#define JAXDSC_HAVE_BF16_ISAS 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16"))), apply_to = function)
#else
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")
#endif

namespace jaxdsc_bf16 {
namespace {

constexpr int64_t kWgradRows = 256;  // weight gradient: rows of x / g packed per chunk

struct TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// All eight tiles 16 rows x 64 bytes (16 floats, or 32 bfloat16 / 16 pairs).
void Configure() {
  TileConfig c{};
  c.palette = 1;
  for (int t = 0; t < 8; ++t) c.rows[t] = 16, c.colsb[t] = 64;
  _tile_loadconfig(&c);
}

inline __mmask16 Tail(int64_t left) { return left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1); }

// 16 values (fewer under `mask`, the rest 0) of a float32 or bfloat16 row as float32.
inline __m512 Load16(const void* base, int64_t i, bool bf16, __mmask16 mask) {
  if (!bf16) return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(base) + i);
  const __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(base) + i);
  return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(0xFFFF, _mm512_maskz_cvtepu16_epi32(0xFFFF, h), 16));
}

// 32 bfloat16 as 16 pairs (lo[j], hi[j]): the VNNI order of two reduction rows.
inline __m512i Pairs(__m512 lo, __m512 hi) {
  const __m512i both = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));  // [lo 0..15 | hi 0..15]
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                       23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(idx, both);
}

// One reduction step of a 32 x 32 block: A rows a0 / a0 + 16 rows (lda bytes apart), B pairs
// b0 (16 columns) and b0 + 16 columns (ldb bytes apart); tmm0-3 += the four products.
inline void Step(const uint16_t* a0, int64_t lda, const uint16_t* b0, int64_t ldb) {
  _tile_loadd(4, a0, lda);
  _tile_loadd(5, reinterpret_cast<const char*>(a0) + 16 * lda, lda);
  _tile_loadd(6, b0, ldb);
  _tile_loadd(7, b0 + 32, ldb);
  _tile_dpbf16ps(0, 4, 6);
  _tile_dpbf16ps(1, 4, 7);
  _tile_dpbf16ps(2, 5, 6);
  _tile_dpbf16ps(3, 5, 7);
}

// The 32 x 32 float32 block at c (ld floats a row) to / from tmm0-3.
inline void LoadBlock(const float* c, int64_t ld) {
  _tile_loadd(0, c, ld * 4);
  _tile_loadd(1, c + 16, ld * 4);
  _tile_loadd(2, c + 16 * ld, ld * 4);
  _tile_loadd(3, c + 16 * ld + 16, ld * 4);
}

inline void StoreBlock(float* c, int64_t ld) {
  _tile_stored(0, c, ld * 4);
  _tile_stored(1, c + 16, ld * 4);
  _tile_stored(2, c + 16 * ld, ld * 4);
  _tile_stored(3, c + 16 * ld + 16, ld * 4);
}

// c[r][0:32] (+)= sum over p < pairs of the bfloat16 pair a[r * lda + p * pa : +2] times the 32
// column pairs b[p * ldb : +64], for the 8 rows r (lda, pa, ldb in bfloat16 elements). 16
// accumulators hide VDPBF16PS's latency; the A pair is a broadcast load.
inline void DpBlock8(const uint16_t* a, int64_t lda, int64_t pa, const uint16_t* b, int64_t ldb, int64_t pairs,
                     float* c, int64_t ldc, bool accumulate) {
  __m512 acc[8][2];
  for (int r = 0; r < 8; ++r)
    for (int h = 0; h < 2; ++h)
      acc[r][h] = accumulate ? _mm512_loadu_ps(c + r * ldc + 16 * h) : _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512bh b0 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b + p * ldb));
    const __m512bh b1 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b + p * ldb + 32));
#pragma GCC unroll 8
    for (int r = 0; r < 8; ++r) {
      int32_t pair;
      std::memcpy(&pair, a + r * lda + p * pa, 4);
      const __m512bh ar = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], ar, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], ar, b1);
    }
  }
  for (int r = 0; r < 8; ++r)
    for (int h = 0; h < 2; ++h) _mm512_storeu_ps(c + r * ldc + 16 * h, acc[r][h]);
}

// Rows [r0, r0 + rows) of src[., cols] (float32 or bfloat16) as VNNI pairs dst[rp / 2][ldp][2]:
// unit (p, j) holds (src[r0 + 2p][j], src[r0 + 2p + 1][j]), zero past `rows` and `cols`. With
// `colsum`, colsum[j] += the float32 column sums of those rows (unrounded).
inline void PackPairs(const void* src, bool bf16, int64_t r0, int64_t rows, int64_t rp, int64_t cols,
                      int64_t ldp, uint16_t* dst, float* colsum) {
  for (int64_t p = 0; p < rp / 2; ++p)
    for (int64_t j = 0; j < ldp; j += 16) {
      const __mmask16 mk = j < cols ? Tail(cols - j) : 0;
      const int64_t r = r0 + 2 * p;
      const __m512 lo = 2 * p < rows ? Load16(src, r * cols + j, bf16, mk) : _mm512_setzero_ps();
      const __m512 hi = 2 * p + 1 < rows ? Load16(src, (r + 1) * cols + j, bf16, mk) : _mm512_setzero_ps();
      _mm512_storeu_si512(dst + (p * ldp + j) * 2, Pairs(lo, hi));
      if (colsum) _mm512_storeu_ps(colsum + j, _mm512_add_ps(_mm512_loadu_ps(colsum + j), _mm512_add_ps(lo, hi)));
    }
}

bool ProbeAvx512Bf16() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool f = b & (1u << 16), bw = b & (1u << 30), vl = b & (1u << 31);
  if (!(f && bw && vl)) return false;
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &d) || !(a & (1u << 5))) return false;  // AVX512_BF16
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return false;  // OSXSAVE: xgetbv is there
  // The OS saves the zmm and opmask state (XCR0 bits 1, 2, 5-7).
  unsigned lo, hi;
  __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (lo & 0xE6) == 0xE6;
}

bool ProbeAmx() {
  unsigned a, b, c, d;
  if (!ProbeAvx512Bf16() || !__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  if (!(d & (1u << 24)) || !(d & (1u << 22))) return false;  // AMX-TILE, AMX-BF16
  // Linux >= 5.16 hands out the 8 KiB tile state only on request (ARCH_REQ_XCOMP_PERM, XTILEDATA).
  return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
}

}  // namespace

Isa Best() {
  static const Isa best = ProbeAmx() ? Isa::kAmx : ProbeAvx512Bf16() ? Isa::kAvx512Bf16 : Isa::kNone;
  return best;
}

void PackB(const void* w, bool bf16, int64_t k, int64_t n, int64_t ld, bool transposed, uint16_t* bp) {
  const int64_t kp = Pad32(k), np = Pad32(n);
  std::memset(bp, 0, kp * np * 2);
  auto at = [&](int64_t kk, int64_t j) -> uint16_t {
    const int64_t i = transposed ? j * ld + kk : kk * ld + j;
    if (bf16) return static_cast<const uint16_t*>(w)[i];
    const __m128 v = _mm_set_ss(static_cast<const float*>(w)[i]);
    return static_cast<uint16_t>(_mm_cvtsi128_si32(reinterpret_cast<__m128i>(_mm_cvtneps_pbh(v))));
  };
  if (!transposed && !bf16) {
    // Row pairs of w are contiguous: 16 columns at a time.
    for (int64_t p = 0; p < kp / 2; ++p)
      for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = Tail(n - j);
        const __m512 lo = 2 * p < k ? Load16(w, 2 * p * ld + j, false, m) : _mm512_setzero_ps();
        const __m512 hi = 2 * p + 1 < k ? Load16(w, (2 * p + 1) * ld + j, false, m) : _mm512_setzero_ps();
        _mm512_mask_storeu_epi32(bp + (p * np + j) * 2, m, Pairs(lo, hi));
      }
    return;
  }
  for (int64_t kk = 0; kk < k; ++kk)
    for (int64_t j = 0; j < n; ++j) bp[((kk / 2) * np + j) * 2 + (kk & 1)] = at(kk, j);
}

int64_t GemmScratchBytes(int64_t k, int64_t n) { return 32 * Pad32(k) * 2 + 32 * Pad32(n) * 4 + 64; }

void Gemm(Isa isa, const void* a, bool bf16, int64_t m, int64_t k, int64_t n, const uint16_t* bp,
          const float* bias, void* y, int64_t m0, int64_t m1, char* scratch) {
  const int64_t kp = Pad32(k), np = Pad32(n);
  const bool amx = isa == Isa::kAmx;
  uint16_t* ab = reinterpret_cast<uint16_t*>(scratch);      // [32][kp] rows of a, bfloat16
  float* tmp = reinterpret_cast<float*>(scratch + 32 * kp * 2);  // [32][np] output block
  if (amx) Configure();
  for (int64_t r0 = m0; r0 < m1; r0 += 32) {
    const int64_t rows = r0 + 32 <= m ? 32 : m - r0;
    for (int64_t i = 0; i < 32; ++i) {
      uint16_t* d = ab + i * kp;
      if (i >= rows) {
        std::memset(d, 0, kp * 2);
        continue;
      }
      const int64_t row = (r0 + i) * k;
      for (int64_t c = 0; c < kp; c += 32) {
        const __m512 lo = c < k ? Load16(a, row + c, bf16, Tail(k - c)) : _mm512_setzero_ps();
        const __m512 hi = c + 16 < k ? Load16(a, row + c + 16, bf16, Tail(k - c - 16)) : _mm512_setzero_ps();
        _mm512_storeu_si512(d + c, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
      }
    }
    for (int64_t n0 = 0; n0 < np; n0 += 32) {
      if (!amx) {
        for (int64_t i0 = 0; i0 < rows; i0 += 8)
          DpBlock8(ab + i0 * kp, kp, 2, bp + n0 * 2, np * 2, kp / 2, tmp + i0 * np + n0, np, false);
        continue;
      }
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t c = 0; c < kp; c += 32) Step(ab + c, kp * 2, bp + ((c / 2) * np + n0) * 2, np * 4);
      StoreBlock(tmp + n0, np);
    }
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 mk = Tail(n - j);
        __m512 v = _mm512_loadu_ps(tmp + i * np + j);
        if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, bias + j));
        const int64_t o = (r0 + i) * n + j;
        if (bf16)
          _mm256_mask_storeu_epi16(static_cast<uint16_t*>(y) + o, mk, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
        else
          _mm512_mask_storeu_ps(static_cast<float*>(y) + o, mk, v);
      }
  }
  if (amx) _tile_release();
}

int64_t WeightGradScratchBytes(int64_t k, int64_t n) {
  return Pad32(k) * kWgradRows * 2 + kWgradRows * Pad32(n) * 2 + kWgradRows * k * 4 + 64;
}

void WeightGrad(Isa isa, const void* x, const void* g, bool bf16, int64_t k, int64_t n, float* acc,
                float* bacc, int64_t m0, int64_t m1, char* scratch) {
  constexpr int64_t R = kWgradRows;
  const int64_t kp = Pad32(k), np = Pad32(n);
  const bool amx = isa == Isa::kAmx;
  // AMX: xt[kp][R], x^T with row pairs interleaved (an A tile row is 32 consecutive bfloat16).
  // AVX512-BF16: the same bytes as xp[R / 2][kp][2], x in VNNI pairs like g: no transpose.
  uint16_t* xt = reinterpret_cast<uint16_t*>(scratch);
  uint16_t* gp = xt + kp * R;                             // [R / 2][np][2]: g, VNNI
  float* xs = reinterpret_cast<float*>(gp + R * np);     // [R][k]: bfloat16 x as float32
  if (amx) {
    std::memset(xt + k * R, 0, (kp - k) * R * 2);  // reduction rows past k: read, never used
    Configure();
  }
  for (int64_t mm = m0; mm < m1; mm += R) {
    const int64_t rows = mm + R <= m1 ? R : m1 - mm, rp = Pad32(rows);
    PackPairs(g, bf16, mm, rows, rp, n, np, gp, bacc);
    if (!amx) {
      PackPairs(x, bf16, mm, rows, rp, k, kp, xt, nullptr);
      for (int64_t c0 = 0; c0 < kp; c0 += 8)
        for (int64_t n0 = 0; n0 < np; n0 += 32)
          DpBlock8(xt + c0 * 2, 2, kp * 2, gp + n0 * 2, np * 2, rp / 2, acc + c0 * np + n0, np, true);
      continue;
    }
    const float* xf = static_cast<const float*>(x) + mm * k;
    if (bf16) {
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t c = 0; c < k; c += 16) {
          const __mmask16 mk = Tail(k - c);
          _mm512_mask_storeu_ps(xs + i * k + c, mk, Load16(x, (mm + i) * k + c, true, mk));
        }
      xf = xs;
    }
    // x^T: unit j of row c holds (x[2j][c], x[2j+1][c]); rows past `rows` are 0.
    for (int64_t p0 = 0; p0 < rp / 2; p0 += 16) {
      const __m512i even = _mm512_mullo_epi32(_mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(2 * p0)),
          _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0)), _mm512_set1_epi32(static_cast<int>(k)));
      const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(static_cast<int>(k)));
      const int64_t left = rows - 2 * p0;  // valid rows from 2 * p0 on
      __mmask16 me = 0, mo = 0;
      for (int j = 0; j < 16; ++j) {
        if (2 * j < left) me |= static_cast<__mmask16>(1u << j);
        if (2 * j + 1 < left) mo |= static_cast<__mmask16>(1u << j);
      }
      for (int64_t c = 0; c < k; ++c) {
        const __m512 lo = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), me, even, xf + c, 4);
        const __m512 hi = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mo, odd, xf + c, 4);
        _mm512_storeu_si512(xt + c * R + 2 * p0, Pairs(lo, hi));
      }
    }
    for (int64_t c0 = 0; c0 < kp; c0 += 32)
      for (int64_t n0 = 0; n0 < np; n0 += 32) {
        LoadBlock(acc + c0 * np + n0, np);
        for (int64_t r = 0; r < rp; r += 32) Step(xt + c0 * R + r, R * 2, gp + ((r / 2) * np + n0) * 2, np * 4);
        StoreBlock(acc + c0 * np + n0, np);
      }
  }
  if (amx) _tile_release();
}

}  // namespace jaxdsc_bf16

#if defined(__clang__)
#pragma clang attribute pop
#endif

#else  // no AMX / AVX512-BF16 toolchain or not x86-64: never available

namespace jaxdsc_bf16 {
Isa Best() { return Isa::kNone; }
void PackB(const void*, bool, int64_t, int64_t, int64_t, bool, uint16_t*) {}
int64_t GemmScratchBytes(int64_t, int64_t) { return 0; }
void Gemm(Isa, const void*, bool, int64_t, int64_t, int64_t, const uint16_t*, const float*, void*, int64_t,
          int64_t, char*) {}
int64_t WeightGradScratchBytes(int64_t, int64_t) { return 0; }
void WeightGrad(Isa, const void*, const void*, bool, int64_t, int64_t, float*, float*, int64_t, int64_t, char*) {}
}  // namespace jaxdsc_bf16

#endif

namespace jaxdsc_bf16 {
namespace {

std::atomic<int>& Selected() {
  static std::atomic<int> isa{static_cast<int>(Best())};
  return isa;
}

}  // namespace

Isa Current() { return static_cast<Isa>(Selected().load(std::memory_order_relaxed)); }

const char* IsaName(Isa isa) {
  switch (isa) {
    case Isa::kAmx: return "amx";
    case Isa::kAvx512Bf16: return "avx512_bf16";
    default: return "none";
  }
}

bool SetIsa(const char* name) {
  const std::string_view want(name);
  Isa pick;
  if (want == "best") pick = Best();
  else if (want == "amx") pick = Isa::kAmx;
  else if (want == "avx512_bf16") pick = Isa::kAvx512Bf16;
  else if (want == "none") pick = Isa::kNone;
  else return false;
  if (static_cast<int>(pick) > static_cast<int>(Best())) return false;  // AMX here implies AVX512-BF16
  Selected().store(static_cast<int>(pick), std::memory_order_relaxed);
  return true;
}

}  // namespace jaxdsc_bf16
