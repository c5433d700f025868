// Portable tile kernels (any x86-64 or other CPU), and the run-time choice between them and
// the AVX2 ones.
#include <cstdlib>
#include <cstring>

#include "core/topk.h"
#include "cpu/tile_kernels.h"

namespace rext::cpu {
namespace {

constexpr int kMR = 4;
constexpr int kNR = 8;

template <class T>
void micro_generic(int64_t kc, const T* a, const T* b, T* c, int64_t ldc, bool accumulate) {
  T acc[kMR][kNR] = {};
  for (int64_t p = 0; p < kc; ++p) {
    for (int r = 0; r < kMR; ++r)
      for (int q = 0; q < kNR; ++q) acc[r][q] += a[p * kMR + r] * b[p * kNR + q];
  }
  for (int r = 0; r < kMR; ++r)
    for (int q = 0; q < kNR; ++q) c[r * ldc + q] = accumulate ? c[r * ldc + q] + acc[r][q] : acc[r][q];
}

template <class T>
void scan_generic(const T* s, int64_t n, int64_t j0, int64_t self_j, T* vals, int64_t* idx,
                  int64_t k) {
  T t = vals[k - 1];
  for (int64_t c = 0; c < n; ++c) {
    if (s[c] >= t && j0 + c != self_j) {
      topk_insert(vals, idx, k, s[c], j0 + c);
      t = vals[k - 1];
    }
  }
}

template <class T>
void col_scan_generic(const T* tile, int64_t nrows, int64_t ncols, int64_t ldc, int64_t i0,
                      T* vals, int64_t* idx, T* thr, int64_t k) {
  for (int64_t r = 0; r < nrows; ++r) {
    const T* s = tile + r * ldc;
    for (int64_t c = 0; c < ncols; ++c) {
      if (s[c] >= thr[c] && topk_insert(vals + c * k, idx + c * k, k, s[c], i0 + r))
        thr[c] = vals[c * k + k - 1];
    }
  }
}

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool use_avx2() {
  const char* force = std::getenv("REXT_SIMD");
  if (force && std::strcmp(force, "generic") == 0) return false;
  static const bool has = cpu_has_avx2();
  return has;
}

}  // namespace

template <class T>
TileKernels<T> generic_kernels() {
  TileKernels<T> k;
  k.mr = kMR;
  k.nr = kNR;
  k.name = "generic";
  k.micro = &micro_generic<T>;
  k.scan = &scan_generic<T>;
  k.col_scan = &col_scan_generic<T>;
  return k;
}

template <class T>
TileKernels<T> best_kernels() {
  return use_avx2() ? avx2_kernels<T>() : generic_kernels<T>();
}

const char* simd_level() { return use_avx2() ? "avx2" : "generic"; }

template TileKernels<float> generic_kernels<float>();
template TileKernels<double> generic_kernels<double>();
template TileKernels<float> best_kernels<float>();
template TileKernels<double> best_kernels<double>();

}  // namespace rext::cpu
