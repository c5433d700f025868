#include <stdexcept>

#include "core/check.h"
#include "cpu/normalize_cpu.h"
#include "dispatch/ops.h"
#ifdef REXT_WITH_CUDA
#include "cuda/normalize_cuda.h"
#endif

namespace rext {

template <class T>
int64_t sym_normalize(Device dev, MatrixView<const int64_t> indices, MatrixView<const T> weights,
                      int64_t* out_indptr, int64_t* out_indices, T* out_data,
                      const NormalizeParams& p) {
  // Checks every device shares; each kernel adds only its own.
  const int64_t n = indices.rows, k = indices.cols;
  REXT_CHECK(weights.rows == n && weights.cols == k, "weights: shape (", weights.rows, ", ",
             weights.cols, ") does not match indices (", n, ", ", k, ")");
  REXT_CHECK(n >= 1 && k >= 1, "indices: expected a non-empty (N, k) array");
  if (dev.kind == DeviceKind::CPU)
    return cpu::sym_normalize_cpu(indices, weights, out_indptr, out_indices, out_data, p);
#ifdef REXT_WITH_CUDA
  return cuda::sym_normalize_cuda(dev, indices, weights, out_indptr, out_indices, out_data, p);
#else
  throw std::runtime_error("reclip_ext was built without CUDA");
#endif
}

template int64_t sym_normalize<float>(Device, MatrixView<const int64_t>, MatrixView<const float>,
                                      int64_t*, int64_t*, float*, const NormalizeParams&);
template int64_t sym_normalize<double>(Device, MatrixView<const int64_t>, MatrixView<const double>,
                                       int64_t*, int64_t*, double*, const NormalizeParams&);

}  // namespace rext
