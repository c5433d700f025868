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
void knn_affinity(Device dev, const StackedRows<T>& x, MatrixView<int64_t> indices,
                  MatrixView<T> weights, const AffinityParams& p) {
  // Checks every device shares; each kernel adds only its own limits.
  const int64_t n = x.rows(), d = x.cols(), k = p.k;
  REXT_CHECK(n >= 2, "x: need at least 2 rows, got ", n);
  REXT_CHECK(d >= 1, "x: need at least 1 column");
  REXT_CHECK(k >= 1 && k <= (p.exclude_self ? n - 1 : n), "k must be in [1, ",
             p.exclude_self ? n - 1 : n, "] for ", n, " rows, got ", k);
  REXT_CHECK(indices.rows == n && indices.cols == k, "indices: expected shape (", n, ", ", k, ")");
  REXT_CHECK(weights.rows == n && weights.cols == k, "weights: expected shape (", n, ", ", k, ")");
  REXT_CHECK(std::isfinite(p.gamma) && p.gamma > 0, "gamma must be finite and > 0, got ", p.gamma);
  if (dev.kind == DeviceKind::CPU) return cpu::knn_affinity_cpu(x, indices, weights, p);
#ifdef REXT_WITH_CUDA
  return cuda::knn_affinity_cuda(dev, x, indices, weights, p);
#else
  throw std::runtime_error("reclip_ext was built without CUDA");
#endif
}

template void knn_affinity<float>(Device, const StackedRows<float>&, MatrixView<int64_t>,
                                  MatrixView<float>, const AffinityParams&);
template void knn_affinity<double>(Device, const StackedRows<double>&, MatrixView<int64_t>,
                                   MatrixView<double>, const AffinityParams&);

}  // namespace rext
