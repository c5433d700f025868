// Fused top-k affinity on the CPU. The similarity S = X X^T is computed tile by tile with a
// BLIS-style register-blocked micro-kernel on packed panels, and each finished tile is merged
// into the running top-k of its rows before the next one is computed, so memory stays
// O(N (k + d)).
//
// S is symmetric, so only the tiles on and above the block diagonal are computed: a tile of
// row block I and column block J > I feeds the rows of I (row scan) and, transposed, the rows
// of J (column scan). Loop order: column blocks outermost and shared by all threads, so the
// packed block J stays in the shared L3 while the row blocks I <= J are handed out
// dynamically; depth is split in KC chunks so a B micro-panel stays in L1. Column-scan results
// go to per-thread lists for the rows of J and are merged after each column block, so no two
// threads ever write the same row.
//
// A query block (the graph's rows for some queries only, e.g. one shard's rows) has no
// symmetry to exploit: its tiles are query rows against every column block, row scans only.
// The micro-kernel computes each entry of a tile as the same ordered sum of products whichever
// operand is the row (products commute, the depth order is fixed), so a block's rows are
// bitwise the rows of the whole graph, and the blocks of a partition concatenate to it.
#include "cpu/affinity_cpu.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "core/check.h"
#include "core/graph_math.h"
#include "core/topk.h"
#include "cpu/tile_kernels.h"
#include "cpu/workspace.h"

