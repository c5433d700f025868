// AVX2/FMA tile kernels. This translation unit alone is compiled with -mavx2 -mfma and is only
// entered after best_kernels() has checked the CPU.
#include <immintrin.h>

#include "core/topk.h"
#include "cpu/tile_kernels.h"

namespace rext::cpu {
namespace {

// 6 x 16 floats: 12 accumulators + 2 B vectors + 1 broadcast = 15 of the 16 ymm registers.
void micro_f32(int64_t kc, const float* a, const float* b, float* c, int64_t ldc, bool accumulate) {
  __m256 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
  if (accumulate) {
    c00 = _mm256_loadu_ps(c + 0 * ldc); c01 = _mm256_loadu_ps(c + 0 * ldc + 8);
    c10 = _mm256_loadu_ps(c + 1 * ldc); c11 = _mm256_loadu_ps(c + 1 * ldc + 8);
    c20 = _mm256_loadu_ps(c + 2 * ldc); c21 = _mm256_loadu_ps(c + 2 * ldc + 8);
    c30 = _mm256_loadu_ps(c + 3 * ldc); c31 = _mm256_loadu_ps(c + 3 * ldc + 8);
    c40 = _mm256_loadu_ps(c + 4 * ldc); c41 = _mm256_loadu_ps(c + 4 * ldc + 8);
    c50 = _mm256_loadu_ps(c + 5 * ldc); c51 = _mm256_loadu_ps(c + 5 * ldc + 8);
  } else {
    c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = c40 = c41 = c50 = c51 = _mm256_setzero_ps();
  }
#pragma GCC unroll 4
  for (int64_t p = 0; p < kc; ++p) {
    const __m256 b0 = _mm256_load_ps(b);
    const __m256 b1 = _mm256_load_ps(b + 8);
    __m256 av;
    av = _mm256_broadcast_ss(a + 0); c00 = _mm256_fmadd_ps(av, b0, c00); c01 = _mm256_fmadd_ps(av, b1, c01);
    av = _mm256_broadcast_ss(a + 1); c10 = _mm256_fmadd_ps(av, b0, c10); c11 = _mm256_fmadd_ps(av, b1, c11);
    av = _mm256_broadcast_ss(a + 2); c20 = _mm256_fmadd_ps(av, b0, c20); c21 = _mm256_fmadd_ps(av, b1, c21);
    av = _mm256_broadcast_ss(a + 3); c30 = _mm256_fmadd_ps(av, b0, c30); c31 = _mm256_fmadd_ps(av, b1, c31);
    av = _mm256_broadcast_ss(a + 4); c40 = _mm256_fmadd_ps(av, b0, c40); c41 = _mm256_fmadd_ps(av, b1, c41);
    av = _mm256_broadcast_ss(a + 5); c50 = _mm256_fmadd_ps(av, b0, c50); c51 = _mm256_fmadd_ps(av, b1, c51);
    a += 6;
    b += 16;
  }
  _mm256_storeu_ps(c + 0 * ldc, c00); _mm256_storeu_ps(c + 0 * ldc + 8, c01);
  _mm256_storeu_ps(c + 1 * ldc, c10); _mm256_storeu_ps(c + 1 * ldc + 8, c11);
  _mm256_storeu_ps(c + 2 * ldc, c20); _mm256_storeu_ps(c + 2 * ldc + 8, c21);
  _mm256_storeu_ps(c + 3 * ldc, c30); _mm256_storeu_ps(c + 3 * ldc + 8, c31);
  _mm256_storeu_ps(c + 4 * ldc, c40); _mm256_storeu_ps(c + 4 * ldc + 8, c41);
  _mm256_storeu_ps(c + 5 * ldc, c50); _mm256_storeu_ps(c + 5 * ldc + 8, c51);
}

// 6 x 8 doubles, the same register plan.
void micro_f64(int64_t kc, const double* a, const double* b, double* c, int64_t ldc, bool accumulate) {
  __m256d c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
  if (accumulate) {
    c00 = _mm256_loadu_pd(c + 0 * ldc); c01 = _mm256_loadu_pd(c + 0 * ldc + 4);
    c10 = _mm256_loadu_pd(c + 1 * ldc); c11 = _mm256_loadu_pd(c + 1 * ldc + 4);
    c20 = _mm256_loadu_pd(c + 2 * ldc); c21 = _mm256_loadu_pd(c + 2 * ldc + 4);
    c30 = _mm256_loadu_pd(c + 3 * ldc); c31 = _mm256_loadu_pd(c + 3 * ldc + 4);
    c40 = _mm256_loadu_pd(c + 4 * ldc); c41 = _mm256_loadu_pd(c + 4 * ldc + 4);
    c50 = _mm256_loadu_pd(c + 5 * ldc); c51 = _mm256_loadu_pd(c + 5 * ldc + 4);
  } else {
    c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = c40 = c41 = c50 = c51 = _mm256_setzero_pd();
  }
#pragma GCC unroll 4
  for (int64_t p = 0; p < kc; ++p) {
    const __m256d b0 = _mm256_load_pd(b);
    const __m256d b1 = _mm256_load_pd(b + 4);
    __m256d av;
    av = _mm256_broadcast_sd(a + 0); c00 = _mm256_fmadd_pd(av, b0, c00); c01 = _mm256_fmadd_pd(av, b1, c01);
    av = _mm256_broadcast_sd(a + 1); c10 = _mm256_fmadd_pd(av, b0, c10); c11 = _mm256_fmadd_pd(av, b1, c11);
    av = _mm256_broadcast_sd(a + 2); c20 = _mm256_fmadd_pd(av, b0, c20); c21 = _mm256_fmadd_pd(av, b1, c21);
    av = _mm256_broadcast_sd(a + 3); c30 = _mm256_fmadd_pd(av, b0, c30); c31 = _mm256_fmadd_pd(av, b1, c31);
    av = _mm256_broadcast_sd(a + 4); c40 = _mm256_fmadd_pd(av, b0, c40); c41 = _mm256_fmadd_pd(av, b1, c41);
    av = _mm256_broadcast_sd(a + 5); c50 = _mm256_fmadd_pd(av, b0, c50); c51 = _mm256_fmadd_pd(av, b1, c51);
    a += 6;
    b += 8;
  }
  _mm256_storeu_pd(c + 0 * ldc, c00); _mm256_storeu_pd(c + 0 * ldc + 4, c01);
  _mm256_storeu_pd(c + 1 * ldc, c10); _mm256_storeu_pd(c + 1 * ldc + 4, c11);
  _mm256_storeu_pd(c + 2 * ldc, c20); _mm256_storeu_pd(c + 2 * ldc + 4, c21);
  _mm256_storeu_pd(c + 3 * ldc, c30); _mm256_storeu_pd(c + 3 * ldc + 4, c31);
  _mm256_storeu_pd(c + 4 * ldc, c40); _mm256_storeu_pd(c + 4 * ldc + 4, c41);
  _mm256_storeu_pd(c + 5 * ldc, c50); _mm256_storeu_pd(c + 5 * ldc + 4, c51);
}

// The two AVX2 lane types behind one interface for the scans below.
template <class T>
struct Lanes;
template <>
struct Lanes<float> {
  using V = __m256;
  static constexpr int64_t W = 8;
  static V broadcast(float v) { return _mm256_set1_ps(v); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static unsigned ge(const float* s, V t) {  // bit q: s[q] >= t[q]
    return unsigned(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(s), t, _CMP_GE_OQ)));
  }
};
template <>
struct Lanes<double> {
  using V = __m256d;
  static constexpr int64_t W = 4;
  static V broadcast(double v) { return _mm256_set1_pd(v); }
  static V load(const double* p) { return _mm256_loadu_pd(p); }
  static unsigned ge(const double* s, V t) {
    return unsigned(_mm256_movemask_pd(_mm256_cmp_pd(_mm256_loadu_pd(s), t, _CMP_GE_OQ)));
  }
};

// Most tile entries fall below the row's current k-th similarity: compare a vector at a time
// and only walk the lanes that pass.
template <class T>
void scan(const T* s, int64_t n, int64_t j0, int64_t self_j, T* vals, int64_t* idx, int64_t k) {
  using L = Lanes<T>;
  typename L::V t = L::broadcast(vals[k - 1]);
  int64_t c = 0;
  for (; c + L::W <= n; c += L::W) {
    unsigned mask = L::ge(s + c, t);
    if (!mask) continue;
    for (; mask; mask &= mask - 1) {
      const int64_t q = c + __builtin_ctz(mask);
      if (j0 + q != self_j) topk_insert(vals, idx, k, s[q], j0 + q);
    }
    t = L::broadcast(vals[k - 1]);
  }
  for (; c < n; ++c)
    if (s[c] >= vals[k - 1] && j0 + c != self_j) topk_insert(vals, idx, k, s[c], j0 + c);
}

// The transposed half: tile row r is a candidate for every column's list, each column with
// its own threshold thr[c].
template <class T>
void col_scan(const T* tile, int64_t nrows, int64_t ncols, int64_t ldc, int64_t i0, T* vals,
              int64_t* idx, T* thr, int64_t k) {
  using L = Lanes<T>;
  for (int64_t r = 0; r < nrows; ++r) {
    const T* s = tile + r * ldc;
    int64_t c = 0;
    for (; c + L::W <= ncols; c += L::W) {
      for (unsigned mask = L::ge(s + c, L::load(thr + c)); mask; mask &= mask - 1) {
        const int64_t q = c + __builtin_ctz(mask);
        if (topk_insert(vals + q * k, idx + q * k, k, s[q], i0 + r)) thr[q] = vals[q * k + k - 1];
      }
    }
    for (; c < ncols; ++c)
      if (s[c] >= thr[c] && topk_insert(vals + c * k, idx + c * k, k, s[c], i0 + r))
        thr[c] = vals[c * k + k - 1];
  }
}

}  // namespace

template <>
TileKernels<float> avx2_kernels<float>() {
  return {6, 16, "avx2", &micro_f32, &scan<float>, &col_scan<float>};
}

template <>
TileKernels<double> avx2_kernels<double>() {
  return {6, 8, "avx2", &micro_f64, &scan<double>, &col_scan<double>};
}

}  // namespace rext::cpu
