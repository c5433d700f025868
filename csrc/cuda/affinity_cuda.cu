// CUDA fused top-k affinity: not written yet (issue 3). The build compiles and links this file
// so the CUDA half of the module is exercised; calling it says plainly that it is missing.
#include <stdexcept>

#include "cuda/affinity_cuda.h"

namespace rext::cuda {

template <class T>
void knn_affinity_cuda(Device, const StackedRows<T>&, MatrixView<int64_t>, MatrixView<T>,
                       const AffinityParams&) {
  throw std::runtime_error("knn_affinity: the CUDA kernel is not implemented in this version; "
                           "move the arrays to the CPU");
}

template void knn_affinity_cuda<float>(Device, const StackedRows<float>&, MatrixView<int64_t>,
                                       MatrixView<float>, const AffinityParams&);
template void knn_affinity_cuda<double>(Device, const StackedRows<double>&, MatrixView<int64_t>,
                                        MatrixView<double>, const AffinityParams&);

}  // namespace rext::cuda
