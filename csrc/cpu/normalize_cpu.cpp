// Symmetric normalisation of a k-NN graph into CSR on the CPU: scatter A and A^T into
// per-row buckets (counting sort by row), sort each bucket by column and merge duplicates,
// then scale by D^-1/2 on both sides. O(N k log k) time, O(N k) memory.
#include "cpu/normalize_cpu.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/check.h"
#include "core/graph_math.h"
#include "cpu/workspace.h"

namespace rext::cpu {
namespace {

template <class T>
struct Entry {
  int64_t col;
  T val;
};

}  // namespace

template <class T>
int64_t sym_normalize_cpu(MatrixView<const int64_t> indices, MatrixView<const T> weights,
                          int64_t* out_indptr, int64_t* out_indices, T* out_data,
                          const NormalizeParams& p) {
  const int64_t n = indices.rows, k = indices.cols;
  // Each pass touches every stored entry a few times.
  const int threads = resolve_threads(p.threads, double(n) * double(k) * 4);
  check_workspace(double(2 * n * k) * sizeof(Entry<T>) + double(n) * 24, "sym_normalize");

  // Validate and count: row i gets its own nonzero entries, row j one per (i -> j).
  std::vector<int64_t> start(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t c = 0; c < k; ++c) {
      const int64_t j = indices(i, c);
      const T w = weights(i, c);
      REXT_CHECK(j >= 0 && j < n, "indices: entry (", i, ", ", c, ") = ", j,
                 " is outside [0, ", n, ")");
      REXT_CHECK(std::isfinite(w) && w >= 0, "weights: entry (", i, ", ", c, ") = ", w,
                 " must be finite and >= 0");
      if (w != 0) {
        ++start[i + 1];
        ++start[j + 1];
      }
    }
  }
  for (int64_t i = 0; i < n; ++i) start[i + 1] += start[i];

  std::vector<Entry<T>> buckets(start[n]);
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t c = 0; c < k; ++c) {
      const T w = weights(i, c);
      if (w == 0) continue;
      const int64_t j = indices(i, c);
      buckets[fill[i]++] = {j, w};
      buckets[fill[j]++] = {i, w};
    }
  }

  // Sort each row by column and merge duplicates in place; count what is left.
  std::vector<int64_t> merged(n + 1, 0);
  std::vector<double> degree(n, 0.0);
#pragma omp parallel for num_threads(threads) schedule(dynamic, 256)
  for (int64_t i = 0; i < n; ++i) {
    Entry<T>* b = buckets.data() + start[i];
    const int64_t len = start[i + 1] - start[i];
    std::sort(b, b + len, [](const Entry<T>& x, const Entry<T>& y) { return x.col < y.col; });
    int64_t out = 0;
    double deg = 0;
    for (int64_t e = 0; e < len; ++e) {
      if (out > 0 && b[out - 1].col == b[e].col) {
        b[out - 1].val += b[e].val;
      } else {
        b[out++] = b[e];
      }
      deg += double(b[e].val);
    }
    merged[i + 1] = out;
    degree[i] = deg;
  }
  for (int64_t i = 0; i < n; ++i) merged[i + 1] += merged[i];

  // Every stored entry joins two nodes of positive degree; a node without edges has an empty
  // row and column, i.e. its D^-1/2 is taken as 0.
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const Entry<T>* b = buckets.data() + start[i];
    const int64_t len = merged[i + 1] - merged[i];
    int64_t* cols = out_indices + merged[i];
    T* vals = out_data + merged[i];
    for (int64_t e = 0; e < len; ++e) {
      cols[e] = b[e].col;
      vals[e] = T(double(b[e].val) / sqrt_product(degree[i], degree[b[e].col]));
    }
  }
  std::copy(merged.begin(), merged.end(), out_indptr);
  return merged[n];
}

template int64_t sym_normalize_cpu<float>(MatrixView<const int64_t>, MatrixView<const float>,
                                          int64_t*, int64_t*, float*, const NormalizeParams&);
template int64_t sym_normalize_cpu<double>(MatrixView<const int64_t>, MatrixView<const double>,
                                           int64_t*, int64_t*, double*, const NormalizeParams&);

}  // namespace rext::cpu