namespace rext::cpu {
namespace {

constexpr int64_t kKC = 256;             // depth per micro-kernel call
constexpr int64_t kDefaultBlock = 384;   // rows = columns per tile

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
int64_t gcd(int64_t a, int64_t b) { return b ? gcd(b, a % b) : a; }

// Per-thread running top-k for the rows of the current column block (column-scan results).
template <class T>
struct ColumnLists {
  std::vector<T> vals, thr;
  std::vector<int64_t> idx;
  ColumnLists(int64_t rows, int64_t k) : vals(rows * k), thr(rows), idx(rows * k) {}
  void reset(int64_t rows, int64_t k) {
    std::fill(vals.begin(), vals.begin() + rows * k, -std::numeric_limits<T>::infinity());
    std::fill(idx.begin(), idx.begin() + rows * k, int64_t(-1));
    std::fill(thr.begin(), thr.begin() + rows, -std::numeric_limits<T>::infinity());
  }
};

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
std::vector<T> row_scales(const StackedRows<T>& x, bool normalize, int threads,
                          const char* name) {
  const int64_t n = x.rows(), d = x.cols();
  std::vector<T> scale(n, T(1));
  int64_t zero_row = -1;
  double largest = 0;  // row norm, for the overflow check of unnormalised rows
#pragma omp parallel for num_threads(threads) schedule(static) reduction(max : largest)
  for (int64_t i = 0; i < n; ++i) {
    // Scaled by the largest entry first, so rows near the limits of the type neither
    // overflow nor underflow.
    const T* r = x.row(i);
    double big = 0;
    for (int64_t c = 0; c < d; ++c) big = std::max(big, std::abs(double(r[c])));
    double s = 0;
    for (int64_t c = 0; big > 0 && c < d; ++c) s += (double(r[c]) / big) * (double(r[c]) / big);
    if (!normalize) {
      largest = std::max(largest, big * std::sqrt(s));
    } else if (big > 0) {
      scale[i] = T(1.0 / (big * std::sqrt(s)));
    } else {
#pragma omp critical
      zero_row = zero_row < 0 ? i : std::min(zero_row, i);
    }
  }
  REXT_CHECK(zero_row < 0, name, ": row ", zero_row,
             " has zero norm and cannot be L2-normalised");
  check_similarity_norm(largest, sizeof(T) == 8);
  return scale;
}


// Similarities -> affinities f(s) in place for the first `rows` rows; refuses a weight that
// overflows the type.
template <class T>
void apply_weights(MatrixView<T> weights, int64_t rows, const AffinityParams& p, int threads) {
  const int64_t k = p.k;
  // The similarity of the largest weight, or -inf when every weight fits.
  double worst = -std::numeric_limits<double>::infinity();
#pragma omp parallel for num_threads(threads) schedule(static) reduction(max : worst)
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t c = 0; c < k; ++c) {
      const double s = double(weights(i, c)), f = affinity_weight(s, p.weight, p.gamma);
      weights(i, c) = T(f);
      if (!std::isfinite(weights(i, c))) worst = std::max(worst, s);
    }
  check_weight(worst == -std::numeric_limits<double>::infinity(), worst, p.gamma,
               sizeof(T) == 8);
}

// The running top-k lists start empty: (-inf, -1) in every slot.
template <class T>
void clear_lists(MatrixView<int64_t> indices, MatrixView<T> weights, int64_t rows, int64_t k) {
  for (int64_t i = 0; i < rows; ++i) {
    std::fill(weights.row(i), weights.row(i) + k, -std::numeric_limits<T>::infinity());
    std::fill(indices.row(i), indices.row(i) + k, int64_t(-1));
  }
}

// The whole graph: every row of x against every row, upper triangle of tiles only.
// The products of query rows [i0, i0 + nrows) (packed in mr-row panels in a_pack) with the
// rows [j0, j0 + ncols) of x (nr-row panels in b_pack) into `tile` (row stride bs), kKC of the
// d dimensions per micro-kernel call: the one inner loop of the whole graph and of a block.
template <class T>
void tile_products(const TileKernels<T>& kern, const T* a_pack, const T* b_pack, int64_t i0,
                   int64_t nrows, int64_t j0, int64_t ncols, int64_t d, T* tile, int64_t bs) {
  const int64_t mr = kern.mr, nr = kern.nr;
  const int64_t row_panels = (nrows + mr - 1) / mr, col_panels = (ncols + nr - 1) / nr;
  for (int64_t k0 = 0; k0 < d; k0 += kKC) {
    const int64_t kc = std::min(kKC, d - k0);
    for (int64_t jp = 0; jp < col_panels; ++jp) {
      const T* b = b_pack + (j0 / nr + jp) * d * nr + k0 * nr;
      for (int64_t ip = 0; ip < row_panels; ++ip) {
        const T* a = a_pack + (i0 / mr + ip) * d * mr + k0 * mr;
        kern.micro(kc, a, b, tile + ip * mr * bs + jp * nr, bs, k0 > 0);
      }
    }
  }
}

template <class T>
void full_graph(const StackedRows<T>& x, MatrixView<int64_t> indices, MatrixView<T> weights,
                const AffinityParams& p) {
  const int64_t n = x.rows(), d = x.cols(), k = p.k;
  const TileKernels<T> kern = best_kernels<T>();
  const int64_t mr = kern.mr, nr = kern.nr, unit = mr / gcd(mr, nr) * nr;
  const int64_t bs = round_up(std::min(p.block_rows > 0 ? p.block_rows : kDefaultBlock, n), unit);
  // The threads meet after each column block: on average half of a block column's products.
  const int threads = resolve_threads(p.threads, 0.5 * double(n) * double(bs) * double(d));
  const int64_t a_len = round_up(n, mr) * d, b_len = round_up(n, nr) * d;
  check_workspace(double(a_len + b_len + int64_t(threads) * bs * (bs + 2 * k)) * sizeof(T) +
                      double(n) * k * (sizeof(T) + 8),
                  "knn_affinity");

  const std::vector<T> scale = row_scales(x, p.normalize, threads, "x");
  AlignedBuffer<T> a_pack = aligned_buffer<T>(a_len), b_pack = aligned_buffer<T>(b_len);
  pack_panels(x, scale, mr, a_pack.get(), threads);
  pack_panels(x, scale, nr, b_pack.get(), threads);

  // The output arrays hold the running top-k: similarities in `weights`, turned into
  // affinities at the end.
  clear_lists(indices, weights, n, k);
  const int64_t blocks = (n + bs - 1) / bs;
  std::vector<ColumnLists<T>> lists(threads, ColumnLists<T>(bs, k));
#pragma omp parallel num_threads(threads)
  {
    const int me = omp_get_thread_num();
    ColumnLists<T>& mine = lists[me];
    AlignedBuffer<T> tile = aligned_buffer<T>(bs * bs);
    for (int64_t bj = 0; bj < blocks; ++bj) {
      const int64_t j0 = bj * bs, ncols = std::min(bs, n - j0);
      mine.reset(ncols, k);
#pragma omp for schedule(dynamic, 1)
      for (int64_t bi = bj; bi >= 0; --bi) {
        const int64_t i0 = bi * bs, nrows = std::min(bs, n - i0);
        tile_products(kern, a_pack.get(), b_pack.get(), i0, nrows, j0, ncols, d, tile.get(), bs);
        for (int64_t r = 0; r < nrows; ++r) {
          const int64_t i = i0 + r;
          kern.scan(tile.get() + r * bs, ncols, j0, p.exclude_self ? i : -1, weights.row(i),
                    indices.row(i), k);
        }
        if (bi < bj)
          kern.col_scan(tile.get(), nrows, ncols, bs, i0, mine.vals.data(), mine.idx.data(),
                        mine.thr.data(), k);
      }
      // Fold every thread's column-scan lists into the rows of block J.
#pragma omp for schedule(static)
      for (int64_t c = 0; c < ncols; ++c) {
        T* vals = weights.row(j0 + c);
        int64_t* idx = indices.row(j0 + c);
        for (const ColumnLists<T>& other : lists)
          for (int64_t e = 0; e < k && other.idx[c * k + e] >= 0; ++e)
            topk_insert(vals, idx, k, other.vals[c * k + e], other.idx[c * k + e]);
      }
    }
  }

  apply_weights(weights, n, p, threads);
}

// The graph's rows for a block of queries: rows [q0, q0 + nq) of x (self_col0 = q0 when the
// query's own row is excluded, -1 otherwise) or separate query rows (self_col0 = -1), against
// every row of x.
template <class T>
void query_block(const StackedRows<T>& x, const StackedRows<T>& q, const std::vector<T>& q_scale,
                 const std::vector<T>& x_scale, int64_t self_col0, MatrixView<int64_t> indices,
                 MatrixView<T> weights, const AffinityParams& p, int threads) {
  const int64_t n = x.rows(), nq = q.rows(), d = x.cols(), k = p.k;
  const TileKernels<T> kern = best_kernels<T>();
  const int64_t mr = kern.mr, nr = kern.nr, unit = mr / gcd(mr, nr) * nr;
  const int64_t bs = round_up(std::min(p.block_rows > 0 ? p.block_rows : kDefaultBlock, n), unit);
  const int64_t a_len = round_up(nq, mr) * d, b_len = round_up(n, nr) * d;
  check_workspace(double(a_len + b_len + int64_t(threads) * bs * bs) * sizeof(T) +
                      double(nq) * k * (sizeof(T) + 8),
                  "knn_affinity");
  AlignedBuffer<T> a_pack = aligned_buffer<T>(a_len), b_pack = aligned_buffer<T>(b_len);
  pack_panels(q, q_scale, mr, a_pack.get(), threads);
  pack_panels(x, x_scale, nr, b_pack.get(), threads);
  clear_lists(indices, weights, nq, k);

  // Column blocks outermost, as in full_graph, so block J stays in cache while the query row
  // blocks are handed out; each thread writes only the rows of its own row block.
  const int64_t row_blocks = (nq + bs - 1) / bs, col_blocks = (n + bs - 1) / bs;
#pragma omp parallel num_threads(threads)
  {
    AlignedBuffer<T> tile = aligned_buffer<T>(bs * bs);
    for (int64_t bj = 0; bj < col_blocks; ++bj) {
      const int64_t j0 = bj * bs, ncols = std::min(bs, n - j0);
#pragma omp for schedule(dynamic, 1)
      for (int64_t bi = 0; bi < row_blocks; ++bi) {
        const int64_t i0 = bi * bs, nrows = std::min(bs, nq - i0);
        tile_products(kern, a_pack.get(), b_pack.get(), i0, nrows, j0, ncols, d, tile.get(), bs);
        for (int64_t r = 0; r < nrows; ++r) {
          const int64_t i = i0 + r;
          kern.scan(tile.get() + r * bs, ncols, j0, self_col0 >= 0 ? self_col0 + i : -1,
                    weights.row(i), indices.row(i), k);
        }
      }
    }
  }
  apply_weights(weights, nq, p, threads);
}

}  // namespace

