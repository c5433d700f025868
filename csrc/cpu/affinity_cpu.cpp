// Fused top-k affinity on the CPU. The similarity S = X X^T is computed tile by tile with a
// BLIS-style register-blocked micro-kernel on packed panels, and each finished tile is merged
// into its rows' running top-k before the next one is computed, so memory stays O(N (k + d)).
//
// Loop order: column blocks (NC) outermost and shared by all threads, so the packed B block
// stays in the shared L3 cache; row blocks (MC) are handed out dynamically; depth is split in
// KC chunks so a B micro-panel stays in L1 while the A block sits in L2.
#include "cpu/affinity_cpu.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "core/check.h"
#include "core/topk.h"
#include "cpu/tile_kernels.h"
#include "cpu/workspace.h"

namespace rext::cpu {
namespace {

constexpr int64_t kKC = 256;         // depth per micro-kernel call
constexpr int64_t kDefaultMC = 120;  // rows per tile (A block in L2)
constexpr int64_t kDefaultNC = 1024; // columns per tile (C tile in L2, B block in L3)

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Packed panel layout: panel p holds rows [p*w, p*w+w) as d steps of w interleaved values,
// rows past N are zero. Rows are scaled by scale[i] (1/||x_i|| or 1).
template <class T>
void pack_panels(const StackedRows<T>& x, const std::vector<T>& scale, int64_t w, T* out,
                 int threads) {
  const int64_t n = x.rows(), d = x.cols(), panels = (n + w - 1) / w;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t p = 0; p < panels; ++p) {
    T* dst = out + p * d * w;
    for (int64_t r = 0; r < w; ++r) {
      const int64_t i = p * w + r;
      if (i < n) {
        const T* src = x.row(i);
        const T s = scale[i];
        for (int64_t c = 0; c < d; ++c) dst[c * w + r] = src[c] * s;
      } else {
        for (int64_t c = 0; c < d; ++c) dst[c * w + r] = T(0);
      }
    }
  }
}

template <class T>
std::vector<T> row_scales(const StackedRows<T>& x, bool normalize, int threads) {
  const int64_t n = x.rows(), d = x.cols();
  std::vector<T> scale(n, T(1));
  if (!normalize) return scale;
  int64_t zero_row = -1;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const T* r = x.row(i);
    double s = 0;
    for (int64_t c = 0; c < d; ++c) s += double(r[c]) * double(r[c]);
    if (s > 0) {
      scale[i] = T(1.0 / std::sqrt(s));
    } else {
#pragma omp critical
      zero_row = zero_row < 0 ? i : std::min(zero_row, i);
    }
  }
  REXT_CHECK(zero_row < 0, "x: row ", zero_row, " has zero norm and cannot be L2-normalised");
  return scale;
}

template <class T>
T apply_weight(T s, const AffinityParams& p) {
  const double base = p.weight == Weight::Relu ? std::max(double(s), 0.0) : (1.0 + double(s)) / 2.0;
  return T(p.gamma == 1.0 ? base : std::pow(std::max(base, 0.0), p.gamma));
}

}  // namespace

template <class T>
void knn_affinity_cpu(const StackedRows<T>& x, MatrixView<int64_t> indices, MatrixView<T> weights,
                      const AffinityParams& p) {
  const int64_t n = x.rows(), d = x.cols(), k = p.k;
  REXT_CHECK(n >= 2, "x: need at least 2 rows, got ", n);
  REXT_CHECK(d >= 1, "x: need at least 1 column");
  REXT_CHECK(k >= 1 && k <= (p.exclude_self ? n - 1 : n), "k must be in [1, ",
             p.exclude_self ? n - 1 : n, "] for ", n, " rows, got ", k);
  REXT_CHECK(indices.rows == n && indices.cols == k, "indices: expected shape (", n, ", ", k, ")");
  REXT_CHECK(weights.rows == n && weights.cols == k, "weights: expected shape (", n, ", ", k, ")");
  REXT_CHECK(std::isfinite(p.gamma) && p.gamma > 0, "gamma must be finite and > 0, got ", p.gamma);

  const TileKernels<T> kern = best_kernels<T>();
  const int threads = resolve_threads(p.threads);
  const int64_t mr = kern.mr, nr = kern.nr;
  const int64_t mc = round_up(p.block_rows > 0 ? p.block_rows : kDefaultMC, mr);
  const int64_t nc = round_up(p.block_rows > 0 ? p.block_rows : kDefaultNC, nr);
  const int64_t a_len = round_up(n, mr) * d, b_len = round_up(n, nr) * d;
  check_workspace(double(a_len + b_len + int64_t(threads) * mc * nc) * sizeof(T) +
                      double(n) * k * (sizeof(T) + 8),
                  "knn_affinity");

  const std::vector<T> scale = row_scales(x, p.normalize, threads);
  AlignedBuffer<T> a_pack = aligned_buffer<T>(a_len), b_pack = aligned_buffer<T>(b_len);
  pack_panels(x, scale, mr, a_pack.get(), threads);
  pack_panels(x, scale, nr, b_pack.get(), threads);

  // The output arrays hold the running top-k: similarities in `weights`, turned into
  // affinities at the end. Empty slots are (-inf, -1).
  for (int64_t i = 0; i < n; ++i) {
    std::fill(weights.row(i), weights.row(i) + k, -std::numeric_limits<T>::infinity());
    std::fill(indices.row(i), indices.row(i) + k, int64_t(-1));
  }

  const int64_t row_blocks = (n + mc - 1) / mc;
#pragma omp parallel num_threads(threads)
  {
    AlignedBuffer<T> tile = aligned_buffer<T>(mc * nc);
    for (int64_t j0 = 0; j0 < n; j0 += nc) {
      const int64_t ncols = std::min(nc, n - j0);
      const int64_t col_panels = (ncols + nr - 1) / nr;
#pragma omp for schedule(dynamic, 1)
      for (int64_t rb = 0; rb < row_blocks; ++rb) {
        const int64_t i0 = rb * mc, nrows = std::min(mc, n - i0);
        const int64_t row_panels = (nrows + mr - 1) / mr;
        for (int64_t k0 = 0; k0 < d; k0 += kKC) {
          const int64_t kc = std::min(kKC, d - k0);
          for (int64_t jp = 0; jp < col_panels; ++jp) {
            const T* b = b_pack.get() + (j0 / nr + jp) * d * nr + k0 * nr;
            for (int64_t ip = 0; ip < row_panels; ++ip) {
              const T* a = a_pack.get() + (i0 / mr + ip) * d * mr + k0 * mr;
              kern.micro(kc, a, b, tile.get() + ip * mr * nc + jp * nr, nc, k0 > 0);
            }
          }
        }
        for (int64_t r = 0; r < nrows; ++r) {
          const int64_t i = i0 + r;
          kern.scan(tile.get() + r * nc, ncols, j0, p.exclude_self ? i : -1, weights.row(i),
                    indices.row(i), k);
        }
      }
    }
  }

#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < k; ++c) weights(i, c) = apply_weight(weights(i, c), p);
}

template void knn_affinity_cpu<float>(const StackedRows<float>&, MatrixView<int64_t>,
                                      MatrixView<float>, const AffinityParams&);
template void knn_affinity_cpu<double>(const StackedRows<double>&, MatrixView<int64_t>,
                                       MatrixView<double>, const AffinityParams&);

}  // namespace rext::cpu
