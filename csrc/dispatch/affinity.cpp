#include <stdexcept>

#include "cpu/affinity_cpu.h"
#include "dispatch/ops.h"
#ifdef REXT_WITH_CUDA
#include "cuda/affinity_cuda.h"
#endif

namespace rext {

template <class T>
void knn_affinity(Device dev, const StackedRows<T>& x, MatrixView<int64_t> indices,
                  MatrixView<T> weights, const AffinityParams& p) {
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