template <class T>
void knn_affinity_cpu(const StackedRows<T>& x, const StackedRows<T>* queries,
                      MatrixView<int64_t> indices, MatrixView<T> weights,
                      const AffinityParams& p) {
  const int64_t n = x.rows();
  const int64_t q0 = queries ? 0 : p.query_start;
  const int64_t q1 = queries ? queries->rows() : (p.query_stop < 0 ? n : p.query_stop);
  if (!queries && q0 == 0 && q1 == n) return full_graph(x, indices, weights, p);
  if (q1 <= q0) return;
  // The threads meet after each column block: the query rows against one block of x.
  const double block_work = double(q1 - q0) * double(x.cols()) * double(std::min(kDefaultBlock, n));
  const int threads = resolve_threads(p.threads, block_work);
  // Every database row is scaled (and, unnormalised, norm-checked) the same way as in the
  // whole graph, so a block's similarities are the whole graph's.
  const std::vector<T> x_scale = row_scales(x, p.normalize, threads, "x");
  if (queries) {
    const std::vector<T> q_scale = row_scales(*queries, p.normalize, threads, "queries");
    return query_block(x, *queries, q_scale, x_scale, -1, indices, weights, p, threads);
  }
  const std::vector<T> q_scale(x_scale.begin() + q0, x_scale.begin() + q1);
  query_block(x, row_range(x, q0, q1), q_scale, x_scale, p.exclude_self ? q0 : -1, indices,
              weights, p, threads);
}

template void knn_affinity_cpu<float>(const StackedRows<float>&, const StackedRows<float>*,
                                      MatrixView<int64_t>, MatrixView<float>,
                                      const AffinityParams&);
template void knn_affinity_cpu<double>(const StackedRows<double>&, const StackedRows<double>*,
                                       MatrixView<int64_t>, MatrixView<double>,
                                       const AffinityParams&);

}  // namespace rext::cpu
