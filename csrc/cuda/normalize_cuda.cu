// CUDA symmetric normalisation: not written yet (issue 3); see affinity_cuda.cu.
#include <stdexcept>

#include "cuda/normalize_cuda.h"

namespace rext::cuda {

template <class T>
int64_t sym_normalize_cuda(Device, MatrixView<const int64_t>, MatrixView<const T>, int64_t*,
                           int64_t*, T*, const NormalizeParams&) {
  throw std::runtime_error("sym_normalize: the CUDA kernel is not implemented in this version; "
                           "move the arrays to the CPU");
}

template int64_t sym_normalize_cuda<float>(Device, MatrixView<const int64_t>,
                                           MatrixView<const float>, int64_t*, int64_t*, float*,
                                           const NormalizeParams&);
template int64_t sym_normalize_cuda<double>(Device, MatrixView<const int64_t>,
                                            MatrixView<const double>, int64_t*, int64_t*, double*,
                                            const NormalizeParams&);

}  // namespace rext::cuda
