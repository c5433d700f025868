#include <cmath>
#include <stdexcept>

#include "core/check.h"
#include "cpu/affinity_cpu.h"
#include "dispatch/ops.h"
#ifdef REXT_WITH_CUDA
#include "cuda/affinity_cuda.h"
#endif

namespace rext {

template <class T>
void knn_affinity(Device dev, const StackedRows<T>& x, const StackedRows<T>* queries,
                  MatrixView<int64_t> indices, MatrixView<T> weights, const AffinityParams& p) {
  // Checks every device shares; each kernel adds only its own limits.
  const int64_t n = x.rows(), d = x.cols(), k = p.k;
  REXT_CHECK(d >= 1, "x: need at least 1 column");
  REXT_CHECK(std::isfinite(p.gamma) && p.gamma > 0, "gamma must be finite and > 0, got ", p.gamma);
  int64_t nq = n;
  if (queries) {
    // Separate queries are new points, not rows of x: there is no own row to leave out.
    REXT_CHECK(!p.exclude_self, "exclude_self: queries are not rows of x, so no row of x is ",
               "their own; pass exclude_self=False, or rows=(start, stop) for rows of x");
    REXT_CHECK(queries->cols() == d, "queries: has ", queries->cols(), " columns but x has ", d);
    REXT_CHECK(n >= 1, "x: need at least 1 row");
    REXT_CHECK(k >= 1 && k <= n, "k must be in [1, ", n, "] for ", n, " rows of x, got ", k);
    nq = queries->rows();
  } else {
    REXT_CHECK(n >= 2, "x: need at least 2 rows, got ", n);
    REXT_CHECK(k >= 1 && k <= (p.exclude_self ? n - 1 : n), "k must be in [1, ",
               p.exclude_self ? n - 1 : n, "] for ", n, " rows, got ", k);
    const int64_t stop = p.query_stop < 0 ? n : p.query_stop;
    REXT_CHECK(p.query_start >= 0 && p.query_start <= stop && stop <= n,
               "rows: (start, stop) must satisfy 0 <= start <= stop <= ", n, ", got (",
               p.query_start, ", ", p.query_stop, ")");
    nq = stop - p.query_start;
  }
  REXT_CHECK(indices.rows == nq && indices.cols == k, "indices: expected shape (", nq, ", ", k, ")");
  REXT_CHECK(weights.rows == nq && weights.cols == k, "weights: expected shape (", nq, ", ", k, ")");
  if (nq == 0) return;  // an empty block: nothing to search, nothing to launch
  if (dev.kind == DeviceKind::CPU) return cpu::knn_affinity_cpu(x, queries, indices, weights, p);
#ifdef REXT_WITH_CUDA
  return cuda::knn_affinity_cuda(dev, x, queries, indices, weights, p);
#else
  throw std::runtime_error("reclip_ext was built without CUDA");
#endif
}

template void knn_affinity<float>(Device, const StackedRows<float>&, const StackedRows<float>*,
                                  MatrixView<int64_t>, MatrixView<float>, const AffinityParams&);
template void knn_affinity<double>(Device, const StackedRows<double>&, const StackedRows<double>*,
                                   MatrixView<int64_t>, MatrixView<double>,
                                   const AffinityParams&);

}  // namespace rext
